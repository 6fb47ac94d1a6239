"""Architecture entry points for `format: safetensors` models in the worker tests.

The tests allowlist `tests.workers.architectures:tiny_mlp` (and `slow_mlp`) through
`ALLOWED_ARCHITECTURES`; `slow_mlp` sleeps in every forward pass so a job stays running
long enough to kill its worker mid-run.
"""

from __future__ import annotations

import time

import torch
from torch import nn

NUM_FEATURES = 6
NUM_CLASSES = 3


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(NUM_FEATURES, 8), nn.Tanh(), nn.Linear(8, NUM_CLASSES))


class _Slow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.1)
        return self.net(x)


def slow_mlp() -> nn.Module:
    """`tiny_mlp` whose forward pass takes at least 0.1 s (state-dict keys prefixed `net.`)."""
    return _Slow()
