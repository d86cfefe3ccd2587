"""Hostile and malformed input against the server (the faults found on the first server): each is
refused with a 4xx in OpenAI's shape naming what to fix, nothing is stored, and the server goes
on. Where the socket matters (auth before the body, slow bodies, SIGTERM) a live uvicorn runs on
127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.torch import save_file

import actadd
from actadd.serve import Limits, create_app
from actadd.serve.security import DEFAULT_HOSTS
from conftest import live_server

OK = {"prompt": "ok", "max_tokens": 2}


@pytest.fixture
def client(llama: actadd.LM) -> Iterator[TestClient]:
    with TestClient(create_app(llama), base_url="http://127.0.0.1") as c:
        yield c


def error_of(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def raw_exchange(url: str, data: bytes, *, wait: float = 20.0) -> tuple[int, float]:
    """Send ``data`` on a fresh connection (left open); the response's status and how long it
    took to arrive."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        t0 = time.monotonic()
        s.sendall(data)
        head = s.recv(4096)
        took = time.monotonic() - t0
    assert head.startswith(b"HTTP/1.1 "), head
    return int(head.split()[1]), took


# -- browsers and DNS rebinding -----------------------------------------------------------------
def test_unknown_host_names_are_refused(llama: actadd.LM) -> None:
    with TestClient(create_app(llama), base_url="http://127.0.0.1") as c:
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
            err = error_of(c.get("/v1/models", headers={"Host": host}), 400)
            assert err["code"] == "invalid_host" and "--allowed-host" in err["message"]
            assert c.delete("/v1/vectors/x", headers={"Host": host}).status_code == 400
            assert c.get("/", headers={"Host": host}).status_code == 400
        for host in ("localhost", "localhost:8000", "127.0.0.1:1234", "[::1]:8000"):
            assert c.get("/v1/models", headers={"Host": host}).status_code == 200, host
    app = create_app(llama, allowed_hosts=[*DEFAULT_HOSTS, "box.lan"])
    with TestClient(app, base_url="http://box.lan:8000") as c:
        assert c.get("/v1/models").status_code == 200


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", json.dumps(OK)),  # a page's fetch() without a preflight
        ("application/x-www-form-urlencoded", json.dumps(OK)),  # an HTML form
        ("multipart/form-data; boundary=x", json.dumps(OK)),
        (None, json.dumps(OK)),
    ],
)
def test_only_json_bodies_are_read(client: TestClient, content_type: str | None, body: str) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    err = error_of(client.post("/v1/completions", content=body, headers=headers), 415)
    assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]
    ok = {"Content-Type": "application/json; charset=utf-8"}
    assert client.post("/v1/completions", content=body, headers=ok).status_code == 200


# -- keys, sizes and slow bodies -----------------------------------------------------------------
def test_the_api_key_is_checked_before_the_body_is_read(llama: actadd.LM) -> None:
    # a 60 MB upload is announced and never sent: the answer must not wait for it
    app = create_app(llama, api_key="k", limits=Limits(body_timeout=60))
    with live_server(app) as (url, _):
        for auth in (b"", b"Authorization: Bearer wrong\r\n"):
            head = (
                b"PUT /v1/vectors/big HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + b"Content-Type: "
                b"application/octet-stream\r\nContent-Length: 60000000\r\n\r\n" + b"\0" * 1000
            )
            status, took = raw_exchange(url, head)
            assert status == 401 and took < 5
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            b"application/json\r\nContent-Length: 900000\r\n\r\n{"
        )
        assert raw_exchange(url, head)[0] == 401


def test_slow_bodies_time_out(llama: actadd.LM) -> None:
    app = create_app(llama, limits=Limits(body_timeout=0.5))
    with live_server(app) as (url, _):
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            b"application/json\r\nContent-Length: 100\r\n\r\n" + b'{"prompt": "'
        )
        status, took = raw_exchange(url, head)
        assert status == 408 and took < 5
        import httpx

        assert httpx.post(f"{url}/v1/completions", json=OK, timeout=30).status_code == 200


def test_bodies_over_the_limit_are_refused(llama: actadd.LM) -> None:
    app = create_app(llama, limits=Limits(max_body_bytes=1000))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        big = {**OK, "prompt": "x" * 2000}
        assert error_of(c.post("/v1/completions", json=big), 413)["code"] == "body_too_large"
        assert c.post("/v1/completions", json=OK).status_code == 200


def test_an_empty_api_key_is_refused(llama: actadd.LM) -> None:
    from typer.testing import CliRunner

    import actadd.cli

    for key in ("", "  "):
        with pytest.raises(actadd.ActAddError, match="empty"):
            create_app(llama, api_key=key)
    result = CliRunner().invoke(actadd.cli.app, ["serve", "--api-key", ""])
    assert result.exit_code != 0 and "empty" in result.output


