"""Continuous batching: every row equals the same request generated alone, whenever it joins;
rows leave when they end; the KV budget holds. Tiny float64 models (offline)."""

from __future__ import annotations

import pytest
import torch

import actadd
from actadd import ActivationAddition, SteeringVector, get_x_vector
from actadd.batching import Request, Scheduler, generate_many
from actadd.sampling import GREEDY, Sampling
from conftest import ARCHS, build_tiny

PROMPTS = ["abcdefghij", "xyz w", "hello there, friend", "q", "the weather today is"]


def requests(lm: actadd.LM) -> list[Request]:
    v = SteeringVector(
        {
            1: torch.randn(
                lm.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64
            )
        },
        2.0,
    )
    adds = [
        (tuple(get_x_vector("Lo", "Ha", 3.0, 1)), None),
        ((v,), None),
        ((ActivationAddition(2.0, 2, prompt="Q"),), "back"),
        ((), None),
        ((v * 3,), "generated"),
        ((ActivationAddition(-1.5, 0, prompt="ab"),), "all"),
    ]
    sampled = Sampling(temperature=1.0, top_p=0.8, freq_penalty=0.5)
    out = []
    for i in range(12):
        a, loc = adds[i % len(adds)]
        prompt = PROMPTS[i % len(PROMPTS)]
        if loc != "all" and a and len(lm.token_ids(prompt)) < 3:
            prompt = PROMPTS[0]
        out.append(
            Request(
                tuple(lm.token_ids(prompt)),
                a,
                loc,
                max_tokens=3 + (i * 5) % 11,
                sampling=sampled if i % 3 == 0 else GREEDY,
                seed=100 + i,
            )
        )
    return out


def alone(lm: actadd.LM, r: Request) -> str:
    """The request through gen_using_activation_additions (one batched generate call)."""
    s = r.sampling
    text = lm.to_string(list(r.ids[1:] if lm.prepend_bos else r.ids))  # without the BOS
    assert tuple(lm.token_ids(text)) == r.ids
    df = actadd.gen_using_activation_additions(
        lm,
        [list(r.additions)],
        [text],
        tokens_to_generate=r.max_tokens,
        seeds=[r.seed],
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        freq_penalty=s.freq_penalty,
        addition_location=r.location,
    )
    return str(df.completions[0])


def collect(texts: list[str], i: int):
    """A listener appending row ``i``'s text deltas to ``texts[i]``."""

    def on(kind: str, args: tuple) -> None:
        if kind == "delta":
            texts[i] += args[0]

    return on


def scheduled(lm: actadd.LM, reqs: list[Request], **options) -> tuple[list[str], dict]:
    """Each request's text through one Scheduler, and its stats (mixed steps next to any
    number of decoding rows unless ``options`` say otherwise)."""
    sched = Scheduler(lm, **{"mix_min_rows": 1, **options})
    texts = ["" for _ in reqs]
    for i, r in enumerate(reqs):
        sched.submit(r, collect(texts, i))
    while sched.busy:
        sched.step()
    return texts, sched.stats


# where transformers routes every layer's attention through AttentionInterface as SDPA, new
# prompts are read inside the decoding step; these must keep doing so
MIXED = {"llama", "gpt2", "gemma3_text", "qwen2", "mistral", "phi3", "gpt_neox", "opt"}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_row_equals_the_request_alone(tiny_factory, arch):
    """Rows join while others decode (mixed steps where the model allows them, separate
    prefills elsewhere): every text equals the request generated alone."""
    lm = tiny_factory(arch)
    reqs = requests(lm)
    texts, stats = scheduled(lm, reqs, max_rows=4)
    for r, text in zip(reqs, texts, strict=True):
        assert text == alone(lm, r), (arch, r)
    if arch in MIXED:
        assert stats["mixed"] >= 5, stats
    mixed_off, _ = scheduled(lm, reqs, max_rows=4, mixed_steps=False)
    assert mixed_off == texts


