"""Contrast datasets and the mean_diff / PCA builders, checked against independent computations."""

from __future__ import annotations

import json

import pytest
import torch

import actadd
from actadd.contrast import _direction, parse_layers, read_pairs
from actadd.datasets import ContrastPair, as_dataset, list_datasets, load_pairs, load_texts
from actadd.sites import parse_site

PAIRS = [("good day", "bad day"), ("nice cat", "mean cat"), ("I win", "I lose"), ("yes!", "no.")]


def hidden(lm, ids: list[int], layer: int) -> torch.Tensor:
    """Input of decoder layer ``layer`` for one text, from output_hidden_states (no hooks)."""
    with torch.no_grad():
        out = lm.base_model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer][0]  # [T, D]


def expected_reading(lm, pair: ContrastPair, text: str, layer: int, read: str) -> torch.Tensor:
    if pair.prompt:
        head = lm.token_ids(pair.prompt)
        ids = head + lm.tokenizer(text, add_special_tokens=False).input_ids
    else:
        head, ids = [], lm.token_ids(text)
    h = hidden(lm, ids, layer)
    if read == "last":
        return h[-1]
    if read == "answer":
        return h[len(head) :].mean(0)
    return h[1:].mean(0)  # mean skips position 0 (the sink)


# -- datasets -----------------------------------------------------------------------------------
def test_shipped_datasets_load():
    assert {"sentiment", "weddings", "formality", "neutral"} <= set(list_datasets())
    for name, n in [("sentiment", 50), ("weddings", 40), ("formality", 40)]:
        ds = load_pairs(name)
        assert len(ds) == n and ds.name == name
        assert all(p.positive != p.negative for p in ds)
        assert len({p.positive for p in ds}) == n  # no duplicates
    assert len(load_texts("neutral")) == 30
    assert load_pairs("sentiment").digest == load_pairs("sentiment").digest


def test_user_files_jsonl_csv_json_and_caa(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"positive": p, "negative": n}) for p, n in PAIRS) + "\n\n"
    )
    (tmp_path / "a.csv").write_text(
        "prompt,positive,negative\n" + "".join(f'Q:,"{p}","{n}"\n' for p, n in PAIRS)
    )
    caa = [
        {
            "question": "Pick (A) or (B)?",
            "answer_matching_behavior": "(A",
            "answer_not_matching_behavior": "(B",
        }
    ]
    (tmp_path / "caa.json").write_text(json.dumps(caa))
    a = load_pairs(tmp_path / "a.jsonl")
    c = load_pairs(str(tmp_path / "a.csv"))
    assert [(p.positive, p.negative) for p in a] == PAIRS
    assert [(p.positive, p.negative, p.prompt) for p in c] == [(p, n, "Q:") for p, n in PAIRS]
    assert load_pairs(tmp_path / "caa.json")[0] == ContrastPair("(A", "(B", "Pick (A) or (B)?")
    assert a.digest != c.digest


def test_bad_dataset_files_name_the_problem(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"positive": "a", "negative": "b"}\n{oops\n')
    with pytest.raises(actadd.ActAddError, match="line 2"):
        load_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "cols.jsonl").write_text('{"pos_text": "a", "neg_text": "b"}\n')
    with pytest.raises(actadd.ActAddError, match="needs 'positive' and"):
        load_pairs(tmp_path / "cols.jsonl")
    with pytest.raises(actadd.ActAddError, match="shipped datasets"):
        load_pairs("no-such-dataset")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(actadd.ActAddError, match="no pairs"):
        load_pairs(tmp_path / "empty.jsonl")
    with pytest.raises(actadd.ActAddError, match="non-empty"):
        as_dataset([("", "x")])


def test_parse_layers():
    assert parse_layers("4-6,9") == [4, 5, 6, 9]
    assert parse_layers(3) == [3] and parse_layers([1, "2-3"]) == [1, 2, 3]
    assert parse_layers("blocks.2.hook_resid_post") == ["blocks.2.hook_resid_post"]
    with pytest.raises(actadd.ActAddError):
        parse_layers("6-4")


# -- builders -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("read", ["last", "mean"])
def test_mean_diff_equals_independent_computation(tiny_factory, arch, read):
    lm = tiny_factory(arch)
    ds = as_dataset(PAIRS)
    v = actadd.mean_diff(lm, ds, "1-2", read=read, batch_size=3)  # batches mix lengths
    assert v.sites == ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]
    for layer in (1, 2):
        diffs = [
            expected_reading(lm, p, p.positive, layer, read)
            - expected_reading(lm, p, p.negative, layer, read)
            for p in ds
        ]
        expected = torch.stack(diffs).mean(0).float()
        got = v.directions[f"blocks.{layer}.hook_resid_pre"]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert v.meta["method"] == "mean_diff" and v.meta["read"] == read
    assert v.meta["data"]["n_pairs"] == 4 and v.meta["fingerprint"] == lm.fingerprint


