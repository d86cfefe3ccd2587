"""``actadd sweep``: layers × coefficients, batched; the sweep library writes, this prints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from actadd.cli.common import (
    AddOpt,
    ChatOpt,
    FreqPenaltyOpt,
    LocationOpt,
    ModelOpt,
    PadOpt,
    RayOpt,
    SeedOpt,
    TemperatureOpt,
    TokensOpt,
    TopPOpt,
    WorkersOpt,
    check_location,
    check_ray,
    console,
    fail,
    hint,
    load,
    numbers,
    progress,
)


def chunk_report(stats: dict[str, Any], store: Path) -> str:
    """What a Ray run did: chunks resumed, run and rerun, and its cost per chunk."""
    text = (
        f"{stats['where']}; {stats['total']} chunks: {stats['resumed']} resumed from "
        f"{store}/, {stats['ran']} run in {stats['seconds']:.1f} s"
    )
    if stats["retried"]:
        text += f" ({stats['retried']} rerun after {stats['worker_losses']} lost worker(s))"
    if stats["ran"]:
        text += f", Ray overhead {stats['overhead_s'] * 1000:.0f} ms per chunk (median)"
    return escape(text)


_METRIC_HELP = "metric (repeatable): wedding, wedding_any, sentiment, words, similarity"


def sweep(
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            help="prompt to complete (repeatable) \\[default: I went up to my friend and said]"
        ),
    ] = None,
    add: AddOpt = " weddings",
    sub: Annotated[
        str, typer.Option(help="prompt whose activations are subtracted; '' for none")
    ] = " ",
    layers: Annotated[str, typer.Option(help="comma-separated layers")] = "2,4,6,8",
    coeffs: Annotated[str, typer.Option(help="comma-separated coefficients")] = "1,2,4,8",
    metric: Annotated[
        list[str] | None, typer.Option(help=f"{_METRIC_HELP} \\[default: wedding]")
    ] = None,
    words: Annotated[
        str | None, typer.Option(help="comma-separated words for --metric words")
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(help=f"passage for --metric similarity (needs {hint('research')})"),
    ] = None,
    n: Annotated[int, typer.Option("--n", help="completions per configuration and baseline")] = 20,
    tokens: TokensOpt = 40,
    seed: SeedOpt = 0,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = 0.3,
    freq_penalty: FreqPenaltyOpt = 1.0,
    location: LocationOpt = None,
    pad: PadOpt = False,
    chat: ChatOpt = False,
    batch_size: Annotated[
        int | None, typer.Option(help="rows per generate call (default: fit memory)")
    ] = None,
    out: Annotated[
        str, typer.Option(help="output directory (with --ray: finished chunks in OUT/chunks)")
    ] = "results",
    top: Annotated[int, typer.Option(help="best configurations to show")] = 5,
    model: ModelOpt = None,
    ray: RayOpt = None,
    workers: WorkersOpt = None,
    chunk_size: Annotated[
        int | None, typer.Option(help="rows per Ray chunk \\[default: --batch-size, else 32]")
    ] = None,
) -> None:
    """Sweep layers × coefficients, batched; write rows (CSV, Parquet), a summary and plots.

    With --ray the rows run in chunks on Ray workers, each holding a model replica; finished
    chunks are kept in OUT/chunks, so running the same command again resumes."""
    import actadd
    from actadd import sweeps as S
    from actadd.display import sweep_table
    from actadd.metrics import make_metric

    prompts = prompt or ["I went up to my friend and said"]
    names = metric or ["wedding"]
    try:
        where = check_location(location)
        word_list = [w.strip() for w in (words or "").split(",") if w.strip()]
        metrics = {m: make_metric(m, words=word_list, target=target) for m in names}
        layer_list = numbers(layers, int, "--layers")
        coeff_list = numbers(coeffs, float, "--coeffs")
        address = check_ray(ray, workers)
        # on Ray only the workers need the weights; --pad tokenizes here, so it loads here too
        lm = load(model) if address is None or pad else None
        phrases = [(add, 1.0)] + ([(sub, -1.0)] if sub != "" or pad else [])
        configs = S.make_activation_additions([phrases], layer_list, coeff_list, pad=pad, model=lm)
        console.print(
            f"{len(configs)} configurations × {n} completions + {n} unsteered per prompt, "
            f"{tokens} tokens, " + (f"in chunks on Ray ({address})" if address else "batched"),
            highlight=False,
        )
        chunked: dict[str, Any] = {}
        if address is not None:
            chunked = {
                "ray": address,
                "workers": workers,
                "store": Path(out) / "chunks",
                "chunk_size": chunk_size,
            }
        with progress():
            normal, patched = S.sweep_over_prompts(
                lm if lm is not None else actadd.ModelSpec(model),
                prompts,
                configs,
                n,
                n,
                tokens,
                seed=seed,
                metrics_dict=metrics,
                temperature=temperature,
                top_p=top_p,
                freq_penalty=freq_penalty,
                addition_location=where,
                batch_size=batch_size,
                chat=chat,
                **chunked,
            )
        if "chunks" in normal.attrs:
            console.print(chunk_report(normal.attrs["chunks"], Path(out) / "chunks"))
        if normal.attrs.get("interrupted"):
            console.print("[yellow]interrupted:[/] writing the rows finished so far")
        written, reduced_n, reduced = S.write_results(normal, patched, out, metrics=list(metrics))
    except actadd.ActAddError as e:
        raise fail(e) from e
    if reduced is None or reduced_n is None:
        console.print(f"wrote {', '.join(map(str, written))}", highlight=False)
        return
    first = next(iter(metrics))
    best = S.best_configurations(reduced, first, k=top)
    console.print(sweep_table(best, reduced_n, first))
    console.print(
        f"wrote {len(written)} files to {out.rstrip('/')}/ (rows.csv, summary.csv, plots)"
    )
