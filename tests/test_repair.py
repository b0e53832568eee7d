"""AIRD repair and diff on tiny models."""

import json

import pytest
import torch
from safetensors.torch import load_file

from aird.core.compress import CompressConfig, run_compress
from aird.core.diff import run_diff
from aird.core.errors import AirdError, ArtifactError
from aird.core.loading import load_model
from aird.core.measure import decoder_linear_weights
from aird.core.probe import ProbeConfig, run_probe
from aird.core.repair import RepairConfig, run_repair
from aird.plugins.repairs import RankOne, SparseRankOne


def _unit(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(d, generator=g, dtype=torch.float64)
    return (r / r.norm()).float()


def test_rank_one_edit_changes_only_the_projection_on_r():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 24, generator=g)
    r = _unit(16)
    new = RankOne().edit(w, r, 0.7)
    P = torch.eye(16) - torch.outer(r, r)
    assert torch.allclose(P @ new, P @ w, atol=1e-5)               # orthogonal complement untouched
    assert torch.allclose(r @ new, 1.7 * (r @ w), atol=1e-5)        # projection scaled by 1 + α
    sv = torch.linalg.svdvals((new - w).double())
    assert sv[1] < 1e-5 * sv[0]                                       # a rank-one update (up to float32 rounding)


def test_sparse_edit_keeps_the_mask_and_hits_the_target():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 24, generator=g)
    w[torch.rand(16, 24, generator=g) < 0.5] = 0
    r = _unit(16, 3)
    alpha = 1.3
    new = SparseRankOne().edit(w, r, alpha)
    assert torch.equal(new == 0, w == 0) or bool(((new == 0) >= (w == 0)).all())
    assert bool((new[w == 0] == 0).all())
    assert torch.allclose((r.double() @ new.double()), (1 + alpha) * (r.double() @ w.double()), atol=1e-5)
    # least norm: the update of column j is parallel to r̂ restricted to that column's non-zeros
    delta = (new - w).double()
    j = 5
    s = w[:, j] != 0
    rs = r.double() * s
    assert torch.allclose(delta[:, j], rs * (delta[:, j] @ rs) / (rs @ rs), atol=1e-6)


@pytest.fixture(scope="module")
def study(refusing, tmp_path_factory):
    """Original probe, a 50%-magnitude-pruned model, and its probe (tiny refusing model)."""
    model_dir, data = refusing
    root = tmp_path_factory.mktemp("study")
    cfg = dict(n_train=48, n_val=16, batch_size=16, data_dir=str(data), top_k=2, max_scored=6)
    orig = load_model(str(model_dir), device="cpu")
    run_probe(orig, ProbeConfig(**cfg), root / "probe-orig")
    pruned = run_compress(orig, CompressConfig(method="magnitude", params={"sparsity": 0.5}, data_dir=str(data)),
                          root / "pruned").out
    lm = load_model(str(pruned), device="cpu")
    run_probe(lm, ProbeConfig(**cfg), root / "probe-pruned")
    return root, data


def test_diff_of_a_probe_with_itself(study, tmp_path):
    root, _ = study
    s = run_diff(root / "probe-orig", root / "probe-orig", tmp_path / "d")
    assert s["cosine_chosen"] == pytest.approx(1.0, abs=1e-6)
    assert all(v is None or v == pytest.approx(1.0, abs=1e-5) for row in s["cosine_matrix"] for v in row)
    assert s["source"]["moved"] is False and s["source"]["layer_shift"] == 0
    assert (tmp_path / "d" / "diff.png").is_file()


def test_diff_original_vs_pruned(study, tmp_path):
    root, _ = study
    lm = load_model(str(root / "pruned"), device="cpu")
    s = run_diff(root / "probe-orig", root / "probe-pruned", tmp_path / "d", lm=lm)
    assert -1 <= s["cosine_chosen"] < 0.9999
    assert len(s["cosine_by_layer"]) == s["n_layers"]
    oic = s["quality"]["original_in_compressed"]
    assert set(oic) == {"bypass", "induce", "kl", "layer"}
    recs = [json.loads(line) for line in (tmp_path / "d" / "diff.jsonl").read_text().splitlines()]
    assert recs[0]["record"] == "diff.summary" and recs[0]["schema"] == 1


def test_diff_refuses_incomparable_probes(study, refusing, tmp_path):
    root, data = study
    lm = load_model(str(refusing[0]), device="cpu")
    run_probe(lm, ProbeConfig(n_train=40, n_val=16, data_dir=str(data), top_k=1, max_scored=3), tmp_path / "other")
    with pytest.raises(ArtifactError, match="different settings \\(n_train\\)"):
        run_diff(root / "probe-orig", tmp_path / "other", tmp_path / "d")


@pytest.mark.parametrize("method", ["aird", "aird-sparse"])
def test_repair_restores_refusal_and_records_sparsity(study, tmp_path, method):
    root, data = study
    lm = load_model(str(root / "pruned"), device="cpu")
    cfg = RepairConfig(method=method, data_dir=str(data), compressed_probe=str(root / "probe-pruned"), judge="score")
    s = run_repair(lm, root / "probe-orig", cfg, tmp_path / "rep")
    v = s["validation"]
    assert v["repaired"]["harmful_refusal_rate"] >= v["compressed"]["harmful_refusal_rate"]
    assert v["repaired"]["harmful_refusal_score"] > v["compressed"]["harmful_refusal_score"]
    assert s["alpha"] in [t["alpha"] for t in v["trials"]]
    before = decoder_linear_weights(load_file(str(root / "pruned" / "model.safetensors")))
    after = decoder_linear_weights(load_file(str(tmp_path / "rep" / "model.safetensors")))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(f"layers.{s['layer']}." in k for k in changed)
    if method == "aird-sparse":
        assert all(torch.equal(before[k] == 0, after[k] == 0) for k in before)   # every matrix keeps its mask
        assert s["sparsity"]["after"] == s["sparsity"]["before"]
        assert s["layer_sparsity"]["after"] == s["layer_sparsity"]["before"]
    else:
        assert s["layer_sparsity"]["after"] < s["layer_sparsity"]["before"]
    reloaded = load_model(str(tmp_path / "rep"), device="cpu")
    assert reloaded.n_layers == lm.n_layers


def test_repair_fixed_choices_and_bad_input(study, tmp_path):
    root, data = study
    lm = load_model(str(root / "pruned"), device="cpu")
    s = run_repair(lm, root / "probe-orig", RepairConfig(method="aird", layer=1, matrix="mlp", alpha=2.0, data_dir=str(data), judge="score"),
                   tmp_path / "fixed")
    assert (s["layer"], s["matrix"], s["alpha"]) == (1, "mlp", 2.0)
    assert len(s["validation"]["trials"]) == 1
    with pytest.raises(AirdError, match="--matrix must be attn, mlp or both"):
        run_repair(lm, root / "probe-orig", RepairConfig(matrix="qkv", data_dir=str(data)), tmp_path / "x")
    with pytest.raises(AirdError, match="--layer must be in"):
        run_repair(lm, root / "probe-orig", RepairConfig(layer=99, data_dir=str(data)), tmp_path / "x")
    with pytest.raises(AirdError, match="--judge must be"):
        run_repair(lm, root / "probe-orig", RepairConfig(judge="vibes", data_dir=str(data)), tmp_path / "x")
    with pytest.raises(AirdError, match="--alpha must be a number or auto"):
        run_repair(lm, root / "probe-orig", RepairConfig(alpha="lots", data_dir=str(data)), tmp_path / "x")


