"""``actadd condition``: fit a condition (CAST) that tells two prompt sets apart."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from actadd.cli.common import ModelOpt, console, fail, load, numbers, progress

app = typer.Typer(help="Fit and inspect conditions for conditional steering.", no_args_is_help=True)


@app.command("fit")
def fit(
    pos: Annotated[
        str, typer.Option(help="prompts to detect: a shipped set (legal) or a .txt/.jsonl file")
    ],
    neg: Annotated[str, typer.Option(help="the other prompts: a shipped set (other) or a file")],
    out: Annotated[str, typer.Option(help="where to save the condition (.safetensors)")],
    layers: Annotated[
        str | None, typer.Option(help="candidate layers, e.g. 2,4,6 (default: all but 0)")
    ] = None,
    method: Annotated[str, typer.Option(help="mean_diff or pca")] = "mean_diff",
    test_fraction: Annotated[float, typer.Option(help="share of each set held out")] = 0.3,
    seed: Annotated[int, typer.Option(help="shuffles the train/test split")] = 0,
    name: Annotated[str | None, typer.Option(help="what the condition detects")] = None,
    model: ModelOpt = None,
) -> None:
    """Search layer × threshold × comparator for the best F1 on a training split; print the
    held-out precision, recall and F1 per layer; save the best condition."""
    import actadd
    from actadd.conditions import Condition, load_prompts

    try:
        positives, negatives = load_prompts(pos, "--pos"), load_prompts(neg, "--neg")
        layer_list = None if layers is None else numbers(layers, int, "--layers")
        lm = load(model)
        with progress():
            res = Condition.fit(
                lm,
                positives,
                negatives,
                layers=layer_list,
                method=method,
                test_fraction=test_fraction,
                seed=seed,
                name=name or pos,
            )
        res.condition.save(out)
    except actadd.ActAddError as e:
        raise fail(e) from e
    table = Table(title=escape(f"{name or pos} vs {neg}: held-out scores per layer"))
    for col in ("layer", "threshold", "train F1", "precision", "recall", "F1"):
        table.add_column(col, justify="right")
    best = res.condition.site
    for r in res.table.itertuples():
        mark = " ◀" if r.site == best else ""
        table.add_row(
            f"{r.layer}{mark}",
            f"{r.comparator} {r.threshold:.4f}",
            f"{r.f1_train:.2f}",
            f"{r.precision:.2f}",
            f"{r.recall:.2f}",
            f"{r.f1:.2f}",
        )
    console.print(table)
    s = res.scores
    console.print(
        f"best: {escape(res.condition.describe())}; held out: precision {s['precision']:.2f}, "
        f"recall {s['recall']:.2f}, F1 {s['f1']:.2f}. Wrote {out}",
        highlight=False,
    )
