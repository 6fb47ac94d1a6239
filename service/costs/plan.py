"""The phases of one attribution job, per method (`service.costs.model` turns them into seconds).

`plan(method, params, shape)` lists what the method runs for N training rows, Q query samples
and a model with P parameters — how many rows each phase touches and how many times — read
from the same code paths the methods take (module docstrings of each method):

- forward_inf: base losses L(θ̂, z_i) (forward N, cached `base_losses`), base log-losses for a
  classifier's relative scores (forward N, cached), RelatIF gradient norms (gradient directions
  over N, cached `relative_norm`), K unlearning steps (a backward of the query loss and an
  optimizer step each; per_sample: per query copy), the sweep (forward N × 1, or × Q per_sample).
  Self-influence: each row unlearned alone (gradient N × K, forward N), or gradient norms.
  `auto`: a cached search over ≤ 3,000 rows. Newton unlearning as influence below; `stop:
  forgotten` at its cap K (an upper bound).
- influence / integrated_influence / Newton: the curvature trace for the default damping
  (per-output pseudo-gradients over F rows, cached; none for EK-FAC, whose default damping reads
  the trace off its fitted eigenvalues), the estimator's fit (exact: pseudo-gradients,
  dense F × P², eigh P³; kfac/ekfac: 1/2 layer-statistics passes over F; arnoldi: F × iterations curvature
  products; lissa: power iterations; cg: none; cached `ihvp_fit`), per-query solves (cg:
  `cg_max_iter` curvature passes over F rows — an upper bound, CG stops at its tolerance; lissa:
  depth × repeats batches; factored estimators: products with the fit), the gradient sweep over
  N; relative scores (the default) solve one system per training row (cached `relative_norm`).
- tracin / gradient_similarity: per checkpoint a gradient sweep over N (+ projection; the cosine
  takes gradient directions), relative norms another (cached); trak: per checkpoint featurise N
  rows (gradient + projection), the kernel k×k (dense N × k², Cholesky k³), loss weights
  (forward N), all cached `trak_features`; trackstar: second moment (gradient over fit_rows),
  features (gradient + projection over N), cached as files; a query is its Q gradients and an
  N × k product. Random projection matrices are drawn once per projector, or per batch when
  P·k is too large to keep; cached artifacts are (de)serialised every query (`READ`).
- any other method: one per-sample gradient pass (with a note saying so).

F = min(N, fit_rows) rows fit the curvature. Forward passes cost the whole model's P; gradients,
curvature, projections and solves cost P_d, the parameters the method differentiates
(`JobShape.differentiated`: `layers` / `last_layer` resolved on the registered model's
structure, `service.costs.tracked`; P when unknown, an over-estimate).
"""

from __future__ import annotations

import math

from attribution.curvature import CurvatureName
from attribution.ihvp.arnoldi import BASIS_BUDGET, MAX_KRYLOV
from attribution.methods.base import MethodName, MethodParams, Normalize
from attribution.methods.forward_inf_auto import DEFAULT_SPACE
from attribution.methods.forward_inf_params import ForwardInfParams, SelfInfluenceMode, StopRule
from attribution.methods.gradient_features import GradientFeatureParams
from attribution.methods.influence import IHVPChoice, IHVPParams
from attribution.methods.integrated_influence import Baseline, IntegratedInfluenceParams
from attribution.methods.trackstar import TrackStarParams
from attribution.methods.trak import TrakParams
from service.costs.model import JobShape, MemorySizes, PassKind, Phase, read_phase
from service.costs.plan_features import feature_dim, gradient_dots, trackstar, trak

AUTO_ROWS = 3000  # forward_inf_auto's subset of training rows
AUTO_QUERIES = 32
LISSA_POWER_ITERATIONS = 30
SOLVE_BLOCK = 512  # rows solved together for relative norms / self-influence


