"""Curvature of the training objective, as matrix-free products and as a dense matrix.

For a training set of N rows, model outputs `f_i = f(x_i; θ) ∈ ℝ^K` (flattened) and
per-sample losses `ℓ_i = ℓ(f_i, y_i)`, two positive semi-definite curvatures and the
Hessian are offered:

- Gauss-Newton (GGN): `G = (1/N) Σ_i J_iᵀ H_i J_i`, `J_i = ∂f_i/∂θ ∈ ℝ^{K×P}`,
  `H_i = ∂²ℓ_i/∂f_i²` (cross-entropy: `diag(p) − ppᵀ`; squared error: `2I`). For
  cross-entropy it equals the true Fisher `E_{ŷ∼p(·|x)}[∇ℓ(x,ŷ)∇ℓ(x,ŷ)ᵀ]`.
- Empirical Fisher: `F = (1/N) Σ_i g_i g_iᵀ`, `g_i = ∇_θ ℓ_i` at the observed labels.
- Hessian: `H = (1/N) Σ_i ∇²_θ ℓ_i = G + (1/N) Σ_i Σ_k (∂ℓ_i/∂f_ik) ∇²_θ f_ik`, the
  undamped Hessian of the mean loss (Koh & Liang 2017). The second term, which the GGN
  drops, vanishes for models linear in θ (then `H = G`) but not for non-linear networks,
  where `H` is indefinite away from a minimum: `positive_semidefinite` is False, and
  `pseudo_gradients` / `output_factors` (square-root factorisations) raise.

Everything is plain autograd on the model's forward pass, so it works for eager modules
and TorchScript modules alike (`torch.func.functional_call` rejects the latter):

- `J v` by the double-vjp trick: `Jᵀu` is linear in a dummy output cotangent `u`, so
  `J v = ∂(vᵀ Jᵀu)/∂u`;
- `H w` by double backward of the loss w.r.t. the (detached) outputs;
- `Jᵀ w` by one more vjp; all three batched over M vectors with `is_grads_batched`;
- Hessian-vector products `Σ_i ∇²_θ ℓ_i v = ∂(∇_θ(Σ_i ℓ_i)ᵀ v)/∂θ` by double backward of
  the loss gradient (taken once per batch with its graph), batched over M vectors the same way.

Dense matrices and traces use output-Hessian square roots `H_i = A_i A_iᵀ` (`A_i ∈
ℝ^{K×K}` from an eigendecomposition of `H_i`), giving "pseudo-gradients" `r_ik = J_iᵀ A_i e_k`
with `G = (1/N) Σ_{i,k} r_ik r_ikᵀ` — the exact expectation over the predictive
distribution that a sampled true Fisher only estimates. Above `MAX_FACTOR_OUTPUTS`
outputs per row (language models: T·V logits) the square root is replaced by one sampled
column per row, `a_i = ∇_f ℓ(f_i, ŷ_i)` with `ŷ_i` drawn from the model's predictive
distribution (a seeded Monte-Carlo true Fisher, `E[a aᵀ] = H_i`).

The Hessian has no such factors: its dense matrix (and diagonal blocks) are P Hessian-vector
products with identity columns, `HESSIAN_CHUNK` per double backward, symmetrised; its trace
is exact (the dense diagonal) up to `EXACT_TRACE_MAX_PARAMS` parameters, else a seeded
Hutchinson estimate `tr(H) ≈ (1/S) Σ_s z_sᵀ H z_s` over S = `HUTCHINSON_PROBES` Rademacher
probes (Hutchinson 1989; unbiased, relative error about `√(2/S)·‖H‖_F/|tr H|`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from enum import StrEnum

import torch
from torch import Tensor

from attribution.data import Batch, TrainingSet
from attribution.model import ModelAdapter
from attribution.tasks import TaskName

MAX_FACTOR_OUTPUTS = 512
"""Largest output dimension K for which output-Hessian square roots are formed."""
PSEUDO_GRADIENT_COTANGENTS = 1 << 24
"""Largest `b² K` of the per-row output cotangents `[b, b, K]` behind a batch of pseudo-gradients
(64 MB of float32): a language model's K = T·V logits per row splits its batches (K = 7,200:
48 rows at a time instead of 512 and 7.5 GB)."""
HESSIAN_CHUNK = 32
"""Hessian-vector products per batched double backward (dense columns, trace probes)."""
EXACT_TRACE_MAX_PARAMS = 2048
"""Up to this many parameters the Hessian's trace is exact (P products); above, Hutchinson."""
HUTCHINSON_PROBES = 64
"""Rademacher probes of the Hutchinson trace estimate of the Hessian."""


