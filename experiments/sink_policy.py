"""The sequence-start (BOS) policy, measured: the seed's experiments 1–4 on two models under
several policies, side by side.

Each (model, policy) runs ``experiments/run_all.py --only 1,2,3,4`` into
``experiments/results/sink_policy/<model>-<policy>/`` (skipped if its numbers exist; ``--rerun``
redoes them), then this script gathers the headline numbers into
``experiments/results/sink_policy/summary.csv`` and ``docs/results/sink_policy.json`` and
draws ``docs/img/sink_policy.png``.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/sink_policy.py    # ~80 min on 2 cores

Policies: ``none`` (no start token), ``<|endoftext|>`` / ``bos`` (that token, or the
tokenizer's own BOS, prepended to every prompt and addition).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "sink_policy"
IMG, RES = ROOT / "docs" / "img", ROOT / "docs" / "results"
RUNS = [  # (model, policy, label)
    ("embedded", "none", "SmolLM2, no start token"),
    ("embedded", "<|endoftext|>", "SmolLM2, <|endoftext|> prepended"),
    ("embedded", "bos", "SmolLM2, <|im_start|> prepended"),
    ("gemma", "bos", "Gemma 3, <bos> prepended"),
]


def tag(model: str, policy: str) -> str:
    return f"{model}-{policy.strip('<|>')}"


def run(model: str, policy: str, rerun: bool) -> dict[str, Any]:
    out = OUT / tag(model, policy)
    numbers = out / "results" / "numbers.json"
    done = numbers.exists() and all(
        f"time_exp{k}_s" in json.loads(numbers.read_text()) for k in (1, 2, 3, 4)
    )
    if rerun or not done:
        script = str(ROOT / "experiments" / "run_all.py")
        cmd = [sys.executable, script, "--model", model, "--prepend-bos", policy]
        cmd += ["--only", "1,2,3,4", "--out", str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return dict(json.loads(numbers.read_text()))


def headline(n: dict[str, Any]) -> dict[str, Any]:
    """The numbers the comparison rests on, from one run's numbers.json."""
    seed_grid = pd.DataFrame(n["exp1_seed_grid"])  # index: layer, columns: coeff
    seed_strict = pd.DataFrame(n["exp1_seed_grid_strict"])
    phrase_grid = pd.DataFrame(n["exp1_phrase_grid"])
    phrase_strict = pd.DataFrame(n["exp1_phrase_grid_strict"])
    pos = {(r["case"], r["location"]): r["value"] for r in n["exp3_position"]}
    dims = pd.DataFrame(n["exp4_grid"])  # index: fraction, columns: coeff
    return {
        "exp1 seed vector: best wedding fraction": float(seed_grid.max().max()),
        "exp1 seed vector: best strict fraction": float(seed_strict.max().max()),
        "exp1 seed vector: best cell": _cell(seed_strict),
        "exp1 seed vector: loss at best": float(n["exp1_seed_best"]["loss"]),
        "exp1 phrase vector: best wedding fraction": float(phrase_grid.max().max()),
        "exp1 phrase vector: best strict fraction": float(phrase_strict.max().max()),
        "exp1 phrase vector: best cell": _cell(phrase_strict),
        "exp1 unsteered fraction": float(n["exp1_unsteered"]["wedding_fraction"]),
        "exp1 unsteered loss": float(n["exp1_unsteered"]["loss"]),
        "exp2 best Δ VADER": float(n["exp2_best"]["sentiment_diff"]),
        "exp2 best cell": f"L{int(n['exp2_best']['layer'])} ×{n['exp2_best']['coeff']:g}",
        "exp2 loss at best": float(n["exp2_best"]["loss"]),
        "exp2 Δ VADER at L6 ×5": float(n["exp2_layer6_coeff5"]["sentiment_diff"]),
        "exp2 loss at L6 ×5": float(n["exp2_layer6_coeff5"]["loss"]),
        "exp2 cells with Δ > 0.2": int((pd.DataFrame(n["exp2_grid_diff"]) > 0.2).sum().sum()),
        "exp2 unsteered VADER": float(n["exp2_unsteered"]["sentiment"]),
        "exp3 wedding words front/mid/back": "/".join(
            f"{pos[('wedding', loc)]:.2f}" for loc in ("front", "mid", "back")
        ),
        "exp3 VADER front/mid/back (unsteered)": "/".join(
            f"{pos[('sentiment', loc)]:.2f}" for loc in ("front", "mid", "back")
        )
        + f" ({pos[('sentiment', 'unsteered')]:.2f})",
        "exp4 wedding words at 100% / 70% / 50% of dims, best coeff": "/".join(
            f"{float(dims.loc[f].max()):.2f}" for f in ("1.0", "0.7", "0.5")
        ),
        "minutes (exp. 1–4)": round(sum(n[f"time_exp{k}_s"] for k in (1, 2, 3, 4)) / 60, 1),
    }


