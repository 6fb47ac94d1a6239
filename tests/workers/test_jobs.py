"""`run_query` end to end on the real Postgres and Redis, through an RQ worker."""

from __future__ import annotations

import http.server
import json
import threading
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import update

from service import queue
from service.artifact_store import cache_stats
from service.db.models import Query
from service.db.session import session_scope
from service.settings import Settings, get_settings
from tests.workers import jobfixtures as jf
from workers import jobs

pytestmark = pytest.mark.integration

PARAMS = {"steps": 3, "lr": 0.5, "normalize": "none"}  # raw scores: relative (the default) is not fanned out


def _enqueue(settings: Settings, query_id: str) -> None:
    queue.enqueue("workers.jobs.run_query", query_id, job_id=query_id, settings=settings)


def test_run_query_matches_the_in_memory_pipeline(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings)
    query_id = jf.insert_query(rq_settings, reg, params=PARAMS, top_k=4)
    _enqueue(rq_settings, query_id)
    jf.work(rq_settings)

    query = jf.fetch(rq_settings, query_id)
    assert (query.status, query.progress, query.attempts, query.error) == ("succeeded", 1.0, 1, None)
    expected = jf.expected_scores(reg, "forward_inf", PARAMS, samples=jf.query_batch(reg))[0]
    scores = jf.load_scores(rq_settings, query)
    assert scores.shape == (60,) and scores.dtype == np.float32 and query.scores_shape == {"shape": [60]}
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-5, atol=1e-6)
    order = np.argsort(-expected.numpy(), kind="stable")
    assert [i for i, _ in jf.ranking(query, "top")] == order[:4].tolist()
    assert [i for i, _ in jf.ranking(query, "bottom")] == np.argsort(expected.numpy(), kind="stable")[:4].tolist()
    top = min((r for r in query.results if r.kind == "top"), key=lambda r: r.rank)
    assert top.sample_id == f"r{top.index}"
    assert top.shard == (0 if top.index < 20 else 1 if top.index < 35 else 2)
    assert query.num_scored == 60 and query.timings and "total_s" in query.timings
    assert query.started_at is not None and query.finished_at is not None


def test_second_query_reuses_cached_base_losses(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings)
    first = jf.insert_query(rq_settings, reg, params=PARAMS)
    _enqueue(rq_settings, first)
    jf.work(rq_settings)
    hits = cache_stats(rq_settings)["hits"]
    second = jf.insert_query(rq_settings, reg, params={"steps": 1, "lr": 0.1},
                             samples={"x": reg.toy.x_test[3:4].tolist(), "y": reg.toy.y_test[3:4].tolist()})
    _enqueue(rq_settings, second)
    jf.work(rq_settings)
    assert jf.fetch(rq_settings, second).status == "succeeded"
    assert cache_stats(rq_settings)["hits"] > hits


def test_rerunning_a_finished_query_changes_nothing(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings)
    query_id = jf.insert_query(rq_settings, reg, params=PARAMS)
    _enqueue(rq_settings, query_id)
    _enqueue(rq_settings, query_id)  # duplicate delivery
    jf.work(rq_settings)
    before = jf.fetch(rq_settings, query_id)
    jobs.run_query(query_id)
    after = jf.fetch(rq_settings, query_id)
    assert (after.attempts, after.finished_at, after.status) == (before.attempts, before.finished_at, "succeeded")
    assert sorted((r.kind, r.rank, r.index) for r in after.results) == sorted((r.kind, r.rank, r.index) for r in before.results)
    assert len(after.results) == 10


def test_per_sample_mode_ranks_each_query_sample(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings)
    query_id = jf.insert_query(rq_settings, reg, method="gradient_similarity", mode="per_sample", top_k=3,
                               samples={"x": reg.toy.x_test[:3].tolist(), "y": reg.toy.y_test[:3].tolist()})
    _enqueue(rq_settings, query_id)
    jf.work(rq_settings)
    query = jf.fetch(rq_settings, query_id)
    expected = jf.expected_scores(reg, "gradient_similarity", {}, samples=jf.query_batch(reg, 3), per_sample=True)
    scores = jf.load_scores(rq_settings, query)
    assert scores.shape == (3, 60)
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-4, atol=1e-6)
    for sample in range(3):
        order = np.argsort(-expected[sample].numpy(), kind="stable")
        assert [i for i, _ in jf.ranking(query, "top", sample)] == order[:3].tolist()


