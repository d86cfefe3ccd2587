"""Honest scores of steering: held-out prompts, fresh seeds, paired differences, controls.

* ``split_prompts``: a seeded tune/test split of distinct prompts; nothing crosses it.
* ``Arm``: one way of changing the model's output (a steering configuration, a random control,
  a prompt prefix); ``score_arms`` generates every arm and the unsteered model on the same
  prompts and seeds, as rows of one batched ``generate`` per chunk.
* ``summarize_arms``: per arm the paired effect (arm − unsteered completion with the same
  prompt and seed) with a 95% confidence interval, paired contrasts between arms (e.g. chosen
  − random control), and per prompt the effect and whether it moved the wrong way
  (steering-bench's *anti-steerable* inputs).

Confidence intervals resample *prompts* (percentile bootstrap, 10,000 resamples): the
question is whether an effect carries over to new prompts, so a prompt's seeds are one unit.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from actadd import progress as reporting
from actadd.errors import ActAddError
from actadd.generation import gen_using_activation_additions
from actadd.model import LM
from actadd.sweeps import auto_batch_size

__all__ = [
    "Arm",
    "bootstrap_ci",
    "score_arms",
    "split_prompts",
    "summarize_arms",
]

log = logging.getLogger(__name__)

#: the columns a metric can read to know the row's configuration (NaN when unsteered)
CONFIG_COLUMNS = ("source", "layer", "coeff", "location")
#: seeds of held-out completions start here above the tuning seeds, so none is reused
TEST_SEED_OFFSET = 1_000_000


def split_prompts(
    prompts: Sequence[str], *, test_fraction: float = 0.5, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Distinct prompts split at random into ``(tune, test)``; both non-empty.

    Duplicates (after stripping whitespace) are dropped first: a prompt given twice must not
    land on both sides.

    Example:
        >>> tune, test = split_prompts(["a", "b", "c", "d", "b "], seed=0)
        >>> sorted(tune + test), set(tune) & set(test)
        (['a', 'b', 'c', 'd'], set())
    """
    if not 0 < test_fraction < 1:
        raise ActAddError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    seen: dict[str, str] = {}
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ActAddError(f"prompts must be non-empty strings, got {p!r}")
        seen.setdefault(p.strip(), p)
    unique = list(seen.values())
    if len(unique) < 2:
        raise ActAddError(
            f"{len(unique)} distinct prompt(s): a tune/test split needs at least 2 (give more "
            "prompts, e.g. prompts='sentiment')"
        )
    order = unique[:]
    random.Random(seed).shuffle(order)
    n_test = min(len(order) - 1, max(1, round(len(order) * test_fraction)))
    return order[n_test:], order[:n_test]


@dataclass(frozen=True)
class Arm:
    """One way of changing completions, scored against the unsteered model.

    Args:
        name: its label in tables and plots.
        additions: steerables for every row (they carry their own locations), or a function
            of the row's seed returning them (a random control drawing a direction per seed).
        prefix: text put before each prompt (the prompting baseline), joined with a space.
        kind: ``steering``, ``control``, ``prompting`` or ``reference`` (for reports).
        info: free-form facts shown with it (layer, coeff, fluency, ...).
    """

    name: str
    additions: Sequence[Any] | Callable[[int], Sequence[Any]] = ()
    prefix: str = ""
    kind: str = "steering"
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def rows_for(self, seed: int) -> list[Any]:
        adds = self.additions(seed) if callable(self.additions) else self.additions
        return list(adds)

    def prompt(self, prompt: str) -> str:
        if not self.prefix:
            return prompt
        sep = "" if self.prefix.endswith((" ", "\n")) else " "
        return f"{self.prefix}{sep}{prompt}"


