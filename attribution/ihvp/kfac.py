"""K-FAC: per-layer Kronecker-factored curvature (Martens & Grosse 2015; Grosse & Martens
2016 for convolutions), the block-diagonal approximation

    G ≈ blockdiag_l (S_l ⊗ A_l),   A_l = E[ã ãᵀ],   S_l = E[Σ_ŷ g gᵀ],

for every `nn.Linear`, `nn.Conv2d` and Hugging Face `Conv1D` layer l (GPT-2's linear layer,
`y = a W + b` with the weight stored `[in, out]`, the transpose of `nn.Linear`'s), with `ã = [a, 1]` the layer input (bias
column when the bias is tracked; convolution inputs unfolded into patches) and `g` the
gradient of the loss w.r.t. the layer's output (pre-activation). The expectation over the
model's predictive distribution ŷ (true Fisher) is taken in closed form: `g` is
back-propagated from each column of the output-Hessian square root `A_i` (`H_i = A_i A_iᵀ`,
`CurvatureOperator.output_factors`), which is the exact mean of the sampled
`∇ℓ(x, ŷ)` outer products and removes the sampling noise (models with more than
`MAX_FACTOR_OUTPUTS` outputs per row, e.g. language models, use one sampled ŷ per row). Positions (convolution patches,
sequence tokens) are averaged in `A` and summed in `S` (the KFC convention), so for one
row `G_i ≈ (Σ_t g gᵀ) ⊗ mean_t(ã ãᵀ)`. For token sequences the mean runs over the row's
real tokens only (`position_weights`): those of its `attention_mask`, or — a right-padded
causal-LM row without one — the positions up to its last counted target; padding has no
output gradient (it is in no `S` or `DW`) and would otherwise dilute `A`.

The flat parameter block of layer l is the row-major `[out, in(+1)]` matrix `W̃ = [W | b]`
(a `Conv1D` weight is stored `[in, out]`: `to_matrix` / `write` transpose it), for which `(S ⊗ A) vec(X) = vec(S X Aᵀ)`. With `S = Q_S Λ_S Q_Sᵀ`, `A = Q_A Λ_A Q_Aᵀ`:

    (S ⊗ A + λI)⁻¹ vec(X) = vec(Q_S [(Q_Sᵀ X Q_A) ⊘ (Λ_S Λ_Aᵀ + λ)] Q_Aᵀ).

K-FAC is exact for a single linear layer under squared error (`H_i = 2I`, so
`G = 2I ⊗ A = S ⊗ A`). Eager modules: the factors are captured with forward hooks.
TorchScript modules take no hooks: their linear layers (with a trainable bias, applied
once per row) are factored from per-sample gradients instead (`attribution.ihvp.kfac_scripted`,
the same factors up to rounding); their convolutions are refused. `unsupported_parameters`
lists, for any module and without running it, the trainable parameters K-FAC cannot factor
and why (the service records it at model registration). Every tracked parameter must
belong to a supported layer (`ValueError` naming the others — restrict `layers`); grouped
convolutions, non-zero padding modes and `padding="same"` are refused; so is the Hessian
curvature (indefinite: no output-Hessian square roots, a `ValueError`). Violations seen
only while fitting (a layer called twice or never) raise `KroneckerStructureError`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attribution.curvature import CurvatureOperator, flat_outputs
from attribution.data import Batch, TrainingSet
from attribution.ihvp.base import IHVPEstimator
from attribution.ihvp.kfac_scripted import (
    KroneckerStructureError,
    scripted_layer_statistics,
    scripted_linear_layers,
)
from attribution.model import ModelAdapter
from attribution.tasks import TaskName


@dataclass
class KroneckerLayer:
    """A supported layer and where its parameters sit in the flat `[P]` vector."""

    module: nn.Module
    weight: slice
    bias: slice | None
    out_features: int
    in_features: int  # without the bias column
    weight_name: str = ""
    bias_name: str | None = None  # the layer's bias parameter, tracked or not
    transposed: bool = False  # weight stored `[in, out]` (Hugging Face `Conv1D`)

    @property
    def width(self) -> int:
        return self.in_features + (1 if self.bias is not None else 0)

    def activations(self, inputs: Tensor) -> Tensor:
        """Layer input → `[B, T, in(+1)]` (patches for convolutions, bias column appended)."""
        if isinstance(self.module, nn.Conv2d):
            conv = self.module
            padding = 0 if conv.padding == "valid" else conv.padding
            patches = F.unfold(inputs, conv.kernel_size, dilation=conv.dilation, padding=padding,  # type: ignore[arg-type]
                               stride=conv.stride)
            acts = patches.transpose(1, 2)
        else:
            acts = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
        if self.bias is not None:
            acts = torch.cat([acts, torch.ones_like(acts[..., :1])], dim=-1)
        return acts

    def output_grads(self, grads: Tensor) -> Tensor:
        """Gradient w.r.t. the layer output → `[B, T, out]`."""
        if isinstance(self.module, nn.Conv2d):
            return grads.flatten(2).transpose(1, 2)
        return grads.reshape(grads.shape[0], -1, grads.shape[-1])

    def to_matrix(self, vectors: Tensor) -> Tensor:
        """`[M, P]` → `[M, out, in(+1)]` block of this layer."""
        m = vectors.shape[0]
        if self.transposed:
            mat = vectors[:, self.weight].reshape(m, self.in_features, self.out_features).transpose(1, 2)
        else:
            mat = vectors[:, self.weight].reshape(m, self.out_features, self.in_features)
        if self.bias is not None:
            mat = torch.cat([mat, vectors[:, self.bias].unsqueeze(2)], dim=2)
        return mat

    def write(self, out: Tensor, matrix: Tensor) -> None:
        """Inverse of `to_matrix`: write `[M, out, in(+1)]` into `out` `[M, P]`."""
        m = out.shape[0]
        weight = matrix[:, :, : self.in_features]
        out[:, self.weight] = (weight.transpose(1, 2) if self.transposed else weight).reshape(m, -1)
        if self.bias is not None:
            out[:, self.bias] = matrix[:, :, self.in_features]


def kronecker_layers(model: ModelAdapter) -> list[KroneckerLayer]:
    """Supported layers covering every tracked parameter; `ValueError` otherwise."""
    unsupported = unsupported_parameters(model.module)
    missing = {n: unsupported[n] for n in model.param_names if n in unsupported}
    if missing:
        listed = "; ".join(f"{n}: {why}" for n, why in list(missing.items())[:8])
        raise ValueError(f"K-FAC/EK-FAC cannot factor parameters {list(missing)} ({listed}) — restrict `layers` "
                         f"to {kronecker_prefixes(model.module) or 'supported layers'} or use ihvp exact, cg, lissa "
                         "or arnoldi")
    offsets: dict[str, slice] = {}
    start = 0
    for name, p in model.params().items():
        offsets[name] = slice(start, start + p.numel())
        start += p.numel()
    layers: list[KroneckerLayer] = []
    for _, module, w_name, b_name in _factorable(model.module):
        if w_name not in offsets:
            continue
        weight = dict(model.module.named_parameters())[w_name]
        transposed = is_conv1d(module)
        out_features, in_features = (weight.shape[1], weight.shape[0]) if transposed else \
            (weight.shape[0], weight[0].numel())
        layers.append(KroneckerLayer(module, offsets[w_name], offsets.get(b_name) if b_name else None,
                                     out_features, in_features, w_name, b_name, transposed))
    return layers


def unsupported_parameters(module: nn.Module) -> dict[str, str]:
    """`{name: reason}` for every trainable parameter K-FAC/EK-FAC cannot factor (empty: all can).
    Static: reads the module's layers (eager) or its TorchScript graph, never runs it."""
    if isinstance(module, torch.jit.ScriptModule):
        return scripted_linear_layers(module)[1]
    covered: set[str] = set()
    reasons: dict[str, str] = {}
    for prefix, sub in module.named_modules():
        if isinstance(sub, nn.Linear | nn.Conv2d) or is_conv1d(sub):
            names = {f"{prefix}.{p}" if prefix else p for p, _ in sub.named_parameters(recurse=False)}
            if _unsupported_conv(sub):
                reasons.update({n: "a Conv2d with groups, non-zero padding mode or padding='same'" for n in names})
            else:
                covered.update(names)
    return {n: reasons.get(n, "not in an nn.Linear, nn.Conv2d or Conv1D layer")
            for n, p in module.named_parameters() if p.requires_grad and n not in covered}