def test_self_influence_ranks_training_rows(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings)
    query_id = jf.insert_query(rq_settings, reg, method="gradient_similarity", params={"similarity": "dot"},
                               self_influence=True, top_k=3)
    _enqueue(rq_settings, query_id)
    jf.work(rq_settings)
    query = jf.fetch(rq_settings, query_id)
    expected = jf.expected_scores(reg, "gradient_similarity", {"similarity": "dot"}, samples=None, self_influence=True)[0]
    assert query.status == "succeeded", query.error
    assert [i for i, _ in jf.ranking(query, "top")] == np.argsort(-expected.numpy(), kind="stable")[:3].tolist()


def test_a_missing_model_file_fails_with_a_readable_error(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings)
    query_id = jf.insert_query(rq_settings, reg, params=PARAMS)
    (rq_settings.data_root / "toy.pt").unlink()
    _enqueue(rq_settings, query_id)
    jf.work(rq_settings)
    query = jf.fetch(rq_settings, query_id)
    assert query.status == "failed" and query.results == [] and query.scores_path is None
    assert query.error is not None and query.error.startswith("UriError: uri: no such file")
    assert "\n" not in query.error and "Traceback" not in query.error
    assert not list(rq_settings.scores_dir.glob(f"{query_id}*"))


def test_a_changed_model_file_fails_the_query(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings)
    query_id = jf.insert_query(rq_settings, reg, params=PARAMS)
    torch.jit.save(torch.jit.script(torch.nn.Linear(6, 3)), str(rq_settings.data_root / "toy.pt"))
    _enqueue(rq_settings, query_id)
    jf.work(rq_settings)
    query = jf.fetch(rq_settings, query_id)
    assert query.status == "failed" and "changed since registration" in (query.error or "")


@pytest.mark.parametrize("method,params,mode", [
    ("forward_inf", PARAMS, "joint"),
    ("gradient_similarity", {"similarity": "dot"}, "per_sample"),
])
def test_fan_out_equals_a_single_job(rq_settings: Settings, monkeypatch: pytest.MonkeyPatch, method: str,
                                     params: dict[str, Any], mode: str) -> None:
    reg = jf.register_toy(rq_settings, sizes=(20, 15, 25))
    single = jf.insert_query(rq_settings, reg, method=method, params=params, mode=mode, top_k=6)
    _enqueue(rq_settings, single)
    jf.work(rq_settings)

    monkeypatch.setenv("FANOUT_ROWS", "18")  # shards 20/15/25 → parts [0,10) [10,20) [20,35) [35,47) [47,60)
    get_settings.cache_clear()
    settings = get_settings()
    fanned = jf.insert_query(settings, reg, method=method, params=params, mode=mode, top_k=6)
    _enqueue(settings, fanned)
    jf.work(settings)

    one, many = jf.fetch(settings, single), jf.fetch(settings, fanned)
    assert many.status == "succeeded", many.error
    assert [(p.row_start, p.row_stop, p.status) for p in many.parts] == [
        (0, 10, "succeeded"), (10, 20, "succeeded"), (20, 35, "succeeded"), (35, 47, "succeeded"), (47, 60, "succeeded")]
    assert many.num_parts == 5 and many.progress == 1.0
    # Same rows, same order; scores equal up to float32 rounding: a part's batches are smaller, and
    # BLAS blocks a matmul differently per batch size, so a per-row loss (~0.1–1 here) can move by
    # one fp32 ulp (~1e-7 × L) and so can a loss difference L(θ_K) − L(θ̂).
    np.testing.assert_allclose(jf.load_scores(settings, many), jf.load_scores(settings, one), rtol=1e-5, atol=1e-7)
    key = lambda r: (r.kind, r.sample, r.rank)  # noqa: E731
    ranked_many, ranked_one = sorted(many.results, key=key), sorted(one.results, key=key)
    assert [key(r) for r in ranked_many] == [key(r) for r in ranked_one]
    np.testing.assert_allclose([r.score for r in ranked_many], [r.score for r in ranked_one], rtol=1e-5, atol=1e-7)
    # Same rows at every rank, except that two rows whose scores tie within that rounding may
    # trade places; each ranked row still carries its own id and shard.
    single_scores = np.asarray(jf.load_scores(settings, one)).reshape(-1, 60)  # [Q or 1, N]
    for a, b in zip(ranked_many, ranked_one, strict=True):
        if a.index != b.index:
            tie = abs(single_scores[a.sample, a.index] - single_scores[b.sample, b.index])
            assert tie <= 1e-5 * abs(single_scores[b.sample, b.index]) + 1e-7, (a, b)
        assert (a.sample_id, a.shard) == (f"r{a.index}", _shard_of(a.index, (20, 15, 25)))
    assert sorted(p.name for p in settings.scores_dir.iterdir()) == sorted([f"{single}.npy", f"{fanned}.npy"])


