#!/usr/bin/env python
"""Bounded load test of `actadd serve` on 127.0.0.1: throughput, latency, and batch = solo.

Builds a mix of distinct requests (completions and chat, greedy and seeded sampling, streamed
and not, n=1/2, different lengths, unsteered, x-vectors at different layers and sites, single
prompts, and uploaded steering vectors), serves each one alone first (its solo reference), then
sends N requests cycling through the mix with C in flight at once. Reports requests/s,
p50/p99 latency, and how many responses differ from their solo reference (must be 0; the exit
code is 1 otherwise).

    python scripts/loadtest.py                       # spawns `actadd serve` (embedded model)
    python scripts/loadtest.py --url http://127.0.0.1:8000 -n 64 -c 16

Only loopback addresses are accepted: this is not a tool for loading other people's servers.
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
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

MAX_N, MAX_C = 2000, 64


def mix(info: dict[str, Any], vectors: list[str], max_tokens: int) -> list[tuple[str, dict]]:
    """Distinct requests; every sampled one has a seed, so its output is reproducible."""
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
                "max_tokens": max_tokens - 4 * ((i + j) % 3), "steering": steering,
                "steering_location": location, "seed": 100 * i + j,
            }  # fmt: skip
            if (i + j) % 2:
                body.update(temperature=0)
            else:
                body.update(temperature=1, top_p=0.3, frequency_penalty=1, n=1 + j % 2)
            if j == 2:  # chat
                body["messages"] = [{"role": "user", "content": prompt}]
                out.append(("/v1/chat/completions", body | {"stream": bool(i % 2)}))
            else:
                body["prompt"] = prompt
                out.append(("/v1/completions", body | {"stream": bool((i + j) % 3 == 0)}))
    return out


async def run_one(http: httpx.AsyncClient, path: str, body: dict) -> tuple[list[str], float]:
    """The texts of every choice, and the latency in seconds."""
    t0 = time.perf_counter()
    if not body.get("stream"):
        r = await http.post(path, json=body)
        r.raise_for_status()
        choices = r.json()["choices"]
        texts = [c.get("text", (c.get("message") or {}).get("content")) for c in choices]
        return texts, time.perf_counter() - t0
    texts = [""] * body.get("n", 1)
    async with http.stream("POST", path, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for c in chunk["choices"]:
                texts[c["index"]] += c["text"] if "text" in c else c["delta"].get("content") or ""
    return texts, time.perf_counter() - t0


async def load(url: str, n: int, c: int, max_tokens: int, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=c + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers, limits=limits) as http:
        info = (await http.get("/v1/actadd/info")).json()
        vectors = await upload_vectors(http, info)
        requests = mix(info, vectors, max_tokens)
        print(f"{info['model']}: {len(requests)} distinct requests "
              f"({len(vectors)} uploaded vectors); solo references…", flush=True)  # fmt: skip
        solo = []
        t0 = time.perf_counter()
        for path, body in requests:
            solo.append((await run_one(http, path, body))[0])
        solo_s = time.perf_counter() - t0
        stats0 = (await http.get("/v1/actadd/info")).json()["engine"]

        sem = asyncio.Semaphore(c)
        results: list[tuple[int, list[str], float]] = []

        async def worker(k: int) -> None:
            async with sem:
                path, body = requests[k % len(requests)]
                texts, dt = await run_one(http, path, body)
                results.append((k, texts, dt))

        print(f"load: {n} requests, {c} concurrent…", flush=True)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(n)))
        wall = time.perf_counter() - t0
        stats1 = (await http.get("/v1/actadd/info")).json()["engine"]
        for name in vectors:
            await http.delete(f"/v1/vectors/{name}")

    lat = sorted(dt for _, _, dt in results)
    differ = [k for k, texts, _ in results if texts != solo[k % len(requests)]]
    rows = sum(requests[k % len(requests)][1].get("n", 1) for k in range(n))
    batches = stats1["batches"] - stats0["batches"]
    print(json.dumps({
        "requests": n, "concurrency": c, "completions": rows, "wall_s": round(wall, 2),
        "req_per_s": round(n / wall, 3),
        "p50_latency_s": round(statistics.median(lat), 2),
        "p99_latency_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
        "batches": batches, "rows_per_batch": round((stats1["rows"] - stats0["rows"]) / batches, 2),
        "largest_batch": stats1["max_rows"],
        "solo_req_per_s": round(len(requests) / solo_s, 3),
        "differing_from_solo": len(differ),
    }, indent=2))  # fmt: skip
    if differ:
        print(f"requests differing from their solo reference: {differ[:20]}", file=sys.stderr)
    return 1 if differ else 0


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


def spawn() -> tuple[str, subprocess.Popen[bytes]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    log = open(Path(tempfile.gettempdir()) / "actadd-loadtest-server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "actadd", "serve", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"actadd serve exited; see {log.name}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("actadd serve did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server on 127.0.0.1 (default: spawn one)")
    ap.add_argument("-n", "--requests", type=int, default=48, help=f"requests (≤ {MAX_N})")
    ap.add_argument("-c", "--concurrency", type=int, default=8, help=f"in flight (≤ {MAX_C})")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--api-key", default=os.environ.get("ACTADD_API_KEY"))
    args = ap.parse_args()
    if not (1 <= args.requests <= MAX_N and 1 <= args.concurrency <= MAX_C):
        raise SystemExit(f"need 1 ≤ n ≤ {MAX_N} and 1 ≤ c ≤ {MAX_C}")
    proc = None
    url = loopback(args.url) if args.url else None
    if url is None:
        url, proc = spawn()
    try:
        code = asyncio.run(load(url, args.requests, args.concurrency, args.max_tokens,
                                args.api_key))  # fmt: skip
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
