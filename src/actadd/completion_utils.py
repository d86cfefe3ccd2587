"""Migration from ``activation_additions``: its ``completion_utils`` names and signatures.

Change ``activation_additions.completion_utils`` to ``actadd.completion_utils`` and calls keep
their meaning, including positional arguments in the original order
(``print_n_comparisons(prompt, model, num_comparisons, ...)``, where ``actadd``'s own puts
``tokens_to_generate`` third). What differs:

* sampling is per row and seeded (``seed + i`` for row ``i``) instead of reseeding torch's
  global RNG; the global RNG is left untouched, as the original's ``preserve_rng_state`` did;
* ``log=True`` (Weights & Biases logging) is not supported: it raises; log the returned frame;
* ``include_logits=True`` adds a ``logits`` column: the steered logits of each completion's
  tokens (``[new tokens, vocabulary]`` per row, as nested lists, like the original);
* ``remove_EOS`` is accepted and ignored: actadd's additions never carry an end-of-text token
  unless you put one there (the original stripped the BOS/EOS TransformerLens prepends);
* ``addition_location`` takes actadd's names (``front``, ``mid``, ``back``, ``all``); the
  original's integer ``0`` means ``front``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from actadd.display import show_comparison
from actadd.errors import ActAddError
from actadd.generation import comparison_table
from actadd.generation import gen_using_activation_additions as _generate
from actadd.model import LM
from actadd.sampling import row_seeds
from actadd.steering import as_rows, steer

__all__ = [
    "gen_using_activation_additions",
    "gen_using_model",
    "pretty_print_completions",
    "print_n_comparisons",
]

_SAMPLING = ("tokens_to_generate", "seed", "temperature", "freq_penalty", "top_p", "top_k")


def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(kwargs) - set(_SAMPLING))
    if unknown:
        raise ActAddError(
            f"unsupported keyword(s) {unknown}: actadd's generation takes {', '.join(_SAMPLING)}"
        )
    return kwargs


def _location(addition_location: Any) -> str | None:
    if addition_location == 0:
        return "front"
    if addition_location is None or isinstance(addition_location, str):
        return addition_location
    raise ActAddError(
        f"addition_location={addition_location!r}: use 'front', 'mid', 'back' or 'all'"
    )


def _no_logging(log: Any) -> None:
    if log:
        raise ActAddError(
            "log=True (Weights & Biases logging) is not supported: log the returned DataFrame"
        )


@torch.no_grad()
def _with_logits(model: LM, df: pd.DataFrame, additions: Any, location: str | None) -> pd.Series:
    """The logits of each completion's tokens under the steering it was written with."""
    out = []
    for prompt, completion, adds in zip(df.prompts, df.completions, additions, strict=True):
        n_prompt = len(model.token_ids(prompt))
        ids = torch.tensor([model.token_ids(prompt + completion)], device=model.device)
        with steer(model, adds, addition_location=location):
            logits = model.model(ids).logits[0, n_prompt - 1 : -1]
        out.append(logits.float().cpu().tolist())
    return pd.Series(out, index=df.index)


def gen_using_activation_additions(
    model: LM,
    activation_additions: Any,
    log: bool | dict[str, Any] = False,
    addition_location: Any = "front",
    res_stream_slice: slice = slice(None),
    remove_EOS: bool = False,
    *,
    prompt_batch: list[str] | str,
    include_logits: bool = False,
    **kwargs: Any,
) -> pd.DataFrame:
    """The original's call: completions of ``prompt_batch`` under ``activation_additions``."""
    _no_logging(log)
    location = _location(addition_location)
    df = _generate(
        model,
        activation_additions,
        prompt_batch,
        addition_location=location,
        res_stream_slice=res_stream_slice,
        **_options(kwargs),
    )
    if include_logits:
        prompts = [prompt_batch] if isinstance(prompt_batch, str) else list(prompt_batch)
        rows, _ = as_rows(activation_additions, len(prompts))
        df["logits"] = _with_logits(model, df, rows, location)
    return df


def gen_using_model(
    model: LM,
    prompt_batch: list[str] | str,
    tokens_to_generate: int = 40,
    seed: int | None = None,
    include_logits: bool = False,
    log: bool | dict[str, Any] = False,
    **kwargs: Any,
) -> pd.DataFrame:
    """Unsteered completions, as the original's ``gen_using_model``."""
    return gen_using_activation_additions(
        model,
        [],
        log,
        prompt_batch=prompt_batch,
        include_logits=include_logits,
        tokens_to_generate=tokens_to_generate,
        seed=seed,
        **kwargs,
    )


def pretty_print_completions(results: pd.DataFrame, *, prompt: str | None = None) -> None:
    """Unsteered and steered completions side by side (``is_modified`` tells them apart)."""
    shown = prompt if prompt is not None else str(results["prompts"].iloc[0])
    show_comparison(comparison_table(results), shown)


def print_n_comparisons(
    prompt: str,
    model: LM,
    num_comparisons: int = 5,
    log: bool | dict[str, Any] = False,
    activation_additions: Any = None,
    addition_location: Any = "front",
    res_stream_slice: slice = slice(None),
    remove_EOS: bool = False,
    **kwargs: Any,
) -> None:
    """The original's signature: ``num_comparisons`` is the third argument."""
    _no_logging(log)
    options = _options(kwargs)
    seeds = row_seeds(options.pop("seed", None), num_comparisons)
    adds = as_rows(activation_additions, 1)[0][0]
    df = _generate(
        model,
        [[]] * num_comparisons + [adds] * num_comparisons,
        [prompt] * (2 * num_comparisons),
        seeds=seeds + seeds,
        addition_location=_location(addition_location),
        res_stream_slice=res_stream_slice,
        **options,
    )
    pretty_print_completions(df, prompt=prompt)
