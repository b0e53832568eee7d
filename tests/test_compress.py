"""Compressor plugins on a tiny Qwen2 (hidden 64, intermediate 128): achieved sparsity, N:M, distinct values
per group, and the written folder reloading like the original."""

import json

import pytest
import torch
from safetensors.torch import load_file

import tiny
from aird.core.compress import CompressConfig, run_compress
from aird.core.errors import AirdError
from aird.core.loading import load_model
from aird.core.measure import decoder_linear_weights, max_distinct_per_group, nm_compliant


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    model, tok = tiny.random_model("qwen2", layers=2, tie=True)
    root = tmp_path_factory.mktemp("tinyc")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model", tiny.write_data_dir(root / "data")


def compress(tiny_folder, tmp_path, method, fmt="auto", name=None, **params):
    folder, data = tiny_folder
    lm = load_model(str(folder), device="cpu")
    cfg = CompressConfig(method=method, params=params, data_dir=str(data), calib_samples=8, calib_seq_len=64,
                         format=fmt)
    res = run_compress(lm, cfg, tmp_path / (name or method))
    return res.summary, load_file(str(tmp_path / (name or method) / "model.safetensors"))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_pruning_hits_the_sparsity(tiny_folder, tmp_path, method):
    s, written = compress(tiny_folder, tmp_path, method, sparsity=0.5)
    assert s["sparsity"] == pytest.approx(0.5, abs=0.01)
    w = decoder_linear_weights(written)
    measured = sum(int((v == 0).sum()) for v in w.values()) / sum(v.numel() for v in w.values())
    assert measured == pytest.approx(s["sparsity"])
    # embeddings (tied with lm_head here) stay dense: only the padding row is zero
    assert s["other_sparsity"]["model.embed_tokens.weight"] < 0.02
    assert all(r["sparsity"] == pytest.approx(0.5, abs=0.02) for r in s["per_layer"])


@pytest.mark.parametrize("method,pattern", [("magnitude", "2:4"), ("wanda", "2:4"), ("sparsegpt", "2:4"),
                                            ("sparsegpt", "4:8")])
def test_nm_pattern_exact(tiny_folder, tmp_path, method, pattern):
    s, written = compress(tiny_folder, tmp_path, method, pattern=pattern)
    n, m = map(int, pattern.split(":"))
    assert s["nm_compliant"] is True and s["params"]["sparsity"] == pytest.approx(1 - n / m)
    for name, w in decoder_linear_weights(written).items():
        zeros = (w.reshape(w.shape[0], -1, m) == 0).sum(-1)
        assert (zeros == m - n).all(), name   # exactly M-N zeros in every group along the input dimension


@pytest.mark.parametrize("method,bits,group", [("rtn", 8, None), ("rtn", 4, 32), ("gptq", 4, 32), ("awq", 4, 32)])
def test_quantizers_write_at_most_2_pow_bits_values_per_group(tiny_folder, tmp_path, method, bits, group):
    s, written = compress(tiny_folder, tmp_path, method, bits=bits, group_size=group)
    assert s["bits"] <= bits and s["max_distinct_per_group"] <= 2 ** bits
    for name, w in decoder_linear_weights(written).items():
        assert max_distinct_per_group(w, group) <= 2 ** bits, name
    errs = [r["rel_error"] for r in s["per_layer"]]
    assert all(0 < e < (0.05 if bits == 8 else 0.3) for e in errs), errs
    assert s["sparsity"] < 0.2


def test_written_folder_names_its_architecture_even_when_the_source_config_did_not(tiny_folder, tmp_path):
    """A GGUF-converted config has null ``architectures``; the folders aird writes name the class, which vLLM needs."""
    import shutil

    folder, data = tiny_folder
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    cfg = json.loads((src / "config.json").read_text())
    cls = cfg["architectures"][0]
    (src / "config.json").write_text(json.dumps({**cfg, "architectures": None}))
    lm = load_model(str(src), device="cpu")
    run_compress(lm, CompressConfig(method="magnitude", params={"sparsity": 0.5}, data_dir=str(data)), tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == [cls]


def test_written_folder_loads_like_the_original(tiny_folder, tmp_path):
    s, _ = compress(tiny_folder, tmp_path, "rtn", bits=8)
    lm = load_model(s["out"], device="cpu")
    orig = load_model(str(tiny_folder[0]), device="cpu")
    x = torch.randint(8, 60, (2, 7))
    with torch.no_grad():
        a, b = lm.model(input_ids=x).logits, orig.model(input_ids=x).logits
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.1)
    cfg = json.loads((tmp_path / "rtn" / "config.json").read_text())
    assert "quantization_config" not in cfg
    recs = [json.loads(line) for line in (tmp_path / "rtn" / "compress.jsonl").read_text().splitlines()]
    assert recs[-1]["record"] == "compress.summary" and recs[-1]["schema"] == 1 and recs[-1]["seconds"] >= 0
    assert recs[-1]["peak_rss_mb"] > 0 and recs[-1]["per_layer"][0]["layer"] == 0


