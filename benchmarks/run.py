"""What steering costs: actadd vs unsteered generation on the embedded model (``make bench``).

Workloads (see benchmarks/README.md for the targets):

1. overhead  - steered greedy generate / unsteered, batch 1 and 8, 32 new tokens
2. sweep     - 16 configurations of one prompt: one per-row batch vs 16 calls vs the ceiling
3. mixed     - per-row different additions in one batch of 8 and 32 vs the batch unsteered
4. vectors   - a mean-difference vector from 256 pairs at 8 layers vs as many plain forwards
5. memory    - peak RSS of steered vs unsteered generation, each in its own subprocess
6. ray       - a 64-configuration sweep locally and on a local 2-worker Ray cluster (in a
               loopback-only network namespace: benchmarks/ray_sweep.py)

Steering's cost (overhead, mixed) is small next to this machine's run-to-run noise (identical
unsteered runs vary by 10-25 %), so those rows carry two measurements: the end-to-end ratio
(median of paired rounds, with a bootstrap 95 % interval) and the share of the steered run spent
inside actadd's hooks (``torch.profiler``, which sees each hook call by name). Such a row meets
its target ``>= x`` when the ratio does, or when noise alone explains the miss: the interval
reaches ``x`` and the hooks take at most ``1 - x`` of the time.

Usage: ``python benchmarks/run.py [--quick] [--only overhead,sweep] [--reps N]``.
Prints a table and writes ``benchmarks/results/actadd-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # GGUF loading bars
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C
from report import context
from serving import bench_serving

import actadd
from actadd import gen_using_activation_additions, get_x_vector, steer

console = Console(stderr=True)
WORKLOADS = ("overhead", "sweep", "mixed", "vectors", "memory", "ray", "serving")


def result(
    workload: str,
    case: str,
    times: C.Timings,
    num: str,
    den: str,
    *,
    kind: str,
    target: str | None,
    share: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One row: the median per-round ratio ``num/den`` (wall and CPU time) against ``target``;
    ``share``: the fraction of the steered run inside actadd's hooks (steering-cost rows)."""
    r = C.ratio(times, num, den)
    lo, hi = C.ratio_ci(times, num, den)
    ok = None
    if target is not None:
        op, bound = target.split()
        ok = r >= float(bound) if op == ">=" else r <= float(bound)
        if not ok and share is not None and op == ">=":  # noise, or a real cost? (see above)
            ok = hi >= float(bound) and share <= 1 - float(bound)
    if share is not None:
        extra["hook_share"] = share
    return {
        "workload": workload,
        "case": case,
        "ratio": r,
        "cpu_ratio": C.cpu_ratio(times, num, den),
        "ratio_kind": kind,
        "target": target,
        "ok": ok,
        "ci95": [lo, hi],
        "seconds": {k: times[k] for k in (num, den)},
        "cpu_seconds": {k: times.cpu[k] for k in (num, den)},
        **extra,
    }


# -- 1. overhead ---------------------------------------------------------------------------------
def x_vectors(layers: tuple[int, ...], coeff: float) -> list[Any]:
    return [a for layer in layers for a in get_x_vector("Love", "Hate", coeff, layer)]


def bench_overhead(lm: actadd.LM, reps: int, n_new: int, batches: tuple[int, ...]) -> list[dict]:
    cases = {
        "front x-vector, 1 layer": (x_vectors((C.FRONT_LAYER,), 5.0), "front"),
        "'all', 4 layers": (x_vectors(C.ALL_LAYERS, C.ALL_COEFF), "all"),
    }
    rows = []
    for b in batches:
        ids, mask = lm.batch_tokens(C.batch_prompts(b))

        def run(adds: list | None, location: str = "front", ids=ids, mask=mask) -> Any:
            if adds is None:
                return C.greedy(lm.model, lm.tokenizer, ids, mask, n_new)
            with steer(lm, adds, addition_location=location):
                return C.greedy(lm.model, lm.tokenizer, ids, mask, n_new)

        variants = {"unsteered": lambda run=run: run(None)}
        for name, (adds, loc) in cases.items():
            variants[name] = lambda run=run, adds=adds, loc=loc: run(adds, loc)
        times = C.interleaved(variants, reps=reps)
        for name in cases:
            share = C.hook_share(variants[name])
            rows.append(
                result(
                    "overhead",
                    f"{name}, batch {b}",
                    times,
                    "unsteered",
                    name,
                    kind="tokens/s vs unsteered",
                    target=">= 0.98",
                    share=share,
                    batch=b,
                    new_tokens=n_new,
                    key=f"overhead-{'1layer' if name.startswith('front') else '4layers'}-b{b}",
                    tok_s=b * n_new / C.med(times[name]),
                    tok_s_unsteered=b * n_new / C.med(times["unsteered"]),
                )
            )
    return rows


