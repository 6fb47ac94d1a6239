"""Device selection and mixed-precision helpers for forward sweeps.

`resolve_device("auto")` picks CUDA when present, else CPU. `autocast(device, dtype)` enters
`torch.autocast` for bf16/fp16 on CUDA and is a no-op everywhere else (CPU sweeps stay
fp32), so callers can wrap every sweep unconditionally. `precision_tag` names the precision
a sweep actually ran at; cached losses carry it in their key so an fp32 base-loss vector is
never subtracted from a bf16 sweep.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_AMP_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`"auto"` → `cuda` if available else `cpu`; anything else is parsed by torch.

    Raises `ValueError` for a CUDA device on a machine without CUDA.
    """
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise ValueError(f"invalid device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device


def amp_active(device: torch.device, dtype: torch.dtype | None) -> bool:
    """True when `autocast(device, dtype)` really lowers precision (CUDA + bf16/fp16)."""
    if dtype is None:
        return False
    if dtype not in _AMP_DTYPES:
        raise ValueError(f"autocast dtype must be torch.bfloat16 or torch.float16, not {dtype}")
    return device.type == "cuda"


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """`torch.autocast(cuda, dtype)` when active, otherwise nothing."""
    if amp_active(device, dtype):
        with torch.autocast(device_type="cuda", dtype=dtype):
            yield
    else:
        yield


def precision_tag(device: torch.device, dtype: torch.dtype | None) -> str:
    """`"fp32"`, `"bf16"` or `"fp16"`: the precision of a sweep under `autocast(device, dtype)`."""
    if amp_active(device, dtype):
        return _AMP_DTYPES[dtype]  # type: ignore[index]
    return "fp32"
