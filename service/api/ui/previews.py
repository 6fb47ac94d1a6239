"""Previews of training rows and query samples for the result pages.

A row is shown as what it is: its text (the first `TEXT_CHARS` characters) for text rows; a
grey-scale (or RGB) thumbnail for image-shaped rows — `x` of shape `[H, W]`, `[C, H, W]` with
C ∈ {1, 3}, or a flat vector whose length is a square (64 features → 8×8, the digits) — and
otherwise its first `MAX_VALUES` values. Rows are read from the dataset's shards with the same
readers the workers use; a shard that cannot be read any more leaves its rows without preview.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from markupsafe import Markup

from loading import LoadError, resolve_uri
from loading.readers import open_reader
from service.db.models import Dataset
from service.settings import Settings

log = logging.getLogger(__name__)

TEXT_CHARS = 200
MAX_VALUES = 12
THUMBNAIL_PX = 40
MIN_IMAGE_PIXELS, MAX_IMAGE_PIXELS = 16, 64 * 64


@dataclass(frozen=True)
class Preview:
    """What the page shows for one row: `label` (its y), and one of `text`, `image` (SVG), `values`."""

    label: str | None = None
    text: str | None = None
    image: Markup | None = None
    values: str | None = None


def preview(x: np.ndarray | None, y: Any = None, text: str | None = None) -> Preview:
    """The preview of one row: `x` its features `[...]`, `y` its target, `text` its text."""
    label = None if y is None else _label(y)
    if text is not None:
        return Preview(label=label, text=_clip(text))
    if x is None:
        return Preview(label=label)
    pixels = image_pixels(np.asarray(x, dtype=np.float64))
    if pixels is not None:
        return Preview(label=label, image=thumbnail_svg(pixels))
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    shown = ", ".join(f"{v:.4g}" for v in flat[:MAX_VALUES]) + (f", … ({flat.size} values)" if flat.size > MAX_VALUES else "")
    return Preview(label=label, values=shown)


def image_pixels(x: np.ndarray) -> np.ndarray | None:
    """`[H, W]` or `[H, W, 3]` pixels when `x` looks like an image, else None."""
    if x.ndim == 1 and MIN_IMAGE_PIXELS <= x.size <= MAX_IMAGE_PIXELS and math.isqrt(x.size) ** 2 == x.size:
        side = math.isqrt(x.size)
        return x.reshape(side, side)
    if x.ndim == 3 and x.shape[0] in (1, 3):
        x = x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)
    if x.ndim in (2, 3) and MIN_IMAGE_PIXELS <= x.shape[0] * x.shape[1] <= MAX_IMAGE_PIXELS:
        return x
    return None


def thumbnail_svg(pixels: np.ndarray, size: int = THUMBNAIL_PX) -> Markup:
    """An inline SVG of `pixels` `[H, W]` (grey, scaled min→black … max→white) or `[H, W, 3]`
    (RGB, scaled jointly), one `<rect>` per pixel, `size` CSS pixels on its longer side."""
    finite = np.nan_to_num(pixels, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(finite.min()), float(finite.max())
    scaled = np.zeros_like(finite) if high <= low else (finite - low) / (high - low)
    levels = np.rint(scaled * 255).astype(int)
    height, width = levels.shape[:2]
    rects = []
    for row in range(height):
        for col in range(width):
            value = levels[row, col]
            r, g, b = (value, value, value) if levels.ndim == 2 else value[:3]
            rects.append(f'<rect x="{col}" y="{row}" width="1" height="1" fill="rgb({r},{g},{b})"/>')
    scale = size / max(height, width)
    return Markup(f'<svg class="thumb" xmlns="http://www.w3.org/2000/svg" width="{width * scale:.0f}" '
                  f'height="{height * scale:.0f}" viewBox="0 0 {width} {height}" shape-rendering="crispEdges">'
                  f'{"".join(rects)}</svg>')


def dataset_rows(settings: Settings, dataset: Dataset, indices: Iterable[int]) -> dict[int, Preview]:
    """Previews of the dataset rows at global `indices` (rows it cannot read are left out)."""
    wanted = sorted(set(indices))
    found: dict[int, Preview] = {}
    for shard in sorted(dataset.shards, key=lambda s: s.row_offset):
        local = [i - shard.row_offset for i in wanted if shard.row_offset <= i < shard.row_offset + shard.num_samples]
        if not local:
            continue
        try:
            reader = open_reader(resolve_uri(shard.uri, settings.data_root), shard.format, num_rows=shard.num_samples)
        except (LoadError, OSError) as exc:
            log.warning("preview: shard %s unreadable: %s", shard.uri, exc)
            continue
        try:
            for position in local:
                for rows in reader.iter_rows(position, position + 1, 1):
                    found[shard.row_offset + position] = preview(
                        None if rows.x is None else rows.x[0], None if rows.y is None else rows.y[0],
                        None if rows.text is None else rows.text[0])
        except (LoadError, OSError, ValueError) as exc:
            log.warning("preview: reading %s failed: %s", shard.uri, exc)
        finally:
            reader.close()
    return found


def query_samples(samples: dict[str, Any] | None, limit: int = 8) -> list[Preview]:
    """Previews of the query's own inline samples (`x`/`y`, `text`, or prompt + completion)."""
    if not samples:
        return []
    ys: Sequence[Any] = samples.get("y") or []
    if "x" in samples:
        xs = samples["x"][:limit]
        return [preview(np.asarray(x, dtype=np.float64), ys[i] if i < len(ys) else None) for i, x in enumerate(xs)]
    if "text" in samples:
        return [preview(None, None, str(t)) for t in samples["text"][:limit]]
    if "prompt" in samples:
        pairs = zip(samples["prompt"][:limit], samples.get("completion") or [], strict=False)
        return [preview(None, None, f"{p}{c}") for p, c in pairs]
    return []


def _label(y: Any) -> str:
    value = np.asarray(y)
    return str(value.item()) if value.size == 1 else np.array2string(value.reshape(-1)[:8], precision=3)


def _clip(text: str) -> str:
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + "…"
