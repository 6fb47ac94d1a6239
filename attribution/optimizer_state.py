"""An optimizer's second-moment estimate `v` (Adam's `exp_avg_sq`), per parameter name.

Users export it from a training run as a safetensors file of `{parameter name: tensor}`,
names as in `model.named_parameters()` and shapes equal to the parameters', e.g.

    from safetensors.torch import save_file
    save_file({name: optimizer.state[p]["exp_avg_sq"] for name, p in model.named_parameters()
               if p in optimizer.state}, "exp_avg_sq.safetensors")

TrackStar divides each gradient coordinate by `√v_j + ε` (Adam's own preconditioner), which
evens out coordinates whose gradients are always large (Chang et al. 2024, §3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from attribution.model import ModelAdapter


class OptimizerStateError(ValueError):
    """The optimizer state does not fit the model (names, shapes or values)."""


@dataclass(frozen=True)
class SecondMoment:
    """`tensors`: `{parameter name: v}` (v ≥ 0, the parameter's shape); `digest`: sha256 of the
    file it came from (part of every cache key built from it)."""

    tensors: dict[str, Tensor]
    digest: str

    @classmethod
    def from_safetensors(cls, path: Path, digest: str) -> SecondMoment:
        try:
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise OptimizerStateError(f"cannot read {path.name} as safetensors: {exc}") from None
        return cls(tensors, digest)

    def flat(self, model: ModelAdapter) -> Tensor:
        """`[P]` float32 v of the model's tracked parameters, in `param_names` order.

        Raises `OptimizerStateError` naming the first parameter that is missing, has another
        shape, or holds negative or non-finite values.
        """
        parts = []
        for name, param in model.params().items():
            value = self.tensors.get(name)
            if value is None:
                known = ", ".join(sorted(self.tensors)[:5])
                raise OptimizerStateError(f"no second moment for parameter {name!r} (the file has: {known}, ...); "
                                          "keys must be model.named_parameters() names")
            if tuple(value.shape) != tuple(param.shape):
                raise OptimizerStateError(f"second moment of {name!r} has shape {tuple(value.shape)}, "
                                          f"the parameter {tuple(param.shape)}")
            value = value.detach().float().reshape(-1)
            if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
                raise OptimizerStateError(f"second moment of {name!r} must be finite and ≥ 0")
            parts.append(value)
        return torch.cat(parts).to(model.device)
