"""The batching engine behind ``actadd serve``: one model thread, per-row steering, streaming.

Requests arrive as ``Job`` objects holding one or more rows (a prompt, its additions, its
sampling settings and length). A single worker thread owns the model: it waits a short batching
window, takes the waiting rows, and runs them as one ``generate`` call under
``steer(lm, [row0_additions, row1_additions, ...], addition_location=[row0_location, ...])``:
the one hook mechanism, one list of additions and one location per row.

A row's output never depends on the rest of its batch: positions are logical (left padding
does not move additions), sampling uses one seeded random stream per row (``RowSeededSampler``),
and the other per-row settings (temperature, top-p, frequency penalty) are applied to each
group of rows that shares them (``actadd.sampling.row_processors``).

Streaming: a ``StoppingCriteria`` (``_RowTracker``) is called once per decoding step with the
batch's token ids. It decodes each row's new token, hands the text delta to the row's job and
says which rows are done (end-of-sequence, its own ``max_tokens``, a stop string, a cancelled
request). transformers calls it *before* it hands tokens to a ``BaseStreamer``, so one object
both streams and stops each row exactly at its own length. Jobs receive events through their
``emit`` callable (the server forwards them into asyncio queues).
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

import torch
from torch import Tensor
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from actadd.errors import ActAddError
from actadd.model import LM
from actadd.sampling import GREEDY, Sampling, row_processors
from actadd.steering import Injection, injected, steer, validate_injections

__all__ = ["Engine", "EngineClosed", "Event", "Job", "QueueFull", "Row"]

log = logging.getLogger(__name__)


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new work."""


class QueueFull(RuntimeError):
    """More rows are waiting than the engine accepts; retry later."""


@dataclass(frozen=True)
class Row:
    """One completion to generate.

    Args:
        ids: prompt token ids (already tokenized, non-empty).
        additions: steerables (``ActivationAddition``, ``SteeringVector``, ...); empty =
            unsteered.
        location: where the additions land (``front``, ``mid``, ``back``, ``all``; None: each
            addition's own default).
        max_tokens: new tokens at most.
        sampling: temperature, top-p and frequency penalty (``temperature=0`` is greedy).
        seed: the row's own random stream (sampling only).
        stop: strings that end the completion (not included in it).
    """

    ids: tuple[int, ...]
    additions: tuple[Any, ...] = ()
    location: str | None = None
    max_tokens: int = 16
    sampling: Sampling = GREEDY
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Event:
    """What a job hears: ``start`` (its rows entered a batch), ``delta`` (new text of ``row``),
    ``done`` (``row`` finished: ``reason`` is ``stop``/``length``/``cancelled``; ``tokens``
    generated), ``error`` (the job failed: ``error``)."""

    kind: str
    row: int = -1
    text: str = ""
    reason: str = ""
    tokens: int = 0
    error: BaseException | None = None


_ids = itertools.count()


@dataclass(eq=False)
class Job:
    """Rows that belong to one request, and where their events go (called from the worker)."""

    rows: list[Row]
    emit: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    failed: bool = False
    started: bool = False
    injections: dict[int, list[Injection]] = field(default_factory=dict)  # by id(additions)

    def cancel(self) -> None:
        """Stop generating this job's rows (e.g. the client went away)."""
        self.cancelled = True

    def _fail(self, err: BaseException) -> None:
        if not self.failed:
            self.failed = True
            self.emit(Event("error", error=err))


class _Fixed:
    """Injections resolved ahead of the batch, as a steerable (``.injections(lm)``)."""

    def __init__(self, injections: list[Injection]) -> None:
        self._inj = injections

    def injections(self, lm: LM) -> list[Injection]:
        return self._inj


@dataclass
class _RowState:
    job: Job
    index: int  # row index inside the job
    row: Row
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already emitted
    done: bool = False
    reason: str = ""


