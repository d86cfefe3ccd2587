"""``actadd serve``: an OpenAI-compatible HTTP API with per-request steering, and a playground.

Endpoints (JSON; errors in OpenAI's shape ``{"error": {message, type, param, code}}``):

===============================  ====================================================
``POST /v1/completions``         OpenAI completions + ``steering``/``steering_location``
``POST /v1/chat/completions``    chat completions (the model's chat template) + steering
``GET  /v1/models``              the one model served
``GET  /v1/vectors``             stored steering vectors
``PUT  /v1/vectors/{name}``      upload a ``SteeringVector`` safetensors file (validated)
``DELETE /v1/vectors/{name}``    remove one
``POST /v1/actadd/sweep``        a metric over coefficients × layers (the playground's Sweep)
``GET  /v1/actadd/info``         layers, sites, limits: what the playground needs
``GET  /``                       the playground (static files, no CDN)
===============================  ====================================================

Concurrent requests are batched into shared ``generate`` calls by ``actadd.serve.engine.Engine``
(one model thread, per-row steering and seeds), so a response never depends on what else was
in its batch. ``stream: true`` answers with server-sent events in OpenAI's chunk format,
ending with ``data: [DONE]``.

Example:
    >>> from fastapi.testclient import TestClient
    >>> with TestClient(create_app(lm)) as client:  # doctest: +SKIP
    ...     client.post("/v1/completions", json={"prompt": "I hate you because",
    ...         "max_tokens": 20, "steering": [{"add": "Love", "sub": "Hate", "coeff": 5,
    ...         "layer": 6}]}).json()["choices"][0]["text"]
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actadd.errors import ActAddError
from actadd.metrics import make_metric
from actadd.model import LM
from actadd.positions import LOCATIONS
from actadd.serve.engine import Engine, EngineClosed, Event, Job, QueueFull, Row
from actadd.serve.requests import RequestReader, Rows
from actadd.serve.schema import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Limits,
    SweepRequest,
    validation_error,
)
from actadd.serve.vectors import VectorStore, check_name
from actadd.sites import KINDS

__all__ = ["APIError", "Limits", "create_app", "serve"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


# -- errors -------------------------------------------------------------------------------------
def _as_api_error(err: BaseException) -> APIError:
    if isinstance(err, APIError):
        return err
    if isinstance(err, ActAddError):
        return APIError(400, str(err))
    return APIError(500, f"generation failed: {type(err).__name__}: {err}", type="server_error")


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(list(exc.errors())))

    @app.exception_handler(ActAddError)
    async def actadd_error(request: Request, exc: ActAddError) -> JSONResponse:
        return _error_response(APIError(400, str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        err = APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
        return _error_response(err)


class _BodyLimit:
    """Reject request bodies above the limit with 413 (vector uploads have their own limit).

    Also reads every other ``/v1`` body as JSON whatever its declared type: ``curl -d`` sends
    ``application/x-www-form-urlencoded`` unless told otherwise.
    """

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        upload = scope["path"].startswith("/v1/vectors/")
        if not upload and scope["path"].startswith("/v1/"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        limit = self.limits.max_vector_bytes if upload else self.limits.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > limit
        chunks: list[bytes] = []
        size = 0
        while not too_big:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            too_big = size > limit
            if not msg.get("more_body"):
                break
        if too_big:
            err = APIError(
                413, f"request body is larger than {limit} bytes", param=None, code="body_too_large"
            )
            await _error_response(err)(scope, receive, send)
            return
        body, sent = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# -- jobs: from the engine's thread to asyncio ----------------------------------------------------
def _submit(engine: Engine, rows: list[Row]) -> tuple[Job, asyncio.Queue[Event]]:
    """Queue rows on the engine; its events arrive in the returned asyncio queue."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(ev: Event) -> None:
        with suppress(RuntimeError):  # the loop is gone: nobody is listening any more
            loop.call_soon_threadsafe(queue.put_nowait, ev)

    job = Job(rows, emit)
    try:
        engine.submit(job)
    except EngineClosed as e:
        raise APIError(503, str(e), type="server_error", code="shutting_down") from e
    except QueueFull as e:
        raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from e
    return job, queue


