"""Fixtures for the worker tests: a data root, Hugging Face folders built offline, settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from service.settings import Settings

ARCHITECTURES = "tests.workers.architectures:tiny_mlp,tests.workers.architectures:slow_mlp"
VOCAB = ["[UNK]", "[PAD]", "<eos>", "the", "cat", "sat", "on", "mat", "dog", "ran", "a", "hat"]


@pytest.fixture()
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture()
def settings(data_root: Path) -> Settings:
    """Embedded-mode settings (SQLite under the data root, no Redis) with the test architectures allowlisted."""
    return Settings(data_root=data_root, allowed_architectures=ARCHITECTURES, device="cpu")


def _word_tokenizer() -> object:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="<eos>")


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`gpt2`: a tiny GPT-2 causal LM with a word-level tokenizer; `bert`: a tiny 3-class BERT classifier."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    base = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(VOCAB), n_embd=8, n_layer=1, n_head=2, n_positions=16,
                                      bos_token_id=2, eos_token_id=2, pad_token_id=1))
    gpt2.save_pretrained(base / "gpt2")
    _word_tokenizer().save_pretrained(base / "gpt2")  # type: ignore[attr-defined]
    bert = BertForSequenceClassification(BertConfig(  # type: ignore[call-arg]
        vocab_size=len(VOCAB), hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        num_labels=3, max_position_embeddings=16, pad_token_id=1))
    bert.save_pretrained(base / "bert")
    _word_tokenizer().save_pretrained(base / "bert")  # type: ignore[attr-defined]
    return {"gpt2": base / "gpt2", "bert": base / "bert"}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Embedded settings with a migrated SQLite database (shared by one test module)."""
    from service.db.migrate import upgrade_head

    root = tmp_path_factory.mktemp("embedded-data")
    settings = Settings(data_root=root, allowed_architectures=ARCHITECTURES, device="cpu")
    upgrade_head(settings)
    return settings


@pytest.fixture()
def rq_settings(postgres_url: str, redis_url: str, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Queue-mode settings in the environment (the jobs read `get_settings()`): Postgres, Redis, a fresh data root."""
    from service.settings import get_settings

    for name, value in {"DATABASE_URL": postgres_url, "REDIS_URL": redis_url, "DATA_ROOT": str(data_root),
                        "ALLOWED_ARCHITECTURES": ARCHITECTURES, "DEVICE": "cpu", "JOB_RETRIES": "1",
                        "WORKER_LEASE_TTL_S": "3"}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()
