"""P4 — scale-out: one dataset, 1 → 2 → 4 `python -m workers` processes on Postgres + Redis.

The dataset (N rows in 16 `.npz` shards) is larger than `FANOUT_ROWS` = N / 8, so every
Forward-INF query fans out into 8 part jobs (`workers.fanout`) that any worker can take;
the last part merges. One warm-up query fills the base-loss cache (one entry per part),
then for each worker count the same Q queries (same samples; `top_k` differs per round so
the API computes them again instead of answering from the stored result) are POSTed at
once when all k workers listen, timed from the first `started_at` to the last
`finished_at` (server clocks). Throughput = Q·N rows scored per second. Each round's
score files are compared with the first round's (identical results across worker counts).
Every worker runs one intra-op thread, so k workers use k cores: on this 2-core machine
gains stop at 2 workers.
"""

from __future__ import annotations

import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np

from benchmarks.cli import Options, run_study
from benchmarks.plots import curves
from benchmarks.report import Report
from benchmarks.speed_common import (
    Deployment,
    blobs,
    machine,
    save_safetensors,
    trained_mlp,
    write_shards,
)

STUDY = "p4_scale_out"
PARTS = 8


def run(options: Options) -> Report:
    n = 16_000 if options.quick else 400_000
    num_queries = 2 if options.quick else 4
    counts = [1, 2] if options.quick else [1, 2, 4]
    report = Report(STUDY, "P4 — Scale-out over RQ workers", options.quick)
    x, y = blobs(n + num_queries, seed=4)
    module = trained_mlp(x, y, hidden=(64,))
    rounds: list[tuple[int, float, dict[str, np.ndarray]]] = []
    with tempfile.TemporaryDirectory(prefix="p4-") as tmp:
        root = Path(tmp) / "data"
        model_path = save_safetensors(module, root / "mlp.safetensors")
        shards = write_shards(root / "shards", x[:n], y[:n], rows_per_shard=n // 16)
        env = {"FANOUT_ROWS": str(n // PARTS), "BATCH_MAX_QUERIES": "1"}
        with Deployment(root, db="attribution_bench_p4", redis_db=4, workers=1, env=env, worker_threads=1) as d:
            model_id, dataset_id = d.register(model_path, shards)

            def body(q: int, top_k: int) -> dict:
                return {"model_id": model_id, "dataset_id": dataset_id, "method": "forward_inf",
                        "samples": {"x": [x[n + q].tolist()], "y": [int(y[n + q])]},
                        "params": {"steps": 5, "lr": 0.01, "batch_size": 1024}, "top_k": top_k}

            warm = d.client.post("/v1/queries", json=body(0, 1)).json()["id"]
            done = d.wait_final([warm], timeout=1800)[warm]
            if done["status"] != "succeeded":
                raise RuntimeError(f"warm-up query {done['status']}: {done['error']}")
            for index, count in enumerate(counts):
                d.stop_workers()
                d.add_workers(count)
                d.wait_workers()  # imports done, all k workers listening
                ids = [d.client.post("/v1/queries", json=body(q, 10 + index)).json()["id"] for q in range(num_queries)]
                final = d.wait_final(ids, timeout=3600, interval=0.2)
                began = min(datetime.fromisoformat(b["started_at"]) for b in final.values())
                ended = max(datetime.fromisoformat(b["finished_at"]) for b in final.values())
                seconds = (ended - began).total_seconds()
                failed = [f"{i}: {b['error']}" for i, b in final.items() if b["status"] != "succeeded"]
                if failed:
                    raise RuntimeError(f"{count} workers: failed queries {failed}")
                parts = {final[i]["result"]["extras"].get("num_parts") for i in ids}
                if parts != {PARTS}:
                    raise RuntimeError(f"expected {PARTS} parts per query, got {parts}")
                rounds.append((count, seconds, {str(q): d.scores(i) for q, i in enumerate(ids)}))

    _, base_seconds, base_scores = rounds[0]
    rows, throughput = [], []
    for count, seconds, scores in rounds:
        diff = max(float(np.max(np.abs(scores[q] - base_scores[q]))) for q in base_scores)
        rate = num_queries * n / seconds
        throughput.append(rate)
        rows.append([str(count), f"{seconds:.2f}", f"{rate:,.0f}", f"{60 * num_queries / seconds:.1f}",
                     f"{base_seconds / seconds:.2f}×", f"{diff:.1e}"])
        identical = diff == 0.0
        report.figure(f"{count} worker(s): speed-up over 1 worker", base_seconds / seconds, "—", "this run",
                      "grows up to the 2 cores" if count <= 2 else "≈ the 2-worker figure (2 cores)",
                      None if count != 2 or options.quick else base_seconds / seconds > 1.2)
        report.figure(f"{count} worker(s): scores identical to the 1-worker run", "yes" if identical else f"max |Δ| {diff:.1e}",
                      "—", "this run", "identical", identical)
    report.table("Throughput per worker count", ["workers", "seconds for all queries", "rows scored / s",
                                                 "queries / minute", "speed-up", "max |Δscore| vs 1 worker"], rows)
    report.setup = (
        f"{n:,} rows (64-feature blobs) in 16 `.npz` shards, MLP 64→64→10 (eager, safetensors + allowlisted architecture); `FANOUT_ROWS` = {n // PARTS:,} "
        f"so each query is {PARTS} part jobs plus a merge. `python -m service` + k × `python -m workers` "
        f"(one intra-op thread each, `OMP_NUM_THREADS=1`) on Postgres (`attribution_bench_p4`) and Redis (db 4), "
        f"127.0.0.1; batching off (`BATCH_MAX_QUERIES=1`) so the parts are the unit of work. Base losses cached by "
        f"a warm-up query; per worker count, {num_queries} Forward-INF queries (SGD K=5, α=0.01, one sample each) "
        f"POSTed at once after all k workers registered with RQ, timed from the first query's `started_at` to the "
        f"last `finished_at` (server clocks). Machine: {machine()} — with 2 cores, expect gains up to 2 "
        f"workers and none beyond."
    )
    plot = curves(options.out / f"{STUDY}.png",
                  {"rows scored / s": (np.array([c for c, _, _ in rounds], dtype=float), np.array(throughput))},
                  "worker processes", "rows scored per second", "P4: throughput vs workers (2-core machine)")
    report.plots.append(plot.name)
    return report


def main(argv: list[str] | None = None) -> Report:
    return run_study(run, __doc__ or STUDY, argv)


if __name__ == "__main__":
    main()