async def _collect(job: Job, queue: asyncio.Queue[Event]) -> tuple[list[str], list[str], list[int]]:
    n = len(job.rows)
    texts, reasons, tokens = [""] * n, ["length"] * n, [0] * n
    done = 0
    try:
        while done < n:
            ev = await queue.get()
            if ev.kind == "error":
                raise _as_api_error(ev.error or RuntimeError("unknown"))
            if ev.kind == "delta":
                texts[ev.row] += ev.text
            elif ev.kind == "done":
                reasons[ev.row], tokens[ev.row] = ev.reason, ev.tokens
                done += 1
    except BaseException:
        job.cancel()
        raise
    return texts, reasons, tokens


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(
    job: Job,
    queue: asyncio.Queue[Event],
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
        job.cancel()
        raise
    if first.kind == "error":
        raise _as_api_error(first.error or RuntimeError("unknown"))

    def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if role:
                delta = {"role": "assistant", "content": ""}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        return _sse({**head, "choices": [choice]})

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
                    yield chunk(ev.row, None if chat else "", ev.reason)
                elif ev.kind == "error":
                    yield _sse(_as_api_error(ev.error or RuntimeError("unknown")).body())
                    return
            if usage:
                yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, generated)})
            yield "data: [DONE]\n\n"
            complete = True
        finally:
            if not complete:
                job.cancel()

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
def create_app(
    lm: LM,
    *,
    model_id: str | None = None,
    vectors_dir: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
    limits: Limits | None = None,
    max_batch_rows: int = 16,
    batch_window: float = 0.02,
) -> FastAPI:
    """The FastAPI app serving ``lm``; run it with uvicorn (``serve``) or a TestClient.

    Args:
        lm: the model to serve (an ``actadd.LM``; nothing is copied).
        model_id: the name in ``/v1/models`` and responses; default derived from ``lm.name``.
        vectors_dir: a directory of ``*.safetensors`` steering vectors, loaded at start and
            where uploads are saved (None: uploads live in memory).
        api_key: if set, every ``/v1`` request needs ``Authorization: Bearer <api_key>``.
        limits: request limits (``actadd.serve.Limits``).
        max_batch_rows: rows per batched ``generate`` call.
        batch_window: seconds the engine waits for more requests before a batch.

    Example:
        >>> from fastapi.testclient import TestClient
        >>> client = TestClient(create_app(lm))  # doctest: +SKIP
        >>> client.get("/v1/models").json()["data"][0]["id"]  # doctest: +SKIP
        'SmolLM2-135M-Instruct'
    """
    limits = limits or Limits()
    model_id = model_id or re.sub(r"[^A-Za-z0-9._/-]+", "-", lm.name.split(" (")[0]).strip("-")
    store = VectorStore(lm, vectors_dir, limits)
    reader = RequestReader(lm, limits, store, model_id)
    engine = Engine(lm, max_batch_rows=max_batch_rows, batch_window=batch_window)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        # uvicorn has let in-flight requests finish; finish anything still queued, then stop
        await asyncio.to_thread(engine.close)
        log.info("engine stopped after %d batches", engine.stats["batches"])

    # no /docs or /redoc: they load their scripts from a CDN; /openapi.json stays
    app = FastAPI(
        title="actadd", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.actadd = _State(lm, model_id, engine, store, reader, limits, api_key)
    engine.start()  # also usable without lifespan events (e.g. httpx's ASGITransport)
    _install_errors(app)
    app.add_middleware(_BodyLimit, limits=limits)

    api = APIRouter(prefix="/v1", dependencies=[Depends(_auth(api_key))])
    _routes(api, app.state.actadd)
    app.include_router(api)

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, Any]:
        return {"status": "closing" if engine.closed else "ok"}

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
        store: VectorStore,
        reader: RequestReader,
        limits: Limits,
        api_key: str | None,
    ) -> None:
        self.lm, self.model_id, self.engine, self.store = lm, model_id, engine, store
        self.reader, self.limits, self.api_key = reader, limits, api_key
        self.created = int(time.time())


