"""Forward-INF's label-free stopping rule: ascend until the query is forgotten.

One small ascent step moves θ̂ by α∇L_q and ranks rows like the gradient dot product
(`forward_inf` module docstring). On language models the mirrored-influence argument needs
the model to actually *forget* the queried fact: rows that taught it are the ones whose
loss rises most once it is gone. `stop="forgotten"` keeps stepping while the query is still
known and stops when its loss reaches the loss the model gives the same answer after
a context it cannot use:

    ℓ_forgotten(q) = (1/S) Σ_s L(θ̂, π_s(z_q))                                  [Q]

where π_s permutes the query's *context* tokens (every uncounted position up to the last
counted one: the prompt of a prompt/completion query, or — when every token counts — all
of them) with a seeded permutation s, keeping the counted target tokens and the padding in
place. The counted answer stays the same; only the evidence for it is scrambled, so
ℓ_forgotten is what the model "knows" about this answer without the query's meaning. No
label, held-out set or evaluated fact is involved. Unlearning then runs

    θ_{k+1} = step(θ_k)   for k = 0, then while L(θ_k, z_q) < ℓ_forgotten(q) and k < K   (per query q)

(`K` = `steps`, the cap). The first step is always taken, so a query the model does not
know (already at its level, e.g. on an untrained model) still gets the first-order answer
instead of all-zero scores. In per-sample
mode each query stops on its own (the stacked parameter set q stops moving); in joint mode
the mean query loss is compared with the mean level. `steps_taken` `[Q]` is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from attribution.data import Batch

SHUFFLES = 8  # permutations averaged in ℓ_forgotten
SEED = 0


def shuffled_context(queries: Batch, generator: torch.Generator) -> Batch:
    """`queries` with each row's context tokens permuted (module docstring), targets unchanged.

    Needs `{"input_ids": [Q, T], ...}` inputs and `[Q, T]` targets (−100 = not counted), the
    `CausalLMTask` layout; other inputs raise `ValueError`.
    """
    inputs = queries.inputs
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs or queries.targets.dim() != 2:
        raise ValueError("stop='forgotten' needs token-id queries (input_ids with [Q, T] targets)")
    ids = inputs["input_ids"].clone()
    targets = queries.targets.to(ids.device)
    for row in range(ids.shape[0]):
        counted = (targets[row] != -100).nonzero().flatten()
        if counted.numel() == 0:
            continue
        span = torch.arange(int(counted.max()) + 1, device=ids.device)
        context = span[targets[row, span] == -100]
        positions = context if context.numel() >= 2 else span
        order = torch.randperm(positions.numel(), generator=generator).to(ids.device)
        ids[row, positions] = ids[row, positions[order]]
    return Batch({**inputs, "input_ids": ids}, queries.targets)


@torch.no_grad()
def forgotten_level(losses: Callable[[Batch], Tensor], queries: Batch) -> Tensor:
    """`[Q]` ℓ_forgotten: mean loss of `SHUFFLES` context-shuffled copies of each query under
    `losses` (Batch → `[Q]` at θ̂), seeded so the level is the same for the same query."""
    generator = torch.Generator().manual_seed(SEED)
    return torch.stack([losses(shuffled_context(queries, generator)).detach().double()
                        for _ in range(SHUFFLES)]).mean(0)


def still_known(current: Tensor, level: Tensor) -> Tensor:
    """`[Q]` bool: queries whose loss is still below their forgotten level (keep stepping)."""
    return current.detach().double().to(level.device) < level
