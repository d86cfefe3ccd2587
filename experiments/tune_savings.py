"""What the batched, fluency-gated, halving search of ``actadd tune`` saves over a naive grid.

Runs, in one process on the embedded model, one after the other:

1. ``actadd tune`` as the README shows it (Love − Hate, sentiment, budget 1.25), through the
   CLI, keeping its printed output (``tune_cli_output.txt``) and its report directory;
2. the naive grid on the same tune prompts: every configuration of the same grid scored with
   every sample (8 completions per tune prompt), one ``generate`` call per configuration, and
   its fluency measured alone, with no gate and no halving.

It writes ``experiments/results/tune_savings.json``: wall times, completions generated, the
load average around each phase, and whether the naive grid's best configuration within the
budget is the one the search chose.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/tune_savings.py
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import pandas as pd
import torch
from typer.testing import CliRunner

import actadd
import actadd.cli.common
from actadd.cli import app
from actadd.datasets import load_texts
from actadd.heldout import split_prompts
from actadd.metrics import make_metric
from actadd.sources import Source
from actadd.tune_result import TuneResult
from actadd.tuning import fluency_scores

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
OUT = RESULTS / "tune-love-hate"
COMMAND = (
    "actadd tune --add Love --sub Hate --prompts sentiment --metric sentiment "
    "--layers 2,4,6,8,12,16 --coeffs 0.25,0.5,1,2,5 --budget 1.25 --samples 8 "
    "--test-samples 8 --reference 6:5 --instruction Love --instruction 'Write lovingly:' "
    f"--seed 0 --out {OUT}"
)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def main() -> None:
    torch.set_num_threads(1)
    os.environ["COLUMNS"] = "100"  # the width the README shows
    lm = actadd.load_model()
    actadd.cli.common.load = lambda model, dtype=None: lm  # type: ignore[assignment]
    import actadd.cli.tune as cli_tune

    cli_tune.load = lambda model, dtype=None: lm  # type: ignore[assignment]
    record: dict[str, object] = {"command": COMMAND, "threads": torch.get_num_threads()}

    # 1. the search, as the README runs it
    record["load_before_search"] = load_average()
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, shlex.split(COMMAND)[1:], terminal_width=100)
    record["search_cli_seconds"] = round(time.perf_counter() - t0, 1)
    record["load_after_search"] = load_average()
    if result.exit_code != 0:
        raise SystemExit(f"actadd tune failed:\n{result.output}\n{result.exception!r}")
    (RESULTS / "tune_cli_output.txt").write_text(result.output)
    res = TuneResult.load(OUT)
    record["search_stats"] = res.stats
    record["chosen"] = {k: res.chosen[k] for k in ("layer", "coeff", "location", "fluency")}

    # 2. the naive grid: every configuration, every sample, one generate call each
    s = res.settings
    tune_prompts, _ = split_prompts(actadd.datasets.load_prompts("sentiment"), seed=s.seed)
    assert tune_prompts == res.split["tune"]
    metric = make_metric("sentiment")
    texts = load_texts("neutral")
    src = Source.parse("pair:Love:Hate").prepare(lm, list(s.layers or ()))
    rows = []
    record["load_before_naive"] = load_average()
    t0 = time.perf_counter()
    base = actadd.gen_using_activation_additions(
        lm,
        [],
        [p for p in tune_prompts for _ in range(s.samples)],
        tokens_to_generate=s.tokens_to_generate,
        seeds=[s.seed + i for _ in tune_prompts for i in range(s.samples)],
        temperature=s.temperature,
        top_p=s.top_p,
        freq_penalty=s.freq_penalty,
    )
    base_value = metric(base).to_numpy()
    completions = len(base)
    for layer in s.layers or ():
        for c in s.coeffs or ():
            adds = src.additions(layer, c)
            flu = fluency_scores(lm, [adds], texts)[0]
            df = actadd.gen_using_activation_additions(
                lm,
                adds,
                [p for p in tune_prompts for _ in range(s.samples)],
                tokens_to_generate=s.tokens_to_generate,
                seeds=[s.seed + i for _ in tune_prompts for i in range(s.samples)],
                temperature=s.temperature,
                top_p=s.top_p,
                freq_penalty=s.freq_penalty,
            )
            completions += len(df)
            delta = float((metric(df).to_numpy() - base_value).mean())
            rows.append({"layer": layer, "coeff": c, "fluency": flu, "delta": delta})
    record["naive_seconds"] = round(time.perf_counter() - t0, 1)
    record["load_after_naive"] = load_average()
    record["naive_completions"] = completions
    grid = pd.DataFrame(rows)
    grid.to_csv(RESULTS / "tune_naive_grid.csv", index=False)
    within = grid[grid.fluency <= s.limit].sort_values("delta", ascending=False)
    record["naive_best_within_budget"] = within.iloc[0].to_dict() if len(within) else None
    record["naive_rank_of_search_choice"] = (
        int(
            (within.reset_index(drop=True).index[
                (within.layer.to_numpy() == res.chosen["layer"])
                & (within.coeff.to_numpy() == res.chosen["coeff"])
            ])[0]
        )
        + 1
        if len(within)
        else None
    )  # fmt: skip
    record["naive_search_choice_delta"] = float(
        grid[(grid.layer == res.chosen["layer"]) & (grid.coeff == res.chosen["coeff"])].delta.iloc[0]
    )
    # per-row seeds: the search's fully measured configurations are the same completions
    done = res.trials[res.trials.status == "complete"]
    merged = done.merge(grid, on=["layer", "coeff"], suffixes=("", "_naive"))
    record["search_equals_naive_on_finalists"] = bool(
        ((merged.delta - merged.delta_naive).abs() < 1e-9).all()
    )
    (RESULTS / "tune_savings.json").write_text(json.dumps(record, indent=1, default=str))
    print(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
