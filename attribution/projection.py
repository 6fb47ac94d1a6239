"""Seeded random projections of gradient vectors `[B, P] → [B, k]` (TRAK's projector role).

The projection matrix `R ∈ ℝ^{P×k}` has i.i.d. entries of variance `1/k`:

- Rademacher (default): `R_pj = ±1/√k` with equal probability;
- Gaussian: `R_pj ~ N(0, 1/k)`.

Then `E[R Rᵀ] = I_P`, so for any `x, y ∈ ℝ^P` the projected inner product is unbiased,
`E[(xR)·(yR)] = x·y`, and by the Johnson–Lindenstrauss lemma
`|(xR)·(yR) − x·y| ≤ ε ‖x‖ ‖y‖` with probability `≥ 1 − δ` once `k ≳ 8 ε⁻² log(4/δ)`
(the error's standard deviation is about `‖x‖‖y‖·√(2/k)`).

`R` is never stored whole when it would be large: it is cut into row blocks of
`block_rows` rows (`[block_rows, k]` each), and block `b` is drawn from a CPU generator
seeded by `(seed, b)` alone. The projection `xR = Σ_b x[:, block_b] R_b` is therefore
O(block_rows·k) in memory, and the same matrix is produced whatever the batch size, the
order of calls or the device. Blocks are always drawn on the CPU and then moved to the
target device, so a CUDA worker and a CPU worker build bit-identical projections from the
same seed (artifacts fitted on one can be scored on the other). When the whole matrix is
small (`P·k ≤ cache_elements`) it is built once, from the same blocks, and kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from enum import StrEnum

import torch
from torch import Tensor

DEFAULT_BLOCK_ROWS = 1024
DEFAULT_CACHE_ELEMENTS = 1 << 24  # 16 Mi float32 entries = 64 MiB


class ProjectionType(StrEnum):
    RADEMACHER = "rademacher"
    GAUSSIAN = "gaussian"


def _block_seed(seed: int, block: int) -> int:
    """A 63-bit generator seed for block `block` of the matrix with seed `seed` (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + (block + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class RandomProjector:
    """`x ↦ x R` with a seeded `R ∈ ℝ^{P×k}` of variance-`1/k` entries (see module docstring).

    `input_dim` is P, `output_dim` is k. `device` is where projections are computed (the
    gradients' device); the result is float32.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        *,
        seed: int = 0,
        kind: ProjectionType | str = ProjectionType.RADEMACHER,
        device: torch.device | str = "cpu",
        block_rows: int = DEFAULT_BLOCK_ROWS,
        cache_elements: int = DEFAULT_CACHE_ELEMENTS,
    ) -> None:
        if input_dim < 1 or output_dim < 1:
            raise ValueError(f"projection dimensions must be positive, got P={input_dim}, k={output_dim}")
        if block_rows < 1:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.seed = seed
        self.kind = ProjectionType(kind)
        self.device = torch.device(device)
        self.block_rows = block_rows
        self._cached: Tensor | None = None
        if input_dim * output_dim <= cache_elements:
            self._cached = torch.cat([block for _, block in self._blocks()])

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.input_dim / self.block_rows)

    def block(self, index: int) -> Tensor:
        """`[rows, k]` rows `index·block_rows …` of R, on `self.device`."""
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"block {index} out of range 0..{self.num_blocks - 1}")
        rows = min(self.block_rows, self.input_dim - index * self.block_rows)
        gen = torch.Generator(device="cpu").manual_seed(_block_seed(self.seed, index))
        scale = 1.0 / math.sqrt(self.output_dim)
        shape = (rows, self.output_dim)
        if self.kind is ProjectionType.RADEMACHER:
            signs = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8)
            values = (signs.float() * 2.0 - 1.0) * scale
        else:
            values = torch.randn(shape, generator=gen, dtype=torch.float32) * scale
        return values.to(self.device)

    def _blocks(self) -> Iterator[tuple[int, Tensor]]:
        for index in range(self.num_blocks):
            yield index * self.block_rows, self.block(index)

    def matrix(self) -> Tensor:
        """The whole `[P, k]` matrix R (for tests and small P; large P should use `project`)."""
        if self._cached is not None:
            return self._cached
        return torch.cat([block for _, block in self._blocks()])

    def project(self, x: Tensor) -> Tensor:
        """`[B, P] → [B, k]`: `x R`, computed block by block unless R is cached."""
        if x.dim() != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"expected a [B, {self.input_dim}] tensor, got {list(x.shape)}")
        x = x.to(device=self.device, dtype=torch.float32)
        if self._cached is not None:
            return x @ self._cached
        out = torch.zeros(x.shape[0], self.output_dim, device=self.device, dtype=torch.float32)
        for start, block in self._blocks():
            out.addmm_(x[:, start: start + block.shape[0]], block)
        return out

    __call__ = project
