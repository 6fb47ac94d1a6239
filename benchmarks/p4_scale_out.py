"""P4 — scale-out: one dataset, 1 → 2 → 4 `python -m workers` processes on Postgres + Redis.

The dataset (N rows in 16 `.npz` shards) is larger than `FANOUT_ROWS` = N / 8, so every
Forward-INF query fans out into 8 part jobs (`workers.fanout`) that any worker can take;
the last part merges. One warm-up query fills the base-loss cache (one entry per part).
Then, for each worker count k, exactly k fresh workers are started and, once all listen,
two rounds of the same Q queries are POSTed at once (same samples; `top_k` differs per
round so the API computes them again instead of answering from the stored result):

- the first round warms the fresh workers (each verifies the hashes of the shards and the
  model it touches once per process, builds the model, opens its database and Redis
  connections); it is timed and reported, but it measures start-up, not throughput;
- the second round is the throughput figure: steady-state workers, as in a running
  deployment, timed from the first query's `started_at` to the last `finished_at` (server
  clocks, so the client's polling interval does not enter; it polls every 0.5 s to keep
  its own load on the API low).

Throughput = Q·N rows scored per second. Each round's score files are compared with the
1-worker round's (identical results across worker counts). Every worker runs one intra-op
thread, so k workers use k cores: on this 2-core machine gains stop at 2 workers (the API,
Postgres and Redis share the same cores). The per-part phases come from the queries'
`timings` (summed over parts by the merge).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
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
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="p4-") as tmp:
        root = Path(tmp) / "data"
        model_path = save_safetensors(module, root / "mlp.safetensors")
        shards = write_shards(root / "shards", x[:n], y[:n], rows_per_shard=n // 16)
        env = {"FANOUT_ROWS": str(n // PARTS), "BATCH_MAX_QUERIES": "1"}
        with Deployment(root, db="attribution_bench_p4", redis_db=4, workers=1, env=env, worker_threads=1) as d:
            model_id, dataset_id = d.register(model_path, shards)

            def post_round(top_k: int) -> dict[str, dict]:
                ids = [d.client.post("/v1/queries", json={
                    "model_id": model_id, "dataset_id": dataset_id, "method": "forward_inf",
                    "samples": {"x": [x[n + q].tolist()], "y": [int(y[n + q])]},
                    "params": {"steps": 5, "lr": 0.01, "batch_size": 1024, "normalize": "none"}, "top_k": top_k,
                }).json()["id"] for q in range(num_queries)]
                final = d.wait_final(ids, timeout=3600, interval=0.5)
                failed = [f"{i}: {b['error']}" for i, b in final.items() if b["status"] != "succeeded"]
                if failed:
                    raise RuntimeError(f"failed queries {failed}")
                parts = {b["result"]["extras"].get("num_parts") for b in final.values()}
                if parts != {PARTS}:
                    raise RuntimeError(f"expected {PARTS} parts per query, got {parts}")
                return {i: final[i] for i in ids}

            post_round(1)  # fills the base-loss cache
            for index, count in enumerate(counts):
                d.stop_workers()
                d.add_workers(count)
                d.wait_workers()  # imports done, all k workers listening
                first = post_round(10 + 2 * index)
                timed = post_round(11 + 2 * index)
                rounds.append(Round(count, _span(first), _span(timed), _phase_ms(timed),
                                    {str(q): d.scores(i) for q, i in enumerate(timed)}))

    base = rounds[0]
    rows, throughput = [], []
    for r in rounds:
        diff = max(float(np.max(np.abs(r.scores[q] - base.scores[q]))) for q in base.scores)
        rate = num_queries * n / r.seconds
        throughput.append(rate)
        rows.append([str(r.workers), f"{r.seconds:.2f}", f"{rate:,.0f}", f"{60 * num_queries / r.seconds:.1f}",
                     f"{base.seconds / r.seconds:.2f}×", f"{r.first_seconds:.2f}", f"{diff:.1e}"])
        identical = diff == 0.0
        report.figure(f"{r.workers} worker(s): speed-up over 1 worker", base.seconds / r.seconds, "—", "this run",
                      "grows up to the 2 cores" if r.workers <= 2 else "≈ the 2-worker figure (2 cores)",
                      None if r.workers != 2 or options.quick else base.seconds / r.seconds > 1.2)
        report.figure(f"{r.workers} worker(s): scores identical to the 1-worker run",
                      "yes" if identical else f"max |Δ| {diff:.1e}", "—", "this run", "identical", identical)
    report.table("Throughput per worker count (steady state: the second round on the same workers)",
                 ["workers", "seconds for all queries", "rows scored / s", "queries / minute", "speed-up",
                  "first round on fresh workers, s", "max |Δscore| vs 1 worker"], rows)
    phases = sorted({name for r in rounds for name in r.phase_ms}, key=_PHASE_ORDER.index)
    report.table("Where a part job's time goes (timed round, mean ms per part, from the queries' `timings`)",
                 ["workers", *phases],
                 [[str(r.workers), *(f"{r.phase_ms.get(name, 0.0):.1f}" for name in phases)] for r in rounds])
    report.setup = (
        f"{n:,} rows (64-feature blobs) in 16 `.npz` shards, MLP 64→64→10 (eager, safetensors + allowlisted architecture); `FANOUT_ROWS` = {n // PARTS:,} "
        f"so each query is {PARTS} part jobs plus a merge. `python -m service` + k × `python -m workers` "
        f"(one intra-op thread each, `OMP_NUM_THREADS=1`) on Postgres (`attribution_bench_p4`) and Redis (db 4), "
        f"127.0.0.1; batching off (`BATCH_MAX_QUERIES=1`) so the parts are the unit of work. Base losses cached by "
        f"a warm-up query. Per worker count: k fresh workers, then {num_queries} Forward-INF queries (SGD K=5, "
        f"α=0.01, one sample each) POSTed at once, twice: the first round warms the new workers (reported, not the "
        f"throughput figure), the second is timed from the first query's `started_at` to the last `finished_at` "
        f"(server clocks). Machine: {machine()} — with 2 cores, expect gains up to 2 workers and none beyond."
    )
    report.note(
        "Why two rounds: a fresh worker pays once per process for what a running deployment has already done "
        "(hashing the shards and the model it verifies, building the model, opening connections). Timing the "
        "first round after starting k workers charges that start-up k times to the k-worker figure, so the "
        "steady-state round is the throughput measurement; the first round's time is listed beside it. "
        "`part_claim_s` is the lease plus the database round trips that mark a part running and read its rows; "
        "`load_s` the model (memoised per process), shard hash checks (memoised per file version) and the query "
        "samples; `base_losses_s` the cached L(θ̂, z) read from Redis; `unlearn_s` the K SGD steps on the query; "
        "`sweep_s` the forward pass over the part's rows; `merge_read_s` (per query, shown per part) reading the "
        "part files before the ranking is stored."
    )
    plot = curves(options.out / f"{STUDY}.png",
                  {"rows scored / s": (np.array([r.workers for r in rounds], dtype=float), np.array(throughput))},
                  "worker processes", "rows scored per second", "P4: throughput vs workers (2-core machine)")
    report.plots.append(plot.name)
    return report


_PHASE_ORDER = ["part_claim_s", "load_s", "base_losses_s", "unlearn_s", "sweep_s", "total_s", "merge_read_s"]


@dataclass
class Round:
    workers: int
    first_seconds: float  # the warming round on fresh workers
    seconds: float  # the timed, steady-state round
    phase_ms: dict[str, float]  # mean per part
    scores: dict[str, np.ndarray]


def _span(final: dict[str, dict]) -> float:
    """Seconds from the first `started_at` to the last `finished_at` (server clocks)."""
    began = min(datetime.fromisoformat(b["started_at"]) for b in final.values())
    ended = max(datetime.fromisoformat(b["finished_at"]) for b in final.values())
    return (ended - began).total_seconds()


def _phase_ms(final: dict[str, dict]) -> dict[str, float]:
    """Mean milliseconds per part of each known phase in the queries' `timings`."""
    parts = sum(int(b["result"]["extras"]["num_parts"]) for b in final.values())
    totals: dict[str, float] = {}
    for body in final.values():
        for name, seconds in body["result"]["timings"].items():
            if name in _PHASE_ORDER:
                totals[name] = totals.get(name, 0.0) + 1000 * float(seconds)
    return {name: value / parts for name, value in totals.items()}


def main(argv: list[str] | None = None) -> Report:
    return run_study(run, __doc__ or STUDY, argv)


if __name__ == "__main__":
    main()
