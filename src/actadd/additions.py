"""``ActivationAddition`` and ``get_x_vector``: the ActAdd recipe, with the original's names.

An addition is a prompt (or token ids), a site and a coefficient. Resolving it for a model runs
the prompt, records the residual stream at the site (one vector per token) and scales it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from weakref import WeakKeyDictionary

import torch
from torch import Tensor

from actadd.errors import ActAddError, PromptError, check_finite
from actadd.hooks import capture
from actadd.model import LM, as_lm
from actadd.sites import Site, canonical_act_name, parse_site
from actadd.steering import Injection

__all__ = [
    "ActivationAddition",
    "ActivationCache",
    "activation_cache",
    "get_activations",
    "get_x_vector",
]


@dataclass(frozen=True)
class ActivationAddition:
    """``coeff`` × the activations of ``prompt`` (or ``tokens``) at ``act_name``.

    Args:
        coeff: the coefficient; finite.
        act_name: an int layer (= ``blocks.{n}.hook_resid_pre``) or a TransformerLens name.
        prompt: text, tokenized with the model's sequence-start policy (``lm.to_tokens``).
        tokens: token ids instead of a prompt (exactly one of the two).
        label: how the addition is shown in tables; defaults to the prompt.

    Example:
        >>> love = ActivationAddition(prompt="Love", coeff=5, act_name=6)
        >>> love.act_name
        'blocks.6.hook_resid_pre'
        >>> (love * 2).coeff, (-love).coeff
        (10.0, -5.0)
    """

    coeff: float
    act_name: int | str
    prompt: str | None = None
    tokens: tuple[int, ...] | None = None
    label: str | None = field(default=None, kw_only=True, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff", check_finite(self.coeff, "coeff"))
        object.__setattr__(self, "act_name", canonical_act_name(self.act_name))
        if (self.prompt is None) == (self.tokens is None):
            raise PromptError(
                "give exactly one of prompt= or tokens= (tokens are ids, e.g. from lm.to_tokens)"
            )
        if self.prompt is not None:
            if not isinstance(self.prompt, str):
                raise PromptError(f"prompt must be a string, got {type(self.prompt).__name__}")
        else:
            toks = self.tokens
            if isinstance(toks, Tensor):
                if toks.ndim == 2 and toks.shape[0] == 1:
                    toks = toks[0]
                if toks.ndim != 1:
                    raise PromptError(f"tokens must be 1-D or [1, n], got {tuple(toks.shape)}")
                toks = toks.tolist()
            ids = tuple(int(t) for t in toks)  # type: ignore[union-attr]
            if not ids:
                raise PromptError("tokens is empty: an addition needs at least one token")
            object.__setattr__(self, "tokens", ids)

    def token_ids(self, lm: LM) -> list[int]:
        if self.tokens is not None:
            lm.check_token_ids(list(self.tokens))
            return list(self.tokens)
        return lm.token_ids(self.prompt or "")

    def site(self, lm: LM) -> Site:
        return parse_site(self.act_name, lm.n_layers)

    def activations(self, lm: LM) -> Tensor:
        """The unscaled residual stream ``[L, D]`` of the prompt at the site."""
        return get_activations(lm, self.token_ids(lm), self.site(lm))

    def injections(self, lm: LM) -> list[Injection]:
        acts = self.activations(lm)
        acts = acts.to(torch.promote_types(acts.dtype, torch.float32))
        return [Injection(self.site(lm), acts * self.coeff, self.coeff)]

    def with_coeff(self, coeff: float) -> ActivationAddition:
        return replace(self, coeff=coeff)

    def __mul__(self, k: float) -> ActivationAddition:
        return replace(self, coeff=self.coeff * check_finite(k, "scale"))

    __rmul__ = __mul__

    def __neg__(self) -> ActivationAddition:
        return replace(self, coeff=-self.coeff)

    def describe(self) -> str:
        what = self.label or (repr(self.prompt) if self.prompt is not None else f"{self.tokens}")
        return f"{self.coeff:+g} × {what} @ {self.act_name}"


class ActivationCache:
    """Recorded activations of addition prompts, least recently used first out, bounded in bytes.

    Steering with the same prompt again (every row of a sweep, every request to a server)
    reuses its recording instead of running the prompt again.
    """

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._entries: OrderedDict[tuple[tuple[int, ...], Site], Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[tuple[int, ...], Site]) -> Tensor | None:
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
        return hit

    def put(self, key: tuple[tuple[int, ...], Site], value: Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        while self._entries and self.bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()
        self._entries[key] = value
        self.bytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


_CACHES: WeakKeyDictionary[LM, ActivationCache] = WeakKeyDictionary()


def activation_cache(lm: LM) -> ActivationCache:
    """The activation cache of ``lm`` (e.g. ``activation_cache(lm).max_bytes = 64 << 20``)."""
    cache = _CACHES.get(lm)
    if cache is None:
        cache = _CACHES[lm] = ActivationCache()
    return cache


def get_activations(lm: LM, token_ids: Sequence[int], site: Site) -> Tensor:
    """Residual stream ``[L, D]`` of ``token_ids`` at ``site``, unsteered, cached per model."""
    key = (tuple(token_ids), site)
    cache = activation_cache(lm)
    hit = cache.get(key)
    if hit is None:
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=lm.device)
        hit = capture(lm, ids, [site])[site][0]
        cache.put(key, hit)
    return hit


def get_x_vector(
    prompt1: str,
    prompt2: str,
    coeff: float,
    act_name: int | str,
    model: LM | None = None,
    pad_method: str | None = None,
    custom_pad_id: int | None = None,
) -> tuple[ActivationAddition, ActivationAddition]:
    """The pair ``(+coeff · act(prompt1), −coeff · act(prompt2))``.

    With ``pad_method="tokens_right"`` (needs ``model``) the shorter prompt is padded on the
    right with ``custom_pad_id`` (default: the tokenizer's pad token) so both have one length;
    one side may then be empty (``" weddings"`` − ``""``: the pads stand for it). Without it,
    unequal lengths leave the extra positions with only one term, as in the original library.

    Example:
        >>> love, hate = get_x_vector("Love", "Hate", coeff=5, act_name=6)
        >>> hate.coeff
        -5.0
    """
    if pad_method not in (None, "tokens_right"):
        raise ActAddError(f"pad_method must be None or 'tokens_right', got {pad_method!r}")
    coeff = check_finite(coeff, "coeff")
    if pad_method is None:
        return (
            ActivationAddition(coeff, act_name, prompt=prompt1),
            ActivationAddition(-coeff, act_name, prompt=prompt2),
        )
    if model is None:
        raise ActAddError("pad_method='tokens_right' needs model= to tokenize the prompts")
    model = as_lm(model, "model")
    ids1 = model.token_ids(prompt1, allow_empty=True)
    ids2 = model.token_ids(prompt2, allow_empty=True)
    if not ids1 and not ids2:
        raise PromptError("both prompts are empty: give at least one token of text")
    pad = model.pad_token_id if custom_pad_id is None else int(custom_pad_id)
    model.check_token_ids([pad])
    n = max(len(ids1), len(ids2))
    ids1, ids2 = ids1 + [pad] * (n - len(ids1)), ids2 + [pad] * (n - len(ids2))
    return (
        ActivationAddition(coeff, act_name, tokens=tuple(ids1), label=repr(prompt1)),
        ActivationAddition(-coeff, act_name, tokens=tuple(ids2), label=repr(prompt2)),
    )
