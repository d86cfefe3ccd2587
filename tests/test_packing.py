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
