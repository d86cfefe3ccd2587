"""Reading what a forward pass received, under every name transformers releases use (no model)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from actadd.errors import ActAddError, PromptError
from actadd.forward_inputs import ForwardReader, cache_length


class _Cache:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_seq_length(self) -> int:
        return self.n


class _Base(nn.Module):
    def forward(  # the shape of a transformers base model's forward
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        past_key_values: Any = None,
        inputs_embeds: Any = None,
        **kwargs: Any,
    ) -> None:
        return None


IDS = torch.tensor([[5, 6, 7]])


def read(*args: Any, **kwargs: Any):
    return ForwardReader(_Base()).read(args, kwargs)


@pytest.mark.parametrize("name", ["past_key_values", "cache", "past_key_value"])
def test_the_cache_is_read_under_each_name(name):
    f = read(input_ids=IDS[:, :1], **{name: _Cache(4)})
    assert (f.batch, f.tokens, f.past) == (1, 1, 4)


def test_positional_arguments_are_bound_by_name():
    mask = torch.ones(1, 3, dtype=torch.long)
    f = read(IDS, mask)
    assert f.mask is mask and f.ids is IDS and f.past == 0


def test_a_2d_mask_longer_than_the_new_tokens_gives_the_past():
    f = read(input_ids=IDS[:, :1], attention_mask=torch.ones(1, 5, dtype=torch.long))
    assert f.past == 4 and f.mask is not None


def test_masks_that_are_not_2d_over_all_tokens_are_ignored():
    four_d = torch.zeros(1, 1, 3, 3)
    assert read(input_ids=IDS, attention_mask=four_d).mask is None
    short = torch.ones(1, 2, dtype=torch.long)  # covers fewer tokens than cache + new
    assert read(input_ids=IDS, attention_mask=short, past_key_values=_Cache(2)).mask is None


def test_position_ids_and_embeds():
    embeds = torch.zeros(2, 3, 8)
    f = read(inputs_embeds=embeds, position_ids=torch.arange(3)[None])
    assert (f.batch, f.tokens, f.ids) == (2, 3, None) and f.position_ids is not None


def test_no_tokens_is_an_error():
    with pytest.raises(PromptError, match="neither input_ids nor inputs_embeds"):
        read(attention_mask=torch.ones(1, 3))


def test_cache_length_of_legacy_tuples_and_unknown_objects():
    legacy = ((torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 6, 4)),)
    assert cache_length(legacy) == 6
    assert cache_length(_Cache(3)) == 3
    assert cache_length(None) is None and cache_length(object()) is None


def test_a_cache_under_a_new_name_is_still_found():
    f = read(input_ids=IDS[:, :1], kv_state=_Cache(9))
    assert f.past == 9


def test_cache_position_gives_the_past_when_no_cache_is_passed():
    f = read(input_ids=IDS[:, :1], cache_position=torch.tensor([4]))
    assert f.past == 4


class _Unknown(nn.Module):
    """A forward from a future release: its cache parameter has a name nobody used before."""

    def forward(self, input_ids: Any = None, kv_store: Any = None, use_cache: Any = None) -> None:
        return None


def test_a_cached_forward_with_nothing_to_place_its_tokens_raises():
    with pytest.raises(ActAddError, match="cannot tell where this forward pass's tokens sit"):
        ForwardReader(_Unknown()).read((), {"input_ids": IDS[:, :1], "use_cache": True})
    # a known cache parameter left at None is a new prompt, with or without use_cache
    assert read(input_ids=IDS, use_cache=True).past == 0
    assert read(input_ids=IDS, use_cache=True, past_key_values=None).past == 0
    # without a cache, or with positions, there is no ambiguity
    assert read(input_ids=IDS, use_cache=False).past == 0
    step = read(input_ids=IDS[:, :1], use_cache=True, position_ids=torch.tensor([[3]]))
    assert step.past == 3  # a decoding step, never a new one-token prompt


def test_cache_position_wins_and_a_wide_static_mask_does_not_move_the_past():
    # 4.x sent cache_position, exact where a static cache's own count was not
    assert read(input_ids=IDS[:, :1], cache=_Cache(4), cache_position=torch.tensor([6])).past == 6
    # a static cache's 2-D mask is as wide as the cache, not past + new tokens
    f = read(input_ids=IDS, cache=_Cache(0), attention_mask=torch.ones(1, 7, dtype=torch.long))
    assert f.past == 0 and f.mask is not None


def test_a_packed_forward_gives_its_segments_and_needs_positions():
    segments = torch.tensor([0, 1, 3])
    f = read(input_ids=IDS, position_ids=torch.tensor([[7, 0, 1]]), cu_seq_lens_q=segments)
    assert f.segments is segments and f.batch == 1
    assert read(input_ids=IDS).segments is None
    with pytest.raises(PromptError, match="needs position_ids"):
        read(input_ids=IDS, cu_seq_lens_q=segments)