# -- 2. sweep ------------------------------------------------------------------------------------
def sweep_configs() -> list[list[Any]]:
    """4 layers x 4 coefficients of 'Love' - 'Hate'."""
    return [x_vectors((layer,), c) for layer in C.SWEEP_LAYERS for c in C.SWEEP_COEFFS]


def bench_sweep(lm: actadd.LM, reps: int, n_new: int) -> list[dict]:
    configs = sweep_configs()
    n = len(configs)
    ids, mask = lm.batch_tokens([C.PROMPT] * n)
    rows = []
    for mode, sampling in (
        ("greedy", {"temperature": 0.0}),
        ("sampled", {"temperature": 1.0, "top_p": 0.3, "freq_penalty": 1.0, "seed": 0}),
    ):

        def batched(sampling=sampling) -> Any:
            return gen_using_activation_additions(
                lm, configs, [C.PROMPT] * n, tokens_to_generate=n_new, **sampling
            )

        def one(adds: list, sampling=sampling) -> Any:
            return gen_using_activation_additions(
                lm, adds, C.PROMPT, tokens_to_generate=n_new, **sampling
            )

        def loop() -> None:
            for adds in configs:
                one(adds)

        def unsteered(sampling=sampling) -> Any:  # the same API and sampler, no additions
            return gen_using_activation_additions(
                lm, None, [C.PROMPT] * n, tokens_to_generate=n_new, **sampling
            )

        def ceiling(sampling=sampling) -> Any:  # plain transformers generate, batch 16
            if sampling["temperature"] == 0:
                return C.greedy(lm.model, lm.tokenizer, ids, mask, n_new)
            with torch.no_grad():  # HF's own sampler, top-p 0.3 (it has no frequency penalty)
                return lm.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=True,
                    top_p=0.3,
                    top_k=None,
                    temperature=1.0,
                    max_new_tokens=n_new,
                    min_new_tokens=n_new,
                    pad_token_id=lm.pad_token_id,
                )

        # greedy: the ceiling is the same computation as actadd's unsteered call, so the loop
        # (slow; sampling would add the same to both sides) runs there; sampled: HF's sampler
        # differs from actadd's, so actadd's own unsteered batch separates the steering's cost
        variants = {"ceiling": ceiling, "batched": batched}
        variants.update({"loop": loop} if mode == "greedy" else {"unsteered": unsteered})
        times = C.interleaved(variants, reps=reps, warm={"loop": lambda: one(configs[0])})
        extra = {}
        if "unsteered" in times:
            extra = {
                "vs_unsteered_same_api": C.ratio(times, "batched", "unsteered"),
                "seconds_unsteered_same_api": times["unsteered"],
            }
        rows.append(
            result(
                "sweep",
                f"16 configs, {mode}: per-row batch vs ceiling",
                times,
                "batched",
                "ceiling",
                kind="time / ceiling",
                target="<= 1.10",
                mode=mode,
                new_tokens=n_new,
                key=f"sweep-{mode}",
                **extra,
            )
        )
        if "loop" in times:
            rows.append(
                result(
                    "sweep",
                    f"16 configs, {mode}: loop of 16 calls vs ceiling",
                    times,
                    "loop",
                    "ceiling",
                    kind="time / ceiling",
                    target=None,
                    mode=mode,
                    new_tokens=n_new,
                    key=f"sweep-loop-{mode}",
                    speedup_of_batched_over_loop=C.ratio(times, "loop", "batched"),
                )
            )
    return rows


