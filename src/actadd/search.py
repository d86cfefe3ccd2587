"""Find prompt pairs that steer: score candidate ActAdd pairs, keep the best.

Stage 1 (cheap, every pair): *next-token effectiveness*, as in the original ActAdd
experiments: ``log Σ_t P_steered(t) − log Σ_t P_unsteered(t)`` over the target tokens ``t``,
for the token after each evaluation prompt, averaged over prompts; with it the *disruption*
``KL(unsteered || steered)`` of that next-token distribution. All pairs × prompts run as rows
of a few batched forward passes, each row steered by its own pair (per-row steering).

Stage 2 (optional, the best few): short sampled completions under each pair, scored by a
metric (by default the fraction of completions that contain a target word), against
unsteered completions with the same seeds.

Candidates are phrases you give, or generated from the vocabulary: the whole-word tokens
whose input embeddings are closest (cosine) to the target words'.

With ``ray=``, both stages run on a Ray cluster: the pairs are scored in slices by workers
that each hold a model replica, and the re-scoring completions are generated there too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from actadd import progress
from actadd.additions import get_x_vector
from actadd.errors import ActAddError, PromptError
from actadd.generation import gen_using_activation_additions
from actadd.model import LM, as_lm
from actadd.sites import canonical_act_name
from actadd.steering import steer

if TYPE_CHECKING:
    from actadd.executor import RayExecutor

__all__ = ["search_pairs", "target_token_ids", "vocabulary_candidates", "word_metric"]

log = logging.getLogger(__name__)


def target_token_ids(lm: LM, words: Sequence[str]) -> list[int]:
    """First token of each word as it starts a text or follows a space, any capitalisation."""
    ids: set[int] = set()
    for w in words:
        w = w.strip()
        if not w:
            continue
        for form in {w, w.lower(), w.capitalize()}:
            for text in (form, " " + form):
                toks = lm.tokenizer(text, add_special_tokens=False).input_ids
                if toks:
                    ids.add(int(toks[0]))
    if not ids:
        raise ActAddError("no target words: give e.g. targets=['wedding', 'bride']")
    return sorted(ids)


def vocabulary_candidates(lm: LM, targets: Sequence[str], n: int = 20) -> list[str]:
    """The ``n`` whole-word vocabulary tokens closest to the targets in input-embedding space.

    Example:
        >>> vocabulary_candidates(lm, ["wedding"], 5)  # doctest: +SKIP
        [' wedding', ' weddings', ' bridal', ' bride', ' marriage']
    """
    weight = lm.model.get_input_embeddings().weight
    emb = torch.as_tensor(weight).detach().float()  # [V, D]
    tids = target_token_ids(lm, targets)
    centre = emb[tids].mean(0)
    sims = torch.nn.functional.cosine_similarity(emb, centre[None, :], dim=-1)  # [V]
    out: list[str] = []
    for i in sims.argsort(descending=True).tolist():
        text = lm.tokenizer.decode([i])
        if re.fullmatch(r" [A-Za-z]{3,}", text) and text.lower() not in {o.lower() for o in out}:
            out.append(text)
        if len(out) >= n:
            break
    return out


def word_metric(words: Sequence[str]) -> Callable[[str], float]:
    """1.0 if the text contains any of ``words`` (whole words, any case), else 0.0."""
    pattern = re.compile(r"\b(" + "|".join(re.escape(w.strip()) for w in words) + r")\b", re.I)
    return lambda text: float(bool(pattern.search(text)))


@torch.no_grad()
def _next_token_logprobs(lm: LM, prompts: list[str], rows: list[list[Any]] | None) -> torch.Tensor:
    """``[B, V]`` next-token log-probabilities after each prompt, steered per row if given."""
    ids, mask = lm.batch_tokens(prompts)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: real positions from 0
    kwargs = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": position_ids,
        "use_cache": False,
    }
    if rows is None:
        logits = lm.model(**kwargs).logits
    else:
        with steer(lm, rows, addition_location="front"):
            logits = lm.model(**kwargs).logits
    return torch.log_softmax(logits[:, -1].float(), -1)


def search_pairs(
    lm: LM,
    targets: Sequence[str],
    prompts: Sequence[str],
    *,
    candidates: Sequence[str] | None = None,
    negatives: Sequence[str] | None = None,
    vocab: int = 0,
    layer: int | str = 6,
    coeff: float = 4.0,
    top_k: int = 10,
    kl_weight: float = 0.0,
    rescore: int = 0,
    samples: int = 4,
    tokens: int = 20,
    metric: Callable[[str], float] | None = None,
    batch_size: int = 32,
    seed: int = 0,
    ray: str | RayExecutor | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
    **sampling: Any,
) -> pd.DataFrame:
    """Score ActAdd pairs ``coeff × (act(positive) − act(negative))`` and return the best.

    Args:
        lm: the model.
        targets: words the steering should make likely (e.g. ``["wedding", "bride"]``).
        prompts: evaluation prompts, each at least as long (in tokens) as every candidate.
        candidates: positive phrases to try.
        negatives: phrases to subtract (default ``[" "]``, ActAdd's "weddings − ' '").
        vocab: also try this many candidates generated from the vocabulary.
        layer, coeff: where and how strongly each pair is added (location ``front``).
        top_k: how many pairs to return.
        kl_weight: rank by ``effectiveness − kl_weight × kl``.
        rescore: re-score this many of the best by ``samples`` sampled completions each of
            ``tokens`` tokens, with ``metric`` (default: any target word present);
            ``sampling`` goes to ``gen_using_activation_additions`` (e.g. ``top_p=0.3``).
        ray, workers, chunk_size: score (and re-score) on a Ray cluster, ``chunk_size``
            pairs per slice (default 64); ``lm`` must come from ``load_model``.

    Returns:
        A DataFrame sorted best first: ``positive``, ``negative``, ``effectiveness``, ``kl``,
        ``score`` and, when re-scored, ``gen_score`` and ``gen_baseline`` (unsteered).

    Example:
        >>> df = search_pairs(lm, ["wedding"], ["I went up to my friend and said"],
        ...                   vocab=20, rescore=3)  # doctest: +SKIP
    """
    lm = as_lm(lm)
    act_name = canonical_act_name(layer)
    prompts = list(prompts)
    if not prompts:
        raise PromptError("search_pairs needs at least one evaluation prompt")
    pos = list(
        dict.fromkeys(
            [*(candidates or []), *vocabulary_candidates(lm, targets, vocab)]
            if vocab
            else list(candidates or [])
        )
    )
    neg = list(negatives) if negatives is not None else [" "]
    pairs = [(a, b) for a in pos for b in neg if a != b]
    if not pairs:
        raise ActAddError("no pairs to score: give candidates= and/or vocab=N")
    shortest = min(len(lm.token_ids(p)) for p in prompts)
    longest = max(len(lm.token_ids(c)) for pair in pairs for c in pair)
    if longest > shortest:
        raise PromptError(
            f"a candidate has {longest} tokens but the shortest prompt only {shortest}: use "
            "longer evaluation prompts or shorter candidates"
        )
    tids = target_token_ids(lm, targets)
    how: dict[str, Any] = {"prompts": prompts, "tids": tids, "act_name": act_name, "coeff": coeff}
    if ray is None:
        e, k = _score_pairs(lm, pairs, batch_size=batch_size, **how)
    else:
        from actadd.sharding import map_slices

        parts = map_slices(
            lm,
            _score_pairs,
            pairs,
            ray=ray,
            workers=workers,
            chunk_size=chunk_size,
            task="scoring pairs",
            batch_size=batch_size,
            **how,
        )
        e = [x for part, _ in parts for x in part]
        k = [x for _, part in parts for x in part]
    df = pd.DataFrame(
        {
            "positive": [a for a, _ in pairs],
            "negative": [b for _, b in pairs],
            "effectiveness": e,
            "kl": k,
        }
    )
    df["score"] = df.effectiveness - kl_weight * df.kl
    df = df.sort_values("score", ascending=False, ignore_index=True)
    log.info("scored %d pairs on %d prompts at %s", len(pairs), len(prompts), act_name)
    if rescore > 0:
        df = _rescore(
            lm,
            df,
            rescore,
            prompts,
            act_name,
            coeff,
            samples,
            tokens,
            metric or word_metric(targets),
            seed,
            sampling,
            ray=ray,
            workers=workers,
            chunk_size=chunk_size,
        )
    return df.head(top_k).reset_index(drop=True)


def _score_pairs(
    lm: LM,
    pairs: list[tuple[str, str]],
    *,
    prompts: list[str],
    tids: list[int],
    act_name: str,
    coeff: float,
    batch_size: int,
) -> tuple[list[float], list[float]]:
    """Mean next-token effectiveness and KL of each pair over the prompts (stage 1)."""
    targets = torch.tensor(tids, device=lm.device)
    base = _next_token_logprobs(lm, prompts, None)  # [P, V]
    base_t = torch.logsumexp(base[:, targets], -1)  # [P]
    eff, kl = [], []
    jobs = [(i, j) for i in range(len(pairs)) for j in range(len(prompts))]
    for lo in range(0, len(jobs), batch_size):
        progress.report("scoring pairs", lo, len(jobs))
        chunk = jobs[lo : lo + batch_size]
        rows = [list(get_x_vector(*pairs[i], coeff=coeff, act_name=act_name)) for i, _ in chunk]
        lp = _next_token_logprobs(lm, [prompts[j] for _, j in chunk], rows)  # [B, V]
        js = torch.tensor([j for _, j in chunk], device=lm.device)
        eff.append(torch.logsumexp(lp[:, targets], -1) - base_t[js])
        ref = base[js]
        kl.append((ref.exp() * (ref - lp)).sum(-1))
    progress.report("scoring pairs", len(jobs), len(jobs))
    e = torch.cat(eff).view(len(pairs), len(prompts)).mean(1)
    k = torch.cat(kl).view(len(pairs), len(prompts)).mean(1)
    return e.tolist(), k.tolist()


def _generate_rows(lm: LM, items: list[Any], **options: Any) -> pd.DataFrame:
    """On a worker: completions of (additions, prompt, seed) rows."""
    return gen_using_activation_additions(
        lm,
        [list(a) for a, _, _ in items],
        [p for _, p, _ in items],
        seeds=[s for _, _, s in items],
        **options,
    )


def _rescore(
    lm: LM,
    df: pd.DataFrame,
    n: int,
    prompts: list[str],
    act_name: str,
    coeff: float,
    samples: int,
    tokens: int,
    metric: Callable[[str], float],
    seed: int,
    sampling: dict[str, Any],
    *,
    ray: str | RayExecutor | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
) -> pd.DataFrame:
    """Short completions for the ``n`` best pairs and for no steering, same seeds."""
    top = df.head(n)
    evals = [(p, s) for p in prompts for s in range(samples)]
    rows: list[list[Any]] = [[]] * len(evals)  # unsteered baseline
    for a, b in zip(top.positive, top.negative, strict=True):
        rows += [list(get_x_vector(a, b, coeff=coeff, act_name=act_name))] * len(evals)
    texts = [p for p, _ in evals] * (len(top) + 1)
    seeds = [seed + s for _, s in evals] * (len(top) + 1)
    options = {"tokens_to_generate": tokens, "batch_size": 32, **sampling}
    if ray is None:
        out = gen_using_activation_additions(lm, rows, texts, seeds=seeds, **options)
    else:
        from actadd.sharding import map_slices

        items = list(zip(rows, texts, seeds, strict=True))
        out = pd.concat(
            map_slices(
                lm,
                _generate_rows,
                items,
                ray=ray,
                workers=workers,
                chunk_size=chunk_size,
                task="re-scoring pairs",
                **options,
            ),
            ignore_index=True,
        )
    scores = torch.tensor([metric(c) for c in out.completions]).view(len(top) + 1, len(evals))
    df = df.copy()
    df["gen_score"] = float("nan")
    df.loc[: len(top) - 1, "gen_score"] = scores[1:].mean(1).tolist()
    df["gen_baseline"] = float(scores[0].mean())
    head = df.head(len(top)).sort_values(["gen_score", "score"], ascending=False)
    return pd.concat([head, df.iloc[len(top) :]], ignore_index=True)