def test_a_model_that_mixes_tokens_outside_attention_gets_no_mixed_steps():
    """The probe compares a mixed step with each request alone: a module that mixes tokens
    (here a hook adding the sequence mean) would leak between packed requests, so it is off."""
    from actadd.batching import _cache_keyword
    from actadd.packing import packable

    lm = build_tiny("llama")
    mlp = lm.layers[0].mlp
    handle = mlp.register_forward_hook(lambda m, a, out: out + out.mean(1, keepdim=True))
    try:
        assert not packable(lm, _cache_keyword(lm.model))
    finally:
        handle.remove()
    assert packable(build_tiny("llama"), _cache_keyword(lm.model))


def test_mixed_steps_wait_for_enough_decoding_rows(llama):
    reqs = requests(llama)[:4]
    _, stats = scheduled(llama, reqs, max_rows=1)
    assert stats["mixed"] == 0  # never a row decoding while another joins
    _, alone_next_to_one = scheduled(llama, reqs, max_rows=2, mix_min_rows=2)
    _, mixed_next_to_one = scheduled(llama, reqs, max_rows=2, mix_min_rows=1)
    assert alone_next_to_one["mixed"] == 0 and mixed_next_to_one["mixed"] > 0


def test_a_failing_mixed_step_takes_its_token_back_and_prefills_apart(monkeypatch):
    """A mixed step that fails half-way (after some layers appended this step's token to the
    running cache) leaves the cache as it was; its prompts are then prefilled alone."""
    from actadd import packing
    from actadd.batching import _cache_keyword

    lm = build_tiny("llama")
    assert packing.packable(lm, _cache_keyword(lm.model))  # probed before the fault
    reqs = requests(lm)[:6]
    expected = [alone(lm, r) for r in reqs]
    calls = {"n": 0}

    def fail_in_mixed_steps(module, args):
        if getattr(packing._LOCAL, "step", None) is not None:
            calls["n"] += 1
            raise RuntimeError("boom")

    handle = lm.layers[1].register_forward_pre_hook(fail_in_mixed_steps)
    assert lm.model.config._attn_implementation == "sdpa"
    try:
        texts, stats = scheduled(lm, reqs, max_rows=3)
    finally:
        handle.remove()
    assert calls["n"] >= 2 and stats["mixed"] == 0
    assert texts == expected
    assert lm.model.config._attn_implementation == "sdpa"


def test_a_row_does_not_depend_on_when_it_joins(llama):
    reqs = requests(llama)[:6]
    expected = [alone(llama, r) for r in reqs]
    for delay in (0, 1, 4):  # join before, during and after the others' prefill/decoding
        sched = Scheduler(llama, max_rows=8)
        texts = ["" for _ in reqs]

        def listen(i, texts=texts):
            def on(kind, args):
                if kind == "delta":
                    texts[i] += args[0]

            return on

        for i in range(3):
            sched.submit(reqs[i], listen(i))
        for _ in range(delay):
            sched.step()
        for i in range(3, 6):
            sched.submit(reqs[i], listen(i))
        while sched.busy:
            sched.step()
        assert texts == expected, delay


def test_rows_leave_when_they_end_and_cancelled_rows_free_their_slot(llama):
    sched = Scheduler(llama, max_rows=2)
    events: list[tuple[int, str, tuple]] = []
    long_ = sched.submit(
        Request(tuple(llama.token_ids("abcdef")), max_tokens=200),
        lambda k, a: events.append((0, k, a)),
    )
    short = sched.submit(
        Request(tuple(llama.token_ids("xy")), max_tokens=4), lambda k, a: events.append((1, k, a))
    )
    waiting = sched.submit(
        Request(tuple(llama.token_ids("zz")), max_tokens=2), lambda k, a: events.append((2, k, a))
    )
    sched.step()
    assert len(sched.running) == 2 and len(sched.waiting) == 1
    while short.done is False:
        sched.step()
    assert short not in sched.running and waiting not in sched.running
    sched.step()  # the free slot is taken at the next step
    assert waiting in sched.running or waiting.done
    sched.cancel(long_)
    sched.step()
    assert long_ not in sched.running
    dones = {i: a for i, k, a in events if k == "done"}
    assert dones[1][0] == "length" and dones[0][0] == "cancelled"
    while sched.busy:
        sched.step()
    assert sched.stats["cancelled"] == 1


