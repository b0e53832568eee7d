"""Slow checks on the real default model (Qwen2.5-Coder-0.5B-Instruct from the package index).

They run in CI; `pytest -m "not slow"` leaves them out for a quick loop."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("AIRD_SKIP_MODEL") == "1",
                       reason="AIRD_SKIP_MODEL=1: the default model was not installed (scripts/setup.sh skipped it)"),
]


@pytest.fixture(scope="module")
def default_probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe-default")
    # the quick study's probe settings: the defaults (128/32, up to 30 candidates scored) took 11 minutes of CI
    res = subprocess.run([sys.executable, "-m", "aird", "probe", "--model", "default", "--out", str(out), "--n-train",
                          "64", "--n-val", "24", "--top-k", "1", "--max-scored", "5", "--json"],
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, json.loads(res.stdout.strip().splitlines()[-1])


def test_default_probe_summary(default_probe):
    out, summary = default_probe
    assert summary["n_layers"] == 24 and summary["positions"] == [-5, -4, -3, -2, -1]
    assert summary["source"]["layer"] < int(0.8 * 24)
    assert summary["train"]["harmful"]["kept"] >= 10 and summary["val_kept"]["harmful"] >= 1
    assert (out / "probe.png").stat().st_size > 10_000


def test_default_direction_mediates_refusal(default_probe):
    """Recomputed with plain hooks on full forward passes (not the cached shortcut the selection uses):
    ablating the chosen direction takes harmful prompts below 0, adding it takes harmless ones above 0."""
    from aird.core import hooks
    from aird.core.data import load_set, sample
    from aird.core.directions import refusal_scores
    from aird.core.forward import last_logits, make_batches
    from aird.core.loading import load_model
    from aird.core.probe import load_probe

    out, _ = default_probe
    summary, direction, _ = load_probe(out)
    lm = load_model("default", device="cpu")
    ids = lm.adapter.refusal_token_ids(lm.tokenizer)
    cfg = summary["config"]

    def batches(name):
        prompts = sample(load_set(name), cfg["n_val"], cfg["seed"])
        return make_batches(lm, [lm.adapter.format(lm.tokenizer, p.instruction) for p in prompts], 16)

    harmful, harmless = batches("harmful_val"), batches("harmless_val")
    base_h = refusal_scores(last_logits(lm, harmful), ids)
    base_b = refusal_scores(last_logits(lm, harmless), ids)
    kept_h, kept_b = base_h > 0, base_b < 0          # the reference's filter, as the probe applied it
    with hooks.ablate(lm, direction):
        abl = refusal_scores(last_logits(lm, harmful), ids)
    with hooks.add(lm, direction, summary["source"]["layer"]):
        add = refusal_scores(last_logits(lm, harmless), ids)
    assert abl[kept_h].mean() < 0 < base_h[kept_h].mean()
    assert add[kept_b].mean() > 0 > base_b[kept_b].mean()
    # the numbers agree with what the probe recorded
    assert abl[kept_h].mean().item() == pytest.approx(summary["quality"]["bypass"], abs=0.05)
    assert add[kept_b].mean().item() == pytest.approx(summary["quality"]["induce"], abs=0.05)
    assert torch.isfinite(direction).all()


# magnitude's unstructured 50% is left to the tiny-model tests: Wanda takes the same unstructured path here, and
# magnitude 2:4 the same pruning code (the CI budget pays for the vLLM agreement check below instead)
@pytest.mark.parametrize("method,options,check", [
    ("wanda", ["--sparsity", "0.5", "--calib-samples", "16"], "sparsity"),
    ("magnitude", ["--pattern", "2:4"], "nm"),
    ("rtn", ["--bits", "4", "--group-size", "128"], "bits"),
])
def test_default_model_compression(tmp_path, method, options, check):
    out = tmp_path / method
    try:
        _check_default_compression(out, method, options, check)
    finally:
        shutil.rmtree(out, ignore_errors=True)   # 2.4 GB a folder: four of them must not pile up on a CI disk


def _check_default_compression(out, method, options, check):
    from safetensors.torch import load_file

    from aird.core.measure import decoder_linear_weights, max_distinct_per_group

    res = subprocess.run([sys.executable, "-m", "aird", "compress", "--model", "default", "--method", method,
                          *options, "--out", str(out), "--json"], capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads(res.stdout.strip().splitlines()[-1])
    weights = decoder_linear_weights(load_file(str(out / "model.safetensors")))
    assert len(weights) == 24 * 7
    if check == "sparsity":
        assert s["sparsity"] == pytest.approx(0.5, abs=0.01)
    elif check == "nm":
        # at most 2 non-zeros in every group of 4 along the input dimension; exactly 2 zeros, except in the
        # groups where the dequantized GGUF already had more than 2 exact zeros
        from aird.core import registry
        from aird.core.registry import converted_dir

        original = load_file(str(converted_dir(registry.lookup("default")) / "model.safetensors"))
        assert s["nm_compliant"] is True
        for name, w in weights.items():
            zeros = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)
            before = (original[name].reshape(w.shape[0], -1, 4) == 0).sum(-1)
            assert (zeros == torch.clamp(before, min=2)).all(), name
    else:
        assert s["bits"] <= 4 and all(max_distinct_per_group(w, 128) <= 16 for w in weights.values())
    # embeddings and lm_head are left as they were (the dequantized GGUF already has some exact zeros there)
    from aird.core import registry
    from aird.core.registry import converted_dir

    original = load_file(str(converted_dir(registry.lookup("default")) / "model.safetensors"))
    for name, share in s["other_sparsity"].items():
        assert share == pytest.approx(float((original[name] == 0).float().mean()), abs=1e-9), name


def test_default_zero_shot_equals_lm_eval_run_directly(tmp_path):
    """aird's zero-shot numbers (the loaded model handed to lm-eval) equal lm-eval loading the same model folder
    itself, on a small subset of the local task files."""
    pytest.importorskip("lm_eval")
    from aird.core.loading import load_model, resolve_model_path
    from aird.core.zeroshot import run_zero_shot

    lm = load_model("default", device="cpu")
    tasks = ["arc_easy", "rte"]     # a multiple-choice and a yes/no task; all eight run on the tiny model
    ours = run_zero_shot(lm, tasks, tmp_path / "ours", None, limit=10)
    direct = run_zero_shot(lm, tasks, tmp_path / "direct", None, limit=10,
                           model_for_lm_eval=resolve_model_path("default"))
    assert ours == direct
    assert all(ours[t]["n"] == 10 and 0 <= ours[t]["acc"] <= 1 for t in tasks)


_AGREEMENT = r"""
import importlib.util
import json
from aird.core import engines, plugins
from aird.core.data import load_set, sample
from aird.core.loading import load_model