class CurvatureName(StrEnum):
    GAUSS_NEWTON = "gauss_newton"
    FISHER = "fisher"
    HESSIAN = "hessian"


def curvature_batches(train: TrainingSet, batch_size: int, max_rows: int | None = None) -> Iterator[Batch]:
    """Batches of the first `max_rows` rows of `train` (all rows when `None`)."""
    seen = 0
    for _, batch in train.batches(batch_size):
        if max_rows is not None and seen + len(batch) > max_rows:
            batch = batch.slice(0, max_rows - seen)
        if len(batch) == 0:
            return
        seen += len(batch)
        yield batch
        if max_rows is not None and seen >= max_rows:
            return


def flat_outputs(model: ModelAdapter, batch: Batch) -> Tensor:
    """`[B, K]` model outputs with autograd, flattened per row."""
    batch = batch.to(model.device)
    out = model.task.forward(model.module, batch.inputs)
    return out.reshape(out.shape[0], -1)


def loss_of_flat_outputs(model: ModelAdapter, outputs: Tensor, targets: Tensor) -> Tensor:
    """`[B]` per-sample loss of flattened outputs `[B, K]` (causal LM logits re-shaped to `[B, T, V]`)."""
    targets = targets.to(outputs.device)
    if model.task.name is TaskName.CAUSAL_LM:
        outputs = outputs.reshape(outputs.shape[0], targets.shape[1], -1)
    return model.task.per_sample_loss(outputs, targets)


def output_loss_hessian(model: ModelAdapter, outputs: Tensor, targets: Tensor) -> Tensor:
    """`[B, K, K]` Hessians `H_b = ∂²ℓ_b/∂f_b²` of each row's loss w.r.t. its outputs."""
    outputs = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_of_flat_outputs(model, outputs, targets).sum()
        (grad_out,) = torch.autograd.grad(loss, outputs, create_graph=True)
        b, k = outputs.shape
        eye = torch.eye(k, device=outputs.device, dtype=outputs.dtype).unsqueeze(1).expand(k, b, k)
        if not grad_out.requires_grad:  # loss linear in the outputs
            return torch.zeros(b, k, k, device=outputs.device, dtype=outputs.dtype)
        (rows,) = torch.autograd.grad(grad_out, outputs, grad_outputs=eye, is_grads_batched=True)
    return rows.permute(1, 0, 2).detach()  # [B, K(row), K(col)]


def output_hessian_sqrt(model: ModelAdapter, outputs: Tensor, targets: Tensor) -> Tensor:
    """`[B, K, K]` factors `A_b` with `A_b A_bᵀ = H_b` (negative eigenvalues clipped to 0)."""
    hess = output_loss_hessian(model, outputs, targets).double()
    hess = 0.5 * (hess + hess.transpose(1, 2))
    values, vectors = torch.linalg.eigh(hess)
    return (vectors * values.clamp(min=0).sqrt().unsqueeze(1)).to(outputs.dtype)


