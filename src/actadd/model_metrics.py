"""Metrics that need the model: what steering costs it, and how it moves its predictions.

* ``text_loss`` / ``perplexity_ratio``: loss of texts under the unsteered and the steered model,
  with the positions where the addition was injected masked out;
* ``logit_shift`` / ``next_token_kl``: KL(unsteered ‖ steered) of the next-token distribution,
  and the original library's *effectiveness* and *disruption*.

Masking, as in the original library: an addition of ``L`` tokens at ``front`` writes directly
into prompt positions ``[0, L)``, so the predictions *made at* those positions (of tokens
``1..L``) say little about the model's capability; they are left out of the loss of both the
steered and the unsteered model, so the two stay comparable. ``mid``/``back`` mask their own
span; ``all`` steers every position and masks nothing.

Texts are right-padded (``lm.pad(..., side="right")``): a causal model's real tokens never see
the pads after them, so a text's scores do not depend on its batch. That is also why a corpus
can be scored in slices on a Ray cluster (``ray=``, ``actadd.sharding``): each worker scores
its slice with its own model replica, and the results are the local ones.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from actadd.errors import ActAddError, PromptError
from actadd.model import LM, as_lm
from actadd.steering import as_rows, injected, resolve, steer
from actadd.texts import TextData, texts_of

if TYPE_CHECKING:
    from actadd.executor import RayExecutor

__all__ = [
    "aligned_token_ids",
    "corpus_perplexity_ratio",
    "get_loss_metric",
    "logit_shift",
    "next_token_kl",
    "perplexity_ratio",
    "text_loss",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Scoring:
    """How texts are steered and batched for scoring."""

    location: str | None
    dims: slice
    batch_size: int


@dataclass
class _Batch:
    """One right-padded forward batch: unsteered and steered log-probs and bookkeeping."""

    rows: list[int]  # indices into the caller's texts
    ids: Tensor  # [B, T]
    real: Tensor  # [B, T] bool
    injected: Tensor  # [B, T] bool: position written by the addition
    masked: Tensor  # [B, T] bool: written by a positional addition (its predictions skipped)
    logp_u: Tensor | None  # [B, T, V] unsteered
    logp_s: Tensor | None  # [B, T, V] steered

    @property
    def keep(self) -> Tensor:
        """``[B, T-1]``: predictions that count (of a real token, not made at an injection)."""
        return (self.real[:, 1:] & ~self.masked[:, :-1]).float()


@torch.no_grad()
def _batches(
    lm: LM,
    texts: list[str],
    rows: list[list[Any]],
    how: _Scoring,
    *,
    steered: bool,
    unsteered: bool,
    mask_rows: list[list[Any]] | None = None,
) -> Iterator[_Batch]:
    """Score ``texts`` in batches, unsteered and/or steered by their row's additions."""
    lm = as_lm(lm)
    if how.batch_size < 1:
        raise ActAddError(f"batch_size must be >= 1, got {how.batch_size}")
    toks = [lm.token_ids(t) for t in texts]
    writes, masked = [], []  # per text: positions written, and those masked for the loss
    for i, (t, inj) in enumerate(zip(toks, resolve(lm, mask_rows or rows), strict=True)):
        try:
            writes.append(injected(inj, len(t), how.location))
            masked.append(injected(inj, len(t), how.location, include_all=False))
        except PromptError as e:
            raise PromptError(f"text {i}: {e}") from e
    for lo in range(0, len(texts), how.batch_size):
        idx = list(range(lo, min(lo + how.batch_size, len(texts))))
        ids, mask = lm.pad([toks[i] for i in idx], side="right")
        real = mask.bool().cpu()
        written, skip = torch.zeros_like(real), torch.zeros_like(real)
        for b, i in enumerate(idx):
            written[b, : len(toks[i])] = writes[i]
            skip[b, : len(toks[i])] = masked[i]

        def run(adds: list[list[Any]], ids: Tensor = ids, mask: Tensor = mask) -> Tensor:
            with steer(lm, adds, addition_location=how.location, res_stream_slice=how.dims):
                logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            return torch.log_softmax(logits.float(), -1).cpu()  # [B, T, V]

        logp_u = run([[] for _ in idx]) if unsteered else None
        logp_s = run([rows[i] for i in idx]) if steered else None
        yield _Batch(idx, ids.cpu(), real, written, skip, logp_u, logp_s)


def _token_nll(logp: Tensor, ids: Tensor) -> Tensor:
    """``[B, T-1]``: -log p(token t+1 | ..t), the prediction made at position t."""
    return -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