def score_arms(
    lm: LM,
    prompts: Sequence[str],
    arms: Sequence[Arm],
    metric: Callable[[pd.DataFrame], Any],
    *,
    samples: int,
    seed: int,
    tokens_to_generate: int = 40,
    temperature: float = 1.0,
    top_p: float = 1.0,
    freq_penalty: float = 0.0,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Completions of every prompt under every arm and unsteered, ``samples`` seeds each
    (``seed``, ``seed + 1``, ...; the same seeds for every arm), scored by ``metric``.

    ``metric`` receives the rows (columns ``prompts``, ``completions``, ``arm`` and the arm's
    ``source``, ``layer``, ``coeff``, ``location`` from its ``info``) and returns one value
    per row. Rows of all arms share batches.

    Returns:
        One row per completion: ``arm`` (``"unsteered"`` for the baseline), ``prompts`` (the
        prompt *without* any prefix), ``seed``, ``completions``, ``loss`` (under the model
        that wrote it) and ``value``.

    Example:
        >>> rows = score_arms(lm, ["I hate you because"], [Arm("love", adds)],
        ...                   make_metric("sentiment"), samples=4, seed=0)  # doctest: +SKIP
    """
    if samples < 1:
        raise ActAddError(f"samples must be >= 1, got {samples}")
    names = [a.name for a in arms]
    if len(set(names)) != len(names) or "unsteered" in names:
        raise ActAddError(f"arm names must be distinct and not 'unsteered': {names}")
    jobs: list[tuple[str, str, str, int, list[Any]]] = []  # arm, prompt, text, seed, additions
    for p in prompts:
        for i in range(samples):
            jobs.append(("unsteered", p, p, seed + i, []))
            for a in arms:
                jobs.append((a.name, p, a.prompt(p), seed + i, a.rows_for(seed + i)))
    if batch_size is None:
        longest = max(len(lm.token_ids(j[2])) for j in jobs)
        batch_size = auto_batch_size(lm, longest, tokens_to_generate)
    frames = []
    for lo in range(0, len(jobs), batch_size):
        chunk = jobs[lo : lo + batch_size]
        with reporting.silenced():  # one bar for all chunks, not one per call
            df = gen_using_activation_additions(
                lm,
                [j[4] for j in chunk],
                [j[2] for j in chunk],
                tokens_to_generate=tokens_to_generate,
                seeds=[j[3] for j in chunk],
                temperature=temperature,
                top_p=top_p,
                freq_penalty=freq_penalty,
            )
        df["arm"] = [j[0] for j in chunk]
        df["prompts"] = [j[1] for j in chunk]
        frames.append(df)
        reporting.report("held-out completions", lo + len(chunk), len(jobs))
    rows = pd.concat(frames, ignore_index=True)
    # what each row's arm is (layer, coeff, ...), for metrics that read the configuration
    for col in CONFIG_COLUMNS:
        rows[col] = rows.arm.map({a.name: a.info.get(col) for a in arms})
    rows["value"] = np.asarray(metric(rows), dtype=float)
    return rows[["arm", "prompts", "seed", "completions", "loss", "value"]]


def bootstrap_ci(
    per_prompt: np.ndarray, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``per_prompt`` values (one per prompt).

    Example:
        >>> lo, hi = bootstrap_ci(np.array([0.1, 0.2, 0.3, 0.4]))
        >>> lo < 0.25 < hi
        True
    """
    x = np.asarray(per_prompt, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return math.nan, math.nan
    if len(x) == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def _paired(rows: pd.DataFrame, arm: str, base: str) -> pd.DataFrame:
    """Per (prompt, seed): ``arm``'s value minus ``base``'s."""
    a = rows[rows.arm == arm].set_index(["prompts", "seed"])
    b = rows[rows.arm == base].set_index(["prompts", "seed"])
    both = a.index.intersection(b.index)
    return pd.DataFrame(
        {"diff": a.loc[both, "value"] - b.loc[both, "value"]}, index=both
    ).reset_index()


def summarize_arms(
    rows: pd.DataFrame,
    arms: Sequence[Arm],
    *,
    contrasts: Sequence[tuple[str, str]] = (),
    direction: str = "maximize",
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Effects with confidence intervals, contrasts between arms, and per-prompt effects.

    Args:
        rows: from ``score_arms``.
        arms: the arms scored (for their kinds and info).
        contrasts: ``(a, b)`` pairs of arm names: ``a − b``, paired by prompt and seed (e.g.
            the tuned choice against the random control and the prompting baseline).
        direction: ``maximize`` (the behaviour should go up) or ``minimize``; an input moving
            the other way is *anti-steerable*.
        seed: of the bootstrap.

    Returns:
        ``(summary, contrasts, per_prompt)``. ``summary``: one row per arm (and unsteered) with
        ``value`` (mean metric), ``delta`` (mean paired effect), ``ci_low``/``ci_high`` (95%),
        ``loss`` (mean completion loss), ``anti_steerable`` (fraction of prompts whose mean
        effect goes the wrong way), ``n_prompts``, ``n``. ``contrasts``: one row per pair, the
        paired difference with its CI and ``beats`` (the interval excludes 0 in the right
        direction). ``per_prompt``: ``arm``, ``prompts``, ``effect``, ``n``.
    """
    sign = 1.0 if direction == "maximize" else -1.0
    if direction not in ("maximize", "minimize"):
        raise ActAddError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    records, per_prompt = [], []
    base = rows[rows.arm == "unsteered"]
    records.append(
        {
            "arm": "unsteered",
            "kind": "unsteered",
            "value": float(base.value.mean()),
            "delta": 0.0,
            "ci_low": 0.0,
            "ci_high": 0.0,
            "loss": float(base.loss.mean()),
            "anti_steerable": math.nan,
            "n_prompts": int(base.prompts.nunique()),
            "n": len(base),
        }
    )
    for k, a in enumerate(arms):
        d = _paired(rows, a.name, "unsteered")
        pp = d.groupby("prompts", sort=False)["diff"].agg(["mean", "size"])
        lo, hi = bootstrap_ci(pp["mean"].to_numpy(), seed=seed + k)
        mine = rows[rows.arm == a.name]
        records.append(
            {
                "arm": a.name,
                "kind": a.kind,
                "value": float(mine.value.mean()),
                "delta": float(d["diff"].mean()),
                "ci_low": lo,
                "ci_high": hi,
                "loss": float(mine.loss.mean()),
                "anti_steerable": float((sign * pp["mean"] < 0).mean()),
                "n_prompts": len(pp),
                "n": len(d),
                **{f"info_{key}": v for key, v in a.info.items()},
            }
        )
        for prompt, r in pp.iterrows():
            per_prompt.append(
                {"arm": a.name, "prompts": prompt, "effect": float(r["mean"]), "n": int(r["size"])}
            )
    kinds = {arm.name: arm.kind for arm in arms}
    out = []
    for k, (first, second) in enumerate(contrasts):
        if first not in kinds or second not in kinds:
            raise ActAddError(f"contrast {first!r} − {second!r}: no such arm; have {sorted(kinds)}")
        d = _paired(rows, first, second)
        pm = d.groupby("prompts", sort=False)["diff"].mean().to_numpy()
        lo, hi = bootstrap_ci(pm, seed=seed + 100 + k)
        out.append(
            {
                "contrast": f"{first} − {second}",
                "arm": first,
                "against": second,
                "kind": kinds[second],
                "diff": float(d["diff"].mean()),
                "ci_low": lo,
                "ci_high": hi,
                "beats": bool(lo > 0) if sign > 0 else bool(hi < 0),
                "n_prompts": len(pm),
                "n": len(d),
            }
        )
    return pd.DataFrame(records), pd.DataFrame(out), pd.DataFrame(per_prompt)
