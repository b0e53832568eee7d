"""Built-in repair plugins: AIRD's rank-one edit, and a sparsity-preserving variant.

AIRD (Chhabra & Khalili 2025) re-induces the original model's refusal direction r̂ in a compressed model by
editing one residual-writing matrix of one layer. aird reconstructs the edit as W' = W + α r̂ r̂ᵀ W: the
component the matrix writes along r̂ is scaled by (1 + α), everything orthogonal to r̂ is untouched. (The
paper's exact form is not public; this reconstruction is the form used by later work on restoring refusal.)
The dense edit fills the matrix's zeros, which is why AIRD lowers that layer's sparsity.

The sparse variant reaches the same target — the same change of every column's projection on r̂ — with an
update restricted to the non-zero entries of the pruned matrix: for column j with non-zero rows S_j, the
least-norm solution of r̂_{S_j}ᵀ ΔW[S_j, j] = α r̂ᵀ W[:, j] is ΔW[S_j, j] = r̂_{S_j} · α r̂ᵀW[:, j] / ‖r̂_{S_j}‖².
Every zero stays zero, so the compressed model keeps its sparsity exactly.
"""

from __future__ import annotations

import torch

from aird.core.hookspecs import hookimpl


class RankOne:
    name = "aird"
    description = "rank-one edit W + α r̂ r̂ᵀ W of one residual-writing matrix (dense: fills zeros)"

    def edit(self, weight: torch.Tensor, unit: torch.Tensor, alpha: float) -> torch.Tensor:
        w = weight.double()
        r = unit.double()
        return (w + alpha * torch.outer(r, r @ w)).to(weight.dtype)


class SparseRankOne:
    name = "aird-sparse"
    description = "the same change of projection on r̂, restricted to the matrix's non-zeros (keeps sparsity)"

    def edit(self, weight: torch.Tensor, unit: torch.Tensor, alpha: float) -> torch.Tensor:
        w = weight.double()
        r = unit.double()
        mask = (weight != 0).double()
        rs = r[:, None] * mask                       # r̂ restricted to each column's non-zero rows
        norms = (rs * rs).sum(0)                      # ‖r̂_{S_j}‖²
        target = alpha * (r @ w)                      # the change of projection the dense edit makes
        coef = torch.where(norms > 0, target / norms.clamp_min(1e-300), torch.zeros_like(norms))
        return (w + rs * coef[None, :]).to(weight.dtype)


@hookimpl
def aird_register_repairs(register):
    register(RankOne())
    register(SparseRankOne())
