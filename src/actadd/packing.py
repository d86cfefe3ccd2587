"""Mixed steps: one forward pass over the decoding rows and the prompts joining them.

The continuous-batching scheduler (``actadd.batching``) keeps its running rows in a left-padded
KV cache and decodes them one token per step. A new request's prompt used to take a forward of
its own (a prefill) before it joined; on a CPU, where a forward's cost is mostly reading the
weights once, that second forward cost nearly as much as the decoding step itself. A *mixed
step* packs both into one forward: the model sees ``[1, N, D]`` hidden states, the ``B``
decoding tokens first and then each new prompt's tokens, with ``position_ids`` giving each
token's logical position and ``cu_seq_lens_q`` (the name transformers' own continuous-batching
engine uses) where each request's tokens start. Steering reads the same two tensors to find
each token's row and position (``Steering`` with ``ForwardInputs.segments``).

Everything except attention works token by token, so packing changes nothing there. Attention
is routed through ``packed_attention`` (registered with transformers' ``AttentionInterface``
for the duration of the step): the decoding tokens attend, as one batch, to the running cache
(which ``MixedStep.update`` extends by one token), and the new prompts attend, as one
left-padded batch, causally to their own tokens only, which become the new rows' cache. Both
calls are transformers' own SDPA attention with explicit masks (padding, causality and the
layer's sliding window), so no query ever sees another request's keys.

Whether a model can take mixed steps is checked once per model (``packable``): it must use
SDPA attention through ``AttentionInterface`` in every layer, and a probe (a prompt decoding
while another joins) must give the same logits as running each alone. Models that fail keep
separate prefills: slower, never wrong.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import Tensor

from actadd.model import LM

__all__ = [
    "IMPLEMENTATION",
    "MixedStep",
    "mixed_forward",
    "packable",
    "packed_attention",
    "probe_error",
]

log = logging.getLogger(__name__)

IMPLEMENTATION = "actadd_packed"  # the name registered with transformers' AttentionInterface

_LOCAL = threading.local()  # the mixed step under way on this thread, if any
_PACKABLE: WeakKeyDictionary[Any, bool] = WeakKeyDictionary()
_REGISTERED = False


class MixedStep:
    """The caches and masks of one mixed step; the model sees it as its KV cache.

    Args:
        running: the running rows' cache (a left-padded ``DynamicCache``, ``[B, H, W, hd]``
            per layer); each layer's ``update`` appends the decoding tokens to it. None: no
            row decodes (a packed prefill).
        mask: ``[B, W + 1]`` the running rows' 2-D mask including this step's token.
        new_lengths: the new prompts' lengths, in packed order after the decoding tokens.
        device: where the tensors live when no row decodes.
    """

    def __init__(
        self,
        running: Any,
        mask: Tensor | None,
        new_lengths: Sequence[int],
        *,
        device: torch.device | str = "cpu",
    ) -> None:
        from transformers import DynamicCache

        self.running, self.mask = running, mask
        self.B = 0 if running is None or mask is None else int(mask.shape[0])
        self.lengths = [int(n) for n in new_lengths]
        self.K, self.P = len(self.lengths), max(self.lengths, default=0)
        device = mask.device if mask is not None else torch.device(device)
        # new prompt token j -> its slot in the left-padded [K * P] grid
        self.slots = torch.cat(
            [
                k * self.P + (self.P - n) + torch.arange(n, device=device)
                for k, n in enumerate(self.lengths)
            ]
        )
        self.new_mask = torch.zeros(self.K * self.P, dtype=torch.long, device=device)
        self.new_mask[self.slots] = 1
        self.new_mask = self.new_mask.view(self.K, self.P)  # [K, P] left-padded
        self.new_cache = DynamicCache()
        self._kv: dict[int, tuple[Any, Any, Any, Any]] = {}
        self._masks: dict[int | None, tuple[Tensor | None, Tensor]] = {}
        self.attended: set[int] = set()  # layers whose attention went through this step

    # -- the cache interface the model's attention layers call -----------------------------------
    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kw: Any) -> Any:
        """Split ``[1, H, N, hd]`` into decoding tokens (appended to the running cache) and
        new prompts (left-padded into the new rows' cache); attention reads them from here."""
        B = self.B
        kd = vd = None
        if B:
            kd, vd = self.running.update(
                key[0, :, :B].transpose(0, 1).unsqueeze(2),  # [B, H, 1, hd]
                value[0, :, :B].transpose(0, 1).unsqueeze(2),
                layer_idx,
            )
        kn, vn = self.new_cache.update(
            self._grid(key[0, :, B:]), self._grid(value[0, :, B:]), layer_idx
        )
        self._kv[layer_idx] = (kd, vd, kn, vn)
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.running.get_seq_length(layer_idx)) if self.B else 0

    def _grid(self, x: Tensor) -> Tensor:
        """``[H, S, hd]`` packed prompt tokens -> ``[K, H, P, hd]`` left-padded (pads zero)."""
        H, _, hd = x.shape
        grid = x.new_zeros(self.K * self.P, H, hd)
        grid.index_copy_(0, self.slots, x.transpose(0, 1))
        return grid.view(self.K, self.P, H, hd).transpose(1, 2)

    # -- attention --------------------------------------------------------------------------------
    def masks(self, window: int | None) -> tuple[Tensor | None, Tensor]:
        """``([B, 1, 1, W+1], [K, 1, P, P])`` boolean masks: real keys, causal, and inside the
        layer's sliding window (``q - k < window``, as transformers masks it)."""
        got = self._masks.get(window)
        if got is not None:
            return got
        dec = None
        if self.B:
            assert self.mask is not None
            m = self.mask.bool()
            kpos = self.mask.long().cumsum(-1) - 1  # [B, W+1] logical position of each key
            dec = m
            if window is not None:
                dec = dec & (kpos[:, -1:] - kpos < window)
            dec = dec[:, None, None, :]
        real = self.new_mask.bool()  # [K, P]
        pos = self.new_mask.cumsum(-1) - 1
        q, k = pos[:, :, None], pos[:, None, :]
        new = real[:, None, :] & (k <= q)
        if window is not None:
            new = new & (q - k < window)
        # a pad query sees itself only (its output is dropped; an all-masked row would be NaN)
        new = new | torch.eye(self.P, dtype=torch.bool, device=new.device)
        got = self._masks[window] = (dec, new[:, None])
        return got

    def attend(self, module: Any, query: Tensor, **kwargs: Any) -> tuple[Tensor, None]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = int(module.layer_idx)
        kd, vd, kn, vn = self._kv.pop(layer)
        self.attended.add(layer)
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        dec_mask, new_mask = self.masks(int(window) if window else None)
        opts: dict[str, Any] = {
            "dropout": 0.0,
            "scaling": kwargs.get("scaling"),
            "softcap": kwargs.get("softcap"),
        }
        q = query[0]  # [H, N, hd]
        outs = []
        if self.B:
            od, _ = sdpa_attention_forward(
                module, q[:, : self.B].transpose(0, 1).unsqueeze(2), kd, vd, dec_mask, **opts
            )  # [B, 1, H, hd]
            outs.append(od[:, 0])
        on, _ = sdpa_attention_forward(module, self._grid(q[:, self.B :]), kn, vn, new_mask, **opts)
        outs.append(on.reshape(self.K * self.P, *on.shape[2:])[self.slots])  # [S, H, hd]
        return torch.cat(outs, 0).unsqueeze(0), None


