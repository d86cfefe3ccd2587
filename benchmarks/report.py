"""Print the README's Performance table (markdown) from benchmark results.

Usage: ``python benchmarks/report.py [--actadd FILE] [--anchors FILE]``; by default the newest
``benchmarks/results/actadd-*.json`` and, if there is one, ``anchors-*.json``. Standard library
only, so any Python runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

# What the other libraries cannot run, by result key prefix.
NOT_EXPRESSIBLE = {
    "sweep-greedy": "n/a (no per-row vectors)",
    "sweep-sampled": "n/a (no per-row vectors)",
    "mixed": "n/a (no per-row vectors)",
    "memory": "not run",
}


def newest(prefix: str) -> Path | None:
    files = sorted(RESULTS.glob(f"{prefix}-*.json"))
    return files[-1] if files else None


def context(r: dict[str, Any]) -> str:
    """What a ratio compares, in units (one renderer for run.py's table and this report)."""
    if "context" in r:
        return str(r["context"])
    if "tok_s" in r:
        out = f"{r['tok_s']:.0f} vs {r['tok_s_unsteered']:.0f} tok/s"
        if "hook_share" in r:  # steering-cost rows: the interval and the hooks' own time
            lo, hi = r["ci95"]
            out += f"; 95 % CI {lo:.3f}–{hi:.3f}; hooks {100 * r['hook_share']:.2f} % of the time"
        return out
    if "steered_mb" in r:
        return f"{r['steered_mb']:.0f} vs {r['unsteered_mb']:.0f} MB"
    if "overhead_per_chunk_s" in r:
        ray_s, local_s = r["seconds"]["ray"][0], r["seconds"]["local"][0]
        return (
            f"{r['rows'] / ray_s:.2f} vs {r['rows'] / local_s:.2f} rows/s; Ray overhead "
            f"{r['overhead_per_chunk_s'] * 1000:.0f} ms per chunk of {r['chunk_size']} rows"
        )
    if "speedup_of_batched_over_loop" in r:
        return f"the per-row batch is {r['speedup_of_batched_over_loop']:.1f}× faster"
    secs = [sorted(v)[len(v) // 2] for v in r["seconds"].values()]
    return " vs ".join(f"{s:.2f}" for s in secs) + " s"


def rounds(reps: Any) -> str:
    """``5 (overhead) or 3`` from ``{"overhead": 5, "sweep": 3, ...}`` (or an int)."""
    if isinstance(reps, int):
        return str(reps)
    common = max(set(reps.values()), key=list(reps.values()).count)
    odd = [f"{n} ({w})" for w, n in reps.items() if n != common]
    return " or ".join([*odd, str(common)])


def anchor_cell(key: str, anchors: dict[str, dict[str, Any]]) -> str:
    if key in anchors:
        return f"{anchors[key]['ratio']:.3f}"
    for prefix, text in NOT_EXPRESSIBLE.items():
        if key.startswith(prefix):
            return text
    return "–"


def render(run: dict[str, Any], anchors_run: dict[str, Any] | None) -> str:
    m = run["machine"]
    libs = ["steering-vectors", "repeng"] if anchors_run else []
    by_lib: dict[str, dict[str, dict[str, Any]]] = {lib: {} for lib in libs}
    for r in (anchors_run or {}).get("results", []):
        by_lib[r["library"]][r["key"]] = r
    lines = [
        f"Measured {run['started'][:10]} on {m['cpu']} ({m['cores']} cores), torch {m['torch']} "
        f"with {m['torch_threads']} thread(s), transformers {m['transformers']}, load average "
        f"{m['loadavg_at_start'][0]} at the start; the run took "
        f"{run['seconds_total'] / 60:.1f} min. Each ratio is the median over "
        f"{rounds(run['reps'])} interleaved rounds (after a warm-up) of the per-round ratio."
        + (" **Quick mode: sizes too small to quote.**" if run.get("quick") else ""),
        "",
    ]
    head = [
        "workload",
        "case",
        "ratio",
        "target",
        *(f"{lib} {anchors_run['versions'][lib]}" for lib in libs),
        "context (actadd)",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in run["results"]:
        mark = "" if r.get("ok") is None else (" ✓" if r["ok"] else " ✗")
        target = (r.get("target") or "").replace(">=", "≥").replace("<=", "≤")
        cells = [r["workload"], r["case"], f"{r['ratio']:.3f}{mark}", target]
        cells += [anchor_cell(r["key"], by_lib[lib]) for lib in libs]
        cells.append(context(r))
        lines.append("| " + " | ".join(cells) + " |")
    if anchors_run:
        lines += [
            "",
            "Other libraries (same model, prompts and protocol, "
            f"{anchors_run['started'][:10]}): they add on every position (neither can add at "
            "the prompt's front during cached generation), and sweep as 16 batch-1 calls (no "
            "per-row vectors), shown in the loop row. repeng builds its vector by PCA (its only "
            "method).",
        ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--actadd", type=Path, help="an actadd-*.json (default: the newest)")
    p.add_argument("--anchors", type=Path, help="an anchors-*.json (default: the newest)")
    args = p.parse_args()
    run_path = args.actadd or newest("actadd")
    if run_path is None:
        sys.exit(f"no actadd-*.json in {RESULTS}: run `make bench` first")
    anchors_path = args.anchors or newest("anchors")
    run = json.loads(run_path.read_text())
    anchors_run = json.loads(anchors_path.read_text()) if anchors_path else None
    print(render(run, anchors_run))


if __name__ == "__main__":
    main()
