"""Continuous batching: iteration-level scheduling of steered completions on one model.

A request (one completion: a prompt, its own steering, sampling, seed, stops and length) joins
the running batch at the next step and leaves it the step it finishes; no request waits for
another to end. Each step is one forward pass of the model over every running row:

* **admission**: waiting rows are read in the running rows' decoding step, one packed forward
  for both (a *mixed step*, ``actadd.packing``: each request attends to its own tokens only,
  and ``Steering.for_plans`` steers each packed token by its row's plan); rows whose steering
  depends on their prompt's hidden states (``Conditioned``), rows joining an idle batch, and
  models the mixed step does not fit are prefilled together instead (a left-padded batch,
  steered through ``Steering``, which reads each row's prompt: its length, its chat span, its
  conditions). Either way they sample their first token and their KV caches are merged into
  the running batch, left-padded to one width;
* **decoding**: one token per running row, with a 2-D mask and each row's logical position,
  steered by ``Steering.for_plans`` (the rows' plans, stacked while the set of rows stands);
* **sampling**: per row, as in ``actadd.generation`` (``actadd.sampling``: temperature,
  frequency penalty, top-k/top-p, and the row's own seeded random stream), so a row's tokens
  do not depend on the rest of the batch;
* **leaving**: rows that end (end-of-sequence, their ``max_tokens``, a stop string, a
  cancellation) are removed from the cache before the next step.

Capacity is a budget of KV-cache tokens: a row is admitted only while every running row, padded
to the longest prompt + max_tokens, fits; others wait. The cache is transformers'
``DynamicCache`` (full layers, so sliding-window models keep their whole history and mask it),
reached through ``cache.layers[i].keys``/``values`` and ``batch_select_indices``; the tests pin
that surface (``tests/test_batching.py``).

Transformers ships a continuous-batching manager (``init_continuous_batching``); measured here
on CPU it was no faster than this scheduler for small batches, about twice as slow per step at
longer contexts (it attends every query to every packed key through a mask), needed 12-14 GiB
and ~26 s of set-up with its default configuration, has no per-request seeds, frequency
penalty or stop strings, corrupts steering unless prefix sharing is off, and exposes the rows of
a packed forward only through private objects. See docs/serving.md.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from actadd.errors import ActAddError
from actadd.hooks import hooked
from actadd.model import LM, as_lm
from actadd.packing import MixedStep, mixed_forward, packable
from actadd.positions import Span
from actadd.sampling import GREEDY, FrequencyPenaltyLogitsProcessor, RowSeededSampler, Sampling
from actadd.steering import (
    Injection,
    RowPlan,
    Steering,
    injected,
    row_locations,
    validate_injections,
)

__all__ = ["Completion", "Request", "Scheduler", "TextStream", "generate_many"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """One completion to generate.

    Args:
        ids: prompt token ids (non-empty).
        additions: steerables (``ActivationAddition``, ``SteeringVector``, ``Conditioned``);
            empty: unsteered.
        location: where the additions land (None: each one's own default).
        span: the part of the prompt locations refer to (a chat's last user message).
        max_tokens: new tokens at most.
        sampling: temperature, top-p/k, frequency penalty (``temperature=0`` is greedy).
        seed: the row's own random stream (sampling only).
        stop: strings that end the completion (not included in it).
    """

    ids: tuple[int, ...]
    additions: tuple[Any, ...] = ()
    location: str | None = None
    span: Span | None = None
    max_tokens: int = 16
    sampling: Sampling = GREEDY
    seed: int = 0
    stop: tuple[str, ...] = ()

    @classmethod
    def from_prompt(cls, lm: LM, prompt: str, **fields: Any) -> Request:
        """A request for ``prompt`` tokenized as ``lm`` tokenizes prompts (its start-token
        policy); ``fields`` are the other arguments (``additions``, ``max_tokens``, ...).

        Example:
            >>> Request.from_prompt(lm, "I hate you because", max_tokens=40,
            ...     additions=tuple(get_x_vector("Love", "Hate", 5, 6)))  # doctest: +SKIP
        """
        return cls(tuple(as_lm(lm).token_ids(prompt)), **fields)


@dataclass
class Completion:
    """What a request produced: text, token ids, why it ended, and for each of its additions
    whether it applied (False where its condition did not hold)."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""
    applied: list[bool] = field(default_factory=list)
    error: BaseException | None = None


class TextStream:
    """Decodes a row's tokens into text deltas, holding back what may still change: an
    incomplete UTF-8 character and a possible start of a stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tok, self.stop = tokenizer, tuple(stop)
        self.tokens: list[int] = []
        self.sent = 0

    @property
    def text(self) -> str:
        return str(self.tok.decode(self.tokens, skip_special_tokens=True))

    def push(self, token: int, *, last: bool) -> tuple[str, bool]:
        """Add a token; returns ``(new text to emit, a stop string was hit)``."""
        self.tokens.append(int(token))
        text = self.text
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self._emit(text[:cut]), True
        safe = len(text)
        if not last:
            if text.endswith("\ufffd"):
                safe -= 1
            for s in self.stop:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        return self._emit(text[:safe]), False

    def flush(self) -> str:
        """Whatever was held back (the row ends without a stop string)."""
        return self._emit(self.text) if self.tokens else ""

    def _emit(self, text: str) -> str:
        if len(text) <= self.sent:
            return ""
        delta, self.sent = text[self.sent :], len(text)
        return delta


# Events a row reports: ("start",), ("token",) per generated token, ("delta", text),
# ("done", reason, n_tokens, applied), ("error", exception)
Listener = Callable[[str, tuple[Any, ...]], None]


@dataclass(eq=False)
class _Row:
    request: Request
    listen: Listener
    injections: list[Injection] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)  # injection -> the addition it came from
    plan: RowPlan | None = None
    generator: torch.Generator | None = None
    stream: TextStream | None = None
    length: int = 0  # real tokens in the cache
    cancelled: bool = False
    done: bool = False
    applied: list[bool] = field(default_factory=list)
    submitted: float = field(default_factory=time.monotonic)


class Scheduler:
    """Iteration-level scheduling over one model (see the module docs). Not thread-safe: one
    thread calls ``submit``/``cancel``/``step`` (the server's engine wraps it).

    Args:
        lm: the model.
        max_rows: rows decoded together at most.
        kv_budget_tokens: cache tokens the running batch may hold (rows × padded width);
            None: no bound beyond ``max_rows``.
        eos: end-of-sequence ids (default: the tokenizer's and the generation config's).
        dims: residual dimensions steering may change (``res_stream_slice``).
        mixed_steps: prefill new prompts inside the running rows' decoding step, one forward
            for both (``actadd.packing``), where the model allows it; False: a forward each.
        mix_min_rows: mixed steps only while at least this many rows decode. A new prompt's
            first token comes after the whole mixed forward; on a CPU, decoding one row alone
            is a fast matrix-vector product (62 ms on the embedded model, against 114 ms for
            two rows), so next to a single row a prompt gets its first token sooner from a
            forward of its own (docs/serving.md).
    """

    def __init__(
        self,
        lm: LM,
        *,
        max_rows: int = 16,
        kv_budget_tokens: int | None = None,
        eos: set[int] | None = None,
        dims: slice = slice(None),
        mixed_steps: bool = True,
        mix_min_rows: int = 2,
    ) -> None:
        self.lm = as_lm(lm)
        self.max_rows = max(1, int(max_rows))
        self.kv_budget_tokens = kv_budget_tokens
        self.eos = eos if eos is not None else eos_ids(self.lm)
        self.dims = dims
        self.waiting: deque[_Row] = deque()
        self.running: list[_Row] = []
        self._cache: Any = None
        self._mask: Tensor | None = None  # [B, W] over cached tokens
        self._ids: Tensor | None = None  # [B, W] the tokens in the cache, left-padded
        self._last: Tensor | None = None  # [B] the token each row feeds next
        self._steering: Steering | None = None  # for the running rows, while they stand
        self._cache_kw = _cache_keyword(self.lm.model)
        self.mixed_steps = mixed_steps
        self.mix_min_rows = max(1, int(mix_min_rows))
        self._pack: bool | None = None  # whether the model takes mixed steps (probed once)
        # only the last position's logits are sampled; the LM head over every prompt position
        # (and its [B, T, vocab] output) made a concurrency-8 load ~25 % slower (docs/serving.md)
        self._last_logits = (
            {"logits_to_keep": 1}
            if "logits_to_keep" in inspect.signature(self.lm.model.forward).parameters
            else {}
        )
        self.stats = {
            "steps": 0,
            "prefills": 0,
            "rows": 0,
            "max_rows": 0,
            "cancelled": 0,
            "tokens": 0,
            "mixed": 0,
        }

    # -- requests ---------------------------------------------------------------------------------
    def submit(self, request: Request, listen: Listener) -> _Row:
        """Queue a request; its events go to ``listen(kind, args)`` from ``step``."""
        if not request.ids:
            raise ActAddError("a request needs at least one prompt token")
        if request.max_tokens < 1:
            raise ActAddError(f"max_tokens must be >= 1, got {request.max_tokens}")
        row = _Row(request, listen)
        self.waiting.append(row)
        return row

    def cancel(self, row: _Row) -> None:
        """The row leaves at the next step (or never starts)."""
        row.cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def tokens_held(self) -> int:
        """Cache tokens the running batch may grow to (rows × padded width)."""
        return self._worst(self.running)

    def _worst(self, rows: Sequence[_Row]) -> int:
        if not rows:
            return 0
        return len(rows) * max(len(r.request.ids) + r.request.max_tokens for r in rows)

    # -- one step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Admit what fits, then decode one token for every running row."""
        self._drop_finished()
        admitted = self._admit()
        if admitted and self._packable():
            # prompts whose steering is known before the forward (no conditions) are read
            # packed: inside the running rows' decoding step when enough rows decode (one
            # forward for both), else in a packed prefill of their own
            packed = [r for r in admitted if not _has_conditions(r)]
            admitted = [r for r in admitted if _has_conditions(r)]
            decoding = len(self.running) >= self.mix_min_rows
            if packed:
                try:
                    self._mixed(packed, decoding=decoding)
                except Exception:
                    log.warning("a packed step failed; its prompts get a prefill", exc_info=True)
                    admitted = [*packed, *admitted]
                else:
                    self._drop_finished()
                    if decoding and not admitted:
                        return
        if admitted:
            try:
                self._prefill(admitted)
            except Exception:
                if len(admitted) == 1:
                    raise
                # an unforeseen failure: prefill each row alone, so only its culprit fails
                for row in admitted:
                    try:
                        self._prefill([row])
                    except Exception as e:
                        row.done = True
                        row.listen("error", (e,))
            self._drop_finished()
        if self.running:
            self._decode()
            self._drop_finished()

    def _admit(self) -> list[_Row]:
        out: list[_Row] = []
        while self.waiting and len(self.running) + len(out) < self.max_rows:
            row = self.waiting[0]
            if row.cancelled:
                self.waiting.popleft()
                row.done = True
                row.listen("done", ("cancelled", 0, []))
                continue
            budget = self.kv_budget_tokens
            if budget is not None and self._worst([*self.running, *out, row]) > budget:
                if not self.running and not out:  # alone it does not fit: it never will
                    self.waiting.popleft()
                    row.done = True
                    n, m = len(row.request.ids), row.request.max_tokens
                    err = ActAddError(
                        f"the prompt ({n} tokens) plus max_tokens ({m}) exceed the KV-cache "
                        f"budget of {budget} tokens: send a shorter prompt or fewer max_tokens"
                    )
                    err.param = "max_tokens"
                    row.listen("error", (err,))
                    continue
                break  # it waits for running rows to finish
            self.waiting.popleft()
            try:
                self._resolve(row)
            except Exception as e:  # bad steering for this request: fail it alone
                row.done = True
                if isinstance(e, ActAddError) and e.param is None:
                    e.param = "steering"  # what the request should change
                row.listen("error", (e,))
                continue
            out.append(row)
        return out

    def reset(self) -> None:
        """Forget the running batch (after a failed step)."""
        self.running, self._cache, self._mask, self._ids, self._last = [], None, None, None, None
        self._steering = None

    def _resolve(self, row: _Row) -> None:
        r = row.request
        per_addition = [a.injections(self.lm) for a in r.additions]
        row.injections = [i for injections in per_addition for i in injections]
        row.owner = [k for k, injections in enumerate(per_addition) for _ in injections]
        validate_injections(row.injections, self.lm.d_model, self.lm.n_layers)
        injected(row.injections, len(r.ids), r.location, span=r.span)  # refuse short prompts
        if r.sampling.temperature > 0:
            row.generator = torch.Generator(device=self.lm.device)
            row.generator.manual_seed(int(r.seed))
        row.stream = TextStream(self.lm.tokenizer, r.stop)

    def _prefill(self, rows: list[_Row]) -> None:
        """Prefill the admitted rows as one left-padded batch, sample their first tokens, and
        merge their caches into the running batch."""
        from transformers import DynamicCache

        ids, mask = self.lm.pad([r.request.ids for r in rows])
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache()
        locations = row_locations([r.request.location for r in rows], len(rows), True)
        steering = Steering(
            self.lm,
            [r.injections for r in rows],
            per_row=True,
            locations=locations,
            spans=[r.request.span for r in rows] if any(r.request.span for r in rows) else None,
            dims=self.dims,
        )
        with _hooks(self.lm, steering):
            logits = self.lm.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_kw: cache},
                **self._last_logits,
            ).logits[:, -1]
        self.stats["prefills"] += 1
        for row, plan in zip(rows, steering.plans, strict=True):
            plan.prompt_len = len(row.request.ids)
            row.plan, row.length = plan, len(row.request.ids)
            applies = [
                i.condition is None or plan.gates.get(id(i.condition), False)
                for i in row.injections
            ]
            row.applied = [
                all(ok for ok, k in zip(applies, row.owner, strict=True) if k == a)
                for a in range(len(row.request.additions))
            ]
            row.listen("start", ())
        tokens = self._sample(rows, ids, mask, logits)
        self._merge(rows, cache, mask, ids, tokens)
        self._emit(rows, tokens)

    def _packable(self) -> bool:
        if self._pack is None:
            self._pack = self.mixed_steps and packable(self.lm, self._cache_kw)
        return self._pack

    def _mixed(self, rows: list[_Row], *, decoding: bool) -> None:
        """One packed forward (``actadd.packing``) reading ``rows``' prompts, with the running
        rows decoding one token in it when ``decoding`` (a mixed step); ``rows`` then join
        the batch. Packed, prompts of different lengths cost their tokens, not the longest
        prompt's times their number as in a left-padded prefill."""
        B = len(self.running) if decoding else 0
        device = self.lm.device if self._mask is None else self._mask.device
        prompts = [torch.tensor(r.request.ids, device=device) for r in rows]
        lengths = [len(p) for p in prompts]
        positions = [torch.arange(n, device=device) for n in lengths]
        mask = None
        if B:
            assert self._mask is not None and self._ids is not None and self._last is not None
            mask = torch.cat([self._mask, self._mask.new_ones(B, 1)], 1)
            prompts.insert(0, self._last)
            positions.insert(0, torch.tensor([r.length for r in self.running], device=device))
        counts = torch.tensor([1] * B + lengths, device=device)
        segments = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        for row in rows:  # their prompts are known: so is where their additions land
            req = row.request
            row.plan = RowPlan.of(row.injections, req.location, req.span, prompt_len=len(req.ids))
        plans = [r.plan for r in [*self.running[:B], *rows]]
        steering = Steering.for_plans(self.lm, plans, dims=self.dims)  # type: ignore[arg-type]
        step = MixedStep(self._cache if B else None, mask, lengths, device=device)
        W = 0 if mask is None else mask.shape[1] - 1
        try:
            with _hooks(self.lm, steering):
                logits = mixed_forward(
                    self.lm,
                    step,
                    torch.cat(prompts),
                    torch.cat(positions),
                    segments,
                    self._cache_kw,
                )
        except Exception:
            # the running cache may hold this step's token in some layers: take it back, and
            # let the rows be prefilled alone (a failing one then fails by itself)
            if B:
                for layer in _layers(self._cache):
                    layer.keys, layer.values = layer.keys[..., :W, :], layer.values[..., :W, :]
            raise
        self.stats["prefills"] += 1
        if B:
            assert mask is not None and self._ids is not None and self._last is not None
            self.stats["steps"] += 1
            self.stats["mixed"] += 1
            self.stats["max_rows"] = max(self.stats["max_rows"], B + len(rows))
            # the running rows, as after a decoding step
            self._mask = mask
            self._ids = torch.cat([self._ids, self._last[:, None]], 1)
            for r in self.running:
                r.length += 1
            tokens_run = self._sample(self.running, self._ids, self._mask, logits[:B])
            self._last = tokens_run
            self._emit(self.running, tokens_run)
        # the new rows, as after a prefill
        ids, new_mask = self.lm.pad([r.request.ids for r in rows])
        for row in rows:
            row.length = len(row.request.ids)
            row.applied = [True] * len(row.request.additions)
            row.listen("start", ())
        tokens_new = self._sample(rows, ids, new_mask, logits[B:])
        self._merge(rows, step.new_cache, new_mask, ids, tokens_new)
        self._emit(rows, tokens_new)

    def _decode(self) -> None:
        assert self._mask is not None and self._ids is not None and self._last is not None
        B = len(self.running)
        mask = torch.cat([self._mask, self._mask.new_ones(B, 1)], 1)
        positions = torch.tensor([[r.length] for r in self.running], device=mask.device)
        if self._steering is None:
            plans = [r.plan for r in self.running]
            self._steering = Steering.for_plans(self.lm, plans, dims=self.dims)  # type: ignore[arg-type]
        with _hooks(self.lm, self._steering):
            logits = self.lm.model(
                input_ids=self._last[:, None],
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_kw: self._cache},
            ).logits[:, -1]
        self._mask = mask
        self._ids = torch.cat([self._ids, self._last[:, None]], 1)
        for r in self.running:
            r.length += 1
        tokens = self._sample(self.running, self._ids, self._mask, logits)
        self._last = tokens
        self.stats["steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], B)
        self._emit(self.running, tokens)

    # -- sampling ---------------------------------------------------------------------------------
    def _sample(self, rows: list[_Row], ids: Tensor, mask: Tensor, logits: Tensor) -> Tensor:
        """Each row's next token from its logits, as ``actadd.generation`` samples."""
        start = (mask == 0).sum(-1)  # [B] first real token of each row
        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        groups: dict[tuple[float, float, int, float], list[int]] = {}
        for b, r in enumerate(rows):
            groups.setdefault(r.request.sampling.key(), []).append(b)
        for members in groups.values():
            s = rows[members[0]].request.sampling
            idx = torch.tensor(members, device=logits.device)
            scores, history = logits[idx], ids[idx]
            scores = _process(s, history, scores, start[idx], [rows[b].generator for b in members])
            out[idx] = scores.argmax(-1)
        return out

    # -- the batch's cache ------------------------------------------------------------------------
    def _merge(self, rows: list[_Row], cache: Any, mask: Tensor, ids: Tensor, last: Tensor) -> None:
        if not self.running:
            self.running, self._cache, self._mask, self._ids, self._last = (
                list(rows),
                cache,
                mask,
                ids,
                last,
            )
            self._steering = None
            return
        assert self._mask is not None and self._ids is not None and self._last is not None
        width = max(self._mask.shape[1], mask.shape[1])
        old, new = width - self._mask.shape[1], width - mask.shape[1]
        for mine, theirs in zip(_layers(self._cache), _layers(cache), strict=True):
            for name in ("keys", "values"):
                a, b = getattr(mine, name), getattr(theirs, name)
                setattr(mine, name, torch.cat([_pad_left(a, old, -2), _pad_left(b, new, -2)], 0))
        self._mask = torch.cat([_pad_left(self._mask, old, 1), _pad_left(mask, new, 1)], 0)
        self._ids = torch.cat(
            [
                _pad_left(self._ids, old, 1, self.lm.pad_token_id),
                _pad_left(ids, new, 1, self.lm.pad_token_id),
            ],
            0,
        )
        self._last = torch.cat([self._last, last])
        self.running += rows
        self._steering = None

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self.running) if not (r.done or r.cancelled)]
        for r in self.running:
            if r.cancelled and not r.done:
                r.done = True
                self.stats["cancelled"] += 1
                r.listen("done", ("cancelled", len(r.stream.tokens) if r.stream else 0, r.applied))
        if len(keep) == len(self.running):
            return
        if not keep:
            self.running, self._cache, self._mask, self._ids, self._last = (
                [],
                None,
                None,
                None,
                None,
            )
            self._steering = None
            return
        assert self._mask is not None and self._ids is not None and self._last is not None
        index = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask, self._ids, self._last = self._mask[index], self._ids[index], self._last[index]
        self.running = [self.running[i] for i in keep]
        trim = int((self._mask == 0).sum(-1).min())  # columns that are padding in every row
        if trim:
            for layer in _layers(self._cache):
                layer.keys, layer.values = layer.keys[..., trim:, :], layer.values[..., trim:, :]
            self._mask, self._ids = self._mask[:, trim:], self._ids[:, trim:]
        self._steering = None

    def _emit(self, rows: list[_Row], tokens: Tensor) -> None:
        for r, token in zip(rows, tokens.tolist(), strict=True):
            if r.done or r.cancelled:
                continue
            assert r.stream is not None
            self.stats["tokens"] += 1
            r.listen("token", ())
            if token in self.eos:
                self._finish(r, "stop", r.stream.flush())
                continue
            last = len(r.stream.tokens) + 1 >= r.request.max_tokens
            delta, stopped = r.stream.push(token, last=last)
            if delta:
                r.listen("delta", (delta,))
            if stopped:
                self._finish(r, "stop", "")
            elif last:
                self._finish(r, "length", r.stream.flush())

    def _finish(self, r: _Row, reason: str, tail: str) -> None:
        if tail:
            r.listen("delta", (tail,))
        r.done = True
        self.stats["rows"] += 1
        assert r.stream is not None
        r.listen("done", (reason, len(r.stream.tokens), r.applied))


