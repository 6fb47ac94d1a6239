"""Tasks: what "the loss of one sample" means for a model.

A `Task` turns a model's raw output into a per-sample loss vector, the quantity every
attribution method differentiates or compares (kronfluence's `Task`, reduced to what
the methods here need). The task is fixed at model registration and never guessed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

Inputs = Tensor | Mapping[str, Tensor]


class TaskName(StrEnum):
    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    CAUSAL_LM = "causal_lm"


def _logits(output: Any) -> Tensor:
    """Raw model output → a tensor: plain tensors pass, HF outputs give `.logits`."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    raise TypeError(f"model output of type {type(output).__name__} has no logits tensor")


def _at_least_fp32(x: Tensor) -> Tensor:
    """Losses are computed in fp32, or in fp64 when the model already runs in fp64."""
    return x if x.dtype == torch.float64 else x.float()


class Task(ABC):
    """Per-sample loss of a model on a batch.

    Subclasses implement `per_sample_loss(output, targets) -> [B]`. `forward` calls the
    model the way its inputs require (a tensor positionally, a mapping as keywords).
    """

    name: TaskName
    causal: bool = False  # attention may only look back (decoder LMs)

    def forward(self, model: torch.nn.Module, inputs: Inputs) -> Tensor:
        """Model outputs for a batch: `[B, ...]` logits or predictions."""
        if isinstance(inputs, Mapping):
            return _logits(model(**self.model_kwargs(inputs)))
        return _logits(model(inputs))

    def model_kwargs(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Keyword inputs as the model receives them, with the attention mask as an additive bias.

        A Hugging Face `attention_mask` `[B, T]` (1 = token, 0 = padding) becomes the 4-D
        additive mask `[B, 1, 1, T]` (bidirectional) or `[B, 1, T, T]` (causal tasks: padding
        and the future both masked), 0 where attention is allowed and the float32 minimum
        elsewhere; a causal task's `input_ids` without a mask (right-padded rows, see
        `loading.model_inputs`) get the plain causal bias `[1, 1, T, T]`. Transformers uses
        a 4-D mask as given, whatever the attention implementation (eager, SDPA), while its
        own mask preparation branches on the values (`padding_mask.all()`, "is there padding
        and no mask?"), which `torch.func.vmap` cannot trace. The rewrite is structural (no
        data-dependent control flow), so it also runs inside `vmap`, and it gives the same
        outputs as the 2-D mask at every unpadded position.
        """
        mask = inputs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            return {**inputs, "attention_mask": additive_attention_mask(mask, causal=self.causal)}
        ids = inputs.get("input_ids")
        if self.causal and mask is None and isinstance(ids, Tensor) and ids.dim() == 2:
            return {**inputs, "attention_mask": additive_attention_mask(torch.ones_like(ids[:1]), causal=True)}
        return dict(inputs)

    @abstractmethod
    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """`[B]` loss of each sample, no reduction."""

    def loss(self, model: torch.nn.Module, inputs: Inputs, targets: Tensor) -> Tensor:
        """`[B]` per-sample loss `L(θ, z_b)` of `model` on a batch."""
        return self.per_sample_loss(self.forward(model, inputs), targets)

    def output_gradient_direction(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor] | None:
        """`(w̃ [B, K], log s [B])` with `∂ℓ_b/∂f_b = s_b w̃_b` (outputs flattened to `[B, K]`), `w̃`
        of order 1 at every loss value; `None` when the task has no such form (its gradient
        w.r.t. the outputs does not underflow). See `attribution.gradient_directions`."""
        return None

    def per_sample_log_loss(self, outputs: Tensor, targets: Tensor) -> Tensor | None:
        """`[B]` `log ℓ_b`, exact where `ℓ_b` itself underflows; `None` when the task has no such form."""
        return None


class ClassificationTask(Task):
    """Cross-entropy on logits `[B, C]` with integer labels `[B]`, in a form exact for tiny losses.

    `CE = lse(z) − z_y = softplus(lse_{j≠y}(z_j − z_y))`. The usual evaluation
    `log(Σ_j e^{z_j − max})` rounds `log(1 + ε)` to 0 once the margin `m = z_y − max_{j≠y} z_j`
    exceeds ~17 (fp32) or ~37 (fp64), so a memorised training row gets exactly zero loss and
    zero gradient, and loss *changes* (Forward-INF's score) vanish. `softplus` of the margin
    form keeps `CE ≈ e^{−m}` and its gradient representable down to ~1e-38 (fp32). Same value
    as `F.cross_entropy` wherever that one is accurate.
    """

    name = TaskName.CLASSIFICATION

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        logits = _at_least_fp32(outputs.reshape(outputs.shape[0], -1))
        labels = targets.long().reshape(-1, 1)
        if logits.shape[1] < 2:
            raise ValueError(f"classification needs at least 2 logits per sample, got {logits.shape[1]}")
        relative = logits - logits.gather(1, labels)  # z_j − z_y; 0 at the label
        others = relative.scatter(1, labels, float("-inf"))
        return F.softplus(torch.logsumexp(others, dim=1))

    def per_sample_log_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """`log CE = log softplus(u)`, `u = lse_{j≠y}(z_j − z_y)`; below u = −20 by
        `u + log1p(−e^u/2)` (error ~e^{2u}), so a margin of 1,000 gives −1,000, not −inf."""
        logits = _at_least_fp32(outputs.reshape(outputs.shape[0], -1))
        labels = targets.long().reshape(-1, 1)
        others = (logits - logits.gather(1, labels)).scatter(1, labels, float("-inf"))
        u = torch.logsumexp(others, dim=1)
        tail = u < -20
        return torch.where(tail, u + torch.log1p(-0.5 * torch.exp(u.clamp(max=-20))),
                           torch.log(F.softplus(u.clamp(min=-20))))

    def output_gradient_direction(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """`∂CE/∂z = p − e_y = s·w̃` with `s = 1 − p_y = σ(u)`, `u = lse_{j≠y}(z_j − z_y)`, and
        `w̃_j = softmax_{j≠y}(z_j)` (`j ≠ y`), `w̃_y = −1`: `log s = log σ(u)` is exact at any
        margin, and `w̃` never underflows (a memorised row's `p − e_y` is exactly 0 in fp32
        once its margin exceeds ~87, ~745 in fp64)."""
        logits = _at_least_fp32(outputs.reshape(outputs.shape[0], -1))
        labels = targets.long().reshape(-1, 1)
        relative = logits - logits.gather(1, labels)
        others = relative.scatter(1, labels, float("-inf"))
        direction = torch.softmax(others, dim=1).scatter(1, labels, -1.0)
        return direction, F.logsigmoid(torch.logsumexp(others, dim=1)).double()


class RegressionTask(Task):
    """Squared error summed over output dimensions: `Σ_j (f(x)_j − y_j)²` per sample."""

    name = TaskName.REGRESSION

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        pred = _at_least_fp32(outputs.reshape(outputs.shape[0], -1))
        target = targets.reshape(targets.shape[0], -1).to(pred.dtype)
        return ((pred - target) ** 2).sum(dim=1)


class CausalLMTask(Task):
    """Mean next-token cross-entropy per sequence.

    `outputs` are logits `[B, T, V]`; `targets` are token ids `[B, T]` aligned with the
    inputs, with `-100` at positions to ignore (padding, and a prompt's tokens when only a
    completion counts). Position t predicts t+1:
    `L(z) = −(1/|C|) Σ_{t+1 ∈ C} log p_θ(x_{t+1} | x_{≤t})`, C the counted positions.
    """

    name = TaskName.CAUSAL_LM
    causal = True

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        logits = _at_least_fp32(outputs[:, :-1, :])
        labels = targets[:, 1:].long()
        token_loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
            ignore_index=-100, reduction="none",
        ).reshape(labels.shape)
        counted = (labels != -100).sum(dim=1).clamp(min=1)
        return token_loss.sum(dim=1) / counted


def additive_attention_mask(mask: Tensor, *, causal: bool) -> Tensor:
    """`[B, T]` 0/1 padding mask → additive float32 bias `[B, 1, 1, T]` or, causal, `[B, 1, T, T]`."""
    keys = mask[:, None, None, :].bool()
    if causal:
        length = mask.shape[1]
        keys = keys & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    bias = torch.zeros(keys.shape, dtype=torch.float32, device=mask.device)
    return bias.masked_fill(~keys, torch.finfo(torch.float32).min)


_TASKS: dict[TaskName, type[Task]] = {
    TaskName.CLASSIFICATION: ClassificationTask,
    TaskName.REGRESSION: RegressionTask,
    TaskName.CAUSAL_LM: CausalLMTask,
}


def task_for(name: str | TaskName) -> Task:
    """The task object for a registered task name; `ValueError` lists valid names."""
    try:
        return _TASKS[TaskName(name)]()
    except ValueError:
        valid = ", ".join(t.value for t in TaskName)
        raise ValueError(f"unknown task {name!r}; valid tasks: {valid}") from None
