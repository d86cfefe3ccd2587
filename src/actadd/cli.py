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
    coeff: Annotated[
        float | None, typer.Option(help="coefficient (default 5; with --vector, the file's)")
    ] = None,
    n: Annotated[int, typer.Option("--n", help="number of comparisons")] = 3,
    seed: Annotated[int, typer.Option(help="row i samples with seed+i")] = 0,
    tokens: Annotated[int, typer.Option(help="tokens to generate")] = 40,
    temperature: Annotated[float, typer.Option(help="0 is greedy")] = 1.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling")] = 0.3,
    freq_penalty: Annotated[float, typer.Option(help="OpenAI-style frequency penalty")] = 1.0,
    location: Annotated[
        str | None, typer.Option(help="front, mid, back or all (default front; all for --vector)")
    ] = None,
    pad: Annotated[bool, typer.Option(help="pad the shorter prompt with spaces")] = False,
    vector: Annotated[
        str | None, typer.Option(help="steer with this vector file (.safetensors/.gguf) instead")
    ] = None,
    model: ModelOpt = None,
) -> None:
    """Steered and unsteered completions side by side."""
    import actadd
    from actadd.generation import comparison_table

    try:
        lm = load(model)
        act_name = actadd.get_act_name(site, layer)
        v = None if vector is None else _read_vector(vector, lm)
        v = v.with_coeff(coeff) if v is not None and coeff is not None else v
        coeff = v.coeff if v is not None else 5.0 if coeff is None else coeff
        adds: list[actadd.hooks.Steerable]
        if v is not None:
            adds = [v]
            act_name, add, sub = ", ".join(v.sites), str(v.meta.get("method", vector)), None
        elif sub is None:
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
                addition_location=location or ("all" if vector else "front"),
            )  # fmt: skip
    except actadd.ActAddError as e:
        raise fail(e) from e
    what = f"{add!r}" + (f" − {sub!r}" if sub else "")
    location = location or ("all" if vector else "front")
    table = Table(
        title=f"[bold]{prompt}[/]…  steering: {coeff:g} × ({what}) at {act_name}, {location}",
        show_lines=True,
    )
    table.add_column("unsteered", ratio=1)
    table.add_column("steered", ratio=1)
    for a, b in comparison_table(df).itertuples(index=False):
        table.add_row(a, b)
    console.print(table)


# -- serve (issue 5) -----------------------------------------------------------------------------
@app.command()
def serve(
    model: ModelOpt = None,
    vectors: Annotated[
        str | None,
        typer.Option(help="directory of .safetensors steering vectors (uploads land here)"),
    ] = None,
    host: Annotated[
        str, typer.Option(help="interface to bind; default this machine only")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="ACTADD_API_KEY", help="require 'Authorization: Bearer KEY' on /v1"),
    ] = None,
    max_batch: Annotated[int, typer.Option(help="rows per batched generate call")] = 16,
    batch_window_ms: Annotated[float, typer.Option(help="wait for more requests (ms)")] = 20.0,
    max_tokens: Annotated[int, typer.Option(help="largest max_tokens a request may ask")] = 512,
    dtype: Annotated[str | None, typer.Option(help="e.g. float32, bfloat16")] = None,
) -> None:
    """Serve the model over an OpenAI-compatible API with per-request steering, and a playground."""
    import actadd

    try:
        from actadd.server import Limits, create_app
    except ImportError as e:
        msg = f"{e}: install the server extra, `pip install actadd[server]`"
        raise fail(actadd.ActAddError(msg)) from e
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        console.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who "
                      "can reach this port can use the model")  # fmt: skip
    try:
        lm = load(model, dtype)
        name = "SmolLM2-135M-Instruct" if model is None else None
        web = create_app(
            lm, model_id=name, vectors_dir=vectors, api_key=api_key,
            limits=Limits(max_tokens=max_tokens), max_batch_rows=max_batch,
            batch_window=batch_window_ms / 1000,
        )  # fmt: skip
    except actadd.ActAddError as e:
        raise fail(e) from e
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    console.print(f"serving [bold]{web.state.actadd.model_id}[/] ({lm.n_layers} layers) at "
                  f"[link]{url}[/]  (OpenAI API under /v1; Ctrl-C stops)")  # fmt: skip
    uvicorn.run(web, host=host, port=port, log_level="info", timeout_graceful_shutdown=None)


