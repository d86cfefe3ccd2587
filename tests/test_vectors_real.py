"""Steering vectors on the embedded SmolLM2-135M-Instruct (slow: real model)."""

from __future__ import annotations

import pytest
import torch
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

import actadd
import actadd.search  # a submodule the test calls by its path
from actadd import SteeringVector

pytestmark = pytest.mark.slow

PROMPTS = ["I hate you because", "The movie was", "My neighbour is", "The food at the party"]
SEEDS = 4
NORM = 16.0  # per token, at blocks.6.hook_resid_pre (median residual norm there: ~108)


def unit(v: SteeringVector) -> SteeringVector:
    (name,) = v.sites
    d = v.directions[name] * v.coeff
    return SteeringVector({name: d / d.norm()}, 1.0, v.meta)


def test_sentiment_vector_moves_vader_more_than_a_single_pair(real_lm):
    """A mean-difference vector from the shipped sentiment pairs makes completions more
    positive, and its negation more negative; the single-pair ActAdd vector ("Love" − "Hate")
    at the same norm and location does less (see docs/experiments.md for the full table)."""
    md = unit(actadd.mean_diff(real_lm, "sentiment", 6))
    pair = unit(SteeringVector.from_additions(real_lm, actadd.get_x_vector("Love", "Hate", 1, 6)))
    groups = {
        "unsteered": [],
        "mean_diff": [md * NORM],
        "negated": [md * -NORM],
        "pair": [pair * NORM],
    }
    texts = [p for p in PROMPTS for _ in range(SEEDS)]
    rows, prompts, seeds = [], [], []
    for adds in groups.values():  # one batched generate: each row steered by its own vector
        rows += [adds] * len(texts)
        prompts += texts
        seeds += list(range(len(texts)))
    df = actadd.gen_using_activation_additions(
        real_lm,
        rows,
        prompts,
        tokens_to_generate=24,
        seeds=seeds,
        top_p=0.3,
        freq_penalty=1.0,
        addition_location="all",
    )
    vader = SentimentIntensityAnalyzer()
    df["vader"] = [vader.polarity_scores(c)["compound"] for c in df.completions]
    df["group"] = [g for g in groups for _ in texts]
    mean = df.groupby("group").vader.mean()
    print(mean.round(3).to_dict())  # shown with -s
    # measured here with <|endoftext|> as the start token: unsteered -0.068, mean_diff 0.542,
    # negated 0.019, pair 0.092 (without a start token: 0.435, 0.629, 0.010, 0.388). These
    # prompts' unsteered completions are now already negative, so the negated vector has no
    # room below them; the two directions must still be far apart
    assert mean["mean_diff"] > mean["unsteered"] + 0.1, mean
    assert mean["mean_diff"] - mean["negated"] > 0.4, mean
    assert mean["mean_diff"] - mean["unsteered"] > mean["pair"] - mean["unsteered"], mean


def test_vector_file_round_trips_on_the_real_model(real_lm, tmp_path):
    v = actadd.mean_diff(real_lm, "weddings", "6-8") * 2
    v.save(tmp_path / "w.safetensors")
    w = SteeringVector.load(tmp_path / "w.safetensors", real_lm)
    assert w.allclose(v) and w.meta["fingerprint"] == real_lm.fingerprint
    v.to_gguf(tmp_path / "w.gguf")
    g = SteeringVector.from_gguf(tmp_path / "w.gguf", real_lm)
    assert g.sites == [f"blocks.{n}.hook_resid_post" for n in (5, 6, 7)]
    ids = real_lm.to_tokens("My friend and I went to")
    with torch.no_grad():
        outs = []
        for vec in (v, g):
            with actadd.steer(real_lm, vec, addition_location="all"):
                outs.append(real_lm.model(ids).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_pair_search_finds_wedding_words(real_lm):
    cands = actadd.search.vocabulary_candidates(real_lm, ["wedding"], 8)
    assert any("wedd" in c or "bride" in c or "marri" in c for c in cands), cands
    df = actadd.search_pairs(
        real_lm,
        ["wedding", "weddings", "bride", "marriage"],
        ["I went up to my friend and said"],
        candidates=cands,
        layer=16,  # where the seed's wedding vector steers (docs/experiments.md, experiment 1)
        coeff=8.0,
        top_k=3,
    )
    # measured: " Wed" − " ", 3.41 (at layer 6, ×4: 0.21, the best of these pairs there)
    assert df.effectiveness.iloc[0] > 1.0, df  # the best pair multiplies P(wedding words) by e
