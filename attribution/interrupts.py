"""A hook through which long in-memory loops let their caller stop them.

Loops that run many iterations without reading training rows (a LiSSA recursion over its
cached curvature batches, K unlearning steps on the query samples) call `check_interrupt()`
once per iteration. Outside `interruptible(check)` it does nothing; inside, it calls
`check`, which may raise to abandon the computation (the service's workers raise on a
client's cancel, a lost lease or the job's time limit). The hook is per thread (a
`ContextVar`), so concurrent computations in other threads are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_CHECK: ContextVar[Callable[[], None] | None] = ContextVar("attribution_interrupt_check", default=None)


def check_interrupt() -> None:
    """Call the active `interruptible` check, if any (it may raise)."""
    check = _CHECK.get()
    if check is not None:
        check()


@contextmanager
def interruptible(check: Callable[[], None]) -> Iterator[None]:
    """Within the block, `check_interrupt()` calls `check`."""
    token = _CHECK.set(check)
    try:
        yield
    finally:
        _CHECK.reset(token)
