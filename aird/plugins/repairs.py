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

The ridge variants (``aird-ridge``, ``aird-ridge-sparse``) do not amplify what the matrix already writes along
r̂, which helps only where it already writes r̂. They fit the update: W' = W + α r̂ uᵀ, where u is the ridge
regression (``aird.core.repair.fit_rank_one``) of the original model's residual projection on r̂ minus the
compressed model's, after the edited block, on the matrix's inputs, at the post-instruction tokens of harmful and
harmless calibration prompts (the probe's training splits: AdvBench, MaliciousInstruct, TDC 2023 and Alpaca),
where the reply is decided (``--fit-positions all``: every prompt token). α = 1 is
the least-squares match; the search scales it. The sparse variant restricts r̂ uᵀ to the kept weights with the
same change of each column's projection on r̂: ΔW[S_j, j] = r̂_{S_j} · α u_j / ‖r̂_{S_j}‖².

The subspace variant (``aird-subspace``) fits more than r̂: compression changes the residual stream after a block
in many directions, and putting back only its projection on r̂ also adds refusal where the compressed model's
other changes already pushed towards it (over-refusal on borderline benign prompts, docs/generalization.md). It
takes the k (``rank``, 64) leading right singular vectors V of the original-minus-
compressed residual after the edited block at the calibration tokens, and fit U [k, in] by the same ridge
regression, one column per direction: W' = W + α V U (rank k), dense. (No sparse variant: restricting V U to the
kept weights column by column with the same k projections, as ``aird-ridge-sparse`` does for r̂, writes about as
much outside V as inside it, and on the tiny test model left the residual further from the original's than the
compressed model's.)

The compensating variant (``aird-compensate``) goes further: a rank-k (64) update of both writers of every
block, fitted block by block to the original model's residual stream at every token of prompts and plain text, the
blocks below already corrected (aird/core/compensate.py). No search: the least-squares fit. Dense, and larger:
about 2% of the 0.5B model's parameters as an adapter. Its sparse form (``aird-compensate-sparse``) refits every
linear of every block on its own non-zeros instead (q/k/v and gate/up to the original linear's outputs, o_proj
and down_proj to the original's residual; masked least squares by conjugate gradients), so a pruned model keeps
exactly its zeros and its size.

The grid variants (``aird-grid``, ``aird-ridge-grid``) are for quantized models: the same dense edit, then
snapped onto the model's quantization grid (aird/core/qgrid.py: same bits and scales, only integer codes
change), so the repaired model is still the quantized model a serving engine loads. The repair records how
many codes changed and the projection error against the dense edit.
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
        # the change of projection the dense edit makes, column by column
        return _restricted(weight, unit, alpha * (unit.double() @ weight.double()))


def _restricted(weight: torch.Tensor, unit: torch.Tensor, column_change: torch.Tensor) -> torch.Tensor:
    """W + ΔW with ΔW on W's non-zeros only, changing column j's projection on r̂ by ``column_change[j]``."""
    w = weight.double()
    rs = unit.double()[:, None] * (weight != 0).double()
    norms = (rs * rs).sum(0)
    coef = torch.where(norms > 0, column_change.double() / norms.clamp_min(1e-300), torch.zeros_like(norms))
    return (w + rs * coef[None, :]).to(weight.dtype)


class RidgeRankOne:
    name = "aird-ridge"
    description = "rank-one update r̂ uᵀ fitted by ridge regression to the original model's projections (dense)"
    fits = True
    alpha_grid = (0.5, 1.0, 2.0, 4.0, 8.0)
    layer_ranking = "gap"      # a fit puts back a difference: it belongs where compression made it

    def edit(self, weight: torch.Tensor, unit: torch.Tensor, alpha: float, fit: torch.Tensor) -> torch.Tensor:
        # r̂ [d] with u [in]; or a subspace repair's basis V [d, k] with U [k, in]: W + α V U
        basis = unit.double().reshape(unit.shape[0], -1)
        return (weight.double() + alpha * basis @ fit.double().reshape(basis.shape[1], -1)).to(weight.dtype)


class SparseRidgeRankOne:
    name = "aird-ridge-sparse"
    description = "the ridge-fitted change of projection on r̂, restricted to the matrix's non-zeros"
    fits = True
    alpha_grid = (0.5, 1.0, 2.0, 4.0, 8.0)
    layer_ranking = "gap"

    def edit(self, weight: torch.Tensor, unit: torch.Tensor, alpha: float, fit: torch.Tensor) -> torch.Tensor:
        return _restricted(weight, unit, alpha * fit)


class RidgeSubspace(RidgeRankOne):
    name = "aird-subspace"
    description = ("rank-k update V U fitted by ridge regression to the original model's residual in the k leading "
                   "directions of what compression changed there (dense)")
    rank = 64


class Compensate:
    name = "aird-compensate"
    description = ("rank-k updates of every block's o_proj and down_proj, fitted block by block to the original "
                   "model's residual stream on prompts and plain text (dense)")
    compensates = True       # the core fits and applies it block by block: aird/core/compensate.py
    rank = 64
    ridge = 0.1

    def edit(self, weight: torch.Tensor, unit: torch.Tensor | None, alpha: float, fit: torch.Tensor) -> torch.Tensor:
        # fit: the block's fitted low-rank change V U [d_out, d_in] (unit unused: the fit spans its own directions)
        return (weight.double() + alpha * fit.double()).to(weight.dtype)


class CompensateSparse:
    name = "aird-compensate-sparse"
    description = ("every linear of every block refitted on its kept weights, block by block, to the original "
                   "model (its zeros kept: sparsity unchanged)")
    compensates = True       # aird/core/compensate.py, compensate_masked
    masked = True
    iterations = 25          # conjugate-gradient steps per matrix
    ridge = 0.01

    def edit(self, weight: torch.Tensor, unit: torch.Tensor | None, alpha: float, fit: torch.Tensor) -> torch.Tensor:
        # fit: the matrix's fitted change, already zero wherever the weight is (kept so, whatever α)
        return torch.where(weight != 0, (weight.double() + alpha * fit.double()).to(weight.dtype), weight)


class GridRankOne(RankOne):
    name = "aird-grid"
    description = "the rank-one edit snapped onto the quantized model's grid (only integer codes change)"
    on_grid = True


class GridRidgeRankOne(RidgeRankOne):
    name = "aird-ridge-grid"
    description = "the ridge-fitted update snapped onto the quantized model's grid (only integer codes change)"
    on_grid = True


@hookimpl
def aird_register_repairs(register):
    register(RankOne())
    register(SparseRankOne())
    register(RidgeRankOne())
    register(SparseRidgeRankOne())
    register(RidgeSubspace())
    register(Compensate())
    register(CompensateSparse())
    register(GridRankOne())
    register(GridRidgeRankOne())
