"""``aird-compensate``: a low-rank correction of every block, fitted layer by layer to the original model.

Patching showed where compression's damage lives (docs/generalization.md, "Where the damage lives"): the residual
stream after a pruned block differs from the original's in many directions, of which r̂ carries about 2%, and the
differences of earlier blocks are carried forward and grow. An edit of one block, along r̂ or along the 64
directions that block's difference spans most, puts back only the part written there. This repair goes through
the blocks in order. At block ℓ, with the blocks below already corrected:

1. the attention writer (o_proj) gets a rank-k update V U, fitted by ridge regression so that the residual after
   the attention half of the block matches the original model's, in the k leading directions V of their
   difference, at every token of the calibration texts;
2. the block is run again, and the MLP writer (down_proj) gets its rank-k update the same way against the residual
   after the whole block;
3. the corrected block's output is the next block's input.

Each token's row is weighted by the inverse norm of the original residual there: the attention-sink tokens carry
residuals hundreds of times larger than the rest, and an unweighted fit spends itself on them. The calibration is
the probe's training prompts (harmful and harmless), the ``fit_on`` sets, and ``fit_text`` windows of plain text
(WikiText-2's last tokens, away from the windows the perplexity evaluation reads), so that the correction is asked
to hold on plain text too. The edit is dense: a pruned matrix loses its zeros (the record gives the sparsity
before and after), and its cost as an adapter is Σ k·(d_in + d_out) per block.
"""

from __future__ import annotations

import torch

from aird.core import hooks
from aird.core.errors import AirdError
from aird.core.forward import Batch, batches_of_ids
from aird.core.loading import LoadedModel

TEXT_WINDOW = 128      # tokens per plain-text calibration window