def _cell(grid: pd.DataFrame) -> str:
    stacked = grid.stack()
    (layer, coeff), value = stacked.idxmax(), stacked.max()
    return f"L{layer} ×{float(coeff):g}" if value > 0 else "—"


def figure(summary: pd.DataFrame, raw: dict[str, dict[str, Any]]) -> None:
    """One bar per run in each panel, its value written on it; the legend below the panels."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    def front_mid_back(n: dict[str, Any], loc: str) -> float:
        pos = {(r["case"], r["location"]): r["value"] for r in n["exp3_position"]}
        return float(pos[("sentiment", loc)] - pos[("sentiment", "unsteered")])

    def col(name: str) -> list[float]:
        return list(summary[name].astype(float))

    panels: list[tuple[str, list[float]]] = [
        (
            "1. topic: ' weddings' − ' ',\nbest fraction with a wedding word (strict)",
            col("exp1 seed vector: best strict fraction"),
        ),
        (
            "1. topic: phrase vector,\nbest fraction (strict)",
            col("exp1 phrase vector: best strict fraction"),
        ),
        (
            "2. sentiment: 'Love' − 'Hate',\nbest paired Δ VADER (18 cells)",
            col("exp2 best Δ VADER"),
        ),
        ("2. sentiment at layer 6, ×5,\npaired Δ VADER", col("exp2 Δ VADER at L6 ×5")),
        ("2. sentiment: cells of 18\nwith Δ VADER > 0.2", col("exp2 cells with Δ > 0.2")),
        ("3. sentiment at the front / mid / back of the prompt\n(F, M, B), VADER − unsteered", []),
    ]
    fig = Figure(figsize=(13, 6.8), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    colors = [f"C{i}" for i in range(len(summary))]
    for ax, (title, vals) in zip(axes, panels, strict=True):
        if vals:
            bars = ax.bar(range(len(vals)), vals, color=colors)
            labels = [f"{v:.2f}" if v % 1 else f"{v:.0f}" for v in vals]
            ax.bar_label(bars, labels=labels, fontsize=8)
        else:  # front, mid, back side by side for each run
            for i, k in enumerate(summary.index):
                for j, (loc, alpha) in enumerate((("front", 1.0), ("mid", 0.6), ("back", 0.3))):
                    v = front_mid_back(raw[k], loc)
                    bar = ax.bar(i + (j - 1) * 0.28, v, 0.26, color=colors[i], alpha=alpha)
                    ax.bar_label(bar, labels=[f"{loc[0].upper()}\n{v:+.2f}"], fontsize=7)
        ax.set_xticks([])
        ax.set_title(title, fontsize=9)
        ax.axhline(0, color="0.5", lw=0.8)
        ax.grid(alpha=0.3, axis="y")
        ax.margins(y=0.22)
    handles = [Patch(color=c, label=label) for c, label in zip(colors, summary.index, strict=True)]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=9)
    fig.suptitle(
        "Sequence-start policy: the seed's experiments on SmolLM2-135M and Gemma 3 270M "
        "(8 completions per cell, 16 per position)",
        fontsize=11,
    )
    fig.savefig(IMG / "sink_policy.png", dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rerun", action="store_true", help="rerun runs whose numbers exist")
    args = ap.parse_args()
    rows, raw = {}, {}
    for model, policy, label in RUNS:
        raw[label] = run(model, policy, args.rerun)
        rows[label] = headline(raw[label])
    summary = pd.DataFrame(rows).T
    OUT.mkdir(parents=True, exist_ok=True)
    summary.to_csv(OUT / "summary.csv")
    (RES / "sink_policy.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    figure(summary, raw)
    with pd.option_context("display.max_colwidth", 40, "display.width", 200):
        print(summary.T.to_string())


if __name__ == "__main__":
    main()