def test_alpha_choice_never_takes_an_over_refusing_edit(study, tmp_path, monkeypatch):
    """When every α breaks the over-refusal guard, the mildest edit is taken and the target is flagged."""
    from aird.core import repair as rmod

    root, data = study
    lm = load_model(str(root / "pruned"), device="cpu")
    real = rmod._Evaluator.rates

    def rates(self, layer):
        r = real(self, layer)
        if rates.calls:   # every edit refuses every harmless prompt (pooled and in its one set)
            r["harmless_refusal_rate"] = r["harmless_by_set"]["harmless"]["harmless_refusal_rate"] = 1.0
        rates.calls += 1
        return r

    rates.calls = 0
    monkeypatch.setattr(rmod._Evaluator, "rates", rates)
    s = run_repair(lm, root / "probe-orig", RepairConfig(method="aird", data_dir=str(data), judge="score"), tmp_path / "g")
    assert s["validation"]["target_reached"] is False
    assert s["alpha"] == min(rmod.ALPHA_GRID)


def test_rank_writers_measures_each_matrix_projection(study):
    from aird.core.probe import format_prompts
    from aird.core.repair import rank_writers

    root, data = study
    lm = load_model(str(root / "pruned"), device="cpu")
    harmful = format_prompts(lm, [p for p in _prompts(data, "harmful_val")][:6], None)
    harmless = format_prompts(lm, [p for p in _prompts(data, "harmless_val")][:6], None)
    unit = _unit(lm.model.config.hidden_size, 3)
    rows = rank_writers(lm, harmful, harmless, unit, ["attn", "mlp"], batch_size=4)
    assert len(rows) == 2 * lm.n_layers and [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    # one entry by hand: the mean projection of layer 1's down_proj output at the post-instruction positions
    k = len(lm.adapter.post_instruction_positions(lm.tokenizer))
    got = {}
    mod = lm.adapter.out_proj(lm.adapter.layers(lm.model)[1], "mlp")
    h = mod.register_forward_hook(lambda m, a, o: got.setdefault("o", []).append(o[:, -k:, :] @ unit) and None)
    from aird.core.forward import make_batches, run_model
    with torch.inference_mode():
        for b in make_batches(lm, harmful, 16):
            run_model(lm, b)
    h.remove()
    expect = torch.cat(got["o"]).mean().item()
    row = next(r for r in rows if (r["layer"], r["matrix"]) == (1, "mlp"))
    assert row["harmful_projection"] == pytest.approx(expect, abs=1e-4)
    assert -1 <= row["selectivity"] <= 1


def _prompts(data, name):
    from aird.core.data import load_set

    return load_set(name, str(data))


def test_repair_with_the_generate_judge_and_auto_layer(study, tmp_path, register_plugin):
    from conftest import FirstWordPlugin

    from aird.core import repair as rmod

    register_plugin(FirstWordPlugin())
    root, data = study
    lm = load_model(str(root / "pruned"), device="cpu")
    cfg = RepairConfig(method="aird-sparse", layer="auto", matrix="both", judge="generate", max_new_tokens=3,
                       candidates=2, data_dir=str(data), compressed_probe=str(root / "probe-pruned"),
                       scorer="first-word")
    s = run_repair(lm, root / "probe-orig", cfg, tmp_path / "gen")
    v = s["validation"]
    assert v["judge"] == "generate" and 0 < v["original"]["harmful_refusal_rate"] <= 1
    assert v["original"]["harmless_refusal_rate"] < v["original"]["harmful_refusal_rate"]
    assert s["layer_ranking"] == "selective" and s["config"]["layer_ranking"] == "selective"   # an amplifying edit's auto
    ranked = [(r["layer"], r["matrix"]) for r in s["ranking"]]
    tried = []
    for t in v["trials"]:
        if (t["layer"], t["matrix"]) not in tried:
            tried.append((t["layer"], t["matrix"]))
    assert tried == ranked[: len(tried)] and 1 <= len(tried) <= 2 and s["matrix"] in ("attn", "mlp")
    grid = list(rmod.GEN_ALPHA_GRID)
    for cand in tried:   # ascending α, stopping at the first that reaches the target or breaks the guard
        ts = [t for t in v["trials"] if (t["layer"], t["matrix"]) == cand]
        on_grid = [t for t in ts if t["alpha"] in grid]
        assert [t["alpha"] for t in on_grid] == grid[: len(on_grid)]
        assert not any(t["reaches_target"] or not t["within_guard"] for t in on_grid[:-1])
        refined = ts[len(on_grid):]   # bisections between the last two grid values, after them
        assert len(refined) == (cfg.refine if len(on_grid) > 1 else 0)
        assert all(on_grid[-2]["alpha"] < t["alpha"] < on_grid[-1]["alpha"] for t in refined)
    # the pruned tiny model loses refusal and the edit brings it back (the other outcome: the test above)
    assert v["target_reached"], v
    assert v["repaired"]["harmful_refusal_rate"] >= v["original"]["harmful_refusal_rate"]
    assert v["repaired"]["harmless_refusal_rate"] <= v["harmless_guard"]["harmless"] + 1e-9


def test_alpha_search_bisects_to_the_smallest_alpha_that_reaches_the_target():
    from aird.core.repair import search_alpha

    def trial(needed, guard_breaks=float("inf")):
        def run(alpha):
            return {"alpha": alpha, "reaches_target": alpha >= needed, "within_guard": alpha < guard_breaks}
        return run

    t = search_alpha(trial(11.0), [2.0, 4.0, 8.0, 16.0, 32.0], early_stop=True, refine=3)
    assert [x["alpha"] for x in t[:4]] == [2.0, 4.0, 8.0, 16.0]          # the grid stops at 16
    mids = [x["alpha"] for x in t[4:]]
    assert mids == pytest.approx([11.314, 9.514, 10.375], abs=1e-3)      # √(8·16), √(8·11.31), √(9.51·11.31)
    assert min(x["alpha"] for x in t if x["reaches_target"]) == pytest.approx(11.314, abs=1e-3)
    # the guard breaks before the target is reached: bisect towards the largest α the guard allows
    t = search_alpha(trial(100.0, guard_breaks=5.0), [2.0, 4.0, 8.0], early_stop=True, refine=2)
    assert [x["alpha"] for x in t] == pytest.approx([2.0, 4.0, 8.0, 5.657, 4.757], abs=1e-3)
    # no early stop (the score judge): the whole grid, nothing refined; the first α stopping: nothing to bisect
    assert len(search_alpha(trial(3.0), [2.0, 4.0, 8.0], early_stop=False, refine=2)) == 3
    assert len(search_alpha(trial(1.0), [2.0, 4.0, 8.0], early_stop=True, refine=2)) == 1


def test_choose_trial_prefers_the_edit_that_over_refuses_least():
    from aird.core.repair import choose_trial

    def t(layer, alpha, harmful, harmless, ok=True, guard=True):
        return {"layer": layer, "matrix": "attn", "alpha": alpha, "harmful_refusal_rate": harmful,
                "harmless_refusal_rate": harmless, "reaches_target": ok, "within_guard": guard}

    # SparseGPT-50 on the default model: layer 10 needs α 8 and refuses 1 of 32 harmless prompts, layer 12
    # reaches the target at α 2 but refuses 2: the smaller α is not the better edit
    trials = [t(10, 4.0, 0.50, 0.031, ok=False), t(10, 8.0, 0.53, 0.031), t(10, 16.0, 0.60, 0.031),
              t(12, 2.0, 0.53, 0.062)]
    best, ok = choose_trial(trials)
    assert ok and (best["layer"], best["alpha"]) == (10, 8.0)    # the smallest α of layer 10, not α 16
    best, ok = choose_trial([t(10, 2.0, 0.3, 0.0, ok=False), t(10, 4.0, 0.4, 0.1, ok=False),
                             t(10, 8.0, 0.6, 0.5, guard=False)])
    assert not ok and best["alpha"] == 4.0                        # the most refusal within the guard
    best, ok = choose_trial([t(10, 2.0, 0.9, 0.5, guard=False), t(10, 4.0, 1.0, 0.9, guard=False)])
    assert not ok and best["alpha"] == 2.0                        # every edit over-refuses: the mildest


def test_ridge_fit_recovers_a_planted_update():
    from aird.core.repair import fit_rank_one

    g = torch.Generator().manual_seed(5)
    x = torch.randn(600, 20, generator=g)
    u = torch.randn(20, generator=g)
    t = x @ u + 0.01 * torch.randn(600, generator=g)
    groups = torch.arange(600) // 6                     # six rows per "prompt"
    fit = fit_rank_one(x, t, groups)
    assert torch.allclose(fit["u"], u, atol=0.02)
    assert fit["cv_r2"] > 0.99 and fit["train_r2"] > 0.99 and fit["ridge"] in (1e-3, 1e-2)
    assert fit["rows"] == 600 and fit["dim"] == 20
    heavy = fit_rank_one(x, t, groups, ridge=1e3)         # a huge ridge shrinks u towards zero
    assert heavy["u"].norm() < 0.05 * u.norm() and heavy["cv_r2"] is None


def test_ridge_edits_change_the_projection_by_alpha_u():
    from aird.plugins.repairs import RidgeRankOne, SparseRidgeRankOne

    g = torch.Generator().manual_seed(6)
    w = torch.randn(16, 24, generator=g)
    w[torch.rand(16, 24, generator=g) < 0.5] = 0
    r, u = _unit(16, 7), torch.randn(24, generator=g)
    for plugin in (RidgeRankOne(), SparseRidgeRankOne()):
        new = plugin.edit(w, r, 1.5, fit=u)
        assert torch.allclose(r.double() @ (new - w).double(), 1.5 * u.double(), atol=1e-4), plugin.name
    sparse = SparseRidgeRankOne().edit(w, r, 1.5, fit=u)
    assert bool((sparse[w == 0] == 0).all())
    dense = RidgeRankOne().edit(w, r, 1.5, fit=u)
    assert torch.linalg.matrix_rank((dense - w).double(), atol=1e-4) == 1


def test_ridge_fit_of_k_targets_is_k_column_fits():
    """A [N, k] target is k ridge regressions with one λ: column j of u is the fit of target column j alone."""
    from aird.core.repair import fit_rank_one

    g = torch.Generator().manual_seed(8)
    x = torch.randn(300, 12, generator=g)
    t = x @ torch.randn(12, 3, generator=g) + 0.1 * torch.randn(300, 3, generator=g)
    groups = torch.arange(300) // 5
    both = fit_rank_one(x, t, groups, ridge=0.01)
    assert both["u"].shape == (12, 3)
    for j in range(3):
        assert torch.allclose(both["u"][:, j], fit_rank_one(x, t[:, j], groups, ridge=0.01)["u"], atol=1e-5)
    assert fit_rank_one(x, t, groups)["ridge"] in (1e-3, 1e-2)   # cross-validated over all columns at once


def test_subspace_edit_changes_k_projections_by_alpha_U():
    """W + α V U changes the projections on the basis V by α U, with a rank-k update, and nothing outside V."""
    from aird.plugins.repairs import RidgeSubspace

    g = torch.Generator().manual_seed(9)
    w = torch.randn(16, 24, generator=g)
    V = torch.linalg.qr(torch.randn(16, 3, generator=g, dtype=torch.float64))[0].float()
    U = torch.randn(3, 24, generator=g)
    new = RidgeSubspace().edit(w, V, 1.5, fit=U)
    assert torch.allclose(V.double().T @ (new - w).double(), 1.5 * U.double(), atol=1e-4)
    P = torch.eye(16, dtype=torch.float64) - V.double() @ V.double().T
    assert torch.allclose(P @ (new - w).double(), torch.zeros(16, 24, dtype=torch.float64), atol=1e-5)
    assert torch.linalg.matrix_rank((new - w).double(), atol=1e-4) == 3


def _calibration(study):
    """The original probe's unit direction, the original model's path, and its calibration prompts (harmful and
    harmless training splits) formatted for the tiny model."""
    from aird.core.probe import config_from_record, format_prompts, load_prompt_sets, load_probe

    root, data = study
    summary, direction, _ = load_probe(root / "probe-orig")
    pcfg = config_from_record(summary["config"])
    pcfg.data_dir = str(data)
    sets = load_prompt_sets(pcfg)
    lm = load_model(str(root / "pruned"), device="cpu")
    texts = format_prompts(lm, sets.harmful_train + sets.harmless_train, None)
    return direction / direction.norm(), summary["config"]["model_path"], texts


def test_ridge_repair_moves_projections_towards_the_original(study, tmp_path):
    """α = 1 of the fitted update brings the compressed model's projections on r̂ after the edited block closer to
    the original model's, on the calibration prompts."""
    from aird.core.repair import writer_rows

    root, data = study
    unit, orig_path, texts = _calibration(study)
    orig = load_model(orig_path, device="cpu")
    _, p_o, _ = writer_rows(orig, texts, 1, [], unit, 16)
    lm = load_model(str(root / "pruned"), device="cpu")
    _, p_c, _ = writer_rows(lm, texts, 1, [], unit, 16)
    s = run_repair(lm, root / "probe-orig", RepairConfig(method="aird-ridge", layer=1, matrix="both", alpha=1.0,
                                                         judge="score", check_on=[], data_dir=str(data),
                                                         fit_positions="all"),
                   tmp_path / "ridge")
    assert s["fit"]["rows"] == len(p_o) and s["fit"]["cv_r2"] is not None and s["check"] is None
    rep = load_model(str(tmp_path / "ridge"), device="cpu")
    _, p_r, _ = writer_rows(rep, texts, 1, [], unit, 16)
    before, after = ((p_c - p_o) ** 2).mean(), ((p_r - p_o) ** 2).mean()
    assert after < 0.7 * before, (before, after)


def test_subspace_repair_puts_back_the_residual_where_compression_changed_it(study, tmp_path, monkeypatch):
    """α = 1 of the rank-k fit brings the compressed model's whole residual after the edited block closer to the
    original's (not only its projection on r̂), and records the subspace it fitted."""
    from aird.core.repair import writer_rows
    from aird.plugins.repairs import RidgeSubspace

    monkeypatch.setattr(RidgeSubspace, "rank", 8)      # the tiny model's residual has 64 dimensions: fit fewer
    method = "aird-subspace"
    root, data = study
    unit, orig_path, texts = _calibration(study)
    eye = torch.eye(unit.numel())
    _, h_o, _ = writer_rows(load_model(orig_path, device="cpu"), texts, 1, [], eye, 16)
    lm = load_model(str(root / "pruned"), device="cpu")
    _, h_c, _ = writer_rows(lm, texts, 1, [], eye, 16)
    s = run_repair(lm, root / "probe-orig", RepairConfig(method=method, layer=1, matrix="both", alpha=1.0,
                                                         judge="score", check_on=[], data_dir=str(data),
                                                         fit_positions="all"), tmp_path / "sub")
    f = s["fit"]
    assert f["rank"] == 8 and 0 < f["energy"] <= 1 and 0 <= f["refusal_direction_in_subspace"] <= 1 + 1e-6
    assert f["rows"] == len(h_o) and f["cv_r2"] is not None
    _, h_r, _ = writer_rows(load_model(str(tmp_path / "sub"), device="cpu"), texts, 1, [], eye, 16)
    before, after = ((h_c - h_o) ** 2).sum(), ((h_r - h_o) ** 2).sum()
    assert after < 0.7 * before, (before, after)


def test_ridge_fit_on_post_instruction_tokens_reads_only_those_rows(study, tmp_path):
    """--fit-positions post fits each calibration prompt's post-instruction tokens only: the rows are exactly the
    last k of each prompt's rows (k = the template's post-instruction tokens), and the repair records that many."""
    from aird.core.repair import writer_rows

    root, data = study
    unit, _, texts = _calibration(study)
    lm = load_model(str(root / "pruned"), device="cpu")
    k = len(lm.adapter.post_instruction_positions(lm.tokenizer))
    x_all, p_all, g_all = writer_rows(lm, texts, 1, ["attn"], unit, 5)
    x_post, p_post, g_post = writer_rows(lm, texts, 1, ["attn"], unit, 5, last=k)
    assert len(p_post) == k * len(texts) and len(p_all) > len(p_post)
    for i in range(len(texts)):    # the same values as the last k rows of that prompt among all its rows
        mine, post = g_all == i, g_post == i
        assert torch.allclose(p_all[mine][-k:], p_post[post], atol=1e-5)
        assert torch.allclose(x_all[mine][-k:], x_post[post], atol=1e-5)
    s = run_repair(lm, root / "probe-orig", RepairConfig(method="aird-ridge", layer=1, matrix="attn", alpha=1.0,
                                                         judge="score", check_on=[], data_dir=str(data),
                                                         fit_positions="post"), tmp_path / "ridge-post")
    assert s["fit"]["rows"] == k * len(texts) and s["config"]["fit_positions"] == "post"


def test_repair_check_on_prompts_the_tuning_never_saw(study, tmp_path):
    root, data = study
    lm = load_model(str(root / "pruned"), device="cpu")
    cfg = RepairConfig(method="aird", layer=1, matrix="attn", alpha=2.0, judge="score", data_dir=str(data), max_new_tokens=3,
                       check_on=["jailbreakbench", "xstest_safe"], check_limit=6)
    s = run_repair(lm, root / "probe-orig", cfg, tmp_path / "chk")
    c = s["check"]["sets"]
    assert set(c) == {"jailbreakbench", "xstest_safe"} and c["jailbreakbench"]["role"] == "harmful"
    assert set(s["tuned_on"]["sets"]) == {"harmful_train", "harmful_val", "harmless_train", "harmless_val"}
    rows = [json.loads(x) for x in (tmp_path / "chk" / "repair.jsonl").read_text().splitlines()]
    checks = [r for r in rows if r["record"] == "repair.check"]
    assert len(checks) == 12 and all(r["held_out"] for r in checks)    # the tiny splits share no source with them
    for name in c:
        mine = [r for r in checks if r["set"] == name]
        d = c[name]["held_out"]
        harmful = c[name]["role"] == "harmful"
        rate = lambda m: sum(r[f"{m}_refused"] != harmful for r in mine) / len(mine)  # noqa: E731
        assert d["n"] == 6 and d["repaired"] == rate("repaired") and d["compressed"] == rate("compressed")
        assert d["original"] == rate("original")
        newly = sum(r["repaired_refused"] and not r["compressed_refused"] for r in mine)
        assert d["vs_compressed"]["newly_refused"] == newly
    with pytest.raises(AirdError, match="--check-on takes"):
        run_repair(lm, root / "probe-orig", RepairConfig(check_on=["hellaswag"], judge="score", data_dir=str(data)),
                   tmp_path / "bad")


def test_tuning_sets_by_role_and_their_errors():
    from aird.core.repair import _tuning_prompts

    cfg = RepairConfig(tune_on=["jailbreakbench", "xstest_safe"], tune_limit=10)
    harmful, benign = _tuning_prompts(cfg, None, 42)
    assert len(harmful) == len(benign) == 10
    assert len({p.category for p in harmful}) == 10       # stratified over JailbreakBench's ten categories
    assert all(p.source == "xstest_safe" for p in benign)
    with pytest.raises(AirdError, match="--tune-on takes harmful or benign prompt sets"):
        _tuning_prompts(RepairConfig(tune_on=["wikitext2"]), None, 42)
    with pytest.raises(AirdError, match="at least one harmful and one benign"):
        _tuning_prompts(RepairConfig(tune_on=["advbench"]), None, 42)


def _side(harmful_rate, harmful_score, by_set):
    """A rates record as the judges return it: pooled harmless values (the mean of the sets', equal n) and per set."""
    return {"harmful_refusal_rate": harmful_rate, "harmful_refusal_score": harmful_score,
            "harmless_refusal_rate": sum(r for r, _ in by_set.values()) / len(by_set),
            "harmless_refusal_score": sum(s for _, s in by_set.values()) / len(by_set),
            "harmless_by_set": {g: {"harmless_refusal_rate": r, "harmless_refusal_score": s, "n": 24}
                                for g, (r, s) in by_set.items()}}


def test_guard_ceiling_on_rate_or_score_per_benign_set():
    """The rate guard adds `guard` to each benign set's anchor rate; the score guard adds `guard` times the
    original's pooled harmful − harmless score gap to each set's anchor score; both anchor on the larger value
    unless told original."""
    from aird.core.repair import guard_ceiling

    orig = _side(0.7, 2.0, {"alpaca": (0.05, -5.0), "xstest_safe": (0.30, -3.0)})      # pooled harmless −4.0
    comp = _side(0.4, 0.5, {"alpaca": (0.10, -5.5), "xstest_safe": (0.25, -2.5)})
    key, ceil = guard_ceiling(RepairConfig(), orig, comp)
    assert key == "harmless_refusal_rate" and ceil == {"alpaca": pytest.approx(0.12), "xstest_safe": pytest.approx(0.32)}
    assert guard_ceiling(RepairConfig(guard_from="original"), orig, comp)[1]["alpaca"] == pytest.approx(0.07)
    # score: the gap is 2.0 − (−4.0) = 6, so 0.05 × 6 = 0.3 over each set's larger anchor
    key, ceil = guard_ceiling(RepairConfig(guard_on="score", guard=0.05), orig, comp)
    assert key == "harmless_refusal_score"
    assert ceil == {"alpaca": pytest.approx(-4.7), "xstest_safe": pytest.approx(-2.2)}
    assert guard_ceiling(RepairConfig(guard_on="score", guard=0.05, guard_from="original"), orig, comp)[1] == \
        {"alpaca": pytest.approx(-4.7), "xstest_safe": pytest.approx(-2.7)}
    orig["harmful_refusal_score"] = -5.0            # no gap to scale by: one clear sentence
    with pytest.raises(AirdError, match="--guard-on rate"):
        guard_ceiling(RepairConfig(guard_on="score"), orig, comp)
    with pytest.raises(AirdError, match="--guard-on must be rate or score"):
        RepairConfig(guard_on="kl").validate()


@pytest.mark.parametrize("guard_from,guard_on", [("larger", "rate"), ("original", "rate"), ("larger", "score")])
def test_guard_is_anchored_on_the_original_or_the_larger_rate(study, tmp_path, monkeypatch, guard_from, guard_on):
    """The compressed model over-refuses more than the original: the default guard allows its rate plus 2 points,
    guard_from="original" only the original's plus 2 points, and every trial is checked against that ceiling."""
    from aird.core import repair as rmod

    root, data = study
    lm = load_model(str(root / "pruned"), device="cpu")
    real = rmod._Evaluator.rates

    def rates(self, layer):     # the compressed model (the first call) over-refuses: 0.5 of harmless prompts
        r = real(self, layer)
        if not rates.calls:
            r["harmless_refusal_rate"] = r["harmless_by_set"]["harmless"]["harmless_refusal_rate"] = 0.5
        rates.calls += 1
        return r

    rates.calls = 0
    monkeypatch.setattr(rmod._Evaluator, "rates", rates)
    s = run_repair(lm, root / "probe-orig", RepairConfig(data_dir=str(data), judge="score", guard_from=guard_from,
                                                         guard_on=guard_on), tmp_path / "g")
    v = s["validation"]
    if guard_on == "score":     # the mean harmless score of every trial against the original's plus 2% of its gap
        o, c = v["original"], v["compressed"]
        ceiling = max(o["harmless_refusal_score"], c["harmless_refusal_score"]) + \
            0.02 * (o["harmful_refusal_score"] - o["harmless_refusal_score"])
        assert v["guard_on"] == "harmless_refusal_score" and v["harmless_guard"] == {"harmless": pytest.approx(ceiling)}
        assert all(t["within_guard"] == (t["harmless_refusal_score"] <= ceiling + 1e-9) for t in v["trials"])
        return
    orig = v["original"]["harmless_refusal_rate"]
    assert orig < 0.5
    expected = (orig if guard_from == "original" else 0.5) + 0.02
    assert v["harmless_guard"] == {"harmless": pytest.approx(expected)}
    assert all(t["within_guard"] == (t["harmless_refusal_rate"] <= expected + 1e-9) for t in v["trials"])
    with pytest.raises(AirdError, match="--guard-from"):
        RepairConfig(guard_from="compressed").validate()
    with pytest.raises(AirdError, match="--fit-positions must be all or post"):
        RepairConfig(fit_positions="last").validate()


def test_guard_holds_on_every_benign_tuning_set(study, tmp_path):
    """Tuning on two benign sets, the score judge measures the original model on the tuning prompts themselves
    (not the probe's baseline), every rate record carries each benign set's rate and score, and a trial is within
    the guard only when every set is under its own ceiling."""
    root, data = study
    lm = load_model(str(root / "pruned"), device="cpu")
    cfg = RepairConfig(data_dir=str(data), judge="score", guard_on="score", check_on=[],
                       tune_on=["jailbreakbench", "harmless_val", "xstest_safe"], tune_limit=8)
    v = run_repair(lm, root / "probe-orig", cfg, tmp_path / "sets")["validation"]
    assert v["n_harmful"] == 8 and v["n_harmless"] == 16
    for side in ("original", "compressed"):
        by = v[side]["harmless_by_set"]
        assert set(by) == {"harmless_val", "xstest_safe"} and all(b["n"] == 8 for b in by.values())
        assert v[side]["harmless_refusal_score"] == pytest.approx(sum(b["harmless_refusal_score"] for b in by.values()) / 2)
    assert set(v["harmless_guard"]) == {"harmless_val", "xstest_safe"}
    assert v["trials"] and all(
        t["within_guard"] == all(t["harmless_by_set"][g]["harmless_refusal_score"] <= c + 1e-9
                                 for g, c in v["harmless_guard"].items()) for t in v["trials"])


# ---- repairs that stay on the quantization grid ------------------------------------------------------------

def test_snapped_edit_stays_on_the_grid_and_tracks_the_dense_projection():
    """Random int4 codes with per-group scales: the snapped edit is on the same grid, and its change of each
    column's projection on r̂ is far closer to the dense edit's than plain rounding's."""
    from aird.core.qgrid import Grid, on_grid, snap_edit

    g = torch.Generator().manual_seed(0)
    grid = Grid(torch.rand(64, 4, generator=g) * 0.01 + 0.001, 4)
    q = torch.randint(-8, 8, (64, 128), generator=g).double()
    w = (q * grid.full_scale(q.shape)).float()
    r = _unit(64, 5)
    dense = RankOne().edit(w, r, 2.0)
    snapped, rep = snap_edit(w, dense, r, grid)
    assert on_grid(w, grid) and on_grid(snapped, grid) and not on_grid(dense, grid)
    assert rep["codes_changed"] > 0 and rep["projection_error"] < 0.1 * rep["rounding_projection_error"]
    codes = snapped.double() / grid.full_scale(w.shape)
    assert float(codes.min()) >= -8 - 1e-4 and float(codes.max()) <= 7 + 1e-4     # float32 weights: to 1e-4 of a step


def test_quantized_folders_keep_their_grid_and_the_grid_repair_stays_on_it(study, tmp_path):
    pytest.importorskip("llmcompressor")
    from aird.core.qgrid import QUANT_GRID, on_grid, read_grid

    root, data = study
    orig = load_model(json.loads((root / "probe-orig" / "probe.jsonl").read_text().splitlines()[-1])["config"]
                      ["model_path"], device="cpu")
    q = run_compress(orig, CompressConfig(method="rtn", params={"bits": 8}, data_dir=str(data)), tmp_path / "rtn")
    assert q.summary["info"]["grid"]["bits"] == 8 and (tmp_path / "rtn" / QUANT_GRID).is_file()
    grids = read_grid(tmp_path / "rtn")
    sd = load_file(str(tmp_path / "rtn" / "model.safetensors"))
    assert grids and all(on_grid(sd[f"{name}.weight"], g) for name, g in grids.items())
    lm = load_model(str(tmp_path / "rtn"), device="cpu")
    s = run_repair(lm, root / "probe-orig", RepairConfig(method="aird-grid", layer=1, matrix="both", alpha=4.0,
                                                         judge="score", check_on=[], data_dir=str(data)),
                   tmp_path / "rtn-grid")
    assert s["grid"]["on_grid"] and set(s["grid"]["matrices"]) == {"attn", "mlp"}
    assert all(m["codes_changed"] > 0 for m in s["grid"]["matrices"].values())
    after = load_file(str(tmp_path / "rtn-grid" / "model.safetensors"))
    assert (tmp_path / "rtn-grid" / QUANT_GRID).is_file()
    assert all(on_grid(after[f"{name}.weight"], g) for name, g in grids.items())   # every matrix, edited or not
    assert not torch.equal(after["model.layers.1.self_attn.o_proj.weight"], sd["model.layers.1.self_attn.o_proj.weight"])
    # a model without a grid is one clear error, before any search
    with pytest.raises(AirdError, match="no grid"):
        run_repair(load_model(str(root / "pruned"), device="cpu"), root / "probe-orig",
                   RepairConfig(method="aird-grid", layer=1, judge="score", check_on=[], data_dir=str(data)),
                   tmp_path / "pruned-grid")


def test_separations_and_gap_ranking_by_hand(study):
    """The separation after each block is the harmful prompts' mean projection on r̂ at the post-instruction
    tokens minus the harmless prompts' (as writer_rows reads it block by block), and the gap ranking orders the
    blocks by the deficit each added, which sum to the last block's deficit."""
    from aird.core.repair import rank_gaps, separations, writer_rows

    root, data = study
    unit, orig_path, texts = _calibration(study)
    half = len(texts) // 2
    harmful, harmless = texts[:half][:8], texts[half:][:8]
    lm = load_model(str(root / "pruned"), device="cpu")
    k = len(lm.adapter.post_instruction_positions(lm.tokenizer))
    top = lm.n_layers - 1
    seps = separations(lm, harmful, harmless, unit, 3, k, max_layer=top)
    assert len(seps) == top + 1
    for layer in range(top + 1):
        _, ph, _ = writer_rows(lm, harmful, layer, [], unit, 5, last=k)
        _, pb, _ = writer_rows(lm, harmless, layer, [], unit, 5, last=k)
        assert seps[layer] == pytest.approx(float(ph.mean() - pb.mean()), abs=1e-4)
    orig = load_model(orig_path, device="cpu")
    seps_o = separations(orig, harmful, harmless, unit, 3, k, max_layer=top)
    rows = rank_gaps(seps_o, seps)
    assert [r["added_deficit"] for r in rows] == sorted((r["added_deficit"] for r in rows), reverse=True)
    by_layer = sorted(rows, key=lambda r: r["layer"])
    assert sum(r["added_deficit"] for r in by_layer) == pytest.approx(by_layer[-1]["deficit"], abs=1e-5)
    assert by_layer[-1]["deficit"] == pytest.approx(seps_o[-1] - seps[-1], abs=1e-6)
    assert rank_gaps([1.0, 3.0, 4.0], [1.0, 1.5, 2.0])[0]["layer"] == 1      # 1.5 lost in block 1, 0.5 in block 2


@pytest.mark.parametrize("layer", ["gap", "auto"])
def test_repair_at_the_blocks_where_compression_lost_separation(study, tmp_path, layer):
    """--layer gap (and auto, for a fitting method) searches the blocks below the source that added the most
    deficit, records every block's separations, and edits one of them; a layer choice it does not know is refused
    before any model work."""
    root, data = study
    lm = load_model(str(root / "pruned"), device="cpu")
    s = run_repair(lm, root / "probe-orig", RepairConfig(method="aird-ridge", layer=layer, candidates=2, matrix="both",
                                                         alpha=1.0, judge="score", check_on=[], data_dir=str(data)),
                   tmp_path / "gap")
    assert s["layer_ranking"] == "gap" and s["config"].get("layer_ranking") == ("gap" if layer == "auto" else None)
    gaps = s["gaps"]
    assert [g["layer"] for g in gaps] == list(range(len(gaps))) and len(gaps) <= max(1, s["source_layer"])
    best = sorted(gaps, key=lambda g: -g["added_deficit"])[:2]
    assert s["layer"] in {g["layer"] for g in best} and s["matrix"] == "attn+mlp"
    assert {t["layer"] for t in s["validation"]["trials"]} == {g["layer"] for g in best}
    assert all(g["deficit"] == pytest.approx(g["original_separation"] - g["compressed_separation"]) for g in gaps)
    assert s["fit"] is not None
    with pytest.raises(AirdError, match="--layer must be"):
        run_repair(lm, root / "probe-orig", RepairConfig(method="aird-ridge", layer="best", judge="score",
                                                         check_on=[], data_dir=str(data)), tmp_path / "bad")


def test_fit_on_adds_named_prompts_to_the_fit(study, tmp_path, monkeypatch):
    """--fit-on: the named sets' prompts (stratified to fit_limit) join the probe's training prompts in the
    ridge fit and count as seen; an amplifying method refuses the option in one sentence."""
    from aird.core import repair as rmod

    root, data = study
    lm = load_model(str(root / "pruned"), device="cpu")
    seen_texts = []
    real = rmod._fit_candidates

    def fit(lm_, orig, texts, *a, **k):
        seen_texts.append(list(texts))
        return real(lm_, orig, texts, *a, **k)

    monkeypatch.setattr(rmod, "_fit_candidates", fit)
    base = dict(data_dir=str(data), judge="score", check_on=[], method="aird-ridge", layer=1, matrix="attn",
                alpha="1.0")
    run_repair(lm, root / "probe-orig", RepairConfig(**base), tmp_path / "plain")
    s = run_repair(lm, root / "probe-orig", RepairConfig(**base, fit_on=["xstest_safe"], fit_limit=6), tmp_path / "fit")
    plain, extra = seen_texts
    assert len(extra) == len(plain) + 6 and extra[: len(plain)] == plain
    assert s["tuned_on"]["fit_sets"] == ["xstest_safe"] and s["tuned_on"]["n_fit_extra"] == 6
    assert "xstest_safe" in s["tuned_on"]["sets"] and "xstest" in s["tuned_on"]["origins"]
    with pytest.raises(AirdError, match="--fit-on applies to the fitting and compensating repair methods"):
        run_repair(lm, root / "probe-orig", RepairConfig(**{**base, "method": "aird"}, fit_on=["xstest_safe"]),
                   tmp_path / "amp")


def test_fit_writer_recovers_a_planted_low_rank_change():
    """Differences made by a planted rank-2 change of a writer are fitted back: the fitted ΔW is the planted one,
    its two directions carry all of the difference, and R² is 1 (small ridge); the row weights do not change an
    exact fit."""
    from aird.core.compensate import fit_writer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=g)
    planted = torch.randn(16, 2, generator=g) @ torch.randn(2, 12, generator=g)
    diff = x @ planted.T
    for w in (torch.ones(400), torch.rand(400, generator=g) + 0.5):
        delta, fit = fit_writer(x, diff, w, rank=2, ridge=1e-9)
        assert torch.allclose(delta, planted, atol=1e-4)
        assert fit["rank"] == 2 and fit["energy"] > 1 - 1e-9 and fit["train_r2"] > 1 - 1e-9
    delta, fit = fit_writer(x, diff, torch.ones(400), rank=1, ridge=1e-9)   # one direction: only part of it
    sv = torch.linalg.svdvals(delta.double())
    assert fit["energy"] < 1 and sv[1] < 1e-5 * sv[0]


