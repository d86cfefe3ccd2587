"""The serving workload of ``make bench``: ``actadd serve`` under load, against the previous engine.

Servers run as subprocesses on 127.0.0.1 (the embedded model, default options) and are loaded
by ``scripts/loadtest.py``'s functions, every request streamed so that time to first token is
seen as a client sees it. Both servers are up together but loaded one at a time, so they never
compete for the cores:

* ``serving-hol``: time to first token of an 8-token request sent while a 256-token request is
  generating, over its time to first token on an idle server (median of 3 each). Target ≤ 2.
* ``serving-throughput-c{8,16}``: the load test's mixed-steering requests (48, at concurrency 8
  and 16) on this server and on the previous engine (``PREVIOUS``: the commit before continuous
  batching, checked out in a temporary git worktree and run with this venv), twice each in the
  order new, previous, previous, new: requests/s new/old ≥ 1.5 and p99 latency new/old ≤ 0.5
  (means of the two runs).
* ``serving-steering-cost``: the same workload at concurrency 8 unsteered vs steered on this
  server: tokens/s steered / unsteered ≥ 0.9.

The previous engine's rows are skipped (with the reason) when its commit is not in this clone.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import loadtest as L  # noqa: E402

PREVIOUS = "4aa4818"  # main before the continuous-batching engine
REQUESTS, LONG, SHORT = 48, 256, 8


def previous_checkout(tmp: Path) -> Path | None:
    """A worktree of ``PREVIOUS`` (its ``src``), or None when this clone lacks the commit."""
    where = tmp / "previous"
    done = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), PREVIOUS],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        print(f"previous engine skipped: {done.stderr.strip()}", file=sys.stderr)
        return None
    return where / "src"


def remove_checkout(src: Path | None) -> None:
    if src is not None:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(src.parent)],
            capture_output=True,
        )


async def first_token(http: httpx.AsyncClient, max_tokens: int) -> float:
    body = {"prompt": "Hi there,", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    r = await L.run_one(http, "/v1/completions", body)
    assert r.ttft is not None, "no text streamed"
    return r.ttft


async def head_of_line(url: str) -> dict[str, float]:
    """Idle and busy time to first token of a short request (seconds, medians of 3)."""
    async with httpx.AsyncClient(base_url=url, timeout=900) as http:
        await first_token(http, SHORT)  # warm-up
        idle = [await first_token(http, SHORT) for _ in range(3)]
        busy = []
        for _ in range(3):
            long = {  # greedy, this prompt runs to max_tokens on both engines (checked below)
                "prompt": "Once upon a time, in a small village,",
                "max_tokens": LONG,
                "temperature": 0,
                "stream": True,
            }
            started = asyncio.Event()

            async def run_long(
                body: dict[str, Any] = long, started: asyncio.Event = started
            ) -> int:
                chunks = 0
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            chunks += 1
                            started.set()  # the long request is generating
                return chunks

            task = asyncio.create_task(run_long())
            await started.wait()
            await asyncio.sleep(0.5)
            busy.append(await first_token(http, SHORT))
            # a long request that ended early (end of sequence) would make "busy" idle
            assert await task >= LONG // 2, "the long request ended early: pick another prompt"
    return {"idle_s": statistics.median(idle), "busy_s": statistics.median(busy)}


def throughput(url: str, c: int, *, steered: bool = True) -> dict[str, Any]:
    return asyncio.run(
        L.load(url, REQUESTS, c, 24, None, solo=False, stream="all", steered=steered)
    )


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of repeated load runs' requests/s, tokens/s and p99 latency (each run kept)."""
    return {
        "requests": runs[0]["requests"],
        "concurrency": runs[0]["concurrency"],
        "req_per_s": statistics.mean(r["req_per_s"] for r in runs),
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs),
        "latency_s": {"p99": statistics.mean(r["latency_s"]["p99"] for r in runs)},
        "runs": runs,
    }


