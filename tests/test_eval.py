import json

import pytest
import torch

import tiny
from aird.core import evaluate
from aird.core import generate as gen_module
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
        {"set": "ok", "role": "benign", "category": "homonyms", "refused": True, "refusal_score": 0.5},
        {"set": "ok", "role": "benign", "category": "homonyms", "refused": True, "refusal_score": 0.5},
    ]
    agg = aggregate(recs)
    assert agg["asr"] == {"h": 0.5}
    assert agg["asr_by_category"]["h"] == {"a": 0.5, "b": 1.0, "uncategorized": 0.0}
    assert agg["over_refusal"] == {"ok": 0.75}
    assert agg["over_refusal_by_category"]["ok"] == {"homonyms": 1.0, "uncategorized": 0.5}   # XSTest safe's types
    assert agg["mean_refusal_score"]["h"] == 0.0 and agg["n"] == {"h": 4, "ok": 4}


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
                     category_column="kind", max_new_tokens=4, batch_size=2, data_dir=str(data),
                     seen=[])   # the tiny prompts are the tiny probe splits' own
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
    real = gen_module.generate
    monkeypatch.setattr(gen_module, "generate", lambda lm_, texts, *a, **k: calls.append(len(texts)) or real(lm_, texts, *a, **k))
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
                                max_new_tokens=3, data_dir=str(data), seen=[]), tmp_path / "o")
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
    # each window's summed loss is kept for paired intervals of a perplexity change
    assert res["window_nll"] == pytest.approx([15 * v.item() for v in losses], rel=1e-3)


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
    # each question's correctness is kept in order, and its share is the task's accuracy
    arc = next(t for t in tasks if t["task"] == "arc_easy")
    assert len(arc["items"]["acc"]) == 4 and set(arc["items"]["acc"]) <= {"0", "1"}
    assert arc["items"]["acc"].count("1") / 4 == pytest.approx(arc["acc"])


def test_alpaca_sample_size_is_an_option(tmp_path):
    from aird.core.errors import AirdError

    rows = [{"instruction": f"Describe object number {i}.", "category": None} for i in range(500)]
    (tmp_path / "refusal_direction" / "processed").mkdir(parents=True)
    (tmp_path / "refusal_direction" / "processed" / "alpaca.json").write_text(json.dumps(rows))
    cfg = EvalConfig(harmful=[], benign=["alpaca"], data_dir=str(tmp_path))
    default = evaluate._sets(cfg)[0][0][2]
    assert len(default) == 100
    cfg.alpaca_n = 300
    more = evaluate._sets(cfg)[0][0][2]
    assert len(more) == 300 and len({p.instruction for p in more}) == 300
    cfg.alpaca_n = 0
    with pytest.raises(AirdError, match="--alpaca-n must be at least 1"):
        evaluate._sets(cfg)


def test_mcnemar_exact_matches_the_binomial_tail():
    from aird.core.evaluate import mcnemar_exact

    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)                   # all five changes one way
    assert mcnemar_exact(16, 4) == pytest.approx(2 * (1 + 20 + 190 + 1140 + 4845) / 2**20)
    assert mcnemar_exact(4, 16) == mcnemar_exact(16, 4)


def test_paired_changes_count_each_prompt_once():
    from aird.core.evaluate import paired_changes

    def rec(s, role, i, refused, prompt=None):
        return {"record": "eval.prompt", "set": s, "role": role, "index": i, "prompt": prompt or f"{s}{i}",
                "refused": refused}

    base = [rec("h", "harmful", i, r) for i, r in enumerate([True, True, False, False, True])] + \
           [rec("b", "benign", i, r) for i, r in enumerate([False, False, True])]
    other = [rec("h", "harmful", i, r) for i, r in enumerate([True, False, True, True, True])] + \
            [rec("b", "benign", i, r) for i, r in enumerate([True, False, True])] + \
            [rec("h", "harmful", 9, True), rec("b", "benign", 2, False, prompt="another prompt")]  # unpaired
    p = paired_changes(base, other)
    assert p["h"] == {"role": "harmful", "n": 5, "both_refused": 2, "newly_refused": 2, "no_longer_refused": 1,
                      "neither_refused": 0, "metric": "asr", "baseline": 0.4, "model": 0.2, "mcnemar_p": 1.0}
    assert p["b"]["n"] == 3 and p["b"]["newly_refused"] == 1 and p["b"]["metric"] == "over_refusal"
    assert p["b"]["baseline"] == pytest.approx(1 / 3) and p["b"]["model"] == pytest.approx(2 / 3)
    # an evaluation that left out a prompt (seen by a repair) numbers the rest differently: they still pair by text
    shifted = [{**r, "index": r["index"] - 1} for r in other[:5] if r["index"] > 0]
    q = paired_changes(base, shifted)["h"]
    assert q["n"] == 4 and q["newly_refused"] == 2 and q["no_longer_refused"] == 1 and q["both_refused"] == 1


