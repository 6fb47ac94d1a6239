"""Top-k: NaN never ranks, ties go to the lower index, partial lists merge to the global answer."""

from __future__ import annotations

import itertools

import pytest
import torch

import attribution.topk as topk_module
from attribution.groups import group_scores, shard_group_ids
from attribution.topk import TopK, bottom_k, merge_top_k, top_k

NAN = float("nan")


def test_nan_never_ranks_and_ties_break_by_index() -> None:
    scores = torch.tensor([1.0, NAN, 3.0, 3.0, -1.0, NAN, 2.0])
    top = top_k(scores, 3)
    assert top.indices.tolist() == [2, 3, 6]
    assert top.scores.tolist() == [3.0, 3.0, 2.0]
    bottom = bottom_k(scores, 2)
    assert bottom.indices.tolist() == [4, 0]
    padded = top_k(scores, 7)
    assert padded.indices.tolist() == [2, 3, 6, 0, 4, -1, -1]
    assert padded.as_pairs()[-1] == (4, -1.0)
    assert top_k(torch.tensor([float("-inf"), NAN]), 2).indices.tolist() == [0, -1]


def test_matrix_and_offset() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.5], [NAN, -2.0, 7.0]])
    top = top_k(scores, 2, offset=100)
    assert top.indices.tolist() == [[101, 102], [102, 101]]
    with pytest.raises(ValueError):
        top_k(scores, 0)


@pytest.mark.parametrize("largest", [True, False])
def test_merge_of_partial_lists_equals_global(largest: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 20, (3, 500), generator=gen).float()  # many ties
    scores[:, ::37] = NAN
    select = top_k if largest else bottom_k
    bounds = [0, 13, 200, 201, 420, 500]
    parts = [select(scores[:, a:b], 25, offset=a) for a, b in itertools.pairwise(bounds)]
    merged = merge_top_k(parts, 25)
    expected = select(scores, 25)
    assert torch.equal(merged.indices, expected.indices)
    assert torch.equal(merged.scores, expected.scores)
    with pytest.raises(ValueError, match="bottom"):
        merge_top_k([top_k(scores, 2), bottom_k(scores, 2)], 2)


def test_group_scores_mean_and_sum() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    ids = torch.tensor([0, 0, 2, 2, 2])
    assert group_scores(scores, ids, reduce="sum").tolist() == [[3.0, 0.0, 12.0]]
    mean = group_scores(scores[0], ids, num_groups=4, reduce="mean")
    assert mean[0] == 1.5 and mean[2] == 4.0
    assert torch.isnan(mean[1]) and torch.isnan(mean[3])
    assert shard_group_ids([2, 0, 3]).tolist() == [0, 0, 2, 2, 2]
    with pytest.raises(ValueError):
        group_scores(scores, torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        group_scores(scores, ids, num_groups=2)


def _reference(scores: torch.Tensor, k: int, *, largest: bool, offset: int = 0) -> tuple[list, list]:
    """Brute force per row: non-NaN entries sorted by (score, index), padded with (−1, NaN)."""
    matrix = scores.unsqueeze(0) if scores.dim() == 1 else scores
    all_indices, all_scores = [], []
    for row in matrix.tolist():
        ranked = sorted(((offset + i, v) for i, v in enumerate(row) if v == v),
                        key=lambda pair: (-pair[1] if largest else pair[1], pair[0]))[:k]
        ranked += [(-1, NAN)] * (k - len(ranked))
        all_indices.append([i for i, _ in ranked])
        all_scores.append([v for _, v in ranked])
    return (all_indices[0], all_scores[0]) if scores.dim() == 1 else (all_indices, all_scores)


def _tied_scores(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Few distinct values (many ties, ±0.0, ±inf) and ~15% NaN."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor([-2.0, -0.0, 0.0, 1.0, 3.0, float("inf"), float("-inf")])
    scores = values[torch.randint(0, len(values), shape, generator=gen)]
    scores[torch.rand(shape, generator=gen) < 0.15] = NAN
    return scores


def _same(picked: TopK, expected: tuple[list, list]) -> bool:
    return picked.indices.tolist() == expected[0] and torch.equal(
        picked.scores.isnan(), torch.tensor(expected[1]).isnan()) and torch.equal(
        torch.nan_to_num(picked.scores, nan=123.0), torch.nan_to_num(torch.tensor(expected[1]), nan=123.0))


@pytest.mark.parametrize("shape", [(301,), (3, 301)])
@pytest.mark.parametrize("k", [1, 5, 40, 350])
@pytest.mark.parametrize("largest", [True, False])
def test_chunked_selection_equals_unchunked_reference(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...],
                                                      k: int, largest: bool) -> None:
    scores = _tied_scores(shape, seed=k + len(shape))
    select = top_k if largest else bottom_k
    whole = select(scores, k, offset=1000)  # one chunk: N < CHUNK_ELEMENTS
    monkeypatch.setattr(topk_module, "CHUNK_ELEMENTS", 4)  # chunks of 4 columns
    chunked = select(scores, k, offset=1000)
    expected = _reference(scores, k, largest=largest, offset=1000)
    assert _same(whole, expected)
    assert _same(chunked, expected)
    # signed zeros are ties: kept as given, ordered by index
    assert torch.equal(torch.signbit(chunked.scores), torch.signbit(whole.scores))


@pytest.mark.parametrize("largest", [True, False])
def test_chunked_merge_equals_global(monkeypatch: pytest.MonkeyPatch, largest: bool) -> None:
    monkeypatch.setattr(topk_module, "CHUNK_ELEMENTS", 4)
    scores = _tied_scores((2, 700), seed=3)
    select = top_k if largest else bottom_k
    bounds = [0, 1, 90, 91, 400, 650, 700]
    parts = [select(scores[:, a:b], 9, offset=a) for a, b in itertools.pairwise(bounds)]
    assert _same(merge_top_k(parts[::-1], 9), _reference(scores, 9, largest=largest))
    assert _same(select(scores[:, :0], 3), ([[-1] * 3] * 2, [[NAN] * 3] * 2))
