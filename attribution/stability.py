"""Rank stability of ranked rows: how often a row stays in the top k when the method's own
randomness or its one free choice is resampled.

A score ranks rows by one draw of whatever the method leaves to chance or to a chosen
constant: a random projection's seed, the set of checkpoints, the step size of the
unlearning run, the damping or the stochastic iHVP's seed. Rerunning the method R times with
that quantity resampled (everything else fixed) gives score vectors `s⁽ʳ⁾ ∈ ℝᴺ`,
r = 1..R, and for a reported row i (one of the reported run's top-k, or bottom-k) its rank
in each resample

    rank_r(i) = 1 + #{j : s⁽ʳ⁾_j ≻ s⁽ʳ⁾_i},   j ≻ i ⇔ s_j > s_i, or s_j = s_i and j < i

(`attribution.topk`'s order: descending scores for the top list, ascending for the bottom
list; NaN scores never rank: a NaN row gets rank (number of non-NaN rows) + 1). Reported per row:

    stability(i) = (1/R) Σ_r 1[rank_r(i) ≤ k]            share of resamples keeping i in the top k
    rank_low(i), rank_high(i) = the ⌈0.05·R⌉-th and ⌈0.95·R⌉-th smallest of {rank_r(i)}

(nearest-rank 5th and 95th percentiles: for R < 20 the minimum and maximum). The reported
run itself is not one of the resamples.

What is resampled (`Resampling`, chosen by `resampling_for` from the method and its params):
- `projection_seed` (TRAK, TrackStar, and TracIn / gradient similarity with `projection_dim`):
  seeds `seed + 1 … seed + R` of the random projection R ∈ ℝ^{P×k}. The JL estimate
  ⟨Rᵀg_q, Rᵀg_i⟩ of ⟨g_q, g_i⟩ is random; the spread of ranks over seeds is the projection's
  error seen on the ranking. Each resample is a full run (new features, its own RelatIF
  normaliser, so an exact copy of the query stays first by Cauchy–Schwarz in every seed).
- `checkpoint_bootstrap` (TracIn with ≥ 2 checkpoints): a bootstrap over checkpoints,
  weights w⁽ʳ⁾ ~ Multinomial(C, 1/C), `s⁽ʳ⁾_i = Σ_c w⁽ʳ⁾_c η_c φ_c(z_q)·φ_c(z_i)` (relative:
  divided by √(Σ_c w⁽ʳ⁾_c η_c ‖φ_c(z_i)‖²)). The per-checkpoint terms are computed once, so
  R resamples cost one extra TracIn pass, not R.
- `step_size` (Forward-INF with gradient unlearning): α_r = α · 2^{u_r}, u_r evenly spaced in
  [−½, ½] (`u_r = (r − ½)/R − ½`): the step size over [α/√2, α√2] around the reported
  (or `auto`-chosen) α, the other settings fixed. `L(θ̂, z_i)` is cached, so a resample costs
  one unlearning run and one sweep.
- `damping` (influence, Integrated Influence, Newton-step Forward-INF with a deterministic
  iHVP): λ_r = λ · 10^{u_r}, u_r as above, over [λ/√10, λ√10] around the reported (or
  default-resolved) λ. Damping is applied at solve time, so the fitted curvature is reused.
- `lissa_seed` (the same methods when the iHVP is LiSSA): seeds `seed + 1 … seed + R` of its
  sampled recursion (and of any seeded estimate the fit makes, e.g. a Hutchinson trace for the
  default damping).

With `step_size`, `damping` and `lissa_seed` the RelatIF normaliser of the reported run is
reused for every resample (it is a per-row weight that would cost N unlearning runs or N
iHVPs per resample to recompute); self-influence queries recompute self-influence per
resample. Where nothing is random or chosen (gradient similarity or TracIn with no
projection and at most one checkpoint) `resampling_for` raises `StabilityError`: there is
nothing to resample, and a constant 1.0 would be a fake.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import torch
from pydantic import StrictInt, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch import Tensor

from attribution.data import Batch, TrainingSet
from attribution.methods.base import (
    PARAMS_CONFIG,
    AttributionMethod,
    FitContext,
    MethodName,
    MethodParams,
    Normalize,
    Progress,
    no_progress,
    params_error,
)
from attribution.methods.gradient_features import (
    GradientFeatureParams,
    checkpoint_featurizers,
    dot_scores,
    restricted,
    selected_layers,
    squared_norms,
)
from attribution.methods.limits import first_excess
from attribution.pipeline import attribute, cached_self_influence, relative_scores
from attribution.topk import PAD_INDEX, bottom_k, top_k

LOW_QUANTILE = 0.05
HIGH_QUANTILE = 0.95
STEP_SIZE_SPREAD = 2.0  # α_r ∈ [α/√2, α√2]
DAMPING_SPREAD = 10.0  # λ_r ∈ [λ/√10, λ√10]


class StabilityError(ValueError):
    """A stability request that cannot be honoured; `field` names the offending request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Resampling(StrEnum):
    PROJECTION_SEED = "projection_seed"
    CHECKPOINT_BOOTSTRAP = "checkpoint_bootstrap"
    STEP_SIZE = "step_size"
    DAMPING = "damping"
    LISSA_SEED = "lissa_seed"