def kronecker_prefixes(module: nn.Module) -> list[str]:
    """Names of the layers K-FAC can factor (prefixes for `layers`)."""
    return [prefix for prefix, _, _, _ in _factorable(module)]


def _factorable(module: nn.Module) -> list[tuple[str, nn.Module, str, str | None]]:
    """`(prefix, layer module, weight name, bias name)` of every layer K-FAC can factor."""
    if isinstance(module, torch.jit.ScriptModule):
        submodules = dict(module.named_modules())
        found: list[tuple[str, nn.Module, str, str | None]] = []
        for layer in scripted_linear_layers(module)[0]:
            prefix = layer.weight.rpartition(".")[0]
            found.append((prefix, submodules.get(prefix, module), layer.weight, layer.bias))
        return found
    out: list[tuple[str, nn.Module, str, str | None]] = []
    for prefix, sub in module.named_modules():
        if (isinstance(sub, nn.Linear | nn.Conv2d) or is_conv1d(sub)) and not _unsupported_conv(sub):
            w_name = f"{prefix}.weight" if prefix else "weight"
            b_name = (f"{prefix}.bias" if prefix else "bias") if sub.bias is not None else None
            out.append((prefix, sub, w_name, b_name))
    return out


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is a Hugging Face `transformers.pytorch_utils.Conv1D` (`y = a W + b`, W
    `[in, out]`). Read from `sys.modules`: a model holding one has imported transformers, and
    a process that has not needs no import to answer no."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def _unsupported_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and (
        module.groups != 1 or module.padding_mode != "zeros" or module.padding == "same")