def packed_attention(
    module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs: Any
) -> tuple[Tensor, Any]:
    """Attention inside a mixed step (``MixedStep.attend``); elsewhere (another thread's
    forward while a step runs) transformers' SDPA attention, unchanged."""
    step = getattr(_LOCAL, "step", None)
    if step is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return step.attend(module, query, **kwargs)


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, packed_attention)
    # masks of forwards outside a step (other threads) are built as for SDPA
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    _REGISTERED = True


@contextmanager
def _routed(lm: LM, step: MixedStep) -> Iterator[None]:
    """Attention goes through ``step`` for the block; the model's own setting comes back on
    every exit path."""
    _register()
    config = lm.model.config
    before = config._attn_implementation
    config._attn_implementation = IMPLEMENTATION
    _LOCAL.step = step
    try:
        yield
    finally:
        _LOCAL.step = None
        config._attn_implementation = before


def mixed_forward(
    lm: LM,
    step: MixedStep,
    tokens: Tensor,
    positions: Tensor,
    segments: Tensor,
    cache_keyword: str,
) -> Tensor:
    """Run one mixed step; ``[R, vocab]`` logits of each request's last token.

    Args:
        tokens, positions: ``[N]`` packed tokens and their logical positions.
        segments: ``[R + 1]`` where each request's tokens start (``cu_seq_lens_q``).
        cache_keyword: the model's name for its cache argument in this release.
    """
    N = int(tokens.shape[0])
    segments = segments.to(tokens.device)
    last = segments[1:] - 1
    with _routed(lm, step):
        out = lm.model(
            input_ids=tokens[None],
            position_ids=positions[None],
            # a 4-D mask is taken as prepared: transformers builds none (attention masks itself)
            attention_mask=torch.ones(1, 1, N, 1, dtype=torch.bool, device=tokens.device),
            cu_seq_lens_q=segments,
            use_cache=True,
            logits_to_keep=last,
            **{cache_keyword: step},
        )
    missing = set(range(lm.n_layers)) - step.attended
    if missing:
        raise RuntimeError(f"layers {sorted(missing)} did not attend through the mixed step")
    logits = out.logits[0]
    return logits if logits.shape[0] == last.shape[0] else logits[last]