def plan(method: str, params: MethodParams, shape: JobShape) -> tuple[list[Phase], list[str]]:
    """`(phases, notes)` of a job; `params` is the method's parsed params dataclass. A method this
    module has no plan for is estimated as a gradient method (`_generic`), and says so."""
    try:
        name = MethodName(method)
    except ValueError:
        return _generic(method, params, shape)
    if name is MethodName.FORWARD_INF and isinstance(params, ForwardInfParams):
        return _forward_inf(params, shape)
    if name is MethodName.INTEGRATED_INFLUENCE and isinstance(params, IntegratedInfluenceParams):
        return _integrated_influence(params, shape)
    if name is MethodName.INFLUENCE and isinstance(params, IHVPParams):
        return _influence(params, shape)
    if name is MethodName.TRAK and isinstance(params, TrakParams):
        return trak(params, shape)
    if name is MethodName.TRACKSTAR and isinstance(params, TrackStarParams):
        return trackstar(params, shape)
    if name in (MethodName.TRACIN, MethodName.GRADIENT_SIMILARITY) and isinstance(params, GradientFeatureParams):
        return gradient_dots(name, params, shape)
    return _generic(method, params, shape)


def _generic(method: str, params: MethodParams, shape: JobShape) -> tuple[list[Phase], list[str]]:
    """One per-sample gradient pass over the N rows and the Q queries (most methods' floor)."""
    size = shape.differentiated
    phases = [Phase("query_gradients", PassKind.GRADIENT, shape.num_queries, 1, size),
              Phase("score_sweep", PassKind.GRADIENT, shape.num_rows, 1, size, None, params.batch_size)]
    return phases, [f"no cost model for method {method}: estimated as one per-sample gradient pass over the rows"]


def memory_sizes(method: str, params: MethodParams, shape: JobShape, phases: list[Phase]) -> MemorySizes:
    """The byte sizes peak memory grows with (see `service.costs.model.MemorySizes`)."""
    n, p = shape.num_rows, shape.differentiated
    scored = shape.num_queries if shape.per_sample and not shape.self_influence else 1
    kinds = {phase.kind for phase in phases}
    gradient_rows = min(n, params.batch_size) if kinds & {PassKind.GRADIENT, PassKind.DIRECTION} else 0
    fit_batch = getattr(params, "fit_batch_size", params.batch_size)
    curvature_rows = min(n, fit_batch) if kinds & {PassKind.PSEUDO_GRADIENT, PassKind.CURVATURE} else 0
    features = dense = 0
    k = feature_dim(params, p)
    if method == MethodName.TRAK.value:
        features = n * k * 4
        dense = k * k * 8 * 2
    if isinstance(params, IHVPParams) and _uses_ihvp(method, params):
        ihvp = resolve_ihvp(params, shape)
        if ihvp is IHVPChoice.EXACT:
            dense = p * p * 8 * 2
        elif ihvp is IHVPChoice.ARNOLDI:
            dense = _arnoldi_iterations(params, p) * p * 8
    return MemorySizes(parameters=shape.num_parameters * 4, score_rows=n * 4 * (scored + 2), gradient_batch=gradient_rows * p * 4,
                       curvature_batch=curvature_rows * p * 4, features=features, dense=dense)


