"""LiSSA: a truncated, stochastic Neumann series for `(G + λI)⁻¹` (Agarwal et al. 2017;
Koh & Liang 2017).

With a scale `α` such that `α(G_b + λI) ⪯ I` for every mini-batch curvature `G_b`,

    h₀ = v,  h_j = v + (I − α(G_{b_j} + λI)) h_{j−1},  (G + λI)⁻¹ v ≈ α·h_depth,

since `α Σ_j (I − α(G+λI))^j = (G+λI)⁻¹`; `repeats` independent recursions (different
mini-batch orders) are averaged. The error decays like `(1 − α(μ_min + λ))^depth`, so
depth must grow with the condition number `(μ_max + λ)/λ`.

`scale=None` picks (and only then is anything fitted) `α = 1 / (1.1·(μ̂_max + λ))` from a power-iteration estimate `μ̂_max`
of the top eigenvalue of `G` (the fitted state). Divergence check: while every step is
non-expansive, `‖h_j‖ ≤ (j+1)‖v‖`; a violation (or a non-finite value) means the scale is
too large — an automatic scale is then halved and the recursion restarted (up to 6
times), a user-given scale raises `ValueError`.

The curvature rows (the first `max_rows` of the set) are held in memory as batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attribution.curvature import CurvatureOperator
from attribution.data import Batch
from attribution.ihvp.base import IHVPEstimator

_POWER_ITERATIONS = 30
_AUTO_SAFETY = 1.1
_MAX_RESCALES = 6


class LissaDivergenceError(ValueError):
    pass


class LissaIHVP(IHVPEstimator):
    """Stochastic Neumann recursion; state: `top_eigenvalue` `[1]` (power iteration on `G`)."""

    name = "lissa"

    def __init__(self, curvature: CurvatureOperator, damping: float, *, depth: int = 1000,
                 scale: float | None = None, repeats: int = 1, seed: int = 0) -> None:
        super().__init__(curvature, damping)
        if depth < 1 or repeats < 1:
            raise ValueError("depth and repeats must be positive")
        if scale is not None and not scale > 0:
            raise ValueError("scale must be positive")
        self.depth = depth
        self.scale = scale
        self.repeats = repeats
        self.seed = seed
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

    def _curvature_batches(self) -> list[Batch]:
        if self._batches is None:
            self._batches = list(self.curvature.batches(self.train))
            if not self._batches:
                raise ValueError("the training set is empty")
        return self._batches

    def _solve(self, vectors: Tensor) -> Tensor:
        if self.scale is not None:
            return self._average(vectors, self.scale, auto=False)
        top = float(self.state["top_eigenvalue"][0])
        scale = 1.0 / (_AUTO_SAFETY * (max(top, 0.0) + self.damping))
        for _ in range(_MAX_RESCALES):
            try:
                return self._average(vectors, scale, auto=True)
            except LissaDivergenceError:
                scale /= 2
        raise LissaDivergenceError(f"LiSSA diverged even after halving its scale {_MAX_RESCALES} times")

    def _average(self, vectors: Tensor, scale: float, *, auto: bool) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        total = torch.zeros_like(vectors, dtype=torch.float64)
        for _ in range(self.repeats):
            total += self._recursion(vectors.double(), scale, gen, auto=auto)
        return total / self.repeats

    def _recursion(self, v: Tensor, scale: float, gen: torch.Generator, *, auto: bool) -> Tensor:
        batches = self._curvature_batches()
        v_norm = v.norm(dim=1)
        h = v.clone()
        order = torch.randperm(len(batches), generator=gen)
        for j in range(1, self.depth + 1):
            batch = batches[int(order[(j - 1) % len(batches)])]
            g_h = self.curvature.batch_matvec(batch, h).double() / len(batch)
            h = v + h - scale * (g_h + self.damping * h)
            if not torch.isfinite(h).all() or bool((h.norm(dim=1) > 1.01 * (j + 1) * v_norm).any()):
                message = f"LiSSA diverged at step {j} with scale {scale:.3g}"
                if auto:
                    raise LissaDivergenceError(message)
                raise LissaDivergenceError(f"{message}; use a smaller lissa_scale (or leave it unset)")
            if (j % len(batches)) == 0:
                order = torch.randperm(len(batches), generator=gen)
        return scale * h