lm = load_model("default", device="cpu")
prompts = [p.instruction for p in sample(load_set("advbench"), 32, 0)]
texts = [lm.adapter.format(lm.tokenizer, p) for p in prompts]
res = {}
for name in ("hf", "vllm"):
    # eager: vLLM's compile takes minutes of start-up, more than 32 answers are worth (the bench runs compiled)
    with engines.session(name, lm, {"batch_size": 16, "dtype": "float32", "enforce_eager": True}) as s:
        gens, scores = engines.answer(s, lm, texts, 16, 16)
    res[name] = {"scores": scores.tolist(), "first_logits": gens[0].first_logits is not None,
                 "ids": [lm.tokenizer(g.text, add_special_tokens=False).input_ids[:16] for g in gens],
                 "refused": plugins.get("scorer", "substring").refused(prompts, [g.text for g in gens])}
print(json.dumps(res))
"""


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vLLM is not installed (scripts/setup.sh installs it on x86-64 Linux unless AIRD_WITH_VLLM=0)")
def test_vllm_and_hf_give_the_same_answers_on_the_default_model():
    """Greedy fp32 on the same folder, 32 AdvBench prompts (the issue's bar, measured on all 520 in
    docs/benchmarks.md): the substring verdict agrees on >= 97%, the first 16 tokens are identical on >= 90%,
    refusal scores differ by < 0.05. In a subprocess: vLLM binds the process's threads to the cores."""
    res = subprocess.run([sys.executable, "-c", _AGREEMENT], capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    hf, vl = r["hf"], r["vllm"]
    assert hf["first_logits"] and not vl["first_logits"]        # vLLM's scores come from the hf prefill
    assert 4 <= sum(hf["refused"]) <= 28                           # both kinds of answer are in the sample
    assert sum(a == b for a, b in zip(hf["refused"], vl["refused"])) >= 31
    assert sum(a == b for a, b in zip(hf["ids"], vl["ids"])) >= 29
    assert max(abs(a - b) for a, b in zip(hf["scores"], vl["scores"])) < 0.05
