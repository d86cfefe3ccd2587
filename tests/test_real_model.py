"""Real effects on the embedded SmolLM2-135M-Instruct (slow: ~20 s to load, once per session)."""

from __future__ import annotations

import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

import actadd
from actadd.diagnostics import OutlierWarning
from conftest import check_batch_solo_cache, check_packed_equals_alone

pytestmark = pytest.mark.slow


def test_embedded_model_facts(real_lm):
    assert (real_lm.n_layers, real_lm.d_model) == (30, 576)
    assert real_lm.model.config.model_type == "llama"
    # its "BOS" is the chat token <|im_start|>: the default start token is <|endoftext|>
    assert real_lm.tokenizer.convert_ids_to_tokens(real_lm.start_token_id) == "<|endoftext|>"
    love = real_lm.tokenizer.convert_tokens_to_ids("Love")  # one token, after the start token
    assert real_lm.to_tokens("Love").tolist() == [[real_lm.start_token_id, love]]


def test_love_minus_hate_makes_completions_kinder(real_lm):
    adds = actadd.get_x_vector("Love", "Hate", coeff=5, act_name=6)
    df = actadd.compare(
        "I hate you because",
        real_lm,
        30,
        adds,
        num_comparisons=8,
        seed=0,
        temperature=1.0,
        freq_penalty=1.0,
        top_p=0.3,
    )
    vader = SentimentIntensityAnalyzer()
    df["sentiment"] = [vader.polarity_scores(c)["compound"] for c in df.completions]
    steered = df[df.is_modified].sentiment.mean()
    normal = df[~df.is_modified].sentiment.mean()
    love = df[df.is_modified].completions.str.lower().str.count("love").sum()
    assert steered > normal + 0.2, df[["is_modified", "sentiment"]]
    assert love > df[~df.is_modified].completions.str.lower().str.count("love").sum()


def test_real_model_batch_equals_solo_and_cache(real_lm):
    prompts = ["I hate you because", "The weather today is", "My favourite food"]
    adds = [
        list(actadd.get_x_vector("Love", "Hate", 5, 6)),
        [actadd.ActivationAddition(4.0, 10, prompt=" weddings")],
        [],
    ]
    check_batch_solo_cache(real_lm, adds, prompts, tokens=12)


def test_sink_and_pad_outliers_are_reported(real_lm):
    """Position 0 is an attention sink under every policy. Without a start token an addition's
    first token lands on it ("Love" alone: an outlier); with <|endoftext|> (the default) prompts
    and additions share position 0, which an x-vector cancels; with the chat token
    <|im_start|> a space pad is a huge outlier (the observation that first set the policy)."""
    prompt, love_hate = "I hate you because", actadd.get_x_vector("Love", "Hate", 5, 6)
    none = actadd.LM(real_lm.model, real_lm.tokenizer, prepend_bos=False)
    assert none.model is real_lm.model  # wrapping never copies
    df = actadd.steering_magnitudes_relative_to_prompt(none, prompt, love_hate, warn=False)
    assert df.prompt_norm[0] > 4 * df.prompt_norm[1:].median()  # the attention sink
    assert not df.outlier.any()  # Love and Hate cancel each other's sink
    with pytest.warns(OutlierWarning, match="position 0"):  # "Love" alone lands on the sink
        actadd.steering_magnitudes_relative_to_prompt(
            none, prompt, [actadd.ActivationAddition(5, 6, prompt="Love")]
        )
    df = actadd.steering_magnitudes_relative_to_prompt(real_lm, prompt, love_hate, warn=False)
    assert df.prompt_norm[0] > 4 * df.prompt_norm[1:].median()  # <|endoftext|> is the sink
    assert df.addition_norm[0] == 0  # the shared start token cancels exactly
    with_bos = actadd.LM(real_lm.model, real_lm.tokenizer, prepend_bos=True)
    space = with_bos.to_single_token(" ")
    adds = actadd.get_x_vector(
        "Love", "Hate", 5, 6, model=with_bos, pad_method="tokens_right", custom_pad_id=space
    )
    with pytest.warns(OutlierWarning):
        actadd.steering_magnitudes_relative_to_prompt(with_bos, prompt, adds)


def test_mixed_steps_on_the_real_model_match_each_request_alone(real_lm):
    """float32, the embedded model: prompts (steered and not) read inside the decoding step
    of the rows before them, against each request alone (the size of any difference is
    printed)."""
    check_packed_equals_alone(real_lm)
