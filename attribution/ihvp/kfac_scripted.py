"""K-FAC/EK-FAC statistics of TorchScript modules, recovered from per-sample gradients.

TorchScript modules take no forward hooks, so the layer inputs `a` and output gradients `g`
that `attribution.ihvp.kfac` records in eager modules are recovered from parameter
gradients instead. For a linear layer `y = W a + b` applied once per row, the gradient of
any output cotangent `u` (`δ = J_yᵀ u`, `J_y` the Jacobian of the model outputs w.r.t. `y`) is

    ∂(uᵀf)/∂b = δ,        ∂(uᵀf)/∂W = δ aᵀ,

so per row:
- the K-FAC output gradients `g_r` (cotangent `u = A e_r`, a column of the output-Hessian
  square root, `CurvatureOperator.output_factors`) are the bias gradients;
- the layer input is `a = (δ aᵀ)ᵀ δ / ‖δ‖²` for any `δ ≠ 0`; a seeded Gaussian probe
  cotangent `u` gives `δ = J_yᵀ u ≠ 0` (almost surely) whenever the outputs depend on `y` at
  all. A row whose outputs do not depend on the layer (`J_y = 0`, e.g. every path through dead
  ReLUs) contributes `a = 0` to `A` here, its true input in an eager module; such a row
  contributes nothing to the exact curvature block either.

Which layers qualify is read from the module's inlined TorchScript graph (`aten::linear`
nodes): the weight and bias must be parameters used by that one node only, outside any
loop. Inputs with more than one position per row (`[B, T, in]`) give a weight gradient
`Σ_t δ_t a_tᵀ` that is not rank one; `scripted_layer_statistics` detects it (a
`KroneckerStructureError`). Convolutions are refused: their per-position output gradients
are not recoverable from parameter gradients.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attribution.curvature import flat_outputs, per_sample_output_vjp
from attribution.data import TrainingSet

if TYPE_CHECKING:
    from attribution.curvature import CurvatureOperator
    from attribution.ihvp.kfac import KroneckerLayer

ROW_CHUNK = 64
"""Rows per batched backward (the per-row cotangents make memory grow with its square)."""
RANK_ONE_TOL = 1e-3
"""Largest relative residual ‖DW − δâᵀ‖/‖DW‖ accepted as a rank-one (single-position) row."""


class KroneckerStructureError(ValueError):
    """A layer breaks a K-FAC assumption found only while fitting (called twice, not called,
    several positions per row of a TorchScript layer)."""


@dataclass(frozen=True)
class ScriptedLinear:
    """An `aten::linear` of a TorchScript module: its weight and bias parameter names."""

    weight: str
    bias: str


def scripted_linear_layers(module: torch.jit.ScriptModule) -> tuple[list[ScriptedLinear], dict[str, str]]:
    """`(layers, unsupported)`: the linear layers K-FAC can factor, and every other trainable
    parameter with the reason it cannot be factored."""
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    uses = _parameter_uses(module, set(trainable))
    layers: list[ScriptedLinear] = []
    unsupported: dict[str, str] = {}
    covered: set[str] = set()
    for name in trainable:
        found = uses.get(name, [])
        kinds = {kind for kind, _, _, _ in found}
        if len(found) != 1 or found[0][1] != 1 or found[0][0] != "aten::linear":
            if name in covered:
                continue
            if kinds & {"aten::_convolution", "aten::conv1d", "aten::conv2d", "aten::conv3d"}:
                unsupported[name] = "a TorchScript convolution (its per-position gradients need forward hooks)"
            elif len(found) > 1:
                unsupported[name] = "used more than once per forward pass"
            else:
                unsupported[name] = "not the weight of a TorchScript linear layer"
            continue
        _, _, bias, in_loop = found[0]
        if in_loop:
            unsupported[name] = "a linear layer inside a loop (called more than once per row)"
        elif bias is None or bias not in uses or len(uses[bias]) != 1:
            unsupported[name] = "a TorchScript linear layer without a trainable bias (δ aᵀ cannot be split)"
        else:
            layers.append(ScriptedLinear(name, bias))
            covered.add(bias)
            unsupported.pop(bias, None)
    return layers, unsupported


# (node kind, input position, the node's bias parameter if an aten::linear, inside a loop)
_Use = tuple[str, int, str | None, bool]


def _parameter_uses(module: torch.jit.ScriptModule, names: set[str]) -> dict[str, list[_Use]]:
    """Every use of each parameter in the inlined forward graph."""
    graph = module.inlined_graph
    paths: dict[int, str] = {next(iter(graph.inputs())).unique(): ""}
    uses: dict[str, list[_Use]] = {}

    def walk(block: torch.Block, in_loop: bool) -> None:
        for node in block.nodes():
            if node.kind() == "prim::GetAttr":
                parent = paths.get(node.input().unique())
                if parent is not None:
                    attr = node.s("name")
                    paths[node.output().unique()] = f"{parent}.{attr}" if parent else attr
                continue
            inputs = list(node.inputs())
            bias = paths.get(inputs[2].unique()) if node.kind() == "aten::linear" and len(inputs) > 2 else None
            for position, value in enumerate(inputs):
                path = paths.get(value.unique())
                if path in names:
                    uses.setdefault(path, []).append((node.kind(), position, bias, in_loop))
            for sub in node.blocks():
                walk(sub, in_loop or node.kind() == "prim::Loop")

    walk(graph.block(), False)
    return uses


def scripted_layer_statistics(curvature: CurvatureOperator, layers: Sequence[KroneckerLayer],
                              train: TrainingSet) -> Iterator[tuple[int, list[Tensor], list[Tensor]]]:
    """`attribution.ihvp.kfac.layer_statistics` for TorchScript linear layers: per chunk of rows
    `(rows, acts, grads)`, `acts[l]` `[B, 1, in(+1)]` recovered inputs, `grads[l]` `[R, B, 1, out]`
    bias gradients of the output-Hessian square-root columns."""
    model = curvature.model
    named = dict(model.module.named_parameters())
    weights = [named[layer.weight_name] for layer in layers]
    biases = [named[layer.bias_name] for layer in layers if layer.bias_name is not None]
    if len(biases) != len(layers):
        raise ValueError("TorchScript K-FAC needs the bias parameter of every layer")
    generator = torch.Generator().manual_seed(curvature.seed)
    out_sizes = [b.numel() for b in biases]
    for batch in curvature.batches(train):
        for start in range(0, len(batch), ROW_CHUNK):
            rows = batch.slice(start, start + ROW_CHUNK)
            with torch.enable_grad():
                outputs = flat_outputs(model, rows)
                factors = curvature.output_factors(outputs, rows.targets)  # [B, K, R]
                columns = torch.stack([
                    per_sample_output_vjp(model, outputs, factors[:, :, r], params=biases)
                    for r in range(factors.shape[2])
                ])  # [R, B, Σ out]
                probe = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype).to(outputs.device)
                probed = per_sample_output_vjp(model, outputs, probe, params=[*weights, *biases])
            weight_part, bias_part = probed.split([sum(w.numel() for w in weights), sum(out_sizes)], dim=1)
            acts, grads = [], []
            for i, (layer, dw, delta, g) in enumerate(zip(
                    layers, weight_part.split([w.numel() for w in weights], dim=1),
                    bias_part.split(out_sizes, dim=1), columns.split(out_sizes, dim=2), strict=True)):
                inputs = _recovered_inputs(dw.reshape(len(rows), *weights[i].shape), delta, layer.weight_name)
                acts.append(layer.activations(inputs.to(dw.dtype)))
                grads.append(g.unsqueeze(2))
            yield len(rows), acts, grads


def _recovered_inputs(dw: Tensor, delta: Tensor, name: str) -> Tensor:
    """`[B, in]` `a = DWᵀδ / ‖δ‖²` (float64) from per-row `DW = δ aᵀ` `[B, out, in]` and `δ` `[B, out]`;
    0 where `δ = 0`. `KroneckerStructureError` when a row's `DW` is not rank one."""
    dw, delta = dw.double(), delta.double()
    norm_sq = delta.pow(2).sum(1, keepdim=True)
    inputs = torch.einsum("boi,bo->bi", dw, delta) / norm_sq.clamp(min=torch.finfo(torch.float64).tiny)
    inputs = torch.where(norm_sq > 0, inputs, torch.zeros_like(inputs))
    residual = (dw - delta[:, :, None] * inputs[:, None, :]).flatten(1).norm(dim=1)
    if bool((residual > RANK_ONE_TOL * dw.flatten(1).norm(dim=1)).any()):
        raise KroneckerStructureError(
            f"TorchScript layer {name!r}: a row's weight gradient is not rank one, so the layer sees several "
            "positions per row (e.g. [B, T, in] inputs) or runs more than once; K-FAC/EK-FAC on TorchScript "
            "need each linear layer applied once per row — use ihvp cg, lissa, arnoldi or exact")
    return inputs
