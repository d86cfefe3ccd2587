"""Steering sources: specs, additions per layer and coefficient, locations, random controls,
and vector files that rebuild the exact steering they stand for."""

from __future__ import annotations

import pytest
import torch

import actadd
from actadd.sources import Located, RandomLike, Source, additions_of, as_source
from actadd.steering import resolve


def test_specs_round_trip_and_name_the_forms():
    for spec in ("pair:Love:Hate", "pair+pad: weddings: ", "pair:Love:", "mean_diff:sentiment",
                 "pca:data.jsonl", "optimized:sentiment", "vector:v.safetensors"):  # fmt: skip
        assert Source.parse(spec).spec == spec
    assert as_source(("Love", "Hate")) == Source.parse("pair:Love:Hate")
    assert Source.parse("pair:Love:Hate").default_location == "front"
    assert Source.parse("pca:sentiment").default_location == "all"
    for bad, match in [
        ("Love-Hate", "pair:ADD:SUB"),
        ("pair:Love", "pair:ADD:SUB"),
        ("median:sentiment", "unknown source kind"),
        ("mean_diff:", "needs its contrast dataset"),
        ("pair::Hate", "needs the prompt to add"),
    ]:
        with pytest.raises(actadd.ActAddError, match=match):
            Source.parse(bad)


def test_pair_additions_match_get_x_vector(llama):
    p = Source.parse("pair:ab:cd").prepare(llama, [1, 2])
    assert p.layers == [1, 2]
    got = resolve(llama, [p.additions(2, 3.0)])[0]
    want = resolve(llama, [list(actadd.get_x_vector("ab", "cd", 3.0, 2))])[0]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.tensor, w.tensor)
        assert g.default_location == "front"
    at_all = resolve(llama, [p.additions(2, 3.0, "all")])[0]
    assert {i.default_location for i in at_all} == {"all"}


def test_vector_sources_are_unit_directions_times_coeff(llama):
    p = Source.parse("mean_diff:sentiment").prepare(llama, [1])
    (inj,) = resolve(llama, [p.additions(1, 8.0)])[0]
    assert inj.default_location == "all"
    assert float(inj.tensor.norm()) == pytest.approx(8.0, rel=1e-5)
    (front,) = resolve(llama, [p.additions(1, 8.0, "front")])[0]
    assert front.default_location == "front"


def test_located_moves_any_addition():
    a = actadd.ActivationAddition(2.0, 1, prompt="ab")
    assert Located(a, "back").describe().endswith("[back]")
    with pytest.raises(actadd.ActAddError, match="addition_location"):
        Located(a, "middle")


def test_random_like_copies_norms_sites_and_locations(llama):
    adds = tuple(actadd.get_x_vector("abc", "d", 3.0, 1))
    (net,) = resolve(llama, [list(adds)])[0][:1]
    injs = resolve(llama, [[RandomLike(adds, seed=0)]])[0]
    assert len(injs) == 1 and injs[0].site == net.site and injs[0].default_location == "front"
    n = len(llama.token_ids("abc"))
    summed = torch.zeros(n, llama.d_model, dtype=torch.float64)
    for i in resolve(llama, [list(adds)])[0]:
        summed[: i.tensor.shape[0]] += i.tensor.double()
    torch.testing.assert_close(
        injs[0].tensor.double().norm(dim=-1), summed.norm(dim=-1), rtol=1e-5, atol=1e-5
    )
    other = resolve(llama, [[RandomLike(adds, seed=1)]])[0][0]
    cos = torch.nn.functional.cosine_similarity(injs[0].tensor[0], other.tensor[0], dim=0)
    assert abs(float(cos)) < 0.5  # different directions


def test_a_saved_vector_rebuilds_its_configuration(llama, tmp_path):
    for spec, location in [("pair:ab:cd", "front"), ("pca:sentiment", "all"),
                           ("mean_diff:sentiment", "back")]:  # fmt: skip
        p = Source.parse(spec).prepare(llama, [1])
        v = p.vector(1, 4.0, location, note="test")
        v.save(tmp_path / "v.safetensors")
        back = actadd.SteeringVector.load(tmp_path / "v.safetensors", llama)
        assert back.meta["recipe"] == {"source": spec, "layer": 1, "coeff": 4.0,
                                       "location": location}  # fmt: skip
        assert back.meta["note"] == "test" and back.meta["location"] == location
        ids = llama.to_tokens("hello world")
        with actadd.steer(llama, additions_of(llama, back)):
            a = llama.model(ids).logits
        with actadd.steer(llama, p.additions(1, 4.0, location)):
            b = llama.model(ids).logits
        torch.testing.assert_close(a, b)
