"""Generation: per-row seeded sampling, frequency penalty, DataFrames, per-row additions."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import actadd
from actadd import ActivationAddition, get_x_vector
from actadd.sampling import FrequencyPenaltyLogitsProcessor, RowSeededSampler

SAMPLING = dict(temperature=1.0, top_p=0.9, freq_penalty=0.5)


def test_frequency_penalty_counts_prompt_and_generated_but_not_padding():
    ids = torch.tensor([[9, 9, 3, 4, 4, 4], [1, 2, 2, 5, 5, 6]])
    start = torch.tensor([2, 0])  # row 0 has two pad tokens (id 9) on the left
    scores = torch.zeros(2, 10)
    out = FrequencyPenaltyLogitsProcessor(1.5, start)(ids, scores)
    expected = torch.zeros(2, 10)
    expected[0, 3], expected[0, 4] = -1.5, -4.5
    expected[1, 1], expected[1, 2], expected[1, 5], expected[1, 6] = -1.5, -3.0, -3.0, -1.5
    assert torch.equal(out, expected)


def test_row_seeded_sampler_samples_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3])
    scores = probs.log().expand(6000, 3).clone()
    sampler = RowSeededSampler(range(6000), torch.device("cpu"))
    picks = sampler(torch.zeros(6000, 1, dtype=torch.long), scores).argmax(-1)
    freq = torch.bincount(picks, minlength=3) / 6000
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


def test_rows_do_not_depend_on_batch_size_or_neighbours(llama):
    prompts = ["abc def", "hello", "xyz w", "the cat"]
    adds = [list(get_x_vector("Lo", "Ha", 2, 1)), [], [ActivationAddition(3, 2, prompt="Q")], []]
    seeds = [11, 12, 13, 14]
    full = actadd.gen_using_activation_additions(
        llama, adds, prompts, tokens_to_generate=8, seeds=seeds, **SAMPLING
    )
    chunked = actadd.gen_using_activation_additions(
        llama, adds, prompts, tokens_to_generate=8, seeds=seeds, batch_size=3, **SAMPLING
    )
    reversed_ = actadd.gen_using_activation_additions(
        llama, adds[::-1], prompts[::-1], tokens_to_generate=8, seeds=seeds[::-1], **SAMPLING
    )
    assert full.completions.tolist() == chunked.completions.tolist()
    assert full.completions.tolist() == reversed_.completions.tolist()[::-1]
    assert len(set(full.completions)) > 1


def test_seed_reproduces_and_differs(llama):
    run = lambda s: actadd.gen_using_activation_additions(  # noqa: E731
        llama, [], ["abc"] * 4, tokens_to_generate=8, seed=s, **SAMPLING
    ).completions.tolist()
    assert run(0) == run(0)
    assert run(0) != run(100)
    assert len(set(run(0))) > 1  # row i uses seed + i


def test_paired_sampling_zero_coeff_gives_identical_rows(llama):
    zero = [ActivationAddition(0.0, 1, prompt="Lo")]
    df = actadd.gen_using_activation_additions(
        llama, [[], zero], ["abcdef", "abcdef"], tokens_to_generate=10, seeds=[7, 7], **SAMPLING
    )
    assert df.completions[0] == df.completions[1]
    assert df.is_modified.tolist() == [False, True]


def test_dataframe_columns_and_loss(llama):
    df = actadd.gen_using_activation_additions(
        llama,
        get_x_vector("Lo", "Ha", 2, 1),
        ["abcdef", "xyz w"],
        tokens_to_generate=5,
        temperature=0,
    )
    assert isinstance(df, pd.DataFrame)
    assert {"prompts", "completions", "is_modified", "loss", "seed"} <= set(df.columns)
    assert df.is_modified.all() and (df.loss > 0).all()


def test_loss_matches_a_teacher_forced_forward(llama):
    df = actadd.gen_using_activation_additions(
        llama, [], ["abcdef"], tokens_to_generate=6, temperature=0
    )
    full = llama.to_tokens("abcdef" + df.completions[0])
    with torch.no_grad():
        logp = torch.log_softmax(llama.model(full).logits[0, :-1].float(), -1)
    n_prompt = llama.to_tokens("abcdef").shape[1]
    target = full[0, n_prompt:]
    nll = -logp[n_prompt - 1 :].gather(1, target[:, None]).mean()
    assert df.loss[0] == pytest.approx(float(nll), rel=1e-5)


def test_greedy_is_temperature_zero(llama):
    a = actadd.gen_using_activation_additions(
        llama, [], ["abc"], tokens_to_generate=6, temperature=0
    )
    b = llama.model.generate(
        llama.to_tokens("abc"), max_new_tokens=6, do_sample=False, pad_token_id=llama.pad_token_id
    )
    assert a.completions[0] == llama.tokenizer.decode(b[0, 4:], skip_special_tokens=True)


def test_per_row_count_mismatch_is_an_error(llama):
    with pytest.raises(actadd.ActAddError, match="one each"):
        actadd.gen_using_activation_additions(llama, [[], []], ["a", "b", "c"])
    with pytest.raises(actadd.PromptError):
        actadd.gen_using_activation_additions(llama, [], [""])
    with pytest.raises(actadd.ActAddError, match="temperature"):
        actadd.gen_using_activation_additions(llama, [], ["a"], temperature=-1)


def test_steer_rejects_batch_of_wrong_size(llama):
    ids, mask = llama.batch_tokens(["abc", "defg"])
    with (
        pytest.raises(actadd.ActAddError, match="per-row additions"),
        actadd.steer(llama, [[ActivationAddition(1, 1, prompt="a")]] * 3),
    ):
        llama.model(ids, attention_mask=mask)


def test_compare_pairs_seeds(llama):
    df = actadd.compare(
        "abcdef", llama, 6, list(get_x_vector("Lo", "Ha", 3, 1)), num_comparisons=2, seed=5
    )
    assert df.seed.tolist() == [5, 6, 5, 6]
    assert df.is_modified.tolist() == [False, False, True, True]


def test_print_n_comparisons_prints_a_table(llama, capsys):
    actadd.print_n_comparisons(
        "abcdef", llama, 4, list(get_x_vector("Lo", "Ha", 3, 1)), num_comparisons=2, seed=0
    )
    out = capsys.readouterr().out
    assert "unsteered" in out and "steered" in out
