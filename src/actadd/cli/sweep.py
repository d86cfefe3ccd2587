"""``actadd sweep``: layers × coefficients, batched; the sweep library writes, this prints."""

from __future__ import annotations

from typing import Annotated

import typer

from actadd.cli.common import (
    AddOpt,
    ChatOpt,
    FreqPenaltyOpt,
    LocationOpt,
    ModelOpt,
    PadOpt,
    SeedOpt,
    TemperatureOpt,
    TokensOpt,
    TopPOpt,
    check_location,
    console,
    fail,
    hint,
    load,
    numbers,
    progress,
)

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
    out: Annotated[str, typer.Option(help="output directory")] = "results",
    top: Annotated[int, typer.Option(help="best configurations to show")] = 5,
    model: ModelOpt = None,
) -> None:
    """Sweep layers × coefficients, batched; write rows (CSV, Parquet), a summary and plots."""
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
        lm = load(model)
        phrases = [(add, 1.0)] + ([(sub, -1.0)] if sub != "" or pad else [])
        configs = S.make_activation_additions([phrases], layer_list, coeff_list, pad=pad, model=lm)
        console.print(
            f"{len(configs)} configurations × {n} completions + {n} unsteered per prompt, "
            f"{tokens} tokens, batched",
            highlight=False,
        )
        with progress():
            normal, patched = S.sweep_over_prompts(
                lm,
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
            )
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
    console.print(f"wrote {len(written)} files to {out}/ (rows.csv, summary.csv, plots)")
