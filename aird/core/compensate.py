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


class _Stop(Exception):
    """Raised by a hook once a pass has read everything asked of it."""


def _run_block(lm: LoadedModel, block, state: list[list], batches: list[Batch], keep: tuple[str, ...]) -> dict:
    """Run ``block`` on every batch's cached input. Returns, for each name in ``keep``, its rows at every real
    token (float32, on the model's device): ``x_attn`` / ``x_mlp`` the writers' inputs, ``in:NAME`` the input of
    the block's linear NAME (e.g. ``in:self_attn.q_proj``), ``mid`` the residual after the attention half, ``out`` the
    residual after the block; with ``out``, also the block's outputs per batch (``new``). Without it, each pass
    stops as soon as it has read what was asked (an attention-half read skips the MLP)."""
    cur: dict = {}
    wanted = set(keep) - {"out"}
    stop_early = "out" not in keep

    def took(key, value):
        cur[key] = value
        if stop_early and wanted <= cur.keys():
            raise _Stop

    handles = []
    for w in ("attn", "mlp"):
        if f"x_{w}" in keep:
            handles.append(lm.adapter.out_proj(block, w).register_forward_pre_hook(
                lambda _m, a, w=w: took(f"x_{w}", a[0])))
    for k in keep:
        if k.startswith("in:"):
            handles.append(block.get_submodule(k[3:]).register_forward_pre_hook(
                lambda _m, a, k=k: took(k, a[0])))
    if "mid" in keep:
        handles.append(lm.adapter.attn_writer(block).register_forward_hook(
            lambda _m, _a, out: took("mid", cur["hidden"] + _first(out))))
    rows: dict[str, list] = {k: [] for k in keep}
    new = []
    try:
        for (hidden, kwargs), b in zip(state, batches):
            cur.clear()
            cur["hidden"] = hidden
            try:
                out = _first(block(hidden, **kwargs))
                new.append(out)
                cur["out"] = out
            except _Stop:
                pass
            m = b.attention_mask.bool().to(hidden.device)
            for k in keep:
                rows[k].append(cur[k][m].float())
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
    U = torch.cholesky_solve(X.T @ T, torch.linalg.cholesky(G + lam * torch.eye(d, dtype=torch.float64, device=G.device)))  # [d_in, k]
    energy = s.pow(2)
    sst = float((T ** 2).sum()) or 1.0
    return (V @ U.T).float(), {"rank": k, "energy": float(energy[:k].sum() / energy.sum().clamp_min(1e-300)),
                               "train_r2": 1 - float(((X @ U - T) ** 2).sum()) / sst}


def _relative_error(target: torch.Tensor, got: torch.Tensor) -> float:
    """Mean over tokens of ‖original − compressed‖² / ‖original‖² (the weighting the fit uses)."""
    return float(((target - got).norm(dim=-1) / target.norm(dim=-1).clamp_min(1e-12)).pow(2).mean())


def post_rows(batches: list[Batch], n_prompts: int, n_post: int) -> torch.Tensor | None:
    """Which token rows (in the order :func:`_run_block` gathers them) are post-instruction tokens: the last
    ``n_post`` tokens of each of the first ``n_prompts`` calibration texts (the chat-formatted prompts; the plain
    text windows follow them). None when ``n_post`` is 0."""
    if n_post <= 0:
        return None
    out = []
    for b in batches:
        e = torch.zeros(b.attention_mask.shape, dtype=torch.bool, device=b.attention_mask.device)
        for r, i in enumerate(b.idx):
            if i < n_prompts:                    # left padded: every text ends at the last column
                e[r, -n_post:] = True
        out.append(e[b.attention_mask.bool()])
    return torch.cat(out)


def _errors(target: torch.Tensor, got: torch.Tensor, post: torch.Tensor | None, when: str) -> dict:
    """The relative residual error at every token, and at the post-instruction tokens alone when known."""
    e = {f"error_{when}": _relative_error(target, got)}
    if post is not None:
        e[f"error_{when}_post"] = _relative_error(target[post], got[post])
    return e


