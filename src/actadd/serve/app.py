"""``actadd serve``: an OpenAI-compatible HTTP API with per-request steering, and a playground.

Endpoints (JSON; errors in OpenAI's shape ``{"error": {message, type, param, code}}``):

===================================  ===============================================
``POST /v1/completions``             OpenAI completions + ``steering``/``steering_location``
``POST /v1/chat/completions``        chat completions (the model's chat template) + steering
``GET  /v1/models``                  the one model served
``GET  /v1/vectors``                 stored steering vectors
``PUT  /v1/vectors/{name}``          upload a ``SteeringVector`` safetensors file (validated)
``DELETE /v1/vectors/{name}``        remove one
``GET|PUT|DELETE /v1/conditions``    stored conditions (``Condition.save`` files), likewise
``POST /v1/actadd/sweep``            a metric over coefficients × layers (the playground's Sweep)
``GET  /v1/actadd/info``             layers, sites, limits: what the playground needs
``GET  /metrics``                    Prometheus metrics (``actadd.serve.metrics``)
``GET  /``                           the playground (static files, no CDN)
===================================  ===============================================

Requests are served by continuous batching (``actadd.serve.engine``): each request joins the
running batch at the next step and leaves when it ends, with its own steering, sampling and
seed, so a response never depends on what else was in its batch. ``stream: true`` answers with
server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``. A client that goes
away (streaming or not) frees its rows at the next step.

Example:
    >>> from fastapi.testclient import TestClient
    >>> with TestClient(create_app(lm), base_url="http://127.0.0.1") as client:  # doctest: +SKIP
    ...     client.post("/v1/completions", json={"prompt": "I hate you because",
    ...         "max_tokens": 20, "steering": [{"add": "Love", "sub": "Hate", "coeff": 5,
    ...         "layer": 6}]}).json()["choices"][0]["text"]
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from actadd.additions import activation_cache
from actadd.batching import Request as Row
from actadd.errors import ActAddError
from actadd.metrics import make_metric
from actadd.model import LM
from actadd.positions import LOCATIONS
from actadd.serve.engine import MAX_BATCH_ROWS, Engine, EngineClosed, Event, Job, QueueFull
from actadd.serve.metrics import CountRequests, ServerMetrics
from actadd.serve.requests import RequestReader, Rows
from actadd.serve.schema import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Limits,
    SweepRequest,
    validation_error,
)
from actadd.serve.security import DEFAULT_HOSTS, Guard
from actadd.serve.stores import Store, check_name, condition_store, vector_store
from actadd.sites import KINDS

__all__ = ["APIError", "Limits", "create_app", "default_kv_budget", "serve"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
RETRY_AFTER = "2"  # seconds, when the queue is full


# -- errors -------------------------------------------------------------------------------------
def _as_api_error(err: BaseException) -> APIError:
    if isinstance(err, APIError):
        return err
    if isinstance(err, ActAddError):  # the scheduler's errors name the field they can
        return APIError(400, str(err), param=err.param)
    return APIError(500, f"generation failed: {type(err).__name__}: {err}", type="server_error")


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(list(exc.errors())))

    @app.exception_handler(ActAddError)
    async def actadd_error(request: Request, exc: ActAddError) -> JSONResponse:
        return _error_response(_as_api_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        err = APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
        return _error_response(err)


# -- jobs: from the engine's thread to asyncio ----------------------------------------------------
def _submit(engine: Engine, rows: list[Row]) -> tuple[Job, asyncio.Queue[Event]]:
    """Queue rows on the engine; its events arrive in the returned asyncio queue."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(ev: Event) -> None:
        with suppress(RuntimeError):  # the loop is gone: nobody is listening any more
            loop.call_soon_threadsafe(queue.put_nowait, ev)

    job = Job(rows, emit)
    # the server cannot take it now: say so, and when to retry (503 closing, 429 queue full)
    busy = {
        EngineClosed: (503, "server_error", "shutting_down"),
        QueueFull: (429, "rate_limit_error", "queue_full"),
    }
    try:
        engine.submit(job)
    except (EngineClosed, QueueFull) as e:
        status, kind, code = busy[type(e)]
        raise APIError(
            status, str(e), type=kind, code=code, headers={"Retry-After": RETRY_AFTER}
        ) from e
    return job, queue


async def _watch_disconnect(request: Request, job: Job, engine: Engine) -> None:
    """Cancel ``job`` when the client goes away before its answer is ready."""
    while not job.cancelled:
        if await request.is_disconnected():
            log.info("client gone: cancelling job %d", job.id)
            engine.cancel(job)
            return
        await asyncio.sleep(0.05)


