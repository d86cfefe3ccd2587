"""What every command shares: the console, errors, option checks, model loading, progress.

Commands import the library inside their bodies, so ``actadd --help`` never loads torch.
User text is escaped before rich prints it (rich reads ``[...]`` as markup).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    import actadd

console = Console()
err_console = Console(stderr=True)

# options several commands share, declared once
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="HF id, local dir or .gguf; default: the embedded model"),
]
AddOpt = Annotated[str, typer.Option(help="prompt whose activations are added")]
SiteOpt = Annotated[str, typer.Option(help="resid_pre, resid_post, attn_out or mlp_out")]
PadOpt = Annotated[bool, typer.Option(help="pad the shorter prompt with spaces")]
SeedOpt = Annotated[int, typer.Option(help="completion i samples with seed+i (paired)")]
TokensOpt = Annotated[int, typer.Option(help="tokens to generate")]
TemperatureOpt = Annotated[float, typer.Option(help="0 is greedy")]
TopPOpt = Annotated[float, typer.Option(help="nucleus sampling")]
FreqPenaltyOpt = Annotated[float, typer.Option(help="OpenAI-style frequency penalty")]
ChatOpt = Annotated[
    bool,
    typer.Option(
        "--chat/--no-chat",
        help="the prompt is a user message in the model's chat template; steering lands on it",
    ),
]
RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray",
        help="run on Ray: local (start one here), auto (join this machine's cluster), "
        "ray://HOST:10001 or HOST:6379; each worker loads the model",
        show_default=False,
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(help="Ray workers (model replicas) \\[default: one per GPU, else per node]"),
]
LocationOpt = Annotated[
    str | None,
    typer.Option(help="front, mid, back or all \\[default: front for prompts, all for vectors]"),
]


def fail(err: Exception) -> typer.Exit:
    """Print an error (escaped: its text may hold brackets) and return the exit to raise."""
    console.print(f"[bold red]error:[/] {escape(str(err))}")
    return typer.Exit(code=2)


def hint(extra: str) -> str:
    """``pip install 'actadd[extra]'``, escaped for rich help texts and messages."""
    from actadd.errors import install_hint

    return escape(install_hint(extra))


# -- options checked before the model loads (a typo should not cost a model load) -------------
def check_location(location: str | None) -> str | None:
    """``None``/``default`` (each addition's own) or a location name."""
    if location in (None, "", "default"):
        return None
    from actadd.positions import check_location as check

    return check(location)


def check_site(site: str) -> str:
    from actadd.errors import SiteError
    from actadd.sites import KINDS

    if site not in KINDS:
        raise SiteError(f"--site must be one of {', '.join(KINDS)}, got {site!r}")
    return site


def numbers(text: str, kind: type[Any], option: str) -> list[Any]:
    """Comma-separated numbers, or an error naming the option."""
    from actadd.errors import ActAddError

    try:
        out = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ActAddError(f"{option} must be comma-separated numbers, got {text!r}") from e
    if not out:
        raise ActAddError(f"{option} is empty: give e.g. 2,4,6")
    return out


# -- progress --------------------------------------------------------------------------------
@contextlib.contextmanager
def progress() -> Iterator[None]:
    """Show the library's progress: bars on a terminal, plain lines when stderr is piped."""
    from actadd.display import progress_bars

    with progress_bars(err_console):
        yield


def check_ray(address: str | None, workers: int | None) -> str | None:
    """``--ray``/``--workers`` checked, and Ray importable, before any model loads."""
    from actadd.errors import ActAddError

    if address is None:
        if workers is not None:
            raise ActAddError("--workers sets the number of Ray workers: give --ray too")
        return None
    from actadd.executor import check_address, require_ray

    address = check_address(address)
    require_ray("--ray")
    if workers is not None and workers < 1:
        raise ActAddError(f"--workers must be >= 1, got {workers}")
    return address


def load(model: str | None, dtype: str | None = None) -> actadd.LM:
    """Load a model (``None``: the embedded default), with progress."""
    import actadd

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with progress():
        return actadd.load_model(model, dtype=dtype)
