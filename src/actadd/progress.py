"""Progress of long library calls, reported to whoever listens (the CLI draws bars from it).

Library code calls ``report(task, done, total)`` at natural points (a decoding step, a batch of
texts, an optimiser step); nothing happens unless a listener is installed with
``listening(fn)`` for the current context. So the library never prints, and the CLI shows
one bar per task, or plain lines when its output is not a terminal.

A report can carry a short ``status`` for its task (a Ray run says how many workers are alive
and how many rows a second they finish); it goes to a second listener,
``listening(fn, status=on_status)``, so listeners written for ``(task, done, total)`` keep
working.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["Listener", "StatusListener", "active", "listening", "report", "silenced"]

Listener = Callable[[str, int, int], None]  # (task, done, total)
StatusListener = Callable[[str, str], None]  # (task, status)

_listener: ContextVar[Listener | None] = ContextVar("actadd_progress", default=None)
_status: ContextVar[StatusListener | None] = ContextVar("actadd_progress_status", default=None)


def report(task: str, done: int, total: int, *, status: str | None = None) -> None:
    """Tell the listener (if any) that ``done`` of ``total`` units of ``task`` are finished,
    and the status listener (if any) the task's ``status`` line, when one is given."""
    if status is not None and (on_status := _status.get()) is not None:
        on_status(task, status)
    fn = _listener.get()
    if fn is not None:
        fn(task, done, total)


@contextmanager
def listening(fn: Listener, *, status: StatusListener | None = None) -> Iterator[None]:
    """Send progress reports made inside the block (in this thread or task) to ``fn``, and
    their status lines to ``status``.

    Example:
        >>> seen = []
        >>> with listening(lambda task, done, total: seen.append((task, done, total)),
        ...                status=lambda task, text: seen.append((task, text))):
        ...     report("demo", 1, 2, status="2 workers")
        >>> seen
        [('demo', '2 workers'), ('demo', 1, 2)]
    """
    token, status_token = _listener.set(fn), _status.set(status)
    try:
        yield
    finally:
        _status.reset(status_token)
        _listener.reset(token)


def active() -> bool:
    """Whether a listener is installed (skip the bookkeeping of reports nobody reads)."""
    return _listener.get() is not None


@contextmanager
def silenced() -> Iterator[None]:
    """No reports inside the block (a loop that reports its own, coarser progress)."""
    token, status_token = _listener.set(None), _status.set(None)
    try:
        yield
    finally:
        _status.reset(status_token)
        _listener.reset(token)