async def _collect(
    job: Job, queue: asyncio.Queue[Event], request: Request, engine: Engine
) -> tuple[list[str], list[str], list[int], list[tuple[bool, ...]]]:
    n = len(job.rows)
    texts, reasons, tokens = [""] * n, ["length"] * n, [0] * n
    applied: list[tuple[bool, ...]] = [()] * n
    done = 0
    watcher = asyncio.create_task(_watch_disconnect(request, job, engine))
    try:
        while done < n:
            ev = await queue.get()
            if ev.kind == "error":
                raise _as_api_error(ev.error or RuntimeError("unknown"))
            if ev.kind == "delta":
                texts[ev.row] += ev.text
            elif ev.kind == "done":
                reasons[ev.row], tokens[ev.row], applied[ev.row] = ev.reason, ev.tokens, ev.applied
                done += 1
    except BaseException:
        engine.cancel(job)
        raise
    finally:
        watcher.cancel()
    return texts, reasons, tokens, applied


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(
    job: Job,
    queue: asyncio.Queue[Event],
    engine: Engine,
    *,
    chat: bool,
    head: dict[str, Any],
    prompt_tokens: int,
    usage: bool,
) -> StreamingResponse:
    """Wait until the job is running (errors before that are plain JSON errors), then stream."""
    try:
        first = await queue.get()
    except BaseException:
        engine.cancel(job)
        raise
    if first.kind == "error":
        raise _as_api_error(first.error or RuntimeError("unknown"))

    def chunk(
        index: int,
        text: str | None,
        reason: str | None,
        extra: dict | None = None,
        role: bool = False,
    ) -> str:
        if chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if role:
                delta = {"role": "assistant", "content": ""}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        return _sse({**head, "choices": [{**choice, **(extra or {})}]})

    async def events() -> AsyncIterator[str]:
        complete = False
        n, done, generated = len(job.rows), 0, 0
        try:
            if chat:
                for i in range(n):
                    yield chunk(i, None, None, role=True)
            while done < n:
                ev = await queue.get()
                if ev.kind == "delta":
                    yield chunk(ev.row, ev.text, None)
                elif ev.kind == "done":
                    done += 1
                    generated += ev.tokens
                    extra = {"steering_applied": list(ev.applied)}
                    yield chunk(ev.row, None if chat else "", ev.reason, extra)
                elif ev.kind == "error":
                    yield _sse(_as_api_error(ev.error or RuntimeError("unknown")).body())
                    return
            if usage:
                yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, generated)})
            yield "data: [DONE]\n\n"
            complete = True
        finally:
            if not complete:  # the client went away: its rows leave at the next step
                engine.cancel(job)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