# -- 3. mixed batch ------------------------------------------------------------------------------
def bench_mixed(lm: actadd.LM, reps: int, n_new: int, batches: tuple[int, ...]) -> list[dict]:
    configs = sweep_configs()
    rows = []
    for b in batches:
        ids, mask = lm.batch_tokens(C.batch_prompts(b))
        per_row = [configs[(5 * i) % len(configs)] for i in range(b)]  # a different one per row

        def plain(ids=ids, mask=mask) -> Any:
            return C.greedy(lm.model, lm.tokenizer, ids, mask, n_new)

        def mixed(ids=ids, mask=mask, per_row=per_row) -> Any:
            with steer(lm, per_row):
                return C.greedy(lm.model, lm.tokenizer, ids, mask, n_new)

        times = C.interleaved({"unsteered": plain, "mixed": mixed}, reps=reps)
        share = C.hook_share(mixed)
        rows.append(
            result(
                "mixed",
                f"per-row additions, batch {b}",
                times,
                "unsteered",
                "mixed",
                kind="tokens/s vs unsteered",
                target=">= 0.95",
                share=share,
                batch=b,
                new_tokens=n_new,
                key=f"mixed-b{b}",
                tok_s=b * n_new / C.med(times["mixed"]),
                tok_s_unsteered=b * n_new / C.med(times["unsteered"]),
            )
        )
    return rows


