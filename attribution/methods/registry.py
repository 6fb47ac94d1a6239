"""Method lookup by name: `MethodName` → implementation class and params dataclass."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from attribution.methods.auto import AUTO
from attribution.methods.base import AttributionMethod, MethodName, MethodParams, ParamsError

_REGISTRY: dict[MethodName, type[AttributionMethod]] = {}


def register(cls: type[AttributionMethod]) -> type[AttributionMethod]:
    """Class decorator adding a method to the registry under `cls.name`."""
    _REGISTRY[cls.name] = cls
    return cls


class UnknownMethodError(ValueError):
    pass


def method_class(name: str) -> type[AttributionMethod]:
    _load_builtin_methods()
    try:
        return _REGISTRY[MethodName(name)]
    except (ValueError, KeyError):
        raise UnknownMethodError(f"unknown method {name!r}; valid methods: {', '.join(requestable_methods())}") from None


def available_methods() -> list[str]:
    """The registered (concrete) methods."""
    _load_builtin_methods()
    return sorted(m.value for m in _REGISTRY)


def requestable_methods() -> list[str]:
    """What a request may name: `auto` (`attribution.methods.auto`) and every registered method."""
    return [AUTO, *available_methods()]


def parse_params(name: str, raw: Mapping[str, Any] | None) -> MethodParams:
    """Validated params dataclass for method `name`; raises `UnknownMethodError` / `ParamsError`."""
    return method_class(name).params_type.parse(raw)


_BUILTIN_MODULES = (
    "forward_inf", "gradient_similarity", "influence", "integrated_influence", "tracin", "trackstar", "trak",
)


def _load_builtin_methods() -> None:
    """Import the built-in method modules; importing runs their `@register` decorators."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"attribution.methods.{module}")


__all__ = ["ParamsError", "UnknownMethodError", "available_methods", "method_class", "parse_params", "register",
           "requestable_methods"]
