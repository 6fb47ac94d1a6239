"""P3 — repeat and warm queries over HTTP on loopback.

Deployment: `python -m service` + one `python -m workers` on Postgres (a bench database
created by the script) and Redis (database 3), as subprocesses on 127.0.0.1. A model and
a dataset are registered, one Forward-INF query runs to completion, then, from one
keep-alive `httpx` client:
(a) R identical POST /v1/queries (each answered from the stored result: a new query id,
    `cached: true`, no model touched), and
(b) R GET /v1/queries/{id} of the finished query;
p50/p99 latency of each (targets p50 ≤ 10 ms, p99 ≤ 50 ms). Then a *new* query (other
samples) on the warmed model and data: its `timings` show the base losses served from the
cache (`base_losses_s` ≈ 0), i.e. one sweep, against the first query's two.

Last, queries per minute one worker serves at this N: B new Forward-INF queries POSTed
while no worker runs; then one fresh worker serves them, timed from the first query's
`started_at` to the last `finished_at` (server clocks, worker start-up excluded), with
batching (`workers.batching`: one sweep for all B) and without (`BATCH_MAX_QUERIES=1`).
"""

from __future__ import annotations

import tempfile
import time
from datetime import datetime
from pathlib import Path

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

STUDY = "p3_repeat_latency"
BURST = 16
P50_MS, P99_MS = 10.0, 50.0


