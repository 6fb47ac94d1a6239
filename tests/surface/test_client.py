"""The Python client against the real `python -m service` serving the digits demo (auth on):
typed models checked against `/openapi.json`, registration, a leaked-point query found first,
scores as numpy, retries with one Idempotency-Key, the async client, errors."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import numpy as np
import pytest

from attribution_client import (
    ApiError,
    AsyncClient,
    Client,
    Dataset,
    Model,
    ServiceUnreachable,
)
from attribution_client.models import SERVER_SCHEMAS, ApiModel
from service.testing import free_port
from tests.surface.demo import DemoService

pytestmark = pytest.mark.slow


@pytest.fixture()
def client(demo: DemoService, monkeypatch: pytest.MonkeyPatch) -> Client:
    """A client configured only through the environment, as a notebook user sets it up."""
    monkeypatch.setenv("ATTRIBUTION_URL", demo.url)
    monkeypatch.setenv("ATTRIBUTION_API_KEY", demo.api_key or "")
    return Client()


@pytest.fixture()
def registered(demo: DemoService, client: Client) -> tuple[Model, Dataset]:
    model = client.register_model("digits-mlp", demo.uri("mlp.pt"), task="classification", format="torchscript")
    return model, client.register_dataset("digits", demo.shard_uris)


def _resolve(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _types(schema: dict[str, Any], components: dict[str, Any]) -> set[str]:
    """The JSON types a property schema admits (`$ref` resolved; anyOf/allOf unioned)."""
    schema = _resolve(schema, components)
    if "anyOf" in schema or "allOf" in schema:
        return set().union(*(_types(s, components) for s in schema.get("anyOf", []) + schema.get("allOf", [])))
    kind = schema.get("type")
    if kind is None:  # `Any`, or an enum / const without a type
        return {"any"} if "enum" not in schema and "const" not in schema else {"string"}
    return set(kind) if isinstance(kind, list) else {kind}


def _compatible(client_types: set[str], server_types: set[str]) -> bool:
    """Every type the server may send is one the client accepts (integers are numbers)."""
    if "any" in client_types:
        return True
    accepted = client_types | ({"integer"} if "number" in client_types else set())
    return server_types <= accepted


def test_client_models_match_the_service_openapi(client: Client, demo: DemoService) -> None:
    components = httpx.get(f"{demo.url}/openapi.json").json()["components"]["schemas"]
    for model, server_name in SERVER_SCHEMAS.items():
        server = components[server_name]
        ours = model.model_json_schema(mode="validation")
        local = ours.get("$defs", {})
        for field, spec in ours["properties"].items():
            assert field in server["properties"], f"{model.__name__}.{field} not in {server_name}"
            theirs = _resolve(server["properties"][field], components)
            assert _compatible(_types(spec, local), _types(theirs, components)), (model.__name__, field)
            if "enum" in theirs:
                assert set(_resolve(spec, local)["enum"]) == set(theirs["enum"]), (model.__name__, field)
            if field in ours.get("required", []):
                assert field in server.get("required", []), f"{model.__name__}.{field} required but optional on server"
        assert issubclass(model, ApiModel)


def test_register_query_wait_top_scores(client: Client, registered: tuple[Model, Dataset], demo: DemoService,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    model, dataset = registered
    assert model.task == "classification" and len(model.sha256) == 64
    assert dataset.num_samples == sum(s.num_samples for s in dataset.shards) == 1405
    assert [m.id for m in client.list_models()].count(model.id) == 1
    assert dataset.id in {d.id for d in client.list_datasets()}

    q = demo.queries
    handle = client.query(model, dataset, x=np.asarray(q["x"][:1], dtype=np.float32), y=np.asarray(q["y"][:1]),
                          top_k=5, params={"normalize": "relative"})
    assert handle.wait(progress=True, timeout=120) is handle
    assert "100%" in capsys.readouterr().err  # the tqdm bar reached the end
    assert handle.status == "succeeded"
    top = handle.top()
    assert len(top) == 5 and top[0].index == q["copy_index"][0]
    assert [r.rank for r in top] == [1, 2, 3, 4, 5]
    assert handle.bottom(2)[0].score <= top[-1].score

    scores = handle.scores()
    assert scores.shape == (1405,) and scores.dtype == np.float32
    assert int(np.argmax(scores)) == q["copy_index"][0]
    np.testing.assert_allclose(scores[[r.index for r in top]], [r.score for r in top], rtol=1e-5)
    assert client.handle(handle.id).top()[0].index == top[0].index


def test_to_pandas_has_the_ranked_rows(client: Client, registered: tuple[Model, Dataset], demo: DemoService) -> None:
    pytest.importorskip("pandas")
    model, dataset = registered
    q = demo.queries
    frame = client.query(model.id, dataset.id, {"x": q["x"][1:2], "y": q["y"][1:2]}, top_k=3,
                         params={"normalize": "relative"}).wait().to_pandas()
    assert list(frame.columns)[:5] == ["rank", "index", "sample_id", "shard", "score"]
    assert len(frame) == 3 and int(frame["index"].iloc[0]) == q["copy_index"][1]



def test_rank_stability_reaches_the_dataframe(client: Client, registered: tuple[Model, Dataset],
                                              demo: DemoService) -> None:
    pytest.importorskip("pandas")
    model, dataset = registered
    q = demo.queries
    frame = client.query(model.id, dataset.id, {"x": q["x"][2:3], "y": q["y"][2:3]}, top_k=3,
                         stability={"resamples": 4}).wait().to_pandas()
    assert list(frame.columns) == ["rank", "index", "sample_id", "shard", "score", "stability", "rank_low",
                                   "rank_high"]
    copy = frame[frame["index"] == q["copy_index"][2]]
    assert len(copy) == 1 and float(copy["stability"].iloc[0]) == 1.0 and int(copy["rank_high"].iloc[0]) == 1

class _LoseFirstAnswer(httpx.BaseTransport):
    """Forwards every request to the real service, but answers the first POST /v1/queries with a
    503 after the service has accepted it: the response was lost, the query exists."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.posts: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == "POST" and request.url.path == "/v1/queries":
            self.posts.append(request.headers["Idempotency-Key"])
            if len(self.posts) == 1:
                response.read()
                return httpx.Response(503, json={"error": "unavailable", "detail": "lost answer"})
        return response


