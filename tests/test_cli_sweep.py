"""`actadd sweep` end to end on a tiny model saved to disk."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from actadd.cli import app


@pytest.fixture(scope="module")
def model_dir(tiny_dir):
    return tiny_dir("llama")


def test_sweep_writes_rows_summary_plots_and_prints_the_best(model_dir, tmp_path):
    out = tmp_path / "res"
    result = CliRunner().invoke(
        app,
        [
            "sweep",
            "--model",
            str(model_dir),
            "--prompt",
            "hello there friend",
            "--add",
            "ab",
            "--sub",
            "cd",
            "--layers",
            "0,2",
            "--coeffs",
            "1,4",
            "--metric",
            "words",
            "--words",
            "e,a",
            "--metric",
            "sentiment",
            "--n",
            "3",
            "--tokens",
            "5",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "best configurations by words" in result.output and "unsteered" in result.output
    rows = pd.read_csv(out / "rows.csv")
    assert len(rows) == 3 + 2 * 2 * 3 and (~rows.is_modified).sum() == 3
    assert {"words", "sentiment", "loss", "layer", "coeff"} <= set(rows.columns)
    assert len(pd.read_parquet(out / "rows.parquet")) == len(rows)
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 4 and {"words_sem", "words_diff"} <= set(summary.columns)
    for name in ("words_by_layer", "words_heatmap", "sentiment_by_layer", "loss_heatmap"):
        for ext in ("html", "png"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000, name


def test_sweep_rejects_bad_options(model_dir, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["sweep", "--model", str(model_dir), "--metric", "joy"])
    assert bad.exit_code == 2 and "unknown metric" in bad.output
    words = runner.invoke(app, ["sweep", "--model", str(model_dir), "--metric", "words"])
    assert words.exit_code == 2 and "--words" in words.output
    layers = runner.invoke(app, ["sweep", "--model", str(model_dir), "--layers", "two"])
    assert layers.exit_code != 0