@pydantic_dataclass(frozen=True, config=PARAMS_CONFIG)
class StabilityParams:
    """`resamples` R ≥ 2, bounded by `limits.MAXIMUMS["resamples"]` (each resample is up to
    one more run of the method)."""

    resamples: StrictInt = 16

    def __post_init__(self) -> None:
        if self.resamples < 2:
            raise StabilityError("stability.resamples", "must be at least 2")
        excess = first_excess(self)
        if excess is not None:
            name, value, maximum = excess
            raise StabilityError(f"stability.{name}", f"must be at most {maximum} (got {value}); "
                                                      "the limits are in the README")

    @classmethod
    def parse(cls, raw: Any) -> StabilityParams:
        """The request of a raw JSON object; raises `StabilityError` naming the invalid field."""
        if not isinstance(raw, dict):
            raise StabilityError("stability", 'must be an object such as {"resamples": 16}')
        try:
            return cls(**raw)
        except ValidationError as exc:
            raise params_error(exc, cls, lambda field, message: StabilityError(f"stability.{field}", message)) from None


def resampling_for(method: str, params: MethodParams, *, num_checkpoints: int | None = None) -> Resampling:
    """What stability resamples for `method` with `params` (module docstring); raises
    `StabilityError` naming the field when nothing is. `num_checkpoints` defaults to the
    params' `checkpoint_model_ids`."""
    name = MethodName(method)
    checkpoints = num_checkpoints if num_checkpoints is not None else len(getattr(params, "checkpoint_model_ids", ()))
    if name == MethodName.TRACIN and checkpoints >= 2:
        return Resampling.CHECKPOINT_BOOTSTRAP
    if name in (MethodName.TRAK, MethodName.TRACKSTAR, MethodName.TRACIN, MethodName.GRADIENT_SIMILARITY):
        if getattr(params, "projection_dim", None) is None:
            raise StabilityError("stability", f"{name} without projection_dim"
                                 + (" and with fewer than 2 checkpoints" if name == MethodName.TRACIN else "")
                                 + " is deterministic: nothing to resample (set params.projection_dim"
                                 + (" or give ≥ 2 checkpoint_model_ids)" if name == MethodName.TRACIN else ")"))
        return Resampling.PROJECTION_SEED
    if name == MethodName.FORWARD_INF and getattr(params, "unlearning", "gradient") != "newton":
        return Resampling.STEP_SIZE
    ihvp = str(getattr(params, "ihvp", ""))
    return Resampling.LISSA_SEED if ihvp == "lissa" else Resampling.DAMPING