def sampled_output_factor(model: ModelAdapter, outputs: Tensor, targets: Tensor,
                          generator: torch.Generator) -> Tensor:
    """`[B, K, 1]` columns `a_b = √n_b ∇_f ℓ(f_b, ŷ_b)`, `ŷ_b ∼ p(·|x_b)`, so `E[a aᵀ] = H_b`.

    Classification: `ŷ ∼ softmax(f)`; regression (`Σ (f − y)²`): `ŷ = f + N(0, ½ I)`; causal
    LM: one token per counted position from the previous position's softmax, the per-row
    gradient scaled by `√n_b` (n_b counted tokens) because its loss is a mean over them.
    """
    raw = outputs.detach()
    b = raw.shape[0]
    name = model.task.name
    scale = torch.ones(b, device=raw.device)
    if name is TaskName.CLASSIFICATION:
        draws = torch.multinomial(raw.float().softmax(1).cpu(), 1, generator=generator)
        sampled = draws.reshape(-1).to(raw.device)
    elif name is TaskName.REGRESSION:
        noise = torch.randn(raw.shape, generator=generator, dtype=raw.dtype).to(raw.device)
        sampled = (raw + noise * 0.5**0.5).reshape(targets.shape)  # the model's dtype
    elif name is TaskName.CAUSAL_LM:
        logits = raw.float().reshape(b, targets.shape[1], -1)[:, :-1]
        probs = logits.softmax(-1).reshape(-1, logits.shape[-1]).cpu()
        draws = torch.multinomial(probs, 1, generator=generator).reshape(b, -1).to(raw.device)
        labels = targets.to(raw.device)
        sampled = labels.clone()
        sampled[:, 1:] = torch.where(labels[:, 1:] == -100, labels[:, 1:], draws)
        scale = (labels[:, 1:] != -100).sum(1).clamp(min=1).float().sqrt()
    else:
        raise ValueError(f"no predictive distribution to sample for task {name}")
    detached = raw.requires_grad_(True)
    with torch.enable_grad():
        loss = loss_of_flat_outputs(model, detached, sampled).sum()
        (grads,) = torch.autograd.grad(loss, detached)
    return (grads * scale[:, None].to(grads.dtype)).unsqueeze(2)


def per_sample_output_vjp(model: ModelAdapter, outputs: Tensor, weights: Tensor,
                          params: Sequence[Tensor] | None = None) -> Tensor:
    """`[B, P]` rows `J_bᵀ w_b` for output cotangents `weights` `[B, K]` (`outputs` from `flat_outputs`),
    w.r.t. the tracked parameters or the given `params` (P = their total size)."""
    b = outputs.shape[0]
    params = list(params) if params is not None else model.live_params()
    cotangents = torch.zeros(b, b, outputs.shape[1], device=outputs.device, dtype=outputs.dtype)
    index = torch.arange(b, device=outputs.device)
    cotangents[index, index] = weights.to(outputs.dtype)
    grads = torch.autograd.grad(outputs, params, grad_outputs=cotangents, is_grads_batched=True,
                                retain_graph=True, allow_unused=True)
    return _flat_batched(grads, params, b)


def _flat_batched(grads: tuple[Tensor | None, ...], params: Sequence[Tensor], m: int) -> Tensor:
    return torch.cat([
        (g if g is not None else torch.zeros(m, *p.shape, device=p.device, dtype=p.dtype)).reshape(m, -1)
        for g, p in zip(grads, params, strict=True)
    ], dim=1).detach()


