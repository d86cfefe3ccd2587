"""What a forward pass received: the one place that reads the model's arguments.

The root steering hook sits on the module that owns the decoder layers (``LlamaModel``,
``GPT2Model``, ...) and needs, for the forward under way: the batch and token counts, the
tokens, how many tokens are already in the KV cache, the 2-D attention mask (left padding) and
the position ids. Releases of transformers pass these under different names: the cache was
``past_key_values`` up to 5.23 and is ``cache`` from 5.24 (``past_key_value`` in some older
layers); 4.x also sends ``cache_position``; ``generate`` drops an all-ones mask. So every name
a supported release uses is read here, and nowhere else, and a cache under a name not seen
before is still found (any argument with ``get_seq_length``).

When a forward says it uses a cache (``use_cache=True``), has no cache parameter by any known
name, and neither a cache object, nor a mask over the cached tokens, nor positions can be
found, a decoding step could be mistaken for a new prompt: that raises instead of steering the
wrong tokens. (A known cache parameter that is None is a new prompt.)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from actadd.errors import ActAddError, PromptError

__all__ = ["ForwardInputs", "ForwardReader", "cache_length"]

# where transformers releases put the KV cache in the base model's forward, newest first
CACHE_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past", "cache_params")


def _transformers_version() -> str:
    try:
        import transformers

        return str(transformers.__version__)
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return "?"


@dataclass(frozen=True)
class ForwardInputs:
    """The facts of one forward pass that positions depend on.

    ``mask`` is the 2-D attention mask over cached and new tokens (``[B, >= past + T]``), or
    None when the model got none (or one of another shape: then no token is padding).
    """

    batch: int
    tokens: int
    ids: Tensor | None  # [B, T]
    past: int  # tokens already in the cache
    mask: Tensor | None  # [B, >= past + T]
    position_ids: Tensor | None  # [B or 1, T] or [T]
    device: torch.device
    # a packed forward (B == 1): where each request's tokens start, ``[R + 1]``; each token's
    # logical position is then its position id (``cu_seq_lens_q``, as transformers' engine
    # and ``actadd.packing`` send it)
    segments: Tensor | None = None


def cache_length(cache: Any) -> int | None:
    """Tokens held by a KV cache object (any transformers cache, or a legacy tuple), else None."""
    if cache is None or isinstance(cache, Tensor):
        return None
    if callable(getattr(cache, "get_seq_length", None)):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])  # legacy tuple cache: [B, heads, past, head_dim]
    return None


class ForwardReader:
    """Reads ``ForwardInputs`` from the arguments of ``base_model.forward`` (a pre-hook's view)."""

    def __init__(self, base_model: nn.Module) -> None:
        self._sig = inspect.signature(base_model.forward)
        self._positional = [
            name
            for name, p in self._sig.parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        # a forward that names its cache parameter gets None there for a new prompt
        self._knows_cache = any(n in self._sig.parameters for n in CACHE_NAMES)

    def arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The forward's arguments by name; ``generate`` passes keywords, so no binding."""
        if not args:
            return kwargs
        if len(args) <= len(self._positional):
            return {**dict(zip(self._positional[: len(args)], args, strict=True)), **kwargs}
        bound = self._sig.bind_partial(*args, **kwargs).arguments
        bound.update(bound.pop("kwargs", {}) or {})
        return bound

    def read(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardInputs:
        a = self.arguments(args, kwargs)
        ids, embeds = a.get("input_ids"), a.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if not isinstance(ref, Tensor):
            raise PromptError("steered forward pass got neither input_ids nor inputs_embeds")
        B, T = int(ref.shape[0]), int(ref.shape[1])
        mask, pos = a.get("attention_mask"), a.get("position_ids")
        mask2d = mask if isinstance(mask, Tensor) and mask.ndim == 2 else None
        positions = pos if isinstance(pos, Tensor) and pos.ndim in (1, 2) else None
        segments = a.get("cu_seq_lens_q")
        if not (isinstance(segments, Tensor) and segments.ndim == 1 and B == 1):
            segments = None
        elif positions is None:
            raise PromptError(
                "a packed forward pass (cu_seq_lens_q) needs position_ids: without them no "
                "token's position in its own request is known"
            )
        past = self._past(a, mask2d, T, self._knows_cache)
        if mask2d is not None and mask2d.shape[1] < past + T:
            mask2d = None  # not a mask over cached + new tokens: no padding information
        return ForwardInputs(
            batch=B,
            tokens=T,
            ids=ids if isinstance(ids, Tensor) else None,
            past=past,
            mask=mask2d,
            position_ids=positions,
            device=ref.device,
            segments=segments,
        )

    @staticmethod
    def _past(a: dict[str, Any], mask2d: Tensor | None, T: int, knows_cache: bool) -> int:
        """Tokens already in the cache: ``cache_position`` where a release sends it (exact,
        even where a static cache's ``get_seq_length`` under-counts), else the cache itself,
        else the width of the 2-D mask (never when there is a cache: a static cache's mask is
        as wide as the cache), else the first position id."""
        cache_position = a.get("cache_position")
        if isinstance(cache_position, Tensor) and cache_position.numel():
            return int(cache_position.reshape(-1)[0])
        for name in CACHE_NAMES:
            n = cache_length(a.get(name))
            if n is not None:
                return n
        for value in a.values():  # a cache under a name no release used before
            if callable(getattr(value, "get_seq_length", None)):
                return int(value.get_seq_length())
        if mask2d is not None:
            return int(mask2d.shape[1]) - T
        pos = a.get("position_ids")
        if isinstance(pos, Tensor) and pos.numel():  # a step after n tokens starts at n
            return int(pos.min())
        if a.get("use_cache") and not knows_cache and not any(k in a for k in CACHE_NAMES):
            raise ActAddError(
                "cannot tell where this forward pass's tokens sit: the model uses a KV cache "
                f"but actadd found neither it, nor an attention mask, nor position ids among "
                f"{sorted(a)} (transformers {_transformers_version()}). Steering could land "
                "on the wrong tokens, so it stops here: please report this with your "
                "transformers version; meanwhile pass use_cache=False or an attention_mask"
            )
        return 0
