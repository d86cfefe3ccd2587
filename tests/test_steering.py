"""Steering on tiny random models: exact deltas at every site and location, batch = solo,
cache = no cache, algebra, and the one normaliser of additions."""

from __future__ import annotations

import pytest
import torch

import actadd
from actadd import ActivationAddition, get_x_vector, steer
from actadd.hooks import capture, hooked
from actadd.positions import LOCATIONS
from actadd.sites import parse_site
from conftest import (
    ARCHS,
    PROMPT,
    check_batch_solo_cache,
    close,
    greedy,
    logits,
    resid_pre_independent,
)


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_delta_at_resid_pre_front(tiny_factory, arch):
    lm = tiny_factory(arch)
    adds = get_x_vector("Lo", "Ha", coeff=3.0, act_name=1)
    ids = lm.to_tokens(PROMPT)
    site = parse_site(1, lm.n_layers)
    before = capture(lm, ids, [site])[site][0]
    with steer(lm, adds):
        after = capture(lm, ids, [site], steered=True)[site][0]
    expected = 3.0 * (resid_pre_independent(lm, "Lo", 1) - resid_pre_independent(lm, "Ha", 1))
    L = expected.shape[0]
    close(after[:L] - before[:L], expected)
    assert torch.equal(after[L:], before[L:]), "positions after the addition must be untouched"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["resid_post", "attn_out", "mlp_out"])
def test_exact_delta_at_other_sites(tiny_factory, arch, kind):
    lm = tiny_factory(arch)
    name = f"blocks.1.hook_{kind}"
    add = ActivationAddition(2.5, name, prompt="Hey")
    site = parse_site(name, lm.n_layers)
    ids = lm.to_tokens(PROMPT)
    if kind != "resid_post" and getattr(lm.site_map, kind) is None:
        with pytest.raises(actadd.SiteError, match="not available"), steer(lm, [add]):
            pass
        return
    before = capture(lm, ids, [site])[site][0]
    with steer(lm, [add]):
        after = capture(lm, ids, [site], steered=True)[site][0]
    acts = capture(lm, lm.to_tokens("Hey"), [site])[site][0]
    L = acts.shape[0]
    close(after[:L] - before[:L], 2.5 * acts)
    assert torch.equal(after[L:], before[L:])


