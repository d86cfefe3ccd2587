"""The per-position magnitude diagnostic, on a tiny model with hand-made injections."""

from __future__ import annotations

import warnings

import pytest
import torch

import actadd
from actadd.diagnostics import OutlierWarning, steering_magnitudes_relative_to_prompt
from actadd.hooks import capture
from actadd.sites import Site
from actadd.steering import Injection


class Fixed:
    """A steerable with a hand-made tensor: the diagnostic must report exactly its norms."""

    def __init__(self, tensor: torch.Tensor, coeff: float = 1.0, layer: int = 1) -> None:
        self.tensor, self.coeff, self.layer = tensor, coeff, layer

    def injections(self, lm: actadd.LM) -> list[Injection]:
        return [Injection(Site("resid_pre", self.layer), self.tensor, self.coeff)]


def test_norms_positions_and_columns(llama):
    t = torch.zeros(3, 64, dtype=torch.float64)
    t[0, 0], t[2, 1] = 3.0, 4.0
    df = steering_magnitudes_relative_to_prompt(llama, "abcdefg", [Fixed(t)], warn=False)
    assert list(df.columns) == [
        "site",
        "position",
        "token",
        "addition_norm",
        "prompt_norm",
        "relative",
        "outlier",
    ]
    assert df.addition_norm.tolist()[:4] == [3.0, 0.0, 4.0, 0.0]
    resid = capture(llama, llama.to_tokens("abcdefg"), [Site("resid_pre", 1)])
    expected = resid[Site("resid_pre", 1)][0].norm(dim=-1)
    torch.testing.assert_close(torch.tensor(df.prompt_norm.tolist()), expected.float())
    back = steering_magnitudes_relative_to_prompt(
        llama, "abcdefg", [Fixed(t)], addition_location="back", warn=False
    )
    assert back.addition_norm.tolist()[-3:] == [3.0, 0.0, 4.0]


def test_outlier_warning_names_the_position(llama):
    typical = float(
        capture(llama, llama.to_tokens("abcdefg"), [Site("resid_pre", 1)])[Site("resid_pre", 1)][0]
        .norm(dim=-1)
        .median()
    )
    t = torch.zeros(2, 64, dtype=torch.float64)
    t[0, 0] = 0.5 * typical  # ordinary
    t[1, 0] = 10 * typical  # a sink-sized vector at position 1
    with pytest.warns(OutlierWarning, match="position 1"):
        df = steering_magnitudes_relative_to_prompt(llama, "abcdefg", [Fixed(t)])
    assert df.outlier.tolist()[:2] == [False, True]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steering_magnitudes_relative_to_prompt(llama, "abcdefg", [Fixed(t[:1])])


def test_prompt_too_short_and_bad_location(llama):
    t = torch.ones(5, 64, dtype=torch.float64)
    with pytest.raises(actadd.ActAddError, match="shorter"):
        steering_magnitudes_relative_to_prompt(llama, "ab", [Fixed(t)])
    with pytest.raises(actadd.ActAddError, match="addition_location"):
        steering_magnitudes_relative_to_prompt(llama, "abc", [Fixed(t)], addition_location="x")
