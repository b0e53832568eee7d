"""Refusal saliency of every weight: how much removing it would move the original model's refusal direction.

Used by the refusal-preserving compressors (``aird compress --protect-refusal``, the ``*-rp`` plugins). The
quantity protected is the difference of means itself,

    d(W) = mean over harmful prompts of h_L[p] − mean over harmless prompts of h_L[p],

the residual stream entering the source layer L at the source position p of the reference probe's chosen
direction (the original model's r̂ = d / ‖d‖), on the probe's own training prompts (already seen by the probe,
never by an evaluation). Zeroing weight w_ij changes d by about −w_ij ∂d/∂w_ij (first order, the estimate of
Optimal Brain Damage and SNIP), and what matters is that whole vector: its component along r̂ is the refusal
signal (a shorter one refuses less), its component orthogonal to r̂ turns the direction (the cosine that
`aird diff` reports falls as ‖Δd_⊥‖² / 2‖d‖²). The saliency is the length of that change,

    R_ij = |w_ij| · sqrt( (r̂ᵀ ∂d/∂w_ij)² + E_u[(uᵀ ∂d/∂w_ij)²] ),  u ~ N(0, I − r̂ r̂ᵀ),

the orthogonal part estimated with a few Gaussian probes (Hutchinson's estimator: E[(uᵀx)²] = ‖P⊥x‖²), one
batched backward pass through layers 0..L−1 only (the forward stops at layer L). Weights of layers ≥ L
cannot move d and get no saliency. The sum of single-weight estimates ignores how removals interact: a
ranking, not a prediction, and what `docs/compress.md` measures is whether the direction stays.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from aird.core.errors import AirdError
from aird.core.forward import make_batches
from aird.core.hooks import forward_until, stop_before
from aird.core.loading import LoadedModel
from aird.core.progress import current


def _setup(lm: LoadedModel, reference, n_prompts: int, data_dir: str | None):
    from aird.core.diff import open_probe
    from aird.core.probe import config_from_record, format_prompts, load_prompt_sets

    ref = open_probe(Path(reference))
    if ref.summary["n_layers"] != lm.n_layers or ref.chosen.shape[-1] != lm.model.config.hidden_size:
        raise AirdError("the reference probe was made on a model of another shape than the one being compressed.")
    if n_prompts < 2:
        raise AirdError("refusal saliency needs at least 2 prompts per side.")
    pcfg = config_from_record(ref.summary["config"])
    if data_dir:
        pcfg.data_dir = data_dir
    sets = load_prompt_sets(pcfg)
    r = ref.chosen.to(lm.device, torch.float32)
    return (int(ref.summary["source"]["layer"]), int(ref.summary["source"]["position"]), r / r.norm(),
            format_prompts(lm, sets.harmful_train[:n_prompts], pcfg.system_prompt),
            format_prompts(lm, sets.harmless_train[:n_prompts], pcfg.system_prompt))


def _parts(lm: LoadedModel, layer: int, pos: int, harmful: list[str], harmless: list[str], batch_size: int):
    """Each batch's share of d (harmful batches +, harmless −) and of the midpoint m = (μ_harmful + μ_harmless) / 2,
    stacked [2, hidden], the forward stopped at the source layer."""
    cur: dict = {}

    def grab(_m, args, kwargs):    # not capture_resid: that one detaches, and the saliency needs the graph
        h = args[0] if args else kwargs["hidden_states"]
        cur["h"] = h[:, pos].float()

    handle = lm.adapter.layers(lm.model)[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with stop_before(lm, layer):
            for texts, sign in ((harmful, 1.0), (harmless, -1.0)):
                for b in make_batches(lm, texts, batch_size):
                    forward_until(lm, b)
                    h = cur.pop("h").sum(0) / len(texts)
                    yield torch.stack([h * sign, h * 0.5])
    finally:
        handle.remove()


def _probe_vectors(r: torch.Tensor, probes: int, seed: int) -> torch.Tensor:
    """[probes + 1, hidden]: r̂, then ``probes`` Gaussian vectors in its orthogonal complement."""
    g = torch.Generator().manual_seed(seed)
    us = [r]
    for _ in range(probes):
        u = torch.randn(r.shape[0], generator=g).to(r.device)
        us.append(u - r * (r @ u))
    return torch.stack(us)


@contextlib.contextmanager
def _graph_through(lm: LoadedModel, mods: list):
    """Only the weights of ``mods`` require a gradient (so the graph reaches them and no other parameter's
    gradient is computed); every parameter's flag is restored after."""
    params = list(lm.model.parameters())
    was = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        for m in mods:
            m.weight.requires_grad_(True)
        yield
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)


