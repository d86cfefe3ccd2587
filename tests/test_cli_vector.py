"""`actadd vector ...` and `actadd compare --vector` on a tiny model saved to disk."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import actadd
from actadd import SteeringVector
from actadd.cli import app

PAIRS = [("good day", "bad day"), ("nice cat", "mean cat"), ("I win", "I lose")]


@pytest.fixture(scope="module")
def model_dir(tiny_dir):
    return tiny_dir("llama")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"positive": p, "negative": n}) + "\n" for p, n in PAIRS))
    return path


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_make_show_export_and_compare(model_dir, pairs_file, tmp_path):
    out = tmp_path / "v.safetensors"
    make = ["vector", "make", "--model", str(model_dir), "--pairs", str(pairs_file)]
    text = run(*make, "--layers", "1-2", "--method", "pca", "--coeff", "2", "--out", str(out))
    assert "blocks.2.hook_resid_pre" in text and out.exists()
    lm = actadd.load_model(str(model_dir), device="cpu")
    v = SteeringVector.load(out, lm)
    assert v.sites == ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"] and v.coeff == 2.0
    assert v.meta["method"] == "pca" and v.meta["data"]["n_pairs"] == 3

    # layer 1's input is the output of layer 0: llama.cpp has no slot for it
    result = CliRunner().invoke(
        app, ["vector", "export", str(out), "--gguf", str(tmp_path / "x.gguf")]
    )
    assert result.exit_code == 2 and "direction.0" in result.output
    only2 = tmp_path / "l2.safetensors"
    run(*make, "--layers", "2", "--out", str(only2))
    gguf = tmp_path / "v.gguf"
    text = run("vector", "export", str(only2), "--gguf", str(gguf))
    assert "blocks.2.hook_resid_pre → direction.1" in text
    back = tmp_path / "back.safetensors"
    run("vector", "export", str(gguf), "--safetensors", str(back))
    w = SteeringVector.load(back, lm)
    assert w.sites == ["blocks.1.hook_resid_post"]
    assert "resid_post" in run("vector", "show", str(gguf))

    text = run(
        "compare",
        "--model",
        str(model_dir),
        "--prompt",
        "hello there",
        "--vector",
        str(only2),
        "--coeff",
        "4",
        "--n",
        "2",
        "--tokens",
        "4",
    )
    assert "4 × ('mean_diff')" in text and ", all" in text


def test_optimize_and_search(model_dir, pairs_file, tmp_path):
    out, losses = tmp_path / "o.safetensors", tmp_path / "losses.csv"
    text = run(
        "vector",
        "optimize",
        "--model",
        str(model_dir),
        "--pairs",
        str(pairs_file),
        "--layer",
        "1",
        "--steps",
        "3",
        "--neutral",
        "none",
        "--out",
        str(out),
        "--losses",
        str(losses),
    )
    assert "loss curve" in text and out.exists() and len(losses.read_text().splitlines()) == 4
    text = run(
        "vector",
        "search",
        "--model",
        str(model_dir),
        "--targets",
        "q",
        "--prompt",
        "hello world",
        "--candidate",
        "ab",
        "--candidate",
        "q",
        "--layer",
        "1",
    )
    assert "effectiveness" in text and "'ab'" in text


def test_errors_are_reported(model_dir, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nonsense")
    result = CliRunner().invoke(app, ["vector", "show", str(bad)])
    assert result.exit_code == 2 and "corrupted" in result.output
    args = ["--model", str(model_dir), "--pairs", "nope", "--out", str(tmp_path / "o.safetensors")]
    result = CliRunner().invoke(app, ["vector", "make", *args])
    assert result.exit_code == 2 and "no dataset 'nope'" in result.output


def test_condition_fit_command(model_dir, tmp_path):
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.jsonl"
    pos.write_text("\n".join(f"{w} apple pie" for w in ("my", "an", "red", "one", "big", "old")))
    neg.write_text(
        "".join(json.dumps({"prompt": f"{w} zebra 99"}) + "\n" for w in ("my", "an", "red", "one"))
    )
    out = tmp_path / "c.safetensors"
    text = run(
        "condition",
        "fit",
        "--model",
        str(model_dir),
        "--pos",
        str(pos),
        "--neg",
        str(neg),
        "--layers",
        "1,2",
        "--out",
        str(out),
    )
    assert "held-out scores per layer" in text and "precision" in text and out.exists()
    c = actadd.Condition.load(out)
    assert c.site in ("blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre")
    result = CliRunner().invoke(
        app,
        ["condition", "fit", "--pos", str(tmp_path / "none.txt"), "--neg", "other", "--out", "x"],
    )
    assert result.exit_code == 2 and "file not found" in result.output
