"""The one hook mechanism: scoped hooks on sites, reading (``capture``) and writing (``steer``).

Everything that touches a forward pass goes through ``hooked()``: it registers PyTorch hooks
inside ``try`` and removes every handle it got in ``finally`` (also on exceptions and
``KeyboardInterrupt``), so nested contexts compose and unwind only their own hooks.

How ``steer`` knows where the prompt is. A forward pre-hook on the module that owns the decoder
layers sees ``input_ids``, ``attention_mask``, ``position_ids`` and the KV cache, and computes
each token's *logical position*: its index among the row's real (non-pad) tokens. It uses the
2-D attention mask when there is one (left padding), else ``position_ids`` (``generate`` may
drop an all-ones mask), else the cache length. Never the tensor's shape alone: a decoding step
has length 1 but sits at position ``n``. Additions are laid out over logical positions:

* ``front``: addition position ``i`` onto prompt position ``i`` (ActAdd);
* ``mid`` / ``back``: centred on / ending at the prompt's last token, fixed when the prompt is
  first seen (``generate`` with or without the cache gives the same positions);
* ``all``: the mean addition vector on every real token, prompt and generated (CAA/repeng).

Site hooks then add one gathered tensor: no Python loop over rows or tokens.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from actadd.errors import ActAddError, PromptError, SiteError
from actadd.model import LM
from actadd.sites import Site, get_module

__all__ = [
    "LOCATIONS",
    "Injection",
    "Steerable",
    "Steering",
    "actadd_hooks",
    "addition_offset",
    "capture",
    "hooked",
    "site_module",
    "steer",
]

log = logging.getLogger(__name__)

LOCATIONS = ("front", "mid", "back", "all")
HookFn = Callable[[Tensor], Tensor | None]

# Models whose steering hooks stand aside, e.g. while `capture` records clean activations.
_PAUSED: WeakKeyDictionary[nn.Module, int] = WeakKeyDictionary()


@dataclass(frozen=True)
class Injection:
    """A resolved addition: ``tensor[L, D]`` (coefficient applied) to add at ``site``."""

    site: Site
    tensor: Tensor  # [L, D]
    coeff: float = 1.0  # already applied to tensor; kept for magnitude diagnostics


@runtime_checkable
class Steerable(Protocol):
    """Anything ``steer`` accepts: it resolves itself into injections for a model."""

    def injections(self, lm: LM) -> list[Injection]: ...


# -- registering hooks --------------------------------------------------------------------------
def site_module(lm: LM, site: Site) -> tuple[nn.Module, str, bool]:
    """``(module, dotted path, is_pre_hook)`` where ``site`` lives in ``lm.model``."""
    base = f"{lm.site_map.layers}.{site.layer}"
    if site.kind in ("resid_pre", "resid_post"):
        return lm.layers[site.layer], base, site.kind == "resid_pre"
    sub = lm.site_map.attn_out if site.kind == "attn_out" else lm.site_map.mlp_out
    if sub is None:
        model_type = getattr(lm.model.config, "model_type", "?")
        raise SiteError(
            f"{site.kind} is not available for model_type {model_type!r} (no single module "
            "writes it to the residual stream); use hook_resid_pre or hook_resid_post"
        )
    return get_module(lm.layers[site.layer], sub), f"{base}.{sub}", False


def _pre_hook(fn: HookFn) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return hook


def _post_hook(fn: HookFn) -> Callable[..., Any]:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, Tensor):
            return fn(output)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            new = fn(output[0])
            return None if new is None else (new, *output[1:])
        raise SiteError(f"cannot hook {type(module).__name__}: unexpected output {type(output)}")

    return hook


@contextmanager
def hooked(
    lm: LM,
    site_fns: Sequence[tuple[Site, HookFn]],
    *,
    root_fn: Callable[..., Any] | None = None,
) -> Iterator[list[str]]:
    """Run ``fn(hidden) -> new hidden | None`` at each site for the duration of the block.

    ``root_fn`` is a ``with_kwargs`` forward pre-hook on the module owning the decoder layers.
    Yields the dotted module paths hooked, for reports.
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []
    paths: list[str] = []
    try:
        if root_fn is not None:
            handles.append(lm.base_model.register_forward_pre_hook(root_fn, with_kwargs=True))
        for site, fn in site_fns:
            module, path, pre = site_module(lm, site)
            if pre:
                handles.append(module.register_forward_pre_hook(_pre_hook(fn), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(_post_hook(fn)))
            paths.append(path)
        yield paths
    finally:
        for handle in reversed(handles):
            handle.remove()


def actadd_hooks(model: nn.Module) -> int:
    """How many hooks actadd has on ``model`` now (0 outside every ``steer``/``capture``).

    transformers registers hooks of its own (e.g. for ``output_hidden_states``); those are not
    counted, so this is the check that nothing was left steered.
    """
    return sum(
        getattr(fn, "__module__", None) == __name__
        for m in model.modules()
        for hooks in (m._forward_hooks, m._forward_pre_hooks)
        for fn in hooks.values()
    )


# -- reading ------------------------------------------------------------------------------------
class _StopForward(Exception):
    pass


@torch.no_grad()
def capture(
    lm: LM,
    input_ids: Tensor,
    sites: Sequence[Site],
    *,
    attention_mask: Tensor | None = None,
    steered: bool = False,
) -> dict[Site, Tensor]:
    """Record the residual stream ``[B, T, D]`` at each site (unsteered unless ``steered``).

    The forward pass stops after the deepest site, so reading layer 6 costs 7 layers.
    """
    if not sites:
        return {}
    found: dict[Site, Tensor] = {}
    deepest = max(sites, key=lambda s: (s.layer, s.kind != "resid_pre"))
    wanted = set(sites)

    def grab(site: Site) -> HookFn:
        def fn(h: Tensor) -> None:
            found[site] = h.detach().clone()
            if found.keys() >= wanted and site == deepest:
                raise _StopForward
            return None

        return fn

    model = lm.model
    if not steered:
        _PAUSED[model] = _PAUSED.get(model, 0) + 1
    try:
        with hooked(lm, [(s, grab(s)) for s in wanted]), contextlib.suppress(_StopForward):
            lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        if not steered:
            _PAUSED[model] -= 1
    missing = wanted - found.keys()
    if missing:
        raise SiteError(f"sites {sorted(map(str, missing))} were not reached by the forward pass")
    return found


# -- writing ------------------------------------------------------------------------------------
@dataclass
class _Forward:
    """What the root hook learned about the forward pass under way."""

    shape: tuple[int, int]  # (B, T)
    idx: Tensor | None  # [B, T] long: position in the layouts (None for "all")
    valid: Tensor | None  # [B, T, 1] bool: real token inside a layout (None: every token)
    active: bool
    full: bool = False  # every token is valid and the layouts have one position ("all")


class Steering:
    """The state of one ``steer`` context: layouts per site and the current forward's positions.

    ``rows`` is one list of injections per batch row, or a single list shared by all rows.
    """

    def __init__(
        self,
        lm: LM,
        rows: list[list[Injection]],
        *,
        per_row: bool,
        location: str,
        dims: slice = slice(None),
    ) -> None:
        if location not in LOCATIONS:
            raise ActAddError(
                f"addition_location must be one of {', '.join(LOCATIONS)}, got {location!r}"
            )
        self.lm, self.rows, self.per_row, self.location = lm, rows, per_row, location
        self.sites = sorted({inj.site for row in rows for inj in row}, key=_site_key)
        d = lm.d_model
        for inj in (i for row in rows for i in row):
            if inj.tensor.ndim != 2 or inj.tensor.shape[1] != d:
                raise ActAddError(
                    f"addition for {inj.site} has shape {tuple(inj.tensor.shape)}; this model "
                    f"needs [positions, {d}]: was it made with another model?"
                )
            if not torch.isfinite(inj.tensor).all():
                raise ActAddError(f"addition for {inj.site} contains NaN or inf values")
        # Zero outside res_stream_slice once, here: adding 0.0 elsewhere is exact.
        self.dim_mask = torch.zeros(d)
        self.dim_mask[dims] = 1.0
        self.row_len = [max((i.tensor.shape[0] for i in row), default=0) for row in rows]
        self.layouts: dict[Site, Tensor] = {}
        if location == "front":
            self.layouts = self._layout([[0] * len(r) for r in rows], max(self.row_len, default=1))
        elif location == "all":
            self.layouts = self._mean_layout()
        self._cast: dict[tuple[Site, torch.dtype, torch.device], Tensor] = {}
        self._fwd: _Forward | None = None
        self._seen: Tensor | None = None  # tokens so far (mid/back: detect uncached decoding)
        self._sig = inspect.signature(lm.base_model.forward)
        self._positional = [
            name
            for name, p in self._sig.parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]

    # layouts: [R, S, D] tensors over logical positions, R = rows (or 1 when shared)
    def _layout(self, offsets: list[list[int]], width: int) -> dict[Site, Tensor]:
        out = {}
        for site in self.sites:
            lay = None
            for r, row in enumerate(self.rows):
                for inj, off in zip(row, offsets[r], strict=True):
                    if inj.site != site:
                        continue
                    if lay is None:
                        dtype = torch.promote_types(inj.tensor.dtype, torch.float32)
                        lay = inj.tensor.new_zeros(
                            (len(self.rows), width, self.lm.d_model), dtype=dtype
                        )
                    lay[r, off : off + inj.tensor.shape[0]] += inj.tensor
            assert lay is not None
            out[site] = lay * self.dim_mask.to(lay)
        return out

    def _mean_layout(self) -> dict[Site, Tensor]:
        rows = [[Injection(i.site, i.tensor.mean(0, keepdim=True)) for i in r] for r in self.rows]
        saved, self.rows = self.rows, rows
        try:
            return self._layout([[0] * len(r) for r in rows], 1)
        finally:
            self.rows = saved

    def describe(self) -> str:
        return f"{self.location} additions at {', '.join(s.name for s in self.sites)}"

    # -- the root hook: positions of this forward pass --------------------------------------
    def on_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if _PAUSED.get(self.lm.model, 0):
            self._fwd = None
            return None
        bound = self._arguments(args, kwargs)
        ids, embeds = bound.get("input_ids"), bound.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            raise PromptError("steered forward pass got neither input_ids nor inputs_embeds")
        B, T = int(ref.shape[0]), int(ref.shape[1])
        if self.per_row and len(self.rows) != B:
            raise ActAddError(
                f"per-row additions were given for {len(self.rows)} rows but the model got a "
                f"batch of {B}; pass one list of additions per prompt (and no "
                "num_return_sequences/beams), or one shared list"
            )
        mask, pos_ids = bound.get("attention_mask"), bound.get("position_ids")
        past = _past_length(bound.get("past_key_values"), mask, T)
        ok = isinstance(mask, Tensor) and mask.ndim == 2 and mask.shape[1] >= past + T
        mask2d: Tensor | None = mask if ok else None  # [B, >= past + T]
        if self.location == "all":  # every real token, one layout position: no positions needed
            if mask2d is None:  # no padding information: every token is real
                self._fwd = _Forward((B, T), None, None, True, True)
                return None
            real = mask2d[:, past : past + T].long().bool()  # [B, T]
            full = bool(real.all())
            self._fwd = _Forward((B, T), None, real[..., None], full or bool(real.any()), full)
            return None
        if past > 0 and self._past_layouts(mask2d, pos_ids, past, T):
            # a cached step whose tokens all sit beyond the layouts (decoding after the prompt
            # under front/mid/back): nothing to add, and no positions to compute
            if self.location in ("mid", "back"):
                self._continue_prompt(ids)
            self._fwd = _Forward((B, T), None, None, False)
            return None
        if mask2d is not None:
            m = mask2d[:, : past + T].long()
            logical = (m.cumsum(-1) - 1)[:, -T:]  # [B, T]
            real = m[:, -T:].bool()
        elif isinstance(pos_ids, Tensor) and pos_ids.ndim in (1, 2):
            logical = pos_ids.reshape(-1, T).expand(B, T).long()
            real = torch.ones_like(logical, dtype=torch.bool)
        else:
            logical = torch.arange(past, past + T, device=ref.device).expand(B, T)
            real = torch.ones_like(logical, dtype=torch.bool)
        logical = logical.masked_fill(~real, -1)
        if self.location in ("mid", "back"):
            self._track_prompt(ids, past, real, logical)
        elif past == 0:
            self._check_prompt_lengths(real.sum(-1))
        width = next(iter(self.layouts.values())).shape[1]
        idx = logical.clamp(0, width - 1)
        valid = real & (logical < width)
        self._fwd = _Forward((B, T), idx, valid[..., None], bool(valid.any()))
        return None

    def _past_layouts(self, mask2d: Tensor | None, pos_ids: Any, past: int, T: int) -> bool:
        """True when every token of this forward has a logical position >= the layout width.

        A real token's logical position is at least the number of real tokens before this
        forward in its row (the mask's first ``past`` columns), so the smallest such count is
        a bound that needs one reduction instead of the positions themselves.
        """
        if not self.layouts:  # mid/back before seeing a prompt: let the general path say so
            return False
        width = next(iter(self.layouts.values())).shape[1]
        if mask2d is not None:
            lowest = int(mask2d[:, :past].long().sum(-1).min())
        elif isinstance(pos_ids, Tensor) and pos_ids.ndim in (1, 2) and pos_ids.numel():
            lowest = int(pos_ids.min())
        else:
            lowest = past
        return lowest >= width

    def _arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The forward's arguments by name; ``generate`` passes keywords, so no binding."""
        if not args:
            return kwargs
        if len(args) <= len(self._positional):
            return {**dict(zip(self._positional[: len(args)], args, strict=True)), **kwargs}
        bound = self._sig.bind_partial(*args, **kwargs).arguments
        bound.update(bound.pop("kwargs", {}) or {})
        return bound

    def _check_prompt_lengths(self, lengths: Tensor) -> None:
        if self.location == "all":
            return
        need = self.row_len if self.per_row else self.row_len * len(lengths)
        for r, (n, p) in enumerate(zip(need, lengths.tolist(), strict=True)):
            if p < n:
                raise PromptError(
                    f"prompt (row {r}) has {p} tokens but its addition has {n}: use a longer "
                    "prompt, a shorter addition prompt, pad_method='tokens_right' on a shorter "
                    "pair, or addition_location='all'"
                )

    def _continue_prompt(self, ids: Tensor | None) -> None:
        """Cached decoding under ``mid``/``back``: the prompt's layout stands; record the text."""
        if self._seen is None:
            raise PromptError(
                f"addition_location={self.location!r} needs to see the prompt, but this "
                "forward pass continues a KV cache filled outside steer(); run the prompt "
                "inside the steer() block"
            )
        if ids is not None:
            self._seen = torch.cat([self._seen, ids], 1)

    def _track_prompt(self, ids: Tensor | None, past: int, real: Tensor, logical: Tensor) -> None:
        seen = self._seen
        if past > 0:  # cached decoding: the prompt's layout stands
            self._continue_prompt(ids)
            return
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
        lengths = real.sum(-1)  # [B] prompt lengths
        self._check_prompt_lengths(lengths)
        rows = self.rows if self.per_row else self.rows * int(lengths.shape[0])
        offsets = []
        for r, p in enumerate(lengths.tolist()):
            offsets.append([addition_offset(self.location, p, i.tensor.shape[0]) for i in rows[r]])
        saved, self.rows = self.rows, rows
        try:
            self.layouts = self._layout(offsets, max(int(lengths.max()), 1))
        finally:
            self.rows = saved
        self._cast.clear()

    # -- the site hooks ------------------------------------------------------------------------
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
            key = (site, h.dtype, h.device)
            lay = self._cast.get(key)
            if lay is None:
                lay = self._cast[key] = self.layouts[site].to(device=h.device, dtype=h.dtype)
            if self.location == "all":  # lay [1 or B, 1, D] broadcasts over tokens
                return h + lay if fwd.full or fwd.valid is None else h + lay * fwd.valid
            lay = lay.expand(h.shape[0], -1, -1) if lay.shape[0] == 1 else lay
            # [B, T, D] <- layout rows at each token's logical position
            assert fwd.idx is not None and fwd.valid is not None  # set for front/mid/back
            delta = lay.gather(1, fwd.idx[..., None].expand(-1, -1, h.shape[-1]))
            return h + delta * fwd.valid

        return add


def addition_offset(location: str, prompt_len: int, add_len: int) -> int:
    """First prompt position an addition of ``add_len`` tokens lands on (not for ``all``)."""
    if location == "front":
        return 0
    if location == "back":
        return prompt_len - add_len
    return prompt_len // 2 - add_len // 2  # mid


def _site_key(site: Site) -> tuple[int, int]:
    order = ("resid_pre", "attn_out", "mlp_out", "resid_post")
    return site.layer, order.index(site.kind)


def _past_length(cache: Any, mask: Any, T: int) -> int:
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])  # legacy tuple cache: [B, heads, past, head_dim]
    if isinstance(mask, Tensor) and mask.ndim == 2:
        return int(mask.shape[1]) - T
    return 0