def position_weights(model: ModelAdapter, batch: Batch) -> Tensor | None:
    """`[B, T]` weights of a token batch's positions in the activation factor `A` (each row's
    real tokens weighted `1/count`, padding 0), or None (not a token batch: every position
    counts equally). Real tokens: the `attention_mask`'s; without one, a causal-LM row's
    positions up to its last counted target (rows are right-padded, targets −100 at padding)."""
    inputs = batch.inputs
    if not isinstance(inputs, Mapping):
        return None
    mask = inputs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2:
        real = mask.bool()
    elif model.task.name is TaskName.CAUSAL_LM and batch.targets.dim() == 2:
        counted = batch.targets != -100
        positions = torch.arange(counted.shape[1], device=counted.device)
        last = torch.where(counted, positions, torch.full_like(positions, -1)).max(dim=1).values
        real = positions[None, :] <= last[:, None]
    else:
        return None
    real = real.double()
    return real / real.sum(dim=1, keepdim=True).clamp(min=1)


def activation_moment(acts: Tensor, weights: Tensor | None) -> Tensor:
    """`Σ_b Σ_t w_bt ã_bt ã_btᵀ` `[in(+1), in(+1)]` for `acts` `[B, T, in(+1)]` (float64): each
    row's activation second moment averaged over its positions (`weights` `[B, T]` from
    `position_weights` when they match the layer's positions, else uniform `1/T`)."""
    if weights is None or tuple(weights.shape) != tuple(acts.shape[:2]):
        return torch.einsum("bti,btj->ij", acts, acts) / acts.shape[1]
    return torch.einsum("bt,bti,btj->ij", weights.to(acts), acts, acts)


def layer_statistics(curvature: CurvatureOperator, layers: list[KroneckerLayer], train: TrainingSet,
                     ) -> Iterator[tuple[int, list[Tensor], list[Tensor], Tensor | None]]:
    """Per batch: `(rows, acts, grads, weights)` with `acts[l]` `[B, T, in(+1)]` layer inputs
    `ã`, `grads[l]` `[R, B, T, out]` output gradients back-propagated from each column of the
    output-Hessian square root (`Σ_r g_r g_rᵀ = E_ŷ[g gᵀ]` per row) and `weights` `[B, T]`
    the batch's `position_weights` (or None). TorchScript modules:
    `scripted_layer_statistics` (T = 1)."""
    model = curvature.model
    if model.is_scripted:
        for rows, acts, grads in scripted_layer_statistics(curvature, layers, train):
            yield rows, acts, grads, None
        return
    for batch in curvature.batches(train):
        slots: dict[int, tuple[Tensor, Tensor]] = {}
        handles = [layer.module.register_forward_hook(_recorder(slots, i)) for i, layer in enumerate(layers)]
        try:
            with torch.enable_grad():
                outputs = flat_outputs(model, batch)
        finally:
            for handle in handles:
                handle.remove()
        if len(slots) != len(layers):
            raise KroneckerStructureError("K-FAC: some tracked layers were not called in the forward pass")
        layer_outputs = [slots[i][1] for i in range(len(layers))]
        with torch.enable_grad():
            factors = curvature.output_factors(outputs, batch.targets)
            columns = [torch.autograd.grad(outputs, layer_outputs, grad_outputs=factors[:, :, k], retain_graph=True)
                       for k in range(factors.shape[2])]
        acts = [layer.activations(slots[i][0]) for i, layer in enumerate(layers)]
        grads = [torch.stack([layer.output_grads(col[i]) for col in columns]) for i, layer in enumerate(layers)]
        weights = position_weights(model, batch)
        yield len(batch), acts, grads, None if weights is None else weights.cpu()


