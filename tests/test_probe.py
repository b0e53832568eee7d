import json

import pytest
import torch

from aird.core import candidates, hooks
from aird.core.artifacts import SCHEMA_VERSION, read_jsonl
from aird.core.directions import refusal_scores
from aird.core.errors import ArtifactError
from aird.core.forward import last_logits, make_batches
from aird.core.probe import ProbeConfig, load_probe, run_probe

import tiny


def cfg(data, **kw):
    base = dict(n_train=48, n_val=16, batch_size=16, data_dir=str(data), top_k=2, max_scored=6)
    base.update(kw)
    return ProbeConfig(**base)


def test_tiny_model_refuses_harmful_and_answers_harmless(refusing_lm):
    lm = refusing_lm
    ids = lm.adapter.refusal_token_ids(lm.tokenizer)
    harmful = [lm.adapter.format(lm.tokenizer, t) for t in tiny.instructions(tiny.HARMFUL_ACTS)]
    harmless = [lm.adapter.format(lm.tokenizer, t) for t in tiny.instructions(tiny.HARMLESS_ACTS)]
    assert (refusal_scores(last_logits(lm, make_batches(lm, harmful, 32)), ids) > 0).float().mean() > 0.9
    assert (refusal_scores(last_logits(lm, make_batches(lm, harmless, 32)), ids) < 0).float().mean() > 0.9


def test_probe_finds_a_direction_that_mediates_refusal(refusing, refusing_lm, tmp_path):
    model_dir, data = refusing
    res = run_probe(refusing_lm, cfg(data), tmp_path / "p")
    s = res.summary
    assert s["record"] == "probe.summary" and not s["filters_relaxed"]
    assert s["source"]["layer"] < int(0.8 * s["n_layers"])
    assert s["quality"]["bypass"] < 0 < s["baseline"]["harmful_refusal_score"]
    assert s["quality"]["induce"] > 0 > s["baseline"]["harmless_refusal_score"]
    assert s["quality"]["kl"] < 0.1
    # the bypass score's interval comes from the chosen candidate's per-prompt scores, whose mean it is
    best = next(c for c in res.candidates if (c["layer"], c["position"]) == (s["source"]["layer"], s["source"]["position"]))
    assert len(best["bypass_scores"]) == s["quality"]["n_val_harmful"] > 1
    assert sum(best["bypass_scores"]) / len(best["bypass_scores"]) == pytest.approx(s["quality"]["bypass"], abs=1e-3)
    lo, hi = s["quality"]["bypass_ci"]
    assert lo <= s["quality"]["bypass"] <= hi < 0
    # mediation, on every sampled validation prompt: ablation removes most of the harmful-harmless gap
    m = s["mediation"]
    assert m["n_harmful"] == len(m["ablated_scores"]) == 16 and m["refused"] > m["refused_ablated"]
    assert m["harmless_refusal_score"] < m["ablated_refusal_score"] < 0 < m["harmful_refusal_score"]
    assert m["gap_removed"] == pytest.approx((m["harmful_refusal_score"] - m["ablated_refusal_score"])
                                             / (m["harmful_refusal_score"] - m["harmless_refusal_score"]))
    assert m["gap_removed_ci"][0] > 0.5 and m["change_ci"][1] < 0
    assert m["mcnemar_p"] < 0.05
    # a probe finished before mediation was recorded gets it on a rerun, the rest untouched
    jsonl = tmp_path / "p" / "probe.jsonl"
    recs = read_jsonl(jsonl)
    for r in recs:
        r.pop("mediation", None)
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in recs))
    again = run_probe(refusing_lm, cfg(data), tmp_path / "p")
    assert again.resumed and again.summary["mediation"] == m
    assert [r["record"] for r in read_jsonl(jsonl)] == [r["record"] for r in recs]
    assert next(r for r in read_jsonl(jsonl) if r["record"] == "probe.summary")["mediation"] == m
    # the saved direction really does it: ablating it stops refusals of harmful validation prompts
    summary, direction, _ = load_probe(tmp_path / "p")
    lm = refusing_lm
    ids = lm.adapter.refusal_token_ids(lm.tokenizer)
    harmful = [lm.adapter.format(lm.tokenizer, t) for t in tiny.instructions(tiny.HARMFUL_ACTS)]
    batches = make_batches(lm, harmful, 32)
    with hooks.ablate(lm, direction):
        ablated = refusal_scores(last_logits(lm, batches), ids).mean()
    assert ablated < 0 < refusal_scores(last_logits(lm, batches), ids).mean()


