"""Mechanics of steering on tiny random models: exactness, positions, batches, cache, hygiene."""

from __future__ import annotations

import pytest
import torch

import actadd
from actadd import ActivationAddition, get_x_vector, steer
from actadd.hooks import LOCATIONS, capture, hooked
from actadd.sites import parse_site
from conftest import ARCHS

PROMPT = "abcdefghij"


def resid_pre_independent(lm: actadd.LM, text: str, layer: int) -> torch.Tensor:
    """Input of decoder layer ``layer`` from output_hidden_states: no hooks involved."""
    with torch.no_grad():
        out = lm.base_model(input_ids=lm.to_tokens(text), output_hidden_states=True)
    return out.hidden_states[layer][0]


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to rounding: float64 models to 1e-9, float32 ones (mixtral) to 1e-5."""
    tol = 1e-9 if actual.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def all_hooks(lm: actadd.LM) -> int:
    """Hooks on the model (transformers registers a few of its own; compare with a baseline)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())


def logits(lm: actadd.LM, text: str = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(lm.to_tokens(text)).logits


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
    else:
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
def test_batch_equals_solo(tiny_factory, arch, location):
    lm = tiny_factory(arch)
    adds = row_additions()
    batch = actadd.gen_using_activation_additions(
        lm, adds, PROMPTS, tokens_to_generate=6, temperature=0, addition_location=location
    )
    for i, prompt in enumerate(PROMPTS):
        solo = actadd.gen_using_activation_additions(
            lm,
            adds[i],
            [prompt],
            tokens_to_generate=6,
            temperature=0,
            addition_location=location,
        )
        assert batch.completions[i] == solo.completions[0], (arch, location, i)
    assert batch.is_modified.tolist() == [True, True, False]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("location", LOCATIONS)
def test_cache_equals_no_cache(tiny_factory, arch, location):
    lm = tiny_factory(arch)
    ids, mask = lm.batch_tokens(PROMPTS)
    outs = []
    for use_cache in (True, False):
        with steer(lm, row_additions(), addition_location=location):
            outs.append(
                lm.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=6,
                    do_sample=False,
                    use_cache=use_cache,
                    pad_token_id=lm.pad_token_id,
                )
            )
    assert torch.equal(outs[0], outs[1])


def test_steering_changes_generation(llama):
    """Guard against tests passing because steering does nothing."""
    ids, mask = llama.batch_tokens(PROMPTS)
    plain = llama.model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=llama.pad_token_id,
    )
    with steer(llama, get_x_vector("Lo", "Ha", 8.0, 1)):
        steered = llama.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=llama.pad_token_id,
        )
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


# -- hygiene -----------------------------------------------------------------------------------
def test_no_leak_after_normal_exit_exception_and_interrupt(llama):
    base, n0 = logits(llama), all_hooks(llama)
    with steer(llama, get_x_vector("Lo", "Ha", 5.0, 1)):
        assert all_hooks(llama) > n0
        assert not torch.equal(logits(llama), base)
    assert all_hooks(llama) == n0 and torch.equal(logits(llama), base)
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), steer(llama, get_x_vector("Lo", "Ha", 5.0, 1)):
            raise exc
        assert all_hooks(llama) == n0
        assert torch.equal(logits(llama), base)


def test_nested_contexts_unwind_their_own_hooks(llama):
    base, n0 = logits(llama), all_hooks(llama)
    a, b = get_x_vector("Lo", "Ha", 2.0, 1), [ActivationAddition(1.0, 2, prompt="Q")]
    with steer(llama, list(a) + b):
        together = logits(llama)
    with steer(llama, a):
        outer_only = logits(llama)
        n_outer = all_hooks(llama)
        with steer(llama, b):
            torch.testing.assert_close(logits(llama), together, rtol=1e-10, atol=1e-10)
            with (
                pytest.raises(ZeroDivisionError),
                hooked(llama, [(parse_site(0, llama.n_layers), lambda h: 1 / 0)]),
            ):
                logits(llama)
        assert all_hooks(llama) == n_outer
        assert torch.equal(logits(llama), outer_only)
    assert all_hooks(llama) == n0 and torch.equal(logits(llama), base)


def test_failure_while_registering_leaves_nothing(llama):
    from actadd.sites import SiteMap

    n0 = all_hooks(llama)
    ok = ActivationAddition(1.0, 0, prompt="a")
    bad = ActivationAddition(1.0, "blocks.1.hook_attn_out", prompt="a")
    saved = llama.site_map  # point attn_out at a module that does not exist
    llama.site_map = SiteMap(saved.layers, "no_such_module", saved.mlp_out)
    try:
        with pytest.raises(actadd.SiteError), steer(llama, [ok, bad]):
            pass
    finally:
        llama.site_map = saved
    assert all_hooks(llama) == n0


def test_capture_is_unsteered_inside_steer(llama):
    ids, site = llama.to_tokens(PROMPT), parse_site(1, llama.n_layers)
    clean = capture(llama, ids, [site])[site]
    with steer(llama, get_x_vector("Lo", "Ha", 5.0, 0)):
        assert torch.equal(capture(llama, ids, [site])[site], clean)


def test_actadd_hooks_counts_only_ours(llama):
    """transformers adds hooks of its own (output_hidden_states); actadd_hooks ignores them."""
    from actadd.hooks import actadd_hooks

    resid_pre_independent(llama, "ab", 1)  # makes transformers install its capture hooks
    assert all_hooks(llama) > 0 and actadd_hooks(llama.model) == 0
    with steer(llama, get_x_vector("Lo", "Ha", 1.0, 1)):
        assert actadd_hooks(llama.model) == 2  # the root hook and one site hook
    assert actadd_hooks(llama.model) == 0


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