def _shard_of(index: int, sizes: tuple[int, ...]) -> int:
    return int(np.searchsorted(np.cumsum(sizes), index, side="right"))


def test_cancel_mid_run_writes_nothing(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings)
    slow = jf.register_slow_model(rq_settings, reg)
    query_id = jf.insert_query(rq_settings, reg, params={**PARAMS, "batch_size": 2}, model_id=slow)
    runner = threading.Thread(target=jobs.run_query, args=(query_id,))
    runner.start()
    jf.wait_for(lambda: jf.fetch(rq_settings, query_id).progress > 0)
    with session_scope(rq_settings) as session:
        session.execute(update(Query).where(Query.id == query_id).values(status="canceled"))
    runner.join(timeout=30)
    query = jf.fetch(rq_settings, query_id)
    assert not runner.is_alive() and query.status == "canceled"
    assert query.results == [] and query.scores_path is None
    assert not rq_settings.scores_dir.exists() or not any(rq_settings.scores_dir.iterdir())


def test_callback_is_posted_after_the_final_status(rq_settings: Settings) -> None:
    received: list[dict[str, Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return None

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reg = jf.register_toy(rq_settings)
        query_id = jf.insert_query(rq_settings, reg, params=PARAMS,
                                   callback_url=f"http://127.0.0.1:{server.server_port}/hook")
        jobs.run_query(query_id)
    finally:
        server.shutdown()
    assert received == [{"id": query_id, "status": "succeeded"}]


def test_embedded_mode_runs_in_process(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.db.migrate import upgrade_head

    monkeypatch.setenv("DATA_ROOT", str(settings.data_root))
    monkeypatch.setenv("ALLOWED_ARCHITECTURES", settings.allowed_architectures)
    for name in ("DATABASE_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    embedded = get_settings()
    upgrade_head(embedded)
    try:
        reg = jf.register_toy(embedded)
        query_id = jf.insert_query(embedded, reg, params=PARAMS)
        _enqueue(embedded, query_id)
        jf.wait_for(lambda: jf.is_final(embedded, query_id))
        query = jf.fetch(embedded, query_id)
        assert query.status == "succeeded", query.error
        expected = jf.expected_scores(reg, "forward_inf", PARAMS, samples=jf.query_batch(reg))[0]
        np.testing.assert_allclose(jf.load_scores(embedded, query), expected.numpy(), rtol=1e-5, atol=1e-6)
        assert list((embedded.service_dir / "artifacts").glob("*.bin"))  # base losses cached on disk
    finally:
        get_settings.cache_clear()




def test_tracin_uses_registered_checkpoints_with_their_learning_rates(rq_settings: Settings) -> None:
    from attribution.model import ModelAdapter
    from attribution.tasks import ClassificationTask
    from tests.workers import support

    reg = jf.register_toy(rq_settings)
    earlier = support.toy_problem(n=60, seed=1).module  # a different set of weights, same architecture
    ids = []
    with session_scope(rq_settings) as session:
        for name, module in (("ckpt-a.pt", earlier), ("ckpt-b.pt", reg.toy.module)):
            path = support.save_torchscript(module, rq_settings.data_root / name)
            ids.append(support.register_model(session, reg.tenant, path).id)
    query_id = jf.insert_query(rq_settings, reg, method="tracin", top_k=3,
                               stored_extra={"checkpoint_model_ids": ids, "checkpoint_lrs": [0.5, 0.25]})
    jobs.run_query(query_id)
    query = jf.fetch(rq_settings, query_id)
    assert query.status == "succeeded", query.error

    from attribution.artifacts import InMemoryArtifacts
    from attribution.data import TensorTrainingSet
    from attribution.methods.base import FitContext
    from attribution.pipeline import attribute

    task = ClassificationTask()
    context = FitContext(fingerprint="direct", store=InMemoryArtifacts(),
                         checkpoints=[ModelAdapter(earlier, task), ModelAdapter(reg.toy.module, task)],
                         checkpoint_lrs=[0.5, 0.25])
    train = TensorTrainingSet(torch.from_numpy(reg.toy.x), torch.from_numpy(reg.toy.y))
    expected = attribute(ModelAdapter(reg.toy.module, task), "tracin", {}, train, context,
                         queries=jf.query_batch(reg))[0]
    np.testing.assert_allclose(jf.load_scores(rq_settings, query), expected.numpy(), rtol=1e-4, atol=1e-7)

    foreign = jf.insert_query(rq_settings, reg, method="tracin",
                              stored_extra={"checkpoint_model_ids": ["0" * 32], "checkpoint_lrs": [1.0]})
    jobs.run_query(foreign)
    assert "unknown model" in (jf.fetch(rq_settings, foreign).error or "")
