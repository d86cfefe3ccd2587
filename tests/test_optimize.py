"""Gradient-descent steering vectors: gradients flow through the hooks, the model is untouched."""

from __future__ import annotations

import pytest
import torch

import actadd
from actadd.hooks import actadd_hooks
from actadd.optimize import optimize_vector
from actadd.sites import parse_site
from actadd.steering import Injection

TARGETS = ["hello world", "hello there", "hello again"]


def all_hooks(lm: actadd.LM) -> int:
    return actadd_hooks(lm.model)


class _Live:
    """A steerable whose injection is a tensor that requires grad."""

    def __init__(self, site, v):
        self.site, self.v = site, v

    def injections(self, lm):
        return [Injection(self.site, self.v[None, :])]


@pytest.mark.parametrize("location", ["all", "front"])
def test_gradients_flow_through_the_steering_hooks(llama, location):
    """Autograd through steer() matches a finite difference (float64 model)."""
    site = parse_site(1, llama.n_layers)
    ids = llama.to_tokens("abcdef")
    g = torch.Generator().manual_seed(0)
    v = (0.1 * torch.randn(llama.d_model, generator=g, dtype=torch.float64)).requires_grad_()
    direction = torch.randn(llama.d_model, generator=g, dtype=torch.float64)

    def loss(x):
        with actadd.steer(llama, [_Live(site, x)], addition_location=location):
            return llama.model(ids).logits[0, -1].logsumexp(-1)

    (grad,) = torch.autograd.grad(loss(v), [v])
    eps = 1e-3  # parts of the model (softmax) run in float32: a tiny eps would be noise
    with torch.no_grad():
        fd = (loss(v + eps * direction) - loss(v - eps * direction)) / (2 * eps)
    assert float(grad @ direction) == pytest.approx(float(fd), rel=1e-3, abs=1e-6)
    assert grad.abs().sum() > 0


def test_optimisation_reduces_loss_and_leaves_the_model_untouched(llama):
    lm = llama
    weights = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    hooks = all_hooks(lm)
    seen = []
    res = optimize_vector(
        lm,
        TARGETS,
        layer=1,
        avoid=["goodbye world"],
        neutral=["xyz qrs"],
        steps=25,
        lr=0.2,
        batch_size=4,
        callback=seen.append,
    )
    losses = res.losses
    assert list(losses.columns) == ["step", "loss", "target", "avoid", "contrast", "kl", "norm"]
    assert losses.contrast.eq(0).all()  # strings, not pairs: the likelihood objective
    assert len(losses) == 25 and len(seen) == 25
    assert losses.kl.iloc[0] == 0.0  # starts at v = 0: steered = unsteered
    assert losses.loss.iloc[-1] < 0.8 * losses.loss.iloc[0]
    assert losses.target.iloc[-1] < losses.target.iloc[0]
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, weights[n]), f"{n} changed"
        assert p.grad is None, f"{n} got a gradient"
        assert p.requires_grad == flags[n]
    assert all_hooks(lm) == hooks
    v = res.vector
    assert v.sites == ["blocks.1.hook_resid_pre"] and v.meta["method"] == "optimized"
    assert not v.directions["blocks.1.hook_resid_pre"].requires_grad
    # the learned vector makes the targets more likely when steering the ordinary way
    ids = lm.to_tokens(TARGETS[0])

    def nll(adds):
        with torch.no_grad(), actadd.steer(lm, adds, addition_location="all"):
            return float(lm.model(ids, labels=ids).loss)

    assert nll([v]) < nll([])


def test_prompt_completion_targets_score_only_the_completion(llama):
    res = optimize_vector(
        llama, [("The answer is", " yes")], layer=2, avoid=[], neutral=None, steps=15, lr=0.3
    )
    assert res.losses.avoid.eq(0).all() and res.losses.kl.eq(0).all()
    assert res.losses.target.iloc[-1] < res.losses.target.iloc[0]


def test_avoided_texts_become_less_likely(llama):
    res = optimize_vector(
        llama,
        ["qq"],
        layer=1,
        avoid=["hello world"],
        avoid_weight=5.0,
        neutral=None,
        steps=20,
        lr=0.3,
    )
    assert res.losses.avoid.iloc[-1] < res.losses.avoid.iloc[0]


def test_kl_penalty_keeps_neutral_text_closer(llama):
    kw = dict(layer=1, avoid=[], steps=20, lr=0.3, neutral=["the quick brown fox", "jumps over"])
    free = optimize_vector(llama, TARGETS, kl_weight=0.0, **kw)
    held = optimize_vector(llama, TARGETS, kl_weight=20.0, **kw)
    assert held.losses.kl.iloc[-1] < free.losses.kl.iloc[-1]


def test_dataset_targets_init_and_errors(llama):
    pairs = [("good day", "bad day"), ("nice one", "mean one")]
    res = optimize_vector(
        llama, pairs and actadd.datasets.as_dataset(pairs), layer=1, steps=2, neutral=None
    )
    assert res.vector.meta["data"]["n_pairs"] == 2
    assert res.vector.meta["optimizer"]["objective"] == "contrast"  # pairs: contrast by default
    assert (res.losses.avoid > 0).all()  # negatives became the texts to avoid
    start = res.vector * 2
    same = optimize_vector(llama, TARGETS, layer=1, steps=1, lr=0.0, init=start, neutral=None)
    torch.testing.assert_close(
        same.vector.directions["blocks.1.hook_resid_pre"],
        2 * res.vector.directions["blocks.1.hook_resid_pre"],
    )
    with pytest.raises(actadd.ActAddError, match="init has sites"):
        optimize_vector(llama, TARGETS, layer=2, steps=1, init=start, neutral=None)
    with pytest.raises(actadd.ActAddError, match="one token"):
        optimize_vector(llama, [""], layer=1, steps=1, neutral=None)  # BOS alone


def test_contrast_objective_separates_the_pairs(llama):
    pairs = actadd.datasets.as_dataset(
        [("good day", "bad day"), ("nice one", "mean one"), ("I win", "I lose")]
    )
    res = optimize_vector(llama, pairs, layer=1, steps=20, lr=0.3, neutral=None, beta=0.5)
    c = res.losses.contrast
    assert c.iloc[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: v = 0 makes no difference
    assert c.iloc[-1] < 0.5 * c.iloc[0]
    v = res.vector

    def logp(text, adds):
        ids = llama.to_tokens(text)
        with torch.no_grad(), actadd.steer(llama, adds, addition_location="all"):
            lp = torch.log_softmax(llama.model(ids).logits[0, :-1].float(), -1)
        return float(lp.gather(-1, ids[0, 1:, None]).sum())

    for p in pairs:
        before = logp(p.positive, []) - logp(p.negative, [])
        assert logp(p.positive, [v]) - logp(p.negative, [v]) > before
    with pytest.raises(actadd.ActAddError, match="one text to avoid per target"):
        optimize_vector(llama, TARGETS, avoid=["x y"], objective="contrast", layer=1, steps=1)
    with pytest.raises(actadd.ActAddError, match="objective"):
        optimize_vector(llama, TARGETS, objective="dpo", layer=1, steps=1)
