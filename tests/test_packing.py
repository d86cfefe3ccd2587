"""Mixed steps' masks and layout (``actadd.packing``), on plain tensors: no query may see
another request's keys, padding or keys outside its sliding window."""

from __future__ import annotations

import torch

from actadd.packing import MixedStep


def step(window_mask: list[list[int]], lengths: list[int]) -> MixedStep:
    return MixedStep(object(), torch.tensor(window_mask), lengths)


def test_new_prompts_are_laid_out_left_padded_in_packed_order():
    s = step([[1, 1]], [2, 3])
    assert s.slots.tolist() == [1, 2, 3, 4, 5]  # [pad, a0, a1 | b0, b1, b2]
    assert s.new_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    h, hd = 2, 4
    packed = (
        torch.arange(5 * h * hd, dtype=torch.float).view(5, h, hd).transpose(0, 1)
    )  # [H, S, hd]
    grid = s._grid(packed)  # [K, H, P, hd]
    assert grid.shape == (2, h, 3, hd)
    assert torch.equal(grid[0, :, 0], torch.zeros(h, hd))  # the pad slot
    assert torch.equal(grid[0, :, 1:], packed[:, 0:2]) and torch.equal(grid[1], packed[:, 2:5])


def test_decoding_rows_see_their_real_keys_inside_the_window():
    # row 0: one pad then 4 real tokens (the last is this step's); row 1: 5 real tokens
    s = step([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], [1])
    dec, _ = s.masks(None)
    assert dec is not None and dec.shape == (2, 1, 1, 5)
    assert dec[:, 0, 0].tolist() == [[False, True, True, True, True], [True] * 5]
    dec, _ = s.masks(2)  # q - k < 2: this token and the one before
    assert dec[:, 0, 0].tolist() == [
        [False, False, False, True, True],
        [False, False, False, True, True],
    ]


def test_new_prompts_attend_causally_to_themselves_only():
    s = step([[1]], [2, 3])
    _, new = s.masks(None)
    assert new.shape == (2, 1, 3, 3)
    a, b = new[0, 0].int().tolist(), new[1, 0].int().tolist()
    # row a: slot 0 is padding (sees only itself, its output dropped), then causal over a's 2
    assert a == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert b == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    _, windowed = s.masks(2)
    assert windowed[1, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]


def test_a_packed_prefill_has_no_decoding_rows():
    s = MixedStep(None, None, [3, 1])
    assert s.B == 0 and s.get_seq_length() == 0
    dec, new = s.masks(None)
    assert dec is None and new.shape == (2, 1, 3, 3)
    assert new[1, 0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]  # 2 pads, 1 token


def test_steer_shares_front_additions_over_a_packed_forward_and_refuses_per_row_ones(llama):
    """A packed forward's requests are steered by their own logical positions; additions given
    per row cannot be matched to segments nobody planned, so they raise instead of guessing."""
    import pytest

    import actadd
    from actadd.batching import _cache_keyword
    from actadd.errors import ActAddError
    from actadd.packing import mixed_forward

    kw = _cache_keyword(llama.model)
    a, b = (torch.tensor(llama.token_ids(p)) for p in ("abcdefg", "xyz w"))
    adds = [actadd.ActivationAddition(3.0, 1, prompt="ab")]
    with torch.no_grad(), actadd.steer(llama, adds):
        want = [llama.model(input_ids=t[None]).logits[0, -1] for t in (a, b)]
        step = MixedStep(None, None, [len(a), len(b)])
        positions = torch.cat([torch.arange(len(a)), torch.arange(len(b))])
        segments = torch.tensor([0, len(a), len(a) + len(b)])
        got = mixed_forward(llama, step, torch.cat([a, b]), positions, segments, kw)
    with torch.no_grad():
        plain = llama.model(input_ids=a[None]).logits[0, -1]
    assert not torch.allclose(want[0], plain)  # the addition acts
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    step = MixedStep(None, None, [len(a), len(b)])
    with (
        torch.no_grad(),
        actadd.steer(llama, [adds, []]),
        pytest.raises(ActAddError, match="generate_many"),
    ):
        mixed_forward(llama, step, torch.cat([a, b]), positions, segments, kw)
