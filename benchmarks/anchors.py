"""The same workloads with ``steering-vectors`` and ``repeng`` (``make bench-anchors``).

Runs in ``benchmarks/.venv-anchors`` (made by the Makefile: torch 2.13.0 first, then both
libraries from PyPI, with the transformers version actadd's lock pins), never with actadd
installed. Same model, prompts, token counts and timing protocol as ``run.py``.

What each library can express decides what is measured:

* overhead: neither can add at the prompt's front positions during cached generation
  (steering-vectors' ``min_token_index`` sees 1-token decoding steps; repeng steers all
  positions), so both add one vector on every position at 1 layer and at 4 layers;
* sweep: neither has per-row vectors, so a sweep is a loop of 16 batch-1 generate calls;
* mixed batch: not expressible (no per-row vectors); not run;
* vectors: steering-vectors' ``train_steering_vector`` (mean difference, last token) and
  repeng's ``ControlVector.train`` (PCA of differences: its only method) from the same 256
  pairs at the same 8 sites, vs plain forwards of the decoder stack on the same batches.

Sites: actadd's ``blocks.L.hook_resid_pre`` is the output of decoder layer ``L - 1``, which is
what both libraries call layer ``L - 1``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

console = Console(stderr=True)
WORKLOADS = ("overhead", "sweep", "vectors")


def result(
    library: str,
    workload: str,
    case: str,
    times: C.Timings,
    num: str,
    den: str,
    *,
    kind: str,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "library": library,
        "workload": workload,
        "case": case,
        "ratio": C.ratio(times, num, den),
        "cpu_ratio": C.cpu_ratio(times, num, den),
        "ratio_kind": kind,
        "seconds": {k: times[k] for k in (num, den)},
        "cpu_seconds": {k: times.cpu[k] for k in (num, den)},
        **extra,
    }


class Anchors:
    """The model, plain generation and one 'Love' - 'Hate' direction per layer for both libs."""

    def __init__(self) -> None:
        self.model, self.tok = C.load_plain()
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.layers = self.model.model.layers

    def directions(self, layers: list[int]) -> dict[int, torch.Tensor]:
        """Output of decoder layer ``l`` for 'Love' minus for 'Hate' (one token each)."""
        out: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            hs = {}
            for word in ("Love", "Hate"):
                ids = torch.tensor([self.tok(word, add_special_tokens=False).input_ids])
                hs[word] = self.model(ids, output_hidden_states=True).hidden_states
        for layer in layers:
            out[layer] = hs["Love"][layer + 1][0, -1] - hs["Hate"][layer + 1][0, -1]
        return out

    def greedy(self, prompts: list[str], n: int) -> Any:
        ids, mask = C.left_pad(self.tok, prompts)
        return C.greedy(self.model, self.tok, ids, mask, n)

    # each library's way to steer a call: a context (steering-vectors) or wrap/unwrap (repeng)
    def sv_run(self, dirs: dict[int, torch.Tensor], coeff: float, fn: Any) -> Any:
        from steering_vectors import SteeringVector

        with SteeringVector(dirs, "decoder_block").apply(self.model, multiplier=coeff):
            return fn()

    def repeng_run(self, dirs: dict[int, torch.Tensor], coeff: float, fn: Any) -> Any:
        from repeng import ControlModel, ControlVector

        cm = ControlModel(self.model, list(dirs))
        try:
            vec = ControlVector("llama", {k: v.numpy() for k, v in dirs.items()})
            cm.set_control(vec, coeff)
            return fn()
        finally:
            cm.unwrap()


def bench_overhead(a: Anchors, reps: int, n_new: int) -> list[dict]:
    one = a.directions([C.FRONT_LAYER - 1])
    four = a.directions([layer - 1 for layer in C.ALL_LAYERS])
    rows = []
    for b in (1, 8):
        prompts = C.batch_prompts(b)

        def gen(prompts=prompts) -> Any:
            return a.greedy(prompts, n_new)

        variants = {
            "unsteered": gen,
            "steering-vectors, 1 layer": lambda gen=gen: a.sv_run(one, 5.0, gen),
            "steering-vectors, 4 layers": lambda gen=gen: a.sv_run(four, C.ALL_COEFF, gen),
            "repeng, 1 layer": lambda gen=gen: a.repeng_run(one, 5.0, gen),
            "repeng, 4 layers": lambda gen=gen: a.repeng_run(four, C.ALL_COEFF, gen),
        }
        times = C.interleaved(variants, reps=reps)
        for name in list(variants)[1:]:
            lib, layers = name.split(", ")
            rows.append(
                result(
                    lib,
                    "overhead",
                    f"{layers} (every position), batch {b}",
                    times,
                    "unsteered",
                    name,
                    kind="tokens/s vs unsteered",
                    batch=b,
                    new_tokens=n_new,
                    key=f"overhead-{'1layer' if layers == '1 layer' else '4layers'}-b{b}",
                    tok_s=b * n_new / C.med(times[name]),
                    tok_s_unsteered=b * n_new / C.med(times["unsteered"]),
                )
            )
    return rows


def bench_sweep(a: Anchors, reps: int, n_new: int) -> list[dict]:
    dirs = a.directions([layer - 1 for layer in C.SWEEP_LAYERS])
    configs = [({k: v}, c) for k, v in dirs.items() for c in C.SWEEP_COEFFS]

    def ceiling() -> Any:
        return a.greedy([C.PROMPT] * len(configs), n_new)

    def one(run: Any, d: dict, c: float) -> Any:
        return run(d, c, lambda: a.greedy([C.PROMPT], n_new))

    def loop(run: Any) -> None:
        for d, c in configs:
            one(run, d, c)

    variants = {
        "ceiling": ceiling,
        "steering-vectors": lambda: loop(a.sv_run),
        "repeng": lambda: loop(a.repeng_run),
    }
    warm = {
        "steering-vectors": lambda: one(a.sv_run, *configs[0]),
        "repeng": lambda: one(a.repeng_run, *configs[0]),
    }
    times = C.interleaved(variants, reps=reps, warm=warm)
    return [
        result(
            lib,
            "sweep",
            "16 configs, greedy: loop of 16 calls vs ceiling",
            times,
            lib,
            "ceiling",
            kind="time / ceiling",
            mode="greedy",
            new_tokens=n_new,
            key="sweep-loop-greedy",
        )
        for lib in ("steering-vectors", "repeng")
    ]


def bench_vectors(a: Anchors, reps: int, n_pairs: int) -> list[dict]:
    from repeng import ControlVector, DatasetEntry
    from steering_vectors import train_steering_vector

    pairs = C.contrast_pairs(n_pairs)
    layers = [layer - 1 for layer in C.VECTOR_LAYERS]
    batch = C.VECTOR_BATCH
    texts = [t for p in pairs for t in p]
    batches = []
    for lo in range(0, len(texts), batch):
        rows = [a.tok(t, add_special_tokens=False).input_ids for t in texts[lo : lo + batch]]
        width = max(map(len, rows))
        ids = torch.tensor([r + [a.tok.pad_token_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        batches.append((ids, mask))

    @torch.no_grad()
    def body() -> None:
        for ids, mask in batches:
            a.model.model(input_ids=ids, attention_mask=mask, use_cache=False)

    def sv() -> Any:  # batch_size counts pairs: each batch is two forwards of 16 texts
        return train_steering_vector(a.model, a.tok, pairs, layers=layers, batch_size=batch)

    def rp() -> Any:
        data = [DatasetEntry(p, n) for p, n in pairs]
        return ControlVector.train(a.model, a.tok, data, hidden_layers=layers, batch_size=batch)

    times = C.interleaved({"body": body, "steering-vectors": sv, "repeng": rp}, reps=reps)
    how = {
        "steering-vectors": "train_steering_vector (mean difference, last token)",
        "repeng": "ControlVector.train (pca_diff, last token)",
    }
    return [
        result(
            lib,
            "vectors",
            f"vector from {n_pairs} pairs, 8 layers",
            times,
            lib,
            "body",
            kind="time / plain forwards",
            how=how[lib],
            pairs=n_pairs,
            batch=batch,
            key="vectors",
        )
        for lib in ("steering-vectors", "repeng")
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    p.add_argument("--reps", type=int, help="timed rounds after one warm-up (default as run.py)")
    p.add_argument("--quick", action="store_true", help="small sizes, to check the code runs")
    args = p.parse_args()
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    q = args.quick
    record: dict[str, Any] = {
        "library": "anchors",
        "versions": {k: version(k) for k in ("steering-vectors", "repeng", "transformers")},
        "note": "steering-vectors 0.12.2 declares transformers<5; installed with --no-deps next "
        "to the transformers actadd pins, so all three run on the same transformers",
        "started": C.now(),
        "machine": C.machine(),
        "quick": q,
        "reps": {w: args.reps or C.REPS[w] for w in WORKLOADS},
        "model": "SmolLM2-135M-Instruct (embedded GGUF, float32)",
        "results": [],
    }
    t0 = time.perf_counter()
    with console.status("loading the embedded model"):
        a = Anchors()
    steps = {
        "overhead": lambda: bench_overhead(
            a, record["reps"]["overhead"], 8 if q else C.OVERHEAD_TOKENS
        ),
        "sweep": lambda: bench_sweep(a, record["reps"]["sweep"], 6 if q else C.SWEEP_TOKENS),
        "vectors": lambda: bench_vectors(a, record["reps"]["vectors"], 32 if q else C.VECTOR_PAIRS),
    }
    for name in only:
        with console.status(f"workload: {name}"):
            t = time.perf_counter()
            record["results"].extend(steps[name]())
        console.print(f"{name}: done in {time.perf_counter() - t:.0f} s")
    record["seconds_total"] = round(time.perf_counter() - t0, 1)
    record["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path = C.write_json("anchors", record)
    t = Table(title=", ".join(f"{k} {v}" for k, v in record["versions"].items()))
    for col in ("library", "workload", "case", "ratio", "cpu-time ratio"):
        t.add_column(col, justify="right" if "ratio" in col else "left")
    for r in record["results"]:
        t.add_row(
            r["library"], r["workload"], r["case"], f"{r['ratio']:.3f}", f"{r['cpu_ratio']:.3f}"
        )
    (Console() if sys.stdout.isatty() else Console(width=150)).print(t)
    console.print(f"{record['seconds_total']:.0f} s in all; wrote {path}")


if __name__ == "__main__":
    main()
