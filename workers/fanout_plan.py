"""Fan-out planning: whether a query is split into part jobs, and the row ranges of its parts.

A query whose dataset has more than `settings.fanout_rows` rows, and whose method says its
params may be scored by row ranges (`AttributionMethod.can_fan_out`), runs as parts aligned
to shard boundaries where possible: whole shards are grouped up to `fanout_rows` rows, larger
shards are cut into equal pieces (`plan_ranges`). Part k of query q is the RQ job
`<q>-p<k>` (`part_job_id`).

Splitting is the method's call: a row-separable method (the score of row i depends on row i
alone given the query: Forward-INF with gradient unlearning and fixed settings, TracIn,
gradient similarity), no whole-set fit, and no relative normalisation (whose floor uses the
median self-influence over all rows). Influence functions, TRAK and Integrated Influence fit
curvature/kernels over the whole training set and run as one job.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from service.db.models import Query
from service.settings import Settings
from workers.compute import method_and_params


def plan_ranges(shard_sizes: Sequence[int], target: int) -> list[tuple[int, int]]:
    """Global row ranges `[lo, hi)` of at most `target` rows, cut at shard boundaries where possible."""
    if target < 1:
        raise ValueError("target must be positive")
    ranges: list[tuple[int, int]] = []
    lo = offset = 0
    for size in shard_sizes:
        if size > target:
            if offset > lo:
                ranges.append((lo, offset))
            pieces = math.ceil(size / target)
            bounds = [offset + (size * j) // pieces for j in range(pieces + 1)]
            ranges.extend(itertools.pairwise(bounds))
            lo = offset + size
        elif offset + size - lo > target:
            ranges.append((lo, offset))
            lo = offset
        offset += size
    if offset > lo:
        ranges.append((lo, offset))
    return ranges


def should_fan_out(query: Query, num_samples: int, settings: Settings, *, task: str = "") -> bool:
    """Whether the query runs as part jobs: more rows than `fanout_rows` and a method that says
    these params may be scored by row ranges (`AttributionMethod.can_fan_out`; `task`: the
    model's, whose defaults may make an unset `normalize` relative)."""
    if num_samples <= settings.fanout_rows:
        return False
    try:
        cls, params = method_and_params(query)
    except ValueError:
        return False  # the single job reports the problem
    return cls.can_fan_out(params, task)


def part_job_id(query_id: str, part: int) -> str:
    return f"{query_id}-p{part}"