@dataclass(frozen=True)
class RowStability:
    """One reported row's figures: `stability` ∈ [0, 1], the rank interval `[rank_low, rank_high]`."""

    stability: float
    rank_low: int
    rank_high: int


@dataclass
class StabilityReport:
    """Figures of every reported row, by `(kind "top"/"bottom", query sample, global row index)`."""

    resampling: Resampling
    resamples: int
    k: int
    values: list[float]  # the resampled seeds / step sizes / dampings (empty for the bootstrap)
    rows: dict[tuple[str, int, int], RowStability] = field(default_factory=dict)

    def get(self, kind: str, sample: int, index: int) -> RowStability | None:
        return self.rows.get((kind, sample, index))

    def summary(self) -> dict[str, Any]:
        """What the result reports beside its rows (`extras["stability"]`)."""
        return {"resampling": self.resampling.value, "resamples": self.resamples, "k": self.k,
                "values": self.values, "interval": [LOW_QUANTILE, HIGH_QUANTILE]}


# ----------------------------------------------------------------------------- ranks
def ranks_of(scores: Tensor, rows: Tensor, *, largest: bool) -> Tensor:
    """`[m]` int64 rank of each row position in `rows` `[m]` within `scores` `[N]` (module
    docstring's order; a NaN row ranks after every scored row)."""
    values = scores.detach().double().cpu()
    finite = values[~torch.isnan(values)]
    ordered = torch.sort(finite).values
    picked = values[rows]
    left = torch.searchsorted(ordered, picked, right=False)
    right = torch.searchsorted(ordered, picked, right=True)
    better = (finite.numel() - right) if largest else left
    ranks = 1 + better
    for slot in torch.nonzero(right - left > 1).flatten().tolist():  # ties: lower indices rank first
        row = int(rows[slot])
        ranks[slot] += int((values[:row] == picked[slot]).sum())
    return torch.where(torch.isnan(picked), torch.full_like(ranks, finite.numel() + 1), ranks)


def summarize(ranks: Tensor, k: int) -> list[RowStability]:
    """`ranks` `[R, m]` of m rows over R resamples → one `RowStability` per row."""
    resamples = ranks.shape[0]
    ordered = torch.sort(ranks, dim=0).values
    low = ordered[max(1, math.ceil(LOW_QUANTILE * resamples)) - 1]
    high = ordered[max(1, math.ceil(HIGH_QUANTILE * resamples)) - 1]
    share = (ranks <= k).double().mean(dim=0)
    return [RowStability(float(s), int(lo), int(hi)) for s, lo, hi in zip(share, low, high, strict=True)]


def stability_from_scores(reported: Tensor, resampled: Iterator[Tensor], k: int, *, resampling: Resampling,
                          values: list[float], offset: int = 0) -> StabilityReport:
    """Figures of the top-k and bottom-k rows of `reported` `[Q, N]` over the resampled score
    matrices (each `[Q, N]`), which are consumed one at a time (memory O(Q·N + R·Q·k))."""
    k = min(k, reported.shape[-1])
    lists = {"top": top_k(reported, k), "bottom": bottom_k(reported, k)}
    ranks: dict[tuple[str, int], list[Tensor]] = {(kind, q): [] for kind in lists for q in range(reported.shape[0])}
    count = 0
    for scores in resampled:
        if scores.shape != reported.shape:
            raise ValueError(f"a resample scored shape {tuple(scores.shape)}, the reported run {tuple(reported.shape)}")
        count += 1
        for (kind, q), found in ranks.items():
            chosen = lists[kind].indices[q]
            chosen = chosen[chosen != PAD_INDEX]
            found.append(ranks_of(scores[q], chosen, largest=kind == "top"))
    report = StabilityReport(resampling, count, k, values)
    for (kind, q), found in ranks.items():
        chosen = lists[kind].indices[q]
        chosen = chosen[chosen != PAD_INDEX]
        if not found or chosen.numel() == 0:
            continue
        for index, figures in zip(chosen.tolist(), summarize(torch.stack(found), k), strict=True):
            report.rows[(kind, q, index + offset)] = figures
    return report