def packable(lm: LM, cache_keyword: str) -> bool:
    """Whether ``lm`` can take mixed steps: SDPA attention, routed through transformers'
    ``AttentionInterface`` in every layer, and a probe equal to running each request alone
    (``probe_error`` within float rounding: 1e-3 of the largest logit, 5e-2 in half
    precision)."""
    model = lm.model
    if model in _PACKABLE:
        return _PACKABLE[model]
    ok, why = False, ""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        why = f"attention is {model.config._attn_implementation!r}, not 'sdpa'"
    else:
        try:
            err = probe_error(lm, cache_keyword)
            tol = 1e-3 if model.dtype in (torch.float32, torch.float64) else 5e-2
            ok = err <= tol
            why = f"the probe's logits differ from each request alone by {err:.3g} of the largest"
        except Exception as e:  # an architecture the packed forward does not fit
            why = f"{type(e).__name__}: {e}"
    if not ok:
        log.info("packed steps off for %s (%s): prompts get a left-padded prefill", lm.name, why)
    _PACKABLE[model] = ok
    return ok


@torch.no_grad()
def probe_error(lm: LM, cache_keyword: str) -> float:
    """How far packed forwards are from running each request alone: the largest
    ``|logit difference| / max |logit|`` over a row (4 tokens, cached) decoding its 5th while
    a 3-token prompt joins, and both prompts read packed with no row decoding."""
    from transformers import DynamicCache

    vocab = int(lm.model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(2, vocab, (5,), generator=g).to(lm.device)
    b = torch.randint(2, vocab, (3,), generator=g).to(lm.device)
    want_a = lm.model(input_ids=a[None], use_cache=False).logits[0, -1]
    want_b = lm.model(input_ids=b[None], use_cache=False).logits[0, -1]
    cache = DynamicCache()
    lm.model(input_ids=a[None, :4], use_cache=True, **{cache_keyword: cache})
    step = MixedStep(cache, torch.ones(1, 5, dtype=torch.long, device=lm.device), [3])
    tokens = torch.cat([a[4:], b])
    positions = torch.tensor([4, 0, 1, 2], device=lm.device)
    got = mixed_forward(lm, step, tokens, positions, torch.tensor([0, 1, 4]), cache_keyword)
    both = MixedStep(None, None, [5, 3], device=lm.device)
    got2 = mixed_forward(
        lm,
        both,
        torch.cat([a, b]),
        torch.tensor([0, 1, 2, 3, 4, 0, 1, 2], device=lm.device),
        torch.tensor([0, 5, 8]),
        cache_keyword,
    )
    err = 0.0
    for x, y in ((got[0], want_a), (got[1], want_b), (got2[0], want_a), (got2[1], want_b)):
        scale = float(y.float().abs().max()) or 1.0
        err = max(err, float((x.float() - y.float()).abs().max()) / scale)
    return err
