"""Plots of sweeps and diagnostics: interactive (plotly) and static (matplotlib), both offline.

Every plot function takes ``backend="plotly"`` (a ``plotly.graph_objects.Figure``) or
``backend="matplotlib"`` (a ``matplotlib.figure.Figure``, no pyplot state). ``save_figure``
writes either: ``.html`` for plotly (plotly.js inlined, so the file opens without a network),
``.png``/``.svg``/``.pdf`` for matplotlib.

* ``line_plot``: a metric against the coefficient, one line per layer, error bars from
  ``reduce_sweep_results`` (``{metric}_sem``) and the unsteered baseline as a dashed line;
* ``heatmap``: layer × coefficient;
* ``magnitude_bars``: per-position norms of the additions relative to the prompt's residual
  stream (``steering_magnitudes_relative_to_prompt``);
* ``perplexity_ratio_plot``: steered / unsteered perplexity, one panel per corpus, 1.0 marked;
* ``pareto_plot`` (matplotlib): effect against fluency cost of every configuration a tuner
  measured, its Pareto front, the budget and the choice;
* ``effects_plot`` (matplotlib): the effect on each prompt, per arm, with the mean and its
  confidence interval (steerability per input).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from actadd.errors import ActAddError, require

__all__ = [
    "axis_label",
    "effects_plot",
    "heatmap",
    "line_plot",
    "magnitude_bars",
    "pareto_plot",
    "perplexity_ratio_plot",
    "plot_sweep_results",
    "save_figure",
]

BACKENDS = ("plotly", "matplotlib")

# axis and colour-bar titles for the columns sweeps produce (anything else is shown as is)
_LABELS = {
    "coeff": "coefficient",
    "layer": "layer",
    "loss": "loss of the completion (nats/token)",
    "sentiment": "VADER sentiment",
    "wedding": "wedding words per completion",
    "wedding_any": "fraction with a wedding word",
    "words": "target words per completion",
    "similarity": "MiniLM similarity",
    "ratio": "perplexity ratio (steered / unsteered)",
    "dim_fraction": "fraction of residual dimensions",
    "relative": "addition norm / prompt norm",
}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def axis_label(column: str) -> str:
    """A readable title for a column: ``sentiment_diff`` → "Δ VADER sentiment (steered −
    unsteered)", ``coeff`` → "coefficient".

    Example:
        >>> axis_label("sentiment_diff")
        'Δ VADER sentiment (steered − unsteered)'
    """
    if column.endswith("_diff"):
        return f"Δ {axis_label(column[: -len('_diff')])} (steered − unsteered)"
    return _LABELS.get(column, column.replace("_", " "))


def _dodge(values: pd.Series, k: int, n: int, spread: float, log: bool) -> pd.Series:
    """Shift series ``k`` of ``n`` a little along x so equal points stay visible."""
    if n < 2:
        return values
    step = (k - (n - 1) / 2) * spread / max(n - 1, 1)
    return values * (2**step) if log else values + step


def _check(data: pd.DataFrame, cols: list[str | None], backend: str) -> None:
    if backend not in BACKENDS:
        raise ActAddError(f"backend must be 'plotly' or 'matplotlib', got {backend!r}")
    require(backend, extra="research", feature=f"{backend} plots")
    missing = [c for c in cols if c is not None and c not in data.columns]
    if missing:
        raise ActAddError(f"no columns {missing} to plot; have {list(data.columns)}")
    if data.empty:
        raise ActAddError("nothing to plot: the frame is empty")


def _baseline_value(baseline: Any, metric: str) -> float | None:
    if baseline is None:
        return None
    if isinstance(baseline, pd.DataFrame):
        if metric not in baseline.columns:
            return None
        return float(baseline[metric].mean())
    return float(baseline)


def _facets(data: pd.DataFrame, facet: str | None) -> list[tuple[Any, pd.DataFrame]]:
    if facet is None:
        return [(None, data)]
    return [(k, d) for k, d in data.groupby(facet, sort=False)]


def _auto_facet(data: pd.DataFrame, facet: str | None) -> str | None:
    if facet is None and "prompts" in data.columns and data["prompts"].nunique() > 1:
        return "prompts"
    return facet


def line_plot(
    data: pd.DataFrame,
    metric: str,
    *,
    x: str = "coeff",
    group: str | None = "layer",
    facet: str | None = None,
    baseline: float | pd.DataFrame | None = None,
    baseline_label: str = "unsteered",
    title: str | None = None,
    y_label: str | None = None,
    log_x: bool = False,
    log_y: bool = False,
    backend: str = "plotly",
) -> Any:
    """``metric`` against ``x``, one line per ``group``, error bars from ``{metric}_sem``.

    Args:
        data: a reduced frame (``reduce_sweep_results``), one row per configuration.
        metric: the column to plot.
        x: the x column (``coeff``).
        group: one line per value (``layer``); None for one line.
        facet: one panel per value; default ``prompts`` when there are several.
        baseline: a number, or the reduced unsteered frame (its mean ``metric``), drawn
            dashed.
        baseline_label, title, y_label: labels.
        log_x, log_y: logarithmic axes (coefficients often double; ratios multiply).
        backend: ``plotly`` or ``matplotlib``.

    Example:
        >>> normal_r, patched_r = reduce_sweep_results(normal, patched)  # doctest: +SKIP
        >>> fig = line_plot(patched_r, "wedding", baseline=normal_r)  # doctest: +SKIP
        >>> save_figure(fig, "wedding.html")  # doctest: +SKIP
    """
    facet = _auto_facet(data, facet)
    _check(data, [metric, x, group, facet], backend)
    err = f"{metric}_sem" if f"{metric}_sem" in data.columns else None
    base = _baseline_value(baseline, metric)
    title = title or f"{metric} vs {x}" + (f" by {group}" if group else "")
    panels = _facets(data, facet)
    groups = [None] if group is None else list(pd.unique(data[group]))

    def series(d: pd.DataFrame, g: Any) -> pd.DataFrame:
        s = d if g is None else d[d[group] == g]
        return s.sort_values(x)

    # lines that coincide (e.g. several layers at 0) are drawn side by side, not on top
    spread = 0.0
    if len(groups) > 1 and pd.api.types.is_numeric_dtype(data[x]):
        xs = np.sort(pd.unique(data[x].astype(float)))
        gaps = np.diff(np.log2(xs) if log_x else xs) if len(xs) > 1 else np.array([1.0])
        spread = 0.12 * float(gaps.min())

    if backend == "plotly":
        import plotly.graph_objects as go
        from plotly.colors import qualitative
        from plotly.subplots import make_subplots

        fig = make_subplots(
            rows=1,
            cols=len(panels),
            shared_yaxes=True,
            subplot_titles=[str(k) for k, _ in panels] if facet else None,
        )
        palette = qualitative.Plotly
        symbols = ("circle", "square", "triangle-up", "diamond", "triangle-down", "cross")
        for col, (_, d) in enumerate(panels, start=1):
            for gi, g in enumerate(groups):
                s = series(d, g)
                fig.add_trace(
                    go.Scatter(
                        x=_dodge(s[x], gi, len(groups), spread, log_x),
                        y=s[metric],
                        mode="lines+markers",
                        marker={"symbol": symbols[gi % len(symbols)], "size": 8},
                        opacity=0.85,
                        name=f"{group} {g}" if group else metric,
                        legendgroup=str(g),
                        showlegend=col == 1,
                        line={"color": palette[gi % len(palette)]},
                        error_y={"type": "data", "array": s[err].fillna(0)} if err else None,
                    ),
                    row=1,
                    col=col,
                )
            if base is not None:
                fig.add_hline(
                    y=base,
                    line_dash="dash",
                    line_color="gray",
                    row=1,
                    col=col,
                    annotation_text=baseline_label,
                )
        fig.update_layout(title=title, template="plotly_white", legend_title=group)
        fig.update_xaxes(title=axis_label(x), type="log" if log_x else None)
        fig.update_yaxes(type="log" if log_y else None)
        fig.update_yaxes(title=y_label or axis_label(metric), col=1)
        return fig

    fig, axes = _mpl_axes(len(panels))
    for ax, (key, d) in zip(axes, panels, strict=True):
        for gi, g in enumerate(groups):
            s = series(d, g)
            ax.errorbar(
                _dodge(s[x], gi, len(groups), spread, log_x),
                s[metric],
                yerr=s[err].fillna(0) if err else None,
                marker=_MARKERS[gi % len(_MARKERS)],
                markersize=6,
                alpha=0.85,
                capsize=3,
                label=f"{group} {g}" if group else metric,
            )
        if base is not None:
            ax.axhline(base, ls="--", color="gray", label=baseline_label)
        ax.set_xlabel(axis_label(x))
        if log_x:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(_plain_ticks())
        if log_y:
            from matplotlib.ticker import LogLocator, NullFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(_plain_ticks())
            ax.yaxis.set_minor_formatter(NullFormatter())
        if facet:
            ax.set_title(str(key), fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(_wrap(y_label or axis_label(metric), 40))
    # outside the plot, so it never hides a line
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(_wrap(title, 90))
    return fig


#: The original library's name.
plot_sweep_results = line_plot


def heatmap(
    data: pd.DataFrame,
    metric: str,
    *,
    x: str = "coeff",
    y: str = "layer",
    title: str | None = None,
    center: float | None = None,
    fmt: str = ".2f",
    backend: str = "plotly",
) -> Any:
    """``metric`` on a ``y`` × ``x`` grid (layer × coefficient), values written in the cells.

    Several rows per cell (e.g. several prompts) are averaged. ``center`` makes a diverging
    colour scale around that value (e.g. 0 for a paired difference, 1 for a ratio).

    Example:
        >>> fig = heatmap(patched_r, "wedding", backend="matplotlib")  # doctest: +SKIP
    """
    _check(data, [metric, x, y], backend)
    grid = data.pivot_table(index=y, columns=x, values=metric, aggfunc="mean").sort_index()
    title = title or f"{axis_label(metric)}: {y} × {x}"
    z = grid.to_numpy(dtype=float)
    finite = z[np.isfinite(z)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if center is not None:
        span = max(abs(hi - center), abs(lo - center)) or 1.0
        lo, hi = center - span, center + span
    text = [[format(v, fmt) if math.isfinite(v) else "" for v in row] for row in z]
    xs, ys = [_label(c) for c in grid.columns], [_label(i) for i in grid.index]

    if backend == "plotly":
        import plotly.graph_objects as go

        fig = go.Figure(
            go.Heatmap(
                z=z,
                x=xs,
                y=ys,
                text=text,
                texttemplate="%{text}",
                zmin=lo,
                zmax=hi,
                colorscale="RdBu_r" if center is not None else "Viridis",
                colorbar={"title": axis_label(metric)},
            )
        )
        fig.update_layout(title=title, template="plotly_white")
        fig.update_xaxes(title=axis_label(x), type="category")
        fig.update_yaxes(title=axis_label(y), type="category")
        return fig

    fig, (ax,) = _mpl_axes(1, width=max(5.5, 1.6 + 0.9 * len(xs)), height=1.6 + 0.45 * len(ys))
    cmap = "RdBu_r" if center is not None else "viridis"
    im = ax.imshow(z, origin="lower", aspect="auto", cmap=cmap, vmin=lo, vmax=hi)
    ax.set_xticks(range(len(xs)), xs)
    ax.set_yticks(range(len(ys)), ys)
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(axis_label(y))
    mid = (lo + hi) / 2
    for i in range(len(ys)):
        for j in range(len(xs)):
            if text[i][j]:
                dark = (
                    (z[i, j] < mid)
                    if center is None
                    else abs(z[i, j] - center) > 0.6 * (hi - center)
                )
                ax.text(
                    j,
                    i,
                    text[i][j],
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
    fig.colorbar(im, ax=ax, label=_wrap(axis_label(metric), 30))
    ax.set_title(_wrap(title, 60), fontsize=10)
    return fig


def magnitude_bars(
    magnitudes: pd.DataFrame,
    *,
    value: str = "relative",
    title: str | None = None,
    log_y: bool = False,
    backend: str = "plotly",
) -> Any:
    """Per prompt position, the norm of the summed additions relative to the prompt's own
    residual norm (``value="relative"``), one bar per site: the output of
    ``actadd.steering_magnitudes_relative_to_prompt``. Outlier positions are hatched.

    Example:
        >>> mags = actadd.steering_magnitudes_relative_to_prompt(
        ...     lm, "I hate you because", get_x_vector("Love", "Hate", 5, 6))  # doctest: +SKIP
        >>> fig = magnitude_bars(mags)  # doctest: +SKIP
    """
    _check(magnitudes, ["site", "position", "token", value], backend)
    d = magnitudes.copy()
    d["label"] = [f"{p}: {t!r}" for p, t in zip(d.position, d.token, strict=True)]
    labels = list(pd.unique(d.sort_values("position")["label"]))
    sites = list(pd.unique(d["site"]))
    title = title or f"addition norm / prompt residual norm ({value}) per position"

    if backend == "plotly":
        import plotly.graph_objects as go

        fig = go.Figure()
        for s in sites:
            ds = d[d.site == s].set_index("label").reindex(labels)
            fig.add_trace(go.Bar(x=labels, y=ds[value], name=s))
        fig.update_layout(
            title=title,
            barmode="group",
            template="plotly_white",
            xaxis_title="prompt position",
            yaxis_title=axis_label(value),
        )
        if log_y:
            fig.update_yaxes(type="log")
        return fig

    fig, (ax,) = _mpl_axes(1, width=max(6.0, 0.6 * len(labels) * max(1, len(sites)) ** 0.5 + 2))
    width = 0.8 / len(sites)
    pos = np.arange(len(labels))
    for k, s in enumerate(sites):
        ds = d[d.site == s].set_index("label").reindex(labels)
        bars = ax.bar(pos + (k - (len(sites) - 1) / 2) * width, ds[value], width, label=s)
        if "outlier" in ds.columns:
            for b, o in zip(bars, ds["outlier"].fillna(False), strict=True):
                if o:
                    b.set_hatch("//")
    ax.set_xticks(pos, labels, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("prompt position")
    ax.set_ylabel(axis_label(value))
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=2 if len(sites) > 4 else 1)
    ax.set_title(title, fontsize=11)
    return fig


def perplexity_ratio_plot(
    data: pd.DataFrame,
    *,
    ratio: str = "ratio",
    x: str = "coeff",
    group: str | None = "layer",
    facet: str | None = "corpus",
    title: str | None = None,
    log_y: bool = True,
    backend: str = "plotly",
) -> Any:
    """Perplexity ratio (steered / unsteered) against ``x``, one line per ``group`` and one
    panel per ``facet`` (e.g. wedding vs unrelated texts); 1.0 (no change) is dashed.

    ``data`` has one row per configuration (and corpus), e.g. from
    ``corpus_perplexity_ratio`` per group.

    Example:
        >>> fig = perplexity_ratio_plot(ratios, backend="matplotlib")  # doctest: +SKIP
    """
    if facet is not None and facet not in data.columns:
        facet = None
    return line_plot(
        data,
        ratio,
        x=x,
        group=group,
        facet=facet,
        baseline=1.0,
        baseline_label="no change",
        title=title or "perplexity ratio (steered / unsteered); < 1: text more likely",
        y_label="perplexity ratio",
        log_y=log_y,
        backend=backend,
    )


def pareto_plot(
    trials: pd.DataFrame,
    *,
    budget: float | None = None,
    fluency_label: str = "fluency cost",
    effect_label: str = "effect (paired Δ)",
    chosen: dict[str, Any] | None = None,
    direction: str = "maximize",
    title: str | None = None,
    backend: str = "matplotlib",
) -> Any:
    """Effect (``delta``) against fluency cost (``fluency``) of every configuration measured
    (one row each, as ``TuneResult.trials``): filled markers for those measured with every
    sample, hollow for those pruned early, the Pareto front among the former as a line, the
    budget dashed, configurations over budget as ticks on the x axis (never generated), and
    the chosen one starred.

    Example:
        >>> fig = pareto_plot(result.trials, budget=1.25, chosen=result.chosen)  # doctest: +SKIP
    """
    if backend != "matplotlib":
        raise ActAddError("pareto_plot draws with matplotlib only: backend='matplotlib'")
    _check(trials, ["fluency", "delta", "status", "layer", "coeff"], backend)
    fig, (ax,) = _mpl_axes(1, width=9.0, height=4.8)
    d = trials.copy()
    measured = d[d.delta.notna()]
    group = next(
        (g for g in ("source", "location") if g in d.columns and measured[g].nunique() > 1), None
    )
    groups = [None] if group is None else list(pd.unique(measured[group]))
    for gi, g in enumerate(groups):
        part = measured if g is None else measured[measured[group] == g]
        color = f"C{gi}"
        done = part[part.status == "complete"]
        early = part[part.status != "complete"]
        name = "" if g is None else f"{g}: "
        ax.scatter(
            done.fluency, done.delta, s=36, color=color, label=f"{name}every sample", zorder=3
        )
        ax.scatter(
            early.fluency,
            early.delta,
            s=28,
            facecolors="none",
            edgecolors=color,
            alpha=0.7,
            label=f"{name}pruned early (fewer samples)",
            zorder=2,
        )
    front = _front(measured, direction)
    if len(front):
        ax.plot(
            front.fluency, front.delta, "-", color="0.3", lw=1.2, label="Pareto front", zorder=1
        )
        for r in front.itertuples():
            ax.annotate(
                f"L{r.layer} ×{r.coeff:g}",
                (r.fluency, r.delta),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
                color="0.25",
            )
    over = d[d.status == "over budget"]
    if len(over):
        ax.plot(
            over.fluency,
            [0.015] * len(over),
            "|",
            color="C3",
            ms=12,
            mew=1.5,
            transform=ax.get_xaxis_transform(),
            label="over budget (not generated)",
            clip_on=False,
        )
    finite = d.fluency[np.isfinite(d.fluency)]
    if budget is not None and len(finite) and budget <= 2 * finite.max():
        ax.axvline(budget, ls="--", color="C3", lw=1, label=f"budget {budget:g}")
    elif budget is not None:  # far right of every point: a line there would squash the plot
        ax.plot([], [], ls="--", color="C3", lw=1, label=f"budget {budget:g} (off the scale)")
    ax.axhline(0, color="0.6", lw=0.8)
    if chosen is not None:
        ax.scatter(
            [chosen["fluency"]],
            [chosen["delta"]],
            marker="*",
            s=260,
            color="gold",
            edgecolors="black",
            zorder=4,
            label=f"chosen: layer {chosen['layer']} "
            f"×{float(chosen['coeff']):g} ({chosen['location']})",
        )
    xs = d.fluency[np.isfinite(d.fluency)]
    if len(xs) and xs.min() > 0 and xs.max() / xs.min() > 3:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(_plain_ticks())
        ax.xaxis.set_minor_formatter(_plain_ticks())
        ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel(_wrap(fluency_label, 70))
    ax.set_ylabel(_wrap(effect_label, 45))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    n_over = len(over)
    ax.set_title(
        _wrap(
            title
            or f"{len(measured)} configurations measured, {n_over} over budget "
            "(Pareto front: best effect per fluency among the fully measured)",
            80,
        ),
        fontsize=10,
    )
    return fig


def _front(measured: pd.DataFrame, direction: str) -> pd.DataFrame:
    from actadd.tune_result import pareto_front

    return pareto_front(measured, direction=direction)


def effects_plot(
    per_prompt: pd.DataFrame,
    summary: pd.DataFrame,
    *,
    effect_label: str = "effect per prompt (paired Δ)",
    direction: str = "maximize",
    title: str | None = None,
    backend: str = "matplotlib",
) -> Any:
    """The effect on each prompt (dots), per arm (rows), with the arm's mean and 95% interval
    (black), 0 dashed: how evenly steering works across inputs, and the share that moves the
    wrong way (*anti-steerable*, in each row's label).

    Args:
        per_prompt: ``arm``, ``prompts``, ``effect`` (``actadd.heldout.summarize_arms``).
        summary: ``arm``, ``delta``, ``ci_low``, ``ci_high``, ``anti_steerable``.

    Example:
        >>> fig = effects_plot(result.per_prompt, result.heldout)  # doctest: +SKIP
    """
    if backend != "matplotlib":
        raise ActAddError("effects_plot draws with matplotlib only: backend='matplotlib'")
    _check(per_prompt, ["arm", "effect"], backend)
    arms = [a for a in summary.arm if a in set(per_prompt.arm)]
    fig, (ax,) = _mpl_axes(1, width=9.0, height=1.6 + 0.55 * len(arms))
    rng = np.random.default_rng(0)
    labels = []
    for k, arm in enumerate(arms):
        y = len(arms) - 1 - k
        e = per_prompt[per_prompt.arm == arm].effect.to_numpy(dtype=float)
        ax.scatter(
            e, y + rng.uniform(-0.18, 0.18, len(e)), s=16, alpha=0.6, color=f"C{k}", zorder=2
        )
        r = summary[summary.arm == arm].iloc[0]
        ax.errorbar(
            [r.delta],
            [y],
            xerr=[[r.delta - r.ci_low], [r.ci_high - r.delta]],
            fmt="D",
            color="black",
            ms=5,
            capsize=4,
            zorder=3,
        )
        sign = 1.0 if direction == "maximize" else -1.0
        wrong = int((sign * e < 0).sum())
        labels.append((y, f"{_wrap(str(arm), 34)}\n{wrong}/{len(e)} prompts the wrong way"))
    ax.axvline(0, ls="--", color="0.5", lw=1)
    ax.set_yticks([y for y, _ in labels], [t for _, t in labels], fontsize=8)
    ax.set_ylim(-0.6, len(arms) - 0.4)
    ax.set_xlabel(_wrap(effect_label, 80))
    ax.grid(alpha=0.3, axis="x")
    side = "right of 0" if direction == "maximize" else "left of 0"
    ax.set_title(
        _wrap(
            title or f"Effect per test prompt (dots), mean and 95% CI (black); asked for: {side}",
            90,
        ),
        fontsize=10,
    )
    return fig


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def _plain_ticks() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}")


def _label(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float, np.number)) else str(v)


def _mpl_axes(n: int, *, width: float | None = None, height: float = 3.8) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width or 2.5 + 4.2 * n, height), layout="constrained")
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    return fig, list(axes)


def save_figure(fig: Any, path: str | Path, *, dpi: int = 130) -> Path:
    """Write a plotly figure as self-contained HTML (``.html``) or a matplotlib figure as an
    image (``.png``, ``.svg``, ``.pdf``); creates parent directories; returns the path.

    Example:
        >>> save_figure(line_plot(df, "wedding"), "out/wedding.html")  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if hasattr(fig, "write_html"):  # plotly
        if suffix != ".html":
            raise ActAddError(
                f"plotly figures are saved as .html here (got {path.name}); for a static image "
                "make the plot with backend='matplotlib'"
            )
        fig.write_html(path, include_plotlyjs=True, full_html=True)
    elif hasattr(fig, "savefig"):  # matplotlib
        if suffix not in (".png", ".svg", ".pdf"):
            raise ActAddError(f"matplotlib figures are saved as .png/.svg/.pdf, got {path.name}")
        fig.savefig(path, dpi=dpi)
    else:
        raise ActAddError(f"cannot save a {type(fig).__name__}: not a plotly/matplotlib figure")
    return path
