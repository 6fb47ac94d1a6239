"""Cooperative stopping of a running job: a client's cancel, a lost lease, the wall-clock limit.

`ProgressWriter` is the job's `FitContext.progress`; `check()` decides whether the job goes
on and raises otherwise:
- `Canceled` when the query is no longer `running` (a client's `DELETE`) or every lease the
  job holds was taken over by another worker (`HeldLease.lost`);
- `TimedOut` once the job has run `JOB_TIMEOUT_S` seconds.
The query's status is read back at most once a second (with the progress write). The
methods report progress per training batch of a sweep, but other loops do not: curvature
fits, CG and Arnoldi iterations read the training rows without reporting, and a LiSSA
recursion or K unlearning steps read none. So the job checks at every training batch it
reads (`CheckedRows` wraps its training set) and at every iteration of those in-memory loops
(`attribution.interrupts.check_interrupt`, active inside `interruptible(check)`): it stops
within about one batch or iteration (plus one second) of being canceled, losing its lease
or running out of time, whatever the method and its parameters.
A transient database error while writing progress skips that write (`workers.retrying`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from attribution.data import Batch, TrainingSet
from service.db.models import QueryStatus
from workers.leases import HeldLease
from workers.retrying import is_transient

log = logging.getLogger(__name__)

STATUS_POLL_S = 1.0


class Canceled(Exception):
    """The query was canceled (or this job lost its lease) while it ran; nothing is written."""


class TimedOut(Exception):
    """The job ran longer than `JOB_TIMEOUT_S`; the query fails with this reason."""


class ProgressWriter:
    """`FitContext.progress`: records progress at most `1 / min_interval_s` times a second
    and stops the job (`check`) when it is canceled, lost its leases or ran out of time.

    `write(fraction)` records the progress and returns the query's status (None: gone).
    `leases`: the leases this job holds; the job stops once all of them are lost.
    """

    def __init__(self, write: Callable[[float], str | None], leases: Sequence[HeldLease], *,
                 timeout_s: float, min_interval_s: float = 0.5) -> None:
        self.write = write
        self.leases = list(leases)
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.min_interval_s = min_interval_s
        self.last_write = float("-inf")
        self.fraction = 0.0

    def __call__(self, fraction: float) -> None:
        self.fraction = min(max(float(fraction), 0.0), 1.0)
        self.check(poll_s=self.min_interval_s)

    def check(self, poll_s: float = STATUS_POLL_S) -> None:
        """Raise `Canceled` or `TimedOut` if the job must stop; reads the status at most every `poll_s`."""
        if self.leases and all(lease.lost for lease in self.leases):
            raise Canceled("the job's lease was taken over by another worker")
        now = time.monotonic()
        if now > self.deadline:
            raise TimedOut(f"the job ran longer than JOB_TIMEOUT_S = {self.timeout_s:g} s and was stopped")
        if now - self.last_write < poll_s:
            return
        self.last_write = now
        try:
            status = self.write(self.fraction)
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("progress write skipped (transient error: %s)", exc.__class__.__name__)
            return
        if status is None or QueryStatus(status) != QueryStatus.RUNNING:
            raise Canceled(f"the query is {status or 'gone'}")


class CheckedRows:
    """A `TrainingSet` view that calls `check()` before yielding each batch of `rows`;
    every other attribute (`row_start`, `sample_ids`, ...) is the wrapped set's."""

    def __init__(self, rows: TrainingSet, check: Callable[[], None]) -> None:
        self.rows = rows
        self.check = check

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, batch_size: int) -> Iterator[tuple[int, Batch]]:
        for start, batch in self.rows.batches(batch_size):
            self.check()
            yield start, batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rows, name)
