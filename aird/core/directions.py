"""The maths of refusal directions: difference in means, refusal score, KL, weight orthogonalization."""

from __future__ import annotations

import torch

from aird.core.errors import AirdError
from aird.core.loading import LoadedModel


def diff_in_means(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """mean(harmful) − mean(harmless) over the first (prompt) dimension, computed in float64."""
    return (harmful.double().mean(0) - harmless.double().mean(0)).float()


def refusal_scores(logits: torch.Tensor, refusal_ids: list[int]) -> torch.Tensor:
    """log p − log(1 − p), p = probability mass of the refusal tokens (reference pipeline's score)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    lp = torch.logsumexp(logp[..., refusal_ids], dim=-1)
    lp = lp.clamp(max=-1e-12)
    return (lp - torch.log(-torch.expm1(lp))).float()


def kl_div(base_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ new) of the next-token distributions, per row."""
    lp = torch.log_softmax(base_logits.double(), -1)
    lq = torch.log_softmax(new_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dimension (broadcasting)."""
    a, b = a.double(), b.double()
    return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)).float()


def _project_rows_out(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Remove r̂ from the output space of a matrix that writes to the residual: W − r̂ r̂ᵀ W."""
    return w - torch.outer(r, r @ w)


@torch.no_grad()
def orthogonalize_weights(lm: LoadedModel, direction: torch.Tensor) -> None:
    """Bake directional ablation into the weights: the embedding, every attention-out and MLP-down matrix
    (and their biases) stop writing r̂. Equivalent to :func:`aird.core.hooks.ablate` when those matrices
    write straight into the residual stream. A tied lm_head is untied first, since the unembedding must not
    change."""
    if not lm.adapter.projections_write_residual:
        raise AirdError(
            f"the {lm.adapter.family} family normalizes block outputs before the residual, so weight "
            "orthogonalization is not equivalent to ablation there; use activation ablation."
        )
    model = lm.model
    emb = lm.adapter.embedding(model)
    out_emb = model.get_output_embeddings()
    if out_emb is not None and out_emb.weight is emb.weight:
        out_emb.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    r = direction.to(emb.weight.device, torch.float64)
    r = r / r.norm()
    E = emb.weight.data.double()
    emb.weight.data.copy_(E - torch.outer(E @ r, r))
    for layer in lm.adapter.layers(model):
        for which in ("attn", "mlp"):
            lin = lm.adapter.out_proj(layer, which)
            lin.weight.data.copy_(_project_rows_out(lin.weight.data.double(), r))
            if lin.bias is not None:
                b = lin.bias.data.double()
                lin.bias.data.copy_(b - r * (r @ b))
