"""The ``actadd`` command line (typer + rich). Library code logs; only the CLI prints.

Each command lives in its own module and imports the library inside its body, so
``actadd --help`` answers without loading torch.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from actadd.cli import cache, compare, condition, evaluate, serve, sweep, tune, vector

app = typer.Typer(
    help="Steer language models by adding activation vectors (ActAdd).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log what is hooked")] = False,
) -> None:
    """Steer language models by adding activation vectors (ActAdd)."""
    logging.getLogger("actadd").setLevel(logging.INFO if verbose else logging.WARNING)


app.command()(compare.compare)
app.command()(sweep.sweep)
app.command()(serve.serve)
app.command()(tune.tune)
app.command("eval")(evaluate.eval_suite)
app.add_typer(vector.app, name="vector")
app.add_typer(condition.app, name="condition")
app.add_typer(cache.app, name="cache")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


__all__ = ["app", "main"]