def _last_residuals(study):
    """The original and the pruned test models, the calibration prompts, and a reader of any model's residual
    after its last block on them."""
    from aird.core.repair import writer_rows

    root, _ = study
    unit, orig_path, texts = _calibration(study)
    orig = load_model(orig_path, device="cpu")
    eye = torch.eye(unit.numel())
    return (orig, load_model(str(root / "pruned"), device="cpu"), texts,
            lambda m: writer_rows(m, texts, orig.n_layers - 1, [], eye, 16)[1])


def test_compensation_brings_every_block_closer_to_the_original(study, tmp_path, monkeypatch):
    """aird-compensate corrects every block in turn: each block's residual error against the original falls, the
    last block's residual on the calibration prompts ends far closer to the original's than the compressed
    model's, the edit is dense (the pruned zeros fill) and the record says what it cost."""
    from aird.plugins.repairs import Compensate

    monkeypatch.setattr(Compensate, "rank", 8)
    root, data = study
    orig, lm, texts, resid = _last_residuals(study)
    h_o, h_c = resid(orig), resid(lm)
    s = run_repair(lm, root / "probe-orig", RepairConfig(method="aird-compensate", judge="score", check_on=[],
                                                         data_dir=str(data), fit_text=4), tmp_path / "comp")
    assert s["layer"] == "all" and s["rank"] == 8 and s["alpha"] == 1.0 and len(s["blocks"]) == orig.n_layers
    for b in s["blocks"]:
        assert b["error_after"] < b["error_before"], b
        assert b["attn"]["rank"] == b["mlp"]["rank"] == 8 and 0 < b["mlp"]["energy"] <= 1 + 1e-9
    assert s["calibration"]["plain_text_windows"] == 4 and s["calibration"]["prompts"] == len(texts)
    assert s["sparsity"]["after"] < s["sparsity"]["before"]
    blk = lm.adapter.layers(lm.model)[0]
    per_block = sum(8 * (m.in_features + m.out_features) for m in (blk.self_attn.o_proj, blk.mlp.down_proj))
    assert s["adapter_parameters"] == per_block * orig.n_layers
    h_r = resid(load_model(str(tmp_path / "comp"), device="cpu"))
    before, after = ((h_c - h_o) ** 2).sum(), ((h_r - h_o) ** 2).sum()
    assert after < 0.5 * before, (before, after)
    from aird.cli.render import console, render_repair

    with console.capture() as cap:
        render_repair(s)                       # the terminal summary of a repair without a search
    assert "every block, rank 8" in cap.get() and "relative residual error" in cap.get()
    with pytest.raises(AirdError, match="fit-text"):
        RepairConfig(method="aird-compensate", fit_text=-1).validate()