# -- sweep (issue 3) -----------------------------------------------------------------------------
SWEEP_METRICS = ("wedding", "wedding_any", "sentiment", "words", "similarity")


def _numbers(text: str, kind: type[float], what: str) -> list[float]:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise typer.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from e


@app.command()
def sweep(
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            help="prompt to complete (repeatable) [default: I went up to my friend and said]"
        ),
    ] = None,
    add: Annotated[str, typer.Option(help="prompt whose activations are added")] = " weddings",
    sub: Annotated[
        str | None, typer.Option(help="prompt whose activations are subtracted (x-vector)")
    ] = " ",
    layers: Annotated[str, typer.Option(help="comma-separated layers")] = "2,4,6,8",
    coeffs: Annotated[str, typer.Option(help="comma-separated coefficients")] = "1,2,4,8",
    metric: Annotated[
        list[str] | None,
        typer.Option(help=f"metric (repeatable): {', '.join(SWEEP_METRICS)} [default: wedding]"),
    ] = None,
    words: Annotated[
        str | None, typer.Option(help="comma-separated words for --metric words")
    ] = None,
    target: Annotated[
        str | None, typer.Option(help="passage for --metric similarity (needs actadd[embed])")
    ] = None,
    n: Annotated[int, typer.Option("--n", help="completions per configuration and baseline")] = 20,
    tokens: Annotated[int, typer.Option(help="tokens to generate")] = 40,
    seed: Annotated[int, typer.Option(help="completion i samples with seed+i (paired)")] = 0,
    temperature: Annotated[float, typer.Option(help="0 is greedy")] = 1.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling")] = 0.3,
    freq_penalty: Annotated[float, typer.Option(help="OpenAI-style frequency penalty")] = 1.0,
    location: Annotated[str, typer.Option(help="front, mid, back or all")] = "front",
    pad: Annotated[bool, typer.Option(help="pad the shorter prompt with spaces")] = False,
    batch_size: Annotated[
        int | None, typer.Option(help="rows per generate call (default: fit memory)")
    ] = None,
    out: Annotated[str, typer.Option(help="output directory")] = "results",
    top: Annotated[int, typer.Option(help="best configurations to show")] = 5,
    model: ModelOpt = None,
) -> None:
    """Sweep layers × coefficients, batched; write rows (CSV, Parquet), a summary and plots."""
    from pathlib import Path

    import pandas as pd

    import actadd
    from actadd import metrics as M
    from actadd import plots as P
    from actadd import sweeps as S

    prompt = prompt or ["I went up to my friend and said"]
    metric = metric or ["wedding"]
    bad = [m for m in metric if m not in SWEEP_METRICS]
    if bad:
        raise fail(actadd.ActAddError(f"unknown metric {bad}: use {', '.join(SWEEP_METRICS)}"))
    try:
        metrics: dict[str, M.Metric] = {}
        for m in metric:
            if m == "wedding":
                metrics[m] = M.get_word_count_metric()
            elif m == "wedding_any":
                metrics[m] = M.get_word_count_metric(binary=True)
            elif m == "sentiment":
                metrics[m] = M.get_sentiment_metric()
            elif m == "words":
                if not words:
                    raise actadd.ActAddError("--metric words needs --words a,b,c")
                metrics[m] = M.get_word_count_metric(words.split(","))
            elif m == "similarity":
                if not target:
                    raise actadd.ActAddError("--metric similarity needs --target 'a passage'")
                metrics[m] = M.get_embedding_metric(target)
        lm = load(model)
        phrases = [(add, 1.0)] + ([(sub, -1.0)] if sub is not None else [])
        layer_list = [int(x) for x in _numbers(layers, int, "--layers")]
        configs = S.make_activation_additions(
            [phrases], layer_list, _numbers(coeffs, float, "--coeffs"), pad=pad, model=lm
        )
        console.print(
            f"{len(configs)} configurations × {n} completions + {n} unsteered per prompt, "
            f"{tokens} tokens, batched"
        )
        normal, patched = S.sweep_over_prompts(
            lm, prompt, configs, n, n, tokens, seed=seed, metrics_dict=metrics,
            temperature=temperature, top_p=top_p, freq_penalty=freq_penalty,
            addition_location=location, batch_size=batch_size,
        )  # fmt: skip
    except actadd.ActAddError as e:
        raise fail(e) from e
    if normal.attrs.get("interrupted"):
        console.print("[yellow]interrupted:[/] writing the rows finished so far")
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    rows = pd.concat([normal, patched], ignore_index=True)
    rows.to_csv(outdir / "rows.csv", index=False)
    written = [outdir / "rows.csv"]
    try:
        rows.to_parquet(outdir / "rows.parquet", index=False)
        written.append(outdir / "rows.parquet")
    except ImportError:
        console.print("[yellow]no pyarrow:[/] skipped rows.parquet")
    if patched.empty:
        console.print(f"wrote {', '.join(map(str, written))}")
        return
    reduced_n, reduced = S.reduce_sweep_results(normal, patched)
    reduced.to_csv(outdir / "summary.csv", index=False)
    written.append(outdir / "summary.csv")
    for m in [*metrics, "loss"]:
        figs = {
            f"{m}_by_layer": lambda b, m=m: P.line_plot(reduced, m, baseline=reduced_n, backend=b),
            f"{m}_heatmap": lambda b, m=m: P.heatmap(reduced, m, backend=b),
        }
        for name, make in figs.items():
            written.append(P.save_figure(make("plotly"), outdir / f"{name}.html"))
            written.append(P.save_figure(make("matplotlib"), outdir / f"{name}.png"))
    first = next(iter(metrics), "loss")
    best = S.best_configurations(reduced, first, k=top, ascending=first == "loss")
    table = Table(title=f"best configurations by {first} (paired Δ vs unsteered, same seeds)")
    for col in ("prompt", "layer", "coeff", first, f"Δ {first}", "loss", "n"):
        table.add_column(
            col,
            justify="left" if col == "prompt" else "right",
            min_width=22 if col == "prompt" else None,
        )
    for r in best.itertuples():
        row = r._asdict()
        table.add_row(
            str(r.prompts)[:30], str(r.layer), f"{r.coeff:g}",
            f"{row[first]:.3f} ± {row[first + '_sem']:.3f}",
            f"{row[first + '_diff']:+.3f} ± {row[first + '_diff_sem']:.3f}",
            f"{r.loss:.2f}", str(r.n),
        )  # fmt: skip
    for r in reduced_n.itertuples():
        row = r._asdict()
        table.add_row(str(r.prompts)[:30] + " (unsteered)", "—", "—",
                      f"{row[first]:.3f} ± {row[first + '_sem']:.3f}", "", f"{r.loss:.2f}",
                      str(r.n))  # fmt: skip
    console.print(table)
    console.print(f"wrote {len(written)} files to {outdir}/ (rows.csv, summary.csv, plots)")


