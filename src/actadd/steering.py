"""``steer``: add activation vectors to a model's residual stream inside a ``with`` block.

The flow, for one ``steer(lm, additions)`` block:

1. ``as_rows`` normalises what the caller passed (an addition, a list shared by every row, or
   one list per batch row) into rows of steerables; ``resolve`` turns each into ``Injection``
   objects (``tensor[L, D]`` at a site, coefficient applied): this is where an
   ``ActivationAddition`` runs its prompt through the model and records it.
2. ``Steering`` checks the injections once and lays them out over logical positions
   (``actadd.positions``).
3. ``hooked`` puts a root hook on the module that owns the decoder layers and one hook per
   site. For every forward pass the root hook reads what the model received
   (``actadd.forward_inputs``), computes each token's logical position and the layout index to
   gather from; each site hook then adds one gathered tensor: no Python loop over rows or
   tokens.

``front``/``mid``/``back`` are defined on the prompt, fixed when the prompt is first seen, so
``generate`` with or without the KV cache, and with left padding, puts additions on the same
prompt tokens; ``all`` also steers every generated token.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from actadd.errors import ActAddError, OutlierWarning, PromptError, SiteError
from actadd.forward_inputs import ForwardInputs, ForwardReader
from actadd.hooks import HookFn, hooked, is_paused
from actadd.model import LM, as_lm
from actadd.positions import (
    LOCATIONS,
    addition_offset,
    check_location,
    check_prompt_lengths,
    injected_span,
    layouts,
    logical_positions,
    lowest_position,
)
from actadd.sites import Site

__all__ = [
    "LOCATIONS",
    "Injection",
    "Steerable",
    "Steering",
    "as_rows",
    "injected",
    "resolve",
    "row_locations",
    "steer",
    "validate_injections",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Injection:
    """A resolved addition: ``tensor[L, D]`` (coefficient applied) to add at ``site``."""

    site: Site
    tensor: Tensor  # [L, D]
    coeff: float = 1.0  # already applied to tensor; kept for magnitude diagnostics
    default_location: str = "front"  # where it lands unless the caller says otherwise


@runtime_checkable
class Steerable(Protocol):
    """Anything ``steer`` accepts: it resolves itself into injections for a model."""

    def injections(self, lm: LM) -> list[Injection]: ...


# -- the one normaliser of additions -------------------------------------------------------------
def as_rows(additions: Any, n: int | None = None) -> tuple[list[list[Steerable]], bool]:
    """One list of steerables per row, and whether the caller gave one list per row.

    Accepted: ``None`` or ``[]`` (no steering); one steerable; a list or tuple of steerables
    shared by every row (tuples inside it, such as ``get_x_vector``'s pair, are flattened); or
    a list of *lists*, one per row. With ``n`` (the number of prompts) a shared list is
    repeated ``n`` times and a per-row list must have ``n`` entries.

    Example:
        >>> a = ActivationAddition(1.0, 6, prompt="Love")
        >>> rows, per_row = as_rows([[a], []])
        >>> [len(r) for r in rows], per_row
        ([1, 0], True)
        >>> [len(r) for r in as_rows((a, a), n=3)[0]]
        [2, 2, 2]
    """
    if additions is None:
        items: list[Any] = []
    elif isinstance(additions, Steerable):
        items = [additions]
    elif isinstance(additions, (list, tuple)):
        items = list(additions)
    else:
        raise ActAddError(
            f"cannot steer with {type(additions).__name__}: pass additions (e.g. "
            "get_x_vector(...)), a list of them, or one list per prompt"
        )
    lists = [isinstance(a, list) for a in items]
    if items and all(lists):
        rows = [_flat(r) for r in items]
        if n is not None and len(rows) != n:
            raise ActAddError(
                f"{len(rows)} lists of additions for {n} prompts: give one each (one list per "
                "prompt), or one list shared by all"
            )
        return rows, True
    if any(lists):
        raise ActAddError(
            "mix of additions and lists of additions: pass either one list shared by every "
            "row, or one list per row (a list of lists)"
        )
    if len(items) > 1 and all(isinstance(a, tuple) for a in items):
        raise ActAddError(
            "a list of tuples is ambiguous: for one set of additions per prompt pass lists "
            "(`[list(a), list(b)]`); to share them all, flatten them (`[*a, *b]`)"
        )
    shared = _flat(items)
    return [shared] * (1 if n is None else n), False


def _flat(items: Any) -> list[Steerable]:
    out: list[Steerable] = []
    for a in items:
        if isinstance(a, tuple):
            out.extend(_flat(a))
        elif isinstance(a, Steerable):
            out.append(a)
        else:
            raise ActAddError(
                f"cannot steer with {type(a).__name__}: use ActivationAddition or "
                "SteeringVector objects (a tuple from get_x_vector is fine)"
            )
    return out


def resolve(lm: LM, rows: list[list[Steerable]]) -> list[list[Injection]]:
    """Each row's injections; a list shared by several rows is resolved once."""
    done: dict[int, list[Injection]] = {}
    out = []
    for row in rows:
        if id(row) not in done:
            done[id(row)] = [i for a in row for i in a.injections(lm)]
        out.append(done[id(row)])
    return out


def validate_injections(injections: list[Injection], d_model: int) -> None:
    """Reject injections of another width, of the wrong rank, or with NaN/inf values."""
    for inj in injections:
        if inj.tensor.ndim != 2 or inj.tensor.shape[1] != d_model:
            raise ActAddError(
                f"addition for {inj.site} has shape {tuple(inj.tensor.shape)}; this model "
                f"needs [positions, {d_model}]: was it made with another model?"
            )
        if not torch.isfinite(inj.tensor).all():
            raise ActAddError(f"addition for {inj.site} contains NaN or inf values")


def injected(
    injections: list[Injection],
    prompt_len: int,
    location: str | None = None,
    *,
    include_all: bool = True,
) -> Tensor:
    """``bool[prompt_len]``: the prompt positions these injections write to, each at
    ``location`` or its own default. This one function answers "where did steering write?"
    for metrics (which mask those predictions), diagnostics and the server.

    ``include_all=False`` leaves out injections at ``all``: they write everywhere, so a loss
    that masked them would have nothing left to score.
    """
    mask = torch.zeros(prompt_len, dtype=torch.bool)
    for inj in injections:
        where = location or inj.default_location
        if where == "all" and not include_all:
            continue
        mask[injected_span(where, prompt_len, inj.tensor.shape[0])] = True
    return mask


# -- the state of one steer() block --------------------------------------------------------------
@dataclass
class _Forward:
    """What the root hook learned about the forward pass under way."""

    shape: tuple[int, int]  # (B, T)
    idx: Tensor | None  # [B, T] long: position in the positional layouts (None: none here)
    valid: Tensor | None  # [B, T, 1]: the token is real and inside a positional layout
    every: bool  # the "all" layouts apply to this forward
    real: Tensor | None  # [B, T, 1]: real tokens for "all" (None: every token is real)

    @property
    def active(self) -> bool:
        """Whether anything is added in this forward."""
        return self.idx is not None or self.every


class Steering:
    """The state of one ``steer`` block: layouts per site and the current forward's positions.

    Each injection lands at its own location: the row's location if one is given, else its
    own default (``front`` for prompt additions, ``all`` for steering vectors).

    Args:
        lm: the model.
        rows: one list of injections per batch row, or a single list shared by all rows.
        per_row: whether ``rows`` has one entry per batch row.
        locations: one location per entry of ``rows`` (None: each injection's default).
        dims: the residual dimensions to change (``res_stream_slice``).
    """

    def __init__(
        self,
        lm: LM,
        rows: list[list[Injection]],
        *,
        per_row: bool,
        locations: list[str | None] | None = None,
        dims: slice = slice(None),
    ) -> None:
        self.lm, self.per_row, self.dims = lm, per_row, dims
        locations = locations or [None] * len(rows)
        for row in rows:
            validate_injections(row, lm.d_model)
        placed = [
            [(i, check_location(loc or i.default_location)) for i in row]
            for row, loc in zip(rows, locations, strict=True)
        ]
        self.sites = sorted({i.site for row in rows for i in row}, key=lambda s: s.order)
        self.locations = sorted({loc for row in placed for _, loc in row})
        # positional additions (front/mid/back) are laid out over the prompt's positions
        self.positional = [[(i, loc) for i, loc in row if loc != "all"] for row in placed]
        self.need = [max((i.tensor.shape[0] for i, _ in r), default=0) for r in self.positional]
        self.tracks_prompt = any(loc in ("mid", "back") for loc in self.locations)
        self.pos_layouts: dict[Site, Tensor] = {}
        self.width = 1
        if any(self.positional) and not self.tracks_prompt:  # front only: known now
            self._lay_out(self.positional, [[0] * len(r) for r in self.positional])
        # "all": each row's mean addition vector on every real token
        means = [
            [(i.site, i.tensor.mean(0, keepdim=True), 0) for i, loc in row if loc == "all"]
            for row in placed
        ]
        self.all_layouts = layouts(means, 1, lm.d_model, dims=dims)
        self._cast: dict[tuple[str, Site, torch.dtype, torch.device], Tensor] = {}
        self._fwd: _Forward | None = None
        self._seen: Tensor | None = None  # tokens so far (mid/back: detect uncached decoding)
        self._reader = ForwardReader(lm.base_model)
        self._warn_sink()

    def _lay_out(self, rows: list[list[tuple[Injection, str]]], offsets: list[list[int]]) -> None:
        width = max(
            [
                off + i.tensor.shape[0]
                for r, o in zip(rows, offsets, strict=True)
                for (i, _), off in zip(r, o, strict=True)
            ]
            + [1]
        )
        placed = [
            [(i.site, i.tensor, off) for (i, _), off in zip(row, offs, strict=True)]
            for row, offs in zip(rows, offsets, strict=True)
        ]
        self.pos_layouts = layouts(placed, width, self.lm.d_model, dims=self.dims)
        self.width = width
        self._cast = {}

    def _warn_sink(self) -> None:
        """A direction (a steering vector, made for every token) put at ``front`` lands on
        position 0 only: most models' attention sink, where it does next to nothing. Prompt
        additions are left to ``steering_magnitudes_relative_to_prompt``: an x-vector whose
        sides both sit on the sink can steer through their difference."""
        for row in self.positional:
            for inj, loc in row:
                if loc == "front" and inj.tensor.shape[0] == 1 and inj.default_location == "all":
                    warnings.warn(
                        f"a steering vector at {inj.site} with location 'front' lands only on "
                        "position 0, which most models use as an attention sink: it will barely "
                        "steer. Use addition_location='all' (the default for vectors)",
                        OutlierWarning,
                        stacklevel=5,
                    )
                    return

    def describe(self) -> str:
        return f"{'/'.join(self.locations)} additions at {', '.join(s.name for s in self.sites)}"

    # -- the root hook: positions of this forward pass ------------------------------------------
    def on_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if is_paused(self.lm.model):
            self._fwd = None
            return None
        f = self._reader.read(args, kwargs)
        if self.per_row and len(self.positional) != f.batch:
            raise ActAddError(
                f"per-row additions were given for {len(self.positional)} rows but the model "
                f"got a batch of {f.batch}; pass one list of additions per prompt (and no "
                "num_return_sequences/beams), or one shared list"
            )
        self._fwd = self._plan(f)
        return None

    def _plan(self, f: ForwardInputs) -> _Forward:
        every, real = False, None
        if self.all_layouts:  # every real token: only padding matters
            if f.mask is not None:
                new = f.mask[:, f.past : f.past + f.tokens].bool()  # [B, T]
                every, real = bool(new.any()), None if bool(new.all()) else new[..., None]
            else:
                every = True
        idx = valid = None
        if any(self.positional):
            idx, valid = self._positions(f)
        return _Forward((f.batch, f.tokens), idx, valid, every, real)

    def _positions(self, f: ForwardInputs) -> tuple[Tensor | None, Tensor | None]:
        """Layout index and validity of each token for the positional additions."""
        if f.past > 0 and self.pos_layouts:
            lowest = lowest_position(f.past, attention_mask=f.mask, position_ids=f.position_ids)
            if lowest >= self.width:
                # a cached step whose tokens all sit beyond the layouts (decoding after the
                # prompt): nothing to add, and no positions to compute
                if self.tracks_prompt:
                    self._continue_prompt(f.ids)
                return None, None
        logical, real = logical_positions(
            f.batch,
            f.tokens,
            past=f.past,
            attention_mask=f.mask,
            position_ids=f.position_ids,
            device=f.device,
        )
        if self.tracks_prompt:
            self._track_prompt(f.ids, f.past, real)
        elif f.past == 0:
            check_prompt_lengths(self._need(f.batch), real.sum(-1).tolist())
        idx = logical.clamp(0, self.width - 1)
        valid = real & (logical < self.width)
        if not bool(valid.any()):
            return None, None
        return idx, valid[..., None]

    def _need(self, batch: int) -> list[int]:
        return self.need if self.per_row else self.need * batch

    def _continue_prompt(self, ids: Tensor | None) -> None:
        """Cached decoding under ``mid``/``back``: the prompt's layout stands; record the text."""
        if self._seen is None:
            raise PromptError(
                f"addition_location {'/'.join(self.locations)!r} needs to see the prompt, but "
                "this forward pass continues a KV cache filled outside steer(); run the prompt "
                "inside the steer() block"
            )
        if ids is not None:
            self._seen = torch.cat([self._seen, ids], 1)

    def _track_prompt(self, ids: Tensor | None, past: int, real: Tensor) -> None:
        """``mid``/``back``: lay the additions out relative to each row's prompt length."""
        if past > 0:  # cached decoding: the prompt's layout stands
            self._continue_prompt(ids)
            return
        seen = self._seen
        extends = (
            seen is not None
            and ids is not None
            and ids.shape[0] == seen.shape[0]
            and ids.shape[1] > seen.shape[1]
            and torch.equal(ids[:, : seen.shape[1]], seen)
        )
        self._seen = ids
        if extends:  # uncached decoding: same prompt, longer text
            return
        lengths = real.sum(-1).tolist()  # [B] prompt lengths
        check_prompt_lengths(self._need(len(lengths)), lengths)
        rows = self.positional if self.per_row else self.positional * len(lengths)
        offsets = [
            [0 if loc == "front" else addition_offset(loc, p, i.tensor.shape[0]) for i, loc in row]
            for row, p in zip(rows, lengths, strict=True)
        ]
        self._lay_out(rows, offsets)

    # -- the site hooks ---------------------------------------------------------------------------
    def _layout(self, kind: str, site: Site, h: Tensor) -> Tensor | None:
        """The layout of ``kind`` at ``site`` on ``h``'s device and dtype (each layer its own,
        for models split across devices), cast once per forward layout."""
        source = self.pos_layouts if kind == "pos" else self.all_layouts
        if site not in source:
            return None
        key = (kind, site, h.dtype, h.device)
        lay = self._cast.get(key)
        if lay is None:
            lay = self._cast[key] = source[site].to(device=h.device, dtype=h.dtype)
        return lay

    def site_fn(self, site: Site) -> HookFn:
        def add(h: Tensor) -> Tensor | None:
            fwd = self._fwd
            if fwd is None or not fwd.active:
                return None
            if tuple(h.shape[:2]) != fwd.shape:
                raise SiteError(
                    f"{site} saw a tensor of shape {tuple(h.shape)} but the model's forward "
                    f"pass has batch×tokens {fwd.shape}; call the whole model, not one layer"
                )
            out = h
            if fwd.every and (lay := self._layout("all", site, h)) is not None:
                # lay [1 or B, 1, D] broadcasts over tokens
                out = out + lay if fwd.real is None else out + lay * fwd.real.to(h.device)
            if fwd.idx is not None and (lay := self._layout("pos", site, h)) is not None:
                lay = lay.expand(h.shape[0], -1, -1) if lay.shape[0] == 1 else lay
                assert fwd.valid is not None  # set together with idx
                idx = fwd.idx.to(h.device)
                # [B, T, D] <- layout rows at each token's logical position
                delta = lay.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))
                out = out + delta * fwd.valid.to(h.device)
            return out if out is not h else None

        return add


