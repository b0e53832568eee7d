import json

import pytest
import torch

import tiny
from aird.core import evaluate
from aird.core.artifacts import read_jsonl
from aird.core.evaluate import EvalConfig, aggregate, run_eval, wikitext_perplexity
from aird.core.generate import generate
from aird.core.loading import load_model


def test_aggregate_per_category():
    recs = [
        {"set": "h", "role": "harmful", "category": "a", "refused": True, "refusal_score": 1.0},
        {"set": "h", "role": "harmful", "category": "a", "refused": False, "refusal_score": -1.0},
        {"set": "h", "role": "harmful", "category": "b", "refused": False, "refusal_score": -2.0},
        {"set": "h", "role": "harmful", "category": None, "refused": True, "refusal_score": 2.0},
        {"set": "ok", "role": "benign", "category": None, "refused": True, "refusal_score": 0.5},
        {"set": "ok", "role": "benign", "category": None, "refused": False, "refusal_score": -0.5},
    ]
    agg = aggregate(recs)
    assert agg["asr"] == {"h": 0.5}
    assert agg["asr_by_category"]["h"] == {"a": 0.5, "b": 1.0, "uncategorized": 0.0}
    assert agg["over_refusal"] == {"ok": 0.5}
    assert agg["mean_refusal_score"]["h"] == 0.0 and agg["n"] == {"h": 4, "ok": 2}


def test_batched_generation_equals_one_at_a_time(refusing):
    lm = load_model(str(refusing[0]), device="cpu")
    texts = [lm.adapter.format(lm.tokenizer, t) for t in tiny.instructions(tiny.HARMFUL_ACTS)[:3] +
             ["Tell me how to bake a cake", "What is the best way to fix a bike"]]
    batched = generate(lm, texts, max_new_tokens=5, batch_size=5)
    single = [generate(lm, [t], max_new_tokens=5, batch_size=1)[0] for t in texts]
    assert [g.text for g in batched] == [g.text for g in single]
    assert all(torch.allclose(a.first_logits, b.first_logits, atol=1e-4) for a, b in zip(batched, single))
    assert batched[0].text.split()[0] == "I" and batched[3].text.split()[0] == "Sure"