# ----------------------------------------------------------------------------- resampling
def spread(center: float, factor: float, resamples: int) -> list[float]:
    """`center · factor^{u_r}`, u_r = (r − ½)/R − ½ for r = 1..R: evenly spaced in log scale over
    [center/√factor, center·√factor]."""
    return [center * factor ** ((r + 0.5) / resamples - 0.5) for r in range(resamples)]


def rank_stability(
    method: AttributionMethod, reported: Tensor, train: TrainingSet, stability: StabilityParams, *,
    queries: Batch | None, k: int, per_sample: bool = False, self_influence: bool = False, offset: int = 0,
    progress: Progress = no_progress,
) -> StabilityReport:
    """Stability of the top-k and bottom-k rows of `reported` `[Q, N]`, the scores of `method`
    (the fitted instance that computed them: its resolved params, its context's artifacts and
    reported values, e.g. the resolved damping). `offset`: global index of `train`'s first row."""
    name = str(method.name)
    kind = resampling_for(name, method.params, num_checkpoints=len(method.context.checkpoints))
    if kind in (Resampling.DAMPING, Resampling.LISSA_SEED):
        kind = _resolved_ihvp_kind(method)
    resamples = stability.resamples
    values: list[float] = []
    if kind == Resampling.CHECKPOINT_BOOTSTRAP:
        scores = _bootstrap(method, train, queries, resamples, per_sample, self_influence, progress)
    else:
        variants, values = _variants(method, kind, resamples)
        scores = _reruns(method, variants, train, queries, per_sample, self_influence, own_normalizer=kind ==
                         Resampling.PROJECTION_SEED, progress=progress)
    return stability_from_scores(reported, scores, k, resampling=kind, values=values, offset=offset)


def _resolved_ihvp_kind(method: AttributionMethod) -> Resampling:
    """LiSSA seeds when the fitted iHVP is LiSSA (an `ihvp: auto` resolves in fit), else damping."""
    ihvp = method.context.extras.get("ihvp", str(getattr(method.params, "ihvp", "")))
    return Resampling.LISSA_SEED if ihvp == "lissa" else Resampling.DAMPING


def _variants(method: AttributionMethod, kind: Resampling, resamples: int) -> tuple[list[MethodParams], list[float]]:
    """The resampled params of each rerun and the resampled values."""
    params = method.params
    if kind in (Resampling.PROJECTION_SEED, Resampling.LISSA_SEED):
        if kind == Resampling.PROJECTION_SEED:
            _check_projected(method)
        seeds = [params.seed + r + 1 for r in range(resamples)]
        return [replace(params, seed=s) for s in seeds], [float(s) for s in seeds]
    if kind == Resampling.STEP_SIZE:
        alpha = getattr(params, "lr", None)
        if alpha is None:
            raise StabilityError("stability", "the reported run has no resolved step size lr to perturb")
        lrs = spread(float(alpha), STEP_SIZE_SPREAD, resamples)
        extra: dict[str, Any] = {"auto": False} if getattr(params, "auto", False) else {}
        return [replace(params, lr=lr, **extra) for lr in lrs], lrs  # type: ignore[call-arg]
    damping = method.context.extras.get("damping", getattr(params, "damping", None))
    if damping is None:
        raise StabilityError("stability", "the reported run did not resolve a damping to perturb")
    dampings = spread(float(damping), DAMPING_SPREAD, resamples)
    return [replace(params, damping=d) for d in dampings], dampings  # type: ignore[call-arg]


def _check_projected(method: AttributionMethod) -> None:
    """A projection seed changes nothing when projection_dim ≥ the tracked parameter count P."""
    params = method.params
    if not isinstance(params, GradientFeatureParams) or params.projection_dim is None:
        raise StabilityError("stability", f"{method.name} without projection_dim has no projection seed")
    tracked = restricted(method.model, selected_layers(method.model, params)).num_params
    if params.projection_dim >= tracked:
        raise StabilityError("stability", f"projection_dim {params.projection_dim} ≥ the {tracked} tracked parameters: "
                                          "the gradients are not projected, so no seed to resample; lower projection_dim")


