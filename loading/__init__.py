"""Loading user files safely: URIs under the data root, models, shards, query samples.

Public surface (used by the API at registration/submission and by the jobs):
`resolve_uri`, `inspect_model`, `load_model`, `load_tokenizer`, `inspect_shard`,
`ShardedTrainingSet`, `check_samples_against_model`, `optimizer_state_sha256` / `load_second_moment`
(TrackStar's `params.optimizer_state`), `samples_to_batch`, `dataset_sha256`, and the
`LoadError` family in `loading.errors`.
"""

from loading.errors import LoadError, ModelLoadError, SamplesError, ShardError, UriError
from loading.hashing import dataset_sha256
from loading.model_inputs import InputSpec, input_spec
from loading.models import ModelInfo, inspect_model, load_model, load_tokenizer
from loading.optimizer_state import load_second_moment, optimizer_state_sha256
from loading.samples import check_samples_against_model, samples_to_batch
from loading.shards import ShardedTrainingSet, ShardInfo, ShardSpec, inspect_shard
from loading.uris import resolve_uri

__all__ = [
    "InputSpec",
    "LoadError",
    "ModelInfo",
    "ModelLoadError",
    "SamplesError",
    "ShardError",
    "ShardInfo",
    "ShardSpec",
    "ShardedTrainingSet",
    "UriError",
    "check_samples_against_model",
    "dataset_sha256",
    "input_spec",
    "inspect_model",
    "inspect_shard",
    "load_model",
    "load_second_moment",
    "load_tokenizer",
    "optimizer_state_sha256",
    "resolve_uri",
    "samples_to_batch",
]
