"""ActivationAddition / get_x_vector: construction, validation, padding, tokenization policy."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import actadd
from actadd import ActivationAddition, get_x_vector
from conftest import VOCAB, build_tiny


def test_int_act_name_means_resid_pre():
    assert ActivationAddition(1, 6, prompt="x").act_name == "blocks.6.hook_resid_pre"


@pytest.mark.parametrize("coeff", [math.nan, math.inf, -math.inf, "big"])
def test_bad_coefficients(coeff):
    with pytest.raises(actadd.ActAddError, match="coeff"):
        ActivationAddition(coeff, 6, prompt="Love")


def test_prompt_xor_tokens():
    with pytest.raises(actadd.PromptError, match="exactly one"):
        ActivationAddition(1, 6, prompt="Love", tokens=[1, 2])
    with pytest.raises(actadd.PromptError, match="exactly one"):
        ActivationAddition(1, 6)
    with pytest.raises(actadd.PromptError, match="empty"):
        ActivationAddition(1, 6, tokens=[])


def test_tokens_accept_tensors_and_compare_equal():
    a = ActivationAddition(1, 6, tokens=torch.tensor([[3, 4, 5]]))
    assert a.tokens == (3, 4, 5)
    assert a == ActivationAddition(1, 6, tokens=[3, 4, 5])


def test_tokens_from_another_tokenizer_are_rejected(llama):
    add = ActivationAddition(1, 1, tokens=[5, 50_000])
    with pytest.raises(actadd.PromptError, match="another tokenizer"):
        add.injections(llama)


def test_arithmetic_returns_new_values():
    a = ActivationAddition(2, 1, prompt="ab")
    assert (a * 3).coeff == 6 and (3 * a).coeff == 6 and (-a).coeff == -2 and a.coeff == 2
    assert a.with_coeff(0.5).coeff == 0.5


def test_x_vector_unpadded_and_padded(llama):
    plus, minus = get_x_vector("Lo", "Hate", 4, 1)
    assert (plus.coeff, minus.coeff) == (4, -4) and plus.prompt == "Lo"
    pad = llama.to_single_token(" ")
    plus, minus = get_x_vector(
        "Lo", "Hate", 4, 1, model=llama, pad_method="tokens_right", custom_pad_id=pad
    )
    assert len(plus.tokens) == len(minus.tokens) == 5  # BOS + "Hate"
    assert plus.tokens[-2:] == (pad, pad) and minus.tokens == tuple(llama.token_ids("Hate"))
    assert plus.describe().startswith("+4")


def test_x_vector_errors(llama):
    with pytest.raises(actadd.ActAddError, match="model="):
        get_x_vector("a", "b", 1, 1, pad_method="tokens_right")
    with pytest.raises(actadd.ActAddError, match="pad_method"):
        get_x_vector("a", "b", 1, 1, pad_method="left")
    with pytest.raises(actadd.ActAddError, match="finite"):
        get_x_vector("a", "b", float("nan"), 1)


def test_sequence_start_policy():
    gpt_like = build_tiny("llama", bos="<|endoftext|>")  # BOS == EOS: prepend, like GPT-2
    assert gpt_like.prepend_bos and gpt_like.to_tokens("ab").tolist() == [[0, 13, 14]]
    # a BOS the tokenizer does not add (SmolLM2's chat token): <|endoftext|> instead
    chat_like = build_tiny("llama", bos="<s>")
    assert chat_like.start_token_id == 0 and chat_like.to_tokens("ab").tolist() == [[0, 13, 14]]
    forced = actadd.LM(chat_like.model, chat_like.tokenizer, prepend_bos=True)
    assert forced.to_tokens("ab").tolist() == [[2, 13, 14]]
    bare = actadd.LM(chat_like.model, chat_like.tokenizer, prepend_bos=False)
    assert not bare.prepend_bos and bare.to_tokens("ab").tolist() == [[13, 14]]
    with pytest.raises(actadd.PromptError, match="empty"):
        bare.to_tokens("")
    assert gpt_like.to_tokens("").tolist() == [[0]]  # BOS alone is a valid 1-token prompt
    # no real BOS and no end-of-text token in the vocabulary: nothing is prepended
    vocab = {("</s>" if t == "<|endoftext|>" else t): i for t, i in VOCAB.items()}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    plain = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    assert actadd.LM(chat_like.model, plain).start_token_id is None


def test_a_shared_start_token_for_models_without_one():
    chat_like = build_tiny("llama", bos="<s>")
    for token in ("<|endoftext|>", 0):  # by text or by id
        eot = actadd.LM(chat_like.model, chat_like.tokenizer, prepend_bos=token)
        assert eot.prepend_bos and eot.start_token_id == 0
        assert eot.to_tokens("ab").tolist() == [[0, 13, 14]]
        # prompts and additions get the same start, so an x-vector's position 0 cancels
        love, hate = get_x_vector("a", "b", 1.0, 1)
        diff = love.activations(eot)[0] - hate.activations(eot)[0]
        assert float(diff.abs().max()) == 0.0
    bos = actadd.LM(chat_like.model, chat_like.tokenizer, prepend_bos=True)
    eot = actadd.LM(chat_like.model, chat_like.tokenizer, prepend_bos="<|endoftext|>")
    bare = actadd.LM(chat_like.model, chat_like.tokenizer, prepend_bos=False)
    # a vector made under one start token is refused by a model under another
    assert len({bos.fingerprint, eot.fingerprint, bare.fingerprint}) == 3
    assert chat_like.fingerprint == eot.fingerprint  # the default for this tokenizer
    with pytest.raises(actadd.PromptError, match="2 tokens"):
        actadd.LM(chat_like.model, chat_like.tokenizer, prepend_bos="ab")
    with pytest.raises(actadd.PromptError, match="outside"):
        actadd.LM(chat_like.model, chat_like.tokenizer, prepend_bos=10_000)


def test_to_single_token(llama):
    assert llama.to_single_token("a") == 13
    with pytest.raises(actadd.PromptError, match="not one"):
        llama.to_single_token("ab")


def test_activations_are_cached_per_model(llama):
    add = ActivationAddition(1, 1, prompt="xyz")
    first = add.activations(llama)
    assert add.activations(llama) is first
    assert first.shape == (4, 64)


def test_prompt_shorter_than_addition_says_what_to_do(llama):
    long_add = ActivationAddition(1, 1, prompt="a much longer addition")
    with pytest.raises(actadd.PromptError, match="addition_location='all'"):
        actadd.gen_using_activation_additions(
            llama, [long_add], ["hi"], tokens_to_generate=2, temperature=0
        )
    for loc in ("mid", "back"):
        with pytest.raises(actadd.PromptError, match="tokens but its addition"):
            actadd.gen_using_activation_additions(
                llama,
                [long_add],
                ["hi"],
                tokens_to_generate=2,
                temperature=0,
                addition_location=loc,
            )
    # 'all' has no length requirement
    actadd.gen_using_activation_additions(
        llama, [long_add], ["hi"], tokens_to_generate=2, temperature=0, addition_location="all"
    )
