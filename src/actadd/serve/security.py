"""What every request passes before a route sees it: host, API key, content type, body.

Safe by default on a developer's machine: the server binds loopback, and this guard refuses

* a ``Host`` header it was not told about (``localhost``/``127.0.0.1``/``[::1]`` by default,
  ``--allowed-host`` adds names): a DNS-rebinding web page cannot drive the API;
* JSON endpoints sent anything but ``application/json``: a page cannot make a browser send a
  cross-origin form or text body (those need no CORS preflight, JSON does);
* a missing or wrong API key (when one is set) before reading a byte of the body;
* bodies larger than the limit (413) or sent too slowly (408: a client holding a half-sent
  body cannot pin a connection).

Errors keep OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterable
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actadd.serve.schema import APIError, Limits

__all__ = ["DEFAULT_HOSTS", "Guard"]

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
UPLOADS = ("/v1/vectors/", "/v1/conditions/")  # binary bodies (PUT)


def _host(value: str) -> str:
    """The host name of a ``Host`` header, without the port (IPv6 in brackets)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """ASGI middleware: the checks of the module docs, then the app.

    Args:
        app: the app.
        limits: body sizes and the body timeout.
        api_key: if set, ``/v1`` and ``/metrics`` need ``Authorization: Bearer <api_key>``.
        allowed_hosts: host names accepted in the ``Host`` header (``*``: any).
    """

    def __init__(
        self, app: ASGIApp, *, limits: Limits, api_key: str | None, allowed_hosts: Iterable[str]
    ) -> None:
        self.app, self.limits, self.api_key = app, limits, api_key
        self.hosts = {_host(h) for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        err = self._check(headers, path, method)
        if err is None and method in ("POST", "PUT", "PATCH"):
            body, err = await self._body(receive, headers, path)
            if err is None:
                receive = _replay(body, receive)
        if err is not None:
            await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check(self, headers: dict[str, str], path: str, method: str) -> APIError | None:
        if "*" not in self.hosts and _host(headers.get("host", "")) not in self.hosts:
            return APIError(
                400,
                f"host {headers.get('host', '')!r} is not served here: start the server with "
                "--allowed-host NAME to accept it",
                code="invalid_host",
            )
        if self.api_key is not None and (path.startswith("/v1/") or path == "/metrics"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(
                token.strip().encode(), self.api_key.encode()
            ):
                return APIError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>' (the key "
                    "given to `actadd serve --api-key`)",
                    code="invalid_api_key",
                )
        if method == "POST" and path.startswith("/v1/"):
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return APIError(
                    415,
                    f"send the body as JSON with 'Content-Type: application/json' (got "
                    f"{kind or 'none'!r})",
                    code="unsupported_media_type",
                )
        return None

    async def _body(
        self, receive: Receive, headers: dict[str, str], path: str
    ) -> tuple[bytes, APIError | None]:
        upload = path.startswith(UPLOADS)
        limit = self.limits.max_vector_bytes if upload else self.limits.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return b"", _too_big(limit)
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.limits.body_timeout
        while True:
            left = deadline - time.monotonic()
            try:
                msg = await asyncio.wait_for(receive(), timeout=max(left, 0.001))
            except asyncio.TimeoutError:
                return b"", APIError(
                    408,
                    f"the request body did not arrive within {self.limits.body_timeout:g} s",
                    code="body_timeout",
                )
            if msg["type"] == "http.disconnect":
                return b"", APIError(400, "the client went away", code="disconnected")
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return b"", _too_big(limit)
            if not msg.get("more_body"):
                return b"".join(chunks), None


def _too_big(limit: int) -> APIError:
    return APIError(413, f"request body is larger than {limit} bytes", code="body_too_large")


def _replay(body: bytes, receive: Receive) -> Any:
    """A ``receive`` that gives the body read already, then the real stream's messages (a
    disconnect, which the routes watch for)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
