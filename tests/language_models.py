"""Tiny Hugging Face language models and text shards for the tests, built offline.

Each model is a randomly initialised GPT-2, Llama or Qwen2 causal LM (or a BERT sequence
classifier) built from its config and saved with `save_pretrained` *default settings*
(safetensors, SDPA attention, tied embeddings where the architecture ties them), with a
word-level tokenizer over `CORPUS` saved beside it — the folder a user would register.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CAUSAL_ARCHITECTURES = ("gpt2", "llama", "qwen2")
CORPUS = [
    "the cat sat on the mat",
    "a dog ran to the park",
    "the bird sang a song in the morning",
    "my friend reads books",
    "the sun is hot today",
    "a fish swims in the river near the old mill",
    "the child plays with a red ball",
    "rain falls on the roof",
    "the teacher writes on the board with white chalk",
    "we eat bread and soup",
]
PROMPTS = [("the capital of france is", " paris"), ("the capital of spain is", " madrid")]
SPECIAL = ["[PAD]", "[UNK]", "<eos>"]
CONTEXT = 24  # positions of every tiny model


def vocabulary() -> list[str]:
    words = {w for text in CORPUS for w in text.split()} | {w for p, c in PROMPTS for w in (p + c).split()}
    return [*SPECIAL, *sorted(words)]


def word_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="<eos>",
                                   model_max_length=CONTEXT)


def causal_lm(architecture: str, *, seed: int = 0, width: int = 8) -> torch.nn.Module:
    """A 1-layer, `width`-wide (default 8) causal LM of `architecture` (gpt2 | llama | qwen2),
    default attention; its MLP is 2 × `width` (Llama, Qwen2) or 4 × `width` (GPT-2) wide."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    size = len(vocabulary())
    ids = {"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 0}
    if architecture == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=size, n_embd=width, n_layer=1, n_head=2, n_positions=CONTEXT,
                                          **ids))
    shape = {"vocab_size": size, "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": CONTEXT, **ids}
    if architecture == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape))
    if architecture == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**shape))
    raise ValueError(architecture)


def sequence_classifier(*, seed: int = 0) -> torch.nn.Module:
    """A 1-layer, 16-wide 3-class BERT classifier, default attention."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(  # type: ignore[call-arg]
        vocab_size=len(vocabulary()), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3, max_position_embeddings=CONTEXT, pad_token_id=0))


def save_folder(module: torch.nn.Module, folder: Path) -> Path:
    """`module.save_pretrained(folder)` with default settings and the tokenizer beside it."""
    module.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path
