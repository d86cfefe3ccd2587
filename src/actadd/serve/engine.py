"""The engine behind ``actadd serve``: continuous batching on one model thread.

Requests arrive as ``Job`` objects holding one or more rows (``actadd.batching.Request``: a
prompt, its additions, its sampling, seed, stops and length). One worker thread owns the model
and runs the ``Scheduler`` step by step: a row joins the running batch at the next step and
leaves the step it ends, so a short request never waits for a long one (iteration-level
scheduling). Rows are steered and sampled each on its own, so a response never depends on what
else is in the batch.

Jobs hear ``Event``s through their ``emit`` callable, from the worker thread (the server
forwards them into asyncio queues). Cancelling a job (a client that went away) makes its rows
leave at the next step. Capacity: the scheduler's KV-cache budget decides how many rows run;
beyond it rows wait, and at most ``max_queue_rows`` may wait (``submit`` raises ``QueueFull``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from actadd.batching import Request, Scheduler
from actadd.errors import ActAddError
from actadd.model import LM

# Rows decoded together by default. On a CPU a step costs 125 ms at 16 rows and 156 ms at 32
# (embedded model, docs/serving.md), so a wider batch is nearly free throughput, and at 16
# concurrent clients (with n=2 requests) 16 rows made rows queue for a slot; the KV budget,
# not this number, bounds memory.
MAX_BATCH_ROWS = 32

__all__ = ["Engine", "EngineClosed", "Event", "Job", "QueueFull"]

log = logging.getLogger(__name__)


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new work."""


class QueueFull(RuntimeError):
    """More rows are waiting than the engine accepts; retry later."""


@dataclass(frozen=True)
class Event:
    """What a job hears: ``start`` (its rows entered the batch), ``delta`` (new text of
    ``row``), ``done`` (``row`` finished: ``reason`` is ``stop``/``length``/``cancelled``;
    ``tokens`` generated; ``applied`` per addition), ``error`` (the job failed: ``error``)."""

    kind: str
    row: int = -1
    text: str = ""
    reason: str = ""
    tokens: int = 0
    applied: tuple[bool, ...] = ()
    error: BaseException | None = None


_ids = itertools.count()


@dataclass(eq=False)
class Job:
    """Rows that belong to one request, and where their events go (called from the worker)."""

    rows: list[Request]
    emit: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    failed: bool = False
    started: bool = False
    submitted: float = field(default_factory=time.monotonic)
    handles: list[Any] = field(default_factory=list)  # the scheduler's rows

    def cancel(self) -> None:
        """Stop generating this job's rows (e.g. the client went away)."""
        self.cancelled = True


Observer = Callable[[str, float], None]  # ("ttft" | "token", seconds) for metrics


