"""A plain ``pip install actadd`` is the steering core: every feature that needs an extra says
which one, in Python and in the terminal (where rich must not eat the ``[extra]``)."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

import actadd
from actadd.cli import app


def forget(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Drop ``modules`` (and their submodules) from the import cache, to import them afresh."""
    for name in list(sys.modules):
        if any(name == m or name.startswith(m + ".") for m in modules):
            monkeypatch.delitem(sys.modules, name)


def hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``import module`` fail as it does when the package is not installed."""
    forget(monkeypatch, *modules)
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def test_import_actadd_needs_only_the_core():
    code = (
        "import sys\n"
        "for m in ('fastapi', 'uvicorn', 'plotly', 'matplotlib', 'vaderSentiment', 'ray'):\n"
        "    sys.modules[m] = None\n"
        "import actadd\n"
        "actadd.LM, actadd.steer, actadd.SteeringVector, actadd.metrics.word_count\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_import_actadd_does_not_load_torch():
    code = "import sys, actadd, actadd.cli\nprint('torch' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sentiment_names_the_research_extra(monkeypatch):
    from actadd import metrics

    metrics._vader.cache_clear()
    hide(monkeypatch, "vaderSentiment")
    with pytest.raises(actadd.MissingDependencyError, match=r"pip install 'actadd\[research\]'"):
        metrics.sentiment(["good"])
    metrics._vader.cache_clear()


@pytest.mark.parametrize("backend", ["plotly", "matplotlib"])
def test_plots_name_the_research_extra(monkeypatch, backend):
    from actadd import plots

    hide(monkeypatch, backend)
    df = pd.DataFrame({"layer": [1], "coeff": [1.0], "m": [0.5]})
    with pytest.raises(actadd.MissingDependencyError, match=r"actadd\[research\]"):
        plots.line_plot(df, "m", backend=backend)


def test_serve_names_the_serve_extra_in_python_and_in_the_terminal(monkeypatch):
    hide(monkeypatch, "fastapi")
    forget(monkeypatch, "actadd.serve")
    with pytest.raises(actadd.MissingDependencyError, match=r"pip install 'actadd\[serve\]'"):
        importlib.import_module("actadd.serve")
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2
    assert "pip install 'actadd[serve]'" in result.output, result.output


def test_every_install_hint_in_the_help_keeps_its_extra():
    runner = CliRunner(env={"COLUMNS": "400"})  # one hint per line, none wrapped
    texts = [runner.invoke(app, [*cmd, "--help"]).output for cmd in (["sweep"], ["serve"])]
    hints = [line for text in texts for line in text.splitlines() if "pip install" in line]
    assert len(hints) == 2, "sweep --target and serve name their extras"
    for line in hints:
        assert re.search(r"pip install 'actadd\[(research|serve)\]'", line), line
