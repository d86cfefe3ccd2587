#!/usr/bin/env python
"""Bounded load test of `actadd serve` on 127.0.0.1: throughput, latency, and batch = solo.

Builds a mix of distinct requests (completions and chat, greedy and seeded sampling, streamed
and not, n=1/2, different lengths, unsteered, x-vectors at different layers, sites and
locations, and uploaded steering vectors), serves each one alone first (its solo reference),
then sends N requests cycling through the mix with C in flight at once. Reports requests/s,
latency, time to first token and time per output token (p50/p90/p99, from the streamed
requests, as the client sees them), and how many responses differ from their solo reference
(must be 0; the exit code is 1 otherwise).

    python scripts/loadtest.py                       # spawns `actadd serve` (embedded model)
    python scripts/loadtest.py --url http://127.0.0.1:8000 -n 64 -c 16
    python scripts/loadtest.py --no-solo --stream all --unsteered   # timing only

Only loopback addresses are accepted: this is not a tool for loading other people's servers.
``benchmarks/serving.py`` uses the same functions.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

MAX_N, MAX_C = 2000, 64


def mix(
    info: dict[str, Any],
    vectors: list[str],
    max_tokens: int,
    *,
    stream: str = "mixed",
    steered: bool = True,
) -> list[tuple[str, dict]]:
    """Distinct requests; every sampled one has a seed, so its output is reproducible.

    ``stream``: ``mixed`` (about half streamed), ``all`` or ``none``; ``steered=False`` gives
    the same requests without steering (what steering costs inside the server).
    """
    deep = min(10, info["n_layers"] - 1)
    lh = {"add": "Love", "sub": "Hate", "coeff": 5, "layer": min(6, deep)}
    prompts = [
        "I hate you because",
        "The weather today is",
        "My favourite food is",
        "Once upon a time, in a small village,",
        "Science is",
        "He walked into the room",
    ]
    steerings: list[tuple[list[dict], str]] = [
        ([], "front"),
        ([lh], "front"),
        ([{"add": "Anger", "sub": "Calm", "coeff": 4, "layer": deep}], "front"),
        ([{"prompt": "Paris", "coeff": 3, "layer": 4, "site": "resid_post"}], "front"),
        ([lh, {"prompt": " weddings", "coeff": 2, "layer": 2}], "mid"),
    ]
    steerings += [([{"vector": v, "coeff": 4}], "all") for v in vectors]
    out: list[tuple[str, dict]] = []
    for i, (steering, location) in enumerate(steerings):
        for j, prompt in enumerate(prompts[i % 2 :: 2]):
            body: dict[str, Any] = {
                "max_tokens": max_tokens - 4 * ((i + j) % 3),
                "seed": 100 * i + j,
            }
            if steered:
                body |= {"steering": steering, "steering_location": location}
            if (i + j) % 2:
                body.update(temperature=0)
            else:
                body.update(temperature=1, top_p=0.3, frequency_penalty=1, n=1 + j % 2)
            streamed = {"all": True, "none": False, "mixed": (i + j) % 2 == 0}[stream]
            if j == 2:  # chat
                # the user's words must hold the longest addition (the chat rule steers them)
                body["messages"] = [{"role": "user", "content": f"Continue this: {prompt}"}]
                out.append(("/v1/chat/completions", body | {"stream": streamed}))
            else:
                body["prompt"] = prompt
                out.append(("/v1/completions", body | {"stream": streamed}))
    return out


@dataclass
class Result:
    """One response as the client saw it."""

    texts: list[str]
    latency: float  # request sent → last byte
    ttft: float | None = None  # request sent → first text (streamed requests only)
    tokens: int = 0  # completion tokens (usage)

    @property
    def per_token(self) -> float | None:
        """Seconds per output token after the first (streamed requests with ≥ 2 tokens)."""
        if self.ttft is None or self.tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.tokens - 1)


async def run_one(http: httpx.AsyncClient, path: str, body: dict) -> Result:
    t0 = time.perf_counter()
    if not body.get("stream"):
        r = await http.post(path, json=body)
        r.raise_for_status()
        out = r.json()
        texts = [c.get("text", (c.get("message") or {}).get("content")) for c in out["choices"]]
        return Result(texts, time.perf_counter() - t0, None, out["usage"]["completion_tokens"])
    texts = [""] * body.get("n", 1)
    ttft, tokens = None, 0
    body = body | {"stream_options": {"include_usage": True}}
    async with http.stream("POST", path, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk["choices"]:
                part = c["text"] if "text" in c else (c["delta"].get("content") or "")
                if part and ttft is None:
                    ttft = time.perf_counter() - t0
                texts[c["index"]] += part
    return Result(texts, time.perf_counter() - t0, ttft, tokens)


def percentiles(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p90": None, "p99": None}
    s = sorted(xs)
    pick = lambda q: round(s[min(len(s) - 1, int(q * len(s)))], 4)  # noqa: E731
    return {"p50": round(statistics.median(s), 4), "p90": pick(0.9), "p99": pick(0.99)}


async def hammer(
    http: httpx.AsyncClient, requests: list[tuple[str, dict]], n: int, c: int
) -> tuple[list[tuple[int, Result]], float]:
    """``n`` requests cycling through ``requests``, ``c`` in flight; results and wall time."""
    sem = asyncio.Semaphore(c)
    results: list[tuple[int, Result]] = []

    async def worker(k: int) -> None:
        async with sem:
            results.append((k, await run_one(http, *requests[k % len(requests)])))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(n)))
    return results, time.perf_counter() - t0


def summary(results: list[tuple[int, Result]], wall: float, c: int) -> dict[str, Any]:
    rs = [r for _, r in results]
    return {
        "requests": len(rs),
        "concurrency": c,
        "completions": sum(len(r.texts) for r in rs),
        "tokens": sum(r.tokens for r in rs),
        "wall_s": round(wall, 2),
        "req_per_s": round(len(rs) / wall, 3),
        "tokens_per_s": round(sum(r.tokens for r in rs) / wall, 1),
        "latency_s": percentiles([r.latency for r in rs]),
        "ttft_s": percentiles([r.ttft for r in rs if r.ttft is not None]),
        "per_token_s": percentiles([p for r in rs if (p := r.per_token) is not None]),
        "streamed": sum(r.ttft is not None for r in rs),
    }


async def load(
    url: str,
    n: int,
    c: int,
    max_tokens: int,
    key: str | None,
    *,
    solo: bool = True,
    stream: str = "mixed",
    steered: bool = True,
) -> dict[str, Any]:
    """The whole test against a running server; the summary (``differing_from_solo``: -1
    when the solo references were skipped)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=c + 2)
    async with httpx.AsyncClient(base_url=url, timeout=900, headers=headers, limits=limits) as http:
        info = (await http.get("/v1/actadd/info")).json()
        vectors = await upload_vectors(http, info) if steered else []
        requests = mix(info, vectors, max_tokens, stream=stream, steered=steered)
        reference: list[list[str]] = []
        if solo:
            print(
                f"{info['model']}: {len(requests)} distinct requests ({len(vectors)} uploaded "
                "vectors); solo references…",
                file=sys.stderr,
                flush=True,
            )
            for path, body in requests:
                reference.append((await run_one(http, path, body)).texts)
        print(f"load: {n} requests, {c} concurrent…", file=sys.stderr, flush=True)
        results, wall = await hammer(http, requests, n, c)
        for name in vectors:
            await http.delete(f"/v1/vectors/{name}")
    out = summary(results, wall, c)
    differ = [k for k, r in results if solo and r.texts != reference[k % len(requests)]]
    out["differing_from_solo"] = len(differ) if solo else -1
    if differ:
        print(f"requests differing from their solo reference: {differ[:20]}", file=sys.stderr)
    return out


