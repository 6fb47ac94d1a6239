"""Which layers a Kronecker-factored estimator tracks on a language model by default.

A transformer LM's parameters fall in three groups for K-FAC/EK-FAC
(`attribution.ihvp.kfac`):

- the linear maps inside its blocks (attention projections, MLPs: `nn.Linear`, GPT-2's
  `Conv1D`) — Kronecker-factorable, and where Grosse et al. (2023) and kronfluence's LM
  examples look for influence; these are tracked;
- the token embeddings (`nn.Embedding`) and the output layer (`lm_head`, whether its weight is
  tied to the input embedding as in GPT-2, or its own as in Llama/Qwen2 by default) — not
  tracked: an embedding is no `ã ãᵀ ⊗ g gᵀ` layer, and the output layer's gradient factor
  `S` is vocabulary × vocabulary (`V²` float64 entries: 8 GB at V = 32,000);
- normalisation layers and other parameters outside any linear map — not tracked (no
  Kronecker structure; a few thousand numbers per layer).

`language_model_scope(module)` returns the tracked layer prefixes (usable as `layers`) and,
for every trainable parameter left out, why. It reads the module's structure only.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from attribution.ihvp.kfac import kronecker_prefixes, unsupported_parameters

OUTPUT_LAYER = "the output layer (lm_head): its gradient factor S would be vocabulary × vocabulary"
TIED_OUTPUT_LAYER = "the output layer (lm_head), tied to the input embedding"
EMBEDDING = "an embedding: not a Kronecker-factorable layer"
TIED_EMBEDDING = "the input embedding, tied to the output layer (lm_head): not a Kronecker-factorable layer"


@dataclass(frozen=True)
class KroneckerScope:
    """`layers`: prefixes of the tracked linear layers, in module order; `untracked`:
    `{parameter name: why it is left out}` for every other trainable parameter."""

    layers: tuple[str, ...]
    untracked: dict[str, str]

    def summary(self, listed: int = 12) -> dict[str, list[str]]:
        """`{reason: [parameter names]}` with at most `listed` names per reason (for `extras`)."""
        grouped: dict[str, list[str]] = {}
        for name, reason in self.untracked.items():
            grouped.setdefault(reason, []).append(name)
        return {reason: names[:listed] + ([f"… {len(names) - listed} more"] if len(names) > listed else [])
                for reason, names in grouped.items()}


def language_model_scope(module: nn.Module) -> KroneckerScope:
    """The linear layers of `module`'s blocks, without its output layer (see the module docstring)."""
    getter = getattr(module, "get_output_embeddings", None)
    output = getter() if callable(getter) else None
    embedding_weights = {id(sub.weight) for sub in module.modules() if isinstance(sub, nn.Embedding)}
    named = dict(module.named_modules())
    layers: list[str] = []
    untracked: dict[str, str] = {}
    for prefix in kronecker_prefixes(module):
        sub = named.get(prefix)
        weight = getattr(sub, "weight", None)
        tied = weight is not None and id(weight) in embedding_weights
        if sub is not None and (sub is output or tied):
            reason = TIED_OUTPUT_LAYER if tied else OUTPUT_LAYER
            untracked.update({f"{prefix}.{n}": reason for n, p in sub.named_parameters(recurse=False)
                              if p.requires_grad})
            continue
        layers.append(prefix)
    output_weight = id(getattr(output, "weight", None))
    embedded = {f"{prefix}.weight": TIED_EMBEDDING if id(sub.weight) == output_weight else EMBEDDING
                for prefix, sub in module.named_modules() if isinstance(sub, nn.Embedding)}
    for name, reason in unsupported_parameters(module).items():
        untracked.setdefault(name, embedded.get(name, reason))
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    return KroneckerScope(tuple(layers), {n: untracked[n] for n in trainable if n in untracked})