def _blockwise(lm: LoadedModel, orig: LoadedModel, ids: list[list[int]], batch_size: int, method: str,
               fit_block, advance, post: tuple[int, int] | None = None, post_weight: float = 1.0) -> list[dict]:
    """Go through the blocks of both models in order, from their own first-block inputs, so that only the current
    block's rows are ever held: ``fit_block(block_o, block, state_o, state_c, batches, rows)`` edits the compressed
    block and returns its record and the original block's pass (with ``out``); the corrected block's output is the
    next block's input. ``post = (n_prompts, n_post)`` marks the prompts' post-instruction tokens
    (:func:`post_rows`); ``rows["post"]`` is that mask and ``rows["emph"]`` the factor √post_weight there, 1
    elsewhere, that the fits multiply their row weights by (None when post_weight is 1), so that each such token
    counts post_weight times in the squared error. Adds each block's relative residual error after its correction
    (unweighted; at the post-instruction tokens too)."""
    if not lm.adapter.projections_write_residual:
        raise AirdError(f"the {lm.adapter.family} family normalizes block outputs before the residual; "
                        f"{method} fits the projections that write it (not supported).")
    batches = batches_of_ids(lm, ids, batch_size)
    mask = post_rows(batches, *post) if post else None
    rows = {"post": mask, "emph": None if mask is None or post_weight == 1 else
            torch.where(mask, post_weight ** 0.5, 1.0).float()}
    records = []
    with torch.no_grad():
        state_o, state_c = _block_inputs(orig, batches), _block_inputs(lm, batches)
        for layer, (block_o, block) in enumerate(zip(orig.adapter.layers(orig.model), lm.adapter.layers(lm.model))):
            rec, o = fit_block(block_o, block, state_o, state_c, batches, rows)
            c = _run_block(lm, block, state_c, batches, ("out",))
            records.append({"layer": layer, **rec, **_errors(o["out"], c["out"], mask, "after")})
            for st, new in ((state_o, o["new"]), (state_c, c["new"])):
                for s, h in zip(st, new):
                    s[0] = h
            advance(1)
    return records


def compensate(lm: LoadedModel, orig: LoadedModel, ids: list[list[int]], repair, ridge: float, alpha: float,
               batch_size: int, advance=lambda n=1: None, post: tuple[int, int] | None = None,
               post_weight: float = 1.0) -> list[dict]:
    """Fit and apply the corrections block by block, editing ``lm`` in place (module docstring): each writer's
    fitted change goes through ``repair.edit(W, None, alpha, fit=ΔW)`` at ``repair.rank``. ``ids``: the
    calibration texts as token ids; ``post``, ``post_weight``: the prompts' post-instruction tokens and their
    weight in the fit (:func:`_blockwise`). Returns one record per block: the fits of both writers and the relative residual
    error after the block before and after its correction."""

    def fit_block(block_o, block, state_o, state_c, batches, rows):
        o = _run_block(orig, block_o, state_o, batches, ("mid", "out"))
        rec: dict = {}
        for which, x_key, key in (("attn", "x_attn", "mid"), ("mlp", "x_mlp", "out")):
            c = _run_block(lm, block, state_c, batches, (x_key, key))
            if which == "mlp":
                rec.update(_errors(o["out"], c["out"], rows["post"], "before"))
            target = o[key]
            w = 1 / target.norm(dim=-1).clamp_min(1e-6)
            delta, fit = fit_writer(c[x_key], target - c[key], w if rows["emph"] is None else w * rows["emph"],
                                    repair.rank, ridge)
            writer = lm.adapter.out_proj(block, which)
            writer.weight.data.copy_(repair.edit(writer.weight.data, None, alpha, fit=delta.to(writer.weight.device)))
            rec[which] = fit
        return rec, o

    return _blockwise(lm, orig, ids, batch_size, "aird-compensate", fit_block, advance, post, post_weight)


# ---- the sparse form: every linear refitted on its own zeros -------------------------------------------------


def masked_ridge(H: torch.Tensor, C: torch.Tensor, mask: torch.Tensor, ridge: float, iterations: int
                 ) -> torch.Tensor:
    """The change Δ [d_out, d_in], zero wherever ``mask`` is False, minimising Σ_i (Δ_i H Δ_iᵀ − 2 Δ_i C_iᵀ)
    + λ‖Δ‖² with λ = ``ridge`` · mean(diag H): each row's least squares on its own kept weights (H = XᵀX the
    weighted input gram, C = EᵀX the weighted error against the inputs). Every row has its own support, so the
    rows are solved together by ``iterations`` steps of conjugate gradients (Jacobi-preconditioned, one
    [d_out, d_in] × [d_in, d_in] product per step) from Δ = 0, instead of one d_in-sized solve per row."""
    H = H.float()
    lam = ridge * float(H.diagonal().mean()) or ridge
    Hl = H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    M = mask.to(H.dtype)
    inv = 1.0 / Hl.diagonal().clamp_min(1e-30)
    delta = torch.zeros_like(C, dtype=H.dtype)
    R = C.to(H.dtype) * M
    Z = R * inv
    P = Z.clone()
    rz = (R * Z).sum(1)
    for _ in range(iterations):
        Q = (P @ Hl) * M
        a = rz / (P * Q).sum(1).clamp_min(1e-30)
        delta += a[:, None] * P
        R -= a[:, None] * Q
        Z = R * inv
        rz_new = (R * Z).sum(1)
        P = Z + (rz_new / rz.clamp_min(1e-30))[:, None] * P
        rz = rz_new
    return delta