def run(options: Options) -> Report:
    n = 2_000 if options.quick else 20_000
    requests = 50 if options.quick else 300
    burst = 4 if options.quick else BURST
    report = Report(STUDY, "P3 — Repeat and warm queries over HTTP", options.quick)
    x, y = blobs(n + 2 + 2 * burst, seed=3)
    module = trained_mlp(x, y, hidden=(64,))
    with tempfile.TemporaryDirectory(prefix="p3-") as tmp:
        root = Path(tmp) / "data"
        model_path = save_safetensors(module, root / "mlp.safetensors")
        shards = write_shards(root / "shards", x[:n], y[:n], rows_per_shard=max(n // 4, 1))
        with Deployment(root, db="attribution_bench_p3", redis_db=3, workers=1) as d:
            model_id, dataset_id = d.register(model_path, shards)

            def body(row: int) -> dict:
                return {"model_id": model_id, "dataset_id": dataset_id, "method": "forward_inf",
                        "samples": {"x": [x[row].tolist()], "y": [int(y[row])]}, "params": {"steps": 5, "lr": 0.01, "normalize": "none"},
                        "top_k": 10}

            first = d.client.post("/v1/queries", json=body(n)).json()
            first = d.wait_final([first["id"]], timeout=600)[first["id"]]
            if first["status"] != "succeeded":
                raise RuntimeError(f"first query {first['status']}: {first['error']}")

            post_s, cached = [], 0
            for _ in range(requests):
                began = time.perf_counter()
                response = d.client.post("/v1/queries", json=body(n))
                post_s.append(time.perf_counter() - began)
                cached += int(response.status_code == 202 and response.json()["cached"])
            get_s = []
            for _ in range(requests):
                began = time.perf_counter()
                response = d.client.get(f"/v1/queries/{first['id']}")
                get_s.append(time.perf_counter() - began)
                if response.status_code != 200:
                    raise RuntimeError(f"GET answered {response.status_code}")

            second = d.client.post("/v1/queries", json=body(n + 1)).json()
            second = d.wait_final([second["id"]], timeout=600)[second["id"]]
            metrics = d.client.get("/metrics").text
            served = {}
            for label, cap in (("batched", str(burst)), ("one by one", "1")):
                d.stop_workers()  # queue all B first, then let one fresh worker serve them
                offset = 2 if label == "batched" else 2 + burst
                ids = [d.client.post("/v1/queries", json=body(n + offset + q)).json()["id"] for q in range(burst)]
                d.add_workers(1, {"BATCH_MAX_QUERIES": cap})
                d.wait_workers()
                finals = d.wait_final(ids, timeout=1800, interval=0.1)
                first_start = min(datetime.fromisoformat(b["started_at"]) for b in finals.values())
                last_end = max(datetime.fromisoformat(b["finished_at"]) for b in finals.values())
                groups = sorted({int(b["result"]["extras"].get("batched_queries", 1)) for b in finals.values()
                                 if b["status"] == "succeeded"})
                served[label] = ((last_end - first_start).total_seconds(),
                                 sum(b["status"] == "succeeded" for b in finals.values()), groups)

    t1, t2 = first["result"]["timings"], second["result"]["timings"]
    p50_post, p99_post = percentile(post_s, 50) * 1000, percentile(post_s, 99) * 1000
    p50_get, p99_get = percentile(get_s, 50) * 1000, percentile(get_s, 99) * 1000
    report.setup = (
        f"`python -m service` + 1 `python -m workers` (Postgres database `attribution_bench_p3`, Redis db 3) as "
        f"subprocesses on 127.0.0.1; {n:,} rows in 4 `.npz` shards, MLP 64→64→10 (eager, safetensors + allowlisted architecture); Forward-INF joint "
        f"queries of one sample (SGD K=5, α=0.01). {requests} sequential requests per kind over one keep-alive "
        f"`httpx` connection, timed client-side (request sent → body read). Machine: {machine()}."
    )
    report.figure("identical repeat POST, p50 ms", p50_post, "—", "BENCHMARKS.md P3", f"≤ {P50_MS:.0f}", p50_post <= P50_MS)
    report.figure("identical repeat POST, p99 ms", p99_post, "—", "BENCHMARKS.md P3", f"≤ {P99_MS:.0f}", p99_post <= P99_MS)
    report.figure("GET finished query, p50 ms", p50_get, "—", "BENCHMARKS.md P3", f"≤ {P50_MS:.0f}", p50_get <= P50_MS)
    report.figure("GET finished query, p99 ms", p99_get, "—", "BENCHMARKS.md P3", f"≤ {P99_MS:.0f}", p99_get <= P99_MS)
    report.figure("repeats answered from the stored result (cached: true)", f"{cached}/{requests}", "—", "this run",
                  f"{requests}/{requests}", cached == requests)
    sweeps_first = t1.get("base_losses_s", 0.0) + t1.get("sweep_s", 0.0)
    warm_ratio = t2.get("total_s", float("nan")) / t1.get("total_s", float("nan"))
    one_sweep = t2.get("base_losses_s", 1.0) < 0.1 * max(t2.get("sweep_s", 0.0), 1e-9)
    report.figure("new query on the warmed model: base-loss sweep s (cached → ≈ 0)", t2.get("base_losses_s", float("nan")),
                  "—", "this run", "≪ sweep_s (one sweep, not two)", one_sweep)
    report.figure("new warm query total_s ÷ first query total_s", warm_ratio, "—", "this run")
    report.table("Latency over HTTP", LATENCY_HEADER,
                 [latency_row("identical repeat POST /v1/queries", post_s), latency_row("GET /v1/queries/{id}", get_s)])
    qpm = {label: 60 * burst / seconds for label, (seconds, _, _) in served.items()}
    report.figure(f"queries/minute, 1 worker, N={n:,}, batched ({burst} queued)", qpm["batched"], "—", "this run")
    report.figure(f"queries/minute, 1 worker, N={n:,}, one by one", qpm["one by one"], "—", "this run")
    report.figure("batching speed-up", qpm["batched"] / qpm["one by one"], "—", "this run", "> 1",
                  qpm["batched"] > qpm["one by one"])
    report.table(f"{burst} new queries queued at once, one worker", ["mode", "seconds", "queries / minute", "succeeded",
                                                                    "batch sizes seen"],
                 [[label, f"{seconds:.2f}", f"{qpm[label]:.1f}", f"{ok}/{burst}", ", ".join(map(str, groups))]
                  for label, (seconds, ok, groups) in served.items()])
    keys = sorted(set(t1) | set(t2))
    report.table("Worker timings (seconds) of the first query and of a new query on the warmed model",
                 ["phase", "first query (cold)", "new query (warm)"],
                 [[k, f"{t1.get(k, 0.0):.4f}", f"{t2.get(k, 0.0):.4f}"] for k in keys])
    cache_lines = [line for line in metrics.splitlines() if "cache" in line and not line.startswith("#")]
    report.note(f"First query: base-loss sweep {t1.get('base_losses_s', 0.0):.3f} s + query sweep "
                f"{t1.get('sweep_s', 0.0):.3f} s = {sweeps_first:.3f} s of sweeping; the warm query sweeps once "
                f"({t2.get('sweep_s', 0.0):.3f} s). /metrics cache counters at the end: "
                + ("; ".join(cache_lines[:6]) or "none"))
    return report


def main(argv: list[str] | None = None) -> Report:
    return run_study(run, __doc__ or STUDY, argv)


if __name__ == "__main__":
    main()
