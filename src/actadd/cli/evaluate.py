"""``actadd eval``: behaviours × methods from a suite file, one HTML report and a CSV; the
library (``actadd.evaluation``) checks, scores and writes, this prints."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from actadd.cli.common import ModelOpt, console, fail, hint, load, progress


def eval_suite(
    suite: Annotated[str, typer.Argument(help="a suite .yaml file, or a shipped one: quick")],
    out: Annotated[str, typer.Option(help="output directory")] = "eval-report",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="check the suite, run nothing")
    ] = False,
    model: ModelOpt = None,
) -> None:
    """Score several behaviours × methods (ActAdd, mean-diff, PCA, optimised, prompting).

    Writes report.html (plots and tables, self-contained) and results.csv. Needs the tune
    extra.
    """
    import actadd
    from actadd.evaluation import load_suite, run_suite

    try:
        spec = load_suite(suite)
        n = sum(len(b.methods) for b in spec.behaviours)
        console.print(
            f"{escape(suite)}: {len(spec.behaviours)} behaviours, {n} methods, "
            f"{spec.samples} completions per prompt and method",
            highlight=False,
        )
        if dry_run:
            return
        lm = load(model or spec.model)
        with progress():
            res = run_suite(lm, spec)
        written = res.save(out, title=f"actadd eval {suite} on {lm.name}")
    except actadd.ActAddError as e:
        raise fail(e) from e
    for b, r in res.results.groupby("behaviour", sort=False):
        t = Table(title=f"{b}: Δ {r.metric.iloc[0]} (paired vs unsteered) [95% CI]")
        for col in ("method", "Δ", "95% CI", "fluency", "wrong way", "n"):
            t.add_column(col, justify="left" if col == "method" else "right")
        for x in r.to_dict("records"):
            if x["kind"] == "unsteered":
                continue
            flu = x.get("fluency")
            t.add_row(
                escape(str(x["method"])),
                f"{x['delta']:+.3f}",
                f"[{x['ci_low']:+.3f}, {x['ci_high']:+.3f}]",
                "—" if flu is None or flu != flu else f"{flu:.2f}",
                f"{x['anti_steerable']:.0%}",
                str(x["n"]),
                style="dim" if x["kind"] == "control" else None,
            )
        console.print(t)
    console.print(
        f"wrote {', '.join(p.name for p in written)} to {out}/ ({res.seconds:.0f} s)",
        highlight=False,
    )


eval_suite.__doc__ = (eval_suite.__doc__ or "").replace("tune extra", f"tune extra: {hint('tune')}")
