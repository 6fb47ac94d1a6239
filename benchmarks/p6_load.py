"""P6 — API under load: 1,000 queries POSTed by 50 concurrent clients, Postgres + Redis, 2 workers.

Deployment: `python -m service --processes N` (`--api-processes N`, default 1) + 2
`python -m workers` (subprocesses, 127.0.0.1) on a bench Postgres database and Redis db 6.
Queries are cheap (MLP 64→64→10, 500 training rows) and mixed: each client draws its samples
from a pool of 200 test points, so some requests repeat an earlier one (answered from the
stored result once that one succeeded, or queued again before) and the rest are new; every
request carries a unique `Idempotency-Key`, and 10% of them are retried with the same key
(must return the same id, not a new query). Checks: every POST accepted (202), every retry
returned its original id, the database holds exactly the accepted queries (none lost or
duplicated), and every one reaches a final status (polled with a bounded deadline). Reports
p50/p99 POST latency under load and of the GETs used for polling.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from benchmarks.cli import Options, run_study
from benchmarks.report import Report
from benchmarks.speed_common import (
    LATENCY_HEADER,
    Deployment,
    blobs,
    latency_row,
    machine,
    percentile,
    save_safetensors,
    trained_mlp,
    write_shards,
)

STUDY = "p6_load"
ROWS = 500
POOL = 200
RETRY_SHARE = 0.1


async def _client(url: str, bodies: list[dict[str, Any]], post_s: list[float], accepted: dict[str, str],
                  replays: list[tuple[str, str]], failures: list[str], seed: int) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        for body in bodies:
            key = uuid.uuid4().hex
            began = time.perf_counter()
            response = await client.post("/v1/queries", json=body, headers={"Idempotency-Key": key})
            post_s.append(time.perf_counter() - began)
            if response.status_code != 202:
                failures.append(f"POST {response.status_code}: {response.text[:200]}")
                continue
            accepted[key] = response.json()["id"]
            if rng.random() < RETRY_SHARE:
                again = await client.post("/v1/queries", json=body, headers={"Idempotency-Key": key})
                replays.append((accepted[key], again.json().get("id", "") if again.status_code == 202 else ""))


async def _load(url: str, bodies: list[dict[str, Any]], clients: int) -> tuple[list[float], dict[str, str], list[tuple[str, str]], list[str]]:
    post_s: list[float] = []
    accepted: dict[str, str] = {}
    replays: list[tuple[str, str]] = []
    failures: list[str] = []
    share = [bodies[i::clients] for i in range(clients)]
    await asyncio.gather(*(_client(url, part, post_s, accepted, replays, failures, seed=i)
                           for i, part in enumerate(share)))
    return post_s, accepted, replays, failures


def run(options: Options, api_processes: int = 1) -> Report:
    total, clients = (100, 10) if options.quick else (1000, 50)
    report = Report(STUDY, "P6 — API under load", options.quick)
    x, y = blobs(ROWS + POOL, seed=6)
    module = trained_mlp(x, y, hidden=(64,), rows=ROWS)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="p6-") as tmp:
        root = Path(tmp) / "data"
        weights = save_safetensors(module, root / "mlp.safetensors")
        shards = write_shards(root / "shards", x[:ROWS], y[:ROWS], rows_per_shard=250)
        with Deployment(root, db="attribution_bench_p6", redis_db=6, workers=2, api_processes=api_processes,
                        worker_threads=1) as d:
            model_id, dataset_id = d.register(weights, shards)
            bodies = []
            for _ in range(total):
                row = ROWS + rng.randrange(POOL)
                bodies.append({"model_id": model_id, "dataset_id": dataset_id, "method": "forward_inf",
                               "samples": {"x": [x[row].tolist()], "y": [int(y[row])]},
                               "params": {"steps": 3, "lr": 0.01, "normalize": "none"},
                               "top_k": 5})
            began = time.perf_counter()
            post_s, accepted, replays, failures = asyncio.run(_load(d.url, bodies, clients))
            submit_s = time.perf_counter() - began
            ids = list(accepted.values())
            get_s: list[float] = []
            final: dict[str, str] = {}
            deadline = time.monotonic() + (300 if options.quick else 1200)
            pending = set(ids)
            while pending and time.monotonic() < deadline:
                for query_id in list(pending):
                    t0 = time.perf_counter()
                    body = d.client.get(f"/v1/queries/{query_id}").json()
                    get_s.append(time.perf_counter() - t0)
                    if body["status"] in ("succeeded", "failed", "canceled"):
                        final[query_id] = body["status"]
                        pending.discard(query_id)
                if pending:
                    time.sleep(0.5)
            drain_s = time.perf_counter() - began
            listed = _listed_ids(d.client)

    replayed_ok = sum(1 for original, again in replays if original == again)
    statuses = {s: sum(1 for v in final.values() if v == s) for s in ("succeeded", "failed", "canceled")}
    unique = len(set(ids)) == len(ids)
    db_matches = listed == set(ids)
    api = "one API process" if api_processes == 1 else f"{api_processes} API processes"
    report.setup = (
        f"`python -m service --processes {api_processes}` ({api}) + 2 × `python -m workers` "
        f"(one intra-op thread each) on Postgres "
        f"(`attribution_bench_p6`) and Redis (db 6), 127.0.0.1. {total:,} Forward-INF queries (SGD K=3, α=0.01, "
        f"one sample each, drawn from a pool of {POOL} test points, so repeats and new queries mix) POSTed by "
        f"{clients} concurrent `httpx.AsyncClient`s, each request with its own `Idempotency-Key`; "
        f"{RETRY_SHARE:.0%} retried with the same key. Training set {ROWS} rows in 2 shards, MLP 64→64→10. "
        f"Machine: {machine()}."
    )
    report.figure("POSTs accepted (202)", f"{len(ids)}/{total}", "—", "BENCHMARKS.md P6", f"{total}/{total}",
                  len(ids) == total and not failures)
    report.figure("query ids unique and equal to the database's queries", "yes" if unique and db_matches else "no",
                  "—", "BENCHMARKS.md P6", "none lost or duplicated", unique and db_matches)
    report.figure("Idempotency-Key retries answered with the original id", f"{replayed_ok}/{len(replays)}", "—",
                  "this run", "all", replayed_ok == len(replays))
    report.figure("queries reaching a final status", f"{len(final)}/{len(ids)}", "—", "BENCHMARKS.md P6",
                  "all", len(final) == len(ids) == total)
    report.figure("POST latency under load, p50 ms", 1000 * percentile(post_s, 50), "—", "this run")
    report.figure("POST latency under load, p99 ms", 1000 * percentile(post_s, 99), "—", "this run")
    report.table("Final statuses", ["succeeded", "failed", "canceled", "not final at the deadline"],
                 [[str(statuses["succeeded"]), str(statuses["failed"]), str(statuses["canceled"]),
                   str(len(ids) - len(final))]])
    report.table("API latency during the run", LATENCY_HEADER,
                 [latency_row(f"POST /v1/queries ({clients} concurrent clients)", post_s),
                  latency_row("GET /v1/queries/{id} (polling, 1 client)", get_s)])
    report.note(f"All {total:,} POSTs took {submit_s:.1f} s ({total / submit_s:.0f} requests/s); every query was "
                f"final {drain_s:.1f} s after the first POST.")
    rate = total / submit_s
    report.note(f"Latency under load is queueing: by Little's law a POST waits about clients ÷ throughput = "
                f"{clients} ÷ {rate:.0f}/s ≈ {1000 * clients / rate:.0f} ms (measured p50 "
                f"{1000 * percentile(post_s, 50):.0f} ms), with {api} serving a request every "
                f"{1000 / rate:.0f} ms on {os.cpu_count()} cores shared with the 2 busy workers "
                f"(P3 has the idle-server latency).")
    for failure in failures[:5]:
        report.note(f"rejected: {failure}")
    return report


def _listed_ids(client: httpx.Client) -> set[str]:
    """Every query id the API lists for this (auth-off) tenant, following the pagination."""
    out: set[str] = set()
    offset: int | None = 0
    for _ in range(1000):
        page = client.get("/v1/queries", params={"limit": 100, "offset": offset}).json()
        out.update(item["id"] for item in page["items"])
        offset = page["next_offset"]
        if offset is None:
            break
    return out


def main(argv: list[str] | None = None) -> Report:
    """`python -m benchmarks.p6_load [--api-processes N] [--quick] [--out DIR]`."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--api-processes", type=int, default=1, help="processes of `python -m service` (default 1)")
    known, rest = parser.parse_known_args(argv)
    return run_study(functools.partial(run, api_processes=known.api_processes), __doc__ or STUDY, rest)


if __name__ == "__main__":
    main()
