"""Every registered method, relatively normalised, ranks the exact duplicate first.

On the `digits_leakage` fixture (logistic regression, 20 test points copied into the
training set) each method runs with `normalize="relative"` (RelatIF) and must put the copy at
rank 1 for all 20 queries. The unnormalised top-1 rate is printed for the record, not
asserted (raw scores are dominated by large-gradient rows). gradient_similarity's default
cosine similarity is already normalised and rejects `relative`, so it runs with the raw dot
product there. Methods without self-influence (trackstar: a cosine, always normalised) cannot
be made relative; their copies-rank-first test lives with the method (test_trackstar.py).
"""

from __future__ import annotations

import pytest

from attribution.artifacts import InMemoryArtifacts
from attribution.evaluation import leakage_detection
from attribution.methods.base import FitContext
from attribution.methods.registry import available_methods, method_class
from attribution.pipeline import attribute
from tests.attribution import fixtures

METHOD_PARAMS = {"gradient_similarity": {"similarity": "dot"}}


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in available_methods() if method_class(m).supports_self_influence])
def test_relative_scores_rank_the_copy_first(digits_leakage: fixtures.Leakage, method: str) -> None:
    t = digits_leakage.trained
    queries = t.test_batch(digits_leakage.query_index)
    store = InMemoryArtifacts()
    rates = {}
    for normalize in ("none", "relative"):
        scores = attribute(t.adapter, method, {**METHOD_PARAMS.get(method, {}), "normalize": normalize}, t.train,
                           FitContext(f"digits-leakage-{method}", store=store), queries=queries, per_sample=True)
        rates[normalize] = leakage_detection(scores, digits_leakage.copy_index).ranks
    raw_top1 = int((rates["none"] == 1).sum())
    relative_top1 = int((rates["relative"] == 1).sum())
    print(f"\n{method}: top-1 of 20 raw {raw_top1}, relative {relative_top1}")
    assert relative_top1 == len(digits_leakage.copy_index), f"copy ranks (relative): {rates['relative'].tolist()}"
