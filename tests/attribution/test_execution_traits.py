"""Execution traits: what each method class says about how a query may run (fan-out over row
ranges, a shared sweep with other queries), and `attribute_many` against one-by-one `attribute`."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from attribution.artifacts import InMemoryArtifacts
from attribution.methods.base import FitContext
from attribution.methods.registry import method_class, parse_params
from attribution.pipeline import attribute, attribute_many
from tests.attribution import fixtures


@pytest.mark.parametrize(("method", "params", "task", "fans_out"), [
    ("forward_inf", {"normalize": "none"}, "classification", True),
    ("forward_inf", {}, "classification", False),  # relative by default: a whole-dataset floor
    ("forward_inf", {}, "causal_lm", False),
    ("forward_inf", {"normalize": "none", "auto": True}, "classification", False),  # searches all rows
    ("forward_inf", {"normalize": "none", "unlearning": "newton"}, "classification", False),  # fits (G + λI)⁻¹
    ("tracin", {"normalize": "none"}, "classification", True),
    ("tracin", {}, "classification", False),
    ("gradient_similarity", {}, "classification", True),
    ("influence", {"normalize": "none"}, "classification", False),
    ("trak", {"normalize": "none"}, "classification", False),
    ("integrated_influence", {}, "classification", False),
])
def test_fan_out_is_the_methods_call(method: str, params: dict[str, Any], task: str, fans_out: bool) -> None:
    assert method_class(method).can_fan_out(parse_params(method, params), task) is fans_out


def test_only_plain_forward_inf_queries_share_a_sweep() -> None:
    fi = method_class("forward_inf")
    key = fi.batch_key(parse_params("forward_inf", {"steps": 2, "lr": 0.1, "normalize": "none"}))
    assert key is not None
    assert fi.batch_key(parse_params("forward_inf", {"steps": 2, "lr": 0.1})) == key  # unset: raw params group
    assert fi.batch_key(parse_params("forward_inf", {"steps": 2, "lr": 0.1, "normalize": "relative"})) != key
    assert fi.batch_key(parse_params("forward_inf", {"steps": 3, "lr": 0.1, "normalize": "none"})) != key
    assert fi.batch_key(parse_params("forward_inf", {"auto": True})) is None
    assert fi.batch_key(parse_params("forward_inf", {"unlearning": "newton"})) is None
    for other in ("influence", "tracin", "trak", "gradient_similarity", "integrated_influence", "trackstar"):
        assert method_class(other).batch_key(parse_params(other, {})) is None, other


@pytest.mark.parametrize("normalize", ["none", "relative"])
def test_attribute_many_equals_one_query_at_a_time(wine_mlp: fixtures.Trained, normalize: str) -> None:
    raw = {"steps": 2, "lr": 0.05, "optimizer": "sgd", "normalize": normalize}
    queries = [wine_mlp.test_batch([0, 1]), wine_mlp.test_batch([2])]
    store = InMemoryArtifacts()
    together = attribute_many(wine_mlp.adapter, "forward_inf", [parse_params("forward_inf", raw)] * 2,
                              wine_mlp.train, FitContext("wine", store=store), queries=queries)
    for batch, result in zip(queries, together, strict=True):
        alone = attribute(wine_mlp.adapter, "forward_inf", raw, wine_mlp.train, FitContext("wine", store=store),
                          queries=batch)
        torch.testing.assert_close(result.scores.float(), alone.float(), rtol=1e-6, atol=1e-6)
        assert {"unlearn_s", "sweep_s"} <= set(result.timings)


def test_attribute_many_refuses_params_that_cannot_share_a_sweep(wine_mlp: fixtures.Trained) -> None:
    params = [parse_params("forward_inf", {"steps": 2}), parse_params("forward_inf", {"steps": 3})]
    with pytest.raises(ValueError, match="batch_key"):
        attribute_many(wine_mlp.adapter, "forward_inf", params, wine_mlp.train, FitContext("wine"),
                       queries=[wine_mlp.test_batch([0])] * 2)
    with pytest.raises(ValueError, match="batch_key"):
        attribute_many(wine_mlp.adapter, "influence", [parse_params("influence", {})], wine_mlp.train,
                       FitContext("wine"), queries=[wine_mlp.test_batch([0])])
