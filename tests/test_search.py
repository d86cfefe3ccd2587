"""Pair search: next-token effectiveness equals a direct computation; ranking and re-scoring."""

from __future__ import annotations

import pytest
import torch

import actadd
from actadd.search import search_pairs, target_token_ids, word_metric

PROMPTS = ["hello world", "xyzzy plugh"]


def direct_effectiveness(lm, pos, neg, targets, layer, coeff):
    tids = target_token_ids(lm, targets)
    out = []
    for p in PROMPTS:
        ids = lm.to_tokens(p)
        with torch.no_grad():
            base = torch.log_softmax(lm.model(ids).logits[0, -1].float(), -1)
            with actadd.steer(lm, actadd.get_x_vector(pos, neg, coeff, layer)):
                steered = torch.log_softmax(lm.model(ids).logits[0, -1].float(), -1)
        out.append(float(steered[tids].logsumexp(0) - base[tids].logsumexp(0)))
    return sum(out) / len(out)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_effectiveness_equals_direct_computation_and_ranks(tiny_factory, arch):
    lm = tiny_factory(arch)
    df = search_pairs(
        lm,
        ["q"],
        PROMPTS,
        candidates=["ab", "q", "zz"],
        negatives=[" ", "k"],
        layer=1,
        coeff=3.0,
        batch_size=5,
    )
    assert len(df) == 6 and list(df.columns[:5]) == [
        "positive",
        "negative",
        "effectiveness",
        "kl",
        "score",
    ]
    assert df.score.is_monotonic_decreasing
    for row in df.itertuples():
        expected = direct_effectiveness(lm, row.positive, row.negative, ["q"], 1, 3.0)
        assert row.effectiveness == pytest.approx(expected, abs=1e-5)
        assert row.kl >= 0
    top = search_pairs(
        lm, ["q"], PROMPTS, candidates=["ab", "q", "zz"], layer=1, top_k=2, kl_weight=1.0
    )
    assert len(top) == 2 and (top.score == top.effectiveness - top.kl).all()


def test_rescoring_with_generations(llama):
    df = search_pairs(
        llama,
        ["q"],
        PROMPTS,
        candidates=["ab", "q", "zz"],
        layer=1,
        coeff=3.0,
        rescore=2,
        samples=2,
        tokens=4,
        temperature=0,
    )
    assert {"gen_score", "gen_baseline"} <= set(df.columns)
    assert df.gen_score.iloc[:2].notna().all() and df.gen_score.iloc[2:].isna().all()
    assert 0 <= df.gen_score.iloc[0] <= 1


def test_errors_and_metric(llama):
    with pytest.raises(actadd.PromptError, match="shortest prompt"):
        search_pairs(llama, ["q"], ["ab"], candidates=["a much longer candidate"], layer=1)
    with pytest.raises(actadd.ActAddError, match="no pairs"):
        search_pairs(llama, ["q"], PROMPTS, layer=1)
    m = word_metric(["wedding", "bride"])
    assert m("The Bride smiled") == 1.0 and m("bridesmaid") == 0.0