def test_masked_ridge_solves_each_row_on_its_own_kept_weights():
    """Conjugate gradients over all rows at once reach each row's own least-squares solution on its support (the
    explicit per-row solve), leave every masked weight at exactly zero, and a fully kept mask is the plain ridge."""
    from aird.core.compensate import masked_ridge

    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 10, generator=g) * torch.linspace(0.2, 3, 10)     # ill-scaled columns: the preconditioner
    e = torch.randn(300, 6, generator=g)
    H, C = (x.T @ x).double(), (e.T @ x).double()
    mask = torch.rand(6, 10, generator=g) > 0.5
    mask[0] = False                                    # a row with nothing kept stays zero
    delta = masked_ridge(H, C, mask, ridge=1e-3, iterations=40)
    lam = 1e-3 * float(H.diagonal().mean())
    for i in range(6):
        s = mask[i]
        want = torch.zeros(10, dtype=torch.float64)
        if s.any():
            want[s] = torch.linalg.solve(H[s][:, s] + lam * torch.eye(int(s.sum()), dtype=torch.float64), C[i, s])
        assert torch.allclose(delta[i].double(), want, atol=1e-4, rtol=1e-3), i
    assert (delta[~mask] == 0).all()
    full = masked_ridge(H, C, torch.ones(6, 10, dtype=torch.bool), ridge=1e-3, iterations=40)
    plain = torch.linalg.solve(H + lam * torch.eye(10, dtype=torch.float64), C.T).T
    assert torch.allclose(full.double(), plain, atol=1e-4, rtol=1e-3)


