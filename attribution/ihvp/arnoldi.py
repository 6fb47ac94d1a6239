"""Arnoldi low-rank inverse (Schioppa, Zablotskaia, Vilar & Sokolov, "Scaling Up
Influence Functions", AAAI 2022).

Arnoldi iteration on the (symmetric, so Lanczos with full re-orthogonalisation) curvature
`G` from a seeded random start builds an orthonormal Krylov basis `Q_n ∈ ℝ^{P×n}` and
`T_n = Q_nᵀ G Q_n`; the top-`r` eigenpairs `(μ_k, y_k)` of `T_n` by magnitude `|μ_k|` (the
paper's choice; for a positive semi-definite `G` the largest) give Ritz vectors
`u_k = Q_n y_k` ≈ the top eigenvectors of `G`. The inverse is taken on that subspace only:

    (G + λI)⁻¹ v ≈ U diag(1/(μ + λ)) Uᵀ v,     U = [u_1 … u_r] ∈ ℝ^{P×r},

i.e. gradients are projected onto the top-r eigenspace (the paper's `⟨Π g_q, Π g_i⟩`
with `Π = diag(μ+λ)^{-1/2} Uᵀ`); directions outside it are dropped. With `r = n = P` (and
a start vector generic enough) this is the exact inverse. Each iteration is one pass
over the curvature rows; the iteration stops early on an invariant subspace.

Rank. A given `rank` r keeps the top r Ritz pairs of `iterations` (default 2r) Lanczos
steps — the paper's low-rank compression. `rank=None` (the default) adapts the Krylov
dimension n to the damping instead and keeps all n Ritz pairs (the Galerkin inverse on the
Krylov space): directions outside the space carry weight up to `1/λ` in the exact inverse,
so what matters is the curvature they hold relative to λ. With `tr(G)` from one pass over
the rows, `tr(G) − Σ_k θ_k = tr((I − QQᵀ) G)` is the curvature outside the space, and since
`μ/(μ + λ) ≤ μ/λ` the dropped part of the effective dimension `d_λ = tr(G (G + λI)⁻¹)` is at
most `(tr(G) − Σθ)/λ`. Lanczos grows n (checked at 64, 128, 256, … steps) until

    (tr(G) − Σ_k θ_k) / λ ≤ tol · Σ_k θ_k / (θ_k + λ),

an invariant subspace is found, or n reaches `iterations` (default: min(P, 1024) and a
1 GiB float64 basis). The uncaptured trace is stored, and a solve at a damping where the
bound exceeds `tol` (a smaller λ than fitted, or the cap reached) warns. Memory `n·P`.

Hessian. `H` is indefinite away from a minimum: Ritz values keep their sign, the inverse
uses `μ + λ`, and loading a state with a kept `μ + λ ≤ 0` raises `NotPositiveDefiniteError`.
The trace bound above needs `G ⪰ 0` (negative eigenvalues cancel in `tr(H)`), so with the
Hessian the adaptive mode runs the full `iterations` steps (or stops on an invariant
subspace) and, when that space is smaller than P, warns that no error bound is available.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from attribution.curvature import CurvatureOperator
from attribution.ihvp.base import IHVPEstimator

_BREAKDOWN = 1e-10
DEFAULT_TOL = 1e-2
FIRST_CHECK = 64  # adaptive mode: Krylov dimensions checked are 64, 128, 256, …
MAX_KRYLOV = 1024
BASIS_BUDGET = 2**27  # float64 entries of the Krylov basis in adaptive mode (1 GiB)


class ArnoldiIHVP(IHVPEstimator):
    """State: `eigenvalues` `[r]` (descending magnitude), `basis` `[r, P]` (orthonormal rows);
    adaptive mode on a positive semi-definite curvature adds `uncaptured_trace` `[1]` (`tr(G) − Σθ`)."""

    name = "arnoldi"

    def __init__(self, curvature: CurvatureOperator, damping: float, *, rank: int | None = None,
                 iterations: int | None = None, seed: int = 0, tol: float = DEFAULT_TOL) -> None:
        super().__init__(curvature, damping)
        p = curvature.num_params
        if rank is not None and rank < 1:
            raise ValueError("rank must be positive (or None: adapt to the damping)")
        if iterations is not None and (iterations < 1 or (rank is not None and iterations < rank)):
            raise ValueError("need 1 ≤ rank ≤ iterations")
        if not tol > 0:
            raise ValueError("tol must be positive")
        self.adaptive = rank is None
        if rank is None:
            cap = min(p, MAX_KRYLOV, max(BASIS_BUDGET // p, 1))
            self.iterations = min(iterations, p) if iterations is not None else cap
            self.rank = self.iterations
        else:
            self.rank = min(rank, p)
            self.iterations = min(iterations if iterations is not None else 2 * rank, p)
        self.seed = seed
        self.tol = tol
        self.error_bound = 0.0  # adaptive mode: the bound above at the last solve's damping

    def compute_state(self) -> dict[str, Tensor]:
        psd = self.curvature.positive_semidefinite
        trace = self.curvature.trace(self.train) if self.adaptive and psd else None
        values, basis = self._lanczos(trace)
        if self.adaptive and not psd and len(values) == self.iterations < self.num_params:
            warnings.warn(
                f"Arnoldi on the indefinite Hessian kept a {len(values)}-dimensional Krylov space of "
                f"{self.num_params} dimensions with no error bound (the trace bound needs a positive semi-definite "
                "curvature) — raise arnoldi_iterations, or use ihvp exact or cg", RuntimeWarning, stacklevel=2)
        order = torch.argsort(values.abs(), descending=True)
        if trace is None:
            order = order[: self.rank]
        kept = values[order]
        state = {"eigenvalues": kept.clamp(min=0) if psd else kept, "basis": basis[order]}  # [r], [r, P]
        if trace is not None:
            uncaptured = max(trace - float(state["eigenvalues"].sum()), 0.0)
            state["uncaptured_trace"] = torch.tensor([uncaptured], dtype=torch.float64)
        return state

    def _lanczos(self, trace: float | None) -> tuple[Tensor, Tensor]:
        """Ritz values `[n]` and Ritz vectors `[n, P]` of the Krylov space built; with `trace`
        (adaptive mode) it stops once the uncaptured-trace bound meets `tol`."""
        p = self.num_params
        gen = torch.Generator().manual_seed(self.seed)
        start = torch.randn(p, generator=gen, dtype=torch.float64)
        basis = [start / start.norm()]
        projected = torch.zeros(self.iterations, self.iterations, dtype=torch.float64)
        check = FIRST_CHECK
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
            if trace is not None and j + 1 == check:
                check *= 2
                if self._captured(torch.linalg.eigvalsh(self._tridiagonal(projected, j + 1)), trace):
                    break
            projected[j + 1, j] = norm
            basis.append(w / norm)
        t = self._tridiagonal(projected, len(basis))
        values, vectors = torch.linalg.eigh(t)
        return values, vectors.T @ torch.stack(basis)

    @staticmethod
    def _tridiagonal(projected: Tensor, n: int) -> Tensor:
        t = projected[:n, :n]
        return 0.5 * (t + t.T)

    def bound(self, values: Tensor, uncaptured: float) -> float:
        """`(tr(G) − Σθ)/λ ÷ Σ θ/(θ + λ)`: dropped vs kept effective dimension (upper bound)."""
        theta = values.clamp(min=0)
        kept = float((theta / (theta + self.damping)).sum())
        return uncaptured / self.damping / kept if kept > 0 else float("inf")

    def _captured(self, values: Tensor, trace: float) -> bool:
        return self.bound(values, max(trace - float(values.clamp(min=0).sum()), 0.0)) <= self.tol

    def load_state(self, state: dict[str, Tensor]) -> None:
        super().load_state(state)
        self.require_positive_definite(self.state["eigenvalues"])

    def _solve(self, vectors: Tensor) -> Tensor:
        basis = self.state["basis"]
        if "uncaptured_trace" in self.state:
            self.error_bound = self.bound(self.state["eigenvalues"], float(self.state["uncaptured_trace"][0]))
            if self.error_bound > self.tol:
                warnings.warn(
                    f"Arnoldi: the Krylov space ({basis.shape[0]} vectors) leaves curvature "
                    f"{float(self.state['uncaptured_trace'][0]):.3g} outside; its dropped effective dimension "
                    f"may reach {self.error_bound:.2g} × the kept one at damping {self.damping:.3g} (tol {self.tol:g}) "
                    f"— raise arnoldi_iterations or the damping", RuntimeWarning, stacklevel=3)
        coords = vectors.to(basis.dtype) @ basis.T  # [M, r]
        return (coords / (self.state["eigenvalues"] + self.damping)) @ basis
