"""Errors raised while resolving, inspecting and loading user-supplied files and samples.

Every error names the request field it is about (`field`, e.g. `"uri"`, `"samples.x"`,
`"shards[1].uri"`) and carries a human sentence; the API turns them into 422 answers and
the workers into a query's one-line `error`. They never carry a stack trace.
"""

from __future__ import annotations


class LoadError(ValueError):
    """A user-supplied file or value cannot be used; `field` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"

    def at(self, field: str) -> LoadError:
        """The same error re-addressed to another field (e.g. `uri` → `shards[2].uri`)."""
        return type(self)(field, self.message)


class UriError(LoadError):
    """The URI's scheme is unsupported or it points outside the data root / at nothing."""


class ModelLoadError(LoadError):
    """The model file does not load as the declared format, or changed since registration."""


class ShardError(LoadError):
    """A training-data shard is malformed (missing arrays, mismatched lengths, pickles...)."""


class SamplesError(LoadError):
    """Query samples do not fit the model (shape, labels, non-finite values, bad refs)."""
