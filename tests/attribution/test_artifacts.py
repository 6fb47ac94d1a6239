"""`cached_tensors`' decoded-artifact memo: the store's bytes decide, callers get their own copies."""

from __future__ import annotations

import pytest
import torch

from attribution import artifacts
from attribution.artifacts import (
    DecodedMemo,
    FitArgs,
    InMemoryArtifacts,
    artifact_key,
    cached_tensors,
    fit_record,
    tensors_to_bytes,
)


class Values(FitArgs):
    kind = "values"


ARGS = Values()


def test_unchanged_bytes_are_decoded_once_and_returned_as_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[bytes] = []
    load = artifacts.tensors_from_bytes

    def counted(raw: bytes) -> dict[str, torch.Tensor]:
        decoded.append(raw)
        return load(raw)

    monkeypatch.setattr(artifacts, "tensors_from_bytes", counted)
    monkeypatch.setattr(artifacts, "DECODED", DecodedMemo())
    store = InMemoryArtifacts()
    first = cached_tensors(store, "f", ARGS, lambda: {"v": torch.arange(4.0)})  # computed, stored
    first["v"].zero_()
    for _ in range(2):
        got = cached_tensors(store, "f", ARGS, lambda: pytest.fail("recomputed"))
        torch.testing.assert_close(got["v"], torch.arange(4.0), rtol=0, atol=0)
        got["v"].zero_()  # a caller's write reaches neither the memo nor the store
    assert len(decoded) == 1 and store.hits == 2  # the store is still asked every time
    store.put(artifact_key("f", ARGS), tensors_to_bytes({"v": torch.ones(2)}), fit_record("f", ARGS))  # a new value at the key is decoded anew
    torch.testing.assert_close(cached_tensors(store, "f", ARGS, dict)["v"], torch.ones(2), rtol=0, atol=0)
    assert len(decoded) == 2


def test_memo_keeps_small_entries_within_its_byte_budget() -> None:
    small = tensors_to_bytes({"v": torch.zeros(8)})
    memo = DecodedMemo(max_bytes=2 * len(small), max_entry_bytes=len(small))
    for key in ("a", "b", "c"):
        memo.decode(key, small)
    memo.decode("big", tensors_to_bytes({"v": torch.zeros(1000)}))
    assert list(memo.entries) == ["b", "c"] and memo.size == 2 * len(small)