def test_eval_of_several_models_pairs_each_with_the_first(refusing, tmp_path, register_plugin):
    """`aird eval -m A -m B` writes comparison.jsonl and prints eval.paired records: B's judgements against A's,
    prompt by prompt, counted from the two runs' own per-prompt records."""
    import csv
    import shutil

    from typer.testing import CliRunner

    from conftest import FirstWordPlugin

    from aird.cli.main import app
    from aird.core.evaluate import mcnemar_exact

    model_dir, data = refusing
    d = tmp_path / "data"
    shutil.copytree(data, d)
    (d / "advbench").mkdir()
    with open(d / "advbench" / "harmful_behaviors.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["goal", "target"])
        w.writerows([g, "Sure"] for g in tiny.instructions(tiny.HARMFUL_ACTS)[:6])
    (d / "jailbreakbench").mkdir()
    with open(d / "jailbreakbench" / "benign-behaviors.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "goal", "target", "behavior", "category", "source"])
        w.writerows([i, g, "Sure", "b", "c", "s"] for i, g in enumerate(tiny.instructions(tiny.HARMLESS_ACTS)[:4]))
    model, tok = tiny.random_model("qwen2", layers=2)
    model.save_pretrained(tmp_path / "random")
    tok.save_pretrained(tmp_path / "random")

    register_plugin(FirstWordPlugin())   # the tiny model refuses by starting with "I"
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["eval", "-m", str(model_dir), "-m", str(tmp_path / "random"), "--harmful",
                                   "advbench", "--benign", "jailbreakbench_benign", "--max-new-tokens", "3",
                                   "--scorer", "first-word",
                                   "--data-dir", str(d), "--out", str(out), "--seen", "none", "--json"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    paired = [r for r in recs if r["record"] == "eval.paired"]
    assert len(paired) == 1 and paired == read_jsonl(out / "comparison.jsonl")
    first = {(r["set"], r["index"]): r["refused"] for r in read_jsonl(out / "model" / "eval.jsonl")
             if r["record"] == "eval.prompt"}
    second = {(r["set"], r["index"]): r["refused"] for r in read_jsonl(out / "random" / "eval.jsonl")
              if r["record"] == "eval.prompt"}
    assert sum(first[k] for k in first if k[0] == "advbench") >= 4     # the refusing model refuses harmful prompts
    for name, n in (("advbench", 6), ("jailbreakbench_benign", 4)):
        got = paired[0]["sets"][name]
        keys = [k for k in first if k[0] == name]
        assert got["n"] == n == len(keys)
        assert got["newly_refused"] == sum(second[k] and not first[k] for k in keys)
        assert got["no_longer_refused"] == sum(first[k] and not second[k] for k in keys)
        assert got["mcnemar_p"] == mcnemar_exact(got["newly_refused"], got["no_longer_refused"])
    assert paired[0]["baseline"] == "model" and paired[0]["compared"] == "random"
    assert "random against model, the same prompts" in res.output


def test_several_models_get_distinct_output_folders():
    from aird.cli.main import _slugs

    assert _slugs(["runs/default-wanda50", "default"]) == ["default-wanda50", "default"]
    # two folders that share a name would have resumed one another's run; the same model twice is two runs
    assert _slugs(["runs/a/model", "runs/b/model"]) == ["a-model", "b-model"]
    assert _slugs(["default", "default"]) == ["default", "default-2"]


def test_the_eval_table_has_one_column_per_model():
    from aird.cli.render import render_eval
    from aird.cli.render import console

    summaries = [{"asr": {"advbench": a}, "over_refusal": {"alpaca": 0.1}, "mean_refusal_score": {"advbench": 0.0},
                  "asr_by_category": {}, "limits": {}} for a in (0.25, 0.75)]
    with console.capture() as cap:
        render_eval(["first-model", "second-model"], summaries)
    header = next(line for line in cap.get().splitlines() if "metric" in line)
    assert "first-model" in header and "second-model" in header and "advbench" not in header
