import pytest
import torch

from aird.core.artifacts import Run, check_resumable, load_tensors, read_jsonl, save_tensors, write_jsonl
from aird.core.errors import ArtifactError


def test_jsonl_roundtrip_is_atomic(tmp_path):
    run = Run("probe", "m", {"a": 1}, seed=3)
    recs = [run.record("x.one", value=1.5), run.record("x.two", path=tmp_path)]
    write_jsonl(tmp_path / "f.jsonl", recs)
    back = read_jsonl(tmp_path / "f.jsonl")
    assert [r["record"] for r in back] == ["x.one", "x.two"] and back[1]["path"] == str(tmp_path)
    assert back[0]["schema"] == 1 and back[0]["seed"] == 3 and back[0]["config"] == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.jsonl"]


def test_corrupt_line_is_a_clear_error(tmp_path):
    p = tmp_path / "probe.jsonl"
    p.write_text('{"record": "a", "schema": 1}\n{"record": "b", "sch\n')
    with pytest.raises(ArtifactError, match="line 2 is not valid JSON"):
        read_jsonl(p)
    p.write_text('[1, 2]\n')
    with pytest.raises(ArtifactError, match="line 1 is not an aird record"):
        read_jsonl(p)


def test_tensors_roundtrip_and_bad_file(tmp_path):
    save_tensors(tmp_path / "d.safetensors", {"x": torch.arange(6.0).reshape(2, 3)})
    assert torch.equal(load_tensors(tmp_path / "d.safetensors")["x"], torch.arange(6.0).reshape(2, 3))
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        load_tensors(tmp_path / "bad.safetensors")


def test_resume_only_with_same_config():
    recs = [{"record": "x", "schema": 1, "config": {"seed": 1, "batch_size": 8}}]
    check_resumable(recs, {"seed": 1, "batch_size": 32}, "p", ignore=("batch_size",))
    with pytest.raises(ArtifactError, match="different configuration \\(seed\\)"):
        check_resumable(recs, {"seed": 2, "batch_size": 8}, "p")
