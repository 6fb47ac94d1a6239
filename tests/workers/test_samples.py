"""`check_samples_against_model` / `samples_to_batch`: query samples checked against the model by a forward pass."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from loading import SamplesError, check_samples_against_model, load_model, samples_to_batch
from service.db.session import session_scope
from service.settings import Settings
from tests.workers import support


@pytest.fixture(scope="module")
def setup(embedded: Settings, hf_folders: dict[str, Path]) -> dict[str, Any]:
    """Two tenants; tenant A has the toy classifier, its dataset and a GPT-2; tenant B a dataset."""
    toy = support.toy_problem(n=20)
    root = embedded.data_root
    model_path = support.save_torchscript(toy.module, root / "toy.pt")
    shards = support.write_npz_shards(root, toy.x, toy.y, [12, 8])
    other = support.write_npz_shards(root, toy.x[:3], toy.y[:3], [3], prefix="other")
    tenant_a, tenant_b = uuid.uuid4().hex, uuid.uuid4().hex
    with session_scope(embedded) as session:
        model = support.register_model(session, tenant_a, model_path)
        dataset = support.register_dataset(session, tenant_a, shards)
        foreign = support.register_dataset(session, tenant_b, other)
        gpt2_folder = root / "gpt2"
        shutil.copytree(hf_folders["gpt2"], gpt2_folder)
        gpt2 = support.register_model(session, tenant_a, gpt2_folder, fmt="hf", task="causal_lm")
        gpt2_data = support.register_dataset(session, tenant_a, other)
    return {"toy": toy, "model": model, "dataset": dataset, "foreign": foreign, "gpt2": gpt2, "gpt2_data": gpt2_data}


def _parse(setup: dict[str, Any], settings: Settings, samples: dict[str, Any], model: str = "model",
           dataset: str = "dataset") -> int:
    with session_scope(settings) as session:
        return check_samples_against_model(samples, model_row=setup[model], dataset_row=setup[dataset], settings=settings,
                             session=session)


def test_inline_samples_build_the_exact_batch(setup: dict[str, Any], embedded: Settings) -> None:
    toy = setup["toy"]
    samples = {"x": toy.x_test[:3].tolist(), "y": toy.y_test[:3].tolist()}
    assert _parse(setup, embedded, samples) == 3
    model = load_model(setup["model"], embedded)
    with session_scope(embedded) as session:
        batch = samples_to_batch(samples, model_row=setup["model"], model=model, settings=embedded, session=session)
    torch.testing.assert_close(batch.inputs, torch.from_numpy(toy.x_test[:3]))
    assert batch.targets.tolist() == toy.y_test[:3].tolist() and batch.targets.dtype == torch.int64


def test_missing_labels_become_the_models_predictions(setup: dict[str, Any], embedded: Settings) -> None:
    toy = setup["toy"]
    model = load_model(setup["model"], embedded)
    with session_scope(embedded) as session:
        batch = samples_to_batch({"x": toy.x_test[:4].tolist()}, model_row=setup["model"], model=model,
                                 settings=embedded, session=session)
    expected = toy.module(torch.from_numpy(toy.x_test[:4])).argmax(dim=1)
    assert batch.targets.tolist() == expected.tolist()


@pytest.mark.parametrize("samples,field,message", [
    ({"x": [[0.0] * 6], "y": [3]}, "samples.y[0]", "between 0 and 2"),
    ({"x": [[0.0] * 6], "y": [-1]}, "samples.y[0]", "between 0 and 2"),
    ({"x": [[0.0] * 6], "y": [0.5]}, "samples.y", "must be integers"),
    ({"x": [[0.0] * 5], "y": [0]}, "samples.x", "cannot run"),
    # structure: the API's own checks (`loading.sample_structure`), naming the first bad entry
    ({"x": [[0.0] * 6, [0.0] * 5], "y": [0, 1]}, "samples.x[1]", "ragged"),
    ({"x": [[float("nan")] * 6], "y": [0]}, "samples.x[0][0]", "finite"),
    ({"x": [["a"] * 6], "y": [0]}, "samples.x[0][0]", "must be a number"),
    ({"x": [[0.0] * 6], "y": [0, 1]}, "samples.y", "2 entries"),
    ({"x": []}, "samples.x", "non-empty"),
    ({"z": [1]}, "samples.z", "unknown field"),
    ({"x": [[0.0] * 6], "text": ["a"]}, "samples", "exactly one of"),
    ({"text": ["the cat"]}, "samples.text", "tokenizer"),
])
def test_invalid_samples_name_the_field(setup: dict[str, Any], embedded: Settings, samples: dict[str, Any],
                                        field: str, message: str) -> None:
    with pytest.raises(SamplesError, match=message) as info:
        _parse(setup, embedded, samples)
    assert info.value.field == field


def test_sample_shape_must_match_the_dataset_rows(setup: dict[str, Any], embedded: Settings, data_root: Path) -> None:
    shaped = support.toy_problem(n=4)
    with session_scope(embedded) as session:
        wide = support.register_dataset(
            session, setup["model"].tenant,
            [_npz(embedded.data_root / "wide.npz", np.zeros((4, 7), np.float32), shaped.y)])
    setup = {**setup, "wide": wide}
    with pytest.raises(SamplesError, match="dataset's rows have shape"):
        _parse(setup, embedded, {"x": shaped.x_test[:1].tolist(), "y": [0]}, dataset="wide")


def _npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=x, y=y)
    return path


def test_refs_read_training_rows_of_the_same_tenant_only(setup: dict[str, Any], embedded: Settings) -> None:
    toy = setup["toy"]
    dataset, foreign = setup["dataset"], setup["foreign"]
    refs = {"refs": [{"dataset_id": dataset.id, "index": 13}, {"dataset_id": dataset.id, "index": 2}]}
    assert _parse(setup, embedded, refs) == 2
    model = load_model(setup["model"], embedded)
    with session_scope(embedded) as session:
        batch = samples_to_batch(refs, model_row=setup["model"], model=model, settings=embedded, session=session)
    torch.testing.assert_close(batch.inputs, torch.from_numpy(toy.x[[13, 2]]))
    assert batch.targets.tolist() == toy.y[[13, 2]].tolist()
    with pytest.raises(SamplesError, match="unknown dataset") as info:
        _parse(setup, embedded, {"refs": [{"dataset_id": foreign.id, "index": 0}]})
    assert info.value.field == "samples.refs[0].dataset_id"
    with pytest.raises(SamplesError, match="between 0 and 19") as info:
        _parse(setup, embedded, {"refs": [{"dataset_id": dataset.id, "index": 20}]})
    assert info.value.field == "samples.refs[0].index"


def test_text_samples_for_a_causal_lm(setup: dict[str, Any], embedded: Settings) -> None:
    assert _parse(setup, embedded, {"text": ["the cat sat", "a dog"]}, model="gpt2", dataset="gpt2_data") == 2
    model = load_model(setup["gpt2"], embedded)
    with session_scope(embedded) as session:
        batch = samples_to_batch({"text": ["the cat sat", "a dog"]}, model_row=setup["gpt2"], model=model,
                                 settings=embedded, session=session)
    assert batch.inputs["input_ids"].tolist() == [[3, 4, 5], [10, 8, 1]]  # type: ignore[index]
    assert batch.targets.tolist() == [[3, 4, 5], [10, 8, -100]]
    with pytest.raises(SamplesError, match="between 0 and 11"):
        _parse(setup, embedded, {"x": [[3, 40]]}, model="gpt2", dataset="gpt2_data")
