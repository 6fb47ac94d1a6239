"""Inverse-Hessian-vector-product estimators `V ↦ (G + λI)⁻¹ V`, one module each.

`IHVPName` lists them; `build_estimator` constructs one from its name and knobs. With the
Hessian curvature (`CurvatureName.HESSIAN`, indefinite) exact, cg and arnoldi apply and
raise `NotPositiveDefiniteError` when `H + λI` is not positive definite; lissa, kfac and
ekfac refuse it (each module says why).
"""

from __future__ import annotations

from enum import StrEnum

from attribution.curvature import CurvatureOperator
from attribution.ihvp.arnoldi import DEFAULT_TOL as ARNOLDI_TOL
from attribution.ihvp.arnoldi import ArnoldiIHVP
from attribution.ihvp.base import IHVPEstimator, NotPositiveDefiniteError
from attribution.ihvp.block_exact import BlockDiagonalExactIHVP
from attribution.ihvp.cg import ConjugateGradientIHVP
from attribution.ihvp.ekfac import EKFACIHVP
from attribution.ihvp.exact import DEFAULT_MAX_PARAMS, ExactIHVP
from attribution.ihvp.kfac import KFACIHVP
from attribution.ihvp.lissa import DEFAULT_TOL as LISSA_TOL
from attribution.ihvp.lissa import LissaDivergenceError, LissaIHVP


class IHVPName(StrEnum):
    EXACT = "exact"
    CG = "cg"
    LISSA = "lissa"
    ARNOLDI = "arnoldi"
    KFAC = "kfac"
    EKFAC = "ekfac"


def build_estimator(
    name: IHVPName | str,
    curvature: CurvatureOperator,
    damping: float,
    *,
    exact_max_params: int = DEFAULT_MAX_PARAMS,
    cg_max_iter: int = 100,
    cg_tol: float = 1e-5,
    lissa_depth: int = 1000,
    lissa_scale: float | None = None,
    lissa_repeats: int = 1,
    arnoldi_rank: int | None = None,
    arnoldi_iterations: int | None = None,
    seed: int = 0,
    lissa_tol: float = LISSA_TOL,
    arnoldi_tol: float = ARNOLDI_TOL,
) -> IHVPEstimator:
    """The estimator called `name` over `curvature` with damping `λ = damping`.

    `lissa_depth` caps LiSSA's recursion, which stops once its error bound meets
    `lissa_tol`; `arnoldi_rank=None` adapts Arnoldi's Krylov dimension to the damping
    (`arnoldi_tol`, at most `arnoldi_iterations` steps), an integer keeps that many Ritz
    pairs of `arnoldi_iterations` (default 2 × rank) steps. See each estimator's module."""
    kind = IHVPName(name)
    if kind is IHVPName.EXACT:
        return ExactIHVP(curvature, damping, max_params=exact_max_params)
    if kind is IHVPName.CG:
        return ConjugateGradientIHVP(curvature, damping, max_iter=cg_max_iter, tol=cg_tol)
    if kind is IHVPName.LISSA:
        return LissaIHVP(curvature, damping, depth=lissa_depth, scale=lissa_scale, repeats=lissa_repeats, seed=seed,
                         tol=lissa_tol)
    if kind is IHVPName.ARNOLDI:
        return ArnoldiIHVP(curvature, damping, rank=arnoldi_rank, iterations=arnoldi_iterations, seed=seed,
                           tol=arnoldi_tol)
    if kind is IHVPName.KFAC:
        return KFACIHVP(curvature, damping)
    return EKFACIHVP(curvature, damping)


__all__ = [
    "EKFACIHVP",
    "KFACIHVP",
    "ArnoldiIHVP",
    "BlockDiagonalExactIHVP",
    "ConjugateGradientIHVP",
    "ExactIHVP",
    "IHVPEstimator",
    "IHVPName",
    "LissaDivergenceError",
    "LissaIHVP",
    "NotPositiveDefiniteError",
    "build_estimator",
]