def _version() -> str:
    from actadd import __version__

    return __version__


def _auth(api_key: str | None) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), api_key.encode()
        ):
            raise APIError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>' (the key "
                "given to `actadd serve --api-key`)",
                code="invalid_api_key",
            )

    return check


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
            "vectors": sorted(st.store.vectors),
            "auth": st.api_key is not None,
            "chat_template": bool(getattr(lm.tokenizer, "chat_template", None)),
            "version": _version(),
            "engine": dict(st.engine.stats),
        }

    async def answer(
        plan: Rows, req: CompletionRequest | ChatRequest, *, chat: bool
    ) -> Response | dict[str, Any]:
        """Queue a request's rows; stream its chunks, or wait and answer in one body."""
        job, queue = _submit(st.engine, plan.rows)
        kind = "chat.completion" if chat else "text_completion"
        if req.stream:
            head = _head(f"{kind}.chunk" if chat else kind, st.model_id)
            usage = bool((req.stream_options or {}).get("include_usage"))
            return await _stream(
                job, queue, chat=chat, head=head, prompt_tokens=plan.prompt_tokens, usage=usage
            )
        texts, reasons, tokens = await _collect(job, queue)
        choices = [
            {"index": i, "logprobs": None, "finish_reason": r}
            | ({"message": {"role": "assistant", "content": t}} if chat else {"text": t})
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
        return {
            **_head(kind, st.model_id),
            "choices": choices,
            "usage": _usage(plan.prompt_tokens, sum(tokens)),
            "steering": plan.steering,
            "steering_location": req.steering_location,
        }

    @api.post("/completions", response_model=None)
    async def completions(req: CompletionRequest) -> Response | dict[str, Any]:
        return await answer(st.reader.completion(req), req, chat=False)

    @api.post("/chat/completions", response_model=None)
    async def chat(req: ChatRequest) -> Response | dict[str, Any]:
        return await answer(st.reader.chat(req), req, chat=True)

    @api.get("/vectors")
    async def list_vectors() -> dict[str, Any]:
        return {"object": "list", "data": [st.store.describe(k) for k in sorted(st.store.vectors)]}

    @api.put("/vectors/{name}", response_model=None)
    async def put_vector(name: str, request: Request) -> JSONResponse:
        check_name(name)
        data = await request.body()
        if not data:
            raise APIError(
                400,
                "empty body: send the .safetensors file (SteeringVector.save) as the request body",
                param="body",
            )
        _, created = await asyncio.to_thread(st.store.put, name, data)
        return JSONResponse(st.store.describe(name), status_code=201 if created else 200)

    @api.delete("/vectors/{name}")
    async def delete_vector(name: str) -> dict[str, Any]:
        st.store.delete(name)
        return {"id": name, "object": "steering_vector", "deleted": True}

    @api.post("/actadd/sweep")
    async def sweep(req: SweepRequest) -> dict[str, Any]:
        """Generate ``n`` completions per (layer, coefficient) as batched rows; score them."""
        plan = st.reader.sweep(req)
        job, queue = _submit(st.engine, plan.rows)
        t0 = time.perf_counter()
        texts, _, _ = await _collect(job, queue)
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


def _score(texts: list[str], metric: str, words: list[str]) -> list[float]:
    return [float(x) for x in make_metric(metric, words=words)(texts)]


def serve(
    lm: LM,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    **app_options: Any,
) -> None:
    """Run the server with uvicorn until interrupted (Ctrl-C lets in-flight requests finish).

    Args:
        lm: the model.
        host, port: where to listen; the default binds to this machine only.
        log_level: uvicorn's log level.
        app_options: passed to ``create_app`` (``vectors_dir``, ``api_key``, ``limits``, ...).

    Example:
        >>> serve(actadd.load_model(), port=8000)  # doctest: +SKIP
    """
    import uvicorn

    app = create_app(lm, **app_options)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)