def _has_conditions(row: _Row) -> bool:
    """Whether the row's steering depends on its prompt's hidden states (``Conditioned``):
    those are read in a prefill of its own."""
    return any(i.condition is not None for i in row.injections)


def _process(
    s: Sampling, history: Tensor, scores: Tensor, start: Tensor, generators: list[Any]
) -> Tensor:
    """The chain of ``actadd.sampling`` for rows sharing ``s``, with their own generators."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if not s.greedy and s.temperature != 1:
        scores = TemperatureLogitsWarper(s.temperature)(history, scores)
    if s.freq_penalty:
        scores = FrequencyPenaltyLogitsProcessor(s.freq_penalty, start)(history, scores)
    if not s.greedy:
        if s.top_k:
            scores = TopKLogitsWarper(s.top_k)(history, scores)
        if s.top_p < 1:
            scores = TopPLogitsWarper(s.top_p)(history, scores)
        scores = RowSeededSampler.from_generators(generators)(history, scores)
    return scores


def _pad_left(x: Tensor, n: int, dim: int, value: float = 0) -> Tensor:
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_full(shape, value), x], dim)


def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None or any(not hasattr(layer, "keys") for layer in layers):
        raise ActAddError(
            f"continuous batching needs a cache with per-layer keys/values; "
            f"{type(cache).__name__} has none (is this a recurrent model?)"
        )
    return list(layers)


def _cache_keyword(model: Any) -> str:
    """The cache argument's name in this release (``cache`` from transformers 5.24)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _hooks:
    """The steering hooks for one forward pass (the scheduler puts them on per step)."""

    def __init__(self, lm: LM, steering: Steering) -> None:
        fns = [(site, steering.condition_fn(leaf)) for leaf, site in steering.leaf_sites.items()]
        fns += [(site, steering.site_fn(site)) for site in steering.sites]
        self._cm = hooked(lm, fns, root_fn=steering.on_forward) if fns else None

    def __enter__(self) -> None:
        if self._cm is not None:
            self._cm.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)


