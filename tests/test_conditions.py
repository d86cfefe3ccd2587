"""Conditional steering (CAST), per row in one batch: rows whose condition fails run exactly
unsteered, rows whose condition holds equal the same row steered alone; cache = no cache."""

from __future__ import annotations

import pytest
import torch

import actadd
from actadd import ActivationAddition, steer
from actadd.conditions import AllOf, AnyOf, Condition, Not, load_prompts
from actadd.hooks import capture
from actadd.sites import parse_site
from actadd.steering import Conditioned

PROMPTS = ["aaaa bbb", "zzzz yyy", "abab abab", "zyzy zy"]


def mean_hidden(lm: actadd.LM, prompts: list[str], layer: int) -> torch.Tensor:
    site = parse_site(layer, lm.n_layers)
    return torch.stack([capture(lm, lm.to_tokens(p), [site])[site][0].mean(0) for p in prompts])


@pytest.fixture(scope="module")
def setup(tiny_factory):
    """A condition at layer 1 that holds for exactly the two prompts scoring highest."""
    lm = tiny_factory("llama")
    g = torch.Generator().manual_seed(3)
    c = Condition(torch.randn(lm.d_model, generator=g, dtype=torch.float64), 1)
    scores = c.score(mean_hidden(lm, PROMPTS, 1))
    threshold = float(scores.sort().values[1:3].mean())  # between the 2nd and 3rd
    c = c.with_threshold(threshold, ">")
    match = (scores > threshold).tolist()
    assert sum(match) == 2
    return lm, c, match


def forward(lm, ids, mask):
    """A left-padded batch with each row's own positions (as generate gives them)."""
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return lm.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def logits(lm, prompts, adds=None):
    ids, mask = lm.batch_tokens(prompts)
    with torch.no_grad(), steer(lm, adds or []):
        return forward(lm, ids, mask)


def generated(lm, prompts, adds, *, use_cache=True):
    ids, mask = lm.batch_tokens(prompts)
    with steer(lm, adds):
        return lm.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=lm.pad_token_id,
        )


def spec(c):
    # one addition after the condition's site (steers the prompt too when it holds) and one
    # before it (steers generated tokens only: the condition is not known yet there)
    return [
        Conditioned(
            [ActivationAddition(4.0, 2, prompt="Lo"), actadd.get_x_vector("q", "r", 3.0, 0)], c
        )
    ]


def test_rows_that_fail_run_exactly_unsteered_and_rows_that_hold_equal_solo(setup):
    lm, c, match = setup
    base = logits(lm, PROMPTS)
    steered = logits(lm, PROMPTS, spec(c))
    for i, ok in enumerate(match):
        if ok:
            assert not torch.equal(steered[i], base[i])
        else:
            assert torch.equal(steered[i], base[i])  # bit for bit
    mixed = generated(lm, PROMPTS, spec(c))
    plain = generated(lm, PROMPTS, [])
    for i, (p, ok) in enumerate(zip(PROMPTS, match, strict=True)):
        solo = generated(lm, [p], spec(c))[0]
        n = int((lm.batch_tokens(PROMPTS)[1][i] == 0).sum())  # left padding of row i
        assert torch.equal(mixed[i, n:], solo), p
        if not ok:
            assert torch.equal(mixed[i], plain[i])


def test_conditional_steering_cache_equals_no_cache(setup):
    lm, c, _ = setup
    assert torch.equal(
        generated(lm, PROMPTS, spec(c)), generated(lm, PROMPTS, spec(c), use_cache=False)
    )


def test_compositions(setup):
    lm, c, match = setup
    for rule, expect in (
        (Not(c), [not m for m in match]),
        (AnyOf((c, Not(c))), [True] * 4),
        (AllOf((c, Not(c))), [False] * 4),
        (c | ~c, [True] * 4),
        (c & c, match),
    ):
        base, steered = logits(lm, PROMPTS), logits(lm, PROMPTS, spec(rule))
        changed = [not torch.equal(steered[i], base[i]) for i in range(len(PROMPTS))]
        assert changed == expect, rule.describe()


def test_per_row_conditions_and_plain_rows_in_one_batch(setup):
    lm, c, _ = setup
    rows = [spec(c), [], spec(~c), [ActivationAddition(2.0, 1, prompt="x")]]
    ids, mask = lm.batch_tokens(PROMPTS)
    with torch.no_grad(), steer(lm, rows):
        together = forward(lm, ids, mask)
    for i, p in enumerate(PROMPTS):
        alone = logits(lm, [p], rows[i])[0]
        n = int((mask[i] == 0).sum())
        torch.testing.assert_close(together[i, n:], alone, rtol=1e-9, atol=1e-9)


def test_fit_finds_a_separating_condition_and_files_round_trip(tiny_factory, tmp_path):
    lm = tiny_factory("llama")
    pos = [f"{w} apple pie" for w in ("my", "an", "red", "one", "big", "ripe", "old", "new")]
    neg = [f"{w} zebra 99" for w in ("my", "an", "red", "one", "big", "ripe", "old", "new")]
    fit = Condition.fit(lm, pos, neg, layers=[1, 2], test_fraction=0.25, name="apples")
    assert list(fit.table.layer) == [1, 2]
    c = fit.condition  # the layer with the best training F1 ...
    best = fit.table.loc[fit.table.f1_train.idxmax()]
    assert c.site == best.site and c.threshold == best.threshold
    # ... and its held-out scores, recomputed here from the prompts themselves
    holds = c.holds({c: c.score(mean_hidden(lm, pos + neg, int(best.layer)))})
    truth = torch.tensor([True] * 8 + [False] * 8)
    tp = int((holds & truth).sum())
    assert fit.scores == {k: best[k] for k in ("precision", "recall", "f1")}
    assert tp >= 1 and best.f1_train > 0.5  # better than chance on this random model
    path = tmp_path / "apples.safetensors"
    c.save(path)
    back = Condition.load(path, lm)
    assert torch.equal(back.direction, c.direction) and back.threshold == c.threshold
    assert back.comparator == c.comparator and back.meta["name"] == "apples"


def test_bad_input_says_how_to_fix_it(tiny_factory, tmp_path):
    lm = tiny_factory("llama")
    with pytest.raises(actadd.ActAddError, match="empty prompt set"):
        Condition.fit(lm, [], ["x"])
    with pytest.raises(actadd.ActAddError, match="file not found"):
        load_prompts(tmp_path / "nope.txt")
    narrow = Condition(torch.ones(8), 1)
    narrow_spec = [Conditioned([ActivationAddition(1.0, 1, prompt="x")], narrow)]
    with pytest.raises(actadd.ActAddError, match="width 8 but"), steer(lm, narrow_spec):
        pass
    with pytest.raises(actadd.ActAddError, match="comparator"):
        Condition(torch.ones(4), 1, comparator="=")
    vec = tmp_path / "v.safetensors"
    actadd.SteeringVector({1: torch.ones(4)}).save(vec)
    with pytest.raises(actadd.VectorFileError, match="not an actadd condition"):
        Condition.load(vec)
    with pytest.raises(actadd.ActAddError, match=r"must be an actadd\.Condition"):
        Conditioned([], "legal")
