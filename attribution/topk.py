"""Top-k / bottom-k of score vectors, NaN-safe and deterministic, mergeable across row ranges.

Order: by score (descending for top, ascending for bottom), ties broken by the lower global
row index; NaN scores never rank. When fewer than k rows have a score, the result is padded
with index −1 and score NaN (so `[Q, k]` results stay rectangular).

Fan-out: each worker scores a disjoint row range, keeps `top_k(scores, k, offset=start)`, and
`merge_top_k(parts, k)` of the partial lists equals the global `top_k` of the full vector —
the global top-k rows are each in their own range's top-k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

PAD_INDEX = -1


@dataclass(frozen=True)
class TopK:
    """`indices` `[k]` or `[Q, k]` (int64, global row indices; −1 = padding) and their `scores`."""

    indices: Tensor
    scores: Tensor
    largest: bool = True

    def __len__(self) -> int:
        return int(self.indices.shape[-1])

    def valid(self) -> Tensor:
        """Mask of real (non-padding) entries."""
        return self.indices != PAD_INDEX

    def as_pairs(self) -> list[tuple[int, float]]:
        """`[(index, score), ...]` of a 1-D result without padding."""
        if self.indices.dim() != 1:
            raise ValueError("as_pairs needs a 1-D result; index a row first")
        return [(int(i), float(s)) for i, s in zip(self.indices, self.scores, strict=True) if int(i) != PAD_INDEX]


def top_k(scores: Tensor, k: int, *, offset: int = 0) -> TopK:
    """The k highest scores of `scores` `[N]` or `[Q, N]`; indices are `offset + position`."""
    return _select(scores, torch.arange(scores.shape[-1], dtype=torch.long) + offset, k, largest=True)


def bottom_k(scores: Tensor, k: int, *, offset: int = 0) -> TopK:
    """The k lowest scores of `scores` `[N]` or `[Q, N]`; indices are `offset + position`."""
    return _select(scores, torch.arange(scores.shape[-1], dtype=torch.long) + offset, k, largest=False)


def merge_top_k(parts: Sequence[TopK], k: int) -> TopK:
    """Merge partial results over disjoint row ranges into the global top-k (or bottom-k)."""
    if not parts:
        raise ValueError("nothing to merge")
    largest = parts[0].largest
    if any(p.largest != largest for p in parts):
        raise ValueError("cannot merge top-k with bottom-k results")
    indices = torch.cat([p.indices for p in parts], dim=-1)
    scores = torch.cat([p.scores for p in parts], dim=-1)
    scores = torch.where(indices == PAD_INDEX, torch.full_like(scores, float("nan")), scores)
    return _select(scores, indices, k, largest=largest)


def _select(scores: Tensor, indices: Tensor, k: int, *, largest: bool) -> TopK:
    if k < 1:
        raise ValueError("k must be at least 1")
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must be [N] or [Q, N], got shape {tuple(scores.shape)}")
    if indices.shape != scores.shape[-1:] and indices.shape != scores.shape:
        raise ValueError("indices must match the scores' last dimension")
    scores = scores.detach().cpu()
    indices = indices.cpu().expand_as(scores)
    # 1) order by global index, 2) stable sort by score, 3) stable sort NaN last.
    by_index = torch.argsort(indices, dim=-1, stable=True)
    s = torch.gather(scores, -1, by_index)
    idx = torch.gather(indices, -1, by_index)
    key = torch.where(torch.isnan(s), torch.zeros_like(s), s)
    order = torch.argsort(key, dim=-1, descending=largest, stable=True)
    s, idx = torch.gather(s, -1, order), torch.gather(idx, -1, order)
    nan_last = torch.argsort(torch.isnan(s).to(torch.int8), dim=-1, stable=True)
    s, idx = torch.gather(s, -1, nan_last), torch.gather(idx, -1, nan_last)
    keep = min(k, s.shape[-1])
    s, idx = s[..., :keep], idx[..., :keep].clone()
    idx[torch.isnan(s)] = PAD_INDEX
    if keep < k:
        pad_shape = (*s.shape[:-1], k - keep)
        s = torch.cat([s, torch.full(pad_shape, float("nan"), dtype=s.dtype)], dim=-1)
        idx = torch.cat([idx, torch.full(pad_shape, PAD_INDEX, dtype=torch.long)], dim=-1)
    return TopK(idx, s, largest)