def _row_means(nll: Tensor, keep: Tensor) -> tuple[list[float], list[int]]:
    """Per row: the mean of ``nll`` over the kept predictions (NaN if none), and their count."""
    counts = keep.sum(-1)
    means = (nll * keep).sum(-1) / counts.clamp_min(1)
    return [m if c else math.nan for m, c in zip(means.tolist(), counts.tolist(), strict=True)], [
        int(c) for c in counts.tolist()
    ]


def text_loss(
    lm: LM,
    data: TextData,
    activation_additions: Any = None,
    *,
    mask_additions: Any = None,
    column: str | None = None,
    addition_location: str | None = None,
    res_stream_slice: slice = slice(None),
    batch_size: int = 16,
    ray: str | RayExecutor | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
) -> pd.DataFrame:
    """Mean per-token loss (nats) and perplexity of each text under the model, steered by
    ``activation_additions`` if given.

    Predictions made at positions the addition was injected into are masked (see module
    docs). To get the *unsteered* loss on the same tokens, pass the additions as
    ``mask_additions`` instead; ``perplexity_ratio`` does both in one call.

    Args:
        lm: the model.
        data: texts (see ``actadd.texts``); each is tokenized like a prompt (``lm.token_ids``).
        activation_additions: additions shared by all texts, one list per text, or None.
        mask_additions: additions whose injected positions to mask (default: the above).
        addition_location, res_stream_slice: as in ``actadd.steer``.
        batch_size: texts per forward pass.
        ray, workers: score the corpus on a Ray cluster in slices of ``chunk_size`` texts
            (default 64), as ``sweep_over_prompts`` does; same results.

    Returns:
        Columns ``loss``, ``perplexity`` (``exp(loss)``) and ``n_tokens`` (predictions counted).

    Example:
        >>> text_loss(lm, ["The bride wore white."], get_x_vector(" wedding", " ", 2, 8))
        ... # doctest: +SKIP
    """
    texts, index = texts_of(data, column)
    steered = activation_additions is not None
    rows, _ = as_rows(activation_additions, len(texts))
    masks = rows if mask_additions is None else as_rows(mask_additions, len(texts))[0]
    if ray is not None:
        parts = _sharded(
            lm,
            _text_loss_slice,
            list(zip(texts, rows, masks, strict=True)),
            ray,
            workers,
            chunk_size,
            steered=steered,
            addition_location=addition_location,
            res_stream_slice=res_stream_slice,
            batch_size=batch_size,
        )
        return _joined(parts, index)
    loss = np.full(len(texts), np.nan)
    count = np.zeros(len(texts), dtype=int)
    how = _Scoring(addition_location, res_stream_slice, batch_size)
    scored = _batches(lm, texts, rows, how, steered=steered, unsteered=not steered, mask_rows=masks)
    for b in scored:
        logp = b.logp_s if steered else b.logp_u
        assert logp is not None
        loss[b.rows], count[b.rows] = _row_means(_token_nll(logp, b.ids), b.keep)
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
    addition_location: str | None = None,
    res_stream_slice: slice = slice(None),
    batch_size: int = 16,
    ray: str | RayExecutor | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
) -> pd.DataFrame:
    """Loss of each text under the unsteered and the steered model on the same tokens, and the
    perplexity ratio steered / unsteered (< 1: the steering makes the text more likely).

    ``activation_additions`` may be one list per text, so many configurations are scored in
    one batched pass (repeat the texts once per configuration). ``ray``, ``workers`` and
    ``chunk_size`` score the corpus on a Ray cluster, as in ``text_loss``.

    Returns:
        Columns ``loss_unsteered``, ``loss_steered``, ``n_tokens``, ``ratio``. For a whole
        corpus use ``corpus_perplexity_ratio`` (token-weighted).

    Example:
        >>> perplexity_ratio(lm, ["The bride wore white."], get_x_vector(" wedding", " ", 1, 8))
        ... # doctest: +SKIP
    """
    texts, index = texts_of(data, column)
    rows, _ = as_rows(activation_additions, len(texts))
    if ray is not None:
        parts = _sharded(
            lm,
            _ratio_slice,
            list(zip(texts, rows, strict=True)),
            ray,
            workers,
            chunk_size,
            addition_location=addition_location,
            res_stream_slice=res_stream_slice,
            batch_size=batch_size,
        )
        return _joined(parts, index)
    lu, ls = np.full(len(texts), np.nan), np.full(len(texts), np.nan)
    count = np.zeros(len(texts), dtype=int)
    how = _Scoring(addition_location, res_stream_slice, batch_size)
    for b in _batches(lm, texts, rows, how, steered=True, unsteered=True):
        assert b.logp_u is not None and b.logp_s is not None
        lu[b.rows], _ = _row_means(_token_nll(b.logp_u, b.ids), b.keep)
        ls[b.rows], count[b.rows] = _row_means(_token_nll(b.logp_s, b.ids), b.keep)
    return pd.DataFrame(
        {"loss_unsteered": lu, "loss_steered": ls, "n_tokens": count, "ratio": np.exp(ls - lu)},
        index=index,
    )