def test_rerun_resumes_and_other_params_need_force(tiny_folder, tmp_path):
    folder, data = tiny_folder
    lm = load_model(str(folder), device="cpu")
    cfg = CompressConfig(method="magnitude", params={"sparsity": 0.3}, data_dir=str(data))
    run_compress(lm, cfg, tmp_path / "m")
    assert run_compress(lm, cfg, tmp_path / "m").resumed
    other = CompressConfig(method="magnitude", params={"sparsity": 0.6}, data_dir=str(data))
    with pytest.raises(AirdError, match="different configuration"):
        run_compress(lm, other, tmp_path / "m")
    assert run_compress(lm, other, tmp_path / "m", force=True).summary["sparsity"] == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize("params,match", [
    ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
    ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\)"),
    ({"pattern": "4:4"}, "N must be at least 1 and smaller than M"),
    ({"pattern": "two:four"}, "not of the form N:M"),
    ({"pattern": "2:4", "sparsity": 0.3}, "means sparsity 0.5"),
    ({"bits": 4}, "does not take --bits"),
    ({"sparsity": "0.5"}, "--sparsity must be a float like its default"),
])
def test_bad_pruning_options(tiny_folder, tmp_path, params, match):
    folder, data = tiny_folder
    lm = load_model(str(folder), device="cpu")
    with pytest.raises(AirdError, match=match):
        run_compress(lm, CompressConfig(method="magnitude", params=params, data_dir=str(data)), tmp_path / "x")


@pytest.mark.parametrize("params,match", [
    ({"bits": 4, "group_size": 48}, "group size 48 does not divide"),
    ({"bits": 3}, "quantizes to 4, 8 bits"),
    ({"sparsity": 0.5}, "does not take --sparsity"),
])
def test_bad_quantization_options(tiny_folder, tmp_path, params, match):
    folder, data = tiny_folder
    lm = load_model(str(folder), device="cpu")
    with pytest.raises(AirdError, match=match):
        run_compress(lm, CompressConfig(method="rtn", params=params, data_dir=str(data)), tmp_path / "x")


def test_nm_helpers():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]])
    assert nm_compliant(w, 2, 4) and not nm_compliant(w, 1, 4)
    assert max_distinct_per_group(torch.tensor([[1.0, 1.0, 2.0, 3.0]]), 2) == 2


def test_w8a8_int8_weights_and_activation_quantization_on_reload(tiny_folder, tmp_path):
    s, written = compress(tiny_folder, tmp_path, "w8a8")
    assert s["bits"] <= 8 and s["max_distinct_per_group"] <= 256
    for name, w in decoder_linear_weights(written).items():
        assert max_distinct_per_group(w, None) <= 256, name
    cfg = json.loads((tmp_path / "w8a8" / "config.json").read_text())
    act = cfg["aird_activation_quantization"]
    assert act["num_bits"] == 8 and act["strategy"] == "token" and act["dynamic"]
    lm = load_model(s["out"], device="cpu")
    assert lm.info["activation_quantization"]["matrices"] == 2 * 7   # every decoder Linear of 2 layers
    # the inputs every Linear sees are on an int8 grid per token: at most 255 distinct values per row
    seen = {}
    mod = lm.adapter.out_proj(lm.adapter.layers(lm.model)[1], "mlp")
    h = mod.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach().clone()))
    x = torch.randint(8, 60, (2, 7))
    with torch.no_grad():
        quantized = lm.model(input_ids=x).logits
    h.remove()
    rows = seen["x"].reshape(-1, seen["x"].shape[-1])
    assert max(len(torch.unique(r)) for r in rows) <= 255
    steps = (rows / (rows.abs().amax(-1, keepdim=True) / 127))
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    # the same weights without the activation hooks compute something slightly different
    plain = load_model(s["out"], device="cpu")
    for layer in plain.adapter.layers(plain.model):
        for m in layer.modules():
            m._forward_pre_hooks.clear()
    with torch.no_grad():
        unquantized = plain.model(input_ids=x).logits
    assert not torch.equal(quantized, unquantized) and torch.allclose(quantized, unquantized, atol=0.5)


def test_w8a8_takes_no_group_size(tiny_folder, tmp_path):
    with pytest.raises(AirdError, match="group"):
        compress(tiny_folder, tmp_path, "w8a8", group_size=32)


@pytest.mark.parametrize("method,params,packed", [("rtn", {"bits": 4, "group_size": 32}, "weight_packed"),
                                                  ("gptq", {"bits": 4, "group_size": 32}, "weight_packed"),
                                                  ("w8a8", {}, "weight")])
