"""LiSSA: a truncated, stochastic Neumann series for `(G + λI)⁻¹` (Agarwal et al. 2017;
Koh & Liang 2017).

With `B = G + λI` and a scale `α` such that `α(G_b + λI) ⪯ I` for every mini-batch
curvature `G_b`,

    h₀ = v,  h_j = v + (I − α(G_{b_j} + λI)) h_{j−1},  (G + λI)⁻¹ v ≈ α·h_j,

since `α Σ_j (I − αB)^j = B⁻¹`; `repeats` independent recursions (different mini-batch
orders) are averaged.

Scale. `scale=None` (the default, and only then is anything fitted) sets
`α = 1 / (1.1·(μ̂ + λ))` from a 30-step power-iteration estimate `μ̂` of the top eigenvalue
of `G` (the fitted state), so `αB ⪯ I` up to a 10% underestimate of `μ̂` and the recursion
contracts. Divergence check: while every step is non-expansive, `‖h_j‖ ≤ (j+1)‖v‖`; a
violation (or a non-finite value) means the scale is too large — an automatic scale is
then halved and the recursion restarted (up to 6 times), a user-given scale raises
`LissaDivergenceError`.

Depth. In eigendirection k the step change `Δ_j = h_j − h_{j−1} = (I − αB)^j v` shrinks by
`1 − α(μ_k + λ)` per step, so the slowest direction contracts by `1 − αλ` and the tail is
bounded by the current step (full-batch recursion; `B` and `I − αB` commute):

    ‖h_∞ − h_j‖ = ‖(I − αB)(αB)⁻¹ Δ_j‖ ≤ ‖Δ_j‖ (1 − αλ)/(αλ).

The recursion stops once this bound is at most `tol·‖h_j‖` for every right-hand side
(relative error ≤ `tol`), or at `depth` steps, the cap. Worst case it needs about
`κ' ln(κ'/tol)` steps with `κ' = 1/(αλ) ≈ 1.1 κ` and `κ = (μ̂ + λ)/λ` the condition number
(`required_depth`), so small dampings on flat spectra are expensive: at κ = 10⁴ about
1.5·10⁵ steps. When the cap stops an unconverged recursion a `RuntimeWarning` gives the
bound reached and the estimated depth needed (raise `depth` or the damping, or use CG,
whose Krylov iterations need about √κ). `tol=0` runs exactly `depth` steps. With several
mini-batches the bound is a heuristic: mini-batch noise keeps `Δ_j` from vanishing, so such
recursions usually run to the cap. After each solve `steps`, `converged` and
`error_bound` (the bound on the relative error) describe the last recursion.

The curvature rows (the first `max_rows` of the set) are held in memory as batches.

Positive semi-definite curvatures only (Gauss-Newton, Fisher): the depth bound assumes every
eigenvalue `μ ≥ 0` (slowest contraction `1 − αλ`), and the divergence check only catches
super-linear growth. With an indefinite Hessian both fail silently (tanh MLP, 60 rows, 59
parameters, `μ_min(H) = −0.011`): at λ = 1.5|μ_min| the recursion declared convergence at
tol 0.01 with a true relative error of 0.029; at λ = 0.5|μ_min| (`H + λI` indefinite) the
automatic scale's divergence (step 1,168) was absorbed by halving the scale, and the solve
returned with a relative error of 1.01 behind a mere depth-cap warning. A `ValueError`
therefore refuses the Hessian.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from attribution.curvature import CurvatureOperator
from attribution.data import Batch
from attribution.ihvp.base import IHVPEstimator
from attribution.interrupts import check_interrupt

_POWER_ITERATIONS = 30
_AUTO_SAFETY = 1.1
_MAX_RESCALES = 6
DEFAULT_TOL = 1e-2


class LissaDivergenceError(ValueError):
    pass


class LissaIHVP(IHVPEstimator):
    """Stochastic Neumann recursion; state: `top_eigenvalue` `[1]` (power iteration on `G`)."""

    name = "lissa"

    def __init__(self, curvature: CurvatureOperator, damping: float, *, depth: int = 1000,
                 scale: float | None = None, repeats: int = 1, seed: int = 0, tol: float = DEFAULT_TOL) -> None:
        super().__init__(curvature, damping)
        if not curvature.positive_semidefinite:
            raise ValueError(f"LiSSA needs a positive semi-definite curvature; the {curvature.kind.value} curvature "
                             "is indefinite (its recursion's stopping and divergence checks fail silently) — use "
                             "ihvp exact, cg or arnoldi, or curvature gauss_newton")
        if depth < 1 or repeats < 1:
            raise ValueError("depth and repeats must be positive")
        if scale is not None and not scale > 0:
            raise ValueError("scale must be positive")
        if not tol >= 0:
            raise ValueError("tol must be non-negative")
        self.depth = depth
        self.scale = scale
        self.repeats = repeats
        self.seed = seed
        self.tol = tol
        self.steps = 0  # steps taken by the last solve (the longest of its repeats)
        self.converged = False  # whether the last solve met `tol` before the cap
        self.error_bound = math.inf  # bound on the last solve's relative error (full batch)
        self._batches: list[Batch] | None = None

    def compute_state(self) -> dict[str, Tensor]:
        if self.scale is not None:
            return {}
        gen = torch.Generator().manual_seed(self.seed)
        v = torch.randn(1, self.num_params, generator=gen, dtype=torch.float64)
        top = 0.0
        for _ in range(_POWER_ITERATIONS):
            v = v / v.norm()
            gv = self.curvature.matvec(self.train, v).double().cpu()
            top = float((v * gv).sum())
            v = gv
        return {"top_eigenvalue": torch.tensor([top], dtype=torch.float64)}

    def auto_scale(self) -> float:
        """`α = 1 / (1.1 (μ̂ + λ))` from the fitted top-eigenvalue estimate."""
        return 1.0 / (_AUTO_SAFETY * (max(float(self.state["top_eigenvalue"][0]), 0.0) + self.damping))

    def required_depth(self) -> int:
        """A-priori worst-case steps for the bound to reach `tol` (full batch): the bound is
        at most `κ' (1 − αλ)^j`, `κ' = 1/(αλ)`, so `j ≈ κ' ln(κ'/tol)`."""
        alpha = self.scale if self.scale is not None else self.auto_scale()
        slowest = min(alpha * self.damping, 1.0 - 1e-12)  # contraction 1 − αλ of the slowest direction
        return math.ceil(math.log(max(1.0 / (slowest * max(self.tol, 1e-12)), 1.0)) / -math.log1p(-slowest))

    def _curvature_batches(self) -> list[Batch]:
        if self._batches is None:
            self._batches = list(self.curvature.batches(self.train))
            if not self._batches:
                raise ValueError("the training set is empty")
        return self._batches

    def _solve(self, vectors: Tensor) -> Tensor:
        if self.scale is not None:
            out = self._average(vectors, self.scale, auto=False)
        else:
            scale = self.auto_scale()
            for _ in range(_MAX_RESCALES):
                try:
                    out = self._average(vectors, scale, auto=True)
                    break
                except LissaDivergenceError:
                    scale /= 2
            else:
                raise LissaDivergenceError(f"LiSSA diverged even after halving its scale {_MAX_RESCALES} times")
        if self.tol > 0 and not self.converged:
            warnings.warn(
                f"LiSSA stopped at its depth cap ({self.depth} steps) with a relative error bound "
                f"{self.error_bound:.2g} > tol {self.tol:g}; about {self.required_depth():,} steps would be needed "
                f"at damping {self.damping:.3g} — raise lissa_depth or the damping, or use cg",
                RuntimeWarning, stacklevel=3)
        return out

    def _average(self, vectors: Tensor, scale: float, *, auto: bool) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        total = torch.zeros_like(vectors, dtype=torch.float64)
        steps, converged, bound = 0, True, 0.0
        for _ in range(self.repeats):
            h, taken, bound_r = self._recursion(vectors.double(), scale, gen, auto=auto)
            total += h
            steps, bound = max(steps, taken), max(bound, bound_r)
            converged = converged and bound_r <= self.tol
        self.steps, self.converged, self.error_bound = steps, converged and self.tol > 0, bound
        return total / self.repeats

    def _recursion(self, v: Tensor, scale: float, gen: torch.Generator, *,
                   auto: bool) -> tuple[Tensor, int, float]:
        """`(α h, steps, relative error bound)`; rows that meet `tol` stop early."""
        batches = self._curvature_batches()
        v_norm = v.norm(dim=1)
        h = v.clone()
        tail = (1.0 - scale * self.damping) / (scale * self.damping)  # ‖h_∞ − h_j‖ ≤ tail · ‖Δ_j‖
        bounds = torch.full((v.shape[0],), math.inf, dtype=torch.float64, device=v.device)
        active = torch.arange(v.shape[0], device=v.device)
        order = torch.randperm(len(batches), generator=gen)
        step = 0
        for step in range(1, self.depth + 1):
            check_interrupt()
            batch = batches[int(order[(step - 1) % len(batches)])]
            ha = h[active]
            g_h = self.curvature.batch_matvec(batch, ha).double() / len(batch)
            new = v[active] + ha - scale * (g_h + self.damping * ha)
            norms = new.norm(dim=1)
            if not torch.isfinite(new).all() or bool((norms > 1.01 * (step + 1) * v_norm[active]).any()):
                message = f"LiSSA diverged at step {step} with scale {scale:.3g}"
                if auto:
                    raise LissaDivergenceError(message)
                raise LissaDivergenceError(f"{message}; use a smaller lissa_scale (or leave it unset)")
            bounds[active] = max(tail, 0.0) * (new - ha).norm(dim=1) / norms.clamp(min=torch.finfo(new.dtype).tiny)
            h[active] = new
            if self.tol > 0:
                active = active[bounds[active] > self.tol]
                if len(active) == 0:
                    break
            if (step % len(batches)) == 0:
                order = torch.randperm(len(batches), generator=gen)
        return scale * h, step, float(bounds.max()) if len(bounds) else 0.0
