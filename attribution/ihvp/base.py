"""Common interface of the inverse-Hessian-vector-product (iHVP) estimators.

Every estimator approximates `(G + λI)⁻¹ V` for a batch of vectors `V ∈ ℝ^{M×P}`, with `G`
the curvature of the training objective (`attribution.curvature`: Gauss-Newton, Fisher or
the Hessian) and `λ > 0` the damping.
Two phases, as in kronfluence: `fit(train)` computes the reusable state once (a dense
eigendecomposition, Kronecker factors, a low-rank basis, a step size) and `solve(V)` runs
per query. The state is a plain `{name: tensor}` dict so callers can cache it in an
`ArtifactStore` and `load_state` it later without refitting; damping is applied at solve
time, so one fitted state serves every damping value.

Precision follows the model: `dtype` is the tracked parameters' dtype. Fitted states are
float64 (the one exception, the exact inverse of a float32 model above 8,192 parameters,
is float32; a float64 model always gets float64 states); `solve` returns float64 whenever
the model or the input is float64, float32 otherwise, so a float64 model keeps float64
precision end to end.

The Hessian is indefinite away from a minimum, and `H + λI` may then be too: the exact,
block-exact and Arnoldi estimators check their damped eigenvalues when a state is loaded,
CG checks `pᵀ(H + λI)p` along its search directions, and both raise
`NotPositiveDefiniteError` (a `ValueError`) rather than return a meaningless solve.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from attribution.curvature import CurvatureOperator
from attribution.data import TrainingSet


class NotPositiveDefiniteError(ValueError):
    """The damped curvature `H + λI` is not positive definite (the indefinite Hessian)."""

    def __init__(self, damping: float, detail: str) -> None:
        super().__init__(
            f"the damped Hessian H + λI (λ = {damping:.3g}) is not positive definite: {detail} (H is indefinite "
            "away from a minimum of the training loss) — raise `damping` or use curvature gauss_newton")


class IHVPEstimator(ABC):
    """Approximates `V ↦ (G + λI)⁻¹ V` row-wise for `V` `[M, P]`."""

    name: ClassVar[str]

    def __init__(self, curvature: CurvatureOperator, damping: float) -> None:
        if not damping > 0:
            raise ValueError(f"damping must be positive, got {damping}")
        self.curvature = curvature
        self.damping = float(damping)
        self._train: TrainingSet | None = None
        self._state: dict[str, Tensor] | None = None

    @property
    def num_params(self) -> int:
        return self.curvature.num_params

    @property
    def dtype(self) -> torch.dtype:
        """The model's parameter dtype (products with the curvature are computed in it)."""
        return self.curvature.dtype

    def result_dtype(self, vectors: Tensor) -> torch.dtype:
        """float64 if the model or `vectors` is float64, else float32."""
        return torch.float64 if torch.float64 in (vectors.dtype, self.dtype) else torch.float32

    # ----------------------------------------------------------------- phases
    def bind(self, train: TrainingSet) -> None:
        """Remember the rows the curvature is taken over (matrix-free estimators need them)."""
        self._train = train

    def fit(self, train: TrainingSet) -> None:
        """`bind(train)` then compute and load the state."""
        self.bind(train)
        self.load_state(self.compute_state())

    @abstractmethod
    def compute_state(self) -> dict[str, Tensor]:
        """The fitted state (tensors on the CPU or the model's device) from the bound rows."""

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Adopt a state returned by `compute_state` (possibly after a round trip through a store)."""
        device = self.curvature.model.device
        self._state = {k: v.to(device) for k, v in state.items()}

    def solve(self, vectors: Tensor) -> Tensor:
        """`[M, P] → [M, P]` rows `≈ (G + λI)⁻¹ v` in `result_dtype(vectors)`."""
        if vectors.ndim != 2 or vectors.shape[1] != self.num_params:
            raise ValueError(f"expected vectors of shape [M, {self.num_params}], got {tuple(vectors.shape)}")
        if self._state is None:
            raise RuntimeError(f"{self.name} estimator used before fit() or load_state()")
        dtype = self.result_dtype(vectors)
        vectors = vectors.to(self.curvature.model.device)
        return self._solve(vectors).to(dtype)

    @abstractmethod
    def _solve(self, vectors: Tensor) -> Tensor: ...

    # ----------------------------------------------------------------- helpers
    @property
    def state(self) -> dict[str, Tensor]:
        if self._state is None:
            raise RuntimeError(f"{self.name} estimator used before fit() or load_state()")
        return self._state

    @property
    def train(self) -> TrainingSet:
        if self._train is None:
            raise RuntimeError(f"{self.name} estimator needs bind(train) before use")
        return self._train

    def require_positive_definite(self, eigenvalues: Tensor) -> None:
        """`NotPositiveDefiniteError` unless every damped eigenvalue `μ + λ` is positive."""
        if eigenvalues.numel() and float(eigenvalues.min()) + self.damping <= 0:
            raise NotPositiveDefiniteError(
                self.damping, f"its smallest eigenvalue is μ + λ = {float(eigenvalues.min()) + self.damping:.3g}")

    def damped_matvec(self, vectors: Tensor) -> Tensor:
        """`[M, P]`: `(G + λI) V` over the bound rows."""
        return self.curvature.matvec(self.train, vectors).to(vectors.dtype) + self.damping * vectors