def refusal_means(lm: LoadedModel, reference: Path | str, n_prompts: int = 32, batch_size: int = 8,
                  data_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, m) for ``lm`` (any model of the reference's shape: the original, or a compressed one), on the same
    prompts, position and layer as :func:`refusal_saliency` uses: d of the module docstring and the midpoint
    m = (μ_harmful + μ_harmless) / 2, whose projection r̂ᵀm is where the model puts the line between refusing and
    complying (a shift of it along r̂ moves every prompt towards refusal or away from it alike)."""
    layer, pos, _r, harmful, harmless = _setup(lm, reference, n_prompts, data_dir)
    with torch.inference_mode():
        both = sum(_parts(lm, layer, pos, harmful, harmless, batch_size)).cpu()
    return both[0], both[1]


def refusal_difference(lm: LoadedModel, reference: Path | str, n_prompts: int = 32, batch_size: int = 8,
                       data_dir: str | None = None) -> torch.Tensor:
    """d of the module docstring (:func:`refusal_means`' first)."""
    return refusal_means(lm, reference, n_prompts, batch_size, data_dir)[0]


def refusal_saliency(lm: LoadedModel, reference: Path | str, n_prompts: int = 32, probes: int = 3, seed: int = 0,
                     batch_size: int = 8, data_dir: str | None = None) -> dict:
    """{"saliency": {Linear module: R (same shape as its weight, float32)}, "layer", "position", "prompts",
    "probes", "d_norm"}: the refusal saliency above for every decoder Linear of layers below the reference
    direction's source layer, on ``n_prompts`` harmful and ``n_prompts`` harmless training prompts of the
    reference probe (``probes`` Gaussian probes for the part orthogonal to r̂; 0: only the part along r̂)."""
    return refusal_measures(lm, reference, saliency=True, hessians=False, n_prompts=n_prompts, probes=probes,
                            seed=seed, batch_size=batch_size, data_dir=data_dir)


def refusal_hessians(lm: LoadedModel, reference: Path | str, n_prompts: int = 32, probes: int = 3, seed: int = 0,
                     batch_size: int = 8, data_dir: str | None = None) -> dict:
    """{"hessians": {Linear module: H_r (in × in, float32, trace 1)}, "layer", "position", "prompts", "probes",
    "positions" (token positions seen, padding included), "d_norm"}: for every decoder Linear below the reference
    direction's source layer, the second moment of its inputs over the tokens of the reference probe's training
    prompts, each token t weighted by how much the module's output there moves d,

        H_r ∝ Σ_t ω_t x_t x_tᵀ,   ω_t = ‖∂(r̂ᵀd)/∂y_t‖² + E_u ‖∂(uᵀd)/∂y_t‖²   (u as in :func:`refusal_saliency`),

    y_t = W x_t the module's output at token t. An error δW of the weights moves d by Σ_t J_t δW x_t to first
    order; dropping the coupling between output rows, ‖Δd‖² ≈ Σ_t ω_t ‖δW x_t‖² / rows, a GPTQ-shaped objective
    δwᵀ H_r δw for every row (the output-gradient weighting of GuidedQuant, with the refusal difference in place
    of the language-model loss). The refusal-preserving GPTQ and SparseGPT add it to the method's own Hessian."""
    return refusal_measures(lm, reference, saliency=False, hessians=True, n_prompts=n_prompts, probes=probes,
                            seed=seed, batch_size=batch_size, data_dir=data_dir)


def _available_bytes(device: torch.device) -> int:
    """Memory free for new tensors on ``device``: CUDA's free memory, else the system's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62      # unknown (not Linux): as if it were plenty, the single-pass path


def probe_chunk(n_vectors: int, weights: int, hessian_bytes: int, available: int, share: float = 0.75) -> int:
    """How many probe vectors one backward pass can take within ``share`` of ``available`` bytes: the saliency
    holds, per vector, the batches' summed gradient and the pass's own gradient of every protected weight
    (float32, ``weights`` of them), beside one running sum and the Hessians. All of them (one pass, the fastest)
    when they fit; else fewer, each chunk re-running the forward, down to one at a time (three copies of the
    weights instead of 2·(probes + 1) + 1: what makes the 1.5B model's saliency fit in 24 GB)."""
    room = share * available - hessian_bytes - 4 * weights
    fits = int(room // (8 * weights)) if weights else n_vectors
    return max(1, min(n_vectors, fits))


def refusal_measures(lm: LoadedModel, reference: Path | str, saliency: bool = True, hessians: bool = True,
                     n_prompts: int = 32, probes: int = 3, seed: int = 0, batch_size: int = 8,
                     data_dir: str | None = None, chunk: int | None = None, level: float = 0.0) -> dict:
    """:func:`refusal_saliency`'s "saliency" and :func:`refusal_hessians`' "hessians", either or both, from one
    forward and one batched backward pass per batch of prompts (with the keys of both). ``chunk``: probe vectors
    per backward pass (None: as many as the free memory holds, :func:`probe_chunk`); with fewer than all of them
    the forward runs once per chunk and the result is the same up to rounding. ``level``: the weight of one more
    protected quantity, the midpoint's projection r̂ᵀm (:func:`refusal_means`), beside d along r̂ (weight 1) and
    orthogonal to it (weight 1 shared by the probes); with both r̂ᵀd and r̂ᵀm kept, each side's mean projection is,
    so compression shifts neither harmful nor harmless prompts towards refusal (0: d alone, as before)."""
    if probes < 0:
        raise AirdError("the number of protection probes must be at least 0.")
    if level < 0:
        raise AirdError("the protection's level weight must be at least 0.")
    if chunk is not None and chunk < 1:
        raise AirdError("the protection chunk must be at least 1 probe vector.")
    layer, pos, r, harmful, harmless = _setup(lm, reference, n_prompts, data_dir)
    info = {"layer": layer, "position": pos, "prompts": [len(harmful), len(harmless)], "probes": probes,
            "level": level}
    mods = [m for i, _n, m in lm.adapter.linears(lm.model) if i < layer]
    empty = {**({"saliency": {}} if saliency else {}), **({"hessians": {}} if hessians else {})}
    if not mods:
        return {**empty, **info, "positions": 0, "d_norm": None, "chunk": 0}
    # the vectors each batch's [d, m] parts are differentiated along, [vectors, 2, hidden]: (u, 0) for r̂ and the
    # orthogonal probes of d, then (0, r̂) for the midpoint's level when it is protected
    Ud = _probe_vectors(r, probes, seed)
    U = torch.stack([Ud, torch.zeros_like(Ud)], 1)
    weights = [1.0] + [1.0 / max(probes, 1)] * probes
    if level > 0:
        U = torch.cat([U, torch.stack([torch.zeros_like(r), r])[None]])
        weights.append(level)
    # how the vectors combine, in the saliency and in ω_t alike: along r̂, plus the mean of the orthogonal ones,
    # plus the level's weight
    share = torch.tensor(weights, device=r.device)
    if chunk is None:
        chunk = probe_chunk(len(U), sum(m.weight.numel() for m in mods) if saliency else 0,
                            4 * sum(m.in_features ** 2 for m in mods) if hessians else 0,
                            _available_bytes(mods[0].weight.device))
    chunk = min(chunk, len(U))
    starts = range(0, len(U), chunk)
    sal: dict = {}     # per matrix, Σ over probes of share · (w ∂uᵀd/∂w)², the chunks added up
    hess = {m: torch.zeros((m.in_features, m.in_features), dtype=torch.float32, device=m.weight.device)
            for m in mods} if hessians else {}
    seen: dict = {}

    def keep(m, args, out):
        seen[m] = (args[0].detach(), out)

    d = torch.zeros_like(r)
    positions = 0
    n_batches = sum(-(-len(t) // batch_size) for t in (harmful, harmless)) * len(starts)
    what = " and ".join(w for w, on in (("saliency", saliency), ("Hessians", hessians)) if on)
    handles = [m.register_forward_hook(keep) for m in mods] if hessians else []
    try:
        with _graph_through(lm, mods), torch.enable_grad(), \
                current().stage(f"refusal {what} of {len(mods)} matrices", n_batches) as advance:
            for first in starts:
                Uc, sc = U[first:first + chunk], share[first:first + chunk]
                # per weight matrix, the gradient of uᵀd for every probe u of the chunk, stacked: [chunk, *weight.shape]
                grads = {m: torch.zeros((len(Uc), *m.weight.shape), dtype=torch.float32, device=m.weight.device)
                         for m in mods} if saliency else {}
                for part in _parts(lm, layer, pos, harmful, harmless, batch_size):
                    if first == 0:
                        d += part[0].detach()
                    # d is a sum over batches: so is each gradient. Every probe of the chunk in one batched backward
                    # pass (vmap over the probes), to the weights (saliency) and to the outputs, which are not
                    # leaves (Hessians)
                    wanted = ([m.weight for m in mods] if saliency else []) + ([seen[m][1] for m in mods] if hessians else [])
                    gs = list(torch.autograd.grad(part, wanted, grad_outputs=Uc, is_grads_batched=True, allow_unused=True))
                    if saliency:
                        for m in mods:
                            g = gs.pop(0)
                            if g is not None:
                                grads[m] += g.float()
                    if hessians:
                        for m in mods:
                            g = gs.pop(0)
                            if g is None:
                                continue
                            x = seen[m][0]
                            w = torch.einsum("p,pbt->bt", sc, g.float().pow(2).sum(-1))     # ω_t, [batch, tokens]
                            xw = (x.float() * w.sqrt().unsqueeze(-1)).reshape(-1, x.shape[-1])
                            hess[m] += xw.T @ xw
                        if first == 0:
                            positions += int(seen[mods[0]][0].shape[0] * seen[mods[0]][0].shape[1])
                    seen.clear()
                    advance(1)
                with torch.no_grad():
                    for m in mods if saliency else ():
                        sq = (m.weight.detach().float() * grads.pop(m)) ** 2   # [chunk, …]
                        part_sum = torch.einsum("p,p...->...", sc, sq)
                        sal[m] = part_sum if m not in sal else sal[m].add_(part_sum)
                        del sq
    finally:
        for h in handles:
            h.remove()
    out = {**info, "positions": positions, "d_norm": float(d.norm()), "chunk": chunk}
    if saliency:
        out["saliency"] = {m: sal[m].sqrt_() for m in mods}
    if hessians:
        out["hessians"] = {}
        for m, H in hess.items():
            t = float(torch.trace(H))
            if t > 0 and torch.isfinite(H).all():
                out["hessians"][m] = H / t
    return out


def protected_hessian(H: torch.Tensor, H_r: torch.Tensor | None, strength: float) -> torch.Tensor:
    """GPTQ's Hessian with refusal protection: H + strength · tr(H) · H_r (H_r of trace 1, so strength 1 weighs the
    refusal-weighted tokens as much as the whole calibration set; with no H_r, or strength 0, H itself)."""
    if H_r is None or strength == 0:
        return H
    return H + (strength * torch.trace(H)) * H_r.to(H.device, H.dtype)


def protected_scores(base: torch.Tensor, saliency: torch.Tensor | None, strength: float,
                     means: tuple[float, float] | None = None) -> torch.Tensor:
    """The pruning score of a matrix with refusal protection: base / mean(base) + strength · R / mean(R) (each
    term scaled by its mean over the matrix, so strength 1 weighs both alike; with no saliency, or strength 0,
    the ranking is the base method's own). ``means`` gives the two means when the scores are compared a part of
    the matrix at a time (SparseGPT's blocks), so that every part weighs the terms alike."""
    if saliency is None or strength == 0:
        return base
    s = saliency.to(base.device, base.dtype)
    mb, ms = means if means is not None else (base.mean(), s.mean())
    ms = torch.as_tensor(ms)
    if not torch.isfinite(ms) or ms <= 0:
        return base
    return base / torch.as_tensor(mb).clamp_min(1e-30) + strength * s / ms
