"""``actadd tune``: search layer × coefficient within a fluency budget, then test on held-out
prompts; the library (``actadd.tune``) searches and writes, this prints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from actadd.cli.common import (
    FreqPenaltyOpt,
    ModelOpt,
    SeedOpt,
    TemperatureOpt,
    TokensOpt,
    TopPOpt,
    console,
    fail,
    hint,
    load,
    numbers,
    progress,
)

if TYPE_CHECKING:
    import pandas as pd

    from actadd.sources import Source
    from actadd.tune_result import TuneResult, TuneSettings


def tune(
    source: Annotated[
        list[str] | None,
        typer.Option(
            help="steering source (repeatable): pair:ADD:SUB, pair+pad:ADD:SUB, mean_diff:DATA, "
            "pca:DATA, optimized:DATA, vector:FILE"
        ),
    ] = None,
    add: Annotated[str | None, typer.Option(help="shortcut for --source pair:ADD:SUB")] = None,
    sub: Annotated[str, typer.Option(help="with --add: the prompt subtracted")] = "",
    prompts: Annotated[
        str | None,
        typer.Option(help="prompt list: shipped name (sentiment, weddings) or .txt/.jsonl file"),
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="a prompt (repeatable)")] = None,
    metric: Annotated[
        str, typer.Option(help="wedding, wedding_any, sentiment, words, similarity")
    ] = "sentiment",
    words: Annotated[str | None, typer.Option(help="comma-separated, for --metric words")] = None,
    target: Annotated[str | None, typer.Option(help="passage, for --metric similarity")] = None,
    direction: Annotated[str, typer.Option(help="maximize or minimize the metric")] = "maximize",
    layers: Annotated[
        str | None, typer.Option(help="comma-separated layers \\[default: six spread]")
    ] = None,
    coeffs: Annotated[
        str | None,
        typer.Option(help="comma-separated \\[default: 1-12 for pairs, norms 4-64 for vectors]"),
    ] = None,
    locations: Annotated[
        str | None, typer.Option(help="comma-separated: front, mid, back, all \\[default: own]")
    ] = None,
    fluency: Annotated[
        str, typer.Option(help="ppl (perplexity ratio of neutral text) or kl (next-token KL)")
    ] = "ppl",
    budget: Annotated[
        float | None, typer.Option(help="largest fluency cost \\[default: 1.25 ppl, 0.25 kl]")
    ] = None,
    neutral: Annotated[
        str, typer.Option(help="neutral texts for fluency: shipped name or file")
    ] = "neutral",
    samples: Annotated[int, typer.Option(help="completions per tune prompt, finalists")] = 8,
    min_samples: Annotated[int, typer.Option(help="completions per prompt, first round")] = 2,
    eta: Annotated[int, typer.Option(help="halving factor between rounds")] = 2,
    trials: Annotated[
        int | None, typer.Option(help="configurations to try (TPE) \\[default: the whole grid]")
    ] = None,
    batch_trials: Annotated[int, typer.Option(help="configurations per TPE batch")] = 8,
    test_fraction: Annotated[float, typer.Option(help="share of prompts held out")] = 0.5,
    test_samples: Annotated[int, typer.Option(help="completions per test prompt")] = 8,
    controls: Annotated[int, typer.Option(help="random directions in the control")] = 4,
    instruction: Annotated[
        list[str] | None,
        typer.Option(help="prompting baseline prefix (repeatable) \\[default: the pair's ADD]"),
    ] = None,
    no_instructions: Annotated[
        bool, typer.Option("--no-instructions", help="no prompting baseline")
    ] = False,
    reference: Annotated[
        list[str] | None,
        typer.Option(help="also test LAYER:COEFF[:LOCATION] of the chosen source (repeatable)"),
    ] = None,
    tokens: TokensOpt = 40,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = 0.3,
    freq_penalty: FreqPenaltyOpt = 1.0,
    seed: SeedOpt = 0,
    batch_size: Annotated[
        int | None, typer.Option(help="rows per generate call (default: fit memory)")
    ] = None,
    out: Annotated[str, typer.Option(help="output directory")] = "tune-results",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="check the options, print the plan, generate nothing")
    ] = False,
    model: ModelOpt = None,
) -> None:
    """Find a layer and coefficient that steer within a fluency budget; test them honestly.

    Needs the tune extra.
    """
    import actadd
    from actadd.datasets import load_prompts
    from actadd.errors import require
    from actadd.sources import as_source
    from actadd.tune_result import TuneSettings
    from actadd.tuning import check_reference

    try:
        require("optuna", extra="tune", feature="actadd tune")
        specs = list(source or []) + ([f"pair:{add}:{sub}"] if add is not None else [])
        if not specs:
            raise actadd.ActAddError("give a steering source: --add Love --sub Hate or --source")
        sources = [as_source(s) for s in specs]
        if prompts is not None and prompt:
            raise actadd.ActAddError(
                "give --prompts NAME_OR_FILE or --prompt (repeatable), not both"
            )
        prompt_list = load_prompts(prompts) if prompts is not None else list(prompt or [])
        if not prompt_list:
            prompts, prompt_list = "sentiment", load_prompts("sentiment")
        settings = TuneSettings(
            layers=tuple(numbers(layers, int, "--layers")) if layers else None,
            coeffs=tuple(numbers(coeffs, float, "--coeffs")) if coeffs else None,
            locations=tuple(x.strip() for x in locations.split(",")) if locations else None,
            direction=direction,
            fluency=fluency,
            budget=budget,
            neutral=neutral,
            samples=samples,
            min_samples=min_samples,
            eta=eta,
            trials=trials,
            batch_trials=batch_trials,
            test_fraction=test_fraction,
            test_samples=test_samples,
            controls=controls,
            instructions=() if no_instructions else (tuple(instruction) if instruction else None),
            references=tuple(check_reference(r) for r in reference or []),
            tokens_to_generate=tokens,
            temperature=temperature,
            top_p=top_p,
            freq_penalty=freq_penalty,
            seed=seed,
            batch_size=batch_size,
        )
        word_list = [w.strip() for w in (words or "").split(",") if w.strip()]
        actadd.metrics.make_metric(metric, words=word_list, target=target)  # fail before loading
        if dry_run:
            _plan(sources, prompt_list, settings)
            return
        lm = load(model)
        with progress():
            res = actadd.tune(
                lm,
                sources,
                prompts if prompts is not None else prompt_list,
                metric=metric,
                words=word_list or None,
                target=target,
                settings=settings,
            )
        written = res.save(out)
    except actadd.ActAddError as e:
        raise fail(e) from e
    _show(res, metric)
    console.print(
        f"wrote {len(written)} files to {out}/ (report.html, pareto.png, chosen.safetensors)"
    )
    console.print("reproduce:", highlight=False)
    console.print(escape(res.command(out)), highlight=False, soft_wrap=True)


tune.__doc__ = (tune.__doc__ or "").replace("tune extra", f"tune extra: {hint('tune')}")


def _plan(sources: list[Source], prompts: list[str], s: TuneSettings) -> None:
    from actadd.heldout import split_prompts
    from actadd.tuning import rungs

    tune_p, test_p = split_prompts(prompts, test_fraction=s.test_fraction, seed=s.seed)
    console.print(
        f"plan: {len(sources)} source(s) ({', '.join(x.spec for x in sources)}); "
        f"{len(tune_p)} tune / {len(test_p)} test prompts; layers {list(s.layers or [])} "
        f"(empty: the default spread); coeffs {list(s.coeffs or []) or 'default'}; "
        f"fluency {s.fluency} ≤ {s.limit:g}; rounds of "
        f"{rungs(s.min_samples, s.samples, s.eta)} completions per prompt; "
        f"{s.test_samples} per test prompt",
        highlight=False,
    )


def _fmt(v: object, digits: int = 3) -> str:
    import math

    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.{digits}f}"
    return escape(str(v))


def _show(res: TuneResult, metric: str) -> None:
    p = res.pareto
    t = Table(
        title=f"Pareto front on the tune prompts: Δ {metric} vs fluency ({res.settings.fluency})"
    )
    for col in ("source", "layer", "coeff", "location", "fluency", f"Δ {metric}", "n"):
        t.add_column(escape(col), justify="left" if col == "source" else "right")
    for r in p.to_dict("records"):
        mark = (
            " ★"
            if (r["layer"], r["coeff"], r["location"], r["source"])
            == tuple(res.chosen[k] for k in ("layer", "coeff", "location", "source"))
            else ""
        )
        t.add_row(
            escape(str(r["source"])),
            str(r["layer"]),
            f"{r['coeff']:g}",
            str(r["location"]),
            _fmt(r["fluency"]),
            _pm(r["delta"], r["delta_sem"]) + mark,
            str(r["n"]),
        )
    console.print(t)
    console.print(_heldout_table(res.heldout, metric, res.settings.fluency))
    for r in res.contrasts.to_dict("records"):
        verdict = "[green]beats it[/]" if r["beats"] else "[yellow]does not beat it[/]"
        console.print(
            f"  {escape(r['contrast'])}: {r['diff']:+.3f} "
            f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] → {verdict}",
            highlight=False,
        )
    s = res.stats
    console.print(
        f"search: {s['configurations']} configurations ({s['over_budget']} over budget, never "
        f"generated), {s['search_completions']} completions (a full grid: "
        f"{s['naive_grid_completions']}); {s['total_seconds']:.0f} s in all",
        highlight=False,
    )


def _pm(mean: float, sem: float) -> str:
    import math

    return f"{mean:+.3f}" + ("" if math.isnan(sem) else f" ± {sem:.3f}")


def _heldout_table(h: pd.DataFrame, metric: str, fluency: str) -> Table:
    t = Table(title=f"held-out test prompts, fresh seeds: Δ {metric} (paired) [95% CI]")
    cols = ("arm", metric, f"Δ {metric}", "95% CI", fluency, "loss", "wrong way", "n")
    for col in cols:
        t.add_column(escape(col), justify="left" if col == "arm" else "right")
    flu = h["info_fluency"] if "info_fluency" in h.columns else None
    for i, r in enumerate(h.to_dict("records")):
        unsteered = r["arm"] == "unsteered"
        t.add_row(
            escape(str(r["arm"])),
            _fmt(r["value"]),
            "" if unsteered else f"{r['delta']:+.3f}",
            "" if unsteered else f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]",
            "" if flu is None else _fmt(flu.iloc[i]),
            _fmt(r["loss"], 2),
            "" if unsteered else f"{r['anti_steerable']:.0%}",
            str(r["n"]),
            style="dim" if unsteered else None,
        )
    return t