# -- the app ------------------------------------------------------------------------------------
def default_kv_budget(lm: LM, *, fraction: float = 0.25) -> int:
    """KV-cache tokens that fit in ``fraction`` of the free memory (GPU or RAM)."""
    from actadd.sweeps import free_memory

    cfg = lm.model.config
    heads = getattr(cfg, "num_attention_heads", None) or 1
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or lm.d_model // heads
    elt = lm.dtype.itemsize
    per_token = 2 * lm.n_layers * kv_heads * head_dim * elt
    return max(1024, int(free_memory(lm.device, fraction=fraction) // per_token))


def create_app(
    lm: LM,
    *,
    model_id: str | None = None,
    vectors_dir: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
    limits: Limits | None = None,
    max_batch_rows: int = MAX_BATCH_ROWS,
    max_queue_rows: int = 256,
    kv_budget_tokens: int | None = None,
    allowed_hosts: Iterable[str] = DEFAULT_HOSTS,
    shutdown_timeout: float = 10.0,
    activation_cache_bytes: int | None = None,
) -> FastAPI:
    """The FastAPI app serving ``lm``; run it with uvicorn (``serve``) or a TestClient.

    Args:
        lm: the model to serve (an ``actadd.LM``; nothing is copied).
        model_id: the name in ``/v1/models`` and responses; default derived from ``lm.name``.
        vectors_dir: a directory of ``*.safetensors`` steering vectors (and ``conditions/``),
            loaded at start and where uploads are saved (None: uploads live in memory).
        api_key: if set, every ``/v1`` request (and ``/metrics``) needs
            ``Authorization: Bearer <api_key>``; an empty key is refused.
        limits: request limits (``actadd.serve.Limits``).
        max_batch_rows: rows decoded together at most.
        max_queue_rows: rows that may wait; beyond, requests get 429 with ``Retry-After``.
        kv_budget_tokens: KV-cache tokens the running rows may hold; default
            ``default_kv_budget(lm)`` (a quarter of the free memory).
        allowed_hosts: ``Host`` names accepted (default loopback names; ``*`` for any).
        shutdown_timeout: seconds running requests get to finish on shutdown.
        activation_cache_bytes: bytes the recorded activations of steering prompts may hold
            (``actadd.activation_cache(lm).max_bytes``, least recently used out first); None
            keeps the model's setting (256 MiB unless changed).

    Example:
        >>> from fastapi.testclient import TestClient
        >>> client = TestClient(create_app(lm), base_url="http://127.0.0.1")  # doctest: +SKIP
        >>> client.get("/v1/models").json()["data"][0]["id"]  # doctest: +SKIP
        'SmolLM2-135M-Instruct'
    """
    if api_key is not None and not api_key.strip():
        raise ActAddError("the API key is empty: give a non-empty key, or none")
    limits = limits or Limits()
    if activation_cache_bytes is not None:
        activation_cache(lm).max_bytes = int(activation_cache_bytes)
    model_id = model_id or re.sub(r"[^A-Za-z0-9._/-]+", "-", lm.name.split(" (")[0]).strip("-")
    vectors = vector_store(lm, vectors_dir, limits)
    conditions = condition_store(lm, vectors_dir, limits)
    reader = RequestReader(lm, limits, vectors, conditions, model_id)
    metrics = ServerMetrics()
    budget = kv_budget_tokens if kv_budget_tokens is not None else default_kv_budget(lm)
    engine = Engine(
        lm,
        max_batch_rows=max_batch_rows,
        max_queue_rows=max_queue_rows,
        kv_budget_tokens=budget,
        observe=metrics.observe,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        # uvicorn has let in-flight requests finish (or given up after its timeout); finish
        # or cancel what is still queued, then stop
        await asyncio.to_thread(engine.close, shutdown_timeout)
        log.info("engine stopped after %d steps", engine.stats["steps"])

    # no /docs or /redoc: they load their scripts from a CDN; /openapi.json stays
    app = FastAPI(
        title="actadd", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None
    )
    st = _State(lm, model_id, engine, vectors, conditions, reader, limits, api_key, metrics)
    app.state.actadd = st
    engine.start()  # also usable without lifespan events (e.g. httpx's ASGITransport)
    _install_errors(app)

    app.add_middleware(Guard, limits=limits, api_key=api_key, allowed_hosts=allowed_hosts)
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: counts refusals too

    api = APIRouter(prefix="/v1")
    _routes(api, st)
    app.include_router(api)

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, Any]:
        return {"status": "closing" if engine.closed else "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(engine), media_type=metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class _State:
    """What the routes share (``app.state.actadd``)."""

    def __init__(
        self,
        lm: LM,
        model_id: str,
        engine: Engine,
        vectors: Store,
        conditions: Store,
        reader: RequestReader,
        limits: Limits,
        api_key: str | None,
        metrics: ServerMetrics,
    ) -> None:
        self.lm, self.model_id, self.engine = lm, model_id, engine
        self.vectors, self.conditions = vectors, conditions
        self.reader, self.limits, self.api_key, self.metrics = reader, limits, api_key, metrics
        self.created = int(time.time())


def _version() -> str:
    from actadd import __version__

    return __version__


def _head(kind: str, model_id: str) -> dict[str, Any]:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {
        "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
        "object": kind,
        "created": int(time.time()),
        "model": model_id,
    }


def _routes(api: APIRouter, st: _State) -> None:
    lm = st.lm

    @api.get("/models")
    async def models() -> dict[str, Any]:
        entry = {"id": st.model_id, "object": "model", "created": st.created, "owned_by": "actadd"}
        return {"object": "list", "data": [entry]}

    @api.get("/actadd/info")
    async def info() -> dict[str, Any]:
        return {
            "model": st.model_id,
            "n_layers": lm.n_layers,
            "d_model": lm.d_model,
            "sites": list(KINDS),
            "locations": list(LOCATIONS),
            "limits": asdict(st.limits),
            "vectors": sorted(st.vectors.items),
            "conditions": sorted(st.conditions.items),
            "auth": st.api_key is not None,
            "chat_template": bool(getattr(lm.tokenizer, "chat_template", None)),
            "version": _version(),
            "engine": dict(st.engine.stats),
        }

    async def answer(
        plan: Rows, req: CompletionRequest | ChatRequest, request: Request, *, chat: bool
    ) -> Response | dict[str, Any]:
        """Queue a request's rows; stream its chunks, or wait and answer in one body."""
        job, queue = _submit(st.engine, plan.rows)
        kind = "chat.completion" if chat else "text_completion"
        if req.stream:
            head = _head(f"{kind}.chunk" if chat else kind, st.model_id)
            usage = bool((req.stream_options or {}).get("include_usage"))
            return await _stream(
                job,
                queue,
                st.engine,
                chat=chat,
                head=head,
                prompt_tokens=plan.prompt_tokens,
                usage=usage,
            )
        texts, reasons, tokens, applied = await _collect(job, queue, request, st.engine)
        choices = [
            {"index": i, "logprobs": None, "finish_reason": r, "steering_applied": list(a)}
            | ({"message": {"role": "assistant", "content": t}} if chat else {"text": t})
            for i, (t, r, a) in enumerate(zip(texts, reasons, applied, strict=True))
        ]
        return {
            **_head(kind, st.model_id),
            "choices": choices,
            "usage": _usage(plan.prompt_tokens, sum(tokens)),
            "steering": plan.steering,
            "steering_location": req.steering_location,
        }

    @api.post("/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Response | dict[str, Any]:
        return await answer(st.reader.completion(req), req, request, chat=False)

    @api.post("/chat/completions", response_model=None)
    async def chat(req: ChatRequest, request: Request) -> Response | dict[str, Any]:
        return await answer(st.reader.chat(req), req, request, chat=True)

    for store in (st.vectors, st.conditions):
        _store_routes(api, store)

    @api.post("/actadd/sweep")
    async def sweep(req: SweepRequest, request: Request) -> dict[str, Any]:
        """Generate ``n`` completions per (layer, coefficient) as batched rows; score them."""
        plan = st.reader.sweep(req)
        job, queue = _submit(st.engine, plan.rows)
        t0 = time.perf_counter()
        texts, _, _, _ = await _collect(job, queue, request, st.engine)
        seconds = time.perf_counter() - t0
        scores = await asyncio.to_thread(_score, texts, req.metric, req.words or [])
        series = []
        for si, label in enumerate(plan.labels):
            firsts = [plan.first[si, ci] for ci in range(len(req.coeffs))]
            series.append(
                {
                    "label": label,
                    "values": [sum(scores[i : i + req.n]) / req.n for i in firsts],
                    "samples": [texts[i : i + req.n] for i in firsts],
                }
            )
        return {
            "object": "actadd.sweep",
            "metric": req.metric,
            "coeffs": req.coeffs,
            "series": series,
            "completions": len(plan.rows),
            "seconds": round(seconds, 3),
        }


def _store_routes(api: APIRouter, store: Store) -> None:
    """``GET /v1/{kind}s``, ``PUT`` and ``DELETE /v1/{kind}s/{name}``."""
    kind = store.kind

    async def list_items() -> dict[str, Any]:
        return {"object": "list", "data": [store.describe(k) for k in sorted(store.items)]}

    async def put_item(name: str, request: Request) -> JSONResponse:
        check_name(name)
        data = await request.body()
        if not data:
            raise APIError(
                400, "empty body: send the .safetensors file as the request body", param="body"
            )
        described, created = await asyncio.to_thread(store.put, name, data)
        return JSONResponse({"id": name, **described}, status_code=201 if created else 200)

    async def delete_item(name: str) -> dict[str, Any]:
        store.delete(name)
        return {"id": name, "object": kind, "deleted": True}

    api.add_api_route(f"/{kind}s", list_items, methods=["GET"])
    api.add_api_route(f"/{kind}s/{{name}}", put_item, methods=["PUT"], response_model=None)
    api.add_api_route(f"/{kind}s/{{name}}", delete_item, methods=["DELETE"])


def _score(texts: list[str], metric: str, words: list[str]) -> list[float]:
    return [float(x) for x in make_metric(metric, words=words)(texts)]


def serve(
    lm: LM,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    shutdown_timeout: float = 10.0,
    **app_options: Any,
) -> None:
    """Run the server with uvicorn until interrupted: Ctrl-C (or SIGTERM) lets in-flight
    requests finish for up to ``shutdown_timeout`` seconds, then cancels what remains.

    Args:
        lm: the model.
        host, port: where to listen; the default binds to this machine only.
        log_level: uvicorn's log level.
        shutdown_timeout: seconds in-flight requests get on shutdown.
        app_options: passed to ``create_app`` (``vectors_dir``, ``api_key``, ``limits``, ...).

    Example:
        >>> serve(actadd.load_model(), port=8000)  # doctest: +SKIP
    """
    import uvicorn

    app = create_app(lm, shutdown_timeout=shutdown_timeout, **app_options)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=math.ceil(shutdown_timeout),
    )