# ------------------------------------------------------------------------- forward_inf
def _forward_inf(params: ForwardInfParams, shape: JobShape) -> tuple[list[Phase], list[str]]:
    p = params.for_task(shape.task).resolved()
    n, q, size, batch = shape.num_rows, shape.num_queries, shape.differentiated, p.batch_size
    full = shape.num_parameters  # forward passes run the whole model
    notes: list[str] = []
    phases = [Phase("base_losses", PassKind.FORWARD, n, 1, full, "base_losses", batch),
              read_phase("read_base_losses", n * 4)]
    if p.newton:
        phases += _ihvp_phases(p, shape)
        relative = p.normalize == Normalize.RELATIVE
        if shape.self_influence or relative:
            phases += _row_solves("relative_norm" if relative else "self_influence", p, shape)
        if not shape.self_influence:
            phases += _query_solves(p, shape)
            phases.append(Phase("sweep", PassKind.FORWARD, n, q if shape.per_sample else 1, full, None, batch))
        return phases, notes
    if p.auto:
        rows = min(n, AUTO_ROWS)
        queries = min(AUTO_QUERIES, rows)
        steps = sum(c.steps for c in DEFAULT_SPACE)
        phases += [
            Phase("auto_norms", PassKind.DIRECTION, rows, 1, size, "auto_choice", batch),
            Phase("auto_unlearning", PassKind.GRADIENT, queries, steps, size, "auto_choice"),
            Phase("auto_sweeps", PassKind.FORWARD, rows, queries * len(DEFAULT_SPACE), full, "auto_choice", batch),
        ]
        notes.append("auto: the main phases assume the relative default (normalized_sgd, K = 1); the search "
                     "result is cached per model and dataset")
    steps = p.k
    if p.stop == StopRule.FORGOTTEN:
        notes.append(f"stop=forgotten: K = {steps} is a cap; the estimate assumes every step is taken (an upper bound)")
    if shape.self_influence:
        if p.self_influence_mode == SelfInfluenceMode.GRADIENT_NORM:
            phases.append(Phase("self_influence", PassKind.DIRECTION, n, 1, size, "self_influence", batch))
        else:
            phases += [Phase("self_influence_unlearning", PassKind.GRADIENT, n, steps, size, "self_influence"),
                       Phase("self_influence_losses", PassKind.FORWARD, n, 1, full, "self_influence")]
        return phases, notes
    relative = p.normalize == Normalize.RELATIVE or p.auto
    if relative and shape.task == "classification":
        phases.append(Phase("base_log_losses", PassKind.FORWARD, n, 1, full, "base_log_losses", batch))
    if relative:
        phases.append(Phase("relative_norm", PassKind.DIRECTION, n, 1, size, "relative_norm", batch))
        phases.append(read_phase("read_relative_norm", n * 16))
    copies = q if shape.per_sample else 1
    phases += [
        Phase("unlearning", PassKind.STEP, copies, steps, size, None, copies),  # a batch per step: its overhead
        Phase("sweep", PassKind.FORWARD, n, copies, full, None, batch),
    ]
    return phases, notes


# ------------------------------------------------------------------------- iHVP methods
def _uses_ihvp(method: str, params: MethodParams) -> bool:
    if isinstance(params, ForwardInfParams):
        return params.newton
    return method in (MethodName.INFLUENCE.value, MethodName.INTEGRATED_INFLUENCE.value)


def resolve_ihvp(params: IHVPParams, shape: JobShape) -> IHVPChoice:
    """`influence.resolve_ihvp` from the shape: auto → exact (P ≤ exact_max_params), else ekfac
    when K-FAC factors every parameter (never for the Hessian), else cg."""
    choice = IHVPChoice(params.ihvp)
    if choice is not IHVPChoice.AUTO:
        return choice
    if shape.differentiated <= params.exact_max_params:
        return IHVPChoice.EXACT
    if CurvatureName(params.curvature) is CurvatureName.HESSIAN or not shape.kfac_supported:
        return IHVPChoice.CG
    return IHVPChoice.EKFAC


def _fit_rows(params: IHVPParams, shape: JobShape) -> int:
    return min(shape.num_rows, params.fit_rows) if params.fit_rows is not None else shape.num_rows


