"""``actadd vector``: make, optimise, search, convert and inspect steering vectors."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from actadd.cli.common import ModelOpt, SiteOpt, check_site, console, fail, load, progress

if TYPE_CHECKING:
    import actadd

app = typer.Typer(
    help="Make, optimise, search, convert and inspect steering vectors.", no_args_is_help=True
)


def _vector_table(v: actadd.SteeringVector, title: str) -> Table:
    stats = v.meta.get("stats", {})
    table = Table(title=title)
    for col in ("site", "‖coeff × direction‖", "agreement"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for site, norm in v.norms().items():
        agree = stats.get(site, {}).get("agreement")
        table.add_row(site, f"{norm:.2f}", "" if agree is None else f"{agree:.0%}")
    return table


@app.command("make")
def vector_make(
    pairs: Annotated[str, typer.Option(help="shipped dataset name or .jsonl/.json/.csv file")],
    out: Annotated[str, typer.Option(help="output .safetensors file")],
    layers: Annotated[str, typer.Option(help="e.g. 6, 4-10 or 4-10,12")] = "6",
    method: Annotated[str, typer.Option(help="mean_diff or pca")] = "mean_diff",
    read: Annotated[str, typer.Option(help="last, mean or answer (tokens read per text)")] = "mean",
    site: SiteOpt = "resid_pre",
    coeff: Annotated[float, typer.Option(help="coefficient stored in the file")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="texts per forward pass")] = 16,
    model: ModelOpt = None,
) -> None:
    """Build a vector from contrastive pairs (mean difference or PCA), at one or many layers."""
    import actadd

    try:
        check_site(site)
        lm = load(model)
        with progress():
            v = actadd.make_vector(
                lm, pairs, layers, method=method, site=site, read=read, batch_size=batch_size
            ).with_coeff(coeff)
        v.save(out)
    except actadd.ActAddError as e:
        raise fail(e) from e
    data = v.meta["data"]
    console.print(_vector_table(v, f"{method} from {data['name']} ({data['n_pairs']} pairs)"))
    console.print(f"wrote {out}")


@app.command("optimize")
def vector_optimize(
    pairs: Annotated[str, typer.Option(help="dataset: positives are targets, negatives avoided")],
    out: Annotated[str, typer.Option(help="output .safetensors file")],
    layer: Annotated[str, typer.Option(help="layer number or site name")] = "6",
    steps: Annotated[int, typer.Option(help="Adam steps")] = 40,
    lr: Annotated[float, typer.Option(help="learning rate, in residual-stream units")] = 0.1,
    batch_size: Annotated[int, typer.Option(help="texts of each kind per step")] = 8,
    kl: Annotated[float, typer.Option(help="weight of KL on neutral text")] = 1.0,
    avoid_weight: Annotated[float, typer.Option(help="weight of the avoided texts")] = 1.0,
    norm_weight: Annotated[float, typer.Option(help="weight of ||v||^2")] = 0.0,
    neutral: Annotated[
        str, typer.Option(help="neutral texts for the KL term; 'none' for none")
    ] = "neutral",
    losses: Annotated[str | None, typer.Option(help="write the loss curve as CSV")] = None,
    model: ModelOpt = None,
) -> None:
    """Learn a vector by gradient descent (model weights frozen); prints the loss curve."""
    import actadd

    site: int | str = int(layer) if layer.lstrip("-").isdigit() else layer
    try:
        lm = load(model)
        with progress():
            res = actadd.optimize_vector(
                lm,
                pairs,
                layer=site,
                steps=steps,
                lr=lr,
                batch_size=batch_size,
                kl_weight=kl,
                avoid_weight=avoid_weight,
                norm_weight=norm_weight,
                neutral=None if neutral == "none" else neutral,
            )
        res.vector.save(out)
        if losses:
            res.losses.to_csv(losses, index=False)
    except actadd.ActAddError as e:
        raise fail(e) from e
    table = Table(title=f"loss curve ({steps} steps at {res.vector.sites[0]})")
    for col in res.losses.columns:
        table.add_column(col, justify="right")
    every = max(1, steps // 10)
    for r in res.losses.itertuples(index=False):
        if r.step % every == 0 or r.step == steps - 1:
            table.add_row(str(r.step), *(f"{x:.3f}" for x in r[1:]))
    console.print(table)
    console.print(f"wrote {out}" + (f" and {losses}" if losses else ""))


@app.command("search")
def vector_search(
    targets: Annotated[str, typer.Option(help="comma-separated words to make likely")],
    prompt: Annotated[list[str] | None, typer.Option(help="evaluation prompt (repeatable)")] = None,
    candidate: Annotated[
        list[str] | None, typer.Option(help="positive phrase to try (repeatable)")
    ] = None,
    negative: Annotated[
        list[str] | None, typer.Option(help="phrase to subtract (repeatable; default ' ')")
    ] = None,
    vocab: Annotated[int, typer.Option(help="also try N candidates from the vocabulary")] = 0,
    layer: Annotated[int, typer.Option(help="layer (blocks.L.hook_resid_pre)")] = 6,
    coeff: Annotated[float, typer.Option(help="coefficient of each pair")] = 4.0,
    top: Annotated[int, typer.Option(help="pairs to show")] = 10,
    rescore: Annotated[int, typer.Option(help="re-score the N best by generations")] = 0,
    samples: Annotated[int, typer.Option(help="completions per prompt when re-scoring")] = 4,
    tokens: Annotated[int, typer.Option(help="tokens per completion when re-scoring")] = 20,
    model: ModelOpt = None,
) -> None:
    """Score ActAdd prompt pairs by next-token effectiveness (and short generations)."""
    import actadd

    words = [w.strip() for w in targets.split(",") if w.strip()]
    prompts = prompt or ["I went up to my friend and said"]
    try:
        lm = load(model)
        with progress():
            df = actadd.search_pairs(
                lm,
                words,
                prompts,
                candidates=candidate,
                negatives=negative,
                vocab=vocab,
                layer=layer,
                coeff=coeff,
                top_k=top,
                rescore=rescore,
                samples=samples,
                tokens=tokens,
                top_p=0.3,
                freq_penalty=1.0,
            )
    except actadd.ActAddError as e:
        raise fail(e) from e
    table = Table(title=f"best pairs for {', '.join(words)} at layer {layer}, coeff {coeff:g}")
    cols = [
        c for c in ("positive", "negative", "effectiveness", "kl", "gen_score") if c in df.columns
    ]
    for col in cols:
        table.add_column(col, justify="left" if col in ("positive", "negative") else "right")
    for r in df.itertuples():
        row = r._asdict()
        table.add_row(*(repr(row[c]) if isinstance(row[c], str) else f"{row[c]:.3f}" for c in cols))
    console.print(table)
    if "gen_baseline" in df.columns:
        console.print(f"unsteered gen_score: {df.gen_baseline.iloc[0]:.3f}")


@app.command("export")
def vector_export(
    path: Annotated[str, typer.Argument(help="input vector (.safetensors or .gguf)")],
    gguf: Annotated[
        str | None, typer.Option(help="write llama.cpp control-vector GGUF here")
    ] = None,
    safetensors: Annotated[str | None, typer.Option(help="write .safetensors here")] = None,
    model_hint: Annotated[str | None, typer.Option(help="GGUF model hint")] = None,
) -> None:
    """Convert between actadd .safetensors and llama.cpp's GGUF control vectors."""
    import actadd

    if not gguf and not safetensors:
        raise fail(actadd.ActAddError("give --gguf OUT and/or --safetensors OUT"))
    try:
        v = actadd.SteeringVector.read(path)
        if gguf:
            v.to_gguf(gguf, model_hint=model_hint)
        if safetensors:
            v.save(safetensors)
    except actadd.ActAddError as e:
        raise fail(e) from e
    if gguf:
        from actadd.sites import parse_site
        from actadd.vector_files import gguf_layer

        n = int(v.meta.get("n_layers") or max(v.layers) + 1)
        slots = ", ".join(f"{s} → direction.{gguf_layer(parse_site(s, n))}" for s in v.sites)
        console.print(
            f"wrote {gguf}: {slots} (coeff {v.coeff:g} applied; llama.cpp adds "
            "direction.N to the output of layer N)"
        )
    if safetensors:
        console.print(f"wrote {safetensors}")


@app.command("show")
def vector_show(
    path: Annotated[str, typer.Argument(help="a vector file (.safetensors or .gguf)")],
) -> None:
    """Print a vector file's sites, norms and provenance."""
    import actadd

    try:
        v = actadd.SteeringVector.read(path)
    except actadd.ActAddError as e:
        raise fail(e) from e
    console.print(_vector_table(v, f"{path}: {v.describe()}"))
    meta = {k: val for k, val in v.meta.items() if k not in ("stats", "parts")}
    console.print_json(json.dumps(meta, default=str))
