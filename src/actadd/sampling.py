"""Sampling, one small logits processor per step, shared by generation, sweeps and the server.

Sampling is done per row: each row has its own seed and its own random stream (Gumbel-max
over the processed logits), so a row's completion depends only on its prompt, its additions
and its seed, never on what else is in the batch or on the batch size. Steered and unsteered
rows with the same seed share their noise (paired sampling).

Processing order follows TransformerLens, which the original library used: temperature, then
the OpenAI-style frequency penalty (``logit -= freq_penalty × count``, counting prompt and
generated tokens), then top-p, then the seeded draw. ``temperature=0`` is greedy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from actadd.errors import ActAddError, check_finite

__all__ = [
    "GREEDY",
    "FrequencyPenaltyLogitsProcessor",
    "LossRecorder",
    "RowGroups",
    "RowSeededSampler",
    "Sampling",
    "row_processors",
    "row_seeds",
]


@dataclass(frozen=True)
class Sampling:
    """How one row samples: ``temperature`` (0 is greedy), ``top_p``, ``top_k`` (0: off) and
    the OpenAI-style ``freq_penalty``. Each bad value is named in the error."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    freq_penalty: float = 0.0

    def __post_init__(self) -> None:
        t = check_finite(self.temperature, "temperature")
        p = check_finite(self.top_p, "top_p")
        if t < 0:
            raise ActAddError(f"temperature must be >= 0 (0 is greedy), got {t}")
        if not 0 < p <= 1:
            raise ActAddError(f"top_p must be in (0, 1], got {p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ActAddError(f"top_k must be a whole number >= 0 (0: off), got {self.top_k!r}")
        object.__setattr__(self, "temperature", t)
        object.__setattr__(self, "top_p", p)
        object.__setattr__(self, "freq_penalty", check_finite(self.freq_penalty, "freq_penalty"))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def key(self) -> tuple[float, float, int, float]:
        """Rows with equal keys share processors (top-p/k mean nothing when greedy)."""
        if self.greedy:
            return (0.0, 1.0, 0, self.freq_penalty)
        return (self.temperature, self.top_p, self.top_k, self.freq_penalty)


GREEDY = Sampling(temperature=0.0)


class FrequencyPenaltyLogitsProcessor(LogitsProcessor):
    """OpenAI-style frequency penalty: subtract ``penalty × count(token)`` from each logit.

    ``start[b]`` is the first real token of row ``b`` (left padding is not counted).
    """

    def __init__(self, penalty: float, start: Tensor) -> None:
        self.penalty = check_finite(penalty, "freq_penalty")
        self.start = start  # [B]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        real = (pos[None, :] >= self.start.to(input_ids.device)[:, None]).to(scores.dtype)
        if scores.shape[-1] < T * T:  # long texts: count into a dense [B, V] table
            counts = torch.zeros_like(scores).scatter_add_(1, input_ids, real)  # [B, V]
            return scores - self.penalty * counts
        # Short texts (most generation steps): count each token among its row's real tokens
        # with a [B, T, T] comparison and touch only those entries of the [B, V] scores:
        # three fewer passes over the vocabulary, the same numbers as the dense table.
        same = (input_ids[:, :, None] == input_ids[:, None, :]).to(scores.dtype)  # [B, T, T]
        counts_t = torch.bmm(same, real[:, :, None])[..., 0]  # [B, T]: count of token t
        penalised = scores.gather(1, input_ids) - self.penalty * counts_t
        return scores.scatter(1, input_ids, penalised)  # duplicates write equal values


class RowSeededSampler(LogitsProcessor):
    """Sample each row from its own generator by the Gumbel-max trick; run with greedy decoding.

    ``argmax(log softmax(scores) + Gumbel noise)`` is a sample from ``softmax(scores)``;
    filtered tokens (``-inf``) stay impossible. Each step draws ``V`` float64 uniforms ``u``
    from each row's generator and takes ``e = -log1p(-u)`` as the Exp(1) draws: what
    ``Tensor.exponential_`` computes on CPU, ~3× faster, and defined here rather than by torch.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str) -> None:
        self.generators = []
        for s in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(int(s))
            self.generators.append(g)
        self._u: Tensor | None = None  # [B, V] float64 and float32 buffers, reused every step
        self._e: Tensor | None = None

    @classmethod
    def from_generators(cls, generators: Sequence[torch.Generator]) -> RowSeededSampler:
        """A sampler over rows whose random streams already exist (and go on between calls):
        rows that join and leave a batch keep their own stream."""
        self = cls([], "cpu")
        self.generators = list(generators)
        return self

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        u, e = self._buffers(scores)
        # [B, V] uniforms, one stream per row, so rows are independent of the batch; the rest
        # is vectorised over rows, in place on buffers kept from step to step (fresh multi-MB
        # tensors each step cost as much again in page faults)
        for row, g in zip(u, self.generators, strict=True):
            row.uniform_(generator=g)
        e.copy_(u.neg_().log1p_().neg_())  # [B, V] Exp(1), rounded to float32
        gumbel = e.clamp_min_(1e-30).log_().neg_()
        return torch.log_softmax(scores.float(), -1).add_(gumbel)

    def _buffers(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        u, e = self._u, self._e
        if u is None or e is None or u.shape != scores.shape or u.device != scores.device:
            u = self._u = torch.empty(scores.shape, dtype=torch.float64, device=scores.device)
            e = self._e = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
        return u, e


class LossRecorder(LogitsProcessor):
    """Keeps the log-probability of each chosen token under the raw (steered) logits."""

    def __init__(self) -> None:
        self.prev: Tensor | None = None
        self.logprobs: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self._take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float(), -1)
        return scores

    def _take(self, chosen: Tensor) -> None:
        if self.prev is not None:
            self.logprobs.append(self.prev.gather(1, chosen[:, None])[:, 0])

    def finish(self, last: Tensor) -> Tensor:
        self._take(last)
        return torch.stack(self.logprobs, 1)  # [B, new tokens]


def _processors(
    sampling: Sampling, seeds: Sequence[int], start: Tensor, device: torch.device | str
) -> LogitsProcessorList:
    """The chain for rows that share ``sampling`` (see the module docs)."""
    procs: list[LogitsProcessor] = []
    if not sampling.greedy and sampling.temperature != 1:
        procs.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.freq_penalty:
        procs.append(FrequencyPenaltyLogitsProcessor(sampling.freq_penalty, start))
    if not sampling.greedy:
        if sampling.top_k:
            procs.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1:
            procs.append(TopPLogitsWarper(sampling.top_p))
        procs.append(RowSeededSampler(seeds, device))
    return LogitsProcessorList(procs)


class RowGroups(LogitsProcessor):
    """Each group of rows through its own processors (row-wise, so independent of the batch)."""

    def __init__(self, groups: list[tuple[Tensor, LogitsProcessorList]]) -> None:
        self.groups = groups

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        out = scores.clone()  # [B, V]
        for idx, procs in self.groups:
            if len(procs):
                out[idx] = procs(input_ids[idx], scores[idx]).to(out.dtype)  # type: ignore[arg-type]
        return out


def row_processors(
    sampling: Sequence[Sampling], seeds: Sequence[int], start: Tensor, device: torch.device | str
) -> LogitsProcessorList:
    """Logits processors for a batch whose row ``b`` samples with ``sampling[b]`` and
    ``seeds[b]``; ``start[b]`` is its first real token (left padding).

    Rows that share settings share one chain; when all do, it is applied to the whole batch.
    """
    if not len(sampling) == len(seeds) == len(start):
        raise ActAddError(f"{len(sampling)} settings, {len(seeds)} seeds, {len(start)} rows")
    groups: dict[tuple[float, float, int, float], list[int]] = {}
    for b, s in enumerate(sampling):
        groups.setdefault(s.key(), []).append(b)
    if len(groups) == 1:
        return _processors(sampling[0], seeds, start, device)
    out = []
    for members in groups.values():
        idx = torch.tensor(members, device=start.device)
        chain = _processors(sampling[members[0]], [seeds[b] for b in members], start[idx], device)
        out.append((idx, chain))
    return LogitsProcessorList([RowGroups(out)])


def row_seeds(seed: int | None, n: int) -> list[int]:
    """Row ``i`` samples with ``seed + i``; ``None`` draws a base from torch's global RNG (so
    ``torch.manual_seed`` makes runs repeatable)."""
    if seed is None:
        return [int(x) for x in torch.randint(0, 2**31 - 1, (n,))]
    return [int(seed) + i for i in range(n)]