async def upload_vectors(http: httpx.AsyncClient, info: dict[str, Any]) -> list[str]:
    """Two random-direction vectors of norm 8 (no model needed here), uploaded under test names."""
    import torch

    from actadd.vectors import SteeringVector

    names = []
    g = torch.Generator().manual_seed(0)
    for k, layer in enumerate((3, min(8, info["n_layers"] - 1))):
        d = torch.randn(info["d_model"], generator=g)
        v = SteeringVector({layer: 8 * d / d.norm()}, meta={"method": "random", "loadtest": True})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "v.safetensors"
            v.save(path)
            name = f"loadtest-{k}"
            r = await http.put(f"/v1/vectors/{name}", content=path.read_bytes())
            r.raise_for_status()
        names.append(name)
    return names


def loopback(url: str) -> str:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"refusing {url}: the load test only talks to 127.0.0.1/localhost")
    return url.rstrip("/")


def spawn(
    args: list[str] | None = None, *, pythonpath: str | None = None, log_name: str = "server"
) -> tuple[str, subprocess.Popen[bytes]]:
    """``actadd serve`` on a free loopback port (``pythonpath``: another checkout's ``src``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    log = open(Path(tempfile.gettempdir()) / f"actadd-loadtest-{log_name}.log", "wb")  # noqa: SIM115
    cmd = [sys.executable, "-m", "actadd", "serve", "--port", str(port), *(args or [])]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"actadd serve exited; see {log.name}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("actadd serve did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server on 127.0.0.1 (default: spawn one)")
    ap.add_argument("-n", "--requests", type=int, default=48, help=f"requests (≤ {MAX_N})")
    ap.add_argument("-c", "--concurrency", type=int, default=8, help=f"in flight (≤ {MAX_C})")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--api-key", default=os.environ.get("ACTADD_API_KEY"))
    ap.add_argument("--no-solo", action="store_true", help="skip the solo references")
    ap.add_argument("--stream", choices=("mixed", "all", "none"), default="mixed")
    ap.add_argument("--unsteered", action="store_true", help="the same requests, no steering")
    args = ap.parse_args()
    if not (1 <= args.requests <= MAX_N and 1 <= args.concurrency <= MAX_C):
        raise SystemExit(f"need 1 ≤ n ≤ {MAX_N} and 1 ≤ c ≤ {MAX_C}")
    proc = None
    url = loopback(args.url) if args.url else None
    if url is None:
        url, proc = spawn()
    try:
        out = asyncio.run(
            load(
                url,
                args.requests,
                args.concurrency,
                args.max_tokens,
                args.api_key,
                solo=not args.no_solo,
                stream=args.stream,
                steered=not args.unsteered,
            )
        )
    finally:
        if proc is not None:
            stop(proc)
    print(json.dumps(out, indent=2))
    raise SystemExit(1 if out["differing_from_solo"] > 0 else 0)


if __name__ == "__main__":
    main()
