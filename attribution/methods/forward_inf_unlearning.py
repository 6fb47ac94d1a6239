"""Forward-INF's first half: unlearning the queries (the sweep is `forward_inf_sweep`).

Unlearning (Algorithm 1, lines 1–4) runs K optimizer steps on the query loss:
- `unlearn_copy`: one independent model copy, the mean loss of all queries (joint mode);
  works for eager and TorchScript modules.
- `StackedModel.unlearn`: Q parameter sets `{name: [Q, *shape]}`, set q trained on query q
  alone, all updated together through `vmap(functional_call)` (eager modules only; the
  stateless API rejects TorchScript).
The optimizers are `torch.optim.SGD` (plain: no momentum, no weight decay),
`torch.optim.Adam` (both with `maximize=True` for ascent, so the updates are torch's own)
and `NormalizedSGD`, plain gradient ascent with a unit-length direction,

    θ_{k+1} = θ_k ± α g_k / ‖g_k‖₂,      g_k = ∇_θ L_q(θ_k)  (norm per parameter set),

the direction of SGD with a step length that does not vanish with the gradient (a
memorised query has ‖g‖ ~ 1e-17, so an SGD step leaves θ unchanged in float arithmetic).

`gradient_norms` gives each training row's ‖∇L_i‖₂² and ‖∇L_i‖₁ `[N]` (float64), the
denominators of relative Forward-INF scores (see `forward_inf.relative_norm_squared`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.func import functional_call, vmap

from attribution.data import Batch, TrainingSet
from attribution.gradient_directions import gradient_directions, scaled_norms
from attribution.interrupts import check_interrupt
from attribution.methods.forward_inf_stopping import forgotten_level, still_known
from attribution.methods.forward_inf_sweep import BatchLosses
from attribution.model import ModelAdapter, Params
from attribution.tasks import Inputs, _logits


@dataclass
class UnlearnLog:
    """What happened while unlearning: (parameter set, step) pairs `NormalizedSGD` skipped
    because the query gradient was exactly zero (a loss that underflowed to 0), and the steps
    each parameter set took (fewer than K when `until_forgotten` stopped it)."""

    zero_gradient_steps: int = 0
    steps_taken: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Unlearning:
    """K steps of `optimizer` ("sgd" | "normalized_sgd" | "adam") with learning rate α;
    `until_forgotten`: K is a cap, each run stops once its query loss reaches the forgotten
    level (`forward_inf_stopping`)."""

    optimizer: str
    steps: int
    lr: float
    ascent: bool = True
    until_forgotten: bool = False
    log: UnlearnLog = field(default_factory=UnlearnLog, compare=False)

    def make(self, tensors: list[Tensor], *, stacked: bool = False) -> torch.optim.Optimizer:
        """The optimizer over `tensors`; `stacked`: dim 0 indexes independent parameter sets."""
        if self.optimizer == "adam":
            return torch.optim.Adam(tensors, lr=self.lr, maximize=self.ascent)
        if self.optimizer == "sgd":
            return torch.optim.SGD(tensors, lr=self.lr, maximize=self.ascent)
        if self.optimizer == "normalized_sgd":
            return NormalizedSGD(tensors, lr=self.lr, maximize=self.ascent, stacked=stacked, log=self.log)
        raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: sgd, normalized_sgd, adam")


class NormalizedSGD(torch.optim.Optimizer):
    """θ ← θ ± α g/‖g‖₂ (+ with `maximize`), the norm taken over all tensors of a parameter set.

    `stacked=True`: every tensor is `[Q, *shape]` and slice q is its own parameter set, with
    its own norm ‖g^(q)‖₂ = sqrt(Σ_tensors ‖g[q]‖²), recomputed every step. The norm and the
    scaling run in float64, so gradients down to ~1e-300 keep a unit-length step (float32
    squares are subnormal below ~1e-19 and 0 below ~1e-23). A set whose gradient is exactly zero is not moved and
    counted in `log.zero_gradient_steps`.
    """

    def __init__(self, params: Iterable[Tensor], *, lr: float, maximize: bool, stacked: bool,
                 log: UnlearnLog) -> None:
        super().__init__(params, {"lr": lr, "maximize": maximize})
        self.stacked = stacked
        self.log = log

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step on the gradients already in `.grad` (a `closure` recomputes them first)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            sets = group["params"][0].shape[0] if self.stacked else 1
            pairs = [(p, p.grad.double()) for p in group["params"] if p.grad is not None]
            if not pairs:  # no tracked parameter reaches the loss: a zero gradient
                self.log.zero_gradient_steps += sets
                continue
            squared = torch.zeros(sets, dtype=torch.float64, device=pairs[0][0].device)
            for _, g in pairs:
                squared += g.reshape(sets, -1).pow(2).sum(1)
            norm = squared.sqrt()
            moving = norm > 0
            self.log.zero_gradient_steps += int((~moving).sum())
            sign = 1.0 if group["maximize"] else -1.0
            scale = torch.where(moving, sign * group["lr"] / norm.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
            for p, g in pairs:
                shape = (sets, *([1] * (g.dim() - 1))) if self.stacked else ()
                p.add_((g * scale.reshape(shape)).to(p.dtype))
        return loss


def unlearn_copy(model: ModelAdapter, queries: Batch, how: Unlearning) -> ModelAdapter:
    """θ_K: a copy of `model` after K steps on the mean loss of `queries` (eager or TorchScript)."""
    copy = model.clone()
    tracked = set(copy.param_names)
    for name, param in copy.module.named_parameters():
        param.requires_grad_(name in tracked)
    opt = how.make(list(copy.live_params()))
    level = forgotten_level(copy.loss, queries).mean().reshape(1) if how.until_forgotten else None
    taken = 0
    for _ in range(how.steps):
        check_interrupt()
        opt.zero_grad(set_to_none=True)
        loss = copy.loss(queries).mean()
        if level is not None and taken and not bool(still_known(loss.reshape(1), level)[0]):
            break  # forgotten (the first step is always taken)
        loss.backward()
        opt.step()
        taken += 1
    opt.zero_grad(set_to_none=True)
    how.log.steps_taken.append(taken)
    # θ_K is only evaluated from here on (under inference_mode). A TorchScript module whose
    # parameters still require grad keeps a graph specialised for autograd and then fails on
    # inference tensors ("cannot be saved for backward") in a process whose base losses came
    # from the cache, i.e. whose first inference-mode call is this sweep.
    for param in copy.module.parameters():
        param.requires_grad_(False)
    return copy


class StackedModel:
    """An eager module evaluated with Q parameter sets at once (`functional_call` + `vmap`).

    Stacked parameters are `{name: [Q, *shape]}` for every tracked parameter; untracked
    parameters and buffers are shared by all Q sets.
    """

    def __init__(self, model: ModelAdapter) -> None:
        if model.is_scripted:
            raise ValueError("TorchScript modules cannot be evaluated with torch.func; use model copies")
        self.model = model
        tracked = set(model.param_names)
        self.fixed = {n: t.detach() for n, t in model.module.named_parameters() if n not in tracked}
        self.fixed.update(dict(model.module.named_buffers()))

    def losses(self, params: Params, inputs: Inputs, targets: Tensor) -> Tensor:
        """`[B]` per-sample losses with one (unstacked) parameter set."""
        state = {**self.fixed, **params}
        if isinstance(inputs, Mapping):
            out = functional_call(self.model.module, state, args=(), kwargs=self.model.task.model_kwargs(inputs))
        else:
            out = functional_call(self.model.module, state, (inputs,))
        return self.model.task.per_sample_loss(_logits(out), targets)

    def own_losses(self, stacked: Params, rows: Batch) -> Tensor:
        """`[Q]`: loss of parameter set q on row q of `rows` (Q rows)."""

        def one(params: Params, inputs: Inputs, target: Tensor) -> Tensor:
            return self.losses(params, _unsqueeze(inputs), target.unsqueeze(0)).sum()

        rows = rows.to(self.model.device)
        inputs = dict(rows.inputs) if isinstance(rows.inputs, Mapping) else rows.inputs
        return vmap(one, in_dims=(0, 0, 0))(stacked, inputs, rows.targets)

    def batch_losses(self, stacked: Params) -> BatchLosses:
        """Batch → `[Q, B]` losses of every parameter set on every row of the batch (one set:
        a plain forward, no `vmap`)."""
        single = _first(stacked) if {t.shape[0] for t in stacked.values()} == {1} else None

        def evaluate(batch: Batch) -> Tensor:
            batch = batch.to(self.model.device)
            if single is not None:
                return self.losses(single, batch.inputs, batch.targets).unsqueeze(0)
            return vmap(lambda params: self.losses(params, batch.inputs, batch.targets))(stacked)

        return evaluate

    def unlearn(self, queries: Batch, how: Unlearning) -> Params:
        """`{name: [Q, ...]}`: θ_K of each query unlearned on its own (query q → set q).

        The summed loss Σ_q L(θ_q, z_q) has gradient ∇L(θ_q, z_q) in slice q; SGD/Adam act
        elementwise and `NormalizedSGD` normalises per slice, so one optimizer over the
        stacked tensors equals Q separate runs. With `until_forgotten`, a set whose query
        reached its forgotten level is put back after each step (it no longer moves, whatever
        the optimizer's state), so each set stops on its own.
        """
        count = len(queries)
        stacked = {
            n: t.unsqueeze(0).repeat(count, *([1] * t.dim())).requires_grad_(True)
            for n, t in self.model.params().items()
        }
        opt = how.make(list(stacked.values()), stacked=True)
        queries = queries.to(self.model.device)
        if not how.until_forgotten:  # K fixed steps, every set moving
            for _ in range(how.steps):
                check_interrupt()
                opt.zero_grad(set_to_none=True)
                self.own_losses(stacked, queries).sum().backward()
                opt.step()
            how.log.steps_taken.extend([how.steps] * count)
            return {n: t.detach() for n, t in stacked.items()}
        level = forgotten_level(self.model.loss, queries)
        taken = torch.zeros(count, dtype=torch.long)
        for _ in range(how.steps):
            check_interrupt()
            opt.zero_grad(set_to_none=True)
            losses = self.own_losses(stacked, queries)
            first = bool((taken == 0).all())  # every set takes the first step
            moving = torch.ones(count, dtype=torch.bool) if first else still_known(losses, level).cpu()
            if not bool(moving.any()):
                break
            losses.sum().backward()
            held = {} if bool(moving.all()) else {n: t.detach()[~moving].clone() for n, t in stacked.items()}
            opt.step()
            with torch.no_grad():
                for n, kept in held.items():
                    stacked[n][~moving] = kept
            taken += moving.long()
        how.log.steps_taken.extend(int(k) for k in taken)
        return {n: t.detach() for n, t in stacked.items()}


def _first(stacked: Params) -> Params:
    """`{name: [*shape]}`: parameter set 0 of `{name: [Q, *shape]}` (views)."""
    return {n: t[0] for n, t in stacked.items()}


def _unsqueeze(inputs: Inputs) -> Inputs:
    if isinstance(inputs, Mapping):
        return {k: v.unsqueeze(0) for k, v in inputs.items()}
    return inputs.unsqueeze(0)


def gradient_norms(
    model: ModelAdapter, train: TrainingSet, *, rows: int, progress: Callable[[float], None] | None = None,
) -> dict[str, Tensor]:
    """`{"l2_squared": [N], "l1": [N]}`: ‖∇_θ L(θ̂, z_i)‖₂² and ‖∇_θ L(θ̂, z_i)‖₁ (float64, CPU).

    One per-sample gradient per row (`rows` at a time), reduced at once to two numbers; taken
    as direction × scale (`attribution.gradient_directions`), so a memorised row whose float32
    gradient underflows still gets its norm (down to ~1e-154).
    """
    total = len(train)
    l2_squared = torch.empty(total, dtype=torch.float64)
    l1 = torch.empty(total, dtype=torch.float64)
    for start, batch in train.batches(rows):
        norms = scaled_norms(*gradient_directions(model, batch, chunk_size=rows))
        stop = start + len(batch)
        l2_squared[start:stop] = norms["l2_squared"]
        l1[start:stop] = norms["l1"]
        if progress is not None:
            progress(stop / total)
    return {"l2_squared": l2_squared, "l1": l1}


def first_order_self_influence(optimizer: str, lr: float, norms: Mapping[str, Tensor]) -> Tensor:
    """`[N]` own loss change of each row after one step on its own loss, to first order:
    α‖g_i‖₂² (sgd), α‖g_i‖₂ (normalized_sgd), α‖g_i‖₁ (adam: first step ≈ α·sign(g_i))."""
    if optimizer == "sgd":
        return lr * norms["l2_squared"]
    if optimizer == "normalized_sgd":
        return lr * norms["l2_squared"].sqrt()
    if optimizer == "adam":
        return lr * norms["l1"]
    raise ValueError(f"unknown optimizer {optimizer!r}")


def relative_denominator(optimizer: str, lr: float, norms: Mapping[str, Tensor]) -> Tensor:
    """`[N]` D_i², the squared row norm RelatIF divides the scores by (`forward_inf` docstring).

    score(q, i) ≈ ⟨g_i, s(g_q)⟩ with s the optimizer's step map; D_i = max over unit steps of
    ⟨g_i, s⟩ makes |score(q, i)| / D_i ≤ (a factor of q alone), with equality for g_i ∝ g_q:
    sgd: s = αg_q, D_i² = α‖g_i‖₂² (= its self-influence); normalized_sgd: s = αĝ_q,
    D_i = α‖g_i‖₂; adam: s ≈ α·sign(g_q), D_i = α‖g_i‖₁ (Hölder's dual of ‖·‖_∞).
    """
    own = first_order_self_influence(optimizer, lr, norms)
    return own if optimizer == "sgd" else own.pow(2)