def eos_ids(lm: LM) -> set[int]:
    """End-of-sequence ids: the tokenizer's and the model's generation config's."""
    ids: set[int] = set()
    tok_eos = lm.tokenizer.eos_token_id
    if tok_eos is not None:
        ids.add(int(tok_eos))
    gen = getattr(lm.model, "generation_config", None)
    cfg_eos = getattr(gen, "eos_token_id", None)
    if isinstance(cfg_eos, int):
        ids.add(cfg_eos)
    elif isinstance(cfg_eos, (list, tuple)):
        ids.update(int(i) for i in cfg_eos)
    return ids


def generate_many(
    lm: LM,
    requests: Sequence[Request | str],
    *,
    max_rows: int = 16,
    kv_budget_tokens: int | None = None,
) -> list[Completion]:
    """Run requests of very different lengths through continuous batching, offline: a short
    one does not wait for a long one, and the batch stays full. Each result equals the same
    request generated alone.

    Args:
        lm: the model.
        requests: ``Request`` objects (``Request.from_prompt(lm, prompt, ...)``), or plain
            prompts (greedy, 16 tokens, unsteered).
        max_rows: rows decoded together at most.
        kv_budget_tokens: KV-cache tokens the running rows may hold (None: no limit).

    Example:
        >>> from actadd.batching import Request
        >>> love = tuple(actadd.get_x_vector("Love", "Hate", 5, 6))
        >>> reqs = [Request.from_prompt(lm, p, max_tokens=n, additions=love)
        ...         for p, n in [("I hate you because", 200), ("Hi", 8)]]  # doctest: +SKIP
        >>> [c.text for c in actadd.generate_many(lm, reqs)]  # doctest: +SKIP
    """
    from actadd import progress

    lm = as_lm(lm)
    work = [Request.from_prompt(lm, r) if isinstance(r, str) else r for r in requests]
    sched = Scheduler(lm, max_rows=max_rows, kv_budget_tokens=kv_budget_tokens)
    results = [Completion() for _ in requests]

    def listener(out: Completion) -> Listener:
        def on(kind: str, args: tuple[Any, ...]) -> None:
            if kind == "delta":
                out.text += args[0]
            elif kind == "done":
                out.finish_reason, _, out.applied = args
            elif kind == "error":
                out.error, out.finish_reason = args[0], "error"

        return on

    rows = [sched.submit(r, listener(c)) for r, c in zip(work, results, strict=True)]
    total = sum(r.max_tokens for r in work)
    while sched.busy:
        sched.step()
        done = sum(len(r.stream.tokens) if r.stream else 0 for r in rows)
        progress.report("generating", min(done, total), total)
    for row, out in zip(rows, results, strict=True):
        if row.stream is not None:
            out.tokens = list(row.stream.tokens)
    return results