class Engine:
    """One worker thread that runs the continuous-batching scheduler.

    Args:
        lm: the model; other use in the same process goes inside ``held()``.
        max_batch_rows: rows decoded together at most.
        max_queue_rows: rows that may wait at most; ``submit`` raises ``QueueFull`` beyond.
        kv_budget_tokens: KV-cache tokens the running rows may hold (see ``Scheduler``).
        observe: called from the worker with ``("ttft", seconds)`` and ``("token", seconds)``
            (time to a row's first token, and between its tokens).

    Example:
        >>> engine = Engine(lm).start()  # doctest: +SKIP
        >>> engine.submit(Job([Request(tuple(lm.token_ids("Hi")), max_tokens=8)], print))
        ... # doctest: +SKIP
        >>> engine.close()  # doctest: +SKIP
    """

    def __init__(
        self,
        lm: LM,
        *,
        max_batch_rows: int = MAX_BATCH_ROWS,
        max_queue_rows: int = 256,
        kv_budget_tokens: int | None = None,
        observe: Observer | None = None,
    ) -> None:
        self.lm = lm
        self.scheduler = Scheduler(lm, max_rows=max_batch_rows, kv_budget_tokens=kv_budget_tokens)
        self.max_queue_rows = int(max_queue_rows)
        self.observe = observe or (lambda kind, seconds: None)
        self._inbox: deque[tuple[str, Job]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._holds = 0
        self._model = threading.Lock()  # held by a running step, or by held()
        self._thread: threading.Thread | None = None
        self._active: set[Job] = set()  # submitted jobs with rows not yet done
        self.stats = {
            "steps": 0,
            "mixed_steps": 0,  # steps that also read new prompts (actadd.packing)
            "rows": 0,
            "max_rows": 0,
            "cancelled_rows": 0,
            "jobs": 0,
        }

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="actadd-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float | None = None) -> None:
        """Take no new jobs; finish waiting and running rows (cancel what remains when
        ``timeout`` seconds have passed); stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():  # out of time: the rest leave at the next step
            log.warning("closing: cancelling the requests still running")
            with self._cond:
                for row in [*self.scheduler.running, *self.scheduler.waiting]:
                    self.scheduler.cancel(row)
                self._cond.notify_all()
            self._thread.join(30)

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def waiting_rows(self) -> int:
        """Rows queued but not running yet."""
        return sum(len(j.rows) for kind, j in self._inbox if kind == "submit") + len(
            self.scheduler.waiting
        )

    @property
    def running_rows(self) -> int:
        return len(self.scheduler.running)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Wait for the step under way, then run none until the block exits.

        The model is then free for other use in this thread (e.g. ``actadd.steer``) while a
        server runs in the same process: the engine's hooks are on the model only during a
        step. Running rows pause and go on afterwards; jobs submitted meanwhile queue up.
        """
        with self._cond:
            self._holds += 1
        try:
            with self._model:
                yield
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify_all()

    def submit(self, job: Job) -> None:
        if not job.rows:
            raise ActAddError("a job needs at least one row")
        with self._cond:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if self.waiting_rows + len(job.rows) > self.max_queue_rows:
                raise QueueFull(f"{self.waiting_rows} rows are waiting; retry in a moment")
            self._inbox.append(("submit", job))
            self.stats["jobs"] += 1
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Cancel a job from any thread: its rows leave at the next step."""
        job.cancel()
        with self._cond:
            self._inbox.append(("cancel", job))
            self._cond.notify_all()

    # -- the worker ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while self._holds or not (self._inbox or self.scheduler.busy or self._closing):
                    self._cond.wait()
                if self._closing and not self._inbox and not self.scheduler.busy:
                    return
                self._drain()
                for job in [j for j in self._active if j.cancelled]:  # job.cancel() anywhere
                    for handle in job.handles:
                        self.scheduler.cancel(handle)
            with self._model:
                try:
                    self.scheduler.step()
                except Exception as e:  # an unforeseen failure: fail what was running, go on
                    log.exception("a step failed")
                    self._fail_all(e)
            st = self.scheduler.stats
            self.stats.update(
                steps=st["steps"],
                mixed_steps=st["mixed"],
                rows=st["rows"],
                max_rows=st["max_rows"],
                cancelled_rows=st["cancelled"],
            )

    def _drain(self) -> None:
        while self._inbox:
            kind, job = self._inbox.popleft()
            if kind == "cancel":
                for handle in job.handles:
                    self.scheduler.cancel(handle)
                continue
            if job.cancelled:
                for i in range(len(job.rows)):
                    job.emit(Event("done", i, reason="cancelled"))
                continue
            self._active.add(job)
            for i, request in enumerate(job.rows):
                job.handles.append(self.scheduler.submit(request, self._listener(job, i)))

    def _listener(self, job: Job, index: int) -> Callable[[str, tuple[Any, ...]], None]:
        last = [job.submitted]
        remaining = [len(job.rows)]

        def settle() -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                self._active.discard(job)

        def on(kind: str, args: tuple[Any, ...]) -> None:
            if job.failed:
                if kind == "done":
                    settle()
                return
            if kind == "start":
                if not job.started:
                    job.started = True
                    job.emit(Event("start"))
            elif kind == "token":
                now = time.monotonic()
                self.observe("ttft" if last[0] == job.submitted else "token", now - last[0])
                last[0] = now
            elif kind == "delta":
                job.emit(Event("delta", index, args[0]))
            elif kind == "done":
                reason, tokens, applied = args
                job.emit(Event("done", index, reason=reason, tokens=tokens, applied=tuple(applied)))
            elif kind == "error":
                self._active.discard(job)
                job.failed = True
                for handle in job.handles:  # the job's other rows stop too
                    self.scheduler.cancel(handle)
                job.emit(Event("error", error=args[0]))

        return on

    def _fail_all(self, err: BaseException) -> None:
        rows = [*self.scheduler.running, *self.scheduler.waiting]
        self.scheduler.running, self.scheduler.waiting = [], deque()
        self.scheduler.reset()
        for row in rows:
            row.listen("error", (err,))
