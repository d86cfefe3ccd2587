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

A *packed* forward (several requests end to end in one row, ``cu_seq_lens_q`` saying where
each starts and ``position_ids`` each token's logical position, as the continuous-batching
scheduler's mixed steps send it: ``actadd.packing``) is steered per token by its request's
plan; additions given per row are refused there unless the scheduler planned the segments
(``Steering.for_plans``).

``front``/``mid``/``back`` are defined on the prompt, fixed when the prompt is first seen, so
``generate`` with or without the KV cache, and with left padding, puts additions on the same
prompt tokens; ``all`` also steers every generated token.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from actadd.conditions import Conditional
from actadd.errors import ActAddError, OutlierWarning, PromptError, SiteError
from actadd.forward_inputs import ForwardInputs, ForwardReader
from actadd.hooks import HookFn, hooked, is_paused
from actadd.model import LM, as_lm
from actadd.positions import (
    LOCATIONS,
    POSITIONAL,
    Span,
    addition_offset,
    check_location,
    check_prompt_lengths,
    injected_span,
    layouts,
    logical_positions,
    lowest_position,
    packed_rows,
)
from actadd.sites import Site

__all__ = [
    "LOCATIONS",
    "Conditioned",
    "Injection",
    "Placed",
    "RowPlan",
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
    condition: Conditional | None = None  # applies only to rows for which it holds


@runtime_checkable
class Steerable(Protocol):
    """Anything ``steer`` accepts: it resolves itself into injections for a model."""

    def injections(self, lm: LM) -> list[Injection]: ...


@dataclass(frozen=True, eq=False)
class Conditioned:
    """Steering by ``additions`` that applies to a row only if ``condition`` holds for that
    row's prompt (``actadd.conditions``); on the other rows it adds exactly nothing.

    Example:
        >>> refuse_legal = Conditioned(refusal * 6, legal)  # doctest: +SKIP
        >>> with steer(lm, [refuse_legal]): ...  # doctest: +SKIP
    """

    additions: Any
    condition: Conditional

    def __post_init__(self) -> None:
        if not isinstance(self.condition, Conditional):
            raise ActAddError(
                f"condition must be an actadd.Condition (or a composition of them), got "
                f"{type(self.condition).__name__}"
            )

    def injections(self, lm: LM) -> list[Injection]:
        rows, per_row = as_rows(self.additions)
        if per_row:
            raise ActAddError("Conditioned takes one list of additions, not one per row")
        for leaf in self.condition.leaves():
            leaf.resolve_site(lm)
        return [replace(i, condition=self.condition) for i in resolve(lm, rows)[0]]

    def describe(self) -> str:
        inner = "; ".join(
            getattr(a, "describe", lambda a=a: repr(a))() for a in as_rows(self.additions)[0][0]
        )
        return f"if {self.condition.describe()}: {inner}"


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


def validate_injections(
    injections: list[Injection], d_model: int, n_layers: int | None = None
) -> None:
    """Reject injections of another width, of the wrong rank, at a layer the model lacks, or
    with NaN/inf values."""
    for inj in injections:
        if n_layers is not None and not 0 <= inj.site.layer < n_layers:
            raise SiteError(f"addition at {inj.site}: this model has layers 0..{n_layers - 1}")
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
    span: Span | None = None,
    include_all: bool = True,
) -> Tensor:
    """``bool[prompt_len]``: the prompt positions these injections write to, each at
    ``location`` or its own default, relative to ``span`` (default the whole prompt). This one
    function answers "where did steering write?" for metrics (which mask those predictions),
    diagnostics and the server.

    ``include_all=False`` leaves out injections at ``all``: they write everywhere, so a loss
    that masked them would have nothing left to score.
    """
    mask = torch.zeros(prompt_len, dtype=torch.bool)
    for inj in injections:
        where = location or inj.default_location
        if where == "all" and not include_all:
            continue
        mask[injected_span(where, prompt_len, inj.tensor.shape[0], span)] = True
    return mask


# -- the state of one steer() block --------------------------------------------------------------
@dataclass(frozen=True)
class Placed:
    """An injection with the location it lands at (the caller's, else its own default)."""

    injection: Injection
    location: str

    @property
    def site(self) -> Site:
        return self.injection.site

    @property
    def length(self) -> int:
        return int(self.injection.tensor.shape[0])


@dataclass
class RowPlan:
    """One batch row's steering: its placed injections, the part of its prompt they refer to
    (``span``; None is the whole prompt), and what its prompt decided: its length and, for
    conditional injections, whether each condition holds."""

    placed: list[Placed]
    span: Span | None = None
    prompt_len: int | None = None
    gates: dict[int, bool] = field(default_factory=dict)  # id(condition) -> holds

    @classmethod
    def of(
        cls,
        injections: Sequence[Injection],
        location: str | None = None,
        span: Span | None = None,
        *,
        prompt_len: int | None = None,
    ) -> RowPlan:
        """A row's plan: each injection at ``location``, else at its own default."""
        placed = [Placed(i, check_location(location or i.default_location)) for i in injections]
        return cls(placed, span, prompt_len=prompt_len)

    def needs_prompt(self) -> bool:
        """Whether where it lands depends on the prompt (its length or its hidden states)."""
        return self.span is not None or any(
            p.location in ("mid", "back", "generated") or p.injection.condition is not None
            for p in self.placed
        )


@dataclass
class _Forward:
    """What the root hook learned about the forward pass under way."""

    shape: tuple[int, int]  # (B, T)
    idx: Tensor | None  # [B, T] long: position in the positional layouts (None: none here)
    valid: Tensor | None  # [B, T, 1]: the token is real and inside a positional layout
    every: Tensor | None  # [B, T, 1] float: tokens "all" covers (None with every_full)
    every_full: bool  # "all" covers every token of this forward (a broadcast suffices)
    generated: Tensor | None  # [B, T, 1] float: real tokens past each row's prompt
    fresh: Tensor | None  # [B, T, 1] float: prompt (span) tokens whose conditions are read now
    # a packed forward (B == 1, several requests): [1, T] each token's row (plan); ``idx`` then
    # indexes the positional layouts flattened to [1, R * W]
    rows: Tensor | None = None

    @property
    def active(self) -> bool:
        """Whether anything can be added in this forward."""
        return (
            self.idx is not None
            or self.every_full
            or self.every is not None
            or (self.generated is not None)
        )


class Steering:
    """The state of one ``steer`` block: per-row plans, their layouts, and the current
    forward's positions.

    Each injection lands at its own location (the row's if given, else its own default:
    ``front`` for prompt additions, ``all`` for steering vectors), relative to the row's span
    (default the whole prompt). Conditional injections (``Conditioned``) form groups with a
    gate per row: the condition is read at its site when the row's prompt passes, and until
    then (sites before it) the group steers generated tokens only, so the same tokens are
    steered with and without the KV cache.

    Args:
        lm: the model.
        rows: one list of injections per batch row, or a single list shared by all rows.
        per_row: whether ``rows`` has one entry per batch row.
        locations: one location per entry of ``rows`` (None: each injection's default).
        spans: one span per batch row (``[start, end)`` of its prompt), or None.
        dims: the residual dimensions to change (``res_stream_slice``).
    """

    def __init__(
        self,
        lm: LM,
        rows: list[list[Injection]],
        *,
        per_row: bool,
        locations: list[str | None] | None = None,
        spans: Sequence[Span | None] | None = None,
        dims: slice = slice(None),
    ) -> None:
        self.lm, self.dims = lm, dims
        locations = locations or [None] * len(rows)
        for row in rows:
            validate_injections(row, lm.d_model, lm.n_layers)
        if spans is not None:  # spans are per batch row: so are the plans
            if not per_row:
                rows, locations = rows * len(spans), locations * len(spans)
            elif len(spans) != len(rows):
                raise ActAddError(f"{len(spans)} spans for {len(rows)} rows of additions")
            per_row = True
        plans = [
            RowPlan.of(row, loc, None if spans is None else spans[r])
            for r, (row, loc) in enumerate(zip(rows, locations, strict=True))
        ]
        self._setup(plans, per_row=per_row, decoding=False)
        self._warn_sink()

    @classmethod
    def for_plans(cls, lm: LM, plans: list[RowPlan], *, dims: slice = slice(None)) -> Steering:
        """Steering for rows whose prompts have been read already (each plan's
        ``prompt_len`` and ``gates`` known), one plan per batch row: the continuous-batching
        scheduler (``actadd.batching``) decodes such rows together while they come and go."""
        self = cls.__new__(cls)
        self.lm, self.dims = lm, dims
        if any(p.prompt_len is None for p in plans):
            raise ActAddError("for_plans needs plans whose prompt has been read (prompt_len set)")
        self._setup(plans, per_row=True, decoding=True)
        return self

    def _setup(self, plans: list[RowPlan], *, per_row: bool, decoding: bool) -> None:
        lm = self.lm
        self.per_row, self.plans, self.decoding = per_row, plans, decoding
        placed = [p for plan in self.plans for p in plan.placed]
        self.sites = sorted({p.site for p in placed}, key=lambda s: s.order)
        self.locations = sorted({p.location for p in placed})
        # groups: None (unconditional) first, then each condition, by identity
        self.conditions: list[Conditional] = []
        for p in placed:
            c = p.injection.condition
            if c is not None and all(c is not g for g in self.conditions):
                self.conditions.append(c)
        self.groups: list[Conditional | None] = [None, *self.conditions]
        self.leaves = list(dict.fromkeys(leaf for g in self.conditions for leaf in g.leaves()))
        self.leaf_sites = {leaf: leaf.resolve_site(lm) for leaf in self.leaves}
        # the site after which each condition is known (its deepest leaf)
        self.known_at = {
            id(g): max((self.leaf_sites[leaf] for leaf in g.leaves()), key=lambda s: s.order)
            for g in self.conditions
        }
        self.tracks_prompt = any(plan.needs_prompt() for plan in self.plans)
        self.need = [
            max((p.length for p in plan.placed if p.location in POSITIONAL), default=0)
            for plan in self.plans
        ]
        self._layouts: dict[tuple[int, Site], dict[str, Tensor]] = {}  # (group, site) -> parts
        self.width = 1
        self._gates: dict[int, Tensor] = {}  # id(condition) -> [R] float, once known
        self._scores: dict[Any, Tensor] = {}  # leaf -> [B] scores of the prompt being read
        self._cast: dict[tuple[Any, ...], Tensor] = {}
        self._fwd: _Forward | None = None
        self._seen: Tensor | None = None  # tokens so far (detect uncached decoding)
        self._reader = ForwardReader(lm.base_model)
        self._row_plans = self.plans
        if decoding:  # prompts read before: their layouts and gates are known
            self._lay_out(self.plans)
            self._gates = {
                id(g): torch.tensor([float(p.gates.get(id(g), False)) for p in self.plans])
                for g in self.conditions
            }
        elif not self.tracks_prompt:  # front/all without spans or conditions: known now
            self._lay_out(self.plans)

    # -- layouts ---------------------------------------------------------------------------------
    def _lay_out(self, plans: list[RowPlan]) -> None:
        """Stack the plans' additions per (group, site): ``pos`` ``[R, W, D]`` over logical
        positions, ``all`` and ``generated`` ``[R, 1, D]`` mean vectors."""
        groups = {id(g): k for k, g in enumerate(self.groups)}
        pos: list[list[tuple[tuple[int, Site], Tensor, int]]] = []
        every: list[list[tuple[tuple[int, Site], Tensor, int]]] = []
        gen: list[list[tuple[tuple[int, Site], Tensor, int]]] = []
        width = 1
        for plan in plans:
            p_row, a_row, g_row = [], [], []
            for p in plan.placed:
                key = (groups[id(p.injection.condition)] if p.injection.condition else 0, p.site)
                t = p.injection.tensor
                if p.location in POSITIONAL:
                    off = (
                        addition_offset(p.location, plan.prompt_len, p.length, plan.span)
                        if plan.prompt_len is not None
                        else 0
                        if plan.span is None
                        else plan.span[0]
                    )
                    p_row.append((key, t, off))
                    width = max(width, off + p.length)
                elif p.location == "all":
                    a_row.append((key, t.mean(0, keepdim=True), 0))
                else:  # generated
                    g_row.append((key, t.mean(0, keepdim=True), 0))
            pos.append(p_row)
            every.append(a_row)
            gen.append(g_row)
        self._layouts = {}
        for part, rows, w in (("pos", pos, width), ("all", every, 1), ("gen", gen, 1)):
            for key, lay in layouts(rows, w, self.lm.d_model, dims=self.dims).items():
                self._layouts.setdefault(key, {})[part] = lay
        self.width = width
        self._spans = self._span_tensor(plans)
        self._prompt_lens = (
            torch.tensor([p.prompt_len or 0 for p in plans])
            if all(p.prompt_len is not None for p in plans)
            else None
        )
        self._cast = {}

    @staticmethod
    def _span_tensor(plans: list[RowPlan]) -> Tensor | None:
        if all(p.span is None for p in plans):
            return None
        return torch.tensor(
            [p.span if p.span is not None else (0, p.prompt_len or 2**31 - 1) for p in plans]
        )

    def _warn_sink(self) -> None:
        """A direction (a steering vector, made for every token) put at ``front`` lands on
        position 0 only: most models' attention sink, where it does next to nothing. Prompt
        additions are left to ``steering_magnitudes_relative_to_prompt``: an x-vector whose
        sides both sit on the sink can steer through their difference."""
        for plan in self.plans:
            for p in plan.placed:
                inj = p.injection
                if p.location == "front" and p.length == 1 and inj.default_location == "all":
                    warnings.warn(
                        f"a steering vector at {inj.site} with location 'front' lands only on "
                        "position 0, which most models use as an attention sink: it will barely "
                        "steer. Use addition_location='all' (the default for vectors)",
                        OutlierWarning,
                        stacklevel=5,
                    )
                    return

    def describe(self) -> str:
        where = "/".join(self.locations)
        cond = f", {len(self.groups) - 1} condition(s)" if len(self.groups) > 1 else ""
        return f"{where} additions at {', '.join(s.name for s in self.sites)}{cond}"

    @property
    def hooked_sites(self) -> list[Site]:
        """Every site a hook goes on: the additions' and the conditions'."""
        return sorted({*self.sites, *self.leaf_sites.values()}, key=lambda s: s.order)

    # -- the root hook: positions of this forward pass ------------------------------------------
    def on_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if is_paused(self.lm.model):
            self._fwd = None
            return None
        f = self._reader.read(args, kwargs)
        rows = f.batch if f.segments is None else int(f.segments.numel()) - 1
        if self.per_row and len(self.plans) != rows:
            raise ActAddError(
                f"per-row additions were given for {len(self.plans)} rows but the model got a "
                f"batch of {rows}; pass one list of additions per prompt (and no "
                "num_return_sequences/beams), or one shared list"
            )
        self._fwd = self._plan(f)
        return None

    def _plan(self, f: ForwardInputs) -> _Forward:
        shape = (f.batch, f.tokens)
        if f.segments is not None:
            return self._plan_packed(f)
        simple = not self.tracks_prompt and not self._has("pos")
        if simple:  # "all" only, no spans, no conditions: only padding matters
            if f.mask is None:
                return _Forward(shape, None, None, None, True, None, None)
            real = f.mask[:, f.past : f.past + f.tokens].bool()  # [B, T]
            if bool(real.all()):
                return _Forward(shape, None, None, None, True, None, None)
            every = real[..., None].float() if bool(real.any()) else None
            return _Forward(shape, None, None, every, False, None, None)
        if not self.tracks_prompt and f.past > 0 and not self._has("all"):
            lowest = lowest_position(f.past, attention_mask=f.mask, position_ids=f.position_ids)
            if lowest >= self.width:  # a cached step past the front layouts: nothing to add
                return _Forward(shape, None, None, None, False, None, None)
        logical, real = logical_positions(
            f.batch,
            f.tokens,
            past=f.past,
            attention_mask=f.mask,
            position_ids=f.position_ids,
            device=f.device,
        )
        fresh = False
        if self.decoding:
            if f.past == 0:
                raise ActAddError("steering for decoding rows got a forward without a cache")
        elif self.tracks_prompt:
            fresh = self._track_prompt(f.ids, f.past, real)
        elif f.past == 0:
            check_prompt_lengths(self._need(f.batch), real.sum(-1).tolist())
        return self._masks(shape, logical, real, fresh)

    def _plan_packed(self, f: ForwardInputs) -> _Forward:
        """A packed forward: each token's row from the segments, its logical position from
        its position id. Prompts must have been read before (``for_plans``), since a packed
        forward gives no row of its own to read a prompt from."""
        if (self.tracks_prompt or self.per_row) and not self.decoding:
            # which request sits in which segment is known only to whoever packed the forward
            # (actadd's scheduler plans it: for_plans); anything else could steer the wrong rows
            raise ActAddError(
                "a packed forward (cu_seq_lens_q) can only be steered by additions shared by "
                "every request at front or all, or by Steering.for_plans with one plan per "
                "request in packed order; for per-request steering use actadd.generate_many"
            )
        assert f.position_ids is not None and f.segments is not None  # ForwardReader checks
        rows = packed_rows(f.segments.to(f.device), f.tokens)
        if not self.per_row:
            rows = torch.zeros_like(rows)
        logical = f.position_ids.reshape(-1)[-f.tokens :].long().to(f.device)[None]  # [1, T]
        real = torch.ones_like(logical, dtype=torch.bool)
        return self._masks((1, f.tokens), logical, real, False, rows=rows[None])

    def _has(self, part: str) -> bool:
        return any(part in parts for parts in self._layouts.values())

    def _masks(
        self,
        shape: tuple[int, int],
        logical: Tensor,
        real: Tensor,
        fresh: bool,
        *,
        rows: Tensor | None = None,
    ) -> _Forward:
        """Which tokens each kind of addition touches in this forward. ``rows`` (packed
        forwards): each token's row; otherwise batch row ``b`` is row ``b``."""

        def per_token(x: Tensor) -> Tensor:  # [R] -> broadcastable to [B, T]
            x = x.to(logical.device)
            return x[:, None] if rows is None else x[rows]

        idx = valid = None
        if self._has("pos"):
            v = real & (logical < self.width)
            if bool(v.any()):
                idx, valid = logical.clamp(0, self.width - 1), v[..., None]
                if rows is not None:  # into the layouts flattened to [1, R * W]
                    idx = rows * self.width + idx
        lens, spans = self._prompt_lens, self._spans
        if lens is not None:
            lens = per_token(lens)  # [R, 1], or [1, T] packed
            after = real & (logical >= lens)  # generated tokens
        else:
            after = torch.zeros_like(real)
        every: Tensor | None = None
        every_full = False
        if self._has("all"):
            if spans is not None:
                inside = (logical >= per_token(spans[:, 0])) & (logical < per_token(spans[:, 1]))
                every = ((real & inside) | after)[..., None].float()
            elif bool(real.all()):
                every_full = True
            else:
                every = real[..., None].float()
        generated = after[..., None].float() if self._has("gen") and bool(after.any()) else None
        fresh_mask = None
        if fresh and self.leaves:
            assert lens is not None  # conditions track the prompt
            span_lo = spans[:, 0].to(logical.device)[:, None] if spans is not None else 0
            span_hi = spans[:, 1].to(logical.device)[:, None] if spans is not None else lens
            fresh_mask = (real & (logical >= span_lo) & (logical < span_hi))[..., None].float()
        return _Forward(shape, idx, valid, every, every_full, generated, fresh_mask, rows)

    def _need(self, batch: int) -> list[int]:
        return self.need if self.per_row else self.need * batch

    def _continue_prompt(self, ids: Tensor | None) -> None:
        """Cached decoding after the prompt: its layout stands; record the text."""
        if self._seen is None:
            raise PromptError(
                f"steering at {'/'.join(self.locations)} (or with spans or conditions) needs "
                "to see the prompt, but this forward pass continues a KV cache filled outside "
                "steer(); run the prompt inside the steer() block"
            )
        if ids is not None:
            self._seen = torch.cat([self._seen, ids], 1)

    def _track_prompt(self, ids: Tensor | None, past: int, real: Tensor) -> bool:
        """Lay the additions out relative to each row's prompt; True when this forward is the
        prompt's (its conditions are read in it)."""
        if past > 0:  # cached decoding: the prompt's layout stands
            self._continue_prompt(ids)
            return False
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
            return False
        lengths = real.sum(-1).tolist()  # [B] prompt lengths
        plans = (
            self.plans
            if self.per_row
            else [RowPlan(self.plans[0].placed, self.plans[0].span) for _ in lengths]
        )
        for r, (plan, n) in enumerate(zip(plans, lengths, strict=True)):
            plan.prompt_len, plan.gates = int(n), {}
            for p in plan.placed:
                if p.location in POSITIONAL:
                    try:  # refuse a prompt (or span) shorter than its addition
                        injected_span(p.location, int(n), p.length, plan.span)
                    except PromptError as e:
                        raise PromptError(f"row {r}: {e}" if len(plans) > 1 else str(e)) from e
        self._row_plans = plans
        self._lay_out(plans)
        self._gates, self._scores = {}, {}
        return True

    # -- condition hooks: read each row's prompt at the condition's site --------------------------
    def condition_fn(self, leaf: Any) -> HookFn:
        def read(h: Tensor) -> None:
            fwd = self._fwd
            if fwd is None or fwd.fresh is None:
                return None
            w = fwd.fresh.to(h.device)  # [B, T, 1]
            mean = (h.float() * w).sum(1) / w.sum(1).clamp_min(1.0)  # [B, D]
            self._scores[leaf] = leaf.score(mean).cpu()
            for g in self.conditions:
                if id(g) not in self._gates and all(x in self._scores for x in g.leaves()):
                    holds = g.holds(self._scores).float()  # [B]
                    self._gates[id(g)] = holds
                    for plan, ok in zip(self._row_plans, holds.tolist(), strict=True):
                        plan.gates[id(g)] = bool(ok)
            return None

        return read

    # -- the site hooks ---------------------------------------------------------------------------
    def _part(self, key: tuple[int, Site], part: str, h: Tensor) -> Tensor | None:
        """A layout on ``h``'s device and dtype (each layer its own, for models split across
        devices), cast once per layout."""
        parts = self._layouts.get(key)
        if parts is None or part not in parts:
            return None
        ck = (key, part, h.dtype, h.device)
        lay = self._cast.get(ck)
        if lay is None:
            lay = self._cast[ck] = parts[part].to(device=h.device, dtype=h.dtype)
        return lay

    def site_fn(self, site: Site) -> HookFn:
        groups = [k for k, _ in enumerate(self.groups)]

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
            for k in groups:
                delta = self._delta((k, site), fwd, h, early=self._early(k, site))
                if delta is None:
                    continue
                if k:  # a condition's rows: the gate (unknown yet: 0, generated tokens only)
                    gate = self._gates.get(id(self.groups[k]))
                    if gate is None:
                        continue
                    gate = gate.to(device=h.device, dtype=h.dtype)
                    rows = fwd.rows
                    gate = (
                        gate[:, None, None] if rows is None else gate[rows.to(h.device)][..., None]
                    )
                    delta = delta * gate
                out = out + delta
            return out if out is not h else None

        return add

    def _early(self, k: int, site: Site) -> bool:
        """Whether ``site`` comes before condition ``k`` is known (it then steers generated
        tokens only)."""
        return k > 0 and site.order < self.known_at[id(self.groups[k])].order

    @staticmethod
    def _by_row(lay: Tensor | None, fwd: _Forward) -> Tensor | None:
        """A ``[R, 1, D]`` layout as each token's row's vector, ``[1, T, D]``, in a packed
        forward; as it is otherwise (it broadcasts over tokens)."""
        if lay is None or fwd.rows is None:
            return lay
        return lay[:, 0][fwd.rows.to(lay.device)]

    def _delta(
        self, key: tuple[int, Site], fwd: _Forward, h: Tensor, *, early: bool
    ) -> Tensor | None:
        delta: Tensor | None = None
        d: Tensor | None
        pos = self._part(key, "pos", h)
        if pos is not None and fwd.idx is not None and not early:
            if fwd.rows is not None:  # packed: rows' layouts end to end
                pos = pos.reshape(1, -1, pos.shape[-1])
            elif pos.shape[0] == 1:
                pos = pos.expand(h.shape[0], -1, -1)
            assert fwd.valid is not None  # set together with idx
            idx = fwd.idx.to(h.device)
            # [B, T, D] <- layout rows at each token's logical position
            d = pos.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))
            delta = d * fwd.valid.to(h.device)
        lay = self._by_row(self._part(key, "all", h), fwd)
        if lay is not None:
            cover = fwd.generated if early else fwd.every
            if early or not fwd.every_full:
                d = None if cover is None else lay * cover.to(device=h.device, dtype=h.dtype)
            else:  # lay [1 or B, 1, D] broadcasts over tokens
                d = lay.expand(h.shape[0], h.shape[1], -1) if delta is None else lay
            if d is not None:
                delta = d if delta is None else delta + d
        lay = self._by_row(self._part(key, "gen", h), fwd)
        if lay is not None and fwd.generated is not None:
            d = lay * fwd.generated.to(device=h.device, dtype=h.dtype)
            delta = d if delta is None else delta + d
        return delta