def test_retried_post_reuses_its_idempotency_key(registered: tuple[Model, Dataset], demo: DemoService) -> None:
    model, dataset = registered
    transport = _LoseFirstAnswer()
    with Client(demo.url, demo.api_key, transport=transport, backoff=0.01) as flaky:
        q = demo.queries
        handle = flaky.query(model, dataset, x=q["x"][2:3], y=q["y"][2:3], top_k=3, params={"steps": 2})
        assert len(transport.posts) == 2 and transport.posts[0] == transport.posts[1]
        listed = [item.id for item in flaky.list_queries(limit=500, model_id=model.id)]
        assert listed.count(handle.id) == 1  # one query, not two
        assert handle.wait(timeout=120).top()[0].rank == 1


def test_async_client_gives_the_sync_answer(registered: tuple[Model, Dataset], demo: DemoService,
                                            client: Client) -> None:
    model, dataset = registered
    q = demo.queries
    body: dict[str, Any] = {"x": q["x"][3:4], "y": q["y"][3:4]}

    async def run() -> tuple[list[int], np.ndarray, int]:
        async with AsyncClient(demo.url, demo.api_key) as aclient:
            fetched = await aclient.get_model(model.id)
            handle = await aclient.query(fetched, dataset, body, top_k=4, params={"normalize": "relative"})
            await handle.wait(timeout=120)
            return [r.index for r in handle.top()], await handle.scores(), len(await aclient.list_datasets())

    top, scores, datasets = asyncio.run(run())
    assert top[0] == q["copy_index"][3] and datasets >= 1
    again = client.query(model, dataset, body, top_k=4, params={"normalize": "relative"}).wait()
    assert [r.index for r in again.top()] == top
    np.testing.assert_array_equal(again.scores(), scores)


def test_errors_carry_the_service_code(client: Client, demo: DemoService) -> None:
    with pytest.raises(ApiError) as missing:
        client.get_query("no-such-query")
    assert missing.value.status_code == 404 and missing.value.error == "query_not_found"
    with pytest.raises(ApiError) as refused, Client(demo.url, "wrong-key") as stranger:
        stranger.list_models()
    assert refused.value.status_code == 401
    with pytest.raises(ApiError) as invalid:
        client.register_model("bad", demo.uri("queries.json"), task="classification", format="torchscript")
    assert invalid.value.status_code == 422 and invalid.value.detail
    with pytest.raises(ServiceUnreachable), Client(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01) as gone:
        gone.list_models()