# -- steering vectors (issue 4) ------------------------------------------------------------------
vector_app = typer.Typer(
    help="Make, optimise, search, convert and inspect steering vectors.", no_args_is_help=True
)
app.add_typer(vector_app, name="vector")


def _read_vector(path: str, lm: actadd.LM | None = None) -> actadd.SteeringVector:
    """A vector from a .safetensors or GGUF file (told apart by the file's first bytes)."""
    from pathlib import Path

    from actadd import SteeringVector

    p = Path(path)
    gguf = p.is_file() and p.open("rb").read(4) == b"GGUF"
    return SteeringVector.from_gguf(p, lm) if gguf else SteeringVector.load(p, lm)


def _vector_table(v: actadd.SteeringVector, title: str) -> Table:
    stats = v.meta.get("stats", {})
    table = Table(title=title)
    for col in ("site", "‖coeff × direction‖", "agreement"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for site, norm in v.norms().items():
        agree = stats.get(site, {}).get("agreement")
        table.add_row(site, f"{norm:.2f}", "" if agree is None else f"{agree:.0%}")
    return table


@vector_app.command("make")
def vector_make(
    pairs: Annotated[str, typer.Option(help="shipped dataset name or .jsonl/.json/.csv file")],
    out: Annotated[str, typer.Option(help="output .safetensors file")],
    layers: Annotated[str, typer.Option(help="e.g. 6, 4-10 or 4-10,12")] = "6",
    method: Annotated[str, typer.Option(help="mean_diff or pca")] = "mean_diff",
    read: Annotated[str, typer.Option(help="last, mean or answer (tokens read per text)")] = "mean",
    site: Annotated[
        str, typer.Option(help="resid_pre, resid_post, attn_out or mlp_out")
    ] = "resid_pre",
    coeff: Annotated[float, typer.Option(help="coefficient stored in the file")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="texts per forward pass")] = 16,
    model: ModelOpt = None,
) -> None:
    """Build a vector from contrastive pairs (mean difference or PCA), at one or many layers."""
    import actadd

    try:
        lm = load(model)
        with status(f"reading {pairs} at layers {layers}…"):
            v = actadd.make_vector(lm, pairs, layers, method=method, site=site, read=read,
                                   batch_size=batch_size).with_coeff(coeff)  # fmt: skip
        v.save(out)
    except actadd.ActAddError as e:
        raise fail(e) from e
    data = v.meta["data"]
    console.print(_vector_table(v, f"{method} from {data['name']} ({data['n_pairs']} pairs)"))
    console.print(f"wrote {out}")


