"""Chat prompts are steered on the user's text, not the template's tokens; ``generated`` steers
only what the model writes. Tiny random models with a chat template (offline)."""

from __future__ import annotations

import pytest
import torch

import actadd
from actadd import ActivationAddition, steer
from actadd.hooks import capture, hooked
from actadd.positions import LOCATIONS
from actadd.prompts import encode_prompts
from actadd.sites import parse_site
from conftest import build_tiny, close, greedy

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
CHAT = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello there friend"}]


@pytest.fixture(scope="module")
def lm() -> actadd.LM:
    lm = build_tiny("llama")
    lm.tokenizer.chat_template = TEMPLATE
    return lm


def user_positions(lm: actadd.LM) -> tuple[int, int]:
    """The user's text in the rendered template, counted independently of actadd: this
    tokenizer has one token per character, and '<s>' is one token."""
    text = lm.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    a = text.index("hello there friend")
    start = len(lm.tokenizer(text[:a], add_special_tokens=False).input_ids)
    return start, start + len("hello there friend")


def test_chat_tokens_find_every_message(lm):
    ct = lm.chat_tokens(CHAT)
    assert [m.role for m in ct.messages] == ["system", "user"]
    assert ct.last_user == user_positions(lm)
    assert lm.to_string(list(ct.ids[slice(*ct.last_user)])) == "hello there friend"
    with pytest.raises(actadd.PromptError, match="without a user message"):
        _ = lm.chat_tokens([{"role": "system", "content": "x"}]).last_user
    with pytest.raises(actadd.ActAddError, match=r"messages\[0\].role"):
        lm.chat_tokens([{"role": "wizard", "content": "x"}])


@pytest.mark.parametrize("location", LOCATIONS)
def test_additions_land_on_the_user_text_at_every_location(lm, location):
    add = ActivationAddition(2.0, 1, prompt="xyz")  # 4 tokens with this tokenizer's BOS
    (enc,) = encode_prompts(lm, [CHAT])
    ids = torch.tensor([enc.ids])
    site = parse_site(1, lm.n_layers)
    before = capture(lm, ids, [site])[site][0]
    with steer(lm, [add], addition_location=location, spans=[enc.span]):
        after = capture(lm, ids, [site], steered=True)[site][0]
    s, e = user_positions(lm)
    assert enc.span == (s, e)
    acts = 2.0 * capture(lm, lm.to_tokens("xyz"), [site])[site][0]
    expected = torch.zeros_like(before)
    n = e - s
    if location == "all":
        expected[s:e] = acts.mean(0)
    elif location != "generated":
        start = {"front": s, "mid": s + n // 2 - 2, "back": e - 4}[location]
        expected[start : start + 4] = acts
    close(after - before, expected)
    assert torch.equal((after - before)[:s], torch.zeros_like(before[:s]))  # template untouched


@pytest.mark.parametrize("location", ["front", "back", "all", "generated"])
def test_chat_batch_equals_solo_and_cache_equals_no_cache(lm, location):
    chats = [CHAT, [{"role": "user", "content": "hi"}], [{"role": "user", "content": "what now?"}]]
    adds = [
        [ActivationAddition(3.0, 1, prompt="Lo")],
        [ActivationAddition(-2.0, 2, prompt="Q")],
        [],
    ]
    batch = actadd.gen_using_activation_additions(
        lm, adds, chats, tokens_to_generate=5, temperature=0, addition_location=location
    )
    for i, c in enumerate(chats):
        solo = actadd.gen_using_activation_additions(
            lm, adds[i], [c], tokens_to_generate=5, temperature=0, addition_location=location
        )
        assert batch.completions[i] == solo.completions[0], (location, i)
    encoded = encode_prompts(lm, chats)
    ids, mask = lm.pad([e.ids for e in encoded])
    outs = []
    for use_cache in (True, False):
        with steer(lm, adds, addition_location=location, spans=[e.span for e in encoded]):
            outs.append(
                lm.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=5,
                    do_sample=False,
                    use_cache=use_cache,
                    pad_token_id=lm.pad_token_id,
                )
            )
    assert torch.equal(outs[0], outs[1])
    assert batch.prompts.tolist() == ["hello there friend", "hi", "what now?"]


def test_strings_with_chat_true_are_user_messages(lm):
    a = actadd.gen_using_activation_additions(
        lm, [], ["hi"], tokens_to_generate=3, temperature=0, chat=True
    )
    b = actadd.gen_using_activation_additions(
        lm, [], [[{"role": "user", "content": "hi"}]], tokens_to_generate=3, temperature=0
    )
    assert a.completions[0] == b.completions[0]


def test_generated_leaves_the_prompt_and_shifts_each_new_token_by_the_addition():
    lm = build_tiny("gpt2")
    v = actadd.SteeringVector({1: torch.randn(lm.d_model, dtype=torch.float64)}, 2.0)
    site = parse_site(1, lm.n_layers)
    ids = lm.to_tokens("abcdef")
    with torch.no_grad():
        plain = lm.model(ids).logits
    seen: list[torch.Tensor] = []
    with steer(lm, [v], addition_location="generated"), torch.no_grad():
        steered = lm.model(ids, use_cache=True)
        assert torch.equal(steered.logits, plain)  # the prompt is untouched, bit for bit
        nxt = steered.logits[:, -1:].argmax(-1)
        with hooked(lm, [(site, lambda h: seen.append(h.clone()))]):
            lm.model(nxt, past_key_values=steered.past_key_values, use_cache=True)
    with torch.no_grad():
        past = lm.model(ids, use_cache=True).past_key_values
        with hooked(lm, [(site, lambda h: seen.append(h.clone()))]):
            lm.model(nxt, past_key_values=past, use_cache=True)
    close(seen[0] - seen[1], (2.0 * v.directions[site.name]).expand_as(seen[0]))
    assert not torch.equal(greedy(lm, ["abcdef"], 4), _steered_greedy(lm, v))


def _steered_greedy(lm: actadd.LM, v: actadd.SteeringVector) -> torch.Tensor:
    with steer(lm, [v * 5], addition_location="generated"):
        return greedy(lm, ["abcdef"], 4)
