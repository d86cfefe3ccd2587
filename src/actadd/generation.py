"""Steered generation with the original library's names, as one batched ``generate`` call.

Sampling is done per row: each row has its own seed and its own random stream (Gumbel-max
over the processed logits), so a row's completion depends only on its prompt, its additions
and its seed, never on what else is in the batch or on the batch size. Steered and unsteered
rows with the same seed share their noise (paired sampling).

Processing order follows TransformerLens, which the original library used: temperature, then
the OpenAI-style frequency penalty (``logit -= freq_penalty × count``, counting prompt and
generated tokens), then top-p.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from actadd.errors import ActAddError, PromptError
from actadd.hooks import steer
from actadd.model import LM

__all__ = [
    "FrequencyPenaltyLogitsProcessor",
    "RowSeededSampler",
    "compare",
    "gen_using_activation_additions",
    "print_n_comparisons",
    "sampling_processors",
]

log = logging.getLogger(__name__)


class FrequencyPenaltyLogitsProcessor(LogitsProcessor):
    """OpenAI-style frequency penalty: subtract ``penalty × count(token)`` from each logit.

    ``start[b]`` is the first real token of row ``b`` (left padding is not counted).
    """

    def __init__(self, penalty: float, start: Tensor) -> None:
        self.penalty = float(penalty)
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

    def __init__(self, seeds: Sequence[int], device: torch.device) -> None:
        self.generators = []
        for s in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(int(s))
            self.generators.append(g)
        self._u: Tensor | None = None  # [B, V] float64 and float32 buffers, reused every step
        self._e: Tensor | None = None

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


class _LossRecorder(LogitsProcessor):
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


def sampling_processors(
    *,
    seeds: Sequence[int] | None,
    temperature: float,
    top_p: float,
    freq_penalty: float,
    start: Tensor,
    device: torch.device,
) -> LogitsProcessorList:
    """The processors for actadd's sampling (see module docs); ``temperature=0`` is greedy."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ActAddError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    procs: list[LogitsProcessor] = []
    if temperature > 0 and temperature != 1:
        procs.append(TemperatureLogitsWarper(temperature))
    if freq_penalty:
        procs.append(FrequencyPenaltyLogitsProcessor(freq_penalty, start))
    if temperature > 0:
        if top_p < 1:
            procs.append(TopPLogitsWarper(top_p))
        if seeds is None:
            raise ActAddError("sampling needs seeds")
        procs.append(RowSeededSampler(seeds, device))
    return LogitsProcessorList(procs)


def _row_seeds(seed: int | None, n: int) -> list[int]:
    if seed is None:  # draw from torch's global RNG so torch.manual_seed() makes runs repeatable
        return [int(x) for x in torch.randint(0, 2**31 - 1, (n,))]
    return [int(seed) + i for i in range(n)]