class _RowTracker(StoppingCriteria):
    """Per step: decode each row's new token, stream its text, and say which rows are done."""

    def __init__(self, lm: LM, states: list[_RowState], eos: set[int]) -> None:
        self.tok, self.states, self.eos = lm.tokenizer, states, eos
        self.steps = 0  # decoding steps seen: 0 means nothing was streamed yet

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        self.steps += 1
        new = input_ids[:, -1].tolist()
        for st, token in zip(self.states, new, strict=True):
            if st.done:
                continue
            if st.job.cancelled or st.job.failed:
                self._finish(st, "cancelled")
            elif token in self.eos:
                self._finish(st, "stop")
            else:
                st.tokens.append(int(token))
                self._advance(st)
        return torch.tensor([st.done for st in self.states], device=input_ids.device)

    def _advance(self, st: _RowState) -> None:
        text = self.tok.decode(st.tokens, skip_special_tokens=True)
        stops = st.row.stop
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            self._send(st, text[:cut])
            self._finish(st, "stop", flush=False)
            return
        full = len(st.tokens) >= st.row.max_tokens
        safe = len(text)
        if not full:
            # hold back an incomplete UTF-8 character and a possible start of a stop string
            if text.endswith("\ufffd"):
                safe -= 1
            for s in stops:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        self._send(st, text[:safe])
        if full:
            self._finish(st, "length", flush=False)

    def _send(self, st: _RowState, text: str) -> None:
        if len(text) > st.sent:
            st.job.emit(Event("delta", st.index, text[st.sent :]))
            st.sent = len(text)

    def _finish(self, st: _RowState, reason: str, *, flush: bool = True) -> None:
        if flush and st.tokens and reason != "cancelled":  # text held back so far
            self._send(st, self.tok.decode(st.tokens, skip_special_tokens=True))
        st.done, st.reason = True, reason
        st.job.emit(Event("done", st.index, reason=reason, tokens=len(st.tokens)))

    def finish_all(self) -> None:
        for st in self.states:
            if not st.done:
                self._finish(st, "length")


