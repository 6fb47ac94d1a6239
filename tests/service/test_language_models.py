"""Language models through the API (embedded mode): Hugging Face folders saved with default
settings, `.jsonl` and `.parquet` text shards, `text` and `prompt`/`completion` queries, every
method; an exact copy of a training row ranks first with relative scores; previews, truncation."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from loading import load_model
from loading.samples import samples_to_batch
from service.db.session import session_scope
from service.settings import Settings
from tests.language_models import (
    CAUSAL_ARCHITECTURES,
    CORPUS,
    PROMPTS,
    causal_lm,
    save_folder,
    write_jsonl,
)
from tests.service.embedded import module_service, run

settings, http = module_service("lm")

# Every method a text query can use, each with relative scores where the method has them
# (gradient_similarity's default cosine is already normalised).
METHODS: list[tuple[str, dict[str, Any]]] = [
    ("forward_inf", {"normalize": "relative"}),
    ("forward_inf", {"auto": True}),
    ("tracin", {"normalize": "relative"}),
    ("trak", {"normalize": "relative"}),
    ("gradient_similarity", {}),
    ("influence", {"normalize": "relative"}),
    ("integrated_influence", {"normalize": "relative"}),
    ("trackstar", {}),  # a cosine, already normalised
]
INSTRUCTION_ROWS = [{"prompt": p, "completion": c} for p, c in PROMPTS]


def _register(http: TestClient, settings: Settings, architecture: str) -> dict[str, str]:
    root = settings.data_root / architecture
    folder = save_folder(causal_lm(architecture), root / "model")
    text = write_jsonl(root / "text.jsonl", [{"text": t, "id": f"doc{i}"} for i, t in enumerate(CORPUS)])
    instructions = root / "instructions.parquet"
    pq.write_table(pa.table({"prompt": [r["prompt"] for r in INSTRUCTION_ROWS],
                             "completion": [r["completion"] for r in INSTRUCTION_ROWS]}), instructions)
    model = http.post("/v1/models", json={"name": architecture, "uri": folder.as_uri(), "format": "hf",
                                          "task": "causal_lm"})
    assert model.status_code == 201, model.text
    dataset = http.post("/v1/datasets", json={"name": "text", "shards": [{"uri": text.as_uri()},
                                                                         {"uri": instructions.as_uri()}]})
    assert dataset.status_code == 201, dataset.text
    assert dataset.json()["num_samples"] == len(CORPUS) + len(PROMPTS)
    return {"model_id": model.json()["id"], "dataset_id": dataset.json()["id"]}


@pytest.fixture(scope="module")
def registered(http: TestClient, settings: Settings) -> dict[str, dict[str, str]]:
    return {architecture: _register(http, settings, architecture) for architecture in CAUSAL_ARCHITECTURES}


@pytest.mark.parametrize("architecture", CAUSAL_ARCHITECTURES)
@pytest.mark.parametrize(("method", "params"), METHODS, ids=[f"{m}-{'-'.join(p) or 'defaults'}" for m, p in METHODS])
def test_a_copied_training_text_ranks_first(http: TestClient, registered: dict[str, dict[str, str]],
                                            architecture: str, method: str, params: dict[str, Any]) -> None:
    copied = 5
    done = run(http, {**registered[architecture], "method": method, "params": params, "top_k": 3,
                      "samples": {"text": [CORPUS[copied]]}})
    top = done["result"]["top"][0]
    assert top["index"] == copied
    assert top["sample_id"] == f"doc{copied}"
    assert top["preview"] == CORPUS[copied]
    assert done["result"]["extras"]["truncated_rows"] == 0


@pytest.mark.parametrize("architecture", CAUSAL_ARCHITECTURES)
def test_forward_inf_defaults_on_a_causal_lm_and_the_forgotten_stop(
        http: TestClient, registered: dict[str, dict[str, str]], architecture: str) -> None:
    """No params: the causal-LM defaults (20 normalised ascent steps in the token embeddings, relative) rank a copied
    text first; `stop: forgotten` does too and reports the steps each query took (at most 20)."""
    copied = 3
    done = run(http, {**registered[architecture], "method": "forward_inf", "top_k": 3,
                      "samples": {"text": [CORPUS[copied]]}})
    assert done["result"]["top"][0]["index"] == copied
    assert "unlearning_steps" not in done["result"]["extras"]  # fixed K: every query takes 20 steps
    forgotten = run(http, {**registered[architecture], "method": "forward_inf", "top_k": 3,
                           "params": {"stop": "forgotten"}, "samples": {"text": [CORPUS[copied]]}})
    assert forgotten["result"]["top"][0]["index"] == copied
    steps = forgotten["result"]["extras"]["unlearning_steps"]
    assert len(steps) == 1 and 0 <= steps[0] <= 20


@pytest.mark.parametrize("architecture", CAUSAL_ARCHITECTURES)
def test_a_prompt_completion_query_finds_its_instruction_row(http: TestClient, registered: dict[str, dict[str, str]],
                                                             architecture: str) -> None:
    prompt, completion = PROMPTS[1]
    done = run(http, {**registered[architecture], "method": "gradient_similarity", "top_k": 2,
                      "samples": {"prompt": [prompt], "completion": [completion]}})
    top = done["result"]["top"][0]
    assert top["index"] == len(CORPUS) + 1
    assert top["preview"] == prompt + completion


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_influence_with_no_params_fits_ekfac_to_an_lm_above_the_exact_limit(
        http: TestClient, settings: Settings, architecture: str) -> None:
    """A 48-wide LM (more parameters than `exact_max_params`, 20,000): `influence` with no
    params solves with EK-FAC over the blocks' linear layers (GPT-2's Conv1D included), says
    which layers it tracked and which parameters it left out, ranks a copied training text
    first (relative scores by default) and stays quick."""
    root = settings.data_root / f"{architecture}-wide"
    module = causal_lm(architecture, width=48)
    assert sum(p.numel() for p in module.parameters()) > 20_000
    folder = save_folder(module, root / "model")
    text = write_jsonl(root / "text.jsonl", [{"text": t, "id": f"doc{i}"} for i, t in enumerate(CORPUS)])
    model_id = http.post("/v1/models", json={"name": f"{architecture}-wide", "uri": folder.as_uri(), "format": "hf",
                                             "task": "causal_lm"}).json()["id"]
    dataset_id = http.post("/v1/datasets", json={"name": "text", "shards": [{"uri": text.as_uri()}]}).json()["id"]
    copied = 8
    started = time.perf_counter()
    done = run(http, {"model_id": model_id, "dataset_id": dataset_id, "method": "influence", "top_k": 3,
                      "samples": {"text": [CORPUS[copied]]}})
    assert time.perf_counter() - started < 120
    extras = done["result"]["extras"]
    assert extras["ihvp"] == "ekfac"
    layer_kinds = {prefix.rpartition(".")[2] for prefix in extras["ihvp_layers"]}
    expected = {"c_attn", "c_proj", "c_fc"} if architecture == "gpt2" else \
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert layer_kinds == expected
    untracked = [name for names in extras["ihvp_untracked"].values() for name in names]
    assert ("transformer.wte.weight" if architecture == "gpt2" else "lm_head.weight") in untracked
    assert done["result"]["top"][0]["index"] == copied
    explicit = run(http, {"model_id": model_id, "dataset_id": dataset_id, "method": "influence", "top_k": 1,
                          "params": {"ihvp": "kfac"}, "samples": {"text": [CORPUS[copied]]}})
    assert explicit["result"]["extras"]["ihvp"] == "kfac"
    assert explicit["result"]["top"][0]["index"] == copied


def test_self_influence_and_per_sample_queries_on_text(http: TestClient, registered: dict[str, dict[str, str]]) -> None:
    audit = run(http, {**registered["qwen2"], "method": "forward_inf", "self_influence": True, "top_k": 3})
    assert len(audit["result"]["top"]) == 3
    assert all(row["preview"] for row in audit["result"]["top"])
    both = run(http, {**registered["qwen2"], "method": "tracin", "mode": "per_sample", "top_k": 1,
                      "params": {"normalize": "relative"}, "samples": {"text": [CORPUS[1], CORPUS[8]]}})
    assert [ranking["top"][0]["index"] for ranking in both["result"]["per_sample"]] == [1, 8]


def test_prompt_completion_loss_counts_only_the_completion(http: TestClient, settings: Settings,
                                                           registered: dict[str, dict[str, str]]) -> None:
    from service.db.models import Model

    prompt, completion = "the cat sat on", " the mat"
    with session_scope(settings) as session:
        row = session.get(Model, registered["llama"]["model_id"])
        model = load_model(row, settings)
        batch = samples_to_batch({"prompt": [prompt], "completion": [completion]}, model_row=row, model=model,
                                 settings=settings, session=session)
        from loading import load_tokenizer

        tokenizer = load_tokenizer(row, settings)
    loss = float(model.loss(batch)[0])
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = torch.tensor(prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model.module(input_ids=ids[None]).logits[0]
    # completion tokens sit at positions len(prompt) … end; position t − 1 predicts token t
    positions = torch.arange(len(prompt_ids), len(ids))
    by_hand = F.cross_entropy(logits[positions - 1], ids[positions])
    assert loss == pytest.approx(float(by_hand), rel=1e-5)


def test_truncated_rows_are_counted_and_previews_exported(http: TestClient, settings: Settings) -> None:
    root = settings.data_root / "long"
    folder = save_folder(causal_lm("gpt2", seed=1), root / "model")
    rows = [*CORPUS[:4], " ".join(CORPUS)]  # the last row is longer than the context (24 tokens)
    shard = write_jsonl(root / "long.jsonl", [{"text": t} for t in rows])
    model_id = http.post("/v1/models", json={"name": "long", "uri": folder.as_uri(), "format": "hf",
                                             "task": "causal_lm"}).json()["id"]
    dataset_id = http.post("/v1/datasets", json={"name": "long", "shards": [{"uri": shard.as_uri()}]}).json()["id"]
    done = run(http, {"model_id": model_id, "dataset_id": dataset_id, "method": "forward_inf", "top_k": 2,
                      "samples": {"text": [CORPUS[2]]}})
    assert done["result"]["extras"]["truncated_rows"] == 1
    assert done["result"]["extras"]["max_length"] == 24
    exported = http.get(f"/v1/queries/{done['id']}/scores?format=csv")
    assert exported.status_code == 200
    table = list(csv.DictReader(io.StringIO(exported.text)))
    assert len(table) == len(rows) and list(table[0]) == ["index", "score", "preview"]
    ranked = {row["index"]: row["preview"] for row in done["result"]["top"] + done["result"]["bottom"]}
    for line in table:
        assert line["preview"] == (ranked.get(int(line["index"])) or "")
    assert table[4]["preview"] in ("", rows[4][:200])


def test_prompt_completion_samples_are_validated(http: TestClient, registered: dict[str, dict[str, str]]) -> None:
    ids = registered["gpt2"]
    cases = [
        ({"prompt": ["a"], "completion": ["b", "c"]}, "samples.completion"),
        ({"prompt": ["a"], "completion": [""]}, "samples.completion"),
        ({"prompt": ["a"]}, "samples"),
        ({"prompt": [1], "completion": ["b"]}, "samples.prompt[0]"),
    ]
    for samples, field in cases:
        response = http.post("/v1/queries", json={**ids, "method": "forward_inf", "samples": samples})
        assert response.status_code == 422, response.text
        assert field in response.json()["detail"]


def test_prompt_completion_needs_a_causal_lm(http: TestClient, settings: Settings, tmp_path: Path) -> None:
    from tests.language_models import sequence_classifier

    folder = save_folder(sequence_classifier(), settings.data_root / "bert")
    shard = write_jsonl(settings.data_root / "labelled.jsonl", [{"text": t, "y": i % 3} for i, t in enumerate(CORPUS)])
    model_id = http.post("/v1/models", json={"name": "bert", "uri": folder.as_uri(), "format": "hf",
                                             "task": "classification"}).json()["id"]
    dataset_id = http.post("/v1/datasets", json={"name": "labelled", "shards": [{"uri": shard.as_uri()}]}).json()["id"]
    response = http.post("/v1/queries", json={"model_id": model_id, "dataset_id": dataset_id, "method": "tracin",
                                              "samples": {"prompt": ["a"], "completion": [" b"]}})
    assert response.status_code == 422 and "causal_lm" in response.json()["detail"]
    done = run(http, {"model_id": model_id, "dataset_id": dataset_id, "method": "gradient_similarity", "top_k": 1,
                      "samples": {"text": [CORPUS[3]], "y": [0]}})
    assert done["result"]["top"][0]["index"] == 3
