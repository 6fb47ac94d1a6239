"""Shard formats (valid and malformed) and the streaming `ShardedTrainingSet`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.numpy import save_file as save_numpy_safetensors

from loading import ShardedTrainingSet, ShardError, inspect_shard
from loading.hashing import file_sha256

RNG = np.random.default_rng(7)
X = RNG.normal(size=(23, 2, 3)).astype(np.float32)
Y = RNG.integers(0, 3, size=23).astype(np.int64)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _parquet(path: Path, x: np.ndarray, y: np.ndarray, ids: list[str] | None = None, *, row_group_size: int = 3) -> Path:
    columns = {"x": pa.array([row.tolist() for row in x]), "y": pa.array(y)}
    if ids is not None:
        columns["ids"] = pa.array(ids)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def _mixed_shards(root: Path) -> list[tuple[Path, str, int]]:
    """Rows 0-4 npz, 5-10 compressed npz, 11-15 parquet, 16-19 safetensors .pt, 20-22 torch.save .pt."""
    ids = np.array([f"id{i}" for i in range(23)])
    np.savez(root / "a.npz", x=X[:5], y=Y[:5], ids=ids[:5])
    np.savez_compressed(root / "b.npz", x=X[5:11], y=Y[5:11])
    _parquet(root / "c.parquet", X[11:16], Y[11:16], [str(i) for i in ids[11:16]])
    save_numpy_safetensors({"x": X[16:20], "y": Y[16:20], "ids": np.arange(16, 20)}, str(root / "d.pt"))
    torch.save({"x": torch.from_numpy(X[20:]), "y": torch.from_numpy(Y[20:])}, str(root / "e.pt"))
    out = []
    for name in ("a.npz", "b.npz", "c.parquet", "d.pt", "e.pt"):
        info = inspect_shard(root / name)
        out.append((root / name, info.format, info.num_samples))
    return out


def _collect(training: ShardedTrainingSet, batch_size: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    xs, ys, starts = [], [], []
    for start, batch in training.batches(batch_size):
        starts.append(start)
        xs.append(batch.inputs.numpy())  # type: ignore[union-attr]
        ys.append(batch.targets.numpy())
    return np.concatenate(xs), np.concatenate(ys), starts


def test_inspect_reports_format_rows_and_hash(data_root: Path) -> None:
    shards = _mixed_shards(data_root)
    assert [(s[1], s[2]) for s in shards] == [("npz", 5), ("npz", 6), ("parquet", 5), ("pt", 4), ("pt", 3)]
    assert inspect_shard(data_root / "a.npz").sha256 == file_sha256(data_root / "a.npz")


@pytest.mark.parametrize("batch_size", [1, 4, 7, 23, 100])
def test_streams_global_rows_in_order_for_any_batch_size(data_root: Path, batch_size: int) -> None:
    training = ShardedTrainingSet(_mixed_shards(data_root), task="classification")
    x, y, starts = _collect(training, batch_size)
    np.testing.assert_array_equal(x, X)
    np.testing.assert_array_equal(y, Y)
    assert starts == list(range(0, 23, batch_size))
    assert len(training) == 23


def test_row_ranges_cross_shard_boundaries(data_root: Path) -> None:
    shards = _mixed_shards(data_root)
    training = ShardedTrainingSet(shards, row_start=3, row_stop=18, task="classification")
    x, y, _ = _collect(training, 4)
    np.testing.assert_array_equal(x, X[3:18])
    np.testing.assert_array_equal(y, Y[3:18])
    with pytest.raises(ValueError):
        ShardedTrainingSet(shards, row_start=5, row_stop=40, task="classification")


def test_sample_ids_and_shard_positions(data_root: Path) -> None:
    training = ShardedTrainingSet(_mixed_shards(data_root), task="classification")
    rows = [0, 4, 5, 12, 17, 22]
    assert training.shard_of_row(rows) == [0, 0, 1, 2, 3, 4]
    assert training.sample_ids(rows) == ["id0", "id4", None, "id12", "17", None]
    # any order, repeats: each touched shard is read once per call, entries come back in request order
    assert training.sample_ids([17, 0, 12, 4, 0, 22, 5]) == ["17", "id0", "id12", "id4", "id0", None, None]
    assert training.sample_ids([]) == []


def test_regression_targets_are_float_and_inputs_float32(data_root: Path) -> None:
    np.savez(data_root / "r.npz", x=np.arange(8, dtype=np.int64).reshape(4, 2), y=np.linspace(0, 1, 4))
    training = ShardedTrainingSet([(data_root / "r.npz", "npz", 4)], task="regression")
    (_, batch), = list(training.batches(10))
    assert batch.inputs.dtype == torch.float32 and batch.targets.dtype == torch.float32  # type: ignore[union-attr]


def test_fortran_ordered_arrays_stream_correctly(data_root: Path) -> None:
    np.savez(data_root / "f.npz", x=np.asfortranarray(X[:, 0, :]), y=Y)
    training = ShardedTrainingSet([(data_root / "f.npz", "npz", 23)], row_start=2, task="classification")
    x, _, _ = _collect(training, 5)
    np.testing.assert_array_equal(x, X[2:, 0, :])


def test_parquet_fixed_size_and_scalar_columns(data_root: Path) -> None:
    flat = X[:6].reshape(6, -1)
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), 6), "y": pa.array(Y[:6])})
    pq.write_table(table, data_root / "fixed.parquet")
    x, _, _ = _collect(ShardedTrainingSet([(data_root / "fixed.parquet", "parquet", 6)], task="classification"), 4)
    np.testing.assert_array_equal(x, flat)
    pq.write_table(pa.table({"x": pa.array([1.0, 2.0]), "y": pa.array([0.5, 0.25])}), data_root / "s.parquet")
    assert inspect_shard(data_root / "s.parquet").num_samples == 2


@pytest.mark.parametrize("writer,message", [
    (lambda p: np.savez(p, x=X), "needs arrays x and y"),
    (lambda p: np.savez(p, x=X, y=Y[:5]), "different lengths"),
    (lambda p: np.savez(p, x=np.array([np.nan, 1.0]), y=np.array([0, 1])), "non-finite"),
    (lambda p: np.savez(p, x=np.array(["a", "b"]), y=np.array([0, 1])), "must be numeric"),
    (lambda p: np.savez(p, x=np.float32(1.0), y=np.int64(1)), "scalar"),
    (lambda p: p.write_bytes(b"not a zip"), "not a valid .npz"),
])
def test_malformed_npz_is_refused(data_root: Path, writer: Callable[[Path], object], message: str) -> None:
    path = data_root / "bad.npz"
    writer(path)
    with pytest.raises(ShardError, match=message) as info:
        inspect_shard(path)
    assert info.value.field == "uri"


def test_object_arrays_are_refused_without_unpickling(data_root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = np.empty(2, dtype=object)
    evil[0], evil[1] = _Evil(marker), _Evil(marker)
    np.savez(data_root / "evil.npz", x=evil, y=np.array([0, 1]))
    with pytest.raises(ShardError, match="Python objects"):
        inspect_shard(data_root / "evil.npz")
    torch.save({"x": _Evil(marker), "y": torch.zeros(2)}, str(data_root / "evil.pt"))
    with pytest.raises(ShardError, match="Python objects are refused"):
        inspect_shard(data_root / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("table,message", [
    (pa.table({"x": pa.array([[1.0, 2.0], [3.0]]), "y": pa.array([0, 1])}), "ragged"),
    (pa.table({"x": pa.array([[1.0, 2.0], None]), "y": pa.array([0, 1])}), "missing values"),
    (pa.table({"x": pa.array([[1.0], [2.0]])}), "needs columns x and y"),
    (pa.table({"x": pa.array([["a"], ["b"]]), "y": pa.array([0, 1])}), "must hold numbers"),
])
def test_malformed_parquet_is_refused(data_root: Path, table: pa.Table, message: str) -> None:
    pq.write_table(table, data_root / "bad.parquet")
    with pytest.raises(ShardError, match=message):
        inspect_shard(data_root / "bad.parquet")


def test_malformed_pt_is_refused(data_root: Path) -> None:
    torch.save([torch.zeros(2), torch.zeros(2)], str(data_root / "list.pt"))
    with pytest.raises(ShardError, match="dict of named tensors"):
        inspect_shard(data_root / "list.pt")
    torch.save({"x": torch.zeros(3, 2), "y": torch.zeros(2)}, str(data_root / "len.pt"))
    with pytest.raises(ShardError, match="different lengths"):
        inspect_shard(data_root / "len.pt")
    save_numpy_safetensors({"x": np.zeros((2, 2), np.float32)}, str(data_root / "noy.pt"))
    with pytest.raises(ShardError, match="needs tensors x and y"):
        inspect_shard(data_root / "noy.pt")


@pytest.mark.parametrize("lines,message", [
    (['{"text": "a"}', "not json"], "line 2 is not valid JSON"),
    (['{"text": "a"}', '{"body": "b"}'], "line 2 needs a string field 'text'"),
    (['{"text": "a", "y": 1}', '{"text": "b"}'], "same fields"),
    (['{"text": "a", "y": "x"}'], "y must be a number"),
])
def test_malformed_jsonl_is_refused(data_root: Path, lines: list[str], message: str) -> None:
    (data_root / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ShardError, match=message):
        inspect_shard(data_root / "bad.jsonl")


def test_unsupported_extension(data_root: Path) -> None:
    (data_root / "rows.csv").write_text("x,y\n1,0\n")
    with pytest.raises(ShardError, match="unsupported shard extension"):
        inspect_shard(data_root / "rows.csv")


def test_text_shards_are_tokenized_for_causal_lms(data_root: Path, hf_folders: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    texts = ["the cat sat", "a dog ran on the mat", "the hat", "cat", "dog ran"]
    (data_root / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": f"doc{i}"}) + "\n" for i, t in enumerate(texts[:3])))
    pq.write_table(pa.table({"text": pa.array(texts[3:])}), data_root / "b.parquet")
    shards = [(data_root / n, inspect_shard(data_root / n).format, inspect_shard(data_root / n).num_samples)
              for n in ("a.jsonl", "b.parquet")]
    tokenizer = AutoTokenizer.from_pretrained(str(hf_folders["gpt2"]), local_files_only=True)
    training = ShardedTrainingSet(shards, task="causal_lm", tokenizer=tokenizer)
    batches = list(training.batches(2))
    assert [s for s, _ in batches] == [0, 2, 4]
    first = batches[0][1]
    ids = first.inputs["input_ids"]  # type: ignore[index]
    assert ids.tolist() == [[3, 4, 5, 1, 1, 1], [10, 8, 9, 6, 3, 7]]
    assert first.targets.tolist() == [[3, 4, 5, -100, -100, -100], [10, 8, 9, 6, 3, 7]]
    assert batches[1][1].inputs["input_ids"].tolist() == [[3, 11], [4, 1]]  # type: ignore[index]
    assert training.sample_ids([0, 2, 3]) == ["doc0", "doc2", None]
    assert training.texts_at([4, 1, 3]) == ["dog ran", "a dog ran on the mat", "cat"]
    middle = ShardedTrainingSet(shards, task="causal_lm", tokenizer=tokenizer, row_start=1, row_stop=4)
    rows = [batch.inputs["input_ids"].tolist() for _, batch in middle.batches(8)]  # type: ignore[index]
    assert rows == [[[10, 8, 9, 6, 3, 7], [3, 11, 1, 1, 1, 1], [4, 1, 1, 1, 1, 1]]]


def test_prefetch_reraises_reader_errors_and_stops_early(data_root: Path) -> None:
    shards = _mixed_shards(data_root)
    training = ShardedTrainingSet(shards, task="classification")
    stream = cast(Generator[Any, None, None], training.batches(2))
    next(stream)
    stream.close()  # consumer stops early: the producer thread must not hang
    np.savez(data_root / "b.npz", x=X[:2], y=Y[:2])  # shrink a shard behind the set's back
    with pytest.raises(ShardError, match="now has 2 rows"):
        list(training.batches(4))