def _recorder(slots: dict[int, tuple[Tensor, Tensor]], index: int) -> Callable[..., None]:
    def record(_: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if index in slots:
            raise KroneckerStructureError("K-FAC: a layer called twice per forward pass (weight sharing) is not "
                                          "supported")
        slots[index] = (inputs[0].detach(), output)
    return record


def eigh_factor(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clipped at 0) and eigenvectors of a symmetric factor, in float64."""
    matrix = matrix.double()
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return values.clamp(min=0), vectors


class KFACIHVP(IHVPEstimator):
    """State per layer l: `l{l}.qa`, `l{l}.la`, `l{l}.qs`, `l{l}.ls` (eigenvectors/-values of A and S)."""

    name = "kfac"

    def __init__(self, curvature: CurvatureOperator, damping: float) -> None:
        super().__init__(curvature, damping)
        if not curvature.positive_semidefinite:
            raise ValueError(f"K-FAC/EK-FAC factor the Gauss-Newton curvature (Kronecker factors of output-Hessian "
                             f"square roots); the {curvature.kind.value} curvature is indefinite and has no such "
                             "factors — use ihvp exact, cg or arnoldi, or curvature gauss_newton")
        self.layers = kronecker_layers(curvature.model)

    def kronecker_factors(self) -> dict[str, Tensor]:
        """One pass: `A_l` `[in(+1), in(+1)]` and `S_l` `[out, out]` for every layer, as eigendecompositions."""
        a_sums = [torch.zeros(lay.width, lay.width, dtype=torch.float64) for lay in self.layers]
        s_sums = [torch.zeros(lay.out_features, lay.out_features, dtype=torch.float64) for lay in self.layers]
        rows = 0
        for count, acts, grads, weights in layer_statistics(self.curvature, self.layers, self.train):
            rows += count
            for i in range(len(self.layers)):
                a = acts[i].double().cpu()
                g = grads[i].double().cpu()
                a_sums[i] += activation_moment(a, weights)
                s_sums[i] += torch.einsum("rbto,rbtp->op", g, g)
        if rows == 0:
            raise ValueError("the training set is empty")
        state: dict[str, Tensor] = {}
        for i in range(len(self.layers)):
            state[f"l{i}.la"], state[f"l{i}.qa"] = eigh_factor(a_sums[i] / rows)
            state[f"l{i}.ls"], state[f"l{i}.qs"] = eigh_factor(s_sums[i] / rows)
        return state

    def compute_state(self) -> dict[str, Tensor]:
        return self.kronecker_factors()

    def eigenvalues(self, index: int) -> Tensor:
        """`[out, in(+1)]` curvature eigenvalues in the Kronecker eigenbasis: `Λ_S Λ_Aᵀ`."""
        return self.state[f"l{index}.ls"][:, None] * self.state[f"l{index}.la"][None, :]

    def _solve(self, vectors: Tensor) -> Tensor:
        out = torch.zeros_like(vectors, dtype=torch.float64)
        for i, layer in enumerate(self.layers):
            qa, qs = self.state[f"l{i}.qa"], self.state[f"l{i}.qs"]
            block = layer.to_matrix(vectors).double()
            rotated = qs.T @ block @ qa
            layer.write(out, qs @ (rotated / (self.eigenvalues(i) + self.damping)) @ qa.T)
        return out
