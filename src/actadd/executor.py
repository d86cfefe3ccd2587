"""Run chunks of work on a Ray cluster, one model replica per worker.

Every heavy loop of actadd (sweeps, vector building, corpus metrics, pair search) cuts its work
into *chunks* with deterministic keys and hands them to ``RayExecutor.map``. The executor
starts ``workers`` Ray actors; each loads its own replica with ``actadd.load_model`` from a
``ModelSpec`` (one GPU per actor where the cluster has GPUs, an even share of the CPUs
otherwise) and runs ``fn(ctx, payload)`` for one chunk at a time.

The driver loop is ours, not Ray's task retries, so that every chunk's result is recorded
exactly once:

* one chunk in flight per worker; a finished chunk goes to ``on_result`` (which can write it
  to disk) before the worker gets the next;
* a worker that dies mid-chunk loses only that chunk: it goes back to the front of the queue
  and another worker (or the same one, restarted by Ray, ``max_restarts``) runs it again. A
  chunk's *side effects* may therefore happen twice; its result is recorded once;
* an exception raised by ``fn`` itself (bad input, a bug) is not retried: it stops the map and
  is raised in the driver as its own type;
* Ctrl-C (``KeyboardInterrupt``) cancels the chunks in flight and returns the finished ones
  (``MapResult.interrupted``);
* one progress report for the whole cluster: rows done / total, with a status of workers alive
  and rows per second.

Addresses: ``"local"`` starts a Ray instance on this machine for the duration of the
executor, ``"auto"`` joins the cluster this machine belongs to (``ray start``), and
``"ray://host:10001"`` (Ray Client) or ``"host:6379"`` join a remote one. When Ray is already
initialised in this process (``ray.init`` in a notebook), that connection is used as it is.
Ray is optional: ``pip install 'actadd[ray]'``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from actadd import progress
from actadd.errors import (
    ActAddError,
    ClusterError,
    MissingDependencyError,
    ModelLoadError,
    require,
)
from actadd.identity import model_identity
from actadd.loading import ModelSpec
from actadd.model import LM

__all__ = [
    "Chunk",
    "LocalExecutor",
    "MapResult",
    "RayExecutor",
    "WorkerContext",
    "check_address",
    "executor",
    "require_ray",
    "spec_of",
]

log = logging.getLogger(__name__)

_ADDRESS = re.compile(r"(local|auto|ray://.+|[\w.\-]+:\d+)")


def require_ray(feature: str) -> ModuleType:
    """``import ray``, or a ``MissingDependencyError`` naming ``pip install 'actadd[ray]'``."""
    return require("ray", extra="ray", feature=feature)


def check_address(address: str) -> str:
    """A Ray address as ``RayExecutor`` takes it, or an ``ActAddError`` saying what to write.

    Example:
        >>> check_address("ray://head:10001")
        'ray://head:10001'
    """
    if not isinstance(address, str) or not _ADDRESS.fullmatch(address.strip()):
        raise ActAddError(
            f"ray address {address!r} is not one of: 'local' (start Ray on this machine), "
            "'auto' (join the cluster started here with `ray start`), 'ray://HOST:10001' "
            "(Ray Client) or 'HOST:6379' (the head node's GCS)"
        )
    return address.strip()


def spec_of(model: LM | ModelSpec | str | None) -> ModelSpec:
    """The ``ModelSpec`` workers load: given, recorded by ``load_model``, or a model name."""
    if isinstance(model, ModelSpec):
        return model
    if model is None or isinstance(model, str):
        return ModelSpec(model)
    if isinstance(model, LM):
        if model.spec is None:
            raise ActAddError(
                "this LM was not loaded by actadd.load_model, so Ray workers cannot load it: "
                "load it with actadd.load_model(...), or pass an actadd.ModelSpec(...) naming "
                "how to load it"
            )
        return model.spec
    raise ActAddError(
        f"expected an actadd.LM, an actadd.ModelSpec or a model name, got {type(model).__name__}"
    )


@dataclass(frozen=True)
class Chunk:
    """One unit of work: ``payload`` goes to ``fn(ctx, payload)`` on a worker.

    Args:
        key: deterministic identity of the work (a hash of what determines its result).
        payload: picklable input of the task function.
        rows: how many rows it produces, for progress and rows/s.
    """

    key: str
    payload: Any
    rows: int = 1


@dataclass
class WorkerContext:
    """What a task function gets on a worker: the replica, its identity, and a scratch dict
    that lives as long as the worker (e.g. readings kept for a second pass)."""

    lm: LM
    identity: str
    scratch: dict[Any, Any] = field(default_factory=dict)


@dataclass
class MapResult:
    """The results of ``RayExecutor.map`` by chunk key, and what it took.

    ``compute_s`` is each chunk's time inside ``fn`` on its worker, ``round_trip_s`` the time
    from submitting it to having its result in the driver; their difference is Ray's per-chunk
    overhead (scheduling, serialisation, transfer).
    """

    results: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    retried: int = 0  # chunks that were run again after their worker died or went away
    worker_losses: int = 0  # times a worker died or became unreachable
    seconds: float = 0.0
    compute_s: list[float] = field(default_factory=list)
    round_trip_s: list[float] = field(default_factory=list)
    by_worker: dict[int, int] = field(default_factory=dict)  # chunks finished per worker

    @property
    def overhead_s(self) -> float:
        """Median per-chunk overhead: round trip − time inside the task function."""
        gaps = sorted(r - c for r, c in zip(self.round_trip_s, self.compute_s, strict=True))
        return gaps[len(gaps) // 2] if gaps else float("nan")


class ModelWorker:
    """The Ray actor: one model replica (made remote lazily, so Ray stays optional)."""

    def __init__(self, spec: ModelSpec, threads: int | None) -> None:
        if threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        with progress.silenced():
            lm = spec.load()
        self.load_s = time.perf_counter() - t0
        self.ctx = WorkerContext(lm, model_identity(lm))

    def info(self) -> dict[str, Any]:
        import socket

        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "identity": self.ctx.identity,
            "load_s": self.load_s,
            "device": str(self.ctx.lm.device),
            "threads": torch.get_num_threads(),
        }

    def ping(self) -> int:
        return os.getpid()

    def run(self, fn: Callable[[WorkerContext, Any], Any], payload: Any) -> tuple[Any, float]:
        t0 = time.perf_counter()
        with progress.silenced():
            out = fn(self.ctx, payload)
        return out, time.perf_counter() - t0


@dataclass
class _Worker:
    index: int
    handle: Any
    info: dict[str, Any] = field(default_factory=dict)


class RayExecutor:
    """Ray actors holding model replicas, and a fault-tolerant map of chunks over them.

    Args:
        model: an ``LM`` loaded by ``load_model`` (its ``spec`` is reloaded on each worker),
            a ``ModelSpec``, or a model name (None: the embedded model).
        address: ``"local"``, ``"auto"``, ``"ray://host:port"`` or ``"host:port"`` (see the
            module docs).
        workers: how many replicas. Default: one per GPU of the cluster, else one per node
            (each with that node's CPUs). On CPUs, the cluster's CPUs are shared evenly.
        max_restarts: how often Ray may restart a worker whose process died (it reloads its
            model); after that the worker is dropped and the others carry on.
        start_timeout: seconds to wait for the workers to load their models.

    Example:
        >>> with RayExecutor(lm, address="local", workers=2) as ex:  # doctest: +SKIP
        ...     out = ex.map(fn, [Chunk("a", 1), Chunk("b", 2)], task="demo")
    """

    def __init__(
        self,
        model: LM | ModelSpec | str | None,
        *,
        address: str = "local",
        workers: int | None = None,
        max_restarts: int = 2,
        start_timeout: float = 1800.0,
        poll_s: float = 0.5,
    ) -> None:
        self.spec = spec_of(model)
        self.address = check_address(address)
        if workers is not None and workers < 1:
            raise ActAddError(f"workers must be >= 1, got {workers}")
        self.requested = workers
        self.max_restarts = max_restarts
        self.start_timeout = start_timeout
        self.poll_s = poll_s
        self.workers: list[_Worker] = []
        self.identity = ""
        self.start_s = 0.0
        self._ray: Any = None
        self._owns_ray = False

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> RayExecutor:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> Any:
        ray = require_ray("running on a Ray cluster")
        self._ray = ray
        if ray.is_initialized():
            log.info("using the Ray connection this process already has")
            return ray
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        if self.address == "local":
            # a Ray instance for this call only: no dashboard, no usage report (the user's own
            # settings win), a modest object store (results are DataFrames and statistics)
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            kwargs.update(include_dashboard=False, object_store_memory=512 * 2**20)
        else:
            kwargs["address"] = self.address
        if self.address.startswith("ray://"):
            try:
                import grpc  # noqa: F401  (Ray Client's transport, not in plain `ray`)
            except ImportError as e:
                raise MissingDependencyError(
                    "a ray:// address uses Ray Client, which needs Ray's client extra: pip "
                    "install 'ray[client]' (or run on a cluster node with ray='auto')"
                ) from e
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(
                f"could not connect to Ray at {self.address!r}: {e} (start a cluster with "
                "`ray start --head`, or use ray='local')"
            ) from e
        self._owns_ray = True
        return ray

    def _placement(self, ray: Any) -> tuple[int, dict[str, Any]]:
        """How many workers and each one's resources."""
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if gpus:
            return self.requested or gpus, {"num_gpus": 1, "num_cpus": 1}
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        node_cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in nodes]
        n = self.requested or max(1, sum(1 for c in node_cpus if c > 0))
        total = int(resources.get("CPU", 1))
        # an even share, but no more than the largest node has (an actor lives on one node)
        share = max(1, min(total // n, max(node_cpus, default=1)))
        return n, {"num_cpus": share}

    def start(self) -> None:
        """Connect, start the workers and wait until every one has loaded its model."""
        ray = self._connect()
        n, resources = self._placement(ray)
        kind = "GPU" if "num_gpus" in resources else "CPU"
        need = n * resources["num_gpus" if kind == "GPU" else "num_cpus"]
        have = ray.cluster_resources().get(kind, 0)
        if need > have:
            raise ClusterError(
                f"{n} workers need {need} {kind}s but the cluster has {have:g}: ask for fewer "
                "workers, or add nodes"
            )
        if need > ray.available_resources().get(kind, 0):
            log.warning("%d workers wait for %d free %ss (others are in use)", n, need, kind)
        remote = ray.remote(ModelWorker).options(
            max_restarts=self.max_restarts,
            max_task_retries=0,  # the driver loop requeues; Ray must not rerun chunks itself
            scheduling_strategy="SPREAD",
            **resources,
        )
        threads = None if "num_gpus" in resources else int(resources["num_cpus"])
        t0 = time.perf_counter()
        self.workers = [_Worker(i, remote.remote(self.spec, threads)) for i in range(n)]
        refs = {w.handle.info.remote(): w for w in self.workers}
        deadline = time.monotonic() + self.start_timeout
        progress.report("starting workers", 0, n)
        while refs:
            left = deadline - time.monotonic()
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=max(0.0, min(left, 5.0)))
            if not ready:
                if left <= 0:
                    raise ClusterError(
                        f"{len(refs)} of {n} workers did not start within "
                        f"{self.start_timeout:.0f} s; each asks for {resources} and the "
                        f"cluster has {ray.cluster_resources()}: ask for fewer workers"
                    )
                continue
            w = refs.pop(ready[0])
            try:
                w.info = ray.get(ready[0], timeout=60)
            except ray.exceptions.RayActorError as e:
                raise ModelLoadError(f"a worker could not load {self.spec.name!r}: {e}") from e
            progress.report("starting workers", n - len(refs), n)
        self.start_s = time.perf_counter() - t0
        identities = {w.info["identity"] for w in self.workers}
        if len(identities) != 1:
            raise ClusterError(
                "the workers loaded different models (weights, dtype or device differ): "
                + ", ".join(f"{w.info['host']}: {w.info['identity']}" for w in self.workers)
            )
        self.identity = identities.pop()
        log.info(
            "%d workers ready in %.1f s (%s each): %s",
            n,
            self.start_s,
            resources,
            ", ".join(f"{w.info['host']}/{w.info['pid']}" for w in self.workers),
        )

    def close(self) -> None:
        """Stop the workers (and the local Ray instance, if this executor started it)."""
        ray, self._ray = self._ray, None
        if ray is None:
            return
        for w in self.workers:
            try:
                ray.kill(w.handle, no_restart=True)
            except Exception as e:  # already gone
                log.debug("worker %d: %s", w.index, e)
        self.workers = []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    # -- work ----------------------------------------------------------------------------------
    def map(
        self,
        fn: Callable[[WorkerContext, Any], Any],
        chunks: Iterable[Chunk],
        *,
        task: str = "chunks",
        on_result: Callable[[Chunk, Any], None] | None = None,
        rows_done: int = 0,
        rows_total: int | None = None,
    ) -> MapResult:
        """Run ``fn(ctx, chunk.payload)`` for every chunk on the workers.

        Args:
            fn: a module-level function (pickled by reference) of the worker's context and
                a payload; its result must be picklable.
            chunks: the work; keys must be unique.
            task: the progress task's name.
            on_result: called in the driver with each chunk and its result, as they arrive.
            rows_done, rows_total: rows finished before this call (e.g. resumed from disk)
                and overall, for the progress report.

        Returns:
            A ``MapResult``; after Ctrl-C its ``interrupted`` is True and it holds the chunks
            that finished.
        """
        ray = self._ray
        if ray is None:
            raise ClusterError("the executor is not running: use it as `with RayExecutor(...)`")
        from ray.exceptions import RayActorError, RayTaskError

        unavailable = getattr(ray.exceptions, "ActorUnavailableError", ())
        queue = deque(chunks)
        if len({c.key for c in queue}) != len(queue):
            raise ActAddError("chunk keys must be unique")
        total = rows_total if rows_total is not None else rows_done + sum(c.rows for c in queue)
        out = MapResult()
        idle = deque(self.workers)
        alive = len(self.workers)
        pending: dict[Any, tuple[_Worker, Chunk, float]] = {}
        probing: dict[Any, _Worker] = {}
        t0 = time.perf_counter()
        done = rows_done

        def status() -> str:
            rate = (done - rows_done) / max(time.perf_counter() - t0, 1e-9)
            return f"{alive}/{len(self.workers)} workers · {rate:.2f} rows/s"

        def lost(w: _Worker, c: Chunk | None, dead: bool, e: Exception) -> None:
            nonlocal alive
            out.worker_losses += 1
            if c is not None:
                queue.appendleft(c)  # first in line: the rest of the run waits for it least
                out.retried += 1
            if dead:
                alive -= 1
                log.warning("worker %d died (%s); %d left", w.index, type(e).__name__, alive)
            else:  # restarting: ask it when it is back (Ray reloads its model)
                log.warning("worker %d went away (%s); waiting for it", w.index, type(e).__name__)
                probing[w.handle.ping.remote()] = w

        try:
            progress.report(task, done, total, status=status())
            while queue or pending:
                while queue and idle:
                    w, c = idle.popleft(), queue.popleft()
                    pending[w.handle.run.remote(fn, c.payload)] = (w, c, time.perf_counter())
                if not pending and not probing:
                    raise ClusterError(
                        f"every worker died; {len(out.results)} chunks finished, "
                        f"{len(queue)} left (rerun to resume where results are kept)"
                    )
                ready, _ = ray.wait([*pending, *probing], num_returns=1, timeout=self.poll_s)
                for ref in ready:
                    if ref in probing:
                        w = probing.pop(ref)
                        try:
                            ray.get(ref, timeout=60)
                            idle.append(w)
                        except RayActorError as e:
                            lost(w, None, True, e)
                        continue
                    w, c, sent = pending.pop(ref)
                    try:
                        result, compute = ray.get(ref, timeout=60)
                    except RayTaskError as e:  # fn raised: not the cluster's fault, not retried
                        raise e.as_instanceof_cause() from None
                    except unavailable as e:
                        lost(w, c, False, e)
                        continue
                    except RayActorError as e:
                        lost(w, c, True, e)
                        continue
                    if c.key in out.results:  # cannot happen with one chunk per request
                        raise ClusterError(f"chunk {c.key} finished twice")
                    out.results[c.key] = result
                    out.compute_s.append(compute)
                    out.round_trip_s.append(time.perf_counter() - sent)
                    out.by_worker[w.index] = out.by_worker.get(w.index, 0) + 1
                    idle.append(w)
                    done += c.rows
                    if on_result is not None:
                        on_result(c, result)
                progress.report(task, done, total, status=status())
        except KeyboardInterrupt:
            out.interrupted = True
            for ref in pending:
                try:
                    ray.cancel(ref)
                except Exception as e:  # already finished or its worker is gone
                    log.debug("cancel: %s", e)
            log.warning(
                "interrupted: %d chunks finished, %d cancelled",
                len(out.results),
                len(pending) + len(queue),
            )
        out.seconds = time.perf_counter() - t0
        return out

    def broadcast(self, fn: Callable[[WorkerContext, Any], Any], payload: Any) -> list[Any]:
        """``fn(ctx, payload)`` once on every worker; the results of those that answered
        (a worker that dies meanwhile is left out: callers redo its share with ``map``)."""
        ray = self._ray
        if ray is None:
            raise ClusterError("the executor is not running: use it as `with RayExecutor(...)`")
        from ray.exceptions import RayActorError

        refs = [w.handle.run.remote(fn, payload) for w in self.workers]
        answers = []
        for ref in refs:
            try:
                answers.append(ray.get(ref, timeout=self.start_timeout)[0])
            except RayActorError as e:
                log.warning("a worker did not answer (%s)", type(e).__name__)
        return answers

    def describe(self) -> str:
        """One line: how many workers, where, and how long they took to start."""
        hosts = sorted({w.info.get("host", "?") for w in self.workers})
        return (
            f"{len(self.workers)} workers on {len(hosts)} node(s), models loaded in "
            f"{self.start_s:.1f} s"
        )


class LocalExecutor:
    """The same interface in this process, on a model already loaded: what ``ray=None`` runs
    when work is still chunked (e.g. a sweep kept in a ``store`` directory)."""

    def __init__(self, lm: LM) -> None:
        self.ctx = WorkerContext(lm, model_identity(lm))
        self.identity = self.ctx.identity

    def map(
        self,
        fn: Callable[[WorkerContext, Any], Any],
        chunks: Iterable[Chunk],
        *,
        task: str = "chunks",
        on_result: Callable[[Chunk, Any], None] | None = None,
        rows_done: int = 0,
        rows_total: int | None = None,
    ) -> MapResult:
        """``RayExecutor.map``, one chunk after another."""
        todo = list(chunks)
        total = rows_total if rows_total is not None else rows_done + sum(c.rows for c in todo)
        out, done, t0 = MapResult(), rows_done, time.perf_counter()
        try:
            progress.report(task, done, total)
            for c in todo:
                t1 = time.perf_counter()
                with progress.silenced():
                    result = fn(self.ctx, c.payload)
                out.compute_s.append(time.perf_counter() - t1)
                out.round_trip_s.append(out.compute_s[-1])
                out.results[c.key] = result
                done += c.rows
                if on_result is not None:
                    on_result(c, result)
                progress.report(task, done, total)
        except KeyboardInterrupt:
            out.interrupted = True
            log.warning("interrupted: %d of %d chunks finished", len(out.results), len(todo))
        out.seconds = time.perf_counter() - t0
        return out

    def broadcast(self, fn: Callable[[WorkerContext, Any], Any], payload: Any) -> list[Any]:
        return [fn(self.ctx, payload)]

    def describe(self) -> str:
        return "in this process"


Executor = RayExecutor | LocalExecutor


@contextmanager
def executor(
    model: LM | ModelSpec | str | None,
    ray: str | RayExecutor | None,
    workers: int | None = None,
) -> Iterator[Executor]:
    """A started executor: on Ray when ``ray`` is an address, else in this process (``model``
    must then be an ``LM``, or a spec/name to load here). Closed after the block, except a
    running ``RayExecutor`` given as ``ray``, which is used as it is (its workers serve many
    calls without reloading the model).

    Example:
        >>> with executor(lm, "local", 2) as ex:  # doctest: +SKIP
        ...     out = ex.map(fn, chunks, task="demo")
    """
    if isinstance(ray, RayExecutor):
        if workers is not None:
            raise ActAddError("workers= is the executor's own: leave it out when ray= is one")
        wanted = model.spec if isinstance(model, LM) else model
        if wanted is not None and spec_of(wanted) != ray.spec:
            raise ActAddError(
                f"ray= is an executor for {ray.spec.name!r}, but the model is "
                f"{spec_of(wanted).name!r}: start an executor for this model"
            )
        yield ray
        return
    if ray is None:
        if workers is not None:
            raise ActAddError("workers= sets the number of Ray workers: give ray= too")
        lm = model if isinstance(model, LM) else spec_of(model).load()
        yield LocalExecutor(lm)
        return
    with RayExecutor(model, address=ray, workers=workers) as ex:
        yield ex
