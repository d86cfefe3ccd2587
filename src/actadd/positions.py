"""Where additions land: locations, logical positions and layouts, as pure functions on tensors.

Nothing here touches a model, so all of it is tested on plain tensors (``tests/test_positions``).

A token's *logical position* is its index among its row's real (non-pad) tokens. It comes from
the 2-D attention mask when there is one (left padding), else from ``position_ids``, else from
the KV-cache length; never from the tensor's shape alone (a decoding step has one token but
sits at position ``n``).

A *location* says which logical positions an addition of ``L`` tokens covers in a prompt of
``P`` tokens:

* ``front``: ``[0, L)``: addition position ``i`` onto prompt position ``i`` (ActAdd);
* ``mid``: ``L`` positions centred on the prompt's middle;
* ``back``: the last ``L`` prompt positions;
* ``all``: the mean of the addition's vectors on every real token, prompt and generated
  (CAA/repeng).

A *layout* is a ``[R, W, D]`` tensor per site: row ``r``'s summed additions at logical
positions ``0..W-1`` (``W = 1`` for ``all``). Steering gathers from it at each token's logical
position, so one gather serves every row of a batch.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from actadd.errors import ActAddError, PromptError

__all__ = [
    "LOCATIONS",
    "addition_offset",
    "check_location",
    "check_prompt_lengths",
    "injected_mask",
    "injected_span",
    "layouts",
    "logical_positions",
    "lowest_position",
]

LOCATIONS = ("front", "mid", "back", "all")

K = TypeVar("K", bound=Hashable)


def check_location(location: object) -> str:
    """``location`` if it is one of ``LOCATIONS``, else an ``ActAddError`` listing them."""
    if location not in LOCATIONS:
        raise ActAddError(
            f"addition_location must be one of {', '.join(LOCATIONS)}, got {location!r}"
        )
    return str(location)


def addition_offset(location: str, prompt_len: int, add_len: int) -> int:
    """First prompt position an addition of ``add_len`` tokens lands on (not for ``all``).

    Example:
        >>> [addition_offset(loc, 10, 4) for loc in ("front", "mid", "back")]
        [0, 3, 6]
    """
    if location == "front":
        return 0
    if location == "back":
        return prompt_len - add_len
    if location == "mid":
        return prompt_len // 2 - add_len // 2
    raise ActAddError(f"location {location!r} has no offset (it covers every token)")


def injected_span(location: str, prompt_len: int, add_len: int) -> slice:
    """The prompt positions an addition of ``add_len`` tokens writes to, as a slice.

    Example:
        >>> injected_span("mid", 10, 4), injected_span("all", 10, 4)
        (slice(3, 7, None), slice(0, 10, None))
    """
    check_location(location)
    if add_len <= 0:
        return slice(0, 0)
    if location == "all":
        return slice(0, prompt_len)
    check_prompt_lengths([add_len], [prompt_len])
    off = addition_offset(location, prompt_len, add_len)
    return slice(off, off + add_len)


def injected_mask(location: str, prompt_len: int, add_len: int) -> Tensor:
    """``bool[prompt_len]``: the prompt positions an addition of ``add_len`` tokens writes to.

    ``add_len == 0`` (no addition) writes nowhere; ``all`` writes everywhere.

    Example:
        >>> injected_mask("back", 5, 2).tolist()
        [False, False, False, True, True]
    """
    mask = torch.zeros(prompt_len, dtype=torch.bool)
    mask[injected_span(location, prompt_len, add_len)] = True
    return mask


def check_prompt_lengths(need: Sequence[int], lengths: Sequence[int]) -> None:
    """Raise a ``PromptError`` if a prompt is shorter than its addition (``front/mid/back``).

    Rows are named only when there are several, so a single prompt is not blamed as "row 0".
    """
    for r, (n, p) in enumerate(zip(need, lengths, strict=True)):
        if p < n:
            which = f"prompt (row {r})" if len(need) > 1 else "the prompt"
            raise PromptError(
                f"{which} has {p} tokens but its addition has {n}: use a longer prompt, a "
                "shorter addition prompt, pad_method='tokens_right' on a shorter pair, or "
                "addition_location='all'"
            )


def logical_positions(
    batch: int,
    tokens: int,
    *,
    past: int,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """``(logical, real)``, each ``[B, T]``: each token's logical position (``-1`` on pads) and
    whether it is a real token, for a forward of ``T`` new tokens after ``past`` cached ones.

    Args:
        batch, tokens: ``B`` and ``T`` of this forward.
        past: tokens already in the cache (0 for a prompt without a cache).
        attention_mask: the 2-D mask ``[B, >= past + T]`` over cached and new tokens, if any.
        position_ids: ``[B or 1, T]`` or ``[T]``, used when there is no 2-D mask.

    Example:
        >>> mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
        >>> logical_positions(2, 3, past=0, attention_mask=mask)[0].tolist()
        [[-1, 0, 1], [0, 1, 2]]
        >>> logical_positions(1, 1, past=4)[0].tolist()  # a cached decoding step
        [[4]]
    """
    B, T = batch, tokens
    if attention_mask is not None:
        m = attention_mask[:, : past + T].long()  # [B, past + T]
        logical = (m.cumsum(-1) - 1)[:, -T:]  # [B, T]
        real = m[:, -T:].bool()
    elif position_ids is not None:
        logical = position_ids.reshape(-1, T).expand(B, T).long()
        real = torch.ones_like(logical, dtype=torch.bool)
    else:
        logical = torch.arange(past, past + T, device=device).expand(B, T)
        real = torch.ones_like(logical, dtype=torch.bool)
    return logical.masked_fill(~real, -1), real


def lowest_position(
    past: int, *, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
) -> int:
    """A lower bound on the logical positions of a forward's real tokens, in one reduction.

    A real token's logical position is at least the number of real tokens before this forward
    in its row; cached decoding far past the layouts can then skip computing positions.
    """
    if attention_mask is not None:
        return int(attention_mask[:, :past].long().sum(-1).min())
    if position_ids is not None and position_ids.numel():
        return int(position_ids.min())
    return past


def layouts(
    rows: Sequence[Sequence[tuple[K, Tensor, int]]],
    width: int,
    d_model: int,
    *,
    dims: slice = slice(None),
) -> dict[K, Tensor]:
    """Sum each row's additions into ``[R, width, D]`` tensors, one per key (site).

    Args:
        rows: per row, ``(key, tensor[L, D], offset)``: ``tensor`` lands on logical positions
            ``offset .. offset + L - 1`` of that row.
        width: logical positions covered (the longest prompt, or 1 for ``all``).
        d_model: ``D``.
        dims: only these residual dimensions are kept (``res_stream_slice``); adding 0.0
            elsewhere is exact.

    Example:
        >>> lay = layouts([[("s", torch.ones(2, 3), 1)], []], 4, 3)["s"]
        >>> lay.shape, lay[0, :, 0].tolist(), lay[1].abs().sum().item()
        (torch.Size([2, 4, 3]), [0.0, 1.0, 1.0, 0.0], 0.0)
    """
    out: dict[K, Tensor] = {}
    for r, row in enumerate(rows):
        for key, tensor, off in row:
            lay = out.get(key)
            if lay is None:
                dtype = torch.promote_types(tensor.dtype, torch.float32)
                lay = out[key] = tensor.new_zeros((len(rows), width, d_model), dtype=dtype)
            lay[r, off : off + tensor.shape[0]] += tensor
    if dims != slice(None):
        keep = torch.zeros(d_model)
        keep[dims] = 1.0
        out = {k: lay * keep.to(lay) for k, lay in out.items()}
    return out