class CurvatureOperator:
    """Products with the curvature `C` (GGN `G`, Fisher `F` or Hessian `H`) of a model's
    training objective over `train`.

    `max_rows` caps the rows used (the first ones; shuffle the set if that matters);
    `batch_size` bounds the rows per forward pass; `seed` seeds the sampled GGN factors and
    the Hutchinson probes.
    """

    def __init__(self, model: ModelAdapter, kind: CurvatureName = CurvatureName.GAUSS_NEWTON,
                 *, batch_size: int = 128, max_rows: int | None = None, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        if max_rows is not None and max_rows < 1:
            raise ValueError("max_rows must be positive")
        self.model = model
        self.kind = CurvatureName(kind)
        self.batch_size = batch_size
        self.max_rows = max_rows
        self.seed = seed
        self._sampler = torch.Generator().manual_seed(seed)

    @property
    def num_params(self) -> int:
        return self.model.num_params

    @property
    def positive_semidefinite(self) -> bool:
        """True for Gauss-Newton and Fisher; False for the Hessian (indefinite away from a minimum)."""
        return self.kind is not CurvatureName.HESSIAN

    def batches(self, train: TrainingSet) -> Iterator[Batch]:
        return curvature_batches(train, self.batch_size, self.max_rows)

    # ------------------------------------------------------------ products
    @property
    def dtype(self) -> torch.dtype:
        """The tracked parameters' dtype (products are computed in it)."""
        return self.model.live_params()[0].dtype

    def matvec(self, train: TrainingSet, vectors: Tensor) -> Tensor:
        """`[M, P] → [M, P]`: rows of `C V` (one pass over the rows), in the parameters' dtype."""
        vectors = vectors.to(self.model.device, self.dtype)
        total = torch.zeros_like(vectors)
        rows = 0
        for batch in self.batches(train):
            total += self.batch_matvec(batch, vectors)
            rows += len(batch)
        if rows == 0:
            raise ValueError("the training set is empty")
        return total / rows

    def batch_matvec(self, batch: Batch, vectors: Tensor) -> Tensor:
        """`[M, P]`: `Σ_{i∈batch} C_i V` summed (not averaged) over the batch's rows."""
        vectors = vectors.to(self.model.device, self.dtype)
        if self.kind is CurvatureName.FISHER:
            grads = self.model.per_sample_grads(batch)
            return (vectors @ grads.T) @ grads
        if self.kind is CurvatureName.HESSIAN:
            with torch.enable_grad():
                params, loss_grads = self._loss_gradient(batch)
                return self._hessian_products(params, loss_grads, vectors, retain_graph=False)
        return self._ggn_batch_matvec(batch, vectors)

    def _ggn_batch_matvec(self, batch: Batch, vectors: Tensor) -> Tensor:
        params = self.model.live_params()
        m = vectors.shape[0]
        with torch.enable_grad():
            outputs = flat_outputs(self.model, batch)
            dummy = torch.zeros_like(outputs, requires_grad=True)
            jt_u = torch.autograd.grad(outputs, params, grad_outputs=dummy, create_graph=True)
            tangents = [v.reshape(m, *p.shape) for v, p in zip(self._split(vectors), params, strict=True)]
            (jv,) = torch.autograd.grad(jt_u, dummy, grad_outputs=tangents, is_grads_batched=True)  # [M, B, K]
            hjv = self._loss_hessian_products(outputs, batch.targets, jv)
            grads = torch.autograd.grad(outputs, params, grad_outputs=hjv, is_grads_batched=True,
                                        allow_unused=True)
        return _flat_batched(grads, params, m)

    def _loss_hessian_products(self, outputs: Tensor, targets: Tensor, jv: Tensor) -> Tensor:
        detached = outputs.detach().requires_grad_(True)
        loss = loss_of_flat_outputs(self.model, detached, targets).sum()
        (grad_out,) = torch.autograd.grad(loss, detached, create_graph=True)
        if not grad_out.requires_grad:
            return torch.zeros_like(jv)
        (hjv,) = torch.autograd.grad(grad_out, detached, grad_outputs=jv.to(detached.dtype), is_grads_batched=True)
        return hjv

    def _loss_gradient(self, batch: Batch) -> tuple[list[torch.nn.Parameter], tuple[Tensor | None, ...]]:
        """The tracked parameters and `∇_θ Σ_{i∈batch} ℓ_i` per parameter, with its graph
        (`None` for a parameter the loss does not use); call under `enable_grad`."""
        params = self.model.live_params()
        outputs = flat_outputs(self.model, batch)
        loss = loss_of_flat_outputs(self.model, outputs, batch.targets).sum()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        return params, grads

    def _hessian_products(self, params: list[torch.nn.Parameter], grads: tuple[Tensor | None, ...],
                          vectors: Tensor, *, retain_graph: bool) -> Tensor:
        """`[M, P]` rows `∂(gᵀv)/∂θ = Σ_{i∈batch} ∇²_θ ℓ_i v` for `vectors` `[M, P]` (in the
        parameters' dtype), `g` from `_loss_gradient`; `retain_graph` keeps `g`'s graph for more."""
        m = vectors.shape[0]
        tangents = [v.reshape(m, *p.shape) for v, p in zip(self._split(vectors), params, strict=True)]
        live = [(g, t) for g, t in zip(grads, tangents, strict=True) if g is not None and g.requires_grad]
        if not live:  # the loss is at most linear in θ
            return torch.zeros_like(vectors)
        products = torch.autograd.grad([g for g, _ in live], params, grad_outputs=[t for _, t in live],
                                       is_grads_batched=True, retain_graph=retain_graph, allow_unused=True)
        return _flat_batched(products, params, m)

    def _split(self, vectors: Tensor) -> list[Tensor]:
        sizes = [p.numel() for p in self.model.live_params()]
        return list(vectors.split(sizes, dim=1))

    # ------------------------------------------------------------ factors
    def output_factors(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """`[B, K, R]` columns `A_b` with `A_b A_bᵀ = H_b` (exact, R = K) or `E[A_b A_bᵀ] = H_b`
        (one sampled column, R = 1, when K > `MAX_FACTOR_OUTPUTS`); Gauss-Newton-type
        curvatures only (a `ValueError` for the Hessian)."""
        self._require_factors("output-Hessian square-root factors (K-FAC/EK-FAC statistics)")
        if outputs.shape[1] > MAX_FACTOR_OUTPUTS:
            return sampled_output_factor(self.model, outputs, targets, self._sampler)
        return output_hessian_sqrt(self.model, outputs, targets)

    def pseudo_gradients(self, batch: Batch) -> Tensor:
        """`[B·R, P]` rows `r` with `Σ_{i∈batch} C_i = Σ r rᵀ` (R = K for GGN, 1 for Fisher;
        in expectation with R = 1 for sampled GGN factors); a `ValueError` for the Hessian."""
        self._require_factors("pseudo-gradients (a factorisation Σ r rᵀ)")
        if self.kind is CurvatureName.FISHER:
            return self.model.per_sample_grads(batch)
        pieces: list[list[Tensor]] = []
        start, rows = 0, len(batch)
        while start < len(batch):
            piece = batch.slice(start, start + rows)
            with torch.enable_grad():
                outputs = flat_outputs(self.model, piece)
                fits = max(1, int((PSEUDO_GRADIENT_COTANGENTS / outputs.shape[1]) ** 0.5))
                if len(piece) > fits:  # the per-row cotangents [b, b, K] would not fit: smaller pieces
                    rows = fits
                    continue
                factors = self.output_factors(outputs, piece.targets)  # [b, K, R]
                pieces.append([per_sample_output_vjp(self.model, outputs, factors[:, :, k])
                               for k in range(factors.shape[2])])
            start += len(piece)
        # rows ordered factor column k major, then row (as `Σ_k` over one batch of rows)
        return torch.cat([torch.cat([piece[k] for piece in pieces]) for k in range(len(pieces[0]))])

    def _require_factors(self, what: str) -> None:
        if not self.positive_semidefinite:
            raise ValueError(f"the {self.kind.value} curvature is indefinite and has no {what}; these exist for "
                             "gauss_newton and fisher only")

    def dense(self, train: TrainingSet, dtype: torch.dtype = torch.float64) -> Tensor:
        """`[P, P]` matrix `C` (memory `P²` entries of `dtype`)."""
        p = self.num_params
        if self.kind is CurvatureName.HESSIAN:
            return self._hessian_blocks(train, [torch.arange(p)], dtype)[0]
        total = torch.zeros(p, p, dtype=dtype, device=self.model.device)
        rows = 0
        for batch in self.batches(train):
            r = self.pseudo_gradients(batch).to(dtype)
            total.addmm_(r.T, r)
            rows += len(batch)
        if rows == 0:
            raise ValueError("the training set is empty")
        return total / rows

    def dense_blocks(self, train: TrainingSet, blocks: list[Tensor],
                     dtype: torch.dtype = torch.float64) -> list[Tensor]:
        """`[P_b, P_b]` diagonal blocks `G[idx_b][:, idx_b]` for flat index sets `blocks[b]` `[P_b]`
        (one pass; memory `Σ_b P_b²` entries, never the full `P²`)."""
        if self.kind is CurvatureName.HESSIAN:
            return self._hessian_blocks(train, blocks, dtype)
        index = [b.to(self.model.device, torch.long) for b in blocks]
        totals = [torch.zeros(len(i), len(i), dtype=dtype, device=self.model.device) for i in index]
        rows = 0
        for batch in self.batches(train):
            r = self.pseudo_gradients(batch).to(dtype)
            for total, idx in zip(totals, index, strict=True):
                part = r[:, idx]
                total.addmm_(part.T, part)
            rows += len(batch)
        if rows == 0:
            raise ValueError("the training set is empty")
        return [total / rows for total in totals]

    def _hessian_blocks(self, train: TrainingSet, blocks: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
        """`[P_b, P_b]` symmetrised blocks `H[idx_b][:, idx_b]` from Hessian-vector products with the
        identity columns `idx_b` (`HESSIAN_CHUNK` per double backward; one pass over the rows)."""
        p = self.num_params
        device = self.model.device
        index = [b.to(device, torch.long) for b in blocks]
        totals = [torch.zeros(len(i), len(i), dtype=dtype, device=device) for i in index]
        rows = 0
        for batch in self.batches(train):
            with torch.enable_grad():
                params, grads = self._loss_gradient(batch)
                for total, idx in zip(totals, index, strict=True):
                    for start in range(0, len(idx), HESSIAN_CHUNK):
                        columns = idx[start: start + HESSIAN_CHUNK]
                        probes = torch.zeros(len(columns), p, dtype=self.dtype, device=device)
                        probes[torch.arange(len(columns), device=device), columns] = 1
                        products = self._hessian_products(params, grads, probes, retain_graph=True)
                        total[start: start + len(columns)] += products[:, idx].to(dtype)
            rows += len(batch)
        if rows == 0:
            raise ValueError("the training set is empty")
        return [0.5 * (total + total.T) / rows for total in totals]

    def trace(self, train: TrainingSet) -> float:
        """`tr(C)`: for GGN/Fisher `(1/N) Σ ‖r‖²` over the pseudo-gradients (one pass; exact
        unless sampled); for the Hessian exact up to `EXACT_TRACE_MAX_PARAMS` parameters, else
        a seeded Hutchinson estimate (module docstring)."""
        if self.kind is CurvatureName.HESSIAN:
            return self._hessian_trace(train)
        total, rows = 0.0, 0
        for batch in self.batches(train):
            total += float(self.pseudo_gradients(batch).double().pow(2).sum())
            rows += len(batch)
        if rows == 0:
            raise ValueError("the training set is empty")
        return total / rows

    def _hessian_trace(self, train: TrainingSet) -> float:
        p = self.num_params
        if p <= EXACT_TRACE_MAX_PARAMS:
            return float(self.dense(train).trace())
        generator = torch.Generator().manual_seed(self.seed)
        probes = (2 * torch.randint(0, 2, (HUTCHINSON_PROBES, p), generator=generator) - 1).to(self.dtype)
        total = 0.0
        for chunk in probes.split(HESSIAN_CHUNK):
            chunk = chunk.to(self.model.device)
            total += float((self.matvec(train, chunk).double() * chunk.double()).sum())
        return total / HUTCHINSON_PROBES
