"""The score histogram of a result page as an inline SVG (no JavaScript, no plotting library)."""

from __future__ import annotations

import numpy as np
from markupsafe import Markup, escape

WIDTH, HEIGHT, MARGIN = 640, 180, 28


def histogram_svg(scores: np.ndarray, bins: int = 50, marks: dict[str, float] | None = None) -> Markup:
    """Counts of the finite `scores` `[N]` in `bins` equal-width bins; each of `marks`
    (label → score, e.g. the top-1 row) drawn as a vertical line at its score."""
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Markup('<p class="muted">no finite scores</p>')
    counts, edges = np.histogram(values, bins=bins)
    low, high = float(edges[0]), float(edges[-1])
    span = high - low or 1.0
    plot_w, plot_h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN
    tallest = max(int(counts.max()), 1)
    bar_w = plot_w / bins
    parts = [f'<svg class="histogram" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="histogram of {values.size} scores">']
    for i, count in enumerate(counts):
        h = plot_h * count / tallest
        parts.append(f'<rect x="{MARGIN + i * bar_w:.2f}" y="{MARGIN + plot_h - h:.2f}" width="{max(bar_w - 1, 0.5):.2f}" '
                     f'height="{h:.2f}" fill="#4a78b0"><title>{edges[i]:.4g} … {edges[i + 1]:.4g}: {count}</title></rect>')
    base = MARGIN + plot_h
    parts.append(f'<line x1="{MARGIN}" y1="{base}" x2="{MARGIN + plot_w}" y2="{base}" stroke="#333"/>')
    for edge_x, anchor, value in ((MARGIN, "start", low), (MARGIN + plot_w, "end", high)):
        parts.append(f'<text x="{edge_x}" y="{base + 16}" font-size="11" text-anchor="{anchor}">{value:.4g}</text>')
    parts.append(f'<text x="{MARGIN}" y="{MARGIN - 8}" font-size="11">max count {tallest} · {values.size} rows</text>')
    for label, score in (marks or {}).items():
        x = MARGIN + plot_w * (min(max(score, low), high) - low) / span
        flip = x > WIDTH - 120  # label left of the line near the right edge
        parts.append(f'<line x1="{x:.2f}" y1="{MARGIN}" x2="{x:.2f}" y2="{base}" stroke="#c0392b" stroke-width="2"/>'
                     f'<text x="{x - 4 if flip else x + 4:.2f}" y="{MARGIN + 12}" font-size="11" fill="#c0392b" '
                     f'text-anchor="{"end" if flip else "start"}">{escape(label)} {score:.4g}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