def gen_using_activation_additions(
    model: LM,
    activation_additions: Any,
    prompt_batch: str | Sequence[str],
    *,
    tokens_to_generate: int = 40,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    freq_penalty: float = 0.0,
    addition_location: str = "front",
    res_stream_slice: slice = slice(None),
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Generate one completion per prompt under the additions, in batched ``generate`` calls.

    Args:
        model: the ``LM``.
        activation_additions: additions shared by every prompt, or one list per prompt (each
            row steered by its own list; an empty list leaves that row unsteered).
        prompt_batch: a prompt or a list of prompts.
        tokens_to_generate: new tokens per completion.
        seed: row ``i`` samples with seed ``seed + i``; ``seeds`` gives them explicitly.
        temperature: 0 is greedy.
        top_p, freq_penalty: as in the original library (``freq_penalty=1, top_p=0.3``).
        addition_location, res_stream_slice: see ``steer``.
        batch_size: rows per ``generate`` call (default all); results do not depend on it.

    Returns:
        A DataFrame with columns ``prompts``, ``completions``, ``is_modified``, ``loss`` (mean
        negative log-likelihood of the completion under the model that wrote it) and ``seed``.

    Example:
        >>> lm = actadd.load_model()  # doctest: +SKIP
        >>> df = gen_using_activation_additions(
        ...     lm, get_x_vector("Love", "Hate", 5, 6), ["I hate you because"] * 3,
        ...     seed=0, freq_penalty=1, top_p=0.3)  # doctest: +SKIP
    """
    prompts = [prompt_batch] if isinstance(prompt_batch, str) else list(prompt_batch)
    if not prompts:
        raise PromptError("prompt_batch is empty")
    if any(not isinstance(p, str) or not p for p in prompts):
        raise PromptError("every prompt must be a non-empty string")
    if tokens_to_generate < 1:
        raise ActAddError(f"tokens_to_generate must be >= 1, got {tokens_to_generate}")
    adds = _per_row(activation_additions, len(prompts))
    row_seeds = list(seeds) if seeds is not None else _row_seeds(seed, len(prompts))
    if len(row_seeds) != len(prompts):
        raise ActAddError(f"{len(row_seeds)} seeds for {len(prompts)} prompts")
    step = batch_size or len(prompts)
    frames = []
    for lo in range(0, len(prompts), step):
        sl = slice(lo, lo + step)
        frames.append(
            _generate_chunk(
                model, adds[sl], prompts[sl], row_seeds[sl],
                tokens_to_generate=tokens_to_generate, temperature=temperature, top_p=top_p,
                freq_penalty=freq_penalty, addition_location=addition_location,
                res_stream_slice=res_stream_slice,
            )
        )  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def _per_row(additions: Any, n: int) -> list[list[Any]]:
    if additions is None:
        return [[] for _ in range(n)]
    items = list(additions) if isinstance(additions, (list, tuple)) else [additions]
    if items and all(isinstance(a, (list, tuple)) for a in items):
        if len(items) != n:
            raise ActAddError(f"{len(items)} lists of additions for {n} prompts: give one each")
        return [list(a) for a in items]
    return [items for _ in range(n)]


@torch.no_grad()
def _generate_chunk(
    lm: LM,
    adds: list[list[Any]],
    prompts: list[str],
    seeds: list[int],
    *,
    tokens_to_generate: int,
    temperature: float,
    top_p: float,
    freq_penalty: float,
    addition_location: str,
    res_stream_slice: slice,
) -> pd.DataFrame:
    input_ids, mask = lm.batch_tokens(prompts)
    start = (mask == 0).sum(-1)  # [B] first real token (left padding)
    recorder = _LossRecorder()
    procs = sampling_processors(
        seeds=seeds if temperature > 0 else None, temperature=temperature, top_p=top_p,
        freq_penalty=freq_penalty, start=start, device=lm.device,
    )  # fmt: skip
    procs.insert(0, recorder)
    config = GenerationConfig(
        max_new_tokens=tokens_to_generate,
        do_sample=False,  # sampling happens in RowSeededSampler
        pad_token_id=lm.pad_token_id,
        eos_token_id=lm.tokenizer.eos_token_id,
    )
    shared = all(a is adds[0] for a in adds)
    with steer(
        lm, adds[0] if shared else adds,
        addition_location=addition_location, res_stream_slice=res_stream_slice,
    ):  # fmt: skip
        out = lm.model.generate(  # type: ignore[operator]
            input_ids=input_ids, attention_mask=mask, generation_config=config,
            logits_processor=procs,
        )  # fmt: skip
    new = out[:, input_ids.shape[1] :]  # [B, new]
    logprobs = recorder.finish(new[:, -1])[:, : new.shape[1]]
    # tokens after the first EOS are padding
    eos = lm.tokenizer.eos_token_id
    is_eos = (new == eos) if eos is not None else torch.zeros_like(new, dtype=torch.bool)
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    keep = (~after).float()
    loss = -(logprobs * keep).sum(1) / keep.sum(1).clamp_min(1)
    completions = [
        lm.tokenizer.decode(row[~a], skip_special_tokens=True)
        for row, a in zip(new, after, strict=True)
    ]
    return pd.DataFrame(
        {
            "prompts": prompts,
            "completions": completions,
            "is_modified": [bool(a) for a in adds],
            "loss": loss.tolist(),
            "seed": seeds,
        }
    )


def compare(
    prompt: str,
    model: LM,
    tokens_to_generate: int = 40,
    activation_additions: Any = None,
    num_comparisons: int = 5,
    seed: int | None = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    top_p: float = 1.0,
    *,
    addition_location: str = "front",
    res_stream_slice: slice = slice(None),
) -> pd.DataFrame:
    """``num_comparisons`` unsteered and steered completions, paired by seed, in one batch."""
    adds = list(activation_additions or [])
    if not adds:
        raise ActAddError("compare needs at least one addition (e.g. get_x_vector(...))")
    seeds = _row_seeds(seed, num_comparisons)
    return gen_using_activation_additions(
        model, [[]] * num_comparisons + [adds] * num_comparisons, [prompt] * (2 * num_comparisons),
        tokens_to_generate=tokens_to_generate, seeds=seeds + seeds, temperature=temperature,
        top_p=top_p, freq_penalty=freq_penalty, addition_location=addition_location,
        res_stream_slice=res_stream_slice,
    )  # fmt: skip


def comparison_table(df: pd.DataFrame) -> pd.DataFrame:
    """Side by side: one row per seed, unsteered and steered completion."""
    normal = df[~df.is_modified].set_index("seed").completions
    steered = df[df.is_modified].set_index("seed").completions
    return pd.DataFrame({"unsteered": normal, "steered": steered}).reset_index(drop=True)


def print_n_comparisons(
    prompt: str,
    model: LM,
    tokens_to_generate: int = 40,
    activation_additions: Any = None,
    num_comparisons: int = 5,
    seed: int | None = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    top_p: float = 1.0,
    **kwargs: Any,
) -> None:
    """Show steered and unsteered completions side by side (HTML in notebooks, else rich)."""
    df = compare(
        prompt, model, tokens_to_generate, activation_additions, num_comparisons, seed,
        temperature, freq_penalty, top_p, **kwargs,
    )  # fmt: skip
    table = comparison_table(df)
    if _in_notebook():
        from IPython.display import HTML, display

        display(HTML(f"<p><b>{prompt}</b>…</p>" + table.to_html(index=False)))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"[bold]{prompt}[/]…", show_lines=True)
    t.add_column("unsteered")
    t.add_column("steered")
    for a, b in zip(table.unsteered, table.steered, strict=True):
        t.add_row(a, b)
    Console().print(t)


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"