@pytest.mark.parametrize("location", LOCATIONS)
def test_positions_of_each_location(llama, location):
    lm = llama
    add = ActivationAddition(1.0, 1, prompt="xyz")  # 4 tokens with BOS
    ids = lm.to_tokens(PROMPT)  # 11 tokens
    P, site = ids.shape[1], parse_site(1, lm.n_layers)
    before = capture(lm, ids, [site])[site][0]
    with steer(lm, [add], addition_location=location):
        after = capture(lm, ids, [site], steered=True)[site][0]
    acts = resid_pre_independent(lm, "xyz", 1)
    expected = torch.zeros_like(before)
    if location == "all":
        expected[:] = acts.mean(0)
    elif location != "generated":  # generated: never on the prompt
        start = {"front": 0, "mid": P // 2 - 2, "back": P - 4}[location]
        expected[start : start + 4] = acts
    close(after - before, expected)


def test_res_stream_slice_touches_only_those_dims(llama):
    ids = llama.to_tokens(PROMPT)
    site = parse_site(1, llama.n_layers)
    before = capture(llama, ids, [site])[site][0]
    with steer(llama, get_x_vector("Lo", "Ha", 4, 1), res_stream_slice=slice(0, 45)):
        after = capture(llama, ids, [site], steered=True)[site][0]
    assert (after[:3, :45] != before[:3, :45]).any()
    assert torch.equal(after[:, 45:], before[:, 45:])


def test_several_additions_sum(llama):
    a = ActivationAddition(1.5, 1, prompt="ab")
    b = ActivationAddition(-0.5, 1, prompt="cde")
    ids, site = llama.to_tokens(PROMPT), parse_site(1, llama.n_layers)
    before = capture(llama, ids, [site])[site][0]
    with steer(llama, [a, b]):
        after = capture(llama, ids, [site], steered=True)[site][0]
    expected = torch.zeros_like(before)
    expected[:3] += 1.5 * resid_pre_independent(llama, "ab", 1)
    expected[:4] += -0.5 * resid_pre_independent(llama, "cde", 1)
    close(after - before, expected)


# -- batches and the KV cache ------------------------------------------------------------------
PROMPTS = ["abcdefghij", "xyz w", "hello there, friend"]


def row_additions():
    return [
        list(get_x_vector("Lo", "Ha", 2.0, 1)),
        [ActivationAddition(3.0, "blocks.2.hook_resid_post", prompt="Q")],
        [],
    ]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("location", LOCATIONS)
def test_batch_equals_solo_and_cache_equals_no_cache(tiny_factory, arch, location):
    check_batch_solo_cache(
        tiny_factory(arch), row_additions(), PROMPTS, tokens=6, location=location
    )


def test_steering_changes_generation(llama):
    """Guard against tests passing because steering does nothing."""
    plain = greedy(llama, PROMPTS)
    with steer(llama, get_x_vector("Lo", "Ha", 8.0, 1)):
        steered = greedy(llama, PROMPTS)
    assert not torch.equal(plain, steered)


def test_front_position_survives_decoding_without_mask(llama):
    """generate drops an all-ones mask: decode steps must still not be steered as position 0."""
    ids = llama.to_tokens(PROMPT)
    seen = []
    site = parse_site(1, llama.n_layers)
    with steer(llama, [ActivationAddition(5.0, 1, prompt="ab")]) as steering:

        def spy(h):
            seen.append(bool(steering._fwd.active))

        with hooked(llama, [(site, spy)]):
            llama.model.generate(
                input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=llama.pad_token_id
            )
    assert seen == [True, False, False]


# -- algebra -----------------------------------------------------------------------------------
def test_coeff_zero_and_self_x_vector_are_identity(llama):
    base = logits(llama)
    with steer(llama, [ActivationAddition(0.0, 1, prompt="Love")]):
        assert torch.equal(logits(llama), base)
    with steer(llama, get_x_vector("Love", "Love", 7.0, 1)):
        assert torch.equal(logits(llama), base)


def test_swap_and_negate_is_identical(llama):
    with steer(llama, get_x_vector("Lo", "Hat", 3.0, 1)):
        a = logits(llama)
    with steer(llama, get_x_vector("Hat", "Lo", -3.0, 1)):
        b = logits(llama)
    assert torch.equal(a, b)
    assert not torch.equal(a, logits(llama))


def test_scaling_an_addition_scales_the_delta(llama):
    add = ActivationAddition(1.0, 1, prompt="ab")
    ids, site = llama.to_tokens(PROMPT), parse_site(1, llama.n_layers)
    before = capture(llama, ids, [site])[site][0]
    deltas = []
    for a in (add, add * 3):
        with steer(llama, [a]):
            deltas.append(capture(llama, ids, [site], steered=True)[site][0] - before)
    close(deltas[1], 3 * deltas[0])


@pytest.mark.parametrize("location", ["mid", "back"])
def test_mid_back_refuse_a_cache_filled_outside_steer(llama, location):
    """They place additions relative to the prompt, so they must have seen it."""
    with torch.no_grad():
        past = llama.model(llama.to_tokens(PROMPT), use_cache=True).past_key_values
        with (
            steer(llama, get_x_vector("Lo", "Ha", 1.0, 1), addition_location=location),
            pytest.raises(actadd.PromptError, match="needs to see the prompt"),
        ):
            llama.model(llama.to_tokens("k"), past_key_values=past, use_cache=True)


# -- the one normaliser of additions ------------------------------------------------------------
def test_as_rows_shapes():
    from actadd.steering import as_rows

    a, b = ActivationAddition(1.0, 1, prompt="ab"), ActivationAddition(2.0, 1, prompt="c")
    assert as_rows(None) == ([[]], False)
    assert as_rows(a) == ([[a]], False)
    assert as_rows(get_x_vector("x", "y", 1, 1), n=2)[0][1][1].coeff == -1.0  # a tuple: shared
    rows, per_row = as_rows([[a], [], [a, b]])
    assert per_row and [len(r) for r in rows] == [1, 0, 2]
    assert as_rows([a, get_x_vector("x", "y", 1, 1)])[0][0][2].coeff == -1.0  # flattened
    with pytest.raises(actadd.ActAddError, match="one each"):
        as_rows([[a], [b]], n=3)
    with pytest.raises(actadd.ActAddError, match="mix of additions and lists"):
        as_rows([a, [b]])
    with pytest.raises(actadd.ActAddError, match="ambiguous"):
        as_rows([get_x_vector("x", "y", 1, 1), get_x_vector("z", "w", 1, 1)])
    with pytest.raises(actadd.ActAddError, match="cannot steer with str"):
        as_rows(["Love"])


def test_rows_at_different_locations_in_one_batch_equal_solo(llama):
    add = [ActivationAddition(2.0, 1, prompt="xyz")]
    locations = ["front", "back", "all", None]
    with steer(llama, [add] * 4, addition_location=locations):
        mixed = greedy(llama, [PROMPT] * 4, 5)
    for i, loc in enumerate(locations):
        with steer(llama, [add], addition_location=loc):
            assert torch.equal(mixed[i], greedy(llama, [PROMPT], 5)[0]), loc
    assert torch.equal(mixed[0], mixed[3])  # None: the addition's own location, front
    assert not torch.equal(mixed[0], mixed[1]) and not torch.equal(mixed[0], mixed[2])


def test_vectors_default_to_every_token_and_prompts_to_front(llama):
    from actadd import SteeringVector

    v = SteeringVector({1: torch.randn(llama.d_model, dtype=torch.float64)}, 3.0)
    ids, site = llama.to_tokens(PROMPT), parse_site(1, llama.n_layers)
    before = capture(llama, ids, [site])[site][0]
    with steer(llama, [v]):
        after = capture(llama, ids, [site], steered=True)[site][0]
    close(after - before, (3.0 * v.directions[site.name])[None].expand_as(before).to(before))


def test_a_one_position_addition_at_front_warns_about_the_sink(llama):
    from actadd import SteeringVector

    v = SteeringVector({1: torch.ones(llama.d_model)}, 1.0)
    with (
        pytest.warns(actadd.OutlierWarning, match="attention sink"),
        steer(llama, [v], addition_location="front"),
    ):
        pass
