"""Site names, layer normalisation, architecture table and guesser."""

from __future__ import annotations

import pytest
from torch import nn

import actadd
from actadd.sites import ARCHITECTURES, Site, canonical_act_name, guess_site_map, parse_site


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (6, Site("resid_pre", 6)),
        ("blocks.6.hook_resid_pre", Site("resid_pre", 6)),
        ("blocks.2.hook_resid_post", Site("resid_post", 2)),
        ("blocks.3.attn_out", Site("attn_out", 3)),
        ("blocks.3.hook_mlp_out", Site("mlp_out", 3)),
        (-1, Site("resid_pre", 29)),
        ("blocks.-30.hook_resid_pre", Site("resid_pre", 0)),
    ],
)
def test_parse_site(name, expected):
    assert parse_site(name, 30) == expected


@pytest.mark.parametrize("bad", [30, -31, "blocks.99.hook_resid_pre"])
def test_layer_out_of_range_names_the_range(bad):
    with pytest.raises(actadd.SiteError, match=r"0\.\.29"):
        parse_site(bad, 30)


@pytest.mark.parametrize("bad", ["blocks.6.hook_resid", "layer6", "resid_pre", True, 6.0, None])
def test_unknown_site_is_a_clear_error(bad):
    with pytest.raises(actadd.SiteError):
        canonical_act_name(bad)


def test_errors_are_value_errors():
    assert issubclass(actadd.SiteError, actadd.ActAddError)
    assert issubclass(actadd.ActAddError, ValueError)


def test_get_act_name_round_trip():
    assert actadd.get_act_name("resid_post", 4) == "blocks.4.hook_resid_post"
    assert parse_site(actadd.get_act_name("mlp_out", 1), 3) == Site("mlp_out", 1)


def test_guesser_finds_layers_of_an_unknown_architecture():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.Linear(4, 4)
            self.ffn = nn.Linear(4, 4)

    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "weird", "num_hidden_layers": 3})()
            self.trunk = nn.Module()
            self.trunk.blocks = nn.ModuleList(Block() for _ in range(3))
            self.heads = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    guess = guess_site_map(Weird())
    assert (guess.layers, guess.attn_out, guess.mlp_out) == ("trunk.blocks", "attention", "ffn")


def test_table_paths_exist_on_tiny_models(tiny_factory):
    from conftest import ARCHS

    for arch in ARCHS:
        lm = tiny_factory(arch)
        assert lm.site_map == ARCHITECTURES[arch]
        assert lm.n_layers == 3 and lm.d_model == 64


def test_user_override_of_layers(llama):
    lm = actadd.LM(llama.model, llama.tokenizer, layers="model.layers")
    assert lm.layers is llama.layers
    with pytest.raises(actadd.SiteError, match="not found"):
        actadd.LM(llama.model, llama.tokenizer, layers="model.nope")
