"""Exact damped inverse from the dense curvature: `(G + λI)⁻¹ = Q diag(1/(μ + λ)) Qᵀ`.

`G = Q diag(μ) Qᵀ` is built densely (`CurvatureOperator.dense`) and eigendecomposed once;
any damping is then a diagonal rescale. Eigenvalues of a positive semi-definite curvature
are clipped at 0 (rounding); the Hessian's keep their sign, and loading a state whose
smallest `μ + λ` is ≤ 0 raises `NotPositiveDefiniteError`. Precision: float64 for float64 models and up to
8,192 parameters, float32 above for float32 models (halves the `P²` memory). Memory is `P²`
entries, so models above `max_params` parameters are refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attribution.curvature import CurvatureOperator
from attribution.ihvp.base import IHVPEstimator

DEFAULT_MAX_PARAMS = 20_000
_FLOAT64_MAX_PARAMS = 8_192


class ExactIHVP(IHVPEstimator):
    """Dense eigendecomposition of `G`; state: `eigenvalues` `[P]`, `eigenvectors` `[P, P]`."""

    name = "exact"

    def __init__(self, curvature: CurvatureOperator, damping: float, *,
                 max_params: int = DEFAULT_MAX_PARAMS) -> None:
        super().__init__(curvature, damping)
        if curvature.num_params > max_params:
            raise ValueError(
                f"the exact iHVP builds a dense {curvature.num_params}×{curvature.num_params} curvature; "
                f"it is limited to {max_params} parameters — use cg, arnoldi, kfac or ekfac, or restrict `layers`"
            )

    def compute_state(self) -> dict[str, Tensor]:
        wide = self.num_params <= _FLOAT64_MAX_PARAMS or self.dtype == torch.float64
        dtype = torch.float64 if wide else torch.float32
        dense = self.curvature.dense(self.train, dtype=dtype)
        values, vectors = torch.linalg.eigh(0.5 * (dense + dense.T))
        return {"eigenvalues": values.clamp(min=0) if self.curvature.positive_semidefinite else values,
                "eigenvectors": vectors}

    def load_state(self, state: dict[str, Tensor]) -> None:
        super().load_state(state)
        self.require_positive_definite(self.state["eigenvalues"])

    def _solve(self, vectors: Tensor) -> Tensor:
        q = self.state["eigenvectors"]
        scale = 1.0 / (self.state["eigenvalues"] + self.damping)
        coords = vectors.to(q.dtype) @ q  # [M, P] = (Qᵀ vᵀ)ᵀ
        return (coords * scale) @ q.T
