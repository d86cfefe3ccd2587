"""actadd.tune on tiny random models: it finds a planted optimum, respects the fluency budget,
never lets a test prompt or seed into the search, and writes reports that read back."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import actadd
from actadd.cli import app
from actadd.heldout import TEST_SEED_OFFSET
from actadd.sources import additions_of
from actadd.tune_result import TuneResult, TuneSettings, pareto_front
from actadd.tuning import check_reference, default_layers, fluency_scores, rungs

PROMPTS = ["abcdef", "hello there", "the cat sat", "a quick fox", "zebra crossing", "many words"]
NEUTRAL = ("The train leaves at nine.", "Water boils at one hundred degrees.", "Maps show roads.")
PLANTED = (1, 4.0)  # the layer and coefficient the planted metric rewards most


def planted(rows: pd.DataFrame) -> np.ndarray:
    """Best at layer 1, coefficient 4; 0 unsteered; plus a little noise from the text, so the
    search must average completions like a real metric."""
    layer = pd.to_numeric(rows["layer"], errors="coerce") if "layer" in rows else np.nan
    coeff = pd.to_numeric(rows["coeff"], errors="coerce") if "coeff" in rows else np.nan
    score = 1 - 0.5 * np.abs(layer - PLANTED[0]) - 0.3 * np.abs(np.log2(coeff / PLANTED[1]))
    noise = [(sum(map(ord, c)) % 101) / 101 * 0.1 - 0.05 for c in rows["completions"]]
    return np.nan_to_num(np.asarray(score, dtype=float), nan=0.0) + np.asarray(noise)


FAST = dict(
    layers=[0, 1, 2],
    coeffs=[1, 2, 4, 8, 16],
    samples=4,
    min_samples=1,
    tokens_to_generate=6,
    test_samples=2,
    neutral=NEUTRAL,
    seed=0,
)


@pytest.fixture(scope="module")
def planted_run(tiny_factory):
    lm = tiny_factory("llama")
    return actadd.tune(lm, "pair:ab:cd", PROMPTS, metric=planted, budget=1e9, **FAST)


def test_finds_the_planted_optimum(planted_run):
    res = planted_run
    assert (res.chosen["layer"], res.chosen["coeff"]) == PLANTED
    assert len(res.trials) == 15 and res.trials.status.eq("complete").sum() == 4
    # successive halving: rounds of 1, 2, 4 completions per prompt, fewer than a full grid
    assert rungs(1, 4, 2) == [1, 2, 4]
    assert res.stats["search_completions"] < res.stats["naive_grid_completions"]
    # held out, the planted effect (~1) is found again and beats the random control
    h = res.heldout.set_index("arm")
    assert h.loc["chosen", "ci_low"] > 0.8
    assert bool(res.contrasts.set_index("against").loc["random", "beats"])


def score_of(layer: float, coeff: float) -> float:
    return 1 - 0.5 * abs(layer - PLANTED[0]) - 0.3 * abs(math.log2(coeff / PLANTED[1]))


def test_over_budget_configurations_are_never_generated(tiny_factory):
    lm = tiny_factory("llama")
    src = actadd.Source.parse("pair:ab:cd").prepare(lm, FAST["layers"])
    grid = [(layer, c) for layer in FAST["layers"] for c in FAST["coeffs"]]
    flu = fluency_scores(lm, [src.additions(layer, c) for layer, c in grid], NEUTRAL)
    assert len(set(flu)) > 1
    budget = float(np.median(flu))  # about half the grid is over budget
    res = actadd.tune(lm, "pair:ab:cd", PROMPTS, metric=planted, budget=budget, **FAST)
    t = res.trials
    np.testing.assert_allclose(
        t.set_index(["layer", "coeff"]).fluency.loc[grid].to_numpy(), flu, rtol=1e-9
    )
    over = t[t.fluency > budget]
    assert len(over) >= 5 and (over.status == "over budget").all() and (over.n == 0).all()
    assert (t[t.fluency <= budget].n > 0).all()
    assert res.chosen["fluency"] <= budget
    best = max(score_of(layer, c) for (layer, c), f in zip(grid, flu, strict=True) if f <= budget)
    assert score_of(res.chosen["layer"], res.chosen["coeff"]) == pytest.approx(best)


def test_no_configuration_within_budget_says_what_to_do(llama):
    with pytest.raises(actadd.ActAddError, match="raise the budget"):
        actadd.tune(llama, "pair:ab:cd", PROMPTS, metric=planted, budget=1e-6, **FAST)


def test_split_never_leaks(llama):
    seen: list[tuple[str, int]] = []

    def spy(rows: pd.DataFrame) -> np.ndarray:
        seen.extend(zip(rows["prompts"], rows["seed"].astype(int), strict=True))
        return planted(rows)

    prompts = [*PROMPTS, "hello there", " hello there "]  # duplicates must not straddle
    res = actadd.tune(llama, "pair:ab:cd", prompts, metric=spy, budget=1e9, **FAST)
    tune_p, test_p = set(res.split["tune"]), set(res.split["test"])
    assert not tune_p & test_p and tune_p | test_p == set(PROMPTS)
    search = {(p, s) for p, s in seen if s < TEST_SEED_OFFSET}
    held = {(p, s) for p, s in seen if s >= TEST_SEED_OFFSET}
    assert {p for p, _ in search} == tune_p  # the search saw every tune prompt, no test prompt
    assert {p for p, _ in held} == test_p
    assert max(s for _, s in search) < min(s for _, s in held)  # fresh seeds
    assert set(res.rows.prompts) == test_p


def test_report_files_are_written_and_read_back(planted_run, tmp_path):
    res = planted_run
    written = res.save(tmp_path / "out")
    names = {p.name for p in written}
    assert {"report.json", "trials.csv", "pareto.png", "steerability.png", "report.html"} <= names
    back = TuneResult.load(tmp_path / "out")
    pd.testing.assert_frame_equal(back.trials, res.trials, check_dtype=False)
    pd.testing.assert_frame_equal(back.heldout, res.heldout, check_dtype=False)
    assert back.chosen["layer"] == res.chosen["layer"] and back.settings == res.settings
    assert back.vector.allclose(res.vector) and back.vector.meta["recipe"]["coeff"] == 4.0
    assert back.summary() == res.summary()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["split"] == res.split and report["stats"]["configurations"] == 15
    html = (tmp_path / "out" / "report.html").read_text()
    assert "data:image/png;base64," in html and "Pareto" in html
    with pytest.raises(actadd.ActAddError, match="missing"):
        TuneResult.load(tmp_path)


def test_the_saved_choice_rebuilds_the_exact_steering(planted_run, llama, tmp_path):
    res = planted_run
    res.vector.save(tmp_path / "v.safetensors")
    v = actadd.SteeringVector.load(tmp_path / "v.safetensors", llama)
    rebuilt = additions_of(llama, v)
    direct = list(actadd.get_x_vector("ab", "cd", 4.0, 1))
    ids = llama.to_tokens("hello there")
    with actadd.steer(llama, rebuilt):
        a = llama.model(ids).logits
    with actadd.steer(llama, direct):
        b = llama.model(ids).logits
    assert torch_equal(a, b)
    assert v.meta["tune"]["heldout"]["arm"] == "chosen" and "fingerprint" in v.meta


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_tpe_proposes_no_more_than_asked(llama):
    res = actadd.tune(
        llama, "pair:ab:cd", PROMPTS, metric=planted, budget=1e9, trials=6, batch_trials=3, **FAST
    )
    assert len(res.trials) <= 6
    done = res.trials[res.trials.status == "complete"]
    assert res.chosen["delta"] == done.delta.max()


def test_several_sources_and_locations(llama):
    res = actadd.tune(
        llama,
        ["pair:ab:cd", "pair+pad:xyz:"],
        PROMPTS,
        metric=planted,
        budget=1e9,
        locations=["front", "all"],
        **{**FAST, "coeffs": [2, 4]},
    )
    assert set(res.trials.location) == {"front", "all"}
    assert res.trials.source.nunique() == 2 and len(res.trials) == 2 * 3 * 2 * 2
    assert (res.chosen["layer"], res.chosen["coeff"]) == PLANTED


def test_pareto_front():
    t = pd.DataFrame(
        {
            "delta": [0.1, 0.3, 0.2, 0.5, 0.9],
            "fluency": [1.0, 1.2, 1.3, 1.1, 1.0],
            "status": ["complete"] * 4 + ["pruned after 1 per prompt"],
        }
    )
    assert pareto_front(t).delta.tolist() == [0.1, 0.5]
    assert pareto_front(t, direction="minimize").delta.tolist() == [0.1]


def test_settings_and_references_are_checked():
    assert TuneSettings().limit == 1.25 and TuneSettings(fluency="kl").limit == 0.25
    for bad, match in [
        (dict(fluency="bleu"), "fluency"),
        (dict(samples=0), "samples"),
        (dict(min_samples=9, samples=4), "min_samples"),
        (dict(budget=math.inf), "budget"),
        (dict(locations=["middle"]), "addition_location"),
        (dict(direction="up"), "direction"),
        (dict(references=[(6,)]), "reference"),
    ]:
        with pytest.raises(actadd.ActAddError, match=match):
            TuneSettings(**bad)
    assert check_reference("6:5") == (6, 5.0)
    assert check_reference("6:5:all") == (6, 5.0, "all")
    with pytest.raises(actadd.ActAddError, match="LAYER:COEFF"):
        check_reference("six")
    assert default_layers(30) == [1, 5, 9, 12, 16, 20] and default_layers(3) == [1, 2]


def test_bad_input_names_the_fix(llama):
    with pytest.raises(actadd.ActAddError, match="pair:ADD:SUB"):
        actadd.tune(llama, "love-hate", PROMPTS, metric=planted)
    with pytest.raises(actadd.ActAddError, match="at least 2"):
        actadd.tune(llama, "pair:ab:cd", ["abc", "abc "], metric=planted)
    with pytest.raises(actadd.ActAddError, match="unknown metric"):
        actadd.tune(llama, "pair:ab:cd", PROMPTS, metric="happiness")


def test_cli_tune_writes_the_report_and_its_command_reruns(tiny_dir, tmp_path):
    model = str(tiny_dir("llama"))
    out = tmp_path / "out"
    args = [
        "tune", "--add", "ab", "--sub", "cd", "--metric", "words", "--words", "a,e",
        "--layers", "1,2", "--coeffs", "2,4", "--samples", "2", "--min-samples", "1",
        "--test-samples", "2", "--tokens", "5", "--budget", "100", "--reference", "1:2",
        "--out", str(out), "--model", model,
    ]  # fmt: skip
    for p in PROMPTS:
        args += ["--prompt", p]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Pareto front" in result.output and "reproduce:" in result.output
    res = TuneResult.load(out)
    assert res.metric == "words" and res.words == ["a", "e"]
    line = res.command(out)
    assert "--reference 1:2" in line and f"--model {model}" in line
    # the printed command parses and plans the same search
    import shlex

    again = CliRunner().invoke(app, [*shlex.split(line)[1:], "--dry-run"])
    assert again.exit_code == 0, again.output
    assert "3 tune / 3 test prompts" in again.output


def test_cli_errors_before_loading_a_model():
    runner = CliRunner()
    r = runner.invoke(app, ["tune", "--source", "nonsense"])
    assert r.exit_code == 2 and "pair:ADD:SUB" in r.output
    r = runner.invoke(app, ["tune", "--add", "a", "--budget", "-1", "--metric", "nope"])
    assert r.exit_code == 2 and "unknown metric" in r.output


def test_tune_names_its_extra_without_optuna(monkeypatch, llama):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(actadd.MissingDependencyError, match=r"pip install 'actadd\[tune\]'"):
        actadd.tune(llama, "pair:ab:cd", PROMPTS, metric=planted, **FAST)
    r = CliRunner().invoke(app, ["tune", "--add", "a", "--dry-run"])
    assert r.exit_code == 2 and "pip install 'actadd[tune]'" in r.output
