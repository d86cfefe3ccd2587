"""Held-out scoring: splits, paired effects, intervals, contrasts, anti-steerable inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import actadd
from actadd.heldout import Arm, bootstrap_ci, score_arms, split_prompts, summarize_arms


def test_split_is_seeded_disjoint_and_dedupes():
    prompts = [f"prompt {i}" for i in range(10)] + ["prompt 3", " prompt 4 "]
    tune, test = split_prompts(prompts, test_fraction=0.3, seed=1)
    assert len(tune) == 7 and len(test) == 3 and not set(tune) & set(test)
    assert sorted(tune + test) == sorted(f"prompt {i}" for i in range(10))
    assert split_prompts(prompts, test_fraction=0.3, seed=1) == (tune, test)
    assert split_prompts(prompts, test_fraction=0.3, seed=2) != (tune, test)
    t, s = split_prompts(["a", "b"], test_fraction=0.9)
    assert len(t) == 1 and len(s) == 1  # both sides keep a prompt
    with pytest.raises(actadd.ActAddError, match="at least 2"):
        split_prompts(["a", "a "])
    with pytest.raises(actadd.ActAddError, match="test_fraction"):
        split_prompts(["a", "b"], test_fraction=1.0)


def test_bootstrap_ci_covers_the_mean_and_narrows_with_data():
    rng = np.random.default_rng(0)
    small, big = rng.normal(1, 1, 8), rng.normal(1, 1, 200)
    lo, hi = bootstrap_ci(small)
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_ci(big)
    assert hi2 - lo2 < hi - lo and lo2 < 1 < hi2
    assert bootstrap_ci(np.array([0.5])) == (0.5, 0.5)


def rows_with(effects: dict[str, dict[str, float]], seeds: int = 3) -> pd.DataFrame:
    """Rows whose value is the unsteered base (seed-dependent) plus a known effect."""
    out = []
    prompts = list(next(iter(effects.values())))
    for p in prompts:
        for s in range(seeds):
            base = 0.1 * s + len(p)
            out.append({"arm": "unsteered", "prompts": p, "seed": s, "loss": 1.0, "value": base})
            for arm, per in effects.items():
                out.append(
                    {"arm": arm, "prompts": p, "seed": s, "loss": 2.0, "value": base + per[p]}
                )
    return pd.DataFrame(out)


def test_paired_effects_contrasts_and_anti_steerable():
    effects = {
        "good": {"a": 1.0, "bb": 0.5, "ccc": 0.8, "dddd": -0.2},
        "none": {"a": 0.0, "bb": 0.1, "ccc": -0.1, "dddd": 0.0},
    }
    rows = rows_with(effects)
    arms = [Arm("good"), Arm("none", kind="control")]
    summary, contrasts, per_prompt = summarize_arms(rows, arms, contrasts=[("good", "none")])
    s = summary.set_index("arm")
    assert s.loc["good", "delta"] == pytest.approx(np.mean(list(effects["good"].values())))
    assert s.loc["good", "anti_steerable"] == 0.25  # "dddd" moved the wrong way
    assert s.loc["good", "n"] == 12 and s.loc["good", "n_prompts"] == 4
    assert s.loc["good", "ci_low"] <= s.loc["good", "delta"] <= s.loc["good", "ci_high"]
    c = contrasts.iloc[0]
    assert c["diff"] == pytest.approx(0.525) and c["against"] == "none"
    pp = per_prompt[per_prompt.arm == "good"].set_index("prompts").effect
    assert pp.to_dict() == pytest.approx(effects["good"])
    down, _, _ = summarize_arms(rows, arms, direction="minimize")
    assert down.set_index("arm").loc["good", "anti_steerable"] == 0.75
    with pytest.raises(actadd.ActAddError, match="no such arm"):
        summarize_arms(rows, arms, contrasts=[("good", "missing")])


def test_score_arms_pairs_every_arm_with_the_same_seeds(llama):
    add = actadd.ActivationAddition(20.0, 1, prompt="ab")
    arms = [
        Arm("steer", [add], info={"layer": 1, "coeff": 4.0}),
        Arm("prefix", prefix="zz:", kind="prompting"),
        Arm("per-seed", lambda seed: [add] if seed % 2 else [], kind="control"),
    ]
    seen = []

    def metric(rows: pd.DataFrame) -> list[float]:
        seen.append(rows.copy())
        return [float(len(c)) for c in rows.completions]

    rows = score_arms(
        llama, ["hello", "world"], arms, metric, samples=2, seed=5, tokens_to_generate=4,
        batch_size=3,
    )  # fmt: skip
    assert len(rows) == 2 * 2 * 4
    assert set(rows.seed) == {5, 6} and set(rows.prompts) == {"hello", "world"}
    assert seen[0].loc[seen[0].arm == "steer", "layer"].eq(1).all()  # metrics see the config
    # a row's completion depends only on its prompt, seed and steering: "per-seed" is steered
    # on odd seeds only, so it equals "steer" there and "unsteered" on even seeds
    r = rows.set_index(["arm", "prompts", "seed"]).completions
    for p in ("hello", "world"):
        assert r["per-seed", p, 5] == r["steer", p, 5]
        assert r["per-seed", p, 6] == r["unsteered", p, 6]
    assert any(
        r["steer", p, sd] != r["unsteered", p, sd] for p in ("hello", "world") for sd in (5, 6)
    )
    with pytest.raises(actadd.ActAddError, match="distinct"):
        score_arms(llama, ["hello"], [Arm("unsteered")], metric, samples=1, seed=0)
    assert Arm("x", prefix="Say:").prompt("hi") == "Say: hi"
