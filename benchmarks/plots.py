"""PNG plots for the reports (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def scatter_panels(path: Path, panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
                   xlabel: str, ylabel: str) -> Path:
    """One scatter per `(title, x [N], y [N])` panel, side by side."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (title, x, y) in zip(axes[0], panels, strict=True):
        ax.scatter(x, y, s=6, alpha=0.6)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.ticklabel_format(style="sci", scilimits=(-3, 3))
    fig.tight_layout()
    return _save(fig, path)


def curves(path: Path, series: Mapping[str, tuple[np.ndarray, np.ndarray]], xlabel: str, ylabel: str,
           title: str, diagonal: bool = False) -> Path:
    """Line plot of `{label: (x, y)}`; `diagonal` adds y = x (e.g. a random ranking's recall)."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label, linewidth=1.4)
    if diagonal:
        ax.plot([0, 1], [0, 1], "k:", linewidth=0.8, label="random")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def labelled_points(path: Path, points: Sequence[tuple[str, float, float]], xlabel: str, ylabel: str,
                    title: str, log_x: bool = True) -> Path:
    """Scatter of named points `(label, x, y)`, each annotated (e.g. accuracy vs time per query)."""
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for label, x, y in points:
        ax.scatter([x], [y], s=22)
        ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
