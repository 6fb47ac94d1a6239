"""Exact damped inverse of the layer-block-diagonal curvature — the structure K-FAC and
EK-FAC approximate, used as a diagnostic reference for them.

For the layers `l` that `attribution.ihvp.kfac.kronecker_layers` finds (every `nn.Linear`
/ `nn.Conv2d`, weight and bias together), `G_ll = G[idx_l][:, idx_l]` is the exact
curvature block of layer l's parameters (`CurvatureOperator.dense_blocks`, float64), and

    (G_bd + λI)⁻¹ = blockdiag_l Q_l diag(1/(μ_l + λ)) Q_lᵀ,   G_ll = Q_l diag(μ_l) Q_lᵀ.

Cross-layer blocks are dropped (the block-diagonal approximation); nothing inside a block
is approximated. Hence the split of a Kronecker estimator's error against the full inverse:
block-diagonal vs full is the cost of dropping cross-layer curvature, K-FAC/EK-FAC vs
block-diagonal is the cost of the Kronecker factorisation inside each layer (for a single
training row with one position per layer the factorisation is exact, `G_ll = S_l ⊗ A_l`,
and both equal this inverse). Memory `Σ_l P_l²` float64 entries; the largest block is
limited to `max_params` parameters. Same layer restrictions as K-FAC (no TorchScript). With
the Hessian curvature the blocks are Hessian blocks (signed eigenvalues; a non-positive
`μ + λ` raises `NotPositiveDefiniteError`, as in the exact estimator).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attribution.curvature import CurvatureOperator
from attribution.ihvp.base import IHVPEstimator
from attribution.ihvp.exact import DEFAULT_MAX_PARAMS
from attribution.ihvp.kfac import KroneckerLayer, kronecker_layers


def layer_index(layer: KroneckerLayer) -> Tensor:
    """`[P_l]` flat indices of a layer's parameters: its weight, then its bias."""
    parts = [torch.arange(layer.weight.start, layer.weight.stop)]
    if layer.bias is not None:
        parts.append(torch.arange(layer.bias.start, layer.bias.stop))
    return torch.cat(parts)


class BlockDiagonalExactIHVP(IHVPEstimator):
    """State per layer l: `b{l}.values` `[P_l]`, `b{l}.vectors` `[P_l, P_l]` (eigenpairs of `G_ll`)."""

    name = "block_exact"

    def __init__(self, curvature: CurvatureOperator, damping: float, *,
                 max_params: int = DEFAULT_MAX_PARAMS) -> None:
        super().__init__(curvature, damping)
        self.layers = kronecker_layers(curvature.model)
        self.blocks = [layer_index(layer) for layer in self.layers]
        largest = max(len(block) for block in self.blocks)
        if largest > max_params:
            raise ValueError(f"the block-diagonal exact iHVP builds dense per-layer blocks; the largest has "
                             f"{largest} parameters, above the limit of {max_params}")

    def compute_state(self) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {}
        for i, block in enumerate(self.curvature.dense_blocks(self.train, self.blocks, torch.float64)):
            values, vectors = torch.linalg.eigh(0.5 * (block + block.T))
            state[f"b{i}.values"] = values.clamp(min=0) if self.curvature.positive_semidefinite else values
            state[f"b{i}.vectors"] = vectors
        return state

    def load_state(self, state: dict[str, Tensor]) -> None:
        super().load_state(state)
        for i in range(len(self.blocks)):
            self.require_positive_definite(self.state[f"b{i}.values"])

    def _solve(self, vectors: Tensor) -> Tensor:
        out = torch.zeros(vectors.shape, dtype=torch.float64, device=vectors.device)
        for i, index in enumerate(self.blocks):
            q = self.state[f"b{i}.vectors"]
            idx = index.to(vectors.device)
            coords = vectors[:, idx].to(q.dtype) @ q  # [M, P_l]
            out[:, idx] = (coords / (self.state[f"b{i}.values"] + self.damping)) @ q.T
        return out
