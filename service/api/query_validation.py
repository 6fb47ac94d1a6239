"""`POST /v1/queries` (and its dry run): every check a query request passes before it is stored.

Cheapest first: model and dataset of the tenant (404 otherwise), method and params (registry;
`method: "auto"`, the default, is resolved here to a concrete method and params from the
model's task and size, the purpose and the checkpoints given — `attribution.methods.auto` —
and the rest of the request is checked as if that method had been named), the params against
the model's structure recorded at registration (`layers` that select no parameter; `ihvp:
kfac|ekfac` on parameters K-FAC cannot factor: 422 naming what works), the checkpoint models
the params name (TracIn, TRAK: the tenant's live models of the same task and size, else 422
"unknown model" — another tenant's id is unknown too), samples structure, `top_k`,
`callback_url`, `group_by` (`group` needs a `group` column in every shard: only the shard
files' headers are read), `stability` (`resamples` within its limit, a method and params with
something to resample, rows not groups); then the request hash over (model sha, architecture,
dataset sha, task, canonical samples, method, params with defaults filled, checkpoint shas,
mode, self_influence, top_k, group_by, group_reduce; for `auto`: method "auto" and the resolved
method and params, so an auto request is cached and replayed only as an auto request, and an
explicit one keeps its hash; `stability` only when requested, so other hashes are unchanged).
The samples are checked against the model (a forward pass) separately, by
`samples_against_model`, only when a query is to be computed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from attribution.methods.auto import (
    AUTO,
    AutoChoice,
    AutoInputs,
    AutoParams,
    choose_method,
)
from attribution.methods.base import MethodParams, ParamsError
from attribution.methods.forward_inf_params import ForwardInfParams
from attribution.methods.gradient_features import CheckpointFeatureParams
from attribution.methods.influence import IHVPChoice, IHVPParams, InfluenceParams
from attribution.methods.registry import UnknownMethodError, method_class, parse_params
from attribution.methods.trackstar import TrackStarParams
from attribution.stability import Resampling, StabilityError, StabilityParams, resampling_for
from attribution.structure import ModelStructure
from loading import check_samples_against_model, optimizer_state_sha256
from loading.errors import LoadError
from loading.sample_structure import check_samples
from loading.shards import GROUP_COLUMN, shards_without_column
from service.api.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    invalid_from_load_error,
)
from service.api.schemas import QueryCreate
from service.db.models import Dataset, Model, Query
from service.db.repositories import datasets as dataset_repo
from service.db.repositories import models as model_repo
from service.db.repositories import queries as query_repo
from service.settings import Settings


@dataclass(frozen=True)
class ValidatedQuery:
    """A request that passed every check, with what storing and hashing it needs."""

    model: Model
    dataset: Dataset
    method: str  # the method that runs (`auto` resolved)
    params: MethodParams
    params_dict: dict[str, Any]  # params.to_dict(): defaults filled in
    samples: dict[str, Any] | None
    request_hash: str
    group_reduce: str
    auto: dict[str, Any] | None  # `method: "auto"`: the choice (`AutoChoice.report`)
    stability: dict[str, Any] | None  # the validated stability request, or None


def validate_request(session: Session, settings: Settings, tenant: str, body: QueryCreate) -> ValidatedQuery:
    model, dataset = _model_and_dataset(session, tenant, body)
    auto_params, choice = _auto_choice(body, model)
    method = choice.method.value if choice is not None else body.method
    params = _method_params(body, method, choice.params if choice is not None else body.params)
    if choice is not None:
        params = params.for_task(model.task)
    _check_structure(model, params)
    params_dict = params.to_dict()
    checkpoint_shas = _checkpoint_shas(session, tenant, model, _named_checkpoints(params))
    if auto_params is not None and not checkpoint_shas:  # checkpoints auto did not use: still valid ids
        _checkpoint_shas(session, tenant, model, auto_params.checkpoint_model_ids)
    if body.top_k > settings.max_top_k:
        raise InvalidInput(f"top_k: must be at most {settings.max_top_k}")
    if body.callback_url is not None:
        url = urlsplit(body.callback_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise InvalidInput("callback_url: must be an http:// or https:// URL")
    _check_samples_given(settings, body)
    _check_group_by(settings, body, dataset)
    group_reduce = body.group_reduce if body.group_by != "row" else "mean"  # rows ignore it
    stability = _stability(body, method, params, model)
    request = {
        "model_sha256": model.sha256, "architecture": model.architecture, "task": model.task,
        "dataset_sha256": dataset.sha256, "samples": body.samples, "method": body.method,
        "params": params_dict, "checkpoint_sha256": checkpoint_shas, "mode": body.mode,
        "self_influence": body.self_influence, "top_k": body.top_k, "group_by": body.group_by,
        "group_reduce": group_reduce,
    }
    if choice is not None:  # only then, so every explicit request keeps its hash
        request["auto_method"] = method
    optimizer_sha = _optimizer_state_sha(settings, params)
    if optimizer_sha is not None:  # only then, so every other request keeps its hash
        request["optimizer_state_sha256"] = optimizer_sha
    if stability is not None:  # likewise
        request["stability"] = stability
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return ValidatedQuery(model, dataset, method, params, params_dict, body.samples,
                      hashlib.sha256(canonical.encode()).hexdigest(), group_reduce,
                      choice.report(params_dict) if choice is not None else None, stability)


def _stability(body: QueryCreate, method: str, params: MethodParams, model: Model) -> dict[str, Any] | None:
    """The rank-stability request with its bound checked (`limits.MAXIMUMS["resamples"]`), or None;
    422 naming the field when over the bound, or when the method and params leave nothing to
    resample (`attribution.stability.resampling_for`; a `projection_dim` ≥ the model's parameter
    count projects nothing) or the ranking is not by row."""
    if body.stability is None:
        return None
    try:
        checked = StabilityParams.parse({"resamples": body.stability.resamples})
        resampling = resampling_for(method, params)
    except StabilityError as exc:
        raise InvalidInput(str(exc)) from exc
    dim = getattr(params, "projection_dim", None)
    if resampling is Resampling.PROJECTION_SEED and dim is not None and dim >= model.num_parameters:
        raise InvalidInput(f"stability: params.projection_dim {dim} ≥ the model's {model.num_parameters} parameters, "
                           "so the gradients are not projected and there is no seed to resample; lower projection_dim")
    if body.group_by != "row":
        raise InvalidInput("stability: ranks rows; it does not apply to group_by shard/group")
    return {"resamples": checked.resamples}


def _model_and_dataset(session: Session, tenant: str, body: QueryCreate) -> tuple[Model, Dataset]:
    """Both in one SELECT; if that finds nothing, each alone to name the missing one (404)."""
    found = query_repo.model_and_dataset(session, tenant, body.model_id, body.dataset_id)
    if found is not None:
        return found
    model = model_repo.get_model(session, tenant, body.model_id)
    if model is None:
        raise NotFound(f"model {body.model_id} not found", code="model_not_found")
    dataset = dataset_repo.get_dataset(session, tenant, body.dataset_id)
    if dataset is None:
        raise NotFound(f"dataset {body.dataset_id} not found", code="dataset_not_found")
    return model, dataset  # both appeared between the two reads


def _auto_choice(body: QueryCreate, model: Model) -> tuple[AutoParams | None, AutoChoice | None]:
    """`method: "auto"` → its params and the concrete method and raw params for this model (task,
    size), the purpose (`self_influence`) and the checkpoints in `params`; (None, None) when a
    method was named."""
    if body.method != AUTO:
        return None, None
    try:
        params = AutoParams.parse(body.params)
        inputs = AutoInputs(task=model.task, self_influence=body.self_influence,
                            num_checkpoints=len(params.checkpoint_model_ids), num_parameters=model.num_parameters)
        return params, choose_method(inputs, params)
    except ParamsError as exc:
        raise InvalidInput(f"{exc} (method auto accepts goal, checkpoint_model_ids, checkpoint_lrs, batch_size, "
                           "seed)", code="invalid_params") from exc


def _method_params(body: QueryCreate, method: str, raw: dict[str, Any] | None) -> MethodParams:
    try:
        params = parse_params(method, raw)
        supports_self_influence = method_class(method).supports_self_influence
    except UnknownMethodError as exc:
        raise InvalidInput(f"method: {exc}", code="unknown_method") from exc
    except ParamsError as exc:
        raise InvalidInput(str(exc), code="invalid_params") from exc
    if body.self_influence and not supports_self_influence:
        raise InvalidInput(f"self_influence: method {method} does not define self-influence")
    if isinstance(params, ForwardInfParams) and params.checkpoint_model_ids and not body.self_influence:
        raise InvalidInput("params.checkpoint_model_ids: forward_inf uses training checkpoints for self_influence "
                           "only (its query scores unlearn the final model); drop them, or use tracin",
                           code="invalid_params")
    return params


def _check_structure(model: Model, params: MethodParams) -> None:
    """422 when `params.layers` select no parameter of the model or `ihvp: kfac|ekfac` cannot
    factor one they track, read from the structure recorded at registration (models
    registered before it was recorded are not checked)."""
    if model.structure is None:
        return
    structure = ModelStructure.from_dict(model.structure)
    layers = tuple(getattr(params, "layers", ()))
    problem = structure.layers_problem(layers)
    if problem is not None:
        raise InvalidInput(f"params.layers: {problem}", code="invalid_params")
    # influence on a causal LM with no `layers` tracks the linear layers of its blocks (`influence.kronecker_scope`)
    lm_scope = isinstance(params, InfluenceParams) and model.task == "causal_lm" and not layers
    if isinstance(params, IHVPParams) and IHVPChoice(params.ihvp) in (IHVPChoice.KFAC, IHVPChoice.EKFAC) \
            and not lm_scope:
        problem = structure.kfac_problem(layers)
        if problem is not None:
            raise InvalidInput(f"params.ihvp: {params.ihvp} does not work here: {problem}", code="invalid_params")


def _named_checkpoints(params: MethodParams) -> tuple[str, ...]:
    """The checkpoint model ids of methods that take them (TracIn, TRAK, Forward-INF), else ()."""
    if isinstance(params, CheckpointFeatureParams | ForwardInfParams):
        return params.checkpoint_model_ids
    return ()


def _checkpoint_shas(session: Session, tenant: str, model: Model, ids: Sequence[str]) -> list[str]:
    """sha256 of each checkpoint model the params name (`ids`), in order (TracIn, TRAK;
    Forward-INF's self-influence; `auto`).

    Each id must be a live model of the tenant with the query model's task and parameter
    count; otherwise 422 naming `params.checkpoint_model_ids[i]`. An id of another tenant is
    "unknown model", exactly like an id that does not exist.
    """
    shas = []
    for position, model_id in enumerate(ids):
        field = f"params.checkpoint_model_ids[{position}]"
        checkpoint = model_repo.get_model(session, tenant, model_id)
        if checkpoint is None:
            raise InvalidInput(f"{field}: unknown model {model_id[:64]}", code="invalid_params")
        if checkpoint.task != model.task:
            raise InvalidInput(f"{field}: model {model_id} has task {checkpoint.task}, the query's model "
                               f"{model.task}; checkpoints must have the query model's task", code="invalid_params")
        if checkpoint.num_parameters != model.num_parameters:
            raise InvalidInput(f"{field}: model {model_id} has {checkpoint.num_parameters} parameters, the query's "
                               f"model {model.num_parameters}; checkpoints must share its architecture",
                               code="invalid_params")
        shas.append(checkpoint.sha256)
    return shas


def _optimizer_state_sha(settings: Settings, params: MethodParams) -> str | None:
    """sha256 of the optimizer-state file TrackStar's `params.optimizer_state` names (None
    without one); 422 naming the field unless it is a readable safetensors file under the data root."""
    if not isinstance(params, TrackStarParams) or params.optimizer_state is None:
        return None
    try:
        return optimizer_state_sha256(params.optimizer_state, settings.data_root)
    except LoadError as exc:
        raise invalid_from_load_error(exc) from exc


def _check_group_by(settings: Settings, body: QueryCreate, dataset: Dataset) -> None:
    """`group_by: group` needs the optional `group` column in every shard of the dataset."""
    if body.group_by != "group":
        return
    try:
        missing = shards_without_column(dataset, GROUP_COLUMN, settings)
    except LoadError as exc:
        raise invalid_from_load_error(exc) from exc
    if missing:
        raise InvalidInput(f"group_by: 'group' needs a `{GROUP_COLUMN}` column in every shard of dataset "
                           f"{dataset.id}; shards[{missing[0]}] has none (use 'shard' or 'row')")


def _check_samples_given(settings: Settings, body: QueryCreate) -> None:
    """Samples xor self_influence, and the samples object well-formed (`loading.sample_structure`)."""
    if body.self_influence:
        if body.samples is not None:
            raise InvalidInput("samples: must be omitted when self_influence is true")
        if body.mode == "per_sample":
            raise InvalidInput("mode: per_sample does not apply to self_influence")
        return
    if body.samples is None:
        raise InvalidInput("samples: required unless self_influence is true", code="invalid_samples")
    try:
        check_samples(body.samples, max_samples=settings.max_query_samples)
    except LoadError as exc:
        raise invalid_from_load_error(exc) from exc


def samples_against_model(session: Session, settings: Settings, checked: ValidatedQuery) -> int:
    """Forward pass of the model on the samples (`check_samples_against_model`); 422 naming the field otherwise."""
    if checked.samples is None:
        return 0
    try:
        count = check_samples_against_model(checked.samples, model_row=checked.model, dataset_row=checked.dataset,
                              settings=settings, session=session)
    except LoadError as exc:
        raise invalid_from_load_error(exc) from exc
    if count > settings.max_query_samples:
        raise InvalidInput(f"samples: at most {settings.max_query_samples} query samples are allowed, got {count}",
                           code="invalid_samples")
    return count


def same_request(earlier: Query, checked: ValidatedQuery, body: QueryCreate) -> Query:
    if earlier.request_hash != checked.request_hash or earlier.callback_url != body.callback_url:
        raise Conflict("Idempotency-Key was already used with a different request body",
                       code="idempotency_key_reused")
    return earlier


def validate_query(session: Session, settings: Settings, tenant: str, body: QueryCreate,
                   idempotency_key: str | None = None) -> tuple[ValidatedQuery, int, Query | None]:
    """Every check `submit_query` makes before it stores anything (the same 4xx errors, including
    409 for an `Idempotency-Key` used with another body), the samples against the model; the number
    of query samples and the query an identical keyed retry would return. Stores nothing
    (`POST /v1/queries?dry_run=true`, `service.api.estimates`)."""
    checked = validate_request(session, settings, tenant, body)
    earlier = None
    if idempotency_key is not None:
        earlier = query_repo.find_by_idempotency_key(session, tenant, idempotency_key)
        if earlier is not None:
            same_request(earlier, checked, body)
    return checked, samples_against_model(session, settings, checked), earlier
