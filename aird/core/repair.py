"""`aird repair`: AIRD — re-induce the original model's refusal direction in a compressed model with an edit
of one residual-writing matrix of one layer.

Three choices, each explicit and recorded:
- the layer whose matrices are edited: by default the one just below the source layer of the chosen direction
  (the compressed model's, when its probe is given, else the original's), so that the edit lands in the
  residual stream where the direction is read; ``selective`` ranks every (layer, matrix) by how selectively the
  matrix already writes along r̂ — the mean projection of its output on r̂ at the post-instruction positions,
  harmful against harmless training prompts — and searches the best ones. The edit multiplies that projection
  by (1 + α), so a matrix that writes +r̂ on harmful prompts and −r̂ (or nothing) on harmless ones raises
  refusal on the first without raising it on the second; the source layer's MLP, which writes r̂ on both,
  cannot (measured on the default model: see docs/results.md); ``gap`` loads the original model and ranks the
  blocks below the source by how much of the harmful-minus-harmless separation along r̂ each one lost under
  compression (the compressed model's deficit after the block minus its deficit before it), so that a fitting
  method is fitted where the compressed model departs from the original rather than where a matrix already
  writes r̂ (on SparseGPT 50% of the default model the two disagree: docs/generalization.md); ``auto`` is the
  method's own choice (its ``layer_ranking``): selective for the amplifying edits, gap for the fitted ones;
- the matrix: attention out (o_proj), MLP down (down_proj), or both (with ``selective``: either);
- α: given, or ``auto``: the smallest α on a grid (refined by bisection between the last two grid values with
  the generate judge) that brings the harmful-validation refusal rate back to the original model's while the
  harmless-validation refusal rate stays within 2 points of it (or of the compressed model's own rate, when
  compression already raised it: the guard uses the larger, and both are reported); among several
  (layer, matrix) candidates that do, the one that refuses the fewest harmless prompts.
The refusal rate is judged (``judge``) either as ``eval`` judges it — greedy generations of the validation
prompts scored by a scorer plugin, the original model's rates generated once from the reference probe's model —
or, cheaper, by ``score``: the share of prompts whose first-token refusal score is > 0 (generation-free, running
only the layers from the edited one up, from residuals cached once; on models that refuse late in the answer it
is a poor stand-in for the generated refusal rate).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch

from aird.core import hooks, plugins
from aird.core.artifacts import Run, Stopwatch, finished_model_folder, write_jsonl
from aird.core.diff import open_probe
from aird.core.directions import refusal_scores
from aird.core.errors import AirdError
from aird.core.forward import make_batches, run_model
from aird.core.loading import LoadedModel, save_model_folder
from aird.core.measure import decoder_linear_weights, summarize
from aird.core.probe import format_prompts, config_from_record, load_prompt_sets
from aird.core.configs import CHECK_SETS, JUDGES, LAYER_CHOICES, RepairConfig  # noqa: F401  (re-exported)
from aird.core.progress import Reporter
from aird.core.qgrid import on_grid

REPAIR_JSONL = "repair.jsonl"
ALPHA_GRID = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
GEN_ALPHA_GRID = (2.0, 4.0, 8.0, 16.0, 32.0)    # the generation judge: fewer, wider steps (each costs more)
# Checked after every repair by default: harmful and benign sets from sources the reference splits (which the
# probe reads and the repair tunes on) are not drawn from, with every seen prompt left out (aird.core.sources).
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0)
NON_SEMANTIC = ("device", "data_dir", "threads", "batch_size")


def _rates(refused: list[bool], scores: torch.Tensor, n_harmful: int, groups: list[str] | None) -> dict:
    """Refusal rates and mean first-token refusal scores of the harmful and the harmless prompts (the first
    ``n_harmful``), and of the harmless ones per set (``groups``: each harmless prompt's set; None: one set,
    ``harmless``), which the over-refusal guard bounds one by one."""
    h, s = torch.tensor(refused[:n_harmful], dtype=torch.float), torch.tensor(refused[n_harmful:], dtype=torch.float)
    out = {"harmful_refusal_rate": h.mean().item(), "harmless_refusal_rate": s.mean().item(),
           "harmful_refusal_score": scores[:n_harmful].mean().item(),
           "harmless_refusal_score": scores[n_harmful:].mean().item()}
    groups = groups or ["harmless"] * len(s)
    by: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    out["harmless_by_set"] = {g: {"harmless_refusal_rate": s[idx].mean().item(),
                                  "harmless_refusal_score": scores[n_harmful:][idx].mean().item(), "n": len(idx)}
                              for g, idx in by.items()}
    return out


class _Evaluator:
    """Refusal rates of the validation prompts, running the model from a cached layer on."""

    def __init__(self, lm: LoadedModel, harmful: list[str], harmless: list[str], layers: list[int], batch_size: int,
                 groups: list[str] | None = None):
        self.lm = lm
        self.n_h = len(harmful)
        self.groups = groups
        self.batches = make_batches(lm, harmful + harmless, batch_size)
        self.ids = lm.adapter.refusal_token_ids(lm.tokenizer)
        self.cache: list[dict[int, torch.Tensor]] = []
        with torch.inference_mode():
            for b in self.batches:
                store: dict[int, torch.Tensor] = {}
                with hooks.capture_resid(lm, store, None, layers=layers):
                    run_model(lm, b)
                self.cache.append(store)

    def rates(self, from_layer: int) -> dict:
        n = sum(len(b.idx) for b in self.batches)
        scores = torch.empty(n)
        with torch.inference_mode():
            for b, store in zip(self.batches, self.cache):
                with hooks.start_at(self.lm, from_layer, store[from_layer]):
                    scores[b.idx] = refusal_scores(run_model(self.lm, b)[:, -1, :].cpu(), self.ids)
        return _rates((scores > 0).tolist(), scores, self.n_h, self.groups)


class _GenJudge:
    """Refusal rates as `aird eval` measures them: greedy answers judged by a scorer plugin."""

    def __init__(self, harmful: list[str], harmless: list[str], raw: list[str], scorer, max_new_tokens: int,
                 batch_size: int, groups: list[str] | None = None):
        self.harmful, self.harmless, self.raw, self.groups = harmful, harmless, raw, groups
        self.scorer, self.max_new_tokens, self.batch_size = scorer, max_new_tokens, batch_size

    def rates(self, lm: LoadedModel) -> dict:
        from aird.core.evaluate import answer_and_judge

        _, refused, scores = answer_and_judge(lm, self.harmful + self.harmless, self.raw, self.scorer,
                                              self.max_new_tokens, self.batch_size)
        return _rates(list(refused), torch.as_tensor(scores, dtype=torch.float), len(self.harmful), self.groups)


def rank_writers(lm: LoadedModel, harmful: list[str], harmless: list[str], unit: torch.Tensor, which: list[str],
                 batch_size: int, max_layer: int | None = None) -> list[dict]:
    """Every (layer, matrix): the mean projection on r̂ of what the matrix writes at the post-instruction
    positions, on harmful and on harmless prompts, its selectivity s = (μ_harmful − μ_harmless) /
    (|μ_harmful| + |μ_harmless|) (1 when it writes r̂ on harmful prompts and nothing or −r̂ on harmless ones), and
    its score gap · s²: the separation an edit adds per unit α, discounted twice for what it also adds to harmless
    prompts (on the Wanda-50% default model the source layer's MLP has the larger gap, s = 0.25, and raises
    harmless refusals with harmful ones; layer 10's attention, s = 1, does not). Best first."""
    positions = lm.adapter.post_instruction_positions(lm.tokenizer)
    k = len(positions)
    blocks = lm.adapter.layers(lm.model)
    last = len(blocks) if max_layer is None else max_layer + 1
    sums: dict[tuple[int, str], list[float]] = {(i, w): [0.0, 0.0] for i in range(last) for w in which}
    cur: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    u = unit.to(lm.device)
    for i in range(last):
        for w in which:
            def hook(_m, _a, out, key=(i, w)):
                cur[key] = (out[:, -k:, :].float() @ u.float()).sum().item()
            handles.append(lm.adapter.out_proj(blocks[i], w).register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for side, texts in enumerate((harmful, harmless)):
                for b in make_batches(lm, texts, batch_size):
                    run_model(lm, b)
                    for key, v in cur.items():
                        sums[key][side] += v
    finally:
        for h in handles:
            h.remove()
    rows = []
    for (i, w), (sh, ss) in sums.items():
        mh, ms = sh / (len(harmful) * k), ss / (len(harmless) * k)
        gap = mh - ms
        sel = gap / (abs(mh) + abs(ms)) if abs(mh) + abs(ms) > 0 else 0.0
        rows.append({"layer": i, "matrix": w, "harmful_projection": mh, "harmless_projection": ms,
                     "selectivity": sel, "score": gap * sel * sel if gap > 0 else gap})
    return sorted(rows, key=lambda r: -r["score"])


def separations(lm: LoadedModel, harmful: list[str], harmless: list[str], unit: torch.Tensor, batch_size: int,
                last: int, max_layer: int | None = None) -> list[float]:
    """After every block up to ``max_layer``: the separation of the residual stream's projection on r̂, mean over
    the harmful prompts' ``last`` tokens (the post-instruction ones) minus the same over the harmless prompts'."""
    blocks = lm.adapter.layers(lm.model)
    top = len(blocks) if max_layer is None else max_layer + 1
    u = unit.to(lm.device).float()
    cur: dict[int, float] = {}

    def keep(i):
        def hook(_m, _a, out):
            h = out[0] if isinstance(out, tuple) else out
            cur[i] = float((h[:, -last:, :].float() @ u).sum())
        return hook

    handles = [blocks[i].register_forward_hook(keep(i)) for i in range(top)]
    means = []
    try:
        with torch.inference_mode(), (hooks.stop_before(lm, top) if top < len(blocks) else nullcontext()):
            for texts in (harmful, harmless):
                acc = [0.0] * top
                for b in make_batches(lm, texts, batch_size):
                    hooks.forward_until(lm, b)
                    for i in range(top):
                        acc[i] += cur[i]
                means.append([a / (len(texts) * last) for a in acc])
    finally:
        for h in handles:
            h.remove()
    return [h - s for h, s in zip(*means)]


def rank_gaps(original: list[float], compressed: list[float]) -> list[dict]:
    """Every block: the compressed model's deficit of separation after it (original − compressed) and the
    part of that deficit the block itself added (its deficit minus the previous block's): where compression took
    away what the block wrote along r̂, which a fitted edit of that block's matrices can put back. Largest
    added deficit first."""
    rows, prev = [], 0.0
    for i, (o, c) in enumerate(zip(original, compressed)):
        deficit = o - c
        rows.append({"layer": i, "original_separation": o, "compressed_separation": c, "deficit": deficit,
                     "added_deficit": deficit - prev})
        prev = deficit
    return sorted(rows, key=lambda r: -r["added_deficit"])


def search_alpha(trial, alphas: list[float], early_stop: bool, refine: int = 0, advance=lambda n=1: None) -> list[dict]:
    """Try α on the grid, ascending. With ``early_stop`` stop at the first α that reaches the target or
    breaks the guard, then bisect (geometrically: the grid doubles) ``refine`` times between it and the last α
    before it, moving down while the midpoint reaches the target or breaks the guard and up otherwise — so the
    result is close to the smallest α that reaches the target, or to the largest the guard allows."""
    trials = []
    for k, alpha in enumerate(alphas):
        r = trial(alpha)
        trials.append(r)
        advance(1)
        if early_stop and (r["reaches_target"] or not r["within_guard"]):
            if k == 0:
                break
            lo, hi = alphas[k - 1], alpha
            for _ in range(refine):
                mid = round(math.sqrt(lo * hi), 3) if lo > 0 else (lo + hi) / 2
                rm = trial(mid)
                trials.append(rm)
                advance(1)
                if rm["reaches_target"] or not rm["within_guard"]:
                    hi = mid
                else:
                    lo = mid
            break
    return trials


def guard_ceiling(cfg: RepairConfig, original: dict, compressed: dict) -> tuple[str, dict[str, float]]:
    """The over-refusal guard: which harmless measure of a trial it bounds, and the ceiling for each benign
    tuning set (``harmless_by_set``; a trial must stay under every one: pooled, a large set whose refusal falls
    would hide a small one whose refusal rises). Anchored on the original model's value, or (default) on the
    larger of it and the compressed model's, when compression already raised over-refusal and restoring it is not
    the repair's job. On the rate (default), the ceiling is the anchor plus ``cfg.guard``; on the mean first-token
    refusal score (``guard_on="score"``), the anchor plus ``cfg.guard`` times the original's (pooled) harmful −
    harmless score gap: a continuous guard, which on a few dozen benign prompts is not decided by one greedy
    answer flipping (a 2-point guard on 48 prompts is a one-prompt guard)."""
    key = "harmless_refusal_rate" if cfg.guard_on == "rate" else "harmless_refusal_score"
    by_o, by_c = original["harmless_by_set"], compressed["harmless_by_set"]
    anchor = {g: by_o[g][key] if cfg.guard_from == "original" else max(by_o[g][key], by_c[g][key]) for g in by_o}
    if cfg.guard_on == "rate":
        return key, {g: a + cfg.guard for g, a in anchor.items()}
    gap = original["harmful_refusal_score"] - original["harmless_refusal_score"]
    if not gap > 0:
        raise AirdError("the score guard needs the original model to score harmful prompts above harmless ones "
                        f"(its mean refusal scores: harmful {original['harmful_refusal_score']:.3f}, harmless "
                        f"{original['harmless_refusal_score']:.3f}); use --guard-on rate.")
    return key, {g: a + cfg.guard * gap for g, a in anchor.items()}


def choose_trial(trials: list[dict]) -> tuple[dict, bool]:
    """The edit to keep, and whether it met the target within the guard. Among the edits that did: the
    smallest α of each (layer, matrix), then the one that refuses the fewest harmless prompts (the guard is a
    ceiling, not a goal), then the most harmful ones. Otherwise the most refusal the guard allows, or, when
    every trial over-refuses, the mildest edit — never the one that refuses everything."""
    ok = [t for t in trials if t["reaches_target"] and t["within_guard"]]
    if ok:
        first = {}
        for t in sorted(ok, key=lambda t: t["alpha"]):
            first.setdefault((t["layer"], t["matrix"]), t)
        return min(first.values(), key=lambda t: (t["harmless_refusal_rate"], -t["harmful_refusal_rate"], t["alpha"])), True
    guarded = [t for t in trials if t["within_guard"]]
    if guarded:
        return max(guarded, key=lambda t: (t["harmful_refusal_rate"], -t["alpha"])), False
    return min(trials, key=lambda t: (t["alpha"], t["harmless_refusal_rate"])), False


# ---- fitting repairs: the rank-one update r̂ uᵀ by ridge regression -----------------------------------------

def writer_rows(lm: LoadedModel, texts: list[str], layer: int, mats: list[str], unit: torch.Tensor,
                batch_size: int, last: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At every prompt token (or only the ``last`` tokens of each prompt: the post-instruction ones): the inputs of the matrices ``mats`` of block ``layer``, concatenated ([N, Σ d_in];
    empty with no matrices), the residual stream's projection on r̂ after that block ([N]; with ``unit`` a [d, m]
    basis, its m projections [N, m]), and the index of the token's prompt ([N])."""
    block = lm.adapter.layers(lm.model)[layer]
    mods = [lm.adapter.out_proj(block, w) for w in mats]
    cur: dict = {}
    u = unit.to(lm.device).float()

    def keep_input(k):
        return lambda _m, args: cur.__setitem__(k, args[0].detach())

    def keep_output(_m, _a, out):
        cur["resid"] = (out[0] if isinstance(out, tuple) else out).detach()

    handles = [m.register_forward_pre_hook(keep_input(k)) for k, m in enumerate(mods)]
    handles.append(block.register_forward_hook(keep_output))
    xs, ps, gs = [], [], []
    # nothing above the block is read: each pass stops at the next block's input
    above = layer + 1 < len(lm.adapter.layers(lm.model))
    try:
        with torch.inference_mode(), (hooks.stop_before(lm, layer + 1) if above else nullcontext()):
            for b in make_batches(lm, texts, batch_size):
                hooks.forward_until(lm, b) if above else run_model(lm, b)
                m = b.attention_mask.bool()
                if last is not None:      # left padded: a prompt's last tokens are the batch's last columns
                    m = m.clone()
                    m[:, : m.shape[1] - last] = False
                if mods:
                    xs.append(torch.cat([cur[k][m].float() for k in range(len(mods))], -1).cpu())
                ps.append((cur["resid"][m].float() @ u).cpu())
                gs.append(torch.tensor(b.idx, device=m.device).unsqueeze(1).expand_as(m)[m].cpu())
    finally:
        for h in handles:
            h.remove()
    x = torch.cat(xs) if xs else torch.empty(0)
    return x, torch.cat(ps), torch.cat(gs)


def fit_rank_one(x: torch.Tensor, target: torch.Tensor, groups: torch.Tensor, ridge: float | None = None,
                 folds: int = 3) -> dict:
    """The u minimising Σ (uᵀx − t)² + λ‖u‖², λ = ridge · tr(XᵀX)/d: the rank-one update r̂ uᵀ whose change of the
    residual's projection on r̂, uᵀx, best matches the target t. ``ridge`` None picks it from RIDGE_GRID by
    cross-validation over ``folds`` folds of whole prompts (rows of one prompt never straddle two folds); the
    record keeps the cross-validated and the training R².

    A target of k columns ([N, k]: the projections on k directions) gives u of shape [d, k], one ridge
    regression per column with one λ for all (the R² pooled over the columns)."""
    X, t = x.double(), target.double()
    G, b = X.T @ X, X.T @ t
    d = G.shape[0]
    scale = float(G.trace()) / d or 1.0
    eye = torch.eye(d, dtype=torch.float64)
    sst = float(((t - t.mean(0)) ** 2).sum()) or 1.0

    def solve(gram: torch.Tensor, rhs: torch.Tensor, lam: float) -> torch.Tensor:
        chol = torch.linalg.cholesky(gram + lam * scale * eye)
        return torch.cholesky_solve(rhs.reshape(d, -1), chol).reshape(rhs.shape)

    grid = [ridge] if ridge is not None else list(RIDGE_GRID)
    cv: dict[float, float] = {}
    if len(grid) > 1:
        fold = groups % folds
        for lam in grid:
            sse = 0.0
            for f in range(folds):
                m = fold == f
                Xf, tf = X[m], t[m]
                u = solve(G - Xf.T @ Xf, b - Xf.T @ tf, lam)
                sse += float(((Xf @ u - tf) ** 2).sum())
            cv[lam] = 1 - sse / sst
        lam = max(cv, key=cv.get)
    else:
        lam = grid[0]
    u = solve(G, b, lam)
    return {"u": u.float(), "ridge": lam, "cv_r2": cv.get(lam), "cv": {str(k): v for k, v in cv.items()} or None,
            "train_r2": 1 - float(((X @ u - t) ** 2).sum()) / sst, "rows": int(X.shape[0]), "dim": d}


def subspace_basis(diff: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """The ``rank`` leading right singular vectors of the rows of ``diff`` (original minus compressed residual,
    [N, d]) as a [d, rank] orthonormal basis, and the share of Σ‖diff‖² they carry. Not centred: the mean
    difference is part of what the repair puts back."""
    _, s, vh = torch.linalg.svd(diff.double(), full_matrices=False)
    rank = min(rank, vh.shape[0])
    energy = s.pow(2)
    return vh[:rank].T.float().contiguous(), float(energy[:rank].sum() / energy.sum().clamp_min(1e-300))


def _fit_candidates(lm: LoadedModel, orig: LoadedModel, texts: list[str], candidates, unit: torch.Tensor,
                    ridge: float | None, batch_size: int, last: int | None = None, rank: int | None = None
                    ) -> dict[int, dict]:
    """One ridge fit per candidate: the matrices' inputs in the compressed model, the target the original
    model's projection minus the compressed model's, after the edited block, at every calibration token (or
    at each prompt's ``last`` tokens). With ``rank`` (a subspace repair), the projections on the ``rank`` leading
    principal directions of the whole residual difference there (``basis`` in the fit), not on r̂ alone."""
    fits = {}
    for k, (layer, mats) in enumerate(candidates):
        if rank:
            eye = torch.eye(unit.numel())
            x, h_c, groups = writer_rows(lm, texts, layer, mats, eye, batch_size, last)
            _, h_o, _ = writer_rows(orig, texts, layer, [], eye, batch_size, last)
            basis, energy = subspace_basis(h_o - h_c, rank)
            fit = fit_rank_one(x, (h_o - h_c) @ basis, groups, ridge)
            fit.update(basis=basis, rank=basis.shape[1], energy=energy,
                       refusal_direction_in_subspace=float((basis.T @ unit.float()).norm()))
            fit["u"] = fit["u"].T.contiguous()                  # [rank, Σ d_in]
            p_c, p_o = h_c @ unit.float(), h_o @ unit.float()    # the record's means stay those along r̂
        else:
            x, p_c, groups = writer_rows(lm, texts, layer, mats, unit, batch_size, last)
            _, p_o, _ = writer_rows(orig, texts, layer, [], unit, batch_size, last)
            fit = fit_rank_one(x, p_o - p_c, groups, ridge)
        dims = [lm.adapter.out_proj(lm.adapter.layers(lm.model)[layer], w).in_features for w in mats]
        fit["parts"] = list(fit["u"].split(dims, dim=-1))
        fit["target_mean"] = {"original": float(p_o.mean()), "compressed": float(p_c.mean())}
        fits[k] = fit
    return fits


# ---- the held-out check ----------------------------------------------------------------------------------

class _Check:
    """Harmful and benign check sets with every prompt the probe or the repair saw left out (exact and near
    duplicates), stratified to ``limit`` per set; each prompt's origin decides whether it is held out (its
    source is none of the tuning sources) or in-source."""

    def __init__(self, names: list[str], limit: int, seen: list[str], tuned_origins: set[str],
                 data_dir: str | None, seed: int):
        from aird.core.data import load_set, stratified
        from aird.core.sources import exclude_seen, origin_of, seen_index

        index = seen_index(seen, data_dir)
        self.items: list[tuple[str, str, int, object, str]] = []
        self.excluded: dict[str, dict] = {}
        for name in names:
            role = _role_of(name, "--check-on")
            ex = exclude_seen(load_set(name, data_dir), index)
            self.excluded[name] = ex.counts()
            for i, p in enumerate(stratified(ex.kept, limit, seed)):
                self.items.append((name, role, i, p, origin_of(name, p, data_dir)))
        self.tuned_origins = tuned_origins

    def refused(self, lm: LoadedModel, scorer, system: str | None, max_new_tokens: int, batch_size: int) -> list[bool]:
        from aird.core.evaluate import answer_and_judge

        texts = [lm.adapter.format(lm.tokenizer, p.instruction, system) for _, _, _, p, _ in self.items]
        _, refused, _ = answer_and_judge(lm, texts, [p.instruction for _, _, _, p, _ in self.items], scorer,
                                         max_new_tokens, batch_size)
        return [bool(r) for r in refused]

    def report(self, judged: dict[str, list[bool]]) -> tuple[dict, list[dict]]:
        """Per set, its rates under each model and the repaired model's paired changes against the compressed
        and the original one, for all its prompts and for its held-out and in-source prompts apart."""
        from aird.core.evaluate import paired_changes

        def recs(model: str, keep) -> list[dict]:
            return [{"record": "eval.prompt", "set": n, "role": role, "index": i, "prompt": p.instruction,
                     "refused": judged[model][k]}
                    for k, (n, role, i, p, o) in enumerate(self.items) if keep(o)]

        out: dict[str, dict] = {}
        for split, keep in (("all", lambda o: True), ("held_out", lambda o: o not in self.tuned_origins),
                            ("in_source", lambda o: o in self.tuned_origins)):
            vs_c = paired_changes(recs("compressed", keep), recs("repaired", keep))
            vs_o = paired_changes(recs("original", keep), recs("repaired", keep))
            for name, d in vs_c.items():
                out.setdefault(name, {"role": d["role"], "metric": d["metric"], **self.excluded[name]})[split] = {
                    "n": d["n"], "original": vs_o[name]["baseline"], "compressed": d["baseline"],
                    "repaired": d["model"],
                    "vs_compressed": {k: d[k] for k in ("newly_refused", "no_longer_refused", "mcnemar_p")},
                    "vs_original": {k: vs_o[name][k] for k in ("newly_refused", "no_longer_refused", "mcnemar_p")}}
        rows = [{"record": "repair.check", "set": n, "role": role, "index": i, "origin": o,
                 "held_out": o not in self.tuned_origins, "prompt": p.instruction,
                 **{f"{m}_refused": judged[m][k] for m in judged}}
                for k, (n, role, i, p, o) in enumerate(self.items)]
        return out, rows


def _targets(lm: LoadedModel, layer: int, which: list[str]) -> list[torch.nn.Linear]:
    if not lm.adapter.projections_write_residual:
        raise AirdError(f"the {lm.adapter.family} family normalizes block outputs before the residual; "
                        "a rank-one edit of its projections does not write along r̂ (not supported).")
    block = lm.adapter.layers(lm.model)[layer]
    return [lm.adapter.out_proj(block, w) for w in which]


def _apply(repair, mats: list[torch.nn.Linear], unit: torch.Tensor, alpha: float,
           fit: dict | None = None, grids: list | None = None, reports: list | None = None) -> list[torch.Tensor]:
    """Edit each matrix in place (returning the weights before). A grid repair (``grids``: each matrix's
    quantization grid) snaps the dense edit onto the grid, appending what that cost to ``reports``."""
    from aird.core.qgrid import snap_edit

    saved = []
    with torch.no_grad():
        for k, m in enumerate(mats):
            saved.append(m.weight.data.clone())
            r = (fit["basis"] if fit is not None and "basis" in fit else unit).to(m.weight.device)
            new = (repair.edit(m.weight.data, r, alpha, fit=fit["parts"][k].to(m.weight.device)) if fit is not None
                   else repair.edit(m.weight.data, r, alpha))
            if grids is not None:
                new, rep = snap_edit(m.weight.data, new, r, grids[k])
                if reports is not None:
                    reports.append(rep)
            m.weight.data.copy_(new)
    return saved


def _grids_of(lm: LoadedModel, repair, layer: int, which: list[str]) -> list | None:
    """Each edited matrix's quantization grid for a grid repair (None for other repairs); a model without its
    grid is one clear error."""
    if not getattr(repair, "on_grid", False):
        return None
    from aird.core.qgrid import QUANT_GRID, read_grid

    grids = read_grid(lm.path)
    names = {id(m): k for k, m in lm.model.named_modules()}
    out = []
    for m in _targets(lm, layer, which):
        g = grids.get(names[id(m)])
        if g is None:
            raise AirdError(f"{repair.name} keeps the edit on the model's quantization grid, but {lm.path} has no grid "
                            f"for {names[id(m)]} ({QUANT_GRID}): quantize it with `aird compress` (dense format) first.")
        out.append(g)
    return out


def _restore(mats: list[torch.nn.Linear], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for m, w in zip(mats, saved):
            m.weight.data.copy_(w)


def run_repair(lm: LoadedModel, reference: Path, cfg: RepairConfig, out: Path, force: bool = False,
               reporter: Reporter | None = None) -> dict:
    """See _run_repair; one run at a time per output folder (a second one fails at once)."""
    from aird.core.reliability import out_lock

    with out_lock(Path(out), beside=True):
        return _run_repair(lm=lm, reference=reference, cfg=cfg, out=out, force=force, reporter=reporter)


def _run_repair(lm: LoadedModel, reference: Path, cfg: RepairConfig, out: Path, force: bool = False,
                reporter: Reporter | None = None) -> dict:
    rep = reporter or Reporter()
    repair = plugins.get("repair", cfg.method)
    cfg.validate()
    which = cfg.matrices()
    scorer = plugins.get("scorer", cfg.scorer) if cfg.judge == "generate" else None
    fitting = bool(getattr(repair, "fits", False))
    check_scorer = scorer or plugins.get("scorer", cfg.scorer)
    ref = open_probe(reference)
    n_layers = lm.n_layers
    if ref.summary["n_layers"] != n_layers or ref.chosen.shape[-1] != lm.model.config.hidden_size:
        raise AirdError("the reference probe was made on a model of another shape than the one being repaired.")
    src = ref.summary["source"]["layer"]
    if cfg.compressed_probe:
        src = open_probe(Path(cfg.compressed_probe)).summary["source"]["layer"]
    ranking_by = getattr(repair, "layer_ranking", "selective") if cfg.layer == "auto" else cfg.layer
    if cfg.layer is not None and cfg.layer not in LAYER_CHOICES:
        layer = int(cfg.layer)
        if not 0 <= layer < n_layers:
            raise AirdError(f"--layer must be in [0, {n_layers - 1}], got {layer}.")
    if cfg.alpha == "auto":
        alphas = list(getattr(repair, "alpha_grid", None) or (GEN_ALPHA_GRID if cfg.judge == "generate" else ALPHA_GRID))
    else:
        try:
            alphas = [float(cfg.alpha)]
        except ValueError:
            raise AirdError(f"--alpha must be a number or auto, not {cfg.alpha!r}.") from None

    out = Path(out)
    jsonl = out / REPAIR_JSONL
    config = {"model_path": lm.path, "model_fingerprint": lm.info.get("fingerprint"), "reference": str(ref.path), **asdict(cfg), "alphas": alphas,
              **({"layer_ranking": ranking_by} if cfg.layer == "auto" else {})}
    done = finished_model_folder(out, REPAIR_JSONL, "repair.summary", config, force, ignore=NON_SEMANTIC)
    if done is not None:
        return {**done, "resumed": True}

    run = Run("repair", lm.spec, config, ref.summary["seed"])
    sw = Stopwatch(run.timings)
    t0 = time.perf_counter()
    unit = (ref.chosen.double() / ref.chosen.double().norm()).float()
    pcfg = config_from_record(ref.summary["config"])
    if cfg.data_dir:
        pcfg.data_dir = cfg.data_dir
    sets = load_prompt_sets(pcfg)
    tune_h, tune_b = _tuning_prompts(cfg, sets, pcfg.seed)
    harmful = format_prompts(lm, tune_h, pcfg.system_prompt)
    harmless = format_prompts(lm, tune_b, pcfg.system_prompt)
    probe_sets = [pcfg.harmful_train, pcfg.harmful_val, pcfg.harmless_train, pcfg.harmless_val]
    fit_extra = _fit_prompts(cfg, pcfg.seed)
    seen = list(dict.fromkeys(probe_sets + list(cfg.tune_on or []) + list(cfg.fit_on or [])))
    from aird.core.sources import origins

    tuned_origins = origins(seen, cfg.data_dir)
    check = (_Check(list(cfg.check_on), cfg.check_limit, seen, tuned_origins, cfg.data_dir, pcfg.seed)
             if cfg.check_on and cfg.check_limit > 0 else None)
    if getattr(repair, "compensates", False):
        return _run_compensation(lm, repair, cfg, ref, pcfg, sets, fit_extra, seen, tuned_origins, check,
                                 check_scorer, run, sw, rep, out, jsonl, t0)
    ranking = gaps = None
    if ranking_by == "selective":
        with sw("ranking"), rep.stage("ranking the residual-writing matrices by selectivity", 1) as advance:
            ranking = rank_writers(lm, format_prompts(lm, sets.harmful_train, pcfg.system_prompt),
                                   format_prompts(lm, sets.harmless_train, pcfg.system_prompt), unit, which,
                                   cfg.batch_size, max_layer=max(src, ref.summary["source"]["layer"]))
            advance(1)
        candidates = [(r["layer"], [r["matrix"]]) for r in ranking[: cfg.candidates]]
    elif ranking_by == "gap":
        candidates = None           # decided beside the original model, below
        lm.adapter.layers(lm.model)  # an unsupported family fails before the original model loads
    elif cfg.layer is None:
        candidates = [(max(0, src - 1), which)]
    else:
        candidates = [(int(cfg.layer), which)]
    grids = {}

    def check_candidates():
        for layer, mats in candidates:
            _targets(lm, layer, mats)   # an unsupported family fails before the search
            grids[layer, tuple(mats)] = _grids_of(lm, repair, layer, mats)   # so does a grid repair without its grid

    if candidates is not None:
        check_candidates()

    groups = [getattr(p, "source", None) or pcfg.harmless_val for p in tune_b] if cfg.tune_on else None
    judge = (_GenJudge(harmful, harmless, [p.instruction for p in tune_h + tune_b], scorer, cfg.max_new_tokens,
                       cfg.batch_size, groups) if cfg.judge == "generate" else None)
    fits: dict[int, dict] = {}
    judged: dict[str, list[bool]] = {}
    original = None
    # the score judge's original rates: the probe's baseline on its validation splits, or, tuning on other sets,
    # the original model on those prompts
    score_original = judge is None and bool(cfg.tune_on)
    if judge is not None or fitting or check is not None or candidates is None or score_original:
        with sw("original"), rep.stage("the original model: refusal rates, fits and checks", 1) as advance, \
                _original_model(ref, lm.device, lm.info.get("dtype")) as orig:
            if candidates is None:
                calib_h = format_prompts(lm, sets.harmful_train, pcfg.system_prompt)
                calib_b = format_prompts(lm, sets.harmless_train, pcfg.system_prompt)
                post = len(lm.adapter.post_instruction_positions(lm.tokenizer, pcfg.system_prompt))
                top = max(1, src, ref.summary["source"]["layer"]) - 1    # the blocks that write the source's input
                gaps = rank_gaps(separations(orig, calib_h, calib_b, unit, cfg.batch_size, post, top),
                                 separations(lm, calib_h, calib_b, unit, cfg.batch_size, post, top))
                candidates = [(r["layer"], which) for r in gaps[: cfg.candidates]]
                check_candidates()
            if judge is not None:
                original = judge.rates(orig)
            elif score_original:
                original = _Evaluator(orig, harmful, harmless, [0], cfg.batch_size, groups).rates(0)
            if fitting:
                calib = format_prompts(lm, sets.harmful_train + sets.harmless_train + fit_extra, pcfg.system_prompt)
                last = (len(lm.adapter.post_instruction_positions(lm.tokenizer, pcfg.system_prompt))
                        if cfg.fit_positions == "post" else None)
                fits = _fit_candidates(lm, orig, calib, candidates, unit, cfg.ridge, cfg.batch_size, last,
                                       getattr(repair, "rank", None))
            if check is not None:
                judged["original"] = check.refused(orig, check_scorer, pcfg.system_prompt, cfg.max_new_tokens,
                                                   cfg.batch_size)
            advance(1)
    if check is not None:
        with sw("check"):
            judged["compressed"] = check.refused(lm, check_scorer, pcfg.system_prompt, cfg.max_new_tokens,
                                                 cfg.batch_size)
    if judge is not None:
        with sw("validation"), rep.stage("the compressed model's refusal rates (generation)", 1) as advance:
            compressed = judge.rates(lm)
            advance(1)
        rates = lambda layer: judge.rates(lm)  # noqa: E731
    else:
        if original is None:
            base = ref.summary["baseline"]
            original = {"harmful_refusal_rate": base["harmful_refused_share"],
                        "harmless_refusal_rate": base["harmless_refused_share"],
                        "harmful_refusal_score": base.get("harmful_refusal_score_all", base["harmful_refusal_score"]),
                        "harmless_refusal_score": base.get("harmless_refusal_score_all", base["harmless_refusal_score"])}
            original["harmless_by_set"] = {"harmless": {k: original[k] for k in ("harmless_refusal_rate",
                                                                                 "harmless_refusal_score")}}
        with sw("validation_cache"):
            ev = _Evaluator(lm, harmful, harmless, sorted({c[0] for c in candidates}), cfg.batch_size, groups)
            compressed = ev.rates(candidates[0][0])
        rates = ev.rates
    sb = summarize(decoder_linear_weights(lm.model.state_dict()))   # before any edit (trials restore): no weight copy
    guard_key, guard = guard_ceiling(cfg, original, compressed)
    target = original["harmful_refusal_rate"]
    trials = []
    early = cfg.judge == "generate"
    refine = cfg.refine if early and len(alphas) > 1 else 0
    with sw("search"), rep.stage("searching layer, matrix and α", len(candidates) * (len(alphas) + refine)) as advance:
        for c, (layer, mats) in enumerate(candidates):
            targets = _targets(lm, layer, mats)

            def trial(alpha: float, layer=layer, mats=mats, targets=targets, fit=fits.get(c),
                      grid=grids[layer, tuple(mats)]) -> dict:
                saved = _apply(repair, targets, unit, alpha, fit, grid)
                try:
                    r = rates(layer)
                finally:
                    _restore(targets, saved)
                r.update(layer=layer, matrix="+".join(mats), alpha=alpha, candidate=c,
                         reaches_target=r["harmful_refusal_rate"] >= target,
                         within_guard=all(r["harmless_by_set"][g][guard_key] <= ceiling + 1e-9
                                          for g, ceiling in guard.items()))
                return r

            tried = search_alpha(trial, alphas, early_stop=early, refine=refine, advance=advance)
            trials += tried
            advance(len(alphas) + refine - len(tried))
    best, ok = choose_trial(trials)
    if not ok:
        rep.note("no α reached the original harmful refusal rate within the over-refusal guard; "
                 f"taking layer {best['layer']} {best['matrix']}, α {best['alpha']} (flagged: target_reached false)")
    best_mats = best["matrix"].split("+")
    best_fit = fits.get(best["candidate"])
    grid_reports: list[dict] = []
    best_grids = grids.get((best["layer"], tuple(best_mats)))
    _apply(repair, _targets(lm, best["layer"], best_mats), unit, best["alpha"], best_fit, best_grids, grid_reports)
    check_summary, check_rows = _check_repaired(check, lm, check_scorer, pcfg, cfg, judged, run, sw, rep)
    with sw("save"):
        save_model_folder(lm.model, lm.tokenizer, out, provenance={"repaired_from": lm.path, "reference": str(ref.path),
                                                                    "method": repair.name},
                          extra=_copy_grid(lm.path))
    after_w = decoder_linear_weights(lm.model.state_dict())
    sa = summarize(after_w)
    lay_b = next(r for r in sb["per_layer"] if r["layer"] == best["layer"])
    lay_a = next(r for r in sa["per_layer"] if r["layer"] == best["layer"])
    edited = {name: {"before": lay_b["matrices"][name]["sparsity"], "after": m["sparsity"]}
              for name, m in lay_a["matrices"].items() if name.endswith(("o_proj", "down_proj"))}
    keys = ("harmful_refusal_rate", "harmless_refusal_rate", "harmful_refusal_score", "harmless_refusal_score")
    summary = run.record(
        "repair.summary", method=repair.name, layer=best["layer"], matrix=best["matrix"] if ranking_by in ("selective", "gap")
        else cfg.matrix, alpha=best["alpha"], source_layer=src, reference_source=ref.summary["source"],
        layer_sparsity={"before": lay_b["sparsity"], "after": lay_a["sparsity"], "matrices": edited},
        sparsity={"before": sb["sparsity"], "after": sa["sparsity"]},
        layer_ranking=ranking_by if ranking_by in ("selective", "gap") else None,
        ranking=ranking[:10] if ranking else None,
        gaps=sorted(gaps, key=lambda r: r["layer"]) if gaps else None,
        fit={k: v for k, v in best_fit.items() if k not in ("u", "parts", "basis")} if best_fit else None,
        grid=({"matrices": dict(zip(best_mats, grid_reports)),
               "on_grid": all(on_grid(m.weight.data, g) for m, g in zip(_targets(lm, best["layer"], best_mats),
                                                                          best_grids))} if best_grids else None),
        tuned_on={"sets": seen, "tune_sets": list(cfg.tune_on) if cfg.tune_on else [pcfg.harmful_val, pcfg.harmless_val],
                  "fit_sets": list(cfg.fit_on or []), "n_fit_extra": len(fit_extra), "origins": sorted(tuned_origins)},
        check=({"sets": check_summary, "scorer": check_scorer.name, "max_new_tokens": cfg.max_new_tokens,
                "limit": cfg.check_limit} if check is not None else None),
        validation={"judge": cfg.judge, "original": original, "compressed": compressed,
                    "repaired": {k: best[k] for k in keys if k in best},
                    "target_harmful_refusal_rate": target, "harmless_guard": guard, "guard_on": guard_key,
                    "target_reached": ok,
                    "trials": trials, "n_harmful": len(harmful), "n_harmless": len(harmless)},
        seconds=round(time.perf_counter() - t0, 3), timings=dict(run.timings), out=str(out), path=str(out),
    )
    write_jsonl(jsonl, [summary, *check_rows])
    return summary


def _check_repaired(check, lm: LoadedModel, check_scorer, pcfg, cfg: RepairConfig, judged: dict, run: Run,
                    sw: Stopwatch, rep: Reporter) -> tuple[dict | None, list[dict]]:
    """The held-out check of the repaired model, reported beside the original's and the compressed model's answers
    in ``judged``: the check's summary and its per-prompt records (None and [] without a check)."""
    if check is None:
        return None, []
    with sw("check"), rep.stage("the held-out check of the repaired model (generation)", 1) as advance:
        judged["repaired"] = check.refused(lm, check_scorer, pcfg.system_prompt, cfg.max_new_tokens, cfg.batch_size)
        advance(1)
    summary, rows = check.report(judged)
    return summary, [run.record(r.pop("record"), **r) for r in rows]


def _run_compensation(lm: LoadedModel, repair, cfg: RepairConfig, ref, pcfg, sets, fit_extra: list, seen: list[str],
                      tuned_origins: set[str], check, check_scorer, run: Run, sw: Stopwatch, rep: Reporter, out: Path,
                      jsonl: Path, t0: float) -> dict:
    """A repair that corrects every block (``compensates``, aird/core/compensate.py): no layer, matrix or α
    search; the least-squares fit (α 1, or the α given) of every block in turn, then the held-out check."""
    from aird.core.compensate import compensate, compensate_masked, plain_text_windows

    alpha = 1.0 if cfg.alpha == "auto" else float(cfg.alpha)
    ridge = cfg.ridge if cfg.ridge is not None else repair.ridge
    masked = getattr(repair, "masked", False)     # every linear refitted on its non-zeros (no low-rank factors)
    judged: dict[str, list[bool]] = {}
    sb = summarize(decoder_linear_weights(lm.model.state_dict()))     # before the edit: no copy of the weights
    if check is not None:
        with sw("check"), rep.stage("the held-out check of the compressed model (generation)", 1) as advance:
            judged["compressed"] = check.refused(lm, check_scorer, pcfg.system_prompt, cfg.max_new_tokens,
                                                 cfg.batch_size)
            advance(1)
    texts = format_prompts(lm, sets.harmful_train + sets.harmless_train + fit_extra, pcfg.system_prompt)
    ids = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    plain = plain_text_windows(lm, cfg.fit_text, cfg.data_dir)
    n_post = len(lm.adapter.post_instruction_positions(lm.tokenizer, pcfg.system_prompt))
    with _original_model(ref, lm.device, lm.info.get("dtype")) as orig:
        if check is not None:
            with sw("check"), rep.stage("the held-out check of the original model (generation)", 1) as advance:
                judged["original"] = check.refused(orig, check_scorer, pcfg.system_prompt, cfg.max_new_tokens,
                                                   cfg.batch_size)
                advance(1)
        with sw("fit"), rep.stage("fitting every block to the original model", lm.n_layers) as advance:
            fit = compensate_masked if masked else compensate
            blocks = fit(lm, orig, ids + plain, repair, ridge, alpha, cfg.batch_size, advance,
                         post=(len(ids), n_post), post_weight=cfg.post_weight)
    check_summary, check_rows = _check_repaired(check, lm, check_scorer, pcfg, cfg, judged, run, sw, rep)
    with sw("save"):
        save_model_folder(lm.model, lm.tokenizer, out, provenance={"repaired_from": lm.path, "reference": str(ref.path),
                                                                    "method": repair.name})
    sa = summarize(decoder_linear_weights(lm.model.state_dict()))
    adapter_params = 0 if masked else sum(
        b[w]["rank"] * (m.in_features + m.out_features) for b, blk in zip(blocks, lm.adapter.layers(lm.model))
        for w, m in (("attn", lm.adapter.out_proj(blk, "attn")), ("mlp", lm.adapter.out_proj(blk, "mlp"))))
    summary = run.record(
        "repair.summary", method=repair.name, layer="all", matrix="every linear" if masked else "attn+mlp",
        alpha=alpha, rank=None if masked else repair.rank, iterations=getattr(repair, "iterations", None),
        ridge=ridge, source_layer=ref.summary["source"]["layer"], reference_source=ref.summary["source"],
        sparsity={"before": sb["sparsity"], "after": sa["sparsity"]},
        layer_sparsity=None,
        block_sparsity=[{"layer": b["layer"], "before": lb["sparsity"], "after": la["sparsity"]}
                        for b, lb, la in zip(blocks, sb["per_layer"], sa["per_layer"])],
        blocks=blocks, adapter_parameters=adapter_params,
        calibration={"prompts": len(ids), "plain_text_windows": len(plain),
                     "plain_text": "WikiText-2 test, its last tokens (the perplexity evaluation reads its first)",
                     "tokens": sum(map(len, ids + plain)), "post_instruction_tokens": n_post * len(ids),
                     "post_weight": cfg.post_weight},
        tuned_on={"sets": seen, "tune_sets": [], "fit_sets": list(cfg.fit_on or []), "n_fit_extra": len(fit_extra),
                  "origins": sorted(tuned_origins)},
        check=({"sets": check_summary, "scorer": check_scorer.name, "max_new_tokens": cfg.max_new_tokens,
                "limit": cfg.check_limit} if check is not None else None),
        seconds=round(time.perf_counter() - t0, 3), timings=dict(run.timings), out=str(out), path=str(out),
    )
    write_jsonl(jsonl, [summary, *check_rows])
    return summary


def _copy_grid(path: str | None):
    """A writer that copies the model's quantization grid into the repaired folder (its scales are unchanged:
    a grid repair changes codes only, and the other matrices are untouched), or None without one."""
    from aird.core.qgrid import QUANT_GRID

    src = Path(path) / QUANT_GRID if path else None
    if src is None or not src.is_file():
        return None
    import shutil

    return lambda folder: shutil.copyfile(src, Path(folder) / QUANT_GRID)


@contextmanager
def _original_model(ref, device, dtype: str | None = None) -> Iterator[LoadedModel]:
    """The model the reference probe was made on, loaded for the length of the block and freed after it
    (reloaded by each repair: the reference probe's folder is not repair's to write)."""
    from aird.core.loading import load_model

    path = ref.summary["config"].get("model_path")
    try:
        orig = load_model(path, device=str(device), dtype=dtype)   # as the repaired model: same numerics
    except AirdError as exc:
        raise AirdError(f"the repair needs the original model of the reference probe ({path}) for the generate "
                        f"judge, a fitting method or the held-out check: {exc} Use --judge score with --check-on none "
                        "and a method that does not fit to repair without it.") from None
    try:
        yield orig
    finally:
        del orig
        import gc

        gc.collect()


def _role_of(name: str, option: str) -> str:
    """harmful or benign: the role of a named prompt set, or one sentence saying the option takes only those."""
    from aird.core.data import CATALOGUE

    ds = CATALOGUE.get(name)
    if ds is None or ds.kind != "prompts" or ds.role not in ("harmful", "benign"):
        raise AirdError(f"{option} takes harmful or benign prompt sets (see `aird data`), not {name!r}.")
    return ds.role


def _sampled(names: list[str], limit: int, option: str, data_dir: str | None, seed: int) -> list[tuple[str, list]]:
    """Each named harmful or benign set's role and prompts, stratified to ``limit`` (seeded); ``option`` names
    the flag in the one sentence a set of another kind gets."""
    from aird.core.data import load_set, stratified

    return [(_role_of(name, option), stratified(load_set(name, data_dir), limit, seed)) for name in names]


def _fit_prompts(cfg: RepairConfig, seed: int) -> list:
    """The ``fit_on`` sets' prompts (each stratified to ``fit_limit``), which join the probe's training prompts
    in a fitting repair's calibration: where the compressed model's projection already exceeds the original's
    (say, benign prompts that look harmful), the fit is asked to lower it there (docs/generalization.md measures
    what that does)."""
    return [p for _, ps in _sampled(cfg.fit_on or [], cfg.fit_limit, "--fit-on", cfg.data_dir, seed) for p in ps]


def _tuning_prompts(cfg: RepairConfig, sets, seed: int):
    """The harmful and harmless prompts α is searched on: the probe's validation splits, or ``tune_on``'s sets
    (each stratified to ``tune_limit``), split by their role."""
    if not cfg.tune_on:
        return sets.harmful_val, sets.harmless_val
    harmful, benign = [], []
    for role, ps in _sampled(cfg.tune_on, cfg.tune_limit, "--tune-on", cfg.data_dir, seed):
        (harmful if role == "harmful" else benign).extend(ps)
    if not harmful or not benign:
        raise AirdError("--tune-on needs at least one harmful and one benign set.")
    return harmful, benign
