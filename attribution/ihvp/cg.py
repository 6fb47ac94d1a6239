"""Conjugate gradient on `(G + λI) X = V`, all M right-hand sides at once.

Each iteration is one matrix-free pass over the curvature rows (`G` never formed), so a
solve costs at most `max_iter` passes. Standard CG (Hestenes & Stiefel 1952) run
independently per row of `V` with its own step sizes:

    r₀ = v, p₀ = r₀, αₖ = rₖᵀrₖ / pₖᵀ(G+λI)pₖ, x ← x + αₖpₖ, r ← r − αₖ(G+λI)pₖ,
    βₖ = rₖ₊₁ᵀrₖ₊₁ / rₖᵀrₖ, pₖ₊₁ = rₖ₊₁ + βₖpₖ,

stopping a row once `‖r‖ ≤ tol·‖v‖`; converged rows leave the batched product.
Nothing is fitted, so the state is empty and every query pays the iterations.

CG needs `G + λI` positive definite. With the (indefinite) Hessian a search direction with
`pₖᵀ(H + λI)pₖ ≤ 0` proves it is not, and raises `NotPositiveDefiniteError`; only the
directions CG visits are checked, so an indefinite `H + λI` goes unnoticed when `v` has no
component along its non-positive eigenvectors (the Krylov space then never reaches them, and
the solve is still `(H + λI)⁻¹v`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attribution.curvature import CurvatureOperator
from attribution.ihvp.base import IHVPEstimator, NotPositiveDefiniteError


class ConjugateGradientIHVP(IHVPEstimator):
    """Batched CG; `tol` is relative to each right-hand side's norm."""

    name = "cg"

    def __init__(self, curvature: CurvatureOperator, damping: float, *,
                 max_iter: int = 100, tol: float = 1e-5) -> None:
        super().__init__(curvature, damping)
        if max_iter < 1:
            raise ValueError("max_iter must be positive")
        if not tol > 0:
            raise ValueError("tol must be positive")
        self.max_iter = max_iter
        self.tol = tol
        self.iterations = 0  # iterations taken by the last solve

    def compute_state(self) -> dict[str, Tensor]:
        return {}

    def _solve(self, vectors: Tensor) -> Tensor:
        b = vectors.double()
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = (r * r).sum(1)
        threshold = (self.tol * b.norm(dim=1)) ** 2
        active = rs > threshold
        self.iterations = 0
        while bool(active.any()) and self.iterations < self.max_iter:
            idx = active.nonzero().squeeze(1)
            ap = self.damped_matvec(p[idx]).double()
            curvature = (p[idx] * ap).sum(1)
            if bool((curvature <= 0).any()):
                raise NotPositiveDefiniteError(
                    self.damping, f"CG step {self.iterations + 1} met a direction p with pᵀ(H + λI)p = "
                                  f"{float(curvature.min()):.3g} ≤ 0")
            alpha = rs[idx] / curvature
            x[idx] += alpha[:, None] * p[idx]
            r[idx] -= alpha[:, None] * ap
            rs_new = (r[idx] * r[idx]).sum(1)
            beta = rs_new / rs[idx]
            p[idx] = r[idx] + beta[:, None] * p[idx]
            rs[idx] = rs_new
            active[idx] = rs_new > threshold[idx]
            self.iterations += 1
        return x
