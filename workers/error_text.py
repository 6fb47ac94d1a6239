"""A failed query's `error`: one line naming the exception, never a traceback."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """`ExceptionClass: first line of the message` (no traceback) for a query's `error`."""
    lines = str(exc).strip().splitlines()
    message = lines[0].strip() if lines else ""
    return f"{exc.__class__.__name__}: {message}"[:1000] if message else exc.__class__.__name__