def _arnoldi_iterations(params: IHVPParams, size: int) -> int:
    if params.arnoldi_rank is None:
        cap = min(size, MAX_KRYLOV, max(BASIS_BUDGET // max(size, 1), 1))
        return min(params.arnoldi_iterations, size) if params.arnoldi_iterations is not None else cap
    return min(params.arnoldi_iterations or 2 * params.arnoldi_rank, size)


def _ihvp_phases(params: IHVPParams, shape: JobShape, *, artifact: str = "ihvp_fit") -> list[Phase]:
    """Curvature trace (default damping; EK-FAC reads tr(G) off its fitted eigenvalues instead,
    `influence.fitted_estimator`) and the estimator's fit, both cached."""
    size, fit, batch = shape.differentiated, _fit_rows(params, shape), params.fit_batch_size
    phases = []
    ihvp = resolve_ihvp(params, shape)
    if params.damping is None and ihvp is not IHVPChoice.EKFAC:
        phases.append(Phase("curvature_trace", PassKind.PSEUDO_GRADIENT, fit, 1, size, "curvature_trace", batch))
    if ihvp is IHVPChoice.EXACT:
        phases += [Phase("curvature_pseudo_gradients", PassKind.PSEUDO_GRADIENT, fit, 1, size, artifact, batch),
                   Phase("curvature_dense", PassKind.DENSE, fit, 1, size * size, artifact),
                   Phase("curvature_eigh", PassKind.EIGEN, 1, 1, size ** 3, artifact)]
    elif ihvp in (IHVPChoice.KFAC, IHVPChoice.EKFAC):
        passes = 2 if ihvp is IHVPChoice.EKFAC else 1
        phases.append(Phase("kronecker_factors", PassKind.KRONECKER, fit, passes, size, artifact, batch))
    elif ihvp is IHVPChoice.ARNOLDI:
        phases.append(Phase("arnoldi", PassKind.CURVATURE, fit, _arnoldi_iterations(params, size), size, artifact,
                            batch))
    elif ihvp is IHVPChoice.LISSA and params.lissa_scale is None:
        phases.append(Phase("lissa_scale", PassKind.CURVATURE, fit, LISSA_POWER_ITERATIONS, size, artifact, batch))
    phases.append(read_phase(f"read_{artifact}", _state_bytes(params, shape)))
    return phases


def _state_bytes(params: IHVPParams, shape: JobShape) -> int:
    """Bytes of the estimator's fitted state: exact `P²` float64 eigenvectors, Arnoldi an `[r, P]`
    basis, K-FAC / EK-FAC Kronecker factors and eigenvalues (≈ a few P), CG / LiSSA almost none."""
    size = shape.differentiated
    ihvp = resolve_ihvp(params, shape)
    if ihvp is IHVPChoice.EXACT:
        return size * size * 8
    if ihvp is IHVPChoice.ARNOLDI:
        return _arnoldi_iterations(params, size) * size * 8
    if ihvp in (IHVPChoice.KFAC, IHVPChoice.EKFAC):
        return 4 * size * 8
    return 64


def _solve_passes(params: IHVPParams, shape: JobShape) -> tuple[int, int] | None:
    """`(rows, passes)` of curvature work per right-hand-side block, or None for a dense solve."""
    ihvp = resolve_ihvp(params, shape)
    if ihvp is IHVPChoice.CG:
        return _fit_rows(params, shape), params.cg_max_iter
    if ihvp is IHVPChoice.LISSA:
        return min(shape.num_rows, params.fit_batch_size), params.lissa_depth * params.lissa_repeats
    return None


def _query_solves(params: IHVPParams, shape: JobShape) -> list[Phase]:
    """The query gradients and their solves (one block: joint, or all Q per_sample together)."""
    size = shape.differentiated
    phases = [Phase("query_gradients", PassKind.GRADIENT, shape.num_queries, 1, size)]
    solve = _solve_passes(params, shape)
    vectors = shape.num_queries if shape.per_sample else 1
    if solve is not None:
        rows, passes = solve
        phases.append(Phase("ihvp_solve", PassKind.CURVATURE, rows, passes, size * vectors, None, params.fit_batch_size))
    else:
        phases.append(_dense_solves("ihvp_solve", params, shape, vectors, None))
    return phases


def _row_solves(artifact: str, params: IHVPParams, shape: JobShape) -> list[Phase]:
    """Per-row gradients and `g_iᵀ(G + λI)⁻¹g_i` for every training row (blocks of rows)."""
    n, size = shape.num_rows, shape.differentiated
    phases = [Phase(f"{artifact}_gradients", PassKind.GRADIENT, n, 1, size, artifact, params.batch_size),
              read_phase(f"read_{artifact}", n * 4)]
    solve = _solve_passes(params, shape)
    if solve is not None:
        rows, passes = solve
        block = min(n, SOLVE_BLOCK)
        blocks = -(-n // block)
        phases.append(Phase(f"{artifact}_solves", PassKind.CURVATURE, rows, passes * blocks, size * block, artifact,
                            params.fit_batch_size))
    else:
        phases.append(_dense_solves(f"{artifact}_solves", params, shape, n, artifact))
    return phases


def _dense_solves(name: str, params: IHVPParams, shape: JobShape, vectors: int, artifact: str | None) -> Phase:
    """Solves with a fitted factorisation, per vector: exact `P²` (eigenbasis products), K-FAC /
    EK-FAC `2P√P` (Kronecker-factor products, layer widths ≈ √P), Arnoldi `P·r` (the basis)."""
    size = shape.differentiated
    ihvp = resolve_ihvp(params, shape)
    if ihvp is IHVPChoice.EXACT:
        return Phase(name, PassKind.DENSE, vectors, 1, size * size, artifact)
    if ihvp is IHVPChoice.ARNOLDI:
        return Phase(name, PassKind.PROJECTION, vectors, 1, size * _arnoldi_iterations(params, size), artifact)
    return Phase(name, PassKind.PROJECTION, vectors, 1, 2 * size * math.isqrt(size), artifact)


def _influence(params: IHVPParams, shape: JobShape) -> tuple[list[Phase], list[str]]:
    notes = []
    if IHVPChoice(resolve_ihvp(params, shape)) is IHVPChoice.CG:
        notes.append("cg: every solve is counted at cg_max_iter iterations (an upper bound: CG stops at cg_tol)")
    phases = _ihvp_phases(params, shape)
    relative = params.normalize == Normalize.RELATIVE
    if shape.self_influence:
        return phases + _row_solves("self_influence", params, shape), notes
    if relative:
        phases += _row_solves("relative_norm", params, shape)
    phases += _query_solves(params, shape)
    phases.append(Phase("score_sweep", PassKind.GRADIENT, shape.num_rows, 1, shape.differentiated, None,
                        params.batch_size))
    return phases, notes


def _integrated_influence(params: IntegratedInfluenceParams, shape: JobShape) -> tuple[list[Phase], list[str]]:
    """K path steps: the θ̂ fit is cached, the K − 1 others refit per query (unlearned baseline,
    reached by `unlearn_steps` SGD steps on a `fit_batch_size` training batch and the queries:
    batched backward passes, no per-sample gradients)."""
    n, q, size = shape.num_rows, shape.num_queries, shape.differentiated
    moving = Baseline(params.baseline) is Baseline.UNLEARNED
    steps = params.steps if moving else 1
    phases = _ihvp_phases(params, shape)
    if moving:
        unlearned = q if shape.per_sample else 1
        steps_taken = params.unlearn_steps * unlearned
        batch = min(_fit_rows(params, shape), params.fit_batch_size) + q  # a training batch and the queries
        phases += [
            Phase("baseline_unlearning", PassKind.STEP, 1, steps_taken, size),
            Phase("baseline_unlearning_batches", PassKind.FORWARD, batch, steps_taken, shape.num_parameters),
            Phase("baseline_predictions", PassKind.FORWARD, n, unlearned, shape.num_parameters, None,
                  params.batch_size),
        ]
        for phase in _ihvp_phases(params, shape, artifact="path_fit"):
            if phase.name != "curvature_trace" and phase.kind is not PassKind.READ:
                phases.append(Phase(f"path_{phase.name}", phase.kind, phase.rows, phase.passes * (steps - 1),
                                    phase.width, None, phase.batch_rows))
    for phase in _query_solves(params, shape):
        phases.append(Phase(phase.name, phase.kind, phase.rows, phase.passes * steps, phase.width, None,
                            phase.batch_rows))
    phases.append(Phase("path_vjp_sweeps", PassKind.GRADIENT, n, steps, size, None, params.batch_size))
    return phases, []
