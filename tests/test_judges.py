"""Judges against human labels: the agreement metrics, the bundled labelled answers, the llm judge's mechanism,
and `aird judges validate`."""

import json

import pytest

import tiny
from aird.core.judges import agreement, load_labelled, stratified_rows, validate
from aird.plugins.scorers import LLMJudge, SubstringScorer
from test_cli import aird, assert_one_sentence_error


def test_agreement_counts_and_kappa_by_hand():
    gold = [True, True, True, False, False, False, False, False]
    pred = [True, True, False, True, False, False, False, False]
    m = agreement(pred, gold)
    assert m["confusion"] == {"refusal_as_refusal": 2, "compliance_as_refusal": 1, "refusal_as_compliance": 1,
                              "compliance_as_compliance": 4}
    assert m["accuracy"] == 0.75 and m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    # chance agreement from the marginals: (3·3 + 5·5) / 64
    assert m["kappa"] == pytest.approx((0.75 - 34 / 64) / (1 - 34 / 64))
    assert agreement(gold, gold)["kappa"] == 1.0
    assert agreement([not g for g in gold], gold)["kappa"] < 0


def test_bundled_labels_and_a_stratified_sample():
    rows = load_labelled("xstest")
    assert len(rows) == 2250 and {r.group for r in rows} == {"gpt4", "llama2new", "llama2orig", "mistralguard",
                                                             "mistralinstruct"}
    assert 1000 < sum(r.refusal for r in rows) < 1250       # 983 full + 176 partial refusals
    pick = stratified_rows(rows, 40, 0)
    cells = {(r.group, r.refusal) for r in pick}
    assert len(pick) == 40 and len(cells) == 10              # every (model, label) cell, 4 each
    assert stratified_rows(rows, 40, 0) == pick and stratified_rows(rows, 40, 1) != pick
    jbb = load_labelled("jailbreakbench")
    assert len(jbb) == 100 and set(jbb[0].published) == {"TDC", "GCG", "BERT", "llama_guard", "gpt_4_turbo",
                                                         "gpt_4"}


def test_validate_reports_the_judge_and_the_published_ones_on_the_same_rows():
    recs = validate(["substring"], ["xstest", "jailbreakbench"], limit=60, seed=3)
    sub = {r["dataset"]: r for r in recs if r["judge"] == "substring"}
    rows = stratified_rows(load_labelled("xstest"), 60, 3)
    pred = SubstringScorer().refused([r.prompt for r in rows], [r.completion for r in rows])
    assert sub["xstest"]["n"] == 60 and sub["xstest"]["kappa"] == agreement(pred, [r.refusal for r in rows])["kappa"]
    assert set(sub["xstest"]["by_group"]) == {"gpt4", "llama2new", "llama2orig", "mistralguard", "mistralinstruct"}
    published = [r for r in recs if r["judge"].startswith("published:")]
    assert len(published) == 6 and all(r["dataset"] == "jailbreakbench" and r["n"] == 60 for r in published)


def test_llm_judge_reads_the_judge_models_next_token(refusing, monkeypatch):
    """The tiny refusing model as judge, asked only the prompt and answering "I" (refuse) or "Sure": the judge's
    P(refusal) must follow it, and batching must not change a verdict."""
    model_dir, _ = refusing
    judge = LLMJudge()
    judge.configure(judge_model=str(model_dir), device="cpu", batch_size=4)
    monkeypatch.setattr(judge, "question", "{prompt}")
    monkeypatch.setattr(judge, "letters", ("I", "Sure"))
    harmful, harmless = tiny.instructions(tiny.HARMFUL_ACTS)[:4], tiny.instructions(tiny.HARMLESS_ACTS)[:4]
    probs = judge.probabilities(harmful + harmless, [""] * 8)
    assert min(probs[:4]) > 0.5 > max(probs[4:])
    assert judge.refused(harmful + harmless, [""] * 8) == [True] * 4 + [False] * 4
    judge.batch_size = 1
    assert judge.probabilities(harmful + harmless, [""] * 8) == pytest.approx(probs, abs=1e-4)
    assert judge.info()["judge_model"] == str(model_dir)


def test_a_judge_that_cannot_get_ready_is_skipped_only_when_not_asked_for(monkeypatch):
    from aird.core import plugins
    from aird.core.errors import AirdError

    judge = plugins.get("scorer", "llm")
    monkeypatch.setattr(judge, "prepare", lambda: (_ for _ in ()).throw(AirdError("model x is not installed.")))
    recs = validate(["substring", "llm", "refusal-score"], ["jailbreakbench"], skip_unready=True)
    skipped = {r["judge"]: r.get("skipped") for r in recs if not r["judge"].startswith("published")}
    assert skipped["substring"] is None and skipped["llm"] == "model x is not installed."
    assert "refusal scores" in skipped["refusal-score"]   # stored answers have no answering model to read
    with pytest.raises(AirdError, match="not installed"):
        validate(["llm"], ["jailbreakbench"])


