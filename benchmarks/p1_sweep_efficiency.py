"""P1 — sweep efficiency: a Forward-INF query over N rows vs plain batched inference.

The physical floor of a Forward-INF query is one forward pass per training row. Both sides
read the same `.npz` shards through `loading.ShardedTrainingSet` (the worker's
streaming loader, prefetching on a thread) with the same batch size and the same MLP:
- plain inference: `F.cross_entropy(model(x), y, reduction="none")` per batch under
  `torch.inference_mode()`, written into an `[N]` vector;
- Forward-INF: `attribute(model, "forward_inf", ...)` for one new joint query with the base
  losses L(θ̂, ·) already cached (so the call is: K unlearning steps + one sweep + subtraction).
Repetitions alternate the two sides with one intra-op thread; the ratio of median CPU
seconds (robust when other jobs share the machine) is the headline figure (target ≥ 0.9),
the ratio of median wall seconds is reported beside it.
A per_sample query with Q samples (Q unlearned models evaluated in the same sweep) is
timed too, as the cost per query when queries share a pass.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from attribution.artifacts import InMemoryArtifacts
from attribution.data import Batch
from attribution.methods.base import FitContext
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from attribution.tasks import ClassificationTask
from benchmarks.cli import Options, Stopwatch, run_study
from benchmarks.report import Report
from benchmarks.speed_common import (
    Clock,
    Repetitions,
    add_repetition_tables,
    blobs,
    machine,
    median_seconds,
    torch_threads,
    trained_mlp,
    write_shards,
)
from loading import ShardedTrainingSet

STUDY = "p1_sweep_efficiency"
TARGET = 0.9
BATCH = 1024
HIDDEN = (256, 256)
PER_SAMPLE_Q = 8


def plain_inference(model: torch.nn.Module, train: ShardedTrainingSet, batch_size: int) -> torch.Tensor:
    """`[N]` per-row losses: the floor, one forward pass per row."""
    out = torch.empty(len(train))
    with torch.inference_mode():
        for start, batch in train.batches(batch_size):
            losses = F.cross_entropy(model(batch.inputs), batch.targets, reduction="none")
            out[start:start + len(losses)] = losses
    return out


def run(options: Options) -> Report:
    n = 10_000 if options.quick else 200_000
    repeats = 3 if options.quick else 7
    report = Report(STUDY, "P1 — Forward-INF sweep vs plain inference", options.quick)
    x, y = blobs(n + 16, seed=1)
    module = trained_mlp(x, y, hidden=HIDDEN)
    adapter = ModelAdapter(module, ClassificationTask())
    query = Batch(torch.from_numpy(x[n:n + 1]), torch.from_numpy(y[n:n + 1]))
    queries = Batch(torch.from_numpy(x[n:n + PER_SAMPLE_Q]), torch.from_numpy(y[n:n + PER_SAMPLE_Q]))
    params = {"steps": 5, "lr": 0.01, "batch_size": BATCH}

    with tempfile.TemporaryDirectory(prefix="p1-") as tmp:
        paths = write_shards(Path(tmp), x[:n], y[:n], rows_per_shard=max(n // 8, 1))
        train = ShardedTrainingSet([(p, "npz", min(n // 8, n - i * (n // 8))) for i, p in enumerate(paths)],
                                   task="classification")
        context = FitContext(fingerprint="p1", store=InMemoryArtifacts())
        with Stopwatch() as base_watch:  # caches L(θ̂, ·) (a service worker does this once per model+data)
            attribute(adapter, "forward_inf", params, train, context, queries=query)
        plain_inference(module, train, BATCH)  # warm-up: allocator, thread pool, page cache
        attribute(adapter, "forward_inf", params, train, context, queries=queries, per_sample=True)
        plain_c: Repetitions = []
        finf_c: Repetitions = []
        per_sample_c: Repetitions = []
        with torch_threads(1):
            for _ in range(repeats):
                with Clock() as c:
                    floor = plain_inference(module, train, BATCH)
                plain_c.append((c.wall, c.cpu))
                with Clock() as c:
                    scores = attribute(adapter, "forward_inf", params, train, context, queries=query)
                finf_c.append((c.wall, c.cpu))
                with Clock() as c:
                    attribute(adapter, "forward_inf", params, train, context, queries=queries, per_sample=True)
                per_sample_c.append((c.wall, c.cpu))
        sweep_timings = dict(context.timings)

    plain, finf, per_sample = (median_seconds(v) for v in (plain_c, finf_c, per_sample_c))  # CPU seconds
    ratio = plain / finf
    wall_ratio = median_seconds(plain_c, cpu=False) / median_seconds(finf_c, cpu=False)
    if scores.shape != (1, n) or not torch.isfinite(floor).all():
        raise RuntimeError("unexpected output shapes")
    report.setup = (
        f"{n:,} training rows (Gaussian blobs, 64 features, 10 classes) in 8 `.npz` shards read by "
        f"`ShardedTrainingSet` (prefetching), batch size {BATCH} on both sides; MLP 64→{HIDDEN[0]}→{HIDDEN[1]}→10 (tanh), "
        f"eager, fp32, one intra-op thread. Forward-INF: one new joint query (1 sample, SGD K=5, α=0.01) through "
        f"`attribution.pipeline.attribute`, base losses cached beforehand (first call {base_watch.seconds:.2f} s "
        f"incl. the base sweep), then one untimed warm-up pass of each side. {repeats} alternating repetitions, medians. Machine: {machine()}."
    )
    report.figure("Forward-INF throughput / plain inference throughput (CPU time)", ratio,
                  "1.0 = one forward pass per row", "BENCHMARKS.md P1", f"≥ {TARGET}", ratio >= TARGET)
    report.figure("same ratio in wall time", wall_ratio, "—", "this run")
    report.figure("plain inference, rows/s", n / plain, "—", "this run")
    report.figure("Forward-INF query, rows/s", n / finf, "—", "this run")
    report.figure(f"per_sample query, Q={PER_SAMPLE_Q}: seconds per query sample / plain sweep",
                  per_sample / PER_SAMPLE_Q / plain, "—", "this run")
    add_repetition_tables(report, {"plain inference": plain_c, "Forward-INF (1 query)": finf_c,
                                   f"Forward-INF per_sample (Q={PER_SAMPLE_Q})": per_sample_c}, sweep_timings)
    report.timing("plain inference (one pass), CPU s", plain, f"{n:,} rows")
    report.timing("Forward-INF, new query (base losses cached)", finf, "unlearning K=5 + one sweep")
    report.timing(f"Forward-INF per_sample, per query sample (Q={PER_SAMPLE_Q})", per_sample / PER_SAMPLE_Q,
                  "Q unlearned models in one sweep")
    return report


def main(argv: list[str] | None = None) -> Report:
    return run_study(run, __doc__ or STUDY, argv)


if __name__ == "__main__":
    main()