def _prompt_file(tmp_path):
    rows = [{"text": t, "kind": "violent" if i % 2 else "crime"} for i, t in enumerate(tiny.instructions(tiny.HARMFUL_ACTS)[:10])]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_on_a_users_prompt_file_and_resume(refusing, tmp_path, monkeypatch):
    model_dir, data = refusing
    lm = load_model(str(model_dir), device="cpu")
    cfg = EvalConfig(harmful=[], benign=[], prompts_file=str(_prompt_file(tmp_path)), column="text",
                     category_column="kind", max_new_tokens=4, batch_size=2, data_dir=str(data))
    full = run_eval(lm, cfg, tmp_path / "a")
    assert full["n"] == {"mine": 10} and set(full["asr_by_category"]["mine"]) == {"violent", "crime"}
    # the tiny model starts every harmful answer with "I" but never with a refusal phrase: substring ASR is 1,
    # while the refusal score (first generated position) says it leans to refusing
    assert full["asr"]["mine"] == 1.0 and full["mean_refusal_score"]["mine"] > 0
    # a run killed after 4 prompts, in the middle of writing the 5th line
    lines = (tmp_path / "a" / "eval.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "eval.jsonl").write_text("".join(lines[:4]) + lines[4][:20])
    calls = []
    real = evaluate.generate
    monkeypatch.setattr(evaluate, "generate", lambda lm_, texts, *a, **k: calls.append(len(texts)) or real(lm_, texts, *a, **k))
    again = run_eval(lm, cfg, tmp_path / "b")
    assert sum(calls) == 6
    assert again["asr"] == full["asr"] and again["mean_refusal_score"] == pytest.approx(full["mean_refusal_score"])
    recs = read_jsonl(tmp_path / "b" / "eval.jsonl")
    assert sorted(r["index"] for r in recs if r["record"] == "eval.prompt") == list(range(10))
    assert run_eval(lm, cfg, tmp_path / "b")["resumed"] is True


def test_benign_file_counts_over_refusal(refusing, tmp_path):
    model_dir, data = refusing
    lm = load_model(str(model_dir), device="cpu")
    path = tmp_path / "benign.txt"
    path.write_text("\n".join(tiny.instructions(tiny.HARMLESS_ACTS)[:4]))
    s = run_eval(lm, EvalConfig(harmful=[], benign=[], prompts_file=str(path), prompts_as="benign",
                                max_new_tokens=3, data_dir=str(data)), tmp_path / "o")
    assert s["over_refusal"] == {"benign": 0.0} and s["asr"] == {}


def test_perplexity_matches_a_direct_computation(refusing):
    model_dir, data = refusing
    lm = load_model(str(model_dir), device="cpu")
    res = wikitext_perplexity(lm, str(data), ctx_len=16, max_windows=3)
    ids = lm.tokenizer((data / "wikitext2" / "wikitext2_test_joined.txt").read_text(), add_special_tokens=False,
                       return_tensors="pt")["input_ids"][0]
    losses = []
    with torch.no_grad():
        for w in range(3):
            x = ids[w * 16:(w + 1) * 16][None]
            losses.append(torch.nn.functional.cross_entropy(lm.model(input_ids=x).logits[0, :-1], x[0, 1:]))
    assert res["perplexity"] == pytest.approx(torch.stack(losses).mean().exp().item(), rel=1e-4)
    assert res["windows"] == 3 and res["tokens"] == 45


def test_utility_suite_records_tasks_and_perplexity(refusing, tmp_path):
    pytest.importorskip("lm_eval")
    model_dir, data = refusing
    rows = [{"query": f"Question: {q}?", "choices": ["Sure", "I"], "gold": i % 2}
            for i, q in enumerate(tiny.instructions(tiny.HARMLESS_ACTS)[:6])]
    (data / "arc_easy").mkdir(exist_ok=True)
    (data / "arc_easy" / "arc_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lm = load_model(str(model_dir), device="cpu")
    cfg = EvalConfig(harmful=[], benign=[], tasks=["arc_easy"], limit=4, ppl_windows=2, ppl_ctx_len=16,
                     data_dir=str(data))
    s = run_eval(lm, cfg, tmp_path / "u", suites=("utility",))
    assert set(s["zero_shot"]) == {"arc_easy"} and s["zero_shot"]["arc_easy"]["n"] == 4
    assert 0 <= s["zero_shot_mean"] <= 1 and s["perplexity"] > 1
    assert s["limits"]["per_task"] == 4
    tasks = [r for r in read_jsonl(tmp_path / "u" / "eval.jsonl") if r["record"] == "eval.task"]
    assert {t["task"] for t in tasks} == {"arc_easy", "wikitext2"}


def test_alpaca_sample_size_is_an_option(tmp_path):
    from aird.core.errors import AirdError

    rows = [{"instruction": f"Describe object number {i}.", "category": None} for i in range(500)]
    (tmp_path / "refusal_direction" / "processed").mkdir(parents=True)
    (tmp_path / "refusal_direction" / "processed" / "alpaca.json").write_text(json.dumps(rows))
    cfg = EvalConfig(harmful=[], benign=["alpaca"], data_dir=str(tmp_path))
    default = evaluate._sets(cfg)[0][2]
    assert len(default) == 100
    cfg.alpaca_n = 300
    more = evaluate._sets(cfg)[0][2]
    assert len(more) == 300 and len({p.instruction for p in more}) == 300
    cfg.alpaca_n = 0
    with pytest.raises(AirdError, match="--alpaca-n must be at least 1"):
        evaluate._sets(cfg)
