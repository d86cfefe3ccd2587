"""actadd.plots: every plot in both backends writes a non-empty, self-contained file."""

from __future__ import annotations

import pandas as pd
import pytest

import actadd
from actadd import plots as P


@pytest.fixture
def reduced() -> pd.DataFrame:
    rows = []
    for layer in (2, 4, 6):
        for coeff in (1.0, 2.0, 4.0, 8.0):
            rows.append(
                {
                    "prompts": "p",
                    "layer": layer,
                    "coeff": coeff,
                    "wedding": layer * coeff / 50,
                    "wedding_sem": 0.05,
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture
def magnitudes() -> pd.DataFrame:
    rows = []
    for site in ("blocks.2.hook_resid_pre", "blocks.6.hook_resid_pre"):
        for pos, tok in enumerate(["I", " hate", " you"]):
            rows.append(
                {
                    "site": site,
                    "position": pos,
                    "token": tok,
                    "addition_norm": 10.0 + pos,
                    "prompt_norm": 5.0,
                    "relative": 2.0 + pos / 5,
                    "outlier": pos == 0,
                }
            )
    return pd.DataFrame(rows)


def _plots(reduced, magnitudes, backend):
    ratios = pd.concat(
        [reduced.assign(corpus=c, ratio=r) for c, r in (("wedding", 0.9), ("other", 1.01))]
    )
    return {
        "line": P.line_plot(reduced, "wedding", baseline=0.02, backend=backend),
        "heat": P.heatmap(reduced, "wedding", backend=backend),
        "heat_centered": P.heatmap(reduced, "wedding", center=0.5, backend=backend),
        "mags": P.magnitude_bars(magnitudes, log_y=True, backend=backend),
        "ppl": P.perplexity_ratio_plot(ratios, backend=backend),
    }


def test_plotly_html_is_self_contained(tmp_path, reduced, magnitudes):
    for name, fig in _plots(reduced, magnitudes, "plotly").items():
        path = P.save_figure(fig, tmp_path / "sub" / f"{name}.html")
        html = path.read_text()
        assert path.stat().st_size > 1_000_000  # plotly.js inlined: opens offline
        assert '<script src="https://cdn' not in html
        assert "Plotly.newPlot" in html


def test_matplotlib_png(tmp_path, reduced, magnitudes):
    for name, fig in _plots(reduced, magnitudes, "matplotlib").items():
        path = P.save_figure(fig, tmp_path / f"{name}.png")
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, name


def test_line_plot_content(reduced):
    fig = P.line_plot(reduced, "wedding", baseline=0.02)
    assert len(fig.data) == 3  # one line per layer
    assert list(fig.data[0].y) == pytest.approx([0.04, 0.08, 0.16, 0.32])
    assert list(fig.data[0].error_y.array) == [0.05] * 4
    two = pd.concat([reduced, reduced.assign(prompts="q")])
    assert len(P.line_plot(two, "wedding").data) == 6  # a panel per prompt


def test_heatmap_grid(reduced):
    fig = P.heatmap(reduced, "wedding")
    z = fig.data[0].z
    assert len(z) == 3 and len(z[0]) == 4 and z[2][3] == pytest.approx(6 * 8 / 50)


def test_bad_input(tmp_path, reduced):
    with pytest.raises(actadd.ActAddError, match="backend"):
        P.line_plot(reduced, "wedding", backend="bokeh")
    with pytest.raises(actadd.ActAddError, match="no columns"):
        P.heatmap(reduced, "sentiment")
    with pytest.raises(actadd.ActAddError, match="html"):
        P.save_figure(P.line_plot(reduced, "wedding"), tmp_path / "x.png")
    with pytest.raises(actadd.ActAddError, match="png"):
        P.save_figure(P.line_plot(reduced, "wedding", backend="matplotlib"), tmp_path / "x.html")
    with pytest.raises(actadd.ActAddError, match="empty"):
        P.line_plot(reduced.iloc[:0], "wedding")