def test_answer_reading_uses_the_answer_tokens(llama):
    ds = as_dataset([("Q: ok?", " yes sir", " no way"), ("Q: go?", " go", " stop now")])
    v = actadd.mean_diff(llama, ds, 2, read="answer")
    expected = torch.stack(
        [
            expected_reading(llama, p, p.positive, 2, "answer")
            - expected_reading(llama, p, p.negative, 2, "answer")
            for p in ds
        ]
    ).mean(0)
    torch.testing.assert_close(v.directions["blocks.2.hook_resid_pre"], expected.float())
    with pytest.raises(actadd.ActAddError, match="prompt"):
        actadd.mean_diff(llama, PAIRS, 2, read="answer")


def test_batched_reading_equals_one_at_a_time_and_layers_share_a_pass(gpt2):
    """gpt2 has absolute positions: right padding must keep real tokens where they were."""
    many = actadd.mean_diff(gpt2, PAIRS, "0-2", read="mean", batch_size=8)
    solo = actadd.mean_diff(gpt2, PAIRS, "0-2", read="mean", batch_size=1)
    assert many.allclose(solo, rtol=1e-7, atol=1e-9)
    one = actadd.mean_diff(gpt2, PAIRS, 1, read="mean")
    torch.testing.assert_close(
        one.directions["blocks.1.hook_resid_pre"], many.directions["blocks.1.hook_resid_pre"]
    )


def test_resid_post_site_and_reading_shapes(llama):
    site = parse_site("blocks.1.hook_resid_post", llama.n_layers)
    pos, neg = read_pairs(llama, PAIRS, [site], read="last")
    assert pos[site].shape == neg[site].shape == (4, llama.d_model)
    v = actadd.make_vector(llama, PAIRS, 1, site="resid_post", read="last")
    torch.testing.assert_close(v.directions[site.name], (pos[site] - neg[site]).mean(0))


def test_pca_recovers_a_planted_direction_with_the_right_sign():
    g = torch.Generator().manual_seed(0)
    d = 32
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    strength = 3.0 + torch.rand(40, generator=g)  # every pair shifts along +u
    diffs = strength[:, None] * u + 0.3 * torch.randn(40, d, generator=g)
    direction, stats = _direction(diffs, "pca", center=False)
    cos = torch.nn.functional.cosine_similarity(direction, u, dim=0)
    assert cos > 0.99  # right axis, positive sign
    assert float(direction.norm()) == pytest.approx(float(strength.mean()), rel=0.05)
    assert stats["agreement"] == 1.0 and stats["explained"] > 0.8
    flipped, _ = _direction(-diffs, "pca", center=False)
    assert torch.nn.functional.cosine_similarity(flipped, u, dim=0) < -0.99
    mean, _ = _direction(diffs, "mean_diff", center=False)
    torch.testing.assert_close(mean, diffs.mean(0))


def test_centred_pca_finds_the_axis_of_variance_not_the_mean():
    g = torch.Generator().manual_seed(1)
    a, b = torch.zeros(16), torch.zeros(16)
    a[0], b[1] = 1.0, 1.0
    # a constant shift along a, a large spread along b
    diffs = 2.0 * a + torch.randn(200, 1, generator=g) * 5.0 * b
    unc, _ = _direction(diffs, "pca", center=False)
    cen, _ = _direction(diffs, "pca", center=True)
    assert abs(float(cen[1])) / float(cen.norm()) > 0.99  # centred: the spread
    assert abs(float(unc[1])) / float(unc.norm()) > 0.9  # uncentred too, as b dominates power
    diffs_small = 2.0 * a + torch.randn(200, 1, generator=g) * 0.5 * b
    unc, _ = _direction(diffs_small, "pca", center=False)
    assert float(unc[0]) / float(unc.norm()) > 0.99  # uncentred: the consistent shift


def test_pca_vector_from_the_model(llama):
    v = actadd.pca(llama, PAIRS, 2)
    d = v.directions["blocks.2.hook_resid_pre"]
    md = actadd.mean_diff(llama, PAIRS, 2).directions["blocks.2.hook_resid_pre"]
    assert float(d @ md) > 0  # positive means positive
    assert (
        v.meta["method"] == "pca"
        and 0 < v.meta["stats"]["blocks.2.hook_resid_pre"]["explained"] <= 1
    )
    with pytest.raises(actadd.ActAddError, match="method"):
        actadd.make_vector(llama, PAIRS, 2, method="lda")
