"""The one hook mechanism: scoped PyTorch hooks on sites, for reading and writing.

Everything that touches a forward pass goes through ``hooked()``: it registers hooks inside
``try``, keeps each handle the moment it exists, and removes every handle it got in
``finally`` (also on exceptions and ``KeyboardInterrupt``), so nested contexts compose and
unwind only their own hooks. ``capture`` reads the residual stream with it; steering
(``actadd.steering``) writes with it.

A site function takes the hidden states ``[B, T, D]`` at its site and returns new ones, or
None to leave them as they are. Under ``torch.profiler`` every hook call is a labelled range
(``actadd:<module path>``, ``actadd:root``), so what steering costs shows up in a trace by name;
without a profiler the label costs one flag read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from actadd.errors import SiteError
from actadd.model import LM
from actadd.sites import Site, get_module, parse_site

__all__ = ["HookFn", "actadd_hooks", "capture", "hooked", "paused", "site_module"]

HookFn = Callable[[Tensor], Tensor | None]

# Models whose steering hooks stand aside, e.g. while `capture` records clean activations.
_PAUSED: WeakKeyDictionary[nn.Module, int] = WeakKeyDictionary()


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


def _profiling() -> bool:
    # torch keeps this module-level flag current while a profiler runs; without it (a future
    # torch), label always: record_function costs ~14 us per call, not per token
    return bool(getattr(torch.autograd.profiler, "_is_profiler_enabled", True))


def _labelled(label: str, hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook``, as a named range in ``torch.profiler`` traces."""

    def call(*args: Any) -> Any:
        if not _profiling():
            return hook(*args)
        with torch.profiler.record_function(label):
            return hook(*args)

    return call


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

    ``root_fn`` is a ``with_kwargs`` forward pre-hook on the module owning the decoder layers
    (it sees ``input_ids``, the masks, positions and the cache). Yields the dotted module paths
    hooked, for reports.
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []
    paths: list[str] = []
    try:
        if root_fn is not None:
            root = _labelled("actadd:root", root_fn)
            handles.append(lm.base_model.register_forward_pre_hook(root, with_kwargs=True))
        for site, fn in site_fns:
            module, path, pre = site_module(lm, site)
            label = f"actadd:{path}"
            if pre:
                hook = _labelled(label, _pre_hook(fn))
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(_labelled(label, _post_hook(fn))))
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
    ours = (__name__, "actadd.steering")
    return sum(
        getattr(fn, "__module__", None) in ours
        for m in model.modules()
        for hooks in (m._forward_hooks, m._forward_pre_hooks)
        for fn in hooks.values()
    )


@contextmanager
def paused(model: nn.Module) -> Iterator[None]:
    """Steering hooks on ``model`` stand aside inside the block (they see ``is_paused``)."""
    _PAUSED[model] = _PAUSED.get(model, 0) + 1
    try:
        yield
    finally:
        _PAUSED[model] -= 1


def is_paused(model: nn.Module) -> bool:
    return bool(_PAUSED.get(model, 0))


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture(
    lm: LM,
    input_ids: Tensor | str,
    sites: Sequence[Site | str | int],
    *,
    attention_mask: Tensor | None = None,
    steered: bool = False,
) -> dict[Any, Tensor]:
    """Record the residual stream ``[B, T, D]`` at each site (unsteered unless ``steered``).

    ``input_ids`` may be a prompt (tokenized as ``lm.to_tokens`` does); ``sites`` are
    ``Site`` objects, TransformerLens names or layers, and the result is keyed by them as
    given. The forward pass stops after the deepest site, so reading layer 6 costs 7 layers.

    Example:
        >>> acts = actadd.capture(lm, "I love dogs", ["blocks.6.hook_resid_pre"])
        ... # doctest: +SKIP
        >>> acts["blocks.6.hook_resid_pre"].shape  # doctest: +SKIP
        torch.Size([1, 4, 576])
    """
    if not sites:
        return {}
    if isinstance(input_ids, str):
        input_ids = lm.to_tokens(input_ids)
    keys = {parse_site(k, lm.n_layers) if not isinstance(k, Site) else k: k for k in sites}
    found: dict[Site, Tensor] = {}
    deepest = max(keys, key=lambda s: s.order)
    wanted = set(keys)

    def grab(site: Site) -> HookFn:
        def fn(h: Tensor) -> None:
            found[site] = h.detach().clone()
            if found.keys() >= wanted and site == deepest:
                raise _StopForward
            return None

        return fn

    with (
        contextlib.nullcontext() if steered else paused(lm.model),
        hooked(lm, [(s, grab(s)) for s in wanted]),
        contextlib.suppress(_StopForward),
    ):
        lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    missing = wanted - found.keys()
    if missing:
        raise SiteError(f"sites {sorted(map(str, missing))} were not reached by the forward pass")
    return {keys[site]: t for site, t in found.items()}