@contextmanager
def steer(
    lm: LM,
    activation_additions: Any,
    *,
    addition_location: str | Sequence[str | None] | None = None,
    spans: Sequence[Span | None] | None = None,
    res_stream_slice: slice = slice(None),
) -> Iterator[Steering]:
    """Steer ``lm.model`` (its forward and ``generate``) inside the ``with`` block.

    Args:
        lm: the model.
        activation_additions: ``ActivationAddition``/``SteeringVector`` objects (or
            ``Conditioned`` ones), or one list of them per batch row (each row steered by its
            own list); see ``as_rows``.
        addition_location: ``front`` (ActAdd), ``mid``, ``back``, ``all`` or ``generated``
            (``actadd.positions``); one per row for per-row additions; None (the default):
            each addition's own, ``front`` for prompt additions and ``all`` for vectors.
        spans: per batch row, the ``[start, end)`` of its prompt that locations refer to
            (e.g. the last user message of a chat: ``LM.chat_tokens``); None: the whole
            prompt.
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
    steering = Steering(
        lm, injections, per_row=per_row, locations=locations, spans=spans, dims=res_stream_slice
    )
    # conditions read the residual stream before any addition at the same site is made
    fns = [(site, steering.condition_fn(leaf)) for leaf, site in steering.leaf_sites.items()]
    fns += [(site, steering.site_fn(site)) for site in steering.sites]
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
