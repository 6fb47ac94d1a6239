"""K-FAC: per-layer Kronecker-factored curvature (Martens & Grosse 2015; Grosse & Martens
2016 for convolutions), the block-diagonal approximation

    G ≈ blockdiag_l (S_l ⊗ A_l),   A_l = E[ã ãᵀ],   S_l = E[Σ_ŷ g gᵀ],

for every `nn.Linear` and `nn.Conv2d` layer l, with `ã = [a, 1]` the layer input (bias
column when the bias is tracked; convolution inputs unfolded into patches) and `g` the
gradient of the loss w.r.t. the layer's output (pre-activation). The expectation over the
model's predictive distribution ŷ (true Fisher) is taken in closed form: `g` is
back-propagated from each column of the output-Hessian square root `A_i` (`H_i = A_i A_iᵀ`,
`CurvatureOperator.output_factors`), which is the exact mean of the sampled
`∇ℓ(x, ŷ)` outer products and removes the sampling noise (models with more than
`MAX_FACTOR_OUTPUTS` outputs per row, e.g. language models, use one sampled ŷ per row). Positions (convolution patches,
sequence tokens) are averaged in `A` and summed in `S` (the KFC convention), so for one
row `G_i ≈ (Σ_t g gᵀ) ⊗ mean_t(ã ãᵀ)`.

The flat parameter block of layer l is the row-major `[out, in(+1)]` matrix `W̃ = [W | b]`,
for which `(S ⊗ A) vec(X) = vec(S X Aᵀ)`. With `S = Q_S Λ_S Q_Sᵀ`, `A = Q_A Λ_A Q_Aᵀ`:

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

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attribution.curvature import CurvatureOperator, flat_outputs
from attribution.data import TrainingSet
from attribution.ihvp.base import IHVPEstimator
from attribution.ihvp.kfac_scripted import (
    KroneckerStructureError,
    scripted_layer_statistics,
    scripted_linear_layers,
)
from attribution.model import ModelAdapter


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
        mat = vectors[:, self.weight].reshape(m, self.out_features, self.in_features)
        if self.bias is not None:
            mat = torch.cat([mat, vectors[:, self.bias].unsqueeze(2)], dim=2)
        return mat

    def write(self, out: Tensor, matrix: Tensor) -> None:
        """Inverse of `to_matrix`: write `[M, out, in(+1)]` into `out` `[M, P]`."""
        m = out.shape[0]
        out[:, self.weight] = matrix[:, :, : self.in_features].reshape(m, -1)
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
        layers.append(KroneckerLayer(module, offsets[w_name], offsets.get(b_name) if b_name else None,
                                     weight.shape[0], weight[0].numel(), w_name, b_name))
    return layers


def unsupported_parameters(module: nn.Module) -> dict[str, str]:
    """`{name: reason}` for every trainable parameter K-FAC/EK-FAC cannot factor (empty: all can).
    Static: reads the module's layers (eager) or its TorchScript graph, never runs it."""
    if isinstance(module, torch.jit.ScriptModule):
        return scripted_linear_layers(module)[1]
    covered: set[str] = set()
    reasons: dict[str, str] = {}
    for prefix, sub in module.named_modules():
        if isinstance(sub, nn.Linear | nn.Conv2d):
            names = {f"{prefix}.{p}" if prefix else p for p, _ in sub.named_parameters(recurse=False)}
            if _unsupported_conv(sub):
                reasons.update({n: "a Conv2d with groups, non-zero padding mode or padding='same'" for n in names})
            else:
                covered.update(names)
    return {n: reasons.get(n, "not in an nn.Linear or nn.Conv2d layer")
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
        if isinstance(sub, nn.Linear | nn.Conv2d) and not _unsupported_conv(sub):
            w_name = f"{prefix}.weight" if prefix else "weight"
            b_name = (f"{prefix}.bias" if prefix else "bias") if sub.bias is not None else None
            out.append((prefix, sub, w_name, b_name))
    return out


def _unsupported_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and (
        module.groups != 1 or module.padding_mode != "zeros" or module.padding == "same")


def layer_statistics(curvature: CurvatureOperator, layers: list[KroneckerLayer],
                     train: TrainingSet) -> Iterator[tuple[int, list[Tensor], list[Tensor]]]:
    """Per batch: `(rows, acts, grads)` with `acts[l]` `[B, T, in(+1)]` layer inputs `ã` and
    `grads[l]` `[R, B, T, out]` output gradients back-propagated from each column of the
    output-Hessian square root (`Σ_r g_r g_rᵀ = E_ŷ[g gᵀ]` per row). TorchScript modules:
    `scripted_layer_statistics` (T = 1)."""
    model = curvature.model
    if model.is_scripted:
        yield from scripted_layer_statistics(curvature, layers, train)
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
        yield len(batch), acts, grads


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
        for count, acts, grads in layer_statistics(self.curvature, self.layers, self.train):
            rows += count
            for i in range(len(self.layers)):
                a = acts[i].double().cpu()
                g = grads[i].double().cpu()
                a_sums[i] += torch.einsum("bti,btj->ij", a, a) / a.shape[1]
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