def test_compressed_tensors_format_packs_and_loads_back_as_the_dense_folder(tiny_folder, tmp_path, method, params,
                                                                             packed):
    dense, _ = compress(tiny_folder, tmp_path, method, fmt="dense", name="dense", **params)
    s, written = compress(tiny_folder, tmp_path, method, fmt="compressed-tensors", name="ct", **params)
    assert dense["format"] == "dense" and s["format"] == "compressed-tensors"   # auto is dense on a CPU
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and "aird_activation_quantization" not in cfg
    weights = q["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == params.get("bits", 8)
    key = f"model.layers.0.mlp.down_proj.{packed}"
    if packed == "weight_packed":   # eight int4 values per int32
        assert written[key].dtype == torch.int32 and written[key].shape[1] * 8 == 128
        assert "model.layers.0.mlp.down_proj.weight" not in written
    else:                           # int8 weights stored as int8, int8 activations in the config
        assert written[key].dtype == torch.int8 and q["config_groups"]["group_0"]["input_activations"]["num_bits"] == 8
    # the packed folder holds the same quantized weights: measured the same, loaded the same
    assert s["sparsity"] == dense["sparsity"] and s["max_distinct_per_group"] == dense["max_distinct_per_group"]
    a, b = load_model(str(tmp_path / "dense"), device="cpu"), load_model(str(tmp_path / "ct"), device="cpu")
    wa, wb = decoder_linear_weights(a.model.state_dict()), decoder_linear_weights(b.model.state_dict())
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    x = torch.randint(8, 60, (2, 7))
    with torch.no_grad():
        la, lb = a.model(input_ids=x).logits, b.model(input_ids=x).logits
    assert torch.allclose(la, lb, atol=1e-4), (la - lb).abs().max()


def test_pruning_has_no_compressed_tensors_format(tiny_folder, tmp_path):
    with pytest.raises(AirdError, match="no compressed-tensors format"):
        compress(tiny_folder, tmp_path, "magnitude", fmt="compressed-tensors", sparsity=0.5)
    with pytest.raises(AirdError, match="--format must be"):
        compress(tiny_folder, tmp_path, "rtn", fmt="gguf", bits=8)


def test_compressed_tensors_folder_without_the_package_is_one_sentence(monkeypatch):
    import sys
    from types import SimpleNamespace

    from aird.core.loading import _quantized_load_kwargs

    cfg = SimpleNamespace(quantization_config={"quant_method": "compressed-tensors"})
    assert "quantization_config" in _quantized_load_kwargs(cfg)
    assert _quantized_load_kwargs(SimpleNamespace()) == {}
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)   # import fails as if not installed
    with pytest.raises(AirdError, match=r"needs the compressed-tensors package: pip install 'aird\[compress\]'"):
        _quantized_load_kwargs(cfg)


def test_too_little_disk_space_fails_before_compressing(tiny_folder, tmp_path, monkeypatch):
    """The written model and the scratch copy of the original weights must fit; say so before the long part."""
    import shutil
    from collections import namedtuple

    from typer.testing import CliRunner

    from aird.cli.main import app
    from aird.core import plugins

    called = []
    monkeypatch.setattr(plugins.get("compressor", "magnitude"), "compress",
                        lambda *a, **k: called.append(1) or {})
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 10**5, 10**5))
    folder, data = tiny_folder
    res = CliRunner().invoke(app, ["compress", "--model", str(folder), "--method", "magnitude", "--sparsity", "0.5",
                                   "--out", str(tmp_path / "m"), "--data-dir", str(data)])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert "not enough free disk space" in out and "0.0 GB are free" in out and "Traceback" not in out
    assert called == [] and not (tmp_path / "m").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".aird-compress-")]


def test_disk_filling_up_mid_write_is_one_sentence_and_leaves_nothing_half_written(tiny_folder, tmp_path,
                                                                                 monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    from aird.core.errors import DiskFull

    compress(tiny_folder, tmp_path, "magnitude", sparsity=0.5)     # a finished folder that must survive
    before = (tmp_path / "magnitude" / "model.safetensors").read_bytes()
    writes = []

    def full(tensors, path, metadata=None):
        writes.append(path)
        if len(writes) == 2:   # the scratch copy fits, the model does not
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr("aird.core.compress.save_file", full)
    folder, data = tiny_folder
    cfg = CompressConfig(method="wanda", params={"sparsity": 0.25}, data_dir=str(data), calib_samples=8,
                         calib_seq_len=64)
    with pytest.raises(DiskFull, match="the disk filled up while writing the model at"):
        run_compress(load_model(str(folder), device="cpu"), cfg, tmp_path / "magnitude", force=True)
    assert len(writes) == 2
    assert (tmp_path / "magnitude" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["magnitude"]   # no .tmp folder, no scratch left
