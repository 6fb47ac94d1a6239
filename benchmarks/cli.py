"""What every study script shares at run time: the command line, a progress bar, a stopwatch.

`python -m benchmarks.<study> [--quick] [--out DIR]`: `--quick` runs the reduced protocol
(< 2 minutes, used by the smoke test); `--out` redirects the report and plots so a test run
never overwrites the committed results in `benchmarks/results/`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from tqdm import tqdm

from benchmarks.report import Report

RESULTS_DIR = Path(__file__).resolve().parent / "results"
T = TypeVar("T")


@dataclass(frozen=True)
class Options:
    quick: bool
    out: Path


def parse_options(description: str, argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="reduced run (< 2 minutes) for smoke tests")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help=f"directory for the report and plots (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    return Options(quick=args.quick, out=args.out)


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A tqdm bar on stderr over `items`, cleared when done."""
    yield from tqdm(items, desc=desc, total=total, leave=False, file=sys.stderr, dynamic_ncols=True,
                disable=None)


@contextmanager
def fraction_bar(desc: str) -> Iterator[Callable[[float], None]]:
    """A tqdm bar driven by a `progress(fraction)` callback (the library's progress hook)."""
    bar = tqdm(total=1000, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True,
                disable=None)

    def update(fraction: float) -> None:
        bar.n = round(1000 * min(max(fraction, 0.0), 1.0))
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


class Stopwatch:
    """`with Stopwatch() as sw: ...` then `sw.seconds`."""

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self._start


def run_study(study: Callable[[Options], Report], description: str, argv: list[str] | None = None) -> Report:
    """Parse the command line, run `study`, write its report, print where and any missed targets."""
    options = parse_options(description, argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    report = study(options)
    path = report.write(options.out)
    print(f"wrote {path}")
    for figure in report.missed():
        print(f"target missed: {figure.name} = {figure.ours} (target {figure.target})")
    return report
