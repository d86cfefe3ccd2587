"""Where additions land, on plain tensors: locations, logical positions, layouts (no model)."""

from __future__ import annotations

import pytest
import torch

from actadd.errors import ActAddError, PromptError
from actadd.positions import (
    LOCATIONS,
    addition_offset,
    check_location,
    check_prompt_lengths,
    injected_mask,
    injected_span,
    layouts,
    logical_positions,
    lowest_position,
    packed_rows,
)


def test_locations_and_their_offsets():
    assert LOCATIONS == ("front", "mid", "back", "all", "generated")
    assert [addition_offset(loc, 10, 4) for loc in ("front", "mid", "back")] == [0, 3, 6]
    assert addition_offset("mid", 5, 5) == 0 and addition_offset("back", 5, 5) == 0
    assert addition_offset("mid", 7, 2) == 2  # 7 // 2 - 2 // 2
    for loc in ("all", "generated"):
        with pytest.raises(ActAddError, match="no offset"):
            addition_offset(loc, 10, 4)


def test_offsets_and_spans_relative_to_a_span():
    span = (3, 9)  # e.g. the user's message inside a chat template
    assert [addition_offset(loc, 12, 2, span) for loc in ("front", "mid", "back")] == [3, 5, 7]
    assert injected_span("all", 12, 2, span) == slice(3, 9)
    assert injected_span("generated", 12, 2, span) == slice(0, 0)  # never the prompt
    with pytest.raises(PromptError, match=r"the span \(3, 9\) of the prompt has 6 tokens"):
        injected_span("back", 12, 7, span)
    with pytest.raises(PromptError, match="not a non-empty part"):
        injected_span("front", 12, 1, (5, 13))


def test_check_location_names_the_choices():
    assert check_location("mid") == "mid"
    with pytest.raises(ActAddError, match="front, mid, back, all"):
        check_location("middle")


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("front", [1, 1, 1, 0, 0, 0, 0]),
        ("mid", [0, 0, 1, 1, 1, 0, 0]),
        ("back", [0, 0, 0, 0, 1, 1, 1]),
        ("all", [1, 1, 1, 1, 1, 1, 1]),
        ("generated", [0, 0, 0, 0, 0, 0, 0]),
    ],
)
def test_injected_mask_of_each_location(location, expected):
    assert injected_mask(location, 7, 3).long().tolist() == expected
    span = injected_span(location, 7, 3)
    assert torch.arange(7)[span].tolist() == [i for i, x in enumerate(expected) if x]


def test_no_addition_writes_nowhere():
    assert not injected_mask("front", 4, 0).any() and not injected_mask("all", 4, 0).any()


def test_short_prompts_are_refused_naming_the_row_only_in_batches():
    with pytest.raises(PromptError, match=r"^the prompt has 2 tokens but its addition has 3"):
        injected_mask("back", 2, 3)
    with pytest.raises(PromptError, match=r"prompt \(row 1\) has 1 tokens"):
        check_prompt_lengths([1, 2], [3, 1])
    check_prompt_lengths([2, 0], [2, 5])  # long enough: no error


def test_logical_positions_under_left_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    logical, real = logical_positions(2, 4, past=0, attention_mask=mask)
    assert logical.tolist() == [[-1, -1, 0, 1], [0, 1, 2, 3]]
    assert real.tolist() == [[False, False, True, True], [True] * 4]


def test_logical_positions_of_a_cached_decoding_step():
    # two cached tokens + one new, the first row left-padded by one
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    logical, real = logical_positions(2, 1, past=2, attention_mask=mask)
    assert logical.tolist() == [[1], [2]] and real.all()


def test_logical_positions_without_a_mask():
    pos = torch.tensor([[5, 6]])
    assert logical_positions(3, 2, past=0, position_ids=pos)[0].tolist() == [[5, 6]] * 3
    assert logical_positions(2, 1, past=7)[0].tolist() == [[7], [7]]  # from the cache length


def test_lowest_position_bounds_the_forward():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # 3 cached columns, 1 new
    assert lowest_position(3, attention_mask=mask) == 2
    assert lowest_position(3, position_ids=torch.tensor([[4], [9]])) == 4
    assert lowest_position(6) == 6


def test_layouts_sum_additions_at_their_offsets():
    a, b = torch.ones(2, 3), 2 * torch.ones(1, 3)
    lay = layouts([[("s", a, 1), ("s", b, 2)], [("t", b, 0)]], 4, 3)
    assert set(lay) == {"s", "t"} and lay["s"].shape == (2, 4, 3)
    assert lay["s"][0, :, 0].tolist() == [0.0, 1.0, 3.0, 0.0]
    assert lay["s"][1].abs().sum() == 0 and lay["t"][1, :, 0].tolist() == [2.0, 0.0, 0.0, 0.0]


def test_layouts_keep_only_the_sliced_dims_and_promote_to_float32():
    lay = layouts([[("s", torch.ones(1, 4, dtype=torch.float16), 0)]], 1, 4, dims=slice(1, 3))
    assert lay["s"].dtype == torch.float32
    assert lay["s"][0, 0].tolist() == [0.0, 1.0, 1.0, 0.0]


def test_layouts_stay_differentiable():
    v = torch.zeros(1, 3, requires_grad=True)
    lay = layouts([[("s", v * 2, 0)]], 2, 3)["s"]
    lay.sum().backward()
    assert v.grad is not None and v.grad.tolist() == [[2.0, 2.0, 2.0]]


def test_packed_rows_map_each_token_to_its_request():
    # two decoding rows (one token each), then prompts of 3 and 2 tokens
    segments = torch.tensor([0, 1, 2, 5, 7])
    assert packed_rows(segments, 7).tolist() == [0, 1, 2, 2, 2, 3, 3]
    assert packed_rows(torch.tensor([0, 4]), 4).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "segments, why", [([0, 2, 2, 5], "empty request"), ([0, 3], "from 0 to the 5"), ([1, 5], "0")]
)
def test_packed_rows_refuse_segments_that_do_not_cover_the_forward(segments, why):
    with pytest.raises(ActAddError, match=why):
        packed_rows(torch.tensor(segments), 5)
