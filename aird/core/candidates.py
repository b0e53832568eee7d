"""Scoring candidate refusal directions: bypass, induce and KL, and a cheap attribution proxy for ranking.

Costs on a model with L layers: the bypass and KL scores need one forward pass with the direction ablated
everywhere (harmful and harmless validation prompts in the same batches); the induce score starts from the
residual cached at the candidate's source layer, so it only runs the layers above it. The proxy scores every
candidate at once from a single forward and backward pass (attribution patching: a first-order estimate of
the bypass score), so that only the most promising candidates need the full scoring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aird.core import hooks
from aird.core.directions import kl_div, refusal_scores
from aird.core.forward import Batch, last_logits, run_model
from aird.core.loading import LoadedModel


@dataclass
class ValSet:
    """Validation prompts prepared once: batches and the baseline they are compared with."""

    ablation_batches: list[Batch]       # harmful then harmless rows, one pass for bypass and KL
    n_harmful: int
    harmless_batches: list[Batch]       # harmless rows, for the induce score
    harmless_cache: list[dict[int, torch.Tensor]]  # per batch: layer -> resid_pre [B, T, d]
    harmless_base_logits: torch.Tensor  # [M, V]
    refusal_ids: list[int]


@dataclass
class Scores:
    bypass: float
    induce: float
    kl: float
    bypass_scores: list[float] | None = None    # each harmful validation prompt's refusal score under ablation


def score_candidate(lm: LoadedModel, val: ValSet, direction: torch.Tensor, layer: int, progress=None) -> Scores:
    logits = last_logits(lm, val.ablation_batches, context=lambda b: hooks.ablate(lm, direction), progress=progress)
    harmful, harmless = logits[: val.n_harmful], logits[val.n_harmful :]
    per_prompt = refusal_scores(harmful, val.refusal_ids)
    kl = kl_div(val.harmless_base_logits, harmless).mean().item()
    induce = induce_score(lm, val, direction, layer, progress)
    return Scores(bypass=per_prompt.mean().item(), induce=induce, kl=kl,
                  bypass_scores=[round(float(v), 4) for v in per_prompt])


def induce_score(lm: LoadedModel, val: ValSet, direction: torch.Tensor, layer: int, progress=None) -> float:
    p = next(lm.model.parameters())
    r = direction.to(p.device, p.dtype)
    scores = []
    with torch.inference_mode():
        for b, cache in zip(val.harmless_batches, val.harmless_cache):
            with hooks.start_at(lm, layer, cache[layer] + r):
                logits = run_model(lm, b)[:, -1, :]
            scores.append(refusal_scores(logits.cpu(), val.refusal_ids))
            if progress:
                progress(len(b.idx))
    return torch.cat(scores).mean().item()


def attribution_bypass(lm: LoadedModel, batches: list[Batch], units: torch.Tensor, refusal_ids: list[int],
                       progress=None) -> torch.Tensor:
    """First-order estimate of the change in mean refusal score when each unit direction ([C, d]) is ablated
    everywhere: −Σ over residual writers w and positions t of (∂s/∂x_w,t · r̂)(x_w,t · r̂), where the writers
    are the embedding and every attention and MLP block output. Returns [C]."""
    adapter, model = lm.adapter, lm.model
    p = next(model.parameters())
    R = units.to(p.device, p.dtype).T.contiguous()            # [d, C]
    total = torch.zeros(units.shape[0], dtype=torch.float64)
    n = 0
    for b in batches:
        outs: list[torch.Tensor] = []

        def keep(module, args, output):
            t = output[0] if isinstance(output, tuple) else output
            t.retain_grad()
            outs.append(t)

        def leaf(module, args, output):
            t = output.detach().requires_grad_(True)
            outs.append(t)
            return t

        handles = [adapter.embedding(model).register_forward_hook(leaf)]
        for layer in adapter.layers(model):
            handles.append(adapter.attn_writer(layer).register_forward_hook(keep))
            handles.append(adapter.mlp_writer(layer).register_forward_hook(keep))
        try:
            with torch.enable_grad():
                logits = run_model(lm, b)[:, -1, :]
                refusal_scores(logits, refusal_ids).sum().backward()
        finally:
            for h in handles:
                h.remove()
        mask = b.attention_mask.unsqueeze(-1).to(p.dtype)      # [B, T, 1]
        with torch.no_grad():
            for t in outs:
                if t.grad is None:
                    continue
                total -= ((t @ R) * (t.grad @ R) * mask).sum((0, 1)).double().cpu()
        n += len(b.idx)
        outs.clear()
        if progress:
            progress(len(b.idx))
    return (total / max(n, 1)).float()