def test_fit_on_prompts_join_a_compensations_calibration_and_count_as_seen(study, tmp_path, monkeypatch):
    """--fit-on works for the compensating methods as for the fitting ones: its prompts join the calibration
    prompts (the chat-formatted texts every block is fitted on) and the repair record names them as seen."""
    from aird.plugins.repairs import Compensate

    monkeypatch.setattr(Compensate, "rank", 8)
    root, data = study
    base = dict(method="aird-compensate", judge="score", check_on=[], data_dir=str(data), fit_text=0)
    lm = load_model(str(root / "pruned"), device="cpu")
    plain = run_repair(lm, root / "probe-orig", RepairConfig(**base), tmp_path / "plain")
    lm = load_model(str(root / "pruned"), device="cpu")
    fit = run_repair(lm, root / "probe-orig", RepairConfig(**base, fit_on=["xstest_safe"], fit_limit=5),
                     tmp_path / "fit")
    assert fit["calibration"]["prompts"] == plain["calibration"]["prompts"] + 5
    assert fit["calibration"]["tokens"] > plain["calibration"]["tokens"]
    assert fit["tuned_on"]["fit_sets"] == ["xstest_safe"] and fit["tuned_on"]["n_fit_extra"] == 5
    assert "xstest_safe" in fit["tuned_on"]["sets"] and "xstest" in fit["tuned_on"]["origins"]
    assert fit["blocks"] != plain["blocks"]          # the extra prompts changed the fit