@contextmanager
def steer(
    lm: LM,
    activation_additions: Any,
    *,
    addition_location: str | Sequence[str | None] | None = None,
    res_stream_slice: slice = slice(None),
) -> Iterator[Steering]:
    """Steer ``lm.model`` (its forward and ``generate``) inside the ``with`` block.

    Args:
        lm: the model.
        activation_additions: ``ActivationAddition``/``SteeringVector`` objects, or one list
            of them per batch row (each row steered by its own list); see ``as_rows``.
        addition_location: ``front`` (ActAdd), ``mid``, ``back`` or ``all``
            (``actadd.positions``); one per row for per-row additions; None (the default):
            each addition's own, ``front`` for prompt additions and ``all`` for vectors.
        res_stream_slice: only these residual dimensions are changed, e.g. ``slice(0, 403)``.

    Example:
        >>> lm = actadd.load_model()  # doctest: +SKIP
        >>> adds = actadd.get_x_vector("Love", "Hate", coeff=5, act_name=6)  # doctest: +SKIP
        >>> with actadd.steer(lm, adds):  # doctest: +SKIP
        ...     out = lm.model.generate(**lm.tokenizer("I hate you because", return_tensors="pt"))
    """
    lm = as_lm(lm, "lm")
    if not isinstance(res_stream_slice, slice):
        raise ActAddError(f"res_stream_slice must be a slice, got {res_stream_slice!r}")
    rows, per_row = as_rows(activation_additions)
    locations = row_locations(addition_location, len(rows), per_row)
    injections = resolve(lm, rows)
    if not any(injections):  # nothing to add: an empty context, still a context
        yield Steering(lm, [[]], per_row=False)
        return
    steering = Steering(lm, injections, per_row=per_row, locations=locations, dims=res_stream_slice)
    fns = [(site, steering.site_fn(site)) for site in steering.sites]
    with hooked(lm, fns, root_fn=steering.on_forward) as paths:
        log.info("steering %s via %s", steering.describe(), ", ".join(paths))
        yield steering


def row_locations(
    location: str | Sequence[str | None] | None, rows: int, per_row: bool
) -> list[str | None]:
    """One location (or None: the additions' own) per row of ``as_rows``'s output."""
    if location is None or isinstance(location, str):
        if location is not None:
            check_location(location)
        return [location] * rows
    locs = list(location)
    if not per_row or len(locs) != rows:
        raise ActAddError(
            f"{len(locs)} locations for {rows} rows of additions: give one location, or one "
            "per row together with one list of additions per row"
        )
    for loc in locs:
        if loc is not None:
            check_location(loc)
    return locs