# -- values that used to answer 500 -------------------------------------------------------------
SURROGATE = "caf\ud800"


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", {"prompt": SURROGATE}, "prompt"),
        ("/v1/completions", {"prompt": ["ok", SURROGATE]}, "prompt"),
        ("/v1/completions", {**OK, "steering": [{"add": SURROGATE, "layer": 1}]}, "steering"),
        ("/v1/completions", {**OK, "stop": [SURROGATE]}, "stop"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": SURROGATE}]},
            "messages",
        ),
        ("/v1/completions", {**OK, "seed": 2**64}, "seed"),
        ("/v1/completions", {**OK, "seed": -1}, "seed"),
        ("/v1/completions", {**OK, "temperature": 1e400}, "temperature"),
    ],
)
def test_bad_values_are_400_and_the_connection_stays(
    client: TestClient, route: str, body: dict[str, Any], param: str
) -> None:
    # json.dumps escapes the lone surrogate as \ud800, as a JavaScript client sends it
    content = json.dumps(body).replace("Infinity", "1e400")
    r = client.post(route, content=content, headers={"Content-Type": "application/json"})
    err = error_of(r, 400)
    assert err["param"] is not None and err["param"].startswith(param), err
    assert client.post("/v1/completions", json=OK).status_code == 200


def vector_bytes(lm: actadd.LM, tmp: Path, *, scale: float = 1.0, meta: str | None = None) -> bytes:
    """A valid vector file for ``lm``, its values scaled and its metadata replaced if asked."""
    v = actadd.SteeringVector.from_additions(lm, actadd.get_x_vector("Love", "Hate", 1, 1))
    path = tmp / "made.safetensors"
    v.save(path)
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    tensors = {k: t / t.abs().max() * scale for k, t in tensors.items()}
    if meta is not None:
        header["meta"] = meta
    save_file(tensors, str(path), metadata=header)
    return path.read_bytes()


def test_bad_uploads_are_refused_and_nothing_is_stored(llama: actadd.LM, tmp_path: Path) -> None:
    store = tmp_path / "vectors"
    app = create_app(llama, vectors_dir=store, limits=Limits(max_meta_bytes=4096, max_vectors=2))
    put = {"Content-Type": "application/octet-stream"}
    with TestClient(app, base_url="http://127.0.0.1") as c:
        cases = {
            "overflow": vector_bytes(llama, tmp_path, scale=3e38),  # its norm is inf
            "nested": vector_bytes(llama, tmp_path, meta="[" * 50_000 + "]" * 50_000),
            "deep": vector_bytes(
                llama, tmp_path, meta=json.dumps({"a": [[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]})
            ),
            "huge-meta": vector_bytes(llama, tmp_path, meta=json.dumps({"x": "y" * 10_000})),
            "not-a-dict": vector_bytes(llama, tmp_path, meta="[1, 2]"),
        }
        for name, data in cases.items():
            err = error_of(c.put(f"/v1/vectors/{name}", content=data, headers=put), 400)
            assert err["param"] == "body", (name, err)
        good = vector_bytes(llama, tmp_path)
        for name in ("evil%0A", "evil%0A.x", ".hidden", "a%2Fb", "x" * 65):
            r = c.put(f"/v1/vectors/{name}", content=good, headers=put)
            assert r.status_code in (400, 404), (name, r.text)
        assert c.get("/v1/vectors").json()["data"] == []
        assert sorted(p.name for p in store.iterdir()) == ["conditions"]
        # the server goes on, and the count limit holds
        for name in ("one", "two"):
            assert c.put(f"/v1/vectors/{name}", content=good, headers=put).status_code == 201
        err = error_of(c.put("/v1/vectors/three", content=good, headers=put), 400)
        assert err["code"] == "too_many_vectors"
        assert c.put("/v1/vectors/two", content=good, headers=put).status_code == 200  # replace
        assert sorted(p.name for p in store.glob("*.safetensors")) == [
            "one.safetensors",
            "two.safetensors",
        ]


def test_the_activation_cache_is_bounded_in_bytes(llama: actadd.LM) -> None:
    cache = actadd.activation_cache(llama)
    before = cache.max_bytes
    try:
        cache.clear()
        app = create_app(llama, activation_cache_bytes=64 << 10)
        with TestClient(app, base_url="http://127.0.0.1") as c:
            for i in range(24):
                steer = [{"add": f"{i} steering prompt", "coeff": 2, "layer": 1}]
                body = {"prompt": "x" * 40, "max_tokens": 2, "steering": steer}
                assert c.post("/v1/completions", json=body).status_code == 200
                assert cache.bytes <= 64 << 10
            # an addition longer than the prompt is the request's fault, named
            err = error_of(c.post("/v1/completions", json={**OK, "steering": steer}), 400)
            assert err["param"] == "steering" and "longer prompt" in err["message"]
        assert 0 < len(cache) < 24  # old entries were evicted
    finally:
        cache.max_bytes = before
        cache.clear()


# -- shutdown -----------------------------------------------------------------------------------
SERVER = """
import sys
sys.path.insert(0, {tests!r})
from conftest import build_tiny
from actadd.serve import Limits, serve

serve(build_tiny("llama"), port={port}, shutdown_timeout=1.0, limits=Limits(body_timeout=120),
      log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_sigterm_with_a_half_sent_body_exits_within_the_timeout(tmp_path: Path) -> None:
    port = free_port()
    code = SERVER.format(tests=str(Path(__file__).parent), port=port)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=1)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        with conn:
            conn.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                b"application/json\r\nContent-Length: 100\r\n\r\n" + b'{"prompt": '
            )
            time.sleep(0.5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            took = time.monotonic() - t0
        assert took < 10, f"took {took:.1f} s to exit"  # 1 s graceful + uvicorn's shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
