"""Generation engines: selection (auto, named, fallback with a reason), the refusal score whatever the engine,
a third-party engine through the same hook, and what the vLLM engine declines. The hf/vLLM agreement on the
default model is in test_default_model.py (slow)."""

import json

import pytest
import torch

import tiny
from aird import hookimpl
from aird.core import engines, plugins
from aird.core.artifacts import read_jsonl
from aird.core.errors import AirdError
from aird.core.evaluate import EvalConfig, run_eval
from aird.core.generate import BatchedSession, Generation
from aird.core.plugins import PluginRegistry, Registered, build_registry
from aird.plugins import engines as builtin


class Canned:
    """An engine that answers every prompt with a refusal and keeps no logits (as vLLM keeps none)."""

    name = "canned"
    description = "refuses everything"
    auto_rank = 1
    chunk = 3

    def __init__(self, why=None):
        self.why, self.calls, self.closed, self.options = why, [], 0, None

    def unavailable(self, lm):
        return self.why

    def open(self, lm, options):
        engine = self
        engine.options = options

        class S:
            info = {"startup_s": 0.0}

            def generate(self, texts, max_new_tokens, progress=None):
                engine.calls.append(len(texts))
                return [Generation("I cannot help with that.", None, 6) for _ in texts]

            def close(self):
                engine.closed += 1

        return S()


def _with(monkeypatch, *extra):
    reg = plugins.plugin_registry()
    items = reg.items + [Registered("engine", e.name, e, "test", "test-plugin", "1") for e in extra]
    monkeypatch.setattr(plugins, "plugin_registry", lambda: PluginRegistry(items, []))


def test_prefill_refusal_score_equals_the_hf_engines_first_step(refusing_lm):
    lm = refusing_lm
    texts = [lm.adapter.format(lm.tokenizer, t) for t in tiny.instructions(tiny.HARMFUL_ACTS)[:3] +
             tiny.instructions(tiny.HARMLESS_ACTS)[:3]]
    gens, from_logits = engines.answer(BatchedSession(lm, 4), lm, texts, 2, 4)
    assert all(g.first_logits is not None for g in gens)
    prefill = engines.prompt_refusal_scores(lm, texts, 4)
    assert torch.allclose(prefill, from_logits, atol=1e-4)
    # and the score separates the two kinds of prompt, so the comparison is not of two constants
    assert prefill[:3].min() > prefill[3:].max()

    # an engine without logits that returns each answer's top log-probabilities (as vLLM does): where every
    # refusal token is among them the score comes from them, exactly; the others from the prefill
    ids = lm.adapter.refusal_token_ids(lm.tokenizer)
    full = [torch.log_softmax(lm.model(input_ids=torch.tensor([lm.tokenizer(t, add_special_tokens=False).input_ids]))
                              .logits[0, -1].double(), -1) for t in texts]

    class TopLogprobs:
        def generate(self, texts_, n, progress=None):
            out = []
            for k, lp in enumerate(full):
                top = {int(i): float(lp[i]) for i in lp.topk(20).indices}
                if k % 2 == 0:          # every refusal token among them
                    top.update({i: float(lp[i]) for i in ids})
                else:                   # none: the prefill fills in
                    top = {i: v for i, v in top.items() if i not in ids}
                out.append(Generation("ok", None, 1, first_logprobs=top))
            return out

    _, top = engines.answer(TopLogprobs(), lm, texts, 2, 4)
    assert torch.allclose(top, from_logits, atol=1e-4)


def test_auto_prefers_the_best_engine_that_can_run_the_model_and_says_why_it_passed_one_over(refusing_lm,
                                                                                              monkeypatch):
    down = Canned(why="its server is down")
    _with(monkeypatch, down)
    monkeypatch.setattr(builtin.VLLMEngine, "unavailable", lambda self, lm: "vLLM is not installed")
    c = engines.choose("auto", refusing_lm)
    assert c.engine.name == "hf"
    assert "not canned: its server is down" in c.note and "not vllm: vLLM is not installed" in c.note
    with pytest.raises(AirdError, match="engine 'canned' cannot run this model: its server is down"):
        engines.choose("canned", refusing_lm)
    with pytest.raises(AirdError, match="unknown engine 'nope'"):
        engines.choose("nope", refusing_lm)
    down.why = None
    assert engines.choose("auto", refusing_lm).engine is down and engines.choose("auto", refusing_lm).note is None
    # a job smaller than an engine's start-up is worth goes to the next one, and the note says so
    down.min_prompts = 100
    small = engines.choose("auto", refusing_lm, n_prompts=20)
    assert small.engine.name == "hf" and "20 prompts are fewer than its start-up is worth (100)" in small.note
    assert engines.choose("auto", refusing_lm, n_prompts=100).engine is down
    assert engines.choose("canned", refusing_lm, n_prompts=20).engine is down     # named: the user's choice


