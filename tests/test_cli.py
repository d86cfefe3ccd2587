"""The command line, on a tiny model saved to disk (also exercises load_model on a local dir)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

import actadd
from actadd.cli import app


@pytest.fixture(scope="module")
def model_dir(tiny_dir):
    return tiny_dir("gpt2")


def test_load_model_from_local_dir(model_dir):
    lm = actadd.load_model(str(model_dir), device="cpu")
    assert lm.n_layers == 3 and lm.prepend_bos
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_load_model_errors(tmp_path):
    with pytest.raises(actadd.ModelLoadError, match="GGUF file not found"):
        actadd.load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(actadd.ModelLoadError, match="model directory not found"):
        actadd.load_model(str(tmp_path / "not-a-model"))
    with pytest.raises(actadd.ModelLoadError, match=r"model directory not found: .*my_model"):
        actadd.load_model("./my_model")  # not a hub id: no hub error, no GGUF hint
    (tmp_path / "empty").mkdir()
    with pytest.raises(actadd.ModelLoadError, match=r"(?s)could not load.*needs a config.json"):
        actadd.load_model(str(tmp_path / "empty"))


def test_compare_command(model_dir):
    result = CliRunner().invoke(
        app,
        [
            "compare",
            "--model",
            str(model_dir),
            "--prompt",
            "hello there",
            "--add",
            "Lo",
            "--sub",
            "Ha",
            "--layer",
            "1",
            "--coeff",
            "4",
            "--n",
            "2",
            "--tokens",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "unsteered" in result.output and "blocks.1.hook_resid_pre" in result.output


def test_compare_command_bad_input_is_a_clean_error(model_dir):
    result = CliRunner().invoke(
        app, ["compare", "--model", str(model_dir), "--layer", "99", "--tokens", "2"]
    )
    assert result.exit_code == 2
    assert "out of range" in result.output and "Traceback" not in result.output


def test_python_dash_m_help():
    out = subprocess.run(
        [sys.executable, "-m", "actadd", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "compare" in out
