"""What the `attribution` CLI needs besides its commands: exit codes, the samples file, `--param`
values, the leakage gate, score exports and plain-text tables."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from attribution_client.models import Query, RankedRow
from attribution_client.requests import SAMPLE_FIELDS


class ExitCode(IntEnum):
    """Exit statuses a CI job can rely on (also listed in `attribution --help`)."""

    OK = 0
    GATE_FAILED = 1     # a --fail-if-... check tripped (e.g. a leaked row scored above the threshold)
    USAGE = 2           # bad command line (typer/click's own code)
    QUERY_FAILED = 3    # the query ended failed or canceled
    API_ERROR = 4       # the service refused the request (4xx: invalid input, unknown id, auth)
    UNREACHABLE = 5     # no answer from the service, or a 5xx after every retry
    TIMEOUT = 6         # --wait ran out of --timeout


class UsageError(ValueError):
    """A command-line value the CLI cannot use (exit 2)."""


def read_samples(path: Path, indices: Sequence[int]) -> dict[str, Any]:
    """The `samples` object from a JSON file holding `x`/`y`, `text`, `prompt`/`completion` or `refs`
    lists (other keys, such as the demo's `copy_index`, are ignored); `indices` keeps those rows."""
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--samples {path}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise UsageError(f"--samples {path}: expected a JSON object with x/y, text or refs lists")
    samples = {k: v for k, v in loaded.items() if k in SAMPLE_FIELDS}
    if not samples:
        raise UsageError(f"--samples {path}: none of the fields {', '.join(SAMPLE_FIELDS)}")
    if indices:
        try:
            samples = {k: [v[i] for i in indices] for k, v in samples.items()}
        except (IndexError, TypeError) as exc:
            raise UsageError(f"--sample-index {list(indices)}: {exc}") from exc
    return samples


def parse_params(pairs: Sequence[str], params_json: str | None) -> dict[str, Any]:
    """`--params '{"steps": 5}'` merged with `--param key=value` pairs (a JSON value, else text)."""
    try:
        params: dict[str, Any] = json.loads(params_json) if params_json else {}
    except ValueError as exc:
        raise UsageError(f"--params is not JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise UsageError("--params must be a JSON object")
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--param {pair!r}: expected key=value")
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw
    return params


def top1_rows(query: Query) -> list[tuple[int, RankedRow]]:
    """`(sample, top-1 row)` for each query sample (one entry in joint mode)."""
    result = query.result
    if result is None:
        return []
    if result.per_sample:
        return [(s.sample, s.top[0]) for s in result.per_sample if s.top]
    return [(0, result.top[0])] if result.top else []


def gate(query: Query, threshold: float) -> dict[str, Any]:
    """The leakage gate: every sample's top-1 training row must score at most `threshold`."""
    violations = [{"sample": sample, "index": row.index, "sample_id": row.sample_id, "score": row.score}
                  for sample, row in top1_rows(query) if row.score > threshold]
    return {"threshold": threshold, "passed": not violations, "violations": violations}


Figures = dict[tuple[int, int], tuple[float, int, int]]  # (sample, index) → (stability, rank_low, rank_high)


def stability_figures(query: Query) -> Figures:
    """Rank-stability figures of the query's ranked rows (top list first); empty without them."""
    result = query.result
    if result is None:
        return {}
    blocks = [(s.sample, s.top + s.bottom) for s in result.per_sample] if result.per_sample else [
        (0, result.top + result.bottom)]
    return {(sample, r.index): (r.stability, r.rank_low or 0, r.rank_high or 0)
            for sample, rows in reversed(blocks) for r in reversed(rows) if r.stability is not None}


def write_scores(scores: np.ndarray, path: Path, fmt: str, figures: Figures | None = None) -> None:
    """`[N]` or `[Q, N]` scores as `index,score` (`index,sample_0,...`) CSV, `.npy`, or Parquet;
    with rank-stability `figures`, CSV and Parquet add `stability,rank_low,rank_high` (`_q` per
    sample for `[Q, N]`), empty for unranked rows."""
    columns = scores.reshape(1, -1) if scores.ndim == 1 else scores
    names = ["score"] if scores.ndim == 1 else [f"sample_{q}" for q in range(columns.shape[0])]
    extra = _figure_columns(figures or {}, columns.shape[0], columns.shape[1], scores.ndim == 1)
    if fmt == "npy":
        np.save(path, scores)
    elif fmt == "csv":
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["index", *names, *extra])
            for index in range(columns.shape[1]):
                writer.writerow([index, *(repr(float(v)) for v in columns[:, index]),
                                 *("" if values[index] is None else values[index] for values in extra.values())])
    elif fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise UsageError("--format parquet needs pyarrow (pip install pyarrow)") from exc
        table = pa.table({"index": np.arange(columns.shape[1]), **dict(zip(names, columns, strict=True)),
                          **{name: pa.array(values) for name, values in extra.items()}})
        pq.write_table(table, path)
    else:
        raise UsageError(f"--format {fmt!r}: one of csv, npy, parquet")


def _figure_columns(figures: Figures, samples: int, rows: int, joint: bool) -> dict[str, list[Any]]:
    """Column name → one value per row (None when unranked); no columns without figures."""
    out: dict[str, list[Any]] = {}
    if not figures:
        return out
    for q in range(samples):
        suffix = "" if joint else f"_{q}"
        cells = [figures.get((q, index)) for index in range(rows)]
        for position, name in enumerate(("stability", "rank_low", "rank_high")):
            out[name + suffix] = [None if c is None else c[position] for c in cells]
    return out


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Left-aligned plain-text columns."""
    cells = [[str(c) for c in header], *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def ranked_table(rows: Sequence[RankedRow]) -> str:
    has_preview = any(r.preview for r in rows)
    has_stability = any(r.stability is not None for r in rows)
    header = ["rank", "index", "sample_id", "shard", "score", *(["stability", "rank interval"] if has_stability else []),
              *(["preview"] if has_preview else [])]
    return table([[r.rank, r.index, r.sample_id, r.shard, f"{r.score:+.6g}",
                   *([_share(r.stability), f"{r.rank_low}-{r.rank_high}"] if has_stability else []),
                   *([(r.preview or "")[:60]] if has_preview else [])] for r in rows], header)


def _share(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f}%"