def _groups(block, state: list[list]) -> list[list[str]]:
    """The block's linears in the order the forward pass calls them, those reading the same input together
    (q/k/v, o, gate/up, down for the Qwen2 and Llama families), read from one pass over the first batch."""
    calls: list[tuple[str, int]] = []
    handles = [mod.register_forward_pre_hook(lambda _m, a, name=name: calls.append((name, a[0].data_ptr())))
               for name, mod in block.named_modules() if isinstance(mod, torch.nn.Linear)]
    try:
        hidden, kwargs = state[0]
        block(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    last = None
    for name, ptr in calls:
        if name in seen:
            continue
        seen.add(name)
        if ptr == last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = ptr
    return groups


def compensate_masked(lm: LoadedModel, orig: LoadedModel, ids: list[list[int]], repair, ridge: float,
                      alpha: float, batch_size: int, advance=lambda n=1: None,
                      post: tuple[int, int] | None = None, post_weight: float = 1.0) -> list[dict]:
    """The sparse form of :func:`compensate`: at each block, in forward order, every linear's kept weights are
    refitted by least squares (:func:`masked_ridge`, ``repair.iterations`` steps) on the compressed model's own
    inputs there, its zeros kept: the residual writers (o_proj, down_proj) to the original model's residual after
    their half of the block, as :func:`compensate` fits them, every other linear (q/k/v, gate/up) to the original
    linear's output on the original's inputs. The block is run again after each group, so each fit sees the
    inputs the groups before it produce. Token rows are weighted by the inverse norm of the original residual (and
    ``post_weight`` at the prompts' post-instruction tokens, :func:`_blockwise`). Returns one record per block:
    each linear's weighted error before and after its fit, and the block's relative residual error before and
    after."""

    layouts: dict[tuple[str, ...], list[list[str]]] = {}     # blocks of one layout share their groups

    def fit_block(block_o, block, state_o, state_c, batches, rows):
        writers = {lm.adapter.out_proj(block, "attn"): "mid", lm.adapter.out_proj(block, "mlp"): "out"}
        names = tuple(n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear))
        if names not in layouts:
            layouts[names] = _groups(block, state_c)
        groups = layouts[names]
        heads = [f"in:{g[0]}" for g in groups if block.get_submodule(g[0]) not in writers]
        attn_writer = next(i for i, g in enumerate(groups) if block.get_submodule(g[0]) in writers)
        o = _run_block(orig, block_o, state_o, batches, (*heads, "mid", "out"))
        rec: dict = {"linears": {}}
        for gi, group in enumerate(groups):
            mods = [block.get_submodule(n) for n in group]
            key = writers.get(mods[0])
            resid = key or ("mid" if gi < attn_writer else "out")    # the residual its row weights read
            c = _run_block(lm, block, state_c, batches, (f"in:{group[0]}", *((key,) if key else ()),
                                                         *(("out",) if gi == 0 else ())))
            if gi == 0:
                rec.update(_errors(o["out"], c["out"], rows["post"], "before"))
            w = 1 / o[resid].norm(dim=-1).clamp_min(1e-6)
            w = (w if rows["emph"] is None else w * rows["emph"])[:, None]
            xw = c[f"in:{group[0]}"] * w
            H = xw.T @ xw
            if key:          # a writer: the weighted residual difference is its error
                dw = (o[key] - c[key]) * w
                Cs, e0s = [dw.T @ xw], [float((dw ** 2).sum())]
            else:            # the original linear's output on the original's inputs: Wo xo − Wc xc
                xow = o[f"in:{group[0]}"] * w
                K, Goo = xow.T @ xw, xow.T @ xow
                Cs, e0s = [], []
                for mod, name in zip(mods, group):
                    Wo = block_o.get_submodule(name).weight.data.float().to(H.device)
                    Wc = mod.weight.data.float()
                    WoK, WcH = Wo @ K, Wc @ H
                    Cs.append(WoK - WcH)
                    e0s.append(float((Wo @ Goo * Wo).sum() - 2 * (WoK * Wc).sum() + (WcH * Wc).sum()))
            for mod, name, C, e0 in zip(mods, group, Cs, e0s):
                mask = mod.weight.data != 0
                delta = masked_ridge(H, C, mask, ridge, repair.iterations)
                e1 = e0 - 2 * float((delta * C).sum()) + float((delta @ H * delta).sum())
                mod.weight.data.copy_(repair.edit(mod.weight.data, None, alpha,
                                                  fit=delta.to(mod.weight.device, mod.weight.dtype)))
                rec["linears"][name] = {"error_before": e0, "error_after": e1,
                                        "kept": float(mask.float().mean())}
        return rec, o

    return _blockwise(lm, orig, ids, batch_size, "aird-compensate-sparse", fit_block, advance, post,
                      post_weight)
