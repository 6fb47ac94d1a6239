"""`ModelAdapter`: one way to evaluate losses and per-sample gradients of any torch model.

Works for eager `nn.Module`s (Hugging Face models included) and for TorchScript archives.
Eager models use `torch.func` (`functional_call` + `vmap(grad)`), which is O(B) memory;
TorchScript modules reject the stateless API, so they use batched autograd
(`autograd.grad(..., is_grads_batched=True)` with one-hot output gradients), which gives
the same per-sample gradients.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from attribution.data import Batch, TrainingSet
from attribution.tasks import Task, _logits

Params = dict[str, Tensor]


class ModelAdapter:
    """A trained model θ̂ with its task; never mutated by the methods (they `clone()`).

    `layers` restricts the tracked parameters to names starting with one of the given
    prefixes (e.g. `["fc2"]` for last-layer variants); `None` tracks every trainable one.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        task: Task,
        *,
        device: torch.device | str = "cpu",
        layers: Sequence[str] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.module = _with_eager_attention(module.to(self.device).eval())
        self.task = task
        self.layers = list(layers) if layers else None
        names = select_parameters([n for n, p in self.module.named_parameters() if p.requires_grad], self.layers)
        if self.layers is not None and not names:
            raise ValueError(f"layers {self.layers} match no trainable parameter")
        self.param_names: list[str] = names

    # ----------------------------------------------------------------- parameters
    @property
    def is_scripted(self) -> bool:
        return isinstance(self.module, torch.jit.ScriptModule)

    def params(self) -> Params:
        """Tracked parameters, detached: `{name: tensor}`."""
        named = dict(self.module.named_parameters())
        return {n: named[n].detach() for n in self.param_names}

    def live_params(self) -> list[torch.nn.Parameter]:
        named = dict(self.module.named_parameters())
        return [named[n] for n in self.param_names]

    @property
    def num_params(self) -> int:
        """P, the number of tracked parameters."""
        return sum(p.numel() for p in self.params().values())

    def flat_params(self) -> Tensor:
        """`[P]` tracked parameters flattened in `param_names` order."""
        return torch.cat([p.reshape(-1) for p in self.params().values()])

    def unflatten(self, flat: Tensor) -> Params:
        """`[P]` → `{name: tensor}` with the tracked parameters' shapes."""
        out: Params = {}
        offset = 0
        for name, p in self.params().items():
            out[name] = flat[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
        return out

    def clone(self) -> ModelAdapter:
        """An independent copy (same task, device and tracked layers) safe to train.

        Deep-copied TorchScript modules get non-leaf parameters (`CloneBackward`); they are
        made leaves again, keeping each parameter's `requires_grad`.
        """
        module = copy.deepcopy(self.module)
        for param in module.parameters():
            if not param.is_leaf:
                param.detach_().requires_grad_(True)
        return ModelAdapter(module, self.task, device=self.device, layers=self.layers)

    def digest(self) -> str:
        """sha256 of the module's parameters and buffers (names, shapes, values)."""
        digest = hashlib.sha256()
        for name, tensor in [*self.module.named_parameters(), *self.module.named_buffers()]:
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def load_flat(self, flat: Tensor) -> None:
        """Overwrite the tracked parameters in place from `[P]`."""
        named = dict(self.module.named_parameters())
        for name, value in self.unflatten(flat).items():
            named[name].copy_(value)

    # ----------------------------------------------------------------- losses
    def loss(self, batch: Batch) -> Tensor:
        """`[B]` per-sample loss with autograd (for training steps)."""
        batch = batch.to(self.device)
        return self.task.loss(self.module, batch.inputs, batch.targets)

    def losses(self, train: TrainingSet, batch_size: int = 1024) -> Tensor:
        """`[N]` per-sample losses `L(θ, z_i)` over a training set, one forward per row.

        Under `inference_mode`, except for TorchScript modules: once the JIT has profiled
        them with gradients (e.g. TRAK's margin gradients) it runs differentiable graphs that
        refuse inference tensors, so those sweep under `no_grad`.
        """
        out = torch.empty(len(train), dtype=torch.float32)
        with torch.no_grad() if self.is_scripted else torch.inference_mode():
            for start, batch in train.batches(batch_size):
                out[start: start + len(batch)] = self.loss(batch).float().cpu()
        return out

    # ----------------------------------------------------------------- gradients
    def grad(self, batch: Batch, reduction: str = "mean") -> Tensor:
        """`[P]` gradient of the batch loss (mean or sum over rows) w.r.t. tracked params."""
        loss = self.loss(batch)
        total = loss.mean() if reduction == "mean" else loss.sum()
        grads = torch.autograd.grad(total, self.live_params(), allow_unused=True)
        return _flatten(grads, self.params())

    def per_sample_grads(self, batch: Batch, chunk_size: int = 64) -> Tensor:
        """`[B, P]` gradients `∇_θ L(θ, z_b)` of each row's own loss."""
        parts = [self._per_sample_chunk(batch.slice(s, s + chunk_size)) for s in range(0, len(batch), chunk_size)]
        return torch.cat(parts) if parts else torch.empty(0, self.num_params, device=self.device)

    def iter_per_sample_grads(self, train: TrainingSet, batch_size: int = 256) -> Iterator[tuple[int, Tensor]]:
        """`(start, [b, P])` per-sample gradients over a training set, in row order."""
        for start, batch in train.batches(batch_size):
            yield start, self.per_sample_grads(batch)

    def _per_sample_chunk(self, batch: Batch) -> Tensor:
        batch = batch.to(self.device)
        if self.is_scripted:
            return self._per_sample_batched_autograd(batch)
        return self._per_sample_vmap(batch)

    def _per_sample_vmap(self, batch: Batch) -> Tensor:
        frozen = {n: p.detach() for n, p in self.module.named_parameters() if n not in self.param_names}
        buffers = dict(self.module.named_buffers())
        task, module = self.task, self.module

        def one_loss(params: Params, inputs: object, target: Tensor) -> Tensor:
            unsq = {k: v.unsqueeze(0) for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.unsqueeze(0)  # type: ignore[attr-defined]
            state = {**frozen, **params, **buffers}
            if isinstance(unsq, dict):
                out = functional_call(module, state, args=(), kwargs=task.model_kwargs(unsq))
            else:
                out = functional_call(module, state, (unsq,))
            return task.per_sample_loss(_logits(out), target.unsqueeze(0)).sum()

        inputs = dict(batch.inputs) if not isinstance(batch.inputs, Tensor) else batch.inputs
        grads = vmap(grad(one_loss), in_dims=(None, 0, 0))(self.params(), inputs, batch.targets)
        return torch.cat([grads[n].reshape(len(batch), -1) for n in self.param_names], dim=1).detach()

    def _per_sample_batched_autograd(self, batch: Batch) -> Tensor:
        losses = self.loss(batch)
        eye = torch.eye(len(batch), device=losses.device, dtype=losses.dtype)
        params = self.live_params()
        grads = torch.autograd.grad(losses, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
        cols = [
            (g if g is not None else torch.zeros(len(batch), *p.shape, device=p.device)).reshape(len(batch), -1)
            for g, p in zip(grads, params, strict=True)
        ]
        return torch.cat(cols, dim=1).detach()


def _with_eager_attention(module: torch.nn.Module) -> torch.nn.Module:
    """A Hugging Face module switched to the eager attention kernel (other modules unchanged).

    The methods differentiate through attention in every way `torch.func` and autograd offer:
    per-sample gradients under `vmap`, Jacobian-vector products and Hessian-vector products by
    double backward. Fused kernels (SDPA's flash kernel on CPU, FlashAttention) have no
    double-backward and fall back to a slow loop under `vmap`; eager attention is plain tensor
    algebra with the same outputs. Masks are 4-D additive biases (`Task.model_kwargs`), which
    eager attention adds as given.
    """
    config = getattr(module, "config", None)
    switch = getattr(module, "set_attn_implementation", None)
    if config is not None and callable(switch) and getattr(config, "_attn_implementation", "eager") != "eager":
        switch("eager")
    return module


def select_parameters(names: Sequence[str], layers: Sequence[str] | None) -> list[str]:
    """The parameter names a `layers` prefix list selects: `n == p` or `n` starts with `p + "."`
    for some prefix p; every name when `layers` is None or empty."""
    if not layers:
        return list(names)
    return [n for n in names if any(n == p or n.startswith(p + ".") for p in layers)]


def _flatten(grads: Sequence[Tensor | None], like: Params) -> Tensor:
    return torch.cat([
        (g if g is not None else torch.zeros_like(p)).reshape(-1)
        for g, p in zip(grads, like.values(), strict=True)
    ]).detach()