def row(key: str, case: str, ratio: float, target: str, context: str, **extra: Any) -> dict:
    op, bound = target.split()
    ok = ratio >= float(bound) if op == ">=" else ratio <= float(bound)
    return {
        "workload": "serving",
        "key": key,
        "case": case,
        "ratio": ratio,
        "target": target,
        "ok": ok,
        "ratio_kind": case,
        "context": context,
        **extra,
    }


def bench_serving(quick: bool = False) -> list[dict]:
    global REQUESTS, LONG
    if quick:
        REQUESTS, LONG = 8, 32
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        old_src = None if quick else previous_checkout(Path(tmp))
        procs = []
        try:
            url, proc = L.spawn(log_name="new")
            procs.append(proc)
            urls = {"new": url}
            if old_src is not None:  # both up at once, each idle while the other is loaded
                urls["previous"], proc = L.spawn(pythonpath=str(old_src), log_name="previous")
                procs.append(proc)
            hol = asyncio.run(head_of_line(urls["new"]))
            old_hol = asyncio.run(head_of_line(urls["previous"])) if "previous" in urls else None
            # throughput in alternating order (new, previous, previous, new): the previous
            # engine's runs vary by 20-40 % between runs, so one run of each is not a ratio
            runs: dict[str, dict[int, list[dict[str, Any]]]] = {k: {8: [], 16: []} for k in urls}
            for order in (list(urls), list(urls)[::-1])[: 1 if quick else 2]:
                for c in (8, 16):
                    for engine in order:
                        runs[engine][c].append(throughput(urls[engine], c))
            plain = throughput(urls["new"], 8, steered=False)
        finally:
            for proc in procs:
                L.stop(proc)
            remove_checkout(old_src)
    new = {c: pooled(r) for c, r in runs["new"].items()}
    old = {c: pooled(r) for c, r in runs.get("previous", {}).items()}
    ratio = hol["busy_s"] / hol["idle_s"]
    ctx = f"{hol['busy_s']:.2f} vs {hol['idle_s']:.2f} s"
    if old_hol:
        ctx += f" (previous: {old_hol['busy_s']:.2f} vs {old_hol['idle_s']:.2f} s)"
    rows.append(
        row(
            "serving-hol",
            f"TTFT of {SHORT} tokens behind {LONG} / idle",
            ratio,
            "<= 2",
            ctx,
            new=hol,
            previous=old_hol,
        )
    )
    for c in (8, 16):
        n = new[c]
        if c in old:
            o = old[c]
            rows.append(
                row(
                    f"serving-throughput-c{c}",
                    f"req/s vs previous engine, c={c}",
                    n["req_per_s"] / o["req_per_s"],
                    ">= 1.5",
                    f"{n['req_per_s']:.2f} vs {o['req_per_s']:.2f} req/s",
                    new=n,
                    previous=o,
                )
            )
            rows.append(
                row(
                    f"serving-p99-c{c}",
                    f"p99 latency vs previous engine, c={c}",
                    n["latency_s"]["p99"] / o["latency_s"]["p99"],
                    "<= 0.5",
                    f"{n['latency_s']['p99']:.1f} vs {o['latency_s']['p99']:.1f} s",
                    new=n,
                    previous=o,
                )
            )
        else:
            rows.append(
                {
                    "workload": "serving",
                    "key": f"serving-c{c}",
                    "ok": None,
                    "case": f"this engine alone, c={c}",
                    "ratio": float("nan"),
                    "target": None,
                    "context": f"{n['req_per_s']:.2f} req/s, p99 {n['latency_s']['p99']:.1f} s",
                    "new": n,
                }
            )
    s, u = new[8]["tokens_per_s"], plain["tokens_per_s"]
    rows.append(
        row(
            "serving-steering-cost",
            "tokens/s steered / unsteered, c=8",
            s / u,
            ">= 0.9",
            f"{s:.0f} vs {u:.0f} tok/s",
            steered=new[8],
            unsteered=plain,
        )
    )
    return rows


if __name__ == "__main__":
    t0 = time.perf_counter()
    for r in bench_serving("--quick" in sys.argv):
        print(r["key"], round(r["ratio"], 3), r["target"], r["ok"], r["context"])
    print(f"{time.perf_counter() - t0:.0f} s")
