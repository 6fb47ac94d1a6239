"""What a registered model's structure allows, known without running it.

`ModelStructure` records, once per model (the service stores it at registration), the
trainable parameter names and sizes and the parameters K-FAC/EK-FAC cannot factor with the reason
(`attribution.ihvp.kfac.unsupported_parameters`: static, from the module's layers or its
TorchScript graph). `layers_problem` and `kfac_problem` then say — without loading the model —
whether a query's `layers` select any parameter and whether `ihvp: kfac|ekfac` can factor
every tracked one, so such a query is refused when it is submitted instead of failing later;
`num_tracked` gives the parameter count a restricted query differentiates (its cost estimate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from attribution.ihvp.kfac import kronecker_prefixes, unsupported_parameters
from attribution.model import select_parameters

_LISTED = 8  # names quoted in a message


@dataclass(frozen=True)
class ModelStructure:
    """`parameters`: trainable parameter names in order; `sizes`: their element counts (same
    order; empty for structures recorded before sizes were); `kfac_unsupported`: `{name: reason}`
    for those K-FAC cannot factor; `kfac_layers`: the layer prefixes it can."""

    parameters: tuple[str, ...]
    kfac_unsupported: dict[str, str] = field(default_factory=dict)
    kfac_layers: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()

    @classmethod
    def of_module(cls, module: nn.Module) -> ModelStructure:
        trainable = [(n, p.numel()) for n, p in module.named_parameters() if p.requires_grad]
        return cls(tuple(n for n, _ in trainable), unsupported_parameters(module), tuple(kronecker_prefixes(module)),
                   tuple(size for _, size in trainable))

    def to_dict(self) -> dict[str, Any]:
        return {"parameters": list(self.parameters), "kfac_unsupported": dict(self.kfac_unsupported),
                "kfac_layers": list(self.kfac_layers), "sizes": list(self.sizes)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelStructure:
        return cls(tuple(data.get("parameters", ())), dict(data.get("kfac_unsupported", {})),
                   tuple(data.get("kfac_layers", ())), tuple(int(n) for n in data.get("sizes", ())))

    def tracked(self, layers: Sequence[str]) -> list[str]:
        """The parameters a `layers` prefix list tracks (all trainable ones when empty)."""
        return select_parameters(self.parameters, layers)

    def num_tracked(self, layers: Sequence[str]) -> int | None:
        """Elements of the parameters `layers` tracks (all trainable ones when empty); None when
        the sizes were not recorded."""
        if len(self.sizes) != len(self.parameters):
            return None
        size = dict(zip(self.parameters, self.sizes, strict=True))
        return sum(size[name] for name in self.tracked(layers))

    def layers_problem(self, layers: Sequence[str]) -> str | None:
        """Why `layers` cannot be used (they select no trainable parameter), or None."""
        if not layers or self.tracked(layers):
            return None
        return (f"{list(layers)} match no trainable parameter of the model; its parameters include "
                f"{list(self.parameters[:_LISTED])}")

    def kfac_problem(self, layers: Sequence[str]) -> str | None:
        """Why K-FAC/EK-FAC cannot factor the parameters `layers` tracks, naming what works; or None."""
        bad = [n for n in self.tracked(layers) if n in self.kfac_unsupported]
        if not bad:
            return None
        reasons = "; ".join(f"{n}: {self.kfac_unsupported[n]}" for n in bad[:_LISTED])
        works = (f"restrict params.layers to layers K-FAC factors ({list(self.kfac_layers[:_LISTED])}) or "
                 if self.kfac_layers else "")
        return (f"K-FAC/EK-FAC cannot factor {len(bad)} tracked parameter(s) of this model ({reasons}); "
                f"{works}use ihvp exact, cg, lissa, arnoldi or auto")
