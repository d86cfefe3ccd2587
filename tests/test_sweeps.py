"""actadd.sweeps: bookkeeping, batch-size invariance, paired seeds, interrupts, reduction."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import actadd
from actadd import metrics as M
from actadd import sweeps as S

PROMPTS = ["hello there friend", "abcdef"]
SAMPLING = dict(temperature=1.0, top_p=0.9, freq_penalty=1.0)


def _configs():
    return S.make_activation_additions([[("ab", 1.0), ("cd", -1.0)]], [0, 2], [1.0, 4.0])


def test_make_activation_additions_is_the_product():
    df = S.make_activation_additions(
        [[(" weddings", 2.0), (" ", -1.0)], "Love"],
        [2, "blocks.6.hook_resid_post"],
        [1, 3],
        dim_fractions=[0.5, 1.0],
    )
    assert len(df) == 2 * 2 * 2 * 2
    assert list(df.columns) == [
        "activation_additions",
        "phrases",
        "act_name",
        "layer",
        "coeff",
        "dim_fraction",
    ]
    row = df[(df.layer == 6) & (df.coeff == 3) & (df.dim_fraction == 0.5)].iloc[0]
    inner = [a.addition for a in row.activation_additions]
    assert [a.coeff for a in inner] == [6.0, -3.0]
    assert {a.act_name for a in inner} == {"blocks.6.hook_resid_post"}
    assert row.phrases == "+2×' weddings' −1×' '"
    assert set(df[df.phrases == "+1×'Love'"].layer) == {2, 6}
    with pytest.raises(actadd.ActAddError, match="model"):
        S.make_activation_additions(["a"], [0], [1], pad=True)
    with pytest.raises(actadd.ActAddError):
        S.make_activation_additions([], [0], [1])
    with pytest.raises(actadd.SiteError):
        S.make_activation_additions(["a"], ["layer six"], [1])


def test_pad_makes_equal_lengths(llama):
    df = S.make_activation_additions(
        [[("abcd", 1.0), ("x", -1.0)]], [1], [2], pad=True, model=llama
    )
    a, b = df.activation_additions[0]
    assert len(a.tokens) == len(b.tokens) == len(llama.token_ids("abcd"))
    assert b.tokens[-1] == llama.to_single_token(" ")


def test_sliced_addition_zeroes_other_dims_and_matches_res_stream_slice(llama):
    base = actadd.ActivationAddition(3.0, 1, prompt="ab")
    (inj,) = S.SlicedAddition(base, fraction=0.25).injections(llama)
    (full,) = base.injections(llama)
    k = round(0.25 * llama.d_model)
    assert torch.equal(inj.tensor[:, :k], full.tensor[:, :k])
    assert (inj.tensor[:, k:] == 0).all()
    assert torch.equal(
        S.SlicedAddition(base, fraction=1.0).injections(llama)[0].tensor, full.tensor
    )
    kw = dict(tokens_to_generate=6, temperature=0)
    a = actadd.gen_using_activation_additions(
        llama, [S.SlicedAddition(base, fraction=0.25)], ["hello"], **kw
    )
    b = actadd.gen_using_activation_additions(
        llama, [base], ["hello"], res_stream_slice=slice(0, k), **kw
    )
    assert a.completions[0] == b.completions[0]
    with pytest.raises(actadd.ActAddError):
        S.SlicedAddition(base, fraction=1.5)
    with pytest.raises(actadd.ActAddError):
        S.SlicedAddition(base)


def test_sweep_bookkeeping(llama):
    configs = _configs()
    normal, patched = S.sweep_over_prompts(
        llama,
        PROMPTS,
        configs,
        3,
        2,
        5,
        seed=100,
        metrics_dict={"e_count": M.get_word_count_metric(["e"])},
        progress=False,
        **SAMPLING,
    )
    assert len(normal) == 2 * 3 and len(patched) == 2 * len(configs) * 2
    assert not normal.is_modified.any() and patched.is_modified.all()
    assert (normal.seed == 100 + normal.completion_index).all()
    assert (patched.seed == 100 + patched.completion_index).all()
    assert "activation_addition_index" not in normal.columns
    for _, r in patched.iterrows():  # each row carries its configuration
        cfg = configs.iloc[r.activation_addition_index]
        assert (r.layer, r.coeff, r.act_name) == (cfg.layer, cfg.coeff, cfg.act_name)
    assert {"e_count", "loss", "additions", "phrases"} <= set(patched.columns)
    assert patched.e_count.tolist() == M.word_count(patched.completions, ["e"]).tolist()
    assert normal.attrs["interrupted"] is False


def test_each_row_is_steered_by_its_own_configuration(llama):
    configs = _configs()
    _, patched = S.sweep_over_prompts(
        llama, PROMPTS[0], configs, 0, 2, 6, seed=7, progress=False, **SAMPLING
    )
    for c, adds in enumerate(configs.activation_additions):
        solo = actadd.gen_using_activation_additions(
            llama, adds, [PROMPTS[0]] * 2, tokens_to_generate=6, seeds=[7, 8], **SAMPLING
        )
        mine = patched[patched.activation_addition_index == c]
        assert mine.completions.tolist() == solo.completions.tolist()


def test_results_do_not_depend_on_batch_size(llama):
    runs = [
        S.sweep_over_prompts(
            llama, PROMPTS, _configs(), 2, 2, 6, seed=3, batch_size=bs, progress=False, **SAMPLING
        )
        for bs in (1, 5, 1000)
    ]
    for normal, patched in runs[1:]:
        pd.testing.assert_frame_equal(normal, runs[0][0])
        pd.testing.assert_frame_equal(patched, runs[0][1])
    auto = S.sweep_over_prompts(
        llama, PROMPTS, _configs(), 2, 2, 6, seed=3, progress=False, **SAMPLING
    )
    pd.testing.assert_frame_equal(auto[1], runs[0][1])


def test_paired_sampling_zero_coefficient_reproduces_the_baseline(llama):
    configs = S.make_activation_additions([[("ab", 1.0), ("cd", -1.0)]], [1], [0.0, 5.0])
    normal, patched = S.sweep_over_prompts(
        llama, PROMPTS, configs, 4, 4, 8, seed=11, progress=False, **SAMPLING
    )
    key = ["prompts", "seed"]
    zero = patched[patched.coeff == 0].merge(normal, on=key, suffixes=("", "_u"))
    assert len(zero) == 8
    assert (zero.completions == zero.completions_u).all()  # same seed, no steering: same text
    strong = patched[patched.coeff == 5].merge(normal, on=key, suffixes=("", "_u"))
    assert (strong.completions != strong.completions_u).any()
    # a different seed base gives different texts: the seeds are really used
    other, _ = S.sweep_over_prompts(
        llama, PROMPTS, configs, 4, 0, 8, seed=12, progress=False, **SAMPLING
    )
    assert (other.completions.to_numpy() != normal.completions.to_numpy()).any()


def test_interrupt_keeps_finished_rows(llama, monkeypatch):
    calls = {"n": 0}
    real = S.gen_using_activation_additions

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "gen_using_activation_additions", flaky)
    normal, patched = S.sweep_over_prompts(
        llama,
        PROMPTS,
        _configs(),
        2,
        2,
        5,
        seed=0,
        batch_size=3,
        metrics_dict={"n": M.get_word_count_metric(["e"])},
        progress=True,
        **SAMPLING,
    )
    assert len(normal) + len(patched) == 6  # two batches of 3 finished
    assert normal.attrs["interrupted"] and patched.attrs["interrupted"]
    assert "n" in normal.columns and "n" in patched.columns
    assert patched.layer.notna().all()


def test_sweep_rejects_bad_input(llama):
    with pytest.raises(actadd.ActAddError, match="no additions"):
        S.sweep_over_prompts(llama, PROMPTS, [[]], 1, 1, 2, seed=0, progress=False)
    with pytest.raises(actadd.ActAddError, match="activation_additions"):
        S.sweep_over_prompts(llama, PROMPTS, pd.DataFrame({"x": [1]}), 1, 1, 2, progress=False)


def test_reduce_by_hand():
    normal = pd.DataFrame(
        {
            "prompts": ["p"] * 3,
            "completions": ["", "", ""],
            "is_modified": False,
            "loss": [1.0, 2.0, 3.0],
            "seed": [0, 1, 2],
            "completion_index": [0, 1, 2],
            "m": [0.0, 1.0, 0.0],
        }
    )
    patched = pd.DataFrame(
        {
            "prompts": ["p"] * 4,
            "completions": [""] * 4,
            "is_modified": True,
            "loss": [1.0, 1.0, 2.0, 4.0],
            "seed": [0, 1, 0, 1],
            "completion_index": [0, 1, 0, 1],
            "activation_addition_index": [0, 0, 1, 1],
            "layer": [2, 2, 4, 4],
            "coeff": [1.0, 1.0, 1.0, 1.0],
            "m": [1.0, 1.0, 0.0, 3.0],
        }
    )
    patched.attrs["config_columns"] = ["layer", "coeff"]
    rn, rp = S.reduce_sweep_results(normal, patched)
    assert rn.m[0] == pytest.approx(1 / 3) and rn.n[0] == 3
    assert rn.m_sem[0] == pytest.approx(np.std([0, 1, 0], ddof=1) / math.sqrt(3))
    assert rp.layer.tolist() == [2, 4]
    assert rp.m.tolist() == [1.0, 1.5] and rp.m_sem[1] == pytest.approx(1.5)
    # paired: config 0: (1-0, 1-1) -> 0.5; config 1: (0-0, 3-1) -> 1.0
    assert rp.m_diff.tolist() == [0.5, 1.0]
    assert rp.loss_diff.tolist() == [-0.5, 1.5]  # (0, -1) and (1, 2)
    assert rp.m_diff_sem[0] == pytest.approx(0.5)
    best = S.best_configurations(rp, "m", k=1)
    assert best.layer.tolist() == [4]


def test_auto_batch_size_fits_the_budget(llama):
    big = S.auto_batch_size(llama, 10, 40, memory_bytes=1 << 34)
    assert big == 64
    assert S.auto_batch_size(llama, 10, 40, memory_bytes=1) == 1
    mid = S.auto_batch_size(llama, 10, 40, memory_bytes=4 << 20, max_batch=10**6)
    assert 1 < mid < 10**6
    assert S.auto_batch_size(llama, 10, 400, memory_bytes=4 << 20, max_batch=10**6) < mid


@pytest.mark.slow
def test_real_model_sentiment_sweep(real_lm):
    """One small batched sweep on the embedded model: 'Love' − 'Hate' at layer 6 makes
    completions of "I hate you because" kinder than their paired unsteered twins; at layer 2
    with the same coefficient the rows are still bookkept separately."""
    configs = S.make_activation_additions([[("Love", 1.0), ("Hate", -1.0)]], [2, 6], [5.0])
    normal, patched = S.sweep_over_prompts(
        real_lm,
        "I hate you because",
        configs,
        6,
        6,
        24,
        seed=0,
        metrics_dict={"sentiment": M.get_sentiment_metric()},
        progress=False,
        temperature=1.0,
        top_p=0.3,
        freq_penalty=1.0,
    )
    rn, rp = S.reduce_sweep_results(normal, patched)
    assert len(normal) == 6 and len(patched) == 12 and rp.n.tolist() == [6, 6]
    layer6 = rp[rp.layer == 6].iloc[0]
    assert layer6.sentiment_diff > 0.2, rp[["layer", "sentiment", "sentiment_diff"]]
    assert layer6.sentiment > rn.sentiment[0]