def plain_text_windows(lm: LoadedModel, n: int, data_dir: str | None) -> list[list[int]]:
    """``n`` windows of TEXT_WINDOW tokens from the end of WikiText-2's test text (the perplexity evaluation reads
    it from the start: its 40 default windows of 1,024 tokens are the first 40,960 tokens)."""
    if n <= 0:
        return []
    from aird.core.data import wikitext_text

    ids = lm.tokenizer(wikitext_text(data_dir), add_special_tokens=False)["input_ids"]
    n = min(n, len(ids) // (2 * TEXT_WINDOW))
    tail = ids[len(ids) - n * TEXT_WINDOW:]
    return [tail[i * TEXT_WINDOW:(i + 1) * TEXT_WINDOW] for i in range(n)]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _block_inputs(lm: LoadedModel, batches: list[Batch]) -> list[list]:
    """Per batch: the first block's input and the keyword arguments every block is called with (masks, rotary
    embeddings), read by stopping the forward pass there."""
    state: list[list] = []

    def grab(_m, args, kwargs):
        state.append([args[0] if args else kwargs["hidden_states"],
                      {k: v for k, v in kwargs.items() if k != "hidden_states"}])

    h = lm.adapter.layers(lm.model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with hooks.stop_before(lm, 0):       # entered after ``grab``: the input is read, then the pass stops
            for b in batches:
                hooks.forward_until(lm, b)
    finally:
        h.remove()
    return state


def _run_block(lm: LoadedModel, block, state: list[list], batches: list[Batch], keep: tuple[str, ...]) -> dict:
    """Run ``block`` on every batch's cached input. Returns the outputs per batch (``new``) and, for each name in
    ``keep``, its rows at every real token (float32, on the CPU): ``x_attn`` / ``x_mlp`` the writers' inputs,
    ``mid`` the residual after the attention half, ``out`` the residual after the block."""
    cur: dict = {}
    handles = []
    for w in ("attn", "mlp"):
        if f"x_{w}" in keep:
            handles.append(lm.adapter.out_proj(block, w).register_forward_pre_hook(
                lambda _m, a, w=w: cur.__setitem__(f"x_{w}", a[0])))
    if "mid" in keep:
        handles.append(lm.adapter.attn_writer(block).register_forward_hook(
            lambda _m, _a, out: cur.__setitem__("attn_out", _first(out))))
    rows: dict[str, list] = {k: [] for k in keep}
    new = []
    try:
        for (hidden, kwargs), b in zip(state, batches):
            out = _first(block(hidden, **kwargs))
            new.append(out)
            cur.update(out=out)
            if "mid" in keep:
                cur["mid"] = hidden + cur["attn_out"]
            m = b.attention_mask.bool().to(out.device)
            for k in keep:
                rows[k].append(cur[k][m].float().cpu())
    finally:
        for h in handles:
            h.remove()
    return {"new": new, **{k: torch.cat(v) for k, v in rows.items()}}


def fit_writer(x: torch.Tensor, diff: torch.Tensor, weight: torch.Tensor, rank: int, ridge: float
               ) -> tuple[torch.Tensor, dict]:
    """The rank-k update ΔW = V U [d_out, d_in] minimising Σ_t w_t² ‖Vᵀ(diff_t) − U x_t‖² + λ‖U‖²: V the ``rank``
    leading right singular vectors of the weighted differences, λ = ``ridge`` · tr(XᵀX)/d_in of the weighted
    inputs. Returns ΔW and what the fit reached (share of the weighted difference V spans, weighted R² in V)."""
    X = x.double() * weight.double()[:, None]
    D = diff.double() * weight.double()[:, None]
    _, s, vh = torch.linalg.svd(D, full_matrices=False)
    k = min(rank, vh.shape[0])
    V = vh[:k].T                                   # [d_out, k]
    T = D @ V                                      # [N, k]
    G = X.T @ X
    d = G.shape[0]
    lam = ridge * (float(G.trace()) / d or 1.0)
    U = torch.cholesky_solve(X.T @ T, torch.linalg.cholesky(G + lam * torch.eye(d, dtype=torch.float64)))  # [d_in, k]
    energy = s.pow(2)
    sst = float((T ** 2).sum()) or 1.0
    return (V @ U.T).float(), {"rank": k, "energy": float(energy[:k].sum() / energy.sum().clamp_min(1e-300)),
                               "train_r2": 1 - float(((X @ U - T) ** 2).sum()) / sst}


def _relative_error(target: torch.Tensor, got: torch.Tensor) -> float:
    """Mean over tokens of ‖original − compressed‖² / ‖original‖² (the weighting the fit uses)."""
    return float(((target - got).norm(dim=-1) / target.norm(dim=-1).clamp_min(1e-12)).pow(2).mean())


def compensate(lm: LoadedModel, orig: LoadedModel, ids: list[list[int]], repair, ridge: float, alpha: float,
               batch_size: int, advance=lambda n=1: None) -> list[dict]:
    """Fit and apply the corrections block by block, editing ``lm`` in place (module docstring): each writer's
    fitted change goes through ``repair.edit(W, None, alpha, fit=ΔW)`` at ``repair.rank``. ``ids``: the
    calibration texts as token ids. Returns one record per block: the fits of both writers and the relative
    residual error after the block before and after its correction."""
    if not lm.adapter.projections_write_residual:
        raise AirdError(f"the {lm.adapter.family} family normalizes block outputs before the residual; "
                        "aird-compensate fits the projections that write it (not supported).")
    batches = batches_of_ids(lm, ids, batch_size)
    records = []
    with torch.no_grad():
        # both models advance one block at a time from their own first-block inputs: only the current block's
        # rows are ever held
        state_o, state_c = _block_inputs(orig, batches), _block_inputs(lm, batches)
        for layer, (block_o, block) in enumerate(zip(orig.adapter.layers(orig.model), lm.adapter.layers(lm.model))):
            o = _run_block(orig, block_o, state_o, batches, ("mid", "out"))
            rec: dict = {"layer": layer}
            for which, x_key, key in (("attn", "x_attn", "mid"), ("mlp", "x_mlp", "out")):
                c = _run_block(lm, block, state_c, batches, (x_key, key))
                if which == "mlp":
                    rec["error_before"] = _relative_error(o["out"], c["out"])
                target = o[key]
                delta, fit = fit_writer(c[x_key], target - c[key], 1 / target.norm(dim=-1).clamp_min(1e-6),
                                        repair.rank, ridge)
                writer = lm.adapter.out_proj(block, which)
                writer.weight.data.copy_(repair.edit(writer.weight.data, None, alpha,
                                                     fit=delta.to(writer.weight.device)))
                rec[which] = fit
            c = _run_block(lm, block, state_c, batches, ("out",))
            rec["error_after"] = _relative_error(o["out"], c["out"])
            for st, new in ((state_o, o["new"]), (state_c, c["new"])):
                for s, h in zip(st, new):
                    s[0] = h
            records.append(rec)
            advance(1)
    return records
