"""Evaluation suites: the schema names the bad field, and a suite runs on a tiny model into a
report that holds every method, its random control and the prompting baseline."""

from __future__ import annotations

import copy
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

import actadd
from actadd.cli import app
from actadd.evaluation import list_suites, load_suite, run_suite

PROMPTS = ["abcdef", "hello there", "the cat sat", "a quick fox"]
TINY = {
    "samples": 2,
    "tokens": 5,
    "neutral": "neutral",
    "controls": 2,
    "behaviours": [
        {
            "name": "letters",
            "metric": "words",
            "words": ["a", "e"],
            "prompts": PROMPTS,
            "methods": [
                {"kind": "pair", "add": "ab", "sub": "cd", "layer": 1, "coeff": 4},
                {"kind": "mean_diff", "pairs": "sentiment", "layer": 1, "coeff": 8},
                {"kind": "prompting", "instruction": "Say a:"},
            ],
        },
        {
            "name": "other",
            "metric": "words",
            "words": ["z"],
            "direction": "minimize",
            "prompts": PROMPTS[:2],
            "methods": [{"kind": "pca", "pairs": "sentiment", "layer": 2, "coeff": 4}],
        },
    ],
}


def bad(**changes) -> dict:
    suite = copy.deepcopy(TINY)
    for path, value in changes.items():
        node = suite
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        last = keys[-1]
        if value is KeyError:
            del node[int(last) if last.isdigit() else last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return suite


def test_the_shipped_suite_is_valid():
    assert "quick" in list_suites()
    suite = load_suite("quick")
    assert [b.name for b in suite.behaviours] == ["sentiment", "weddings"]
    kinds = {m.kind for b in suite.behaviours for m in b.methods}
    assert kinds == {"pair", "mean_diff", "pca", "optimized", "prompting"}


M0 = "behaviours__0__methods__"
PAIR = {"kind": "pair", "add": "ab", "sub": "cd", "layer": 1, "coeff": 4}
SCHEMA_ERRORS = [
    ({M0 + "0__layer": KeyError}, r"behaviours\[0\]\.methods\[0\]: .*needs layer"),
    ({M0 + "1__lyer": 3}, r"behaviours\[0\]\.methods\[1\]\.lyer: unknown field"),
    ({M0 + "0__kind": "steer"}, r"methods\[0\]\.kind: Input should be 'pair'"),
    ({M0 + "2__instruction": KeyError}, r"methods\[2\]: .*needs instruction"),
    ({"behaviours__1__methods": []}, r"behaviours\[1\]\.methods: List should have at least 1"),
    ({"samples": 0}, r"samples: Input should be greater than or equal to 1"),
    ({M0 + "0__coeff": float("nan")}, r"methods\[0\]\.coeff: .*finite"),
    ({"behaviours__0__prompts": KeyError}, r"behaviours\[0\]\.prompts: Field required"),
    ({M0 + "1__name": "pair"}, None),  # a fine name
    ({M0 + "2": PAIR}, r"methods named twice"),
]


@pytest.mark.parametrize(("changes", "message"), SCHEMA_ERRORS)
def test_schema_errors_name_the_field(changes, message):
    suite = bad(**changes)
    if message is None:
        load_suite(suite)
        return
    with pytest.raises(actadd.ActAddError, match=message):
        load_suite(suite)


def test_yaml_and_file_errors(tmp_path):
    with pytest.raises(actadd.ActAddError, match="no suite"):
        load_suite(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("behaviours:\n  - name: [unclosed\n")
    with pytest.raises(actadd.ActAddError, match=r"not valid YAML at line \d+, column \d+"):
        load_suite(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(actadd.ActAddError, match="must be a mapping"):
        load_suite(listy)


@pytest.fixture(scope="module")
def tiny_result(tiny_factory):
    return run_suite(tiny_factory("llama"), TINY)


def test_a_suite_runs_into_a_report(tiny_result, tmp_path):
    res = tiny_result
    r = res.results
    letters = r[r.behaviour == "letters"]
    assert list(letters.kind) == [
        "unsteered", "steering", "control", "steering", "control", "prompting"
    ]  # fmt: skip
    # every arm saw the same prompts and seeds: 4 prompts × 2 samples
    assert (letters.n == 8).all() and (r[r.behaviour == "other"].n == 4).all()
    assert letters[letters.kind == "steering"].fluency.notna().all()
    assert letters[letters.kind == "prompting"].fluency.isna().all()
    assert len(res.contrasts) == 3 and set(res.contrasts.kind) == {"control"}
    assert len(res.rows) == 4 * 2 * 6 + 2 * 2 * 3
    written = res.save(tmp_path)
    assert {p.name for p in written} == {"results.csv", "completions.csv.gz", "report.html"}
    back = pd.read_csv(tmp_path / "results.csv")
    assert list(back.method) == list(r.method)
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "letters" in html


def test_paired_effects_add_up(tiny_result):
    """delta is the mean of (method − unsteered) over the same prompts and seeds."""
    rows = tiny_result.rows
    rows = rows[rows.behaviour == "letters"].set_index(["arm", "prompts", "seed"]).value
    method = tiny_result.results.method.iloc[1]
    expected = (rows.loc[method] - rows.loc["unsteered"]).mean()
    assert tiny_result.results.delta.iloc[1] == pytest.approx(expected)


def test_cli_eval(tiny_dir, tmp_path):
    import yaml

    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(TINY))
    runner = CliRunner()
    r = runner.invoke(app, ["eval", str(path), "--model", str(tiny_dir("llama")),
                            "--out", str(tmp_path / "out")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "letters" in r.output and (tmp_path / "out" / "report.html").is_file()
    assert runner.invoke(app, ["eval", "quick", "--dry-run"]).exit_code == 0
    path.write_text(yaml.safe_dump(bad(behaviours__0__methods__0__layer="six")))
    r = runner.invoke(app, ["eval", str(path)])
    assert r.exit_code == 2 and "behaviours[0].methods[0].layer" in r.output


def test_suites_name_their_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(actadd.MissingDependencyError, match=r"actadd\[tune\]"):
        load_suite("quick")
