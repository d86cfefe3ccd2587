"""Progress of long library calls, reported to whoever listens (the CLI draws bars from it).

Library code calls ``report(task, done, total)`` at natural points (a decoding step, a batch of
texts, an optimiser step); nothing happens unless a listener is installed with
``listening(fn)`` for the current context. So the library never prints, and the CLI shows
one bar per task, or plain lines when its output is not a terminal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["Listener", "active", "listening", "report", "silenced"]

Listener = Callable[[str, int, int], None]  # (task, done, total)

_listener: ContextVar[Listener | None] = ContextVar("actadd_progress", default=None)


def report(task: str, done: int, total: int) -> None:
    """Tell the listener (if any) that ``done`` of ``total`` units of ``task`` are finished."""
    fn = _listener.get()
    if fn is not None:
        fn(task, done, total)


@contextmanager
def listening(fn: Listener) -> Iterator[None]:
    """Send progress reports made inside the block (in this thread or task) to ``fn``.

    Example:
        >>> seen = []
        >>> with listening(lambda task, done, total: seen.append((task, done, total))):
        ...     report("demo", 1, 2)
        >>> seen
        [('demo', 1, 2)]
    """
    token = _listener.set(fn)
    try:
        yield
    finally:
        _listener.reset(token)


def active() -> bool:
    """Whether a listener is installed (skip the bookkeeping of reports nobody reads)."""
    return _listener.get() is not None


@contextmanager
def silenced() -> Iterator[None]:
    """No reports inside the block (a loop that reports its own, coarser progress)."""
    token = _listener.set(None)
    try:
        yield
    finally:
        _listener.reset(token)