def _sharded(
    lm: LM,
    fn: Any,
    items: list[Any],
    ray: str | RayExecutor,
    workers: int | None,
    chunk_size: int | None,
    **kwargs: Any,
) -> list[pd.DataFrame]:
    from actadd.sharding import map_slices

    return map_slices(
        as_lm(lm),
        fn,
        items,
        ray=ray,
        workers=workers,
        chunk_size=chunk_size,
        task="scoring texts",
        **kwargs,
    )


def _joined(parts: list[pd.DataFrame], index: pd.Index) -> pd.DataFrame:
    out = pd.concat(parts, ignore_index=True)
    out.index = index
    return out


def _text_loss_slice(lm: LM, items: list[Any], *, steered: bool, **kwargs: Any) -> pd.DataFrame:
    """On a worker: ``text_loss`` of (text, additions, mask additions) items."""
    texts = [t for t, _, _ in items]
    rows = [list(r) for _, r, _ in items] if steered else None
    return text_loss(lm, texts, rows, mask_additions=[list(m) for _, _, m in items], **kwargs)


def _ratio_slice(lm: LM, items: list[Any], **kwargs: Any) -> pd.DataFrame:
    """On a worker: ``perplexity_ratio`` of (text, additions) items."""
    return perplexity_ratio(lm, [t for t, _ in items], [list(r) for _, r in items], **kwargs)


def _shift_slice(lm: LM, items: list[Any], **kwargs: Any) -> pd.DataFrame:
    """On a worker: ``logit_shift`` of (input row, text, additions) items, with each record's
    ``row`` the input's."""
    out = logit_shift(lm, [t for _, t, _ in items], [list(r) for _, _, r in items], **kwargs)
    out["row"] = [items[i][0] for i in out["row"]]
    return out.reset_index(drop=True)


def get_loss_metric(lm: LM, *, batch_size: int = 16) -> Any:
    """Mean per-token loss of each text under the *unsteered* model (a fluency measure for
    completions: steering that breaks the model makes its text improbable to the clean one)."""

    def metric(data: TextData) -> pd.Series:
        return text_loss(lm, data, batch_size=batch_size)["loss"]

    return metric


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
    addition_location: str | None = None,
    res_stream_slice: slice = slice(None),
    batch_size: int = 8,
    ray: str | RayExecutor | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
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
        ray, workers, chunk_size: on a Ray cluster, as in ``text_loss``.

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
    texts, index = texts_of(data, column)
    rows, _ = as_rows(activation_additions, len(texts))
    if ray is not None:
        items = [(i, t, r) for i, (t, r) in enumerate(zip(texts, rows, strict=True))]
        parts = _sharded(
            lm,
            _shift_slice,
            items,
            ray,
            workers,
            chunk_size,
            aligned_tokens=aligned_tokens,
            positions=positions,
            addition_location=addition_location,
            res_stream_slice=res_stream_slice,
            batch_size=batch_size,
        )
        shifted = pd.concat(parts, ignore_index=True)
        if positions == "last":
            shifted.index = index
        return shifted
    aligned = None
    if aligned_tokens is not None:
        ids = sorted({int(t) for t in aligned_tokens})
        lm.check_token_ids(ids)
        if not ids:
            raise ActAddError("aligned_tokens is empty")
    records: list[dict[str, Any]] = []
    how = _Scoring(addition_location, res_stream_slice, batch_size)
    for b in _batches(lm, texts, rows, how, steered=True, unsteered=True):
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


def next_token_kl(
    lm: LM,
    data: TextData,
    activation_additions: Any,
    *,
    column: str | None = None,
    addition_location: str | None = None,
    res_stream_slice: slice = slice(None),
    batch_size: int = 8,
    ray: str | RayExecutor | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
) -> pd.Series:
    """KL(unsteered ‖ steered) of the next-token distribution after each text (nats); see
    ``logit_shift`` for the options and for every position.

    Example:
        >>> next_token_kl(lm, ["I hate you because"], get_x_vector("Love", "Hate", 5, 6))
        ... # doctest: +SKIP
    """
    shift = logit_shift(
        lm,
        data,
        activation_additions,
        positions="last",
        column=column,
        addition_location=addition_location,
        res_stream_slice=res_stream_slice,
        batch_size=batch_size,
        ray=ray,
        workers=workers,
        chunk_size=chunk_size,
    )
    return shift["kl"]
