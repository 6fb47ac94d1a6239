"""A language model through the production deployment: `python -m service` on Postgres + Redis
with a separate `python -m workers`, a GPT-2 folder saved with default settings, text and
instruction shards; `text` and `prompt`/`completion` queries find the copied training row."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.testing import ServiceProcesses
from tests.conftest import TEST_DATABASE_URL, TEST_REDIS_URL
from tests.language_models import CORPUS, PROMPTS, causal_lm, save_folder, write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_language_model_queries_on_postgres_redis_and_a_worker(postgres_url: str, redis_url: str,
                                                                tmp_path: Path) -> None:
    root = tmp_path / "data"
    folder = save_folder(causal_lm("gpt2"), root / "gpt2")
    text = write_jsonl(root / "text.jsonl", [{"text": t} for t in CORPUS])
    instructions = root / "instructions.parquet"
    pq.write_table(pa.table({"prompt": [p for p, _ in PROMPTS], "completion": [c for _, c in PROMPTS]}), instructions)
    env = {"DATA_ROOT": str(root), "DATABASE_URL": TEST_DATABASE_URL, "REDIS_URL": TEST_REDIS_URL}
    with ServiceProcesses(env, workers=1, log_dir=tmp_path / "logs") as running:
        client = running.client
        model = client.post("/v1/models", json={"name": "gpt2", "uri": folder.as_uri(), "format": "hf",
                                                "task": "causal_lm"})
        assert model.status_code == 201, model.text
        dataset = client.post("/v1/datasets", json={"name": "text", "shards": [{"uri": text.as_uri()},
                                                                               {"uri": instructions.as_uri()}]})
        assert dataset.status_code == 201, dataset.text
        ids = {"model_id": model.json()["id"], "dataset_id": dataset.json()["id"]}
        bodies = [
            {**ids, "method": "forward_inf", "samples": {"text": [CORPUS[4]]}, "top_k": 3},  # no params: defaults
            {**ids, "method": "forward_inf", "params": {"normalize": "relative"}, "top_k": 3,
             "samples": {"text": [CORPUS[7]]}},
            {**ids, "method": "tracin", "params": {"normalize": "relative"}, "top_k": 3,
             "samples": {"prompt": [PROMPTS[0][0]], "completion": [PROMPTS[0][1]]}},
        ]
        submitted = []
        for body in bodies:
            response = client.post("/v1/queries", json=body)
            assert response.status_code == 202, response.text
            submitted.append(response.json()["id"])
        done = running.wait_final(submitted, timeout=300)
        results = [done[query_id] for query_id in submitted]
        for result in results:
            assert result["status"] == "succeeded", result["error"]
            assert result["result"]["extras"]["truncated_rows"] == 0
        relative, instruction = results[1]["result"]["top"][0], results[2]["result"]["top"][0]
        assert (relative["index"], relative["preview"]) == (7, CORPUS[7])
        assert (instruction["index"], instruction["preview"]) == (len(CORPUS), PROMPTS[0][0] + PROMPTS[0][1])
        assert results[0]["result"]["num_scored"] == len(CORPUS) + len(PROMPTS)
