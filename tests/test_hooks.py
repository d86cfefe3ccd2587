"""The hook mechanism: scoped hooks leave nothing behind (normal exit, exceptions, interrupts,
nesting, failures while registering), and capture reads unsteered activations."""

from __future__ import annotations

import pytest
import torch

import actadd
from actadd import ActivationAddition, get_x_vector, steer
from actadd.hooks import capture, hooked
from actadd.sites import parse_site
from conftest import PROMPT, all_hooks, logits, resid_pre_independent


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


def test_hook_calls_are_named_in_profiler_traces(llama):
    """Under torch.profiler each hook call is a range named after what it hooks (how `make
    bench` measures steering's own cost); outside one, hooks run unlabelled and still steer."""
    from torch.profiler import ProfilerActivity, profile

    ids = llama.to_tokens("abcd")
    with steer(llama, get_x_vector("Lo", "Ha", 5.0, 1), addition_location="all"):
        plain = llama.model(ids).logits
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            profiled = llama.model(ids).logits
    names = [e.name for e in prof.events() if e.name.startswith("actadd:")]
    assert names.count("actadd:root") == 1
    assert names.count(f"actadd:{llama.site_map.layers}.1") == 1
    assert torch.equal(plain, profiled)  # the label changes nothing
    assert not torch.equal(plain, llama.model(ids).logits)  # and it did steer
