"""The ``actadd`` command line (typer + rich). Library code logs; only this module prints."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    import actadd

app = typer.Typer(
    help="Steer language models by adding activation vectors (ActAdd).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log what is hooked")] = False,
) -> None:
    """Steer language models by adding activation vectors (ActAdd)."""
    logging.getLogger("actadd").setLevel(logging.INFO if verbose else logging.WARNING)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner while something slow runs (loading, generating)."""
    with console.status(message, spinner="dots"):
        yield


def load(model: str | None, dtype: str | None = None) -> actadd.LM:
    """Load a model with a spinner; ``None`` is the embedded default."""
    import actadd

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # the spinner replaces transformers' own tqdm bar (GGUF de-quantisation)
    with status(f"loading {model or 'the embedded SmolLM2-135M-Instruct'}…"), \
            contextlib.redirect_stderr(io.StringIO()):  # fmt: skip
        return actadd.load_model(model, dtype=dtype)


def fail(err: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {err}")
    return typer.Exit(code=2)


ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="HF id, local dir or .gguf; default embedded")
]


@app.command()
def compare(
    prompt: Annotated[str, typer.Option(help="the prompt to complete")] = "I hate you because",
    add: Annotated[str, typer.Option(help="prompt whose activations are added")] = "Love",
    sub: Annotated[
        str | None, typer.Option(help="prompt whose activations are subtracted (x-vector)")
    ] = "Hate",
    layer: Annotated[int, typer.Option(help="layer (blocks.L.hook_resid_pre)")] = 6,
    site: Annotated[
        str, typer.Option(help="resid_pre, resid_post, attn_out or mlp_out")
    ] = "resid_pre",
    coeff: Annotated[float, typer.Option(help="coefficient")] = 5.0,
    n: Annotated[int, typer.Option("--n", help="number of comparisons")] = 3,
    seed: Annotated[int, typer.Option(help="row i samples with seed+i")] = 0,
    tokens: Annotated[int, typer.Option(help="tokens to generate")] = 40,
    temperature: Annotated[float, typer.Option(help="0 is greedy")] = 1.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling")] = 0.3,
    freq_penalty: Annotated[float, typer.Option(help="OpenAI-style frequency penalty")] = 1.0,
    location: Annotated[str, typer.Option(help="front, mid, back or all")] = "front",
    pad: Annotated[bool, typer.Option(help="pad the shorter prompt with spaces")] = False,
    model: ModelOpt = None,
) -> None:
    """Steered and unsteered completions side by side."""
    import actadd
    from actadd.generation import comparison_table

    try:
        lm = load(model)
        act_name = actadd.get_act_name(site, layer)
        if sub is None:
            adds = [actadd.ActivationAddition(coeff, act_name, prompt=add)]
        else:
            adds = list(
                actadd.get_x_vector(
                    add, sub, coeff, act_name, model=lm,
                    pad_method="tokens_right" if pad else None,
                    custom_pad_id=lm.to_single_token(" ") if pad else None,
                )
            )  # fmt: skip
        with status(f"generating {2 * n} completions of {tokens} tokens…"):
            df = actadd.compare(
                prompt, lm, tokens, adds, n, seed, temperature, freq_penalty, top_p,
                addition_location=location,
            )  # fmt: skip
    except actadd.ActAddError as e:
        raise fail(e) from e
    what = f"{add!r}" + (f" − {sub!r}" if sub else "")
    table = Table(
        title=f"[bold]{prompt}[/]…  steering: {coeff:g} × ({what}) at {act_name}, {location}",
        show_lines=True,
    )
    table.add_column("unsteered", ratio=1)
    table.add_column("steered", ratio=1)
    for a, b in comparison_table(df).itertuples(index=False):
        table.add_row(a, b)
    console.print(table)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