def test_eval_through_a_third_party_engine_records_it_and_keeps_the_score_exact(refusing, tmp_path, monkeypatch):
    model_dir, data = refusing
    from aird.core.loading import load_model

    lm = load_model(str(model_dir), device="cpu")
    canned = Canned()
    _with(monkeypatch, canned)
    prompts = tiny.instructions(tiny.HARMLESS_ACTS)[:5]
    path = tmp_path / "p.txt"
    path.write_text("\n".join(prompts))
    cfg = EvalConfig(harmful=[], benign=[], prompts_file=str(path), prompts_as="benign", max_new_tokens=4,
                     batch_size=2, data_dir=str(data), seen=[], engine="canned")
    s = run_eval(lm, cfg, tmp_path / "o")
    assert canned.calls == [3, 2] and canned.closed == 1            # its chunk size, and closed once
    assert canned.options["work_tokens"] == 5 * 4                      # the job's size: prompts × max new tokens
    assert s["over_refusal"] == {"p": 1.0} and s["engines"] == {"canned": 5}
    assert s["engine"]["engine"] == "canned"
    recs = [r for r in read_jsonl(tmp_path / "o" / "eval.jsonl") if r["record"] == "eval.prompt"]
    hf = engines.prompt_refusal_scores(lm, [lm.adapter.format(lm.tokenizer, p) for p in prompts], 2)
    assert [r["engine"] for r in recs] == ["canned"] * 5
    assert [r["refusal_score"] for r in recs] == pytest.approx(hf.tolist(), abs=1e-5)
    # a rerun with another engine resumes (how answers are computed is not part of the question) ...
    again = run_eval(lm, EvalConfig(**{**cfg.__dict__, "engine": "hf"}), tmp_path / "o")
    assert again["resumed"] is True and canned.calls == [3, 2]


def test_the_vllm_engine_declines_what_it_cannot_read(refusing_lm, monkeypatch):
    eng = builtin.VLLMEngine()
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    assert "not installed" in eng.unavailable(refusing_lm)
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: object())
    assert eng.unavailable(refusing_lm) is None
    w8a8 = type(refusing_lm)(**{**refusing_lm.__dict__, "info": {**refusing_lm.info,
                                                               "activation_quantization": {"num_bits": 8}}})
    assert "W8A8" in eng.unavailable(w8a8)
    in_memory = type(refusing_lm)(**{**refusing_lm.__dict__, "path": ""})
    assert "local folder" in eng.unavailable(in_memory)


def test_vllm_skips_compiling_a_small_job_on_a_cpu(refusing_lm, monkeypatch):
    """Below EAGER_BELOW_TOKENS of work on a CPU vLLM starts in eager mode (its compile costs more than it saves);
    a bigger job, an unknown size or the user's own enforce_eager keep what they ask for."""
    import sys
    import types

    made = []
    fake = types.ModuleType("vllm")
    fake.LLM = lambda **kw: made.append(kw) or object()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(builtin, "servable_folder", lambda path, arch: path)
    for opts, eager in (({"work_tokens": 400 * 32}, True), ({"work_tokens": 2000 * 32}, None), ({}, None),
                        ({"work_tokens": 10, "enforce_eager": False}, False)):
        s = builtin.VLLMSession(refusing_lm, opts)
        assert made[-1].get("enforce_eager") == eager and s.info.get("enforce_eager") == eager
    assert builtin.eager_pays("cpu", builtin.EAGER_BELOW_TOKENS - 1)
    assert not builtin.eager_pays("cpu", builtin.EAGER_BELOW_TOKENS) and not builtin.eager_pays("cuda", 10)


def test_servable_folder_adds_architectures_without_touching_the_model(refusing, tmp_path, monkeypatch):
    model_dir, _ = refusing
    folder = tmp_path / "m"
    folder.mkdir()
    for f in model_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = None
    (folder / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("AIRD_CACHE_DIR", str(tmp_path / "cache"))
    out = builtin.servable_folder(folder, "Qwen2ForCausalLM")
    assert out != folder and json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert json.loads((folder / "config.json").read_text())["architectures"] is None
    assert (out / "model.safetensors").resolve() == (folder / "model.safetensors").resolve()
    assert builtin.servable_folder(folder, "Qwen2ForCausalLM") == out        # made once
    assert builtin.servable_folder(out, "Qwen2ForCausalLM") == out           # a complete folder is used as it is


def test_a_broken_engine_plugin_is_reported_not_fatal():
    class Mod:
        @staticmethod
        @hookimpl
        def aird_register_engines(register):
            register(object())            # no Engine interface

    class EP:
        name, dist = "bad-engine", None

        def load(self):
            return Mod

    reg = build_registry([EP()])
    assert reg.of("engine") == [] and "without the Engine interface" in reg.broken[0].error
