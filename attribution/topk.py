"""Top-k / bottom-k of score vectors, NaN-safe and deterministic, mergeable across row ranges.

Order: by score (descending for top, ascending for bottom), ties broken by the lower global
row index; NaN scores never rank. When fewer than k rows have a score, the result is padded
with index −1 and score NaN (so `[Q, k]` results stay rectangular).

Streaming: each score row is read in chunks of `CHUNK_ELEMENTS` entries and a running top-k
is merged with each chunk, so the working memory is O(chunk + k) on top of the input (plus
the `[Q, k]` result) — never an index or sort buffer of all N rows. The merge is exact
because the order above is a strict total order: the top-k of A ∪ B is the top-k of
(top-k of A) ∪ B.

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
CHUNK_ELEMENTS = 2**16  # entries of one score row read per streaming step


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
    return _select(scores, k, largest=True, offset=offset)


def bottom_k(scores: Tensor, k: int, *, offset: int = 0) -> TopK:
    """The k lowest scores of `scores` `[N]` or `[Q, N]`; indices are `offset + position`."""
    return _select(scores, k, largest=False, offset=offset)


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
    return _select(scores, k, largest=largest, indices=indices)


def _select(scores: Tensor, k: int, *, largest: bool, offset: int = 0, indices: Tensor | None = None) -> TopK:
    """Top-k of each row of `scores` `[N]`/`[Q, N]`, row by row (`_select_row`).

    Row indices are `offset + position`, or the given `indices` (`[N]` or like `scores`, any order).
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must be [N] or [Q, N], got shape {tuple(scores.shape)}")
    if indices is not None and indices.shape != scores.shape[-1:] and indices.shape != scores.shape:
        raise ValueError("indices must match the scores' last dimension")
    scores = scores.detach()
    if scores.dim() == 1:
        s, idx = _select_row(scores, k, largest=largest, offset=offset, indices=indices)
        return TopK(idx, s, largest)
    picked = [_select_row(scores[q], k, largest=largest, offset=offset,
                          indices=indices if indices is None or indices.dim() == 1 else indices[q])
              for q in range(scores.shape[0])]
    if not picked:
        return TopK(torch.empty(0, k, dtype=torch.long), torch.empty(0, k, dtype=scores.dtype), largest)
    return TopK(torch.stack([idx for _, idx in picked]), torch.stack([s for s, _ in picked]), largest)


def _select_row(scores: Tensor, k: int, *, largest: bool, offset: int, indices: Tensor | None) -> tuple[Tensor, Tensor]:
    """`(scores [k], indices [k])` of one row `[N]`, streamed `CHUNK_ELEMENTS` entries at a time.

    The running top-k holds only non-NaN entries, in rank order. Once it is full, a chunk
    entry can only enter if it is at least as good as the running k-th score (strictly
    better when the indices are positions: a tie loses to the running entry's lower index),
    and at least as good as the chunk's own k-th best score (`torch.topk`, linear time); only
    those candidates — about k unless the k-th score has many ties — are sorted.
    """
    positional = indices is None
    best_s = torch.empty(0, dtype=scores.dtype)
    best_i = torch.empty(0, dtype=torch.long)
    for start in range(0, scores.shape[0], CHUNK_ELEMENTS):
        chunk = scores[start:start + CHUNK_ELEMENTS].cpu()
        keep = ~torch.isnan(chunk)
        if best_s.shape[0] == k:
            worst = best_s[-1]
            if positional:
                keep &= chunk > worst if largest else chunk < worst
            else:
                keep &= chunk >= worst if largest else chunk <= worst
        where = keep.nonzero().squeeze(1)
        if where.numel() == 0:
            continue
        values = chunk[where]
        if values.shape[0] > k:  # an entry worse than the chunk's own k-th best cannot rank
            kth = torch.topk(values, k, largest=largest, sorted=False).values
            good = values >= kth.min() if largest else values <= kth.max()
            where, values = where[good], values[good]
        if indices is None:
            found = where + (start + offset)
        else:
            found = indices[start:start + CHUNK_ELEMENTS].cpu()[where]
        best_s, best_i = _best(torch.cat([best_s, values]), torch.cat([best_i, found]), k,
                               largest=largest, in_index_order=positional)
    missing = k - best_s.shape[0]
    if missing > 0:
        best_s = torch.cat([best_s, torch.full((missing,), float("nan"), dtype=best_s.dtype)])
        best_i = torch.cat([best_i, torch.full((missing,), PAD_INDEX, dtype=torch.long)])
    return best_s, best_i


def _best(s: Tensor, idx: Tensor, k: int, *, largest: bool, in_index_order: bool) -> tuple[Tensor, Tensor]:
    """The first `min(k, n)` entries of a NaN-free block `[n]` in rank order (score, then lower index).

    `in_index_order`: entries with equal scores already appear in increasing index order (a
    rank-ordered running top-k of lower indices, then candidates in position order), so a
    stable sort by score alone breaks ties by index; otherwise the block is put in index
    order first.
    """
    if not in_index_order:
        by_index = torch.argsort(idx, stable=True)
        s, idx = s[by_index], idx[by_index]
    order = torch.argsort(s, descending=largest, stable=True)[:k]
    return s[order], idx[order]