def _reruns(method: AttributionMethod, variants: list[MethodParams], train: TrainingSet, queries: Batch | None,
            per_sample: bool, self_influence: bool, *, own_normalizer: bool, progress: Progress) -> Iterator[Tensor]:
    """`[Q, N]` scores of each variant, one at a time. `own_normalizer`: the full pipeline
    (its own RelatIF normaliser); otherwise raw scores over the reported run's normaliser."""
    relative = method.params.normalize == Normalize.RELATIVE and not self_influence
    norms = cached_self_influence(method, train, relative_norm=True) if relative and not own_normalizer else None
    for r, params in enumerate(variants):
        context = replace(method.context, extras={}, timings={}, progress=_slice(progress, r, len(variants)))
        yield _rerun(method, params, train, context, queries, per_sample, self_influence, own_normalizer, norms)
        progress((r + 1) / len(variants))


def _rerun(method: AttributionMethod, params: MethodParams, train: TrainingSet, context: FitContext,
           queries: Batch | None, per_sample: bool, self_influence: bool, own_normalizer: bool,
           norms: Tensor | None) -> Tensor:
    """`[Q, N]` scores of one variant of `method` (see `_reruns`)."""
    cls = type(method)
    if own_normalizer:
        return attribute(method.model, cls, params, train, context, queries=queries, per_sample=per_sample,
                         self_influence=self_influence)
    rerun = cls(method.model, params, context)
    rerun.fit(train)
    if self_influence:
        return rerun.self_influence(train).unsqueeze(0)
    if queries is None:
        raise ValueError("queries are required unless self_influence=True")
    raw = rerun.score(queries, train, per_sample=per_sample)
    return raw if norms is None else relative_scores(raw, norms, floor=method.relative_norm_floor())


def _bootstrap(method: AttributionMethod, train: TrainingSet, queries: Batch | None, resamples: int,
               per_sample: bool, self_influence: bool, progress: Progress) -> Iterator[Tensor]:
    """TracIn over bootstrap resamples of its checkpoints, from per-checkpoint terms computed once."""
    params = method.params
    if not isinstance(params, GradientFeatureParams):
        raise StabilityError("stability", f"{method.name} has no checkpoint features to bootstrap")
    featurizers = checkpoint_featurizers(method.model, method.context, params)
    relative = params.normalize == Normalize.RELATIVE or self_influence
    terms, norms = [], []
    for c, (featurizer, lr) in enumerate(featurizers):
        stage = _slice(progress, c, len(featurizers))
        if not self_influence:
            if queries is None:
                raise ValueError("queries are required unless self_influence=True")
            query = featurizer.query_features(queries, per_sample, params.batch_size)
            terms.append(lr * dot_scores(featurizer, query, train, params.batch_size, stage))
        if relative:
            norms.append(lr * squared_norms(featurizer, train, params.batch_size, stage))
    gen = torch.Generator().manual_seed(params.seed + 1)
    count = len(featurizers)
    for _ in range(resamples):
        weights = torch.bincount(torch.randint(count, (count,), generator=gen), minlength=count).float()
        norm = sum((w * n for w, n in zip(weights, norms, strict=True)), torch.zeros(len(train))) if norms else None
        if self_influence:
            yield norm.unsqueeze(0)  # type: ignore[union-attr]
            continue
        total = sum((w * t for w, t in zip(weights, terms, strict=True)), torch.zeros_like(terms[0]))
        yield relative_scores(total, norm, floor=method.relative_norm_floor()) if norm is not None else total


def _slice(progress: Progress, part: int, parts: int) -> Callable[[float], None]:
    return lambda fraction: progress((part + fraction) / parts)
