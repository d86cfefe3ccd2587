"""How actadd shows things: comparison tables (HTML in notebooks, rich elsewhere), sweep tables
and progress bars. The library reports; only this module and the CLI draw."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["comparison_rich_table", "in_notebook", "progress_bars", "show_comparison"]


def comparison_rich_table(table: pd.DataFrame, title: str) -> Table:
    """A rich table of ``comparison_table`` rows; ``title`` is plain text (never markup)."""
    t = Table(title=escape(title), show_lines=True, title_style="bold")
    for col in table.columns:
        t.add_column(str(col), ratio=1)
    for row in table.itertuples(index=False):
        t.add_row(*(escape(str(cell)) for cell in row))
    return t


def show_comparison(
    table: pd.DataFrame, prompt: str, *, title: str | None = None, console: Console | None = None
) -> None:
    """Print ``table`` (``unsteered``/``steered`` columns) under the prompt."""
    heading = title or f"{prompt}…"
    if in_notebook():
        import html

        from IPython.display import HTML, display

        display(HTML(f"<p><b>{html.escape(heading)}</b></p>" + table.to_html(index=False)))
        return
    (console or Console()).print(comparison_rich_table(table, heading))


def in_notebook() -> bool:
    """Whether we run in a Jupyter kernel (where HTML displays)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


@contextmanager
def progress_bars(console: Console | None = None) -> Iterator[None]:
    """Draw the library's progress reports (``actadd.progress``): one rich bar per task on a
    terminal or in a notebook, plain lines (at most one every 5 s per task) when piped; a
    task's status (e.g. "2/2 workers · 3.1 rows/s") follows its bar or line."""
    from actadd import progress as lib

    console = console or Console(stderr=True)
    if console.is_terminal or console.is_jupyter:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
        )
        tasks: dict[str, Any] = {}
        statuses: dict[str, str] = {}

        def draw(task: str, done: int, total: int) -> None:
            if task not in tasks:
                tasks[task] = bars.add_task(task, total=total, status="")
            bars.update(
                tasks[task], completed=done, total=total, status=escape(statuses.get(task, ""))
            )

        with bars, lib.listening(draw, status=statuses.__setitem__):
            yield
        return
    last: dict[str, float] = {}
    notes: dict[str, str] = {}

    def line(task: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - last.get(task, -1e9) >= 5.0:
            last[task] = now
            note = f" · {notes[task]}" if task in notes else ""
            print(f"{task}: {done}/{total}{note}", file=sys.stderr, flush=True)

    with lib.listening(line, status=notes.__setitem__):
        yield


def _pm(mean: float, sem: float, signed: bool = False) -> str:
    """``mean ± sem``; with one sample (no error bar) just the mean."""
    value = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return value if pd.isna(sem) else f"{value} ± {sem:.2f}"


def sweep_table(best: pd.DataFrame, reduced_normal: pd.DataFrame, metric: str) -> Table:
    """The best configurations of a sweep and the unsteered baseline, in 80 columns.

    Columns: layer, coefficient, the metric's mean ± standard error, the paired difference
    from unsteered (same seeds) ± its standard error, the completions' loss, and n. Prompts
    get a column only when there are several.
    """
    prompts = list(dict.fromkeys(reduced_normal["prompts"]))
    several = len(prompts) > 1
    title = f"best configurations by {metric} (Δ: paired vs unsteered, same seeds)"
    if not several:
        title = f"{prompts[0]}…\n{title}"
    t = Table(title=escape(title), title_style="bold")
    if several:
        t.add_column("prompt", max_width=16, no_wrap=True, overflow="ellipsis")
    for col in ("layer", "coeff", metric, f"Δ {metric}", "loss", "n"):
        t.add_column(escape(col), justify="right")
    for r in best.to_dict("records"):
        cells = [
            str(r["layer"]),
            f"{r['coeff']:g}",
            _pm(r[metric], r[f"{metric}_sem"]),
            _pm(r[f"{metric}_diff"], r[f"{metric}_diff_sem"], signed=True),
            f"{r['loss']:.2f}",
            str(r["n"]),
        ]
        t.add_row(*([escape(str(r["prompts"]))] if several else []), *cells)
    for r in reduced_normal.to_dict("records"):
        cells = ["—", "0", _pm(r[metric], r[f"{metric}_sem"]), "", f"{r['loss']:.2f}", str(r["n"])]
        label = "unsteered" if not several else escape(str(r["prompts"]))
        t.add_row(*([label] if several else []), *cells, style="dim")
    if not several:
        t.caption = "last row: unsteered (coeff 0)"
    return t
