"""Text rows through the loader into per-sample losses and gradients, checked against a plain
loop over single, unpadded examples computed by hand — for Hugging Face folders saved with
default settings (SDPA attention): GPT-2, Llama and Qwen2 causal LMs and a BERT classifier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attribution.model import ModelAdapter
from attribution.tasks import task_for
from loading.model_inputs import InputSpec, split_by_tokens, text_batch
from loading.models import build_module, load_tokenizer_from
from loading.rows import Rows
from tests.language_models import (
    CAUSAL_ARCHITECTURES,
    CONTEXT,
    CORPUS,
    PROMPTS,
    causal_lm,
    save_folder,
    sequence_classifier,
)


def _loaded(module: torch.nn.Module, folder: Path, task: str) -> tuple[ModelAdapter, InputSpec, torch.nn.Module]:
    save_folder(module, folder)
    built = build_module(folder, "hf", task, architecture=None, allowlist=[])
    tokenizer = load_tokenizer_from(folder)
    spec = InputSpec(task=task_for(task).name, token_inputs=True, tokenizer=tokenizer, max_length=CONTEXT)
    return ModelAdapter(built, task_for(task)), spec, built


def _reference(module: torch.nn.Module, ids: list[int], counted_from: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy over positions ≥ `counted_from` (≥ 1) of one unpadded row, and its gradient."""
    module.zero_grad(set_to_none=True)
    tokens = torch.tensor([ids])
    logits = module(input_ids=tokens).logits[0, :-1].float()
    targets = tokens[0, 1:]
    keep = torch.arange(1, len(ids)) >= counted_from
    loss = F.cross_entropy(logits[keep], targets[keep])
    loss.backward()
    return float(loss), {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("architecture", CAUSAL_ARCHITECTURES)
@pytest.mark.parametrize("instruction", [False, True])
def test_causal_lm_per_sample_losses_and_gradients_equal_a_loop(tmp_path: Path, architecture: str,
                                                                  instruction: bool) -> None:
    model, spec, module = _loaded(causal_lm(architecture), tmp_path / architecture, "causal_lm")
    if instruction:  # prompt/completion rows beside plain text: only completion tokens count
        rows = Rows(text=[p + c for p, c in PROMPTS] + CORPUS[:3], prompt=[p for p, _ in PROMPTS] + [""] * 3)
    else:
        rows = Rows(text=CORPUS)
    encoded = text_batch(rows, spec)
    batch = encoded.batch
    assert "attention_mask" not in batch.inputs  # right-padded causal rows need none
    assert batch.inputs["input_ids"].shape[1] == max(len(t.split()) for t in rows.text)  # padded to the longest
    losses = model.loss(batch).detach()
    grads = model.per_sample_grads(batch)
    tokenizer = spec.tokenizer
    names = model.param_names
    for row, text in enumerate(rows.text):
        prompt = rows.prompt[row] if rows.prompt is not None else ""
        prompt_ids = tokenizer(prompt)["input_ids"] if prompt else []
        ids = prompt_ids + tokenizer(text[len(prompt):], add_special_tokens=False)["input_ids"]
        loss, reference = _reference(module, ids, max(len(prompt_ids), 1))
        assert losses[row].item() == pytest.approx(loss, rel=1e-5, abs=1e-6)
        expected = torch.cat([reference.get(n, torch.zeros_like(dict(module.named_parameters())[n])).reshape(-1)
                              for n in names])
        torch.testing.assert_close(grads[row], expected, rtol=1e-4, atol=1e-6)


def test_sequence_classifier_per_sample_gradients_equal_a_loop(tmp_path: Path) -> None:
    model, spec, module = _loaded(sequence_classifier(), tmp_path / "bert", "classification")
    labels = np.arange(len(CORPUS)) % 3
    batch = text_batch(Rows(text=CORPUS, y=labels), spec).batch
    assert batch.inputs["attention_mask"].shape == batch.inputs["input_ids"].shape  # bidirectional: masked
    grads = model.per_sample_grads(batch)
    losses = model.loss(batch).detach()
    for row, text in enumerate(CORPUS):
        module.zero_grad(set_to_none=True)
        ids = torch.tensor([spec.tokenizer(text)["input_ids"]])
        loss = F.cross_entropy(module(input_ids=ids).logits.float(), torch.tensor([labels[row]]))
        loss.backward()
        assert losses[row].item() == pytest.approx(float(loss), rel=1e-5, abs=1e-6)
        expected = torch.cat([p.grad.reshape(-1) for n, p in module.named_parameters() if n in model.param_names])
        torch.testing.assert_close(grads[row], expected, rtol=1e-4, atol=1e-6)


def test_truncation_is_counted_and_token_budget_splits_batches(tmp_path: Path) -> None:
    _, spec, _ = _loaded(causal_lm("gpt2"), tmp_path / "gpt2", "causal_lm")
    long_row = " ".join(CORPUS)  # > CONTEXT tokens
    encoded = text_batch(Rows(text=[CORPUS[0], long_row, CORPUS[1]]), spec)
    assert encoded.truncated.tolist() == [False, True, False]
    assert encoded.batch.inputs["input_ids"].shape == (3, CONTEXT)
    pieces = split_by_tokens(encoded.batch, token_budget=2 * CONTEXT)
    assert [offset for offset, _ in pieces] == [0, 2]
    assert [len(piece) for _, piece in pieces] == [2, 1]
    # the last piece holds only a short row: cut to its own length
    assert pieces[1][1].inputs["input_ids"].shape[1] == len(CORPUS[1].split())