class Engine:
    """One worker thread that batches waiting rows into ``generate`` calls.

    Args:
        lm: the model; other use in the same process goes inside ``held()``.
        max_batch_rows: rows per ``generate`` call at most.
        batch_window: seconds to wait for more rows after the first one arrives.
        max_queue_rows: waiting rows at most; ``submit`` raises ``QueueFull`` beyond.

    Example:
        >>> engine = Engine(lm).start()  # doctest: +SKIP
        >>> row = Row(tuple(lm.token_ids("Hi")), max_tokens=8)  # doctest: +SKIP
        >>> engine.submit(Job([row], print))  # doctest: +SKIP
        >>> engine.close()  # doctest: +SKIP
    """

    def __init__(
        self,
        lm: LM,
        *,
        max_batch_rows: int = 16,
        batch_window: float = 0.02,
        max_queue_rows: int = 512,
    ) -> None:
        self.lm = lm
        self.max_batch_rows = max(1, int(max_batch_rows))
        self.batch_window = max(0.0, float(batch_window))
        self.max_queue_rows = int(max_queue_rows)
        self._pending: deque[tuple[Job, int]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._holds = 0
        self._model = threading.Lock()  # held by a running batch, or by held()
        self._thread: threading.Thread | None = None
        self.busy = False
        self.eos = _eos_ids(lm)
        self._tracker: _RowTracker | None = None  # of the batch under way
        self.stats = {
            "batches": 0,
            "rows": 0,
            "max_rows": 0,
            "multi_job_batches": 0,
            "cancelled_rows": 0,
        }

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="actadd-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float | None = None) -> None:
        """Take no new jobs, finish every waiting and running row, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def waiting_rows(self) -> int:
        return len(self._pending)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Wait for the batch under way, then run none until the block exits.

        Jobs submitted meanwhile queue up (and then share batches), and the model is free for
        other use in this thread, e.g. ``actadd.steer`` or ``gen_using_activation_additions``
        while a server runs in the same process: the engine's hooks are on the model only
        while one of its batches runs.
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
            if len(self._pending) + len(job.rows) > self.max_queue_rows:
                raise QueueFull(f"{len(self._pending)} rows are waiting; retry in a moment")
            self._pending.extend((job, i) for i in range(len(job.rows)))
            self._cond.notify_all()

    # -- the worker ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            with self._model:
                self.busy = True
                try:
                    self._guarded(batch, split=True)
                finally:
                    self.busy = False

    def _guarded(self, batch: list[tuple[Job, int]], *, split: bool) -> None:
        """Run a batch; if it fails before its first token, run its jobs one by one, so an
        unforeseen error fails only the request that caused it."""
        try:
            self._run_batch(batch)
        except Exception as e:
            jobs = list(dict.fromkeys(job for job, _ in batch))
            tracker = self._tracker
            if split and len(jobs) > 1 and (tracker is None or tracker.steps == 0):
                log.warning(
                    "a batch of %d requests failed before its first token (%r); "
                    "running them one by one",
                    len(jobs),
                    e,
                )
                for job in jobs:
                    self._guarded([(j, i) for j, i in batch if j is job], split=False)
                return
            log.exception("batch of %d rows failed", len(batch))
            for job in jobs:
                job._fail(e)

    def _take(self) -> list[tuple[Job, int]] | None:
        with self._cond:
            while not self._pending or self._holds:
                if self._closing and not self._pending:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.batch_window
            while not self._closing and len(self._pending) < self.max_batch_rows:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._select()

    def _select(self) -> list[tuple[Job, int]]:
        """The first waiting rows (each row keeps its own steering and location)."""
        batch: list[tuple[Job, int]] = []
        rest: deque[tuple[Job, int]] = deque()
        for job, i in self._pending:
            if job.cancelled or job.failed:
                continue
            if len(batch) < self.max_batch_rows:
                batch.append((job, i))
            else:
                rest.append((job, i))
        self._pending = rest
        return batch

    def _resolve(self, job: Job, row: Row) -> list[Injection]:
        key = id(row.additions)
        if key not in job.injections:
            inj = [i for a in row.additions for i in a.injections(self.lm)]
            # what Steering would reject for the whole batch, rejected for this job alone
            validate_injections(inj, self.lm.d_model)
            injected(inj, len(row.ids), row.location)  # a prompt shorter than an addition
            job.injections[key] = inj
        return job.injections[key]

    @torch.no_grad()
    def _run_batch(self, batch: list[tuple[Job, int]]) -> None:
        self._tracker = None
        resolved: list[tuple[_RowState, list[Injection]]] = []
        for job, i in batch:
            if job.failed:
                continue
            try:
                inj = self._resolve(job, job.rows[i])
            except Exception as e:  # bad steering for this job: fail it alone
                job._fail(e)
                continue
            resolved.append((_RowState(job, i, job.rows[i]), inj))
        resolved = [(st, inj) for st, inj in resolved if not st.job.failed]
        if not resolved:
            return
        states = [st for st, _ in resolved]
        rows = [[_Fixed(inj)] if inj else [] for _, inj in resolved]
        for st in states:
            if not st.job.started:
                st.job.started = True
                st.job.emit(Event("start"))
        self.stats["batches"] += 1
        self.stats["rows"] += len(states)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(states))
        if len({id(s.job) for s in states}) > 1:
            self.stats["multi_job_batches"] += 1
        specs = [s.row for s in states]
        ids, mask = self.lm.pad([s.ids for s in specs])
        start = (mask == 0).sum(-1)  # [B] first real token of each row
        seeds = [s.seed for s in specs]
        procs = row_processors([s.sampling for s in specs], seeds, start, self.lm.device)
        tracker = self._tracker = _RowTracker(self.lm, states, self.eos)
        config = GenerationConfig(
            max_new_tokens=max(s.max_tokens for s in specs),
            do_sample=False,  # sampling happens per row in RowSeededSampler
            pad_token_id=self.lm.pad_token_id,
            eos_token_id=sorted(self.eos) or None,
        )
        log.info("batch: %d rows from %d jobs", len(states), len({id(s.job) for s in states}))
        with steer(self.lm, rows, addition_location=[s.location for s in specs]):
            self.lm.model.generate(  # type: ignore[operator]
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                logits_processor=procs,
                stopping_criteria=StoppingCriteriaList([tracker]),
            )
        tracker.finish_all()
        self.stats["cancelled_rows"] += sum(st.reason == "cancelled" for st in states)


def _eos_ids(lm: LM) -> set[int]:
    """End-of-sequence ids: the tokenizer's and the model's generation config's."""
    ids: set[int] = set()
    tok_eos = lm.tokenizer.eos_token_id
    if tok_eos is not None:
        ids.add(int(tok_eos))
    gen = getattr(lm.model, "generation_config", None)
    cfg_eos = getattr(gen, "eos_token_id", None)
    if isinstance(cfg_eos, int):
        ids.add(cfg_eos)
    elif isinstance(cfg_eos, (list, tuple)):
        ids.update(int(i) for i in cfg_eos)
    return ids
