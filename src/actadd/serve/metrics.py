"""``GET /metrics``: what vLLM and TGI users scrape, in Prometheus' text format.

One registry per app (several apps in one process, as in tests, do not mix their numbers):

=========================================  ==================================================
``actadd_queue_rows``                      rows waiting to run
``actadd_running_rows``                    rows in the running batch
``actadd_kv_cache_tokens``                 KV-cache tokens the running rows may grow to
``actadd_generated_tokens_total``          tokens generated (``rate()`` of it is tokens/s); a
                                           row's end-of-sequence token counts here, not in
                                           a response's ``usage``
``actadd_tokens_per_second``               tokens/s over the last 10 s
``actadd_time_to_first_token_seconds``     histogram: request received → its first token
``actadd_time_per_output_token_seconds``   histogram: between a row's tokens
``actadd_requests_total{route,status}``    requests answered, by route and HTTP status
=========================================  ==================================================
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actadd.errors import require

__all__ = ["CountRequests", "ServerMetrics"]

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """The server's Prometheus metrics (``prometheus-client``, from ``actadd[serve]``)."""

    def __init__(self) -> None:
        prom = require("prometheus_client", extra="serve", feature="GET /metrics")
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.queue_rows = prom.Gauge("actadd_queue_rows", "rows waiting to run", registry=r)
        self.running_rows = prom.Gauge("actadd_running_rows", "rows in the batch", registry=r)
        self.kv_tokens = prom.Gauge(
            "actadd_kv_cache_tokens", "KV-cache tokens the running rows may grow to", registry=r
        )
        self.tokens = prom.Counter(
            "actadd_generated_tokens",
            "tokens generated (end-of-sequence tokens included; usage leaves them out)",
            registry=r,
        )  # exported as actadd_generated_tokens_total
        self.tokens_per_second = prom.Gauge(
            "actadd_tokens_per_second", "tokens per second over the last 10 s", registry=r
        )
        self.ttft = prom.Histogram(
            "actadd_time_to_first_token_seconds",
            "time from a request's arrival to its first token",
            buckets=_LATENCY,
            registry=r,
        )
        self.tpot = prom.Histogram(
            "actadd_time_per_output_token_seconds",
            "time between a row's tokens",
            buckets=_LATENCY,
            registry=r,
        )
        self.requests = prom.Counter(
            "actadd_requests", "requests answered", ["route", "status"], registry=r
        )
        self._recent: deque[float] = deque()  # token times in the last 10 s
        self._lock = threading.Lock()  # observe() runs in the engine's thread, render() not

    def observe(self, kind: str, seconds: float) -> None:
        """From the engine's thread: a row's first token (``ttft``) or a later one."""
        (self.ttft if kind == "ttft" else self.tpot).observe(seconds)
        self.tokens.inc()
        with self._lock:
            self._recent.append(time.monotonic())
            self._forget_old()

    def _forget_old(self) -> None:
        now = time.monotonic()
        while self._recent and self._recent[0] < now - 10:
            self._recent.popleft()

    def render(self, engine: Any) -> bytes:
        """The text exposition, with the gauges read now."""
        with self._lock:
            self._forget_old()
            self.tokens_per_second.set(len(self._recent) / 10)
        self.queue_rows.set(engine.waiting_rows)
        self.running_rows.set(engine.running_rows)
        self.kv_tokens.set(engine.scheduler.tokens_held())
        return bytes(self._prom.generate_latest(self.registry))

    @property
    def content_type(self) -> str:
        return str(self._prom.CONTENT_TYPE_LATEST)


class CountRequests:
    """ASGI middleware: count each answered request by route and status."""

    def __init__(self, app: ASGIApp, *, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or (
                "/v1/other" if scope["path"].startswith("/v1/") else "other"
            )
            self.metrics.requests.labels(path, str(status[0])).inc()
