"""Steered generation with the original library's names, as one batched ``generate`` call.

Each row of the batch carries its own additions (or none) and its own seed, and samples from
its own random stream (``actadd.sampling``), so a row's completion never depends on the rest
of its batch; steered and unsteered rows with the same seed share their noise.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec

import pandas as pd
import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessor

from actadd import progress
from actadd.errors import ActAddError
from actadd.model import LM, as_lm
from actadd.prompts import Encoded, encode_prompts
from actadd.sampling import LossRecorder, Sampling, row_processors, row_seeds
from actadd.steering import as_rows, steer

__all__ = ["compare", "comparison_table", "gen_using_activation_additions", "print_n_comparisons"]

log = logging.getLogger(__name__)

P = ParamSpec("P")


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
    top_k: int = 0,
    freq_penalty: float = 0.0,
    addition_location: str | None = None,
    res_stream_slice: slice = slice(None),
    batch_size: int | None = None,
    chat: bool = False,
) -> pd.DataFrame:
    """Generate one completion per prompt under the additions, in batched ``generate`` calls.

    Args:
        model: the ``LM``.
        activation_additions: additions shared by every prompt, or one list per prompt (each
            row steered by its own list; an empty list leaves that row unsteered).
        prompt_batch: a prompt or a list of prompts; a prompt may also be a chat (a list of
            ``{"role", "content"}`` messages).
        tokens_to_generate: new tokens per completion.
        seed: row ``i`` samples with seed ``seed + i``; ``seeds`` gives them explicitly.
        temperature: 0 is greedy.
        top_p, top_k, freq_penalty: nucleus, top-k (0: off) and the OpenAI-style frequency
            penalty; the original library's house settings are ``freq_penalty=1, top_p=0.3``.
        addition_location: ``front``, ``mid``, ``back`` or ``all`` (see ``steer``); default:
            each addition's own (``front`` for prompt additions, ``all`` for vectors).
        res_stream_slice: see ``steer``.
        batch_size: rows per ``generate`` call (default all); results do not depend on it.
        chat: each string prompt is a user message, rendered with the model's chat template.
            In a chat, additions land on the last user message's text, not on the
            template's tokens (``all`` covers that text and every generated token).

    Returns:
        A DataFrame with columns ``prompts``, ``completions``, ``is_modified``, ``loss`` (mean
        negative log-likelihood of the completion under the model that wrote it) and ``seed``.

    Example:
        >>> lm = actadd.load_model()  # doctest: +SKIP
        >>> df = gen_using_activation_additions(
        ...     lm, get_x_vector("Love", "Hate", 5, 6), ["I hate you because"] * 3,
        ...     seed=0, freq_penalty=1, top_p=0.3)  # doctest: +SKIP
    """
    lm = as_lm(model)
    prompts = encode_prompts(lm, prompt_batch, chat=chat)
    if tokens_to_generate < 1:
        raise ActAddError(f"tokens_to_generate must be >= 1, got {tokens_to_generate}")
    sampling = Sampling(temperature, top_p, top_k, freq_penalty)
    adds, _ = as_rows(activation_additions, len(prompts))
    seed_list = list(seeds) if seeds is not None else row_seeds(seed, len(prompts))
    if len(seed_list) != len(prompts):
        raise ActAddError(f"{len(seed_list)} seeds for {len(prompts)} prompts")
    step = batch_size or len(prompts)
    frames = []
    for lo in range(0, len(prompts), step):
        sl = slice(lo, lo + step)
        reporter = _StepReporter(lo, len(prompts), tokens_to_generate)
        frames.append(
            _generate_chunk(
                lm,
                adds[sl],
                prompts[sl],
                seed_list[sl],
                tokens_to_generate=tokens_to_generate,
                sampling=sampling,
                addition_location=addition_location,
                res_stream_slice=res_stream_slice,
                reporter=reporter if progress.active() else None,
            )
        )
    progress.report(
        "generating", len(prompts) * tokens_to_generate, len(prompts) * tokens_to_generate
    )
    return pd.concat(frames, ignore_index=True)


class _StepReporter(LogitsProcessor):
    """Reports generated tokens (rows × steps) as a batch decodes."""

    def __init__(self, rows_before: int, rows: int, tokens: int) -> None:
        self.rows_before, self.rows, self.tokens, self.step = rows_before, rows, tokens, 0

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        done = self.rows_before * self.tokens + self.step * input_ids.shape[0]
        progress.report("generating", done, self.rows * self.tokens)
        self.step += 1
        return scores


@torch.no_grad()
def _generate_chunk(
    lm: LM,
    adds: list[list[Any]],
    prompts: list[Encoded],
    seeds: list[int],
    *,
    tokens_to_generate: int,
    sampling: Sampling,
    addition_location: str | None,
    res_stream_slice: slice,
    reporter: LogitsProcessor | None = None,
) -> pd.DataFrame:
    input_ids, mask = lm.pad([p.ids for p in prompts])
    start = (mask == 0).sum(-1)  # [B] first real token (left padding)
    recorder = LossRecorder()
    procs = row_processors([sampling] * len(prompts), seeds, start, lm.device)
    procs.insert(0, recorder)
    if reporter is not None:
        procs.append(reporter)
    config = GenerationConfig(
        max_new_tokens=tokens_to_generate,
        do_sample=False,  # sampling happens in RowSeededSampler
        pad_token_id=lm.pad_token_id,
        eos_token_id=lm.tokenizer.eos_token_id,
    )
    shared = all(a is adds[0] for a in adds)
    spans = [p.span for p in prompts]
    with steer(
        lm,
        adds[0] if shared else adds,
        addition_location=addition_location,
        spans=None if all(s is None for s in spans) else spans,
        res_stream_slice=res_stream_slice,
    ):
        out = lm.model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=mask,
            generation_config=config,
            logits_processor=procs,
        )
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
            "prompts": [p.shown for p in prompts],
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
    top_k: int = 0,
    addition_location: str | None = None,
    res_stream_slice: slice = slice(None),
    chat: bool = False,
) -> pd.DataFrame:
    """``num_comparisons`` unsteered and steered completions, paired by seed, in one batch
    (``chat``: the prompt is a user message; see ``gen_using_activation_additions``)."""
    (adds,), _ = as_rows(activation_additions, 1)
    if not adds:
        raise ActAddError("compare needs at least one addition (e.g. get_x_vector(...))")
    seeds = row_seeds(seed, num_comparisons)
    return gen_using_activation_additions(
        model,
        [[]] * num_comparisons + [adds] * num_comparisons,
        [prompt] * (2 * num_comparisons),
        tokens_to_generate=tokens_to_generate,
        seeds=seeds + seeds,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        freq_penalty=freq_penalty,
        addition_location=addition_location,
        res_stream_slice=res_stream_slice,
        chat=chat,
    )


def comparison_table(df: pd.DataFrame) -> pd.DataFrame:
    """Side by side: one row per seed, unsteered and steered completion."""
    normal = df[~df.is_modified].set_index("seed").completions
    steered = df[df.is_modified].set_index("seed").completions
    return pd.DataFrame({"unsteered": normal, "steered": steered}).reset_index(drop=True)


def _shown(fn: Callable[P, pd.DataFrame], name: str, doc: str) -> Callable[P, None]:
    """``fn`` (same arguments), then its completions shown side by side under the prompt."""

    @functools.wraps(fn)
    def show(*args: P.args, **kwargs: P.kwargs) -> None:
        from actadd.display import show_comparison

        prompt = inspect.signature(fn).bind(*args, **kwargs).arguments["prompt"]
        show_comparison(comparison_table(fn(*args, **kwargs)), prompt)

    show.__name__ = show.__qualname__ = name
    show.__doc__ = doc
    show.__signature__ = inspect.signature(fn).replace(return_annotation=None)  # type: ignore[attr-defined]
    return show


print_n_comparisons = _shown(
    compare,
    "print_n_comparisons",
    """Show ``compare``'s unsteered and steered completions side by side (HTML in notebooks,
    a rich table elsewhere); the arguments are ``compare``'s (the original library's order).

    Example:
        >>> print_n_comparisons("I hate you because", lm, 40, get_x_vector("Love", "Hate", 5, 6),
        ...                     num_comparisons=3, seed=0)  # doctest: +SKIP
    """,
)