def test_judges_validate_cli():
    res = aird("judges", "validate", "--judge", "substring", "--dataset", "jailbreakbench", "--json")
    assert res.returncode == 0, res.stderr
    recs = [json.loads(x) for x in res.stdout.splitlines()]
    assert [r["judge"] for r in recs][0] == "substring" and all(r["record"] == "judges.validation" for r in recs)
    assert_one_sentence_error(aird("judges", "validate", "--judge", "nope"), "unknown scorer 'nope'")
    assert_one_sentence_error(aird("judges", "validate", "--limit", "0"), "--limit")
    assert_one_sentence_error(aird("judges", "validate", "--judge", "substring", "--dataset", "mine"),
                              "unknown labelled data set")


def test_eval_records_every_judges_verdict_and_their_agreement(refusing, tmp_path, register_plugin):
    from conftest import FirstWordPlugin

    from aird.core.artifacts import read_jsonl
    from aird.core.evaluate import EvalConfig, run_eval
    from aird.core.loading import load_model

    register_plugin(FirstWordPlugin())   # refused when the answer starts with "I" (the tiny model's refusal)
    model_dir, data = refusing
    lm = load_model(str(model_dir), device="cpu")
    path = tmp_path / "p.txt"
    path.write_text("\n".join(tiny.instructions(tiny.HARMFUL_ACTS)[:4] + tiny.instructions(tiny.HARMLESS_ACTS)[:4]))
    s = run_eval(lm, EvalConfig(harmful=[], benign=[], prompts_file=str(path), max_new_tokens=3, data_dir=str(data),
                                seen=[], judges=["first-word", "refusal-score"]), tmp_path / "o")
    recs = [r for r in read_jsonl(tmp_path / "o" / "eval.jsonl") if r["record"] == "eval.prompt"]
    mine = [r["judges"]["first-word"] for r in recs]
    # the refusal-score judge is the answering model's own first-token score, recorded beside each answer
    assert [r["judges"]["refusal-score"] for r in recs] == [r["refusal_score"] > 0 for r in recs]
    assert mine == [r["completion"].strip().startswith("I") for r in recs] and any(mine) and not all(mine)
    assert s["by_judge"]["substring"]["asr"] == s["asr"]
    assert set(s["engine"]["judge_s"]) == {"substring", "first-word", "refusal-score"}    # each judge timed apart
    assert s["by_judge"]["first-word"]["asr"]["p"] == pytest.approx(1 - sum(mine) / 8)
    k = s["by_judge"]["first-word"]["agreement_with_scorer"]
    assert k["n"] == 8 and k["kappa"] == agreement(mine, [r["refused"] for r in recs])["kappa"]


def test_classifier_is_the_default_judge_and_substring_verdicts_are_always_kept(refusing, tmp_path, register_plugin,
                                                                                 monkeypatch):
    from conftest import FirstWordPlugin

    from aird.core.evaluate import EvalConfig, run_eval
    from aird.core.loading import load_model

    monkeypatch.delenv("AIRD_SCORER")
    assert EvalConfig().scorer == "classifier"     # the best-agreeing judge (docs/judges.md) decides by default
    register_plugin(FirstWordPlugin())
    model_dir, data = refusing
    path = tmp_path / "p.txt"
    path.write_text("\n".join(tiny.instructions(tiny.HARMFUL_ACTS)[:3] + tiny.instructions(tiny.HARMLESS_ACTS)[:3]))
    s = run_eval(load_model(str(model_dir), device="cpu"),
                 EvalConfig(harmful=[], benign=[], prompts_file=str(path), max_new_tokens=3, data_dir=str(data), seen=[],
                            scorer="first-word"), tmp_path / "o")
    assert s["scorer"] == "first-word" and set(s["by_judge"]) == {"first-word", "substring"}


@pytest.mark.parametrize("name", ["harmbench-cls", "llama-guard"])
def test_hub_classifier_judges_read_their_verdict_words(name, tmp_path):
    """The hub judges on a tiny Llama built from a config (the hub is not reachable here): P(harmful) is the
    model's next-token distribution over its two verdict words, and swapping those words' output rows flips every
    verdict."""
    import torch
    from transformers import AutoModelForCausalLM

    from aird.core import plugins

    judge = plugins.get("scorer", name)
    tok = tiny.tokenizer()
    tok.add_tokens(list(judge.verdict_words))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny.config("llama", len(tok)))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    judge.configure(judge_model=str(tmp_path / "m"), device="cpu")
    prompts = tiny.instructions(tiny.HARMFUL_ACTS)[:6]
    answers = ["Sure Here is a way .", "I cannot help .", "", "the way is", "As a", "Here"]
    probs = judge.probabilities(prompts, answers)
    lm = judge.prepare()
    a, b = (tok(w, add_special_tokens=False).input_ids[0] for w in judge.verdict_words)
    with torch.inference_mode():
        ids = tok(judge.text(tok, prompts[1], answers[1]), add_special_tokens=False).input_ids
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
    assert probs[1] == pytest.approx(float(torch.softmax(logits[[a, b]].double(), -1)[0]), abs=1e-5)
    assert judge.refused(prompts, answers) == [p < 0.5 for p in probs]        # "harmful" is an attack that worked
    head = lm.model.get_output_embeddings().weight
    with torch.no_grad():
        head[[a, b]] = head[[b, a]].clone()
    flipped = judge.probabilities(prompts, answers)
    assert flipped == pytest.approx([1 - p for p in probs], abs=1e-5)
    assert judge.info()["judge_model"] == str(tmp_path / "m")
