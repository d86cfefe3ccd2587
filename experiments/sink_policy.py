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
    ("gemma", "none", "Gemma 3, no start token"),
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
        cmd = [sys.executable, str(ROOT / "experiments" / "run_all.py"), "--model", model,
               "--prepend-bos", policy, "--only", "1,2,3,4", "--out", str(out)]  # fmt: skip
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


def figure(summary: pd.DataFrame) -> None:
    from matplotlib.figure import Figure

    panels = [
        ("exp1 seed vector: best strict fraction", "topic, ' weddings' − ' '\n(best strict fraction)"),
        ("exp1 phrase vector: best strict fraction", "topic, phrase vector\n(best strict fraction)"),
        ("exp2 best Δ VADER", "sentiment, 'Love' − 'Hate'\n(best paired Δ VADER)"),
        ("exp2 Δ VADER at L6 ×5", "sentiment at layer 6, ×5\n(paired Δ VADER)"),
    ]  # fmt: skip
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=False)
    colors = ["C0", "C1", "C2", "C3", "C4"]
    for ax, (col, title) in zip(axes, panels, strict=True):
        vals = summary[col].astype(float).to_numpy()
        ax.bar(range(len(vals)), vals, color=colors[: len(vals)])
        ax.set_xticks(range(len(vals)), [])
        ax.set_title(title, fontsize=9)
        ax.axhline(0, color="0.5", lw=0.8)
        ax.grid(alpha=0.3, axis="y")
    handles = [
        __import__("matplotlib.patches", fromlist=["Patch"]).Patch(color=c, label=label)
        for c, label in zip(colors, summary.index, strict=False)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle("Sequence-start policy: the seed's experiments 1–2 on SmolLM2-135M and Gemma 3 270M")
    fig.savefig(IMG / "sink_policy.png", dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rerun", action="store_true", help="rerun runs whose numbers exist")
    args = ap.parse_args()
    rows = {}
    for model, policy, label in RUNS:
        rows[label] = headline(run(model, policy, args.rerun))
    summary = pd.DataFrame(rows).T
    OUT.mkdir(parents=True, exist_ok=True)
    summary.to_csv(OUT / "summary.csv")
    (RES / "sink_policy.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    figure(summary)
    with pd.option_context("display.max_colwidth", 40, "display.width", 200):
        print(summary.T.to_string())


if __name__ == "__main__":
    main()
