"""Where additions land: locations, logical positions and layouts, as pure functions on tensors.

Nothing here touches a model, so all of it is tested on plain tensors (``tests/test_positions``).

A token's *logical position* is its index among its row's real (non-pad) tokens. It comes from
the 2-D attention mask when there is one (left padding), else from ``position_ids``, else from
the KV-cache length; never from the tensor's shape alone (a decoding step has one token but
sits at position ``n``).

A *location* says which logical positions an addition of ``L`` tokens covers in a prompt of
``P`` tokens, relative to a *span* of it (``[s, e)``; the whole prompt ``[0, P)`` unless the
caller names one, e.g. the last user message of a chat):

* ``front``: ``[s, s + L)``: addition position ``i`` onto span position ``i`` (ActAdd);
* ``mid``: ``L`` positions centred on the span's middle;
* ``back``: the last ``L`` positions of the span;
* ``all``: the mean of the addition's vectors on every token of the span and every generated
  token (CAA/repeng; with no span named, every real token);
* ``generated``: the mean vector on generated tokens only (positions ``>= P``), never on the
  prompt.

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
    "POSITIONAL",
    "Span",
    "addition_offset",
    "check_location",
    "check_prompt_lengths",
    "check_span",
    "injected_mask",
    "injected_span",
    "layouts",
    "logical_positions",
    "lowest_position",
    "packed_rows",
]

LOCATIONS = ("front", "mid", "back", "all", "generated")
POSITIONAL = ("front", "mid", "back")  # an addition's positions onto the span's
Span = tuple[int, int]  # [start, end) of logical prompt positions

K = TypeVar("K", bound=Hashable)


def check_location(location: object) -> str:
    """``location`` if it is one of ``LOCATIONS``, else an ``ActAddError`` listing them."""
    if location not in LOCATIONS:
        raise ActAddError(
            f"addition_location must be one of {', '.join(LOCATIONS)}, got {location!r}"
        )
    return str(location)


def check_span(span: Span | None, prompt_len: int) -> Span:
    """``span`` (default: the whole prompt) if it lies inside a prompt of ``prompt_len``."""
    if span is None:
        return 0, prompt_len
    start, end = int(span[0]), int(span[1])
    if not 0 <= start < end <= prompt_len:
        raise PromptError(
            f"span {span} is not a non-empty part of the prompt's {prompt_len} tokens"
        )
    return start, end


def addition_offset(location: str, prompt_len: int, add_len: int, span: Span | None = None) -> int:
    """First prompt position an addition of ``add_len`` tokens lands on (``front``, ``mid``
    or ``back`` of ``span``, default the whole prompt).

    Example:
        >>> [addition_offset(loc, 10, 4) for loc in ("front", "mid", "back")]
        [0, 3, 6]
        >>> addition_offset("back", 10, 2, span=(2, 6))
        4
    """
    start, end = check_span(span, prompt_len)
    n = end - start
    if location == "front":
        return start
    if location == "back":
        return start + n - add_len
    if location == "mid":
        return start + n // 2 - add_len // 2
    raise ActAddError(f"location {location!r} has no offset (it covers whole ranges of tokens)")


def injected_span(location: str, prompt_len: int, add_len: int, span: Span | None = None) -> slice:
    """The prompt positions an addition of ``add_len`` tokens writes to, as a slice.

    ``all`` writes the whole span (and generated tokens, which are not prompt positions);
    ``generated`` writes no prompt position.

    Example:
        >>> injected_span("mid", 10, 4), injected_span("all", 10, 4, span=(3, 8))
        (slice(3, 7, None), slice(3, 8, None))
    """
    check_location(location)
    start, end = check_span(span, prompt_len)
    if add_len <= 0 or location == "generated":
        return slice(0, 0)
    if location == "all":
        return slice(start, end)
    which = "the prompt" if span is None else f"the span {span} of the prompt"
    if end - start < add_len:
        raise PromptError(
            f"{which} has {end - start} tokens but its addition has {add_len}: use a longer "
            "prompt, a shorter addition prompt, pad_method='tokens_right' on a shorter pair, "
            "or addition_location='all'"
        )
    off = addition_offset(location, prompt_len, add_len, span)
    return slice(off, off + add_len)


def injected_mask(location: str, prompt_len: int, add_len: int, span: Span | None = None) -> Tensor:
    """``bool[prompt_len]``: the prompt positions an addition of ``add_len`` tokens writes to.

    ``add_len == 0`` (no addition) writes nowhere; ``all`` writes the whole span.

    Example:
        >>> injected_mask("back", 5, 2).tolist()
        [False, False, False, True, True]
    """
    mask = torch.zeros(prompt_len, dtype=torch.bool)
    mask[injected_span(location, prompt_len, add_len, span)] = True
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


def packed_rows(segments: Tensor, tokens: int) -> Tensor:
    """``[tokens]``: the request (row) each token of a packed forward belongs to, from
    ``segments`` (``cu_seq_lens_q``: ``[R + 1]`` offsets where each request's tokens start).

    Example:
        >>> packed_rows(torch.tensor([0, 1, 2, 5]), 5).tolist()
        [0, 1, 2, 2, 2]
    """
    segments = segments.reshape(-1).long()
    if segments.numel() < 2 or int(segments[0]) != 0 or int(segments[-1]) != tokens:
        raise ActAddError(
            f"packed forward: cu_seq_lens_q {segments.tolist()} must run from 0 to the "
            f"{tokens} tokens of the forward"
        )
    if bool((segments[1:] <= segments[:-1]).any()):
        raise ActAddError(f"packed forward: cu_seq_lens_q {segments.tolist()} has an empty request")
    token = torch.arange(tokens, device=segments.device)
    return torch.searchsorted(segments[1:], token, right=True)


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
