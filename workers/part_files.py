"""The part-file format of fanned-out queries: `<id>.part<k>.npz`, one file (one fsync) per part.

It holds `scores` `[Q, n_k]` float32 and `meta` (the part's timings and extras) as JSON bytes;
the merge reads every part's file, checks its width and removes them all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.atomic_files import atomic_file
from service.settings import Settings


def part_file_name(query_id: str, part: int) -> str:
    return f"{query_id}.part{part}.npz"


def save_part(path: Path, scores: np.ndarray, meta: dict[str, Any]) -> None:
    """One file per part (one fsync): `scores` `[Q, n_k]` float32 and `meta` (timings, extras) as JSON bytes."""
    encoded = np.frombuffer(json.dumps(meta, default=str).encode(), dtype=np.uint8)
    with atomic_file(path) as out:
        np.savez(out, scores=scores, meta=encoded)


def load_part(path: Path, rows: int) -> tuple[np.ndarray, dict[str, Any]]:
    """A part file's `[Q, rows]` scores and metadata; `ValueError` if it does not hold `rows` columns."""
    with np.load(path, allow_pickle=False) as archive:
        scores, meta = archive["scores"], json.loads(archive["meta"].tobytes())
    if scores.ndim != 2 or scores.shape[1] != rows:
        raise ValueError(f"{path.name} holds scores of shape {scores.shape}, expected {rows} columns")
    return scores, meta


def remove_part_files(query_id: str, parts: Sequence[int], settings: Settings) -> None:
    for part in parts:
        (settings.scores_dir / part_file_name(query_id, part)).unlink(missing_ok=True)
