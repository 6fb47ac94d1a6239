"""Inverse-Hessian-vector-product estimators `V ↦ (G + λI)⁻¹ V`, one module each.

`IHVPName` lists them; `build_estimator` constructs one from its name and knobs.
"""

from __future__ import annotations

from enum import StrEnum

from attribution.curvature import CurvatureOperator
from attribution.ihvp.arnoldi import ArnoldiIHVP
from attribution.ihvp.base import IHVPEstimator
from attribution.ihvp.cg import ConjugateGradientIHVP
from attribution.ihvp.ekfac import EKFACIHVP
from attribution.ihvp.exact import DEFAULT_MAX_PARAMS, ExactIHVP
from attribution.ihvp.kfac import KFACIHVP
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
    arnoldi_rank: int = 64,
    arnoldi_iterations: int = 128,
    seed: int = 0,
) -> IHVPEstimator:
    """The estimator called `name` over `curvature` with damping `λ = damping`."""
    kind = IHVPName(name)
    if kind is IHVPName.EXACT:
        return ExactIHVP(curvature, damping, max_params=exact_max_params)
    if kind is IHVPName.CG:
        return ConjugateGradientIHVP(curvature, damping, max_iter=cg_max_iter, tol=cg_tol)
    if kind is IHVPName.LISSA:
        return LissaIHVP(curvature, damping, depth=lissa_depth, scale=lissa_scale, repeats=lissa_repeats, seed=seed)
    if kind is IHVPName.ARNOLDI:
        return ArnoldiIHVP(curvature, damping, rank=arnoldi_rank, iterations=arnoldi_iterations, seed=seed)
    if kind is IHVPName.KFAC:
        return KFACIHVP(curvature, damping)
    return EKFACIHVP(curvature, damping)


__all__ = [
    "EKFACIHVP",
    "KFACIHVP",
    "ArnoldiIHVP",
    "ConjugateGradientIHVP",
    "ExactIHVP",
    "IHVPEstimator",
    "IHVPName",
    "LissaDivergenceError",
    "LissaIHVP",
    "build_estimator",
]