@vector_app.command("optimize")
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
        with console.status("optimising…", spinner="dots") as spin:
            res = actadd.optimize_vector(
                lm, pairs, layer=site, steps=steps, lr=lr, batch_size=batch_size,
                kl_weight=kl, avoid_weight=avoid_weight, norm_weight=norm_weight,
                neutral=None if neutral == "none" else neutral,
                callback=lambda r: spin.update(
                    f"step {r['step'] + 1}/{steps}: loss {r['loss']:.3f}"),
            )  # fmt: skip
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


@vector_app.command("search")
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
        with status("scoring pairs…"):
            df = actadd.search_pairs(
                lm, words, prompts, candidates=candidate, negatives=negative, vocab=vocab,
                layer=layer, coeff=coeff, top_k=top, rescore=rescore, samples=samples,
                tokens=tokens, top_p=0.3, freq_penalty=1.0,
            )  # fmt: skip
    except actadd.ActAddError as e:
        raise fail(e) from e
    table = Table(title=f"best pairs for {', '.join(words)} at layer {layer}, coeff {coeff:g}")
    cols = [c for c in ("positive", "negative", "effectiveness", "kl", "gen_score")
            if c in df.columns]  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col in ("positive", "negative") else "right")
    for r in df.itertuples():
        row = r._asdict()
        table.add_row(*(repr(row[c]) if isinstance(row[c], str) else f"{row[c]:.3f}"
                        for c in cols))  # fmt: skip
    console.print(table)
    if "gen_baseline" in df.columns:
        console.print(f"unsteered gen_score: {df.gen_baseline.iloc[0]:.3f}")


@vector_app.command("export")
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
        v = _read_vector(path)
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
        console.print(f"wrote {gguf}: {slots} (coeff {v.coeff:g} applied; llama.cpp adds "
                      "direction.N to the output of layer N)")  # fmt: skip
    if safetensors:
        console.print(f"wrote {safetensors}")


@vector_app.command("show")
def vector_show(
    path: Annotated[str, typer.Argument(help="a vector file (.safetensors or .gguf)")],
) -> None:
    """Print a vector file's sites, norms and provenance."""
    import json

    import actadd

    try:
        v = _read_vector(path)
    except actadd.ActAddError as e:
        raise fail(e) from e
    console.print(_vector_table(v, f"{path}: {v.describe()}"))
    meta = {k: val for k, val in v.meta.items() if k not in ("stats", "parts")}
    console.print_json(json.dumps(meta, default=str))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