def test_the_kv_budget_makes_rows_wait_and_refuses_what_never_fits(llama):
    ids = tuple(llama.token_ids("abcdef"))  # 7 tokens with BOS
    sched = Scheduler(llama, max_rows=8, kv_budget_tokens=2 * (7 + 5))
    for _ in range(3):
        sched.submit(Request(ids, max_tokens=5), lambda k, a: None)
    errors = []
    sched.submit(
        Request(ids, max_tokens=100), lambda k, a: errors.append(a) if k == "error" else None
    )
    sched.step()
    assert len(sched.running) == 2 and sched.tokens_held() <= 24
    while sched.busy:
        sched.step()
        assert sched.tokens_held() <= 24
    assert errors and "KV-cache budget" in str(errors[0][0])


def test_stop_strings_end_a_row_and_are_not_emitted(llama):
    r = Request(tuple(llama.token_ids("abcdefghij")), max_tokens=12)
    full = generate_many(llama, [r])[0].text
    stop = full[3:5]
    cut = generate_many(llama, [Request(r.ids, max_tokens=12, stop=(stop,))])[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.find(stop)]


def test_chat_spans_and_conditions_equal_alone(tiny_factory):
    from actadd.conditions import Condition
    from actadd.steering import Conditioned

    lm = tiny_factory("llama")
    c = Condition(
        torch.randn(lm.d_model, generator=torch.Generator().manual_seed(5), dtype=torch.float64),
        1,
        threshold=0.0,
    )
    spec = (Conditioned([ActivationAddition(4.0, 2, prompt="Lo")], c),)
    reqs = [Request(tuple(lm.token_ids(p)), spec, max_tokens=5) for p in PROMPTS[:3]]
    reqs.append(
        Request(
            tuple(lm.token_ids(PROMPTS[2])),
            (ActivationAddition(2.0, 1, prompt="ab"),),
            span=(3, 9),
            max_tokens=5,
        )
    )
    outs = generate_many(lm, reqs, max_rows=4)
    for r, out in zip(reqs[:3], outs[:3], strict=True):
        assert out.text == alone(lm, r)
    # joining one by one: conditioned rows decode in mixed steps with their gates, spans pack
    sched = Scheduler(lm, max_rows=4, mix_min_rows=1)
    texts = ["" for _ in reqs]
    for i, r in enumerate(reqs):
        sched.submit(r, collect(texts, i))
        sched.step()
    while sched.busy:
        sched.step()
    assert texts == [o.text for o in outs] and sched.stats["mixed"] >= 1, sched.stats
    with actadd.steer(lm, [list(reqs[3].additions)], spans=[(3, 9)]):
        ids = torch.tensor([reqs[3].ids])
        solo = lm.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=lm.pad_token_id,
        )
    assert outs[3].text == lm.tokenizer.decode(solo[0, ids.shape[1] :], skip_special_tokens=True)
    assert all(len(o.applied) == 1 for o in outs[:3])


def test_the_cache_surface_it_relies_on(llama):
    """transformers internals the scheduler uses: DynamicCache's per-layer keys/values tensors
    and batch_select_indices. A release that changes them fails here first."""
    from transformers import DynamicCache

    cache = DynamicCache()
    ids, mask = llama.batch_tokens(["abc", "de"])
    with torch.no_grad():
        llama.model(input_ids=ids, attention_mask=mask, use_cache=True, past_key_values=cache)
    layer = cache.layers[0]
    assert layer.keys.shape[0] == 2 and layer.keys.shape[-2] == ids.shape[1]
    cache.batch_select_indices(torch.tensor([1]))
    assert cache.layers[0].keys.shape[0] == 1 and cache.get_seq_length() == ids.shape[1]