def test_sparse_compensation_keeps_every_zero_and_brings_every_block_closer(study, tmp_path):
    """aird-compensate-sparse refits every linear of every block on its kept weights: not one pruned zero fills
    (the written model's sparsity is the compressed model's, matrix by matrix), every linear's weighted error
    falls, each block ends closer to the original than it started, and the last block's residual on the
    calibration prompts ends far closer to the original's."""
    root, data = study
    orig, lm, texts, resid = _last_residuals(study)
    pruned = {f"{i}.{n}": m.weight.detach().clone() for i, n, m in lm.adapter.linears(lm.model)}
    h_o, h_c = resid(orig), resid(lm)
    s = run_repair(lm, root / "probe-orig", RepairConfig(method="aird-compensate-sparse", judge="score",
                                                         check_on=[], data_dir=str(data), fit_text=4),
                   tmp_path / "comp")
    assert s["rank"] is None and s["adapter_parameters"] == 0 and len(s["blocks"]) == orig.n_layers
    assert s["sparsity"]["after"] == pytest.approx(s["sparsity"]["before"], abs=1e-9) and s["sparsity"]["before"] > 0.3
    assert s["calibration"]["post_weight"] == 1.0 and s["calibration"]["post_instruction_tokens"] > 0
    for b in s["blocks"]:
        assert b["error_after"] < b["error_before"], b
        assert 0 <= b["error_after_post"] and 0 <= b["error_before_post"]
        assert set(b["linears"]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
        for name, v in b["linears"].items():
            assert v["error_after"] < v["error_before"], (b["layer"], name, v)
    rep = load_model(str(tmp_path / "comp"), device="cpu")
    changed = 0
    for i, n, m in rep.adapter.linears(rep.model):
        z = pruned[f"{i}.{n}"] == 0
        assert (m.weight[z] == 0).all() and (m.weight[~z] != 0).all(), (i, n)
        changed += int((m.weight != pruned[f"{i}.{n}"]).any())
    assert changed == len(pruned)          # every linear refitted
    h_r = resid(rep)
    before, after = ((h_c - h_o) ** 2).sum(), ((h_r - h_o) ** 2).sum()
    assert after < 0.5 * before, (before, after)
    from aird.cli.render import console, render_repair

    with console.capture() as cap:
        render_repair(s)
    assert "every linear of every block" in cap.get() and "25 CG steps" in cap.get()


def test_post_rows_mark_each_prompts_post_instruction_tokens_and_no_plain_text(refusing_lm):
    """The rows the fits weigh as post-instruction tokens are the last n tokens of each chat prompt, in the order
    the block passes gather rows, and none of a plain-text window (which follows the prompts)."""
    from aird.core.compensate import post_rows
    from aird.core.forward import batches_of_ids

    lm = refusing_lm
    ids = [[5, 6, 7, 8, 9], [11, 12, 13], [21, 22, 23, 24, 25, 26, 27]]     # two prompts, then one plain window
    batches = batches_of_ids(lm, ids, 2)
    rows = post_rows(batches, 2, 2)
    tokens = torch.cat([b.input_ids[b.attention_mask.bool()] for b in batches])
    assert rows.shape == tokens.shape and int(rows.sum()) == 4
    assert sorted(tokens[rows].tolist()) == [8, 9, 12, 13]
    assert post_rows(batches, 2, 0) is None


def test_post_weight_brings_the_post_instruction_tokens_closer(study):
    """Weighing the prompts' post-instruction tokens more in the sparse compensation's fits leaves them closer
    to the original model's residual, block by block, than the plain fit; the records give both errors."""
    from aird.core.compensate import compensate_masked
    from aird.plugins.repairs import CompensateSparse

    root, _ = study
    orig, _, texts, _ = _last_residuals(study)
    ids = [orig.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    n_post = len(orig.adapter.post_instruction_positions(orig.tokenizer))
    got = {}
    for w in (1.0, 30.0):
        lm = load_model(str(root / "pruned"), device="cpu")
        got[w] = compensate_masked(lm, orig, ids, CompensateSparse(), 0.01, 1.0, 16, post=(len(ids), n_post),
                                   post_weight=w)
    assert got[1.0][0]["error_before_post"] == pytest.approx(got[30.0][0]["error_before_post"])   # same start
    assert all(b["error_after_post"] < b["error_before_post"] for b in got[30.0])
    last = orig.n_layers - 1
    assert got[30.0][last]["error_after_post"] < got[1.0][last]["error_after_post"], (got[1.0][last], got[30.0][last])
    with pytest.raises(AirdError, match="post-weight"):
        RepairConfig(method="aird-ridge", post_weight=2).validate()
    with pytest.raises(AirdError, match="post-weight"):
        RepairConfig(method="aird-compensate", post_weight=0).validate()


def test_a_block_pass_that_needs_no_output_stops_early_and_reads_the_same_rows(refusing_lm):
    """A pass asked only for inputs inside the block stops once it has them (no output per batch) and reads the
    same rows as a full pass; the residual after the attention half is the block input plus what attention wrote."""
    from aird.core.compensate import _block_inputs, _run_block
    from aird.core.forward import batches_of_ids

    lm = refusing_lm
    ids = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("how do I bake bread", "hi", "a b c d e")]
    batches = batches_of_ids(lm, ids, 2)
    block = lm.adapter.layers(lm.model)[0]
    with torch.no_grad():
        state = _block_inputs(lm, batches)
        full = _run_block(lm, block, state, batches, ("in:mlp.gate_proj", "mid", "x_attn", "out"))
        early = _run_block(lm, block, state, batches, ("in:mlp.gate_proj", "mid", "x_attn"))
        attn = _run_block(lm, block, state, batches, ("mid",))
    assert len(full["new"]) == len(batches) and early["new"] == [] == attn["new"]
    for k in ("in:mlp.gate_proj", "mid", "x_attn"):
        assert torch.equal(full[k], early[k]), k
    assert torch.equal(attn["mid"], full["mid"]) and full["mid"].shape[0] == sum(map(len, ids))
