"""Top-k: NaN never ranks, ties go to the lower index, partial lists merge to the global answer."""

from __future__ import annotations

import itertools

import pytest
import torch

from attribution.groups import group_scores, shard_group_ids
from attribution.topk import bottom_k, merge_top_k, top_k

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