def test_best_first_and_exhaustive_choose_the_same_direction(refusing, refusing_lm, tmp_path):
    _, data = refusing
    fast = run_probe(refusing_lm, cfg(data, top_k=1), tmp_path / "fast").summary
    full = run_probe(refusing_lm, cfg(data, exhaustive=True), tmp_path / "full").summary
    assert full["n_scored"] == full["n_candidates"] == 9
    assert fast["n_scored"] <= 2  # the proxy puts the winner at or next to the top
    assert fast["source"] == full["source"]
    assert fast["quality"]["bypass"] == pytest.approx(full["quality"]["bypass"], abs=1e-5)


def test_attribution_proxy_ranks_like_the_true_bypass(refusing, refusing_lm, tmp_path):
    _, data = refusing
    run_probe(refusing_lm, cfg(data, exhaustive=True), tmp_path / "full")
    recs = read_jsonl(tmp_path / "full" / "probe.jsonl")
    # exhaustive mode does not rank; compute the proxy for the same candidates and compare ranks
    lm = refusing_lm
    summary, _, cands = load_probe(tmp_path / "full")
    cands = [c for c in cands if c["bypass"] is not None]  # layer 0: the same template tokens on both sides
    from aird.core.artifacts import load_tensors

    dirs = load_tensors(tmp_path / "full" / "directions.safetensors")["directions"]
    pidx = {p: i for i, p in enumerate(summary["positions"])}
    units = torch.stack([dirs[c["layer"], pidx[c["position"]]] for c in cands])
    units = units / units.norm(dim=-1, keepdim=True)
    harmful = [lm.adapter.format(lm.tokenizer, t) for t in tiny.instructions(tiny.HARMFUL_ACTS)[:16]]
    proxy = candidates.attribution_bypass(lm, make_batches(lm, harmful, 8), units, lm.adapter.refusal_token_ids(lm.tokenizer))
    true = torch.tensor([c["bypass"] for c in cands])
    rank = lambda v: v.argsort().argsort().float()  # noqa: E731
    corr = torch.corrcoef(torch.stack([rank(proxy), rank(true)]))[0, 1]
    assert corr > 0.5, corr
    assert len(recs) > 3


def test_records_carry_metadata_and_artifacts_exist(refusing, refusing_lm, tmp_path):
    _, data = refusing
    run_probe(refusing_lm, cfg(data), tmp_path / "p")
    recs = read_jsonl(tmp_path / "p" / "probe.jsonl")
    kinds = [r["record"] for r in recs]
    assert kinds[0] == "probe.directions" and kinds[-1] == "probe.summary" and "probe.candidate" in kinds
    for r in recs:
        assert r["schema"] == SCHEMA_VERSION and r["seed"] == 42 and r["config"]["n_train"] == 48
        assert "torch" in r["versions"] and r["model"] == refusing_lm.spec
    summary = recs[-1]
    assert {"activations", "baseline", "ranking", "scoring", "total"} <= set(summary["timings"])
    assert (tmp_path / "p" / "directions.safetensors").is_file() and (tmp_path / "p" / "probe.png").is_file()
    assert not list((tmp_path / "p").glob("*.tmp"))


def test_rerun_resumes_and_scores_only_what_is_missing(refusing, refusing_lm, tmp_path, monkeypatch):
    _, data = refusing
    out = tmp_path / "p"
    first = run_probe(refusing_lm, cfg(data, exhaustive=True), out)
    assert run_probe(refusing_lm, cfg(data, exhaustive=True), out).resumed
    # simulate a run killed after three candidates: drop the summary and the later candidates
    recs = read_jsonl(out / "probe.jsonl")
    keep, n_cand = [], 0
    for r in recs:
        if r["record"] == "probe.candidate":
            n_cand += 1
            if n_cand > 3:
                continue
        if r["record"] != "probe.summary":
            keep.append(r)
    (out / "probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    calls = []
    real = candidates.score_candidate
    monkeypatch.setattr("aird.core.probe.score_candidate", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = run_probe(refusing_lm, cfg(data, exhaustive=True, batch_size=8), out)  # batch size may change
    assert len(calls) == first.summary["n_candidates"] - 3
    assert again.summary["source"] == first.summary["source"]


def test_rerun_with_other_config_needs_force(refusing, refusing_lm, tmp_path):
    _, data = refusing
    out = tmp_path / "p"
    run_probe(refusing_lm, cfg(data), out)
    with pytest.raises(ArtifactError, match=r"different configuration \(.*seed\)"):
        run_probe(refusing_lm, cfg(data, seed=7), out)
    res = run_probe(refusing_lm, cfg(data, seed=7), out, force=True)
    assert not res.resumed and res.summary["seed"] == 7


def test_no_passing_candidate_relaxes_and_flags(refusing, refusing_lm, tmp_path):
    _, data = refusing
    res = run_probe(refusing_lm, cfg(data, kl_threshold=0.0), tmp_path / "p")
    assert res.summary["filters_relaxed"] is True
    assert res.summary["source"]["layer"] < int(0.8 * res.summary["n_layers"])