# -- 4. vector construction ----------------------------------------------------------------------
def bench_vectors(lm: actadd.LM, reps: int, n_pairs: int) -> list[dict]:
    pairs = C.contrast_pairs(n_pairs)
    layers = list(C.VECTOR_LAYERS)
    batch = C.VECTOR_BATCH
    # the plain side: the same texts in the same batches (pos_1, neg_1, pos_2, ...; right-padded
    # as actadd.contrast does), pre-tokenized
    texts = [t for p in pairs for t in p]
    batches = []
    for lo in range(0, len(texts), batch):
        rows = [lm.token_ids(t) for t in texts[lo : lo + batch]]
        width = max(map(len, rows))
        ids = torch.tensor([r + [lm.pad_token_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        batches.append((ids.to(lm.device), mask.to(lm.device)))

    @torch.no_grad()
    def body() -> None:  # the decoder stack: every layer, no LM head
        for ids, mask in batches:
            lm.base_model(input_ids=ids, attention_mask=mask, use_cache=False)

    def build() -> Any:
        return actadd.mean_diff(lm, pairs, layers, batch_size=batch)

    times = C.interleaved({"body": body, "build": build}, reps=reps)
    return [
        result(
            "vectors",
            f"mean difference, {n_pairs} pairs, 8 layers",
            times,
            "build",
            "body",
            kind="time / plain forwards",
            target="<= 1.10",
            pairs=n_pairs,
            layers=layers,
            key="vectors",
            batch=batch,
            how="actadd.mean_diff(read='last') vs lm.base_model(...) on the same "
            "batches (all decoder layers, no LM head)",
        )
    ]


# -- 5. memory -----------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    status = Path("/proc/self/status")
    if not status.exists():
        raise SystemExit("the memory workload reads /proc (Linux); skip it with --only")
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_worker(mode: str, batch: int, n_new: int) -> None:
    """Subprocess: load, reset the peak-RSS counter, generate (steered or not), report peaks."""
    lm = actadd.load_model()
    ids, mask = lm.batch_tokens(C.batch_prompts(batch))
    adds = x_vectors(C.ALL_LAYERS, C.ALL_COEFF)
    for a in adds:  # both modes resolve the additions before the measured window
        a.injections(lm)
    after_load = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux)
    if mode == "steered":
        with steer(lm, adds, addition_location="all"):
            C.greedy(lm.model, lm.tokenizer, ids, mask, n_new)
    else:
        C.greedy(lm.model, lm.tokenizer, ids, mask, n_new)
    print(
        json.dumps(
            {
                "rss_after_load_kb": after_load,
                "peak_during_generate_kb": _status_kb("VmHWM"),
                "peak_process_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            }
        )
    )


def bench_memory(reps: int, batch: int, n_new: int) -> list[dict]:
    runs: dict[str, list[dict]] = {"unsteered": [], "steered": []}
    for r in range(reps):
        for mode in ("unsteered", "steered") if r % 2 == 0 else ("steered", "unsteered"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--memory-worker",
                    mode,
                    "--batch",
                    str(batch),
                    "--new-tokens",
                    str(n_new),
                ],
                capture_output=True,
                text=True,
                env=os.environ.copy(),
            )
            if out.returncode:
                raise RuntimeError(f"memory worker failed:\n{out.stderr[-2000:]}")
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for key, label, short in (
        ("peak_during_generate_kb", "peak RSS during generate", "generate"),
        ("peak_process_kb", "peak RSS of the process", "process"),
    ):
        s = C.med([x[key] for x in runs["steered"]])
        u = C.med([x[key] for x in runs["unsteered"]])
        rows.append(
            {
                "workload": "memory",
                "key": f"memory-{short}",
                "case": f"{label}, batch {batch}",
                "ratio": s / u,
                "ratio_kind": "steered / unsteered",
                "target": "<= 1.05",
                "ok": s / u <= 1.05,
                "batch": batch,
                "new_tokens": n_new,
                "steered_mb": s / 1024,
                "unsteered_mb": u / 1024,
                "runs": runs,
                "steered_with": "x-vectors at 4 layers, addition_location='all'",
            }
        )
    return rows


# -- 6. ray --------------------------------------------------------------------------------------
def bench_ray(n: int, n_new: int) -> list[dict]:
    """benchmarks/ray_sweep.py in a fresh loopback-only network + PID namespace."""
    import shutil

    if not shutil.which("unshare"):
        console.print("ray: skipped (needs `unshare` for a loopback-only network namespace)")
        return []
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    cmd = [
        "unshare",
        *user,
        "--net",
        "--pid",
        "--mount-proc",
        "--kill-child",
        sys.executable,
        str(Path(__file__).with_name("ray_sweep.py")),
        "--n",
        str(n),
        "--tokens",
        str(n_new),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"ray_sweep.py failed:\n{out.stderr[-3000:]}")
    return ray_rows(json.loads(out.stdout.strip().splitlines()[-1]), n, n_new)


def ray_rows(r: dict[str, Any], n: int, n_new: int) -> list[dict]:
    """The table rows of one ray_sweep.py run: Ray against the local sweep with one torch
    thread (what each worker has) and with every core, and with the cluster's start-up."""
    case = f"{r['configurations']} configs × {n} + {n} unsteered, {n_new} tokens"
    base = {"workload": "ray", "target": None, "ok": None, "ratio_kind": "time / local", **r}
    started = r["ray_sweep_s"] + r["cluster_start_s"] + r["workers_start_s"]
    threads = r["local_torch_threads"]
    return [
        {
            **base,
            "key": "ray-sweep",
            "case": f"{case}: 2 Ray workers vs local, 1 thread each",
            "ratio": r["ray_sweep_s"] / r["local_1thread_s"],
            "seconds": {"ray": [r["ray_sweep_s"]], "local": [r["local_1thread_s"]]},
        },
        {
            **base,
            "key": "ray-sweep-all-cores",
            "case": f"{case}: 2 Ray workers vs local with {threads} threads",
            "ratio": r["ray_sweep_s"] / r["local_s"],
            "seconds": {"ray": [r["ray_sweep_s"]], "local": [r["local_s"]]},
        },
        {
            **base,
            "key": "ray-sweep-with-start",
            "case": f"{case}: Ray with cluster start and model loads vs local, 1 thread",
            "ratio": started / r["local_1thread_s"],
            "seconds": {"ray": [started], "local": [r["local_1thread_s"]]},
        },
    ]


# -- main ----------------------------------------------------------------------------------------
def table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in ("workload", "case", "ratio", "target", "cpu-time ratio", "context"):
        t.add_column(col, justify="right" if "ratio" in col else "left")
    for r in rows:
        ok = r.get("ok")
        mark = "" if ok is None else (" [green]✓[/]" if ok else " [red]✗[/]")
        ctx = context(r)
        cpu = f"{r['cpu_ratio']:.3f}" if "cpu_ratio" in r else ""
        t.add_row(
            r["workload"],
            r["case"],
            ("n/a" if r["ratio"] != r["ratio"] else f"{r['ratio']:.3f}") + mark,
            r["target"] or "",
            cpu,
            ctx,
        )
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    p.add_argument(
        "--reps",
        type=int,
        help="timed rounds after one warm-up (default: 5 for "
        "overhead, whose target is tightest, 3 for the others)",
    )
    p.add_argument("--memory-reps", type=int, default=1, help="subprocess pairs for memory")
    p.add_argument("--quick", action="store_true", help="small sizes, to check the code runs")
    p.add_argument("--memory-worker", choices=("steered", "unsteered"), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--new-tokens", type=int, default=C.NEW_TOKENS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker, args.batch, args.new_tokens)
        return
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    bad = set(only) - set(WORKLOADS)
    if bad:
        p.error(f"unknown workloads {sorted(bad)}; choose from {', '.join(WORKLOADS)}")
    q = args.quick
    record: dict[str, Any] = {
        "library": "actadd",
        "version": actadd.__version__,
        "commit": C.git_commit(),
        "started": C.now(),
        "machine": C.machine(),
        "quick": q,
        "reps": {
            w: args.reps or C.REPS[w] for w in WORKLOADS if w not in ("memory", "ray", "serving")
        },
        "model": "SmolLM2-135M-Instruct (embedded GGUF, float32)",
        "results": [],
    }
    t0 = time.perf_counter()
    with console.status("loading the embedded model"):
        lm = actadd.load_model()
    rows: list[dict] = record["results"]
    reps = record["reps"]
    steps = {
        "overhead": lambda: bench_overhead(
            lm, reps["overhead"], 8 if q else C.OVERHEAD_TOKENS, (1, 8)
        ),
        "sweep": lambda: bench_sweep(lm, reps["sweep"], 6 if q else C.SWEEP_TOKENS),
        "mixed": lambda: bench_mixed(lm, reps["mixed"], 6 if q else C.SWEEP_TOKENS, (8, 32)),
        "vectors": lambda: bench_vectors(lm, reps["vectors"], 32 if q else C.VECTOR_PAIRS),
        "memory": lambda: bench_memory(args.memory_reps, 8, 8 if q else C.NEW_TOKENS),
        "ray": lambda: bench_ray(1 if q else 2, 6 if q else C.SWEEP_TOKENS),
        "serving": lambda: bench_serving(q),
    }
    failed: list[str] = []
    for name in only:
        with console.status(f"workload: {name}"):
            t = time.perf_counter()
            try:
                out = steps[name]()
            except Exception:  # keep the other workloads' results; the run still fails below
                console.print_exception()
                failed.append(name)
                record.setdefault("failed", []).append(name)
                continue
            for r in out:
                r["seconds_for_workload"] = round(time.perf_counter() - t, 1)
            rows.extend(out)
        console.print(f"{name}: done in {time.perf_counter() - t:.0f} s")
    record["seconds_total"] = round(time.perf_counter() - t0, 1)
    record["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    # a Ray-only run gets its own prefix: report.py's Performance table reads the newest full run
    path = C.write_json("ray" if only == ["ray"] else "actadd", record)
    m = record["machine"]
    (Console() if sys.stdout.isatty() else Console(width=150)).print(
        table(
            rows,
            f"actadd {actadd.__version__} ({record['commit']}), torch "
            f"{m['torch']}, {m['cores']} cores, {m['torch_threads']} threads",
        )
    )
    console.print(f"{record['seconds_total']:.0f} s in all; wrote {path}")
    if failed:
        sys.exit(f"workloads that failed (their tracebacks are above): {', '.join(failed)}")


if __name__ == "__main__":
    main()