def _as_rows(lm: LM, additions: Any) -> tuple[list[list[Injection]], bool]:
    """Normalise a list of steerables, or a list of lists (one per row), into injections."""
    if isinstance(additions, Steerable):
        additions = [additions]
    items = list(additions)
    nested = [isinstance(a, (list, tuple)) for a in items]
    if any(nested) and not all(nested):
        raise ActAddError(
            "mix of additions and lists of additions: pass either one list shared by every "
            "row, or one list per row"
        )
    groups = items if items and all(nested) else [items]
    rows = []
    for group in groups:
        row = []
        for a in group:
            if not isinstance(a, Steerable):
                raise ActAddError(
                    f"cannot steer with {type(a).__name__}: use ActivationAddition or "
                    "SteeringVector objects"
                )
            row.extend(a.injections(lm))
        rows.append(row)
    return rows, bool(items) and all(nested)


@contextmanager
def steer(
    lm: LM,
    activation_additions: Any,
    *,
    addition_location: str = "front",
    res_stream_slice: slice = slice(None),
) -> Iterator[Steering]:
    """Steer ``lm.model`` (its forward and ``generate``) inside the ``with`` block.

    Args:
        lm: the model.
        activation_additions: ``ActivationAddition``/``SteeringVector`` objects, or one list
            of them per batch row (each row steered by its own list).
        addition_location: ``front`` (ActAdd), ``mid``, ``back`` or ``all`` (see module docs).
        res_stream_slice: only these residual dimensions are changed, e.g. ``slice(0, 403)``.

    Example:
        >>> lm = actadd.load_model()  # doctest: +SKIP
        >>> adds = actadd.get_x_vector("Love", "Hate", coeff=5, act_name=6)  # doctest: +SKIP
        >>> with actadd.steer(lm, adds):  # doctest: +SKIP
        ...     out = lm.model.generate(**lm.tokenizer("I hate you because", return_tensors="pt"))
    """
    if not isinstance(res_stream_slice, slice):
        raise ActAddError(f"res_stream_slice must be a slice, got {res_stream_slice!r}")
    rows, per_row = _as_rows(lm, activation_additions)
    if not any(rows):  # nothing to add: an empty context, still a context
        yield Steering(lm, [[]], per_row=False, location="all")
        return
    steering = Steering(
        lm, rows, per_row=per_row, location=addition_location, dims=res_stream_slice
    )
    fns = [(site, steering.site_fn(site)) for site in steering.sites]
    with hooked(lm, fns, root_fn=steering.on_forward) as paths:
        log.info("steering %s via %s", steering.describe(), ", ".join(paths))
        yield steering


def check_finite(value: float, what: str) -> float:
    """Return ``float(value)`` or raise if it is NaN/inf/not a number."""
    try:
        f = float(value)
    except (TypeError, ValueError) as e:
        raise ActAddError(f"{what} must be a number, got {value!r}") from e
    if not math.isfinite(f):
        raise ActAddError(f"{what} must be finite, got {value!r}")
    return f
