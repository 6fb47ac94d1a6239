"""Arnoldi low-rank inverse (Schioppa, Zablotskaia, Vilar & Sokolov, "Scaling Up
Influence Functions", AAAI 2022).

Arnoldi iteration on the (symmetric, so Lanczos with full re-orthogonalisation) curvature
`G` from a seeded random start builds an orthonormal Krylov basis `Q_n ∈ ℝ^{P×n}` and
`T_n = Q_nᵀ G Q_n`; the top-`r` eigenpairs `(μ_k, y_k)` of `T_n` give Ritz vectors
`u_k = Q_n y_k` ≈ the top eigenvectors of `G`. The inverse is taken on that subspace only:

    (G + λI)⁻¹ v ≈ U diag(1/(μ + λ)) Uᵀ v,     U = [u_1 … u_r] ∈ ℝ^{P×r},

i.e. gradients are projected onto the top-r eigenspace (the paper's `⟨Π g_q, Π g_i⟩`
with `Π = diag(μ+λ)^{-1/2} Uᵀ`); directions outside it are dropped. With `r = n = P` (and
a start vector generic enough) this is the exact inverse. Each iteration is one pass
over the curvature rows; the iteration stops early on an invariant subspace.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attribution.curvature import CurvatureOperator
from attribution.ihvp.base import IHVPEstimator

_BREAKDOWN = 1e-10


class ArnoldiIHVP(IHVPEstimator):
    """State: `eigenvalues` `[r]` (descending), `basis` `[r, P]` (orthonormal rows)."""

    name = "arnoldi"

    def __init__(self, curvature: CurvatureOperator, damping: float, *, rank: int = 64,
                 iterations: int = 128, seed: int = 0) -> None:
        super().__init__(curvature, damping)
        if rank < 1 or iterations < rank:
            raise ValueError("need 1 ≤ rank ≤ iterations")
        self.rank = min(rank, curvature.num_params)
        self.iterations = min(iterations, curvature.num_params)
        self.seed = seed

    def compute_state(self) -> dict[str, Tensor]:
        p = self.num_params
        gen = torch.Generator().manual_seed(self.seed)
        start = torch.randn(p, generator=gen, dtype=torch.float64)
        basis = [start / start.norm()]
        projected = torch.zeros(self.iterations, self.iterations, dtype=torch.float64)
        for j in range(self.iterations):
            w = self.curvature.matvec(self.train, basis[j][None]).double().cpu()[0]
            scale = w.norm()
            q = torch.stack(basis)
            for _ in range(2):  # re-orthogonalise twice (Gram–Schmidt, "twice is enough")
                coeffs = q @ w
                w = w - coeffs @ q
                projected[: len(basis), j] += coeffs
            norm = w.norm()
            if j + 1 == self.iterations or norm <= _BREAKDOWN * max(float(scale), 1.0):
                break
            projected[j + 1, j] = norm
            basis.append(w / norm)
        n = len(basis)
        t = projected[:n, :n]
        values, vectors = torch.linalg.eigh(0.5 * (t + t.T))
        top = torch.argsort(values, descending=True)[: self.rank]
        ritz = vectors[:, top].T @ torch.stack(basis)  # [r, P]
        return {"eigenvalues": values[top].clamp(min=0), "basis": ritz}

    def _solve(self, vectors: Tensor) -> Tensor:
        basis = self.state["basis"]
        coords = vectors.to(basis.dtype) @ basis.T  # [M, r]
        return (coords / (self.state["eigenvalues"] + self.damping)) @ basis
