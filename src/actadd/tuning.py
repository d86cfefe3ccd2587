"""Find settings that steer without breaking the model: ``tune``.

Given steering sources (``actadd.sources``), prompts, a behaviour metric and a fluency budget,
``tune`` searches layer × coefficient (× location × source) and reports honestly:

1. **Split.** The prompts are split into tune and test halves (``actadd.heldout``); the search
   never sees a test prompt, and the test completions use fresh seeds.
2. **Fluency gate.** Every configuration's fluency is measured first, without generating:
   the perplexity ratio (steered / unsteered) of neutral text (``fluency="ppl"``, budget 1.25 by
   default), or the mean next-token KL(unsteered ‖ steered) on it (``fluency="kl"``, nats). A
   configuration over the budget is never generated from: the cheapest early stop.
3. **Successive halving over samples.** The configurations within budget are scored by the
   paired effect on the metric (steered − unsteered completion with the same prompt and seed),
   first with a few completions per prompt; only the best ``1/eta`` get more. Each round is one
   batched sweep (``actadd.sweeps.sweep_over_prompts``: rows of one ``generate`` call carry
   different configurations). Optuna keeps the study: every configuration is a trial, each
   round a reported step, and its pruner drops the losers. With ``trials=N`` smaller than the
   grid, Optuna's TPE sampler proposes which configurations to try, in batches, learning from
   the fluency constraint and the effects seen so far.
4. **Choice and Pareto front.** The chosen configuration has the largest effect among those
   that reached the full sample count within the budget; the Pareto front of effect vs
   fluency is reported over everything measured.
5. **Held-out test.** The choice is re-scored on the test prompts with fresh seeds, next to a
   random direction of the same norm at the same layer and coefficient, the prompting baseline
   (the behaviour asked for in words, prefixed to the prompt) and any reference configurations;
   paired differences come with bootstrap confidence intervals over prompts, and the
   per-prompt effects show how many inputs move the wrong way (anti-steerable).

``TuneResult.save(out)`` writes the tables, plots, the chosen configuration as a vector file
(``SteeringVector``, with provenance, scores and the recipe that rebuilds it) and a one-line
command that reproduces the run; ``TuneResult.load(out)`` reads them back.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from actadd import progress as reporting
from actadd.errors import ActAddError, check_finite, require
from actadd.heldout import TEST_SEED_OFFSET, Arm, score_arms, split_prompts, summarize_arms
from actadd.model import LM, as_lm
from actadd.positions import check_location
from actadd.sources import PreparedSource, RandomLike, as_source
from actadd.tune_result import TuneResult, TuneSettings, pareto_front

__all__ = ["TuneResult", "TuneSettings", "fluency_scores", "tune"]

log = logging.getLogger(__name__)

FLUENCY = ("ppl", "kl")


@dataclass(frozen=True)
class Config:
    """One point of the search: a source (by index), a layer, a coefficient, a location."""

    source: int
    layer: int
    coeff: float
    location: str

    @property
    def key(self) -> tuple[int, int, float, str]:
        return (self.source, self.layer, self.coeff, self.location)


# -- inputs ------------------------------------------------------------------------------------
def _metric(metric: Any, words: Sequence[str] | None, target: str | None) -> Callable[..., Any]:
    if callable(metric):
        return metric
    from actadd.metrics import make_metric

    return make_metric(str(metric), words=words, target=target)


def _prompts(prompts: Sequence[str] | str) -> list[str]:
    if isinstance(prompts, str):
        from actadd.datasets import load_prompts

        return load_prompts(prompts)
    return list(prompts)


def default_layers(n_layers: int) -> list[int]:
    """About six layers spread over the first two thirds of the model (where steering acts).

    Example:
        >>> default_layers(30)
        [1, 5, 9, 12, 16, 20]
    """
    hi = max(1, round(2 * n_layers / 3))
    lo = min(1, n_layers - 1)
    return sorted({round(float(x)) for x in np.linspace(lo, min(hi, n_layers - 1), 6)})


# -- fluency -----------------------------------------------------------------------------------
def fluency_scores(
    lm: LM,
    configs: Sequence[list[Any]],
    texts: Sequence[str],
    *,
    kind: str = "ppl",
    batch_size: int = 32,
) -> list[float]:
    """Fluency cost of each configuration (a list of steerables that carry their locations):
    the corpus perplexity ratio steered / unsteered of ``texts`` (``ppl``; predictions made at
    positions an addition wrote to are left out of both) or their mean next-token
    KL(unsteered ‖ steered) in nats (``kl``). All configurations share batched forward passes.

    Example:
        >>> fluency_scores(lm, [list(get_x_vector("Love", "Hate", 5, 6))],
        ...                load_texts("neutral"))  # doctest: +SKIP
        [1.31]
    """
    from actadd.model_metrics import corpus_perplexity_ratio, logit_shift, text_loss

    if kind not in FLUENCY:
        raise ActAddError(f"fluency must be one of {', '.join(FLUENCY)}, got {kind!r}")
    texts = list(texts)
    if not configs:
        return []
    out: list[float] = [math.nan] * len(configs)
    # configurations whose additions write to the same positions share the unsteered loss
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, adds in enumerate(configs):
        groups.setdefault(_footprint(lm, adds), []).append(i)
    done = 0
    for foot, idx in groups.items():
        usable = [t for t in texts if len(lm.token_ids(t)) >= foot[0] + 3]
        if not usable:
            raise ActAddError("the neutral texts are shorter than the additions: give longer ones")
        rows = [list(configs[i]) for i in idx for _ in usable]
        if kind == "ppl":
            base = text_loss(
                lm, usable, mask_additions=list(configs[idx[0]]), batch_size=batch_size
            )
            steered = text_loss(lm, usable * len(idx), rows, batch_size=batch_size)
            for k, i in enumerate(idx):
                part = steered.iloc[k * len(usable) : (k + 1) * len(usable)]
                frame = pd.DataFrame(
                    {
                        "loss_unsteered": base.loss.to_numpy(),
                        "loss_steered": part.loss.to_numpy(),
                        "n_tokens": base.n_tokens.to_numpy(),
                    }
                )
                out[i] = corpus_perplexity_ratio(frame)
        else:
            shift = logit_shift(lm, usable * len(idx), rows, positions="all", batch_size=batch_size)
            for k, i in enumerate(idx):
                part = shift[(shift.row >= k * len(usable)) & (shift.row < (k + 1) * len(usable))]
                kept = part[~part.injected] if (~part.injected).any() else part
                out[i] = float(kept.groupby("row").kl.mean().mean())
        done += len(idx)
        reporting.report("fluency", done, len(configs))
    return out


def _footprint(lm: LM, adds: Sequence[Any]) -> tuple[Any, ...]:
    """(longest addition, where they land): configurations with the same footprint mask the
    same predictions, so they share one unsteered pass."""
    from actadd.steering import resolve

    injs = resolve(lm, [list(adds)])[0]
    longest = max((i.tensor.shape[0] for i in injs), default=0)
    where = tuple(sorted({i.default_location for i in injs}))
    return (longest if where != ("all",) else 1, where)


# -- the search --------------------------------------------------------------------------------
def _halving_pruner(optuna: Any, eta: int, last_step: int) -> Any:
    """Synchronous successive halving for Optuna: a trial that reported ``step`` survives if
    its value is among the best ``1/eta`` of every trial that reported that step. A round's
    trials all report before any is judged, so each is compared with its whole round."""

    class HalvingPruner(optuna.pruners.BasePruner):
        def prune(self, study: Any, trial: Any) -> bool:
            step = trial.last_step
            if step is None or step >= last_step:
                return False
            value = trial.intermediate_values[step]
            peers = [
                t.intermediate_values[step]
                for t in study.get_trials(deepcopy=False)
                if step in t.intermediate_values and math.isfinite(t.intermediate_values[step])
            ]
            if not math.isfinite(value):
                return True
            keep = max(1, math.ceil(len(peers) / eta))
            maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
            cut = sorted(peers, reverse=maximize)[keep - 1]
            return bool(value < cut if maximize else value > cut)

    return HalvingPruner()


def rungs(min_samples: int, samples: int, eta: int) -> list[int]:
    """Completions per prompt after each round: min_samples, ×eta, ..., samples."""
    out, n = [], min_samples
    while n < samples:
        out.append(n)
        n *= eta
    return [*out, samples]


class _Search:
    """The state of one search: the grid, the study, what was generated and measured."""

    def __init__(
        self,
        lm: LM,
        prepared: list[PreparedSource],
        settings: TuneSettings,
        tune_prompts: list[str],
        metric: Callable[..., Any],
        texts: list[str],
    ) -> None:
        self.lm, self.prepared, self.s = lm, prepared, settings
        self.search_layers = sorted(
            {
                lm.n_layers + x if x < 0 else x
                for x in (settings.layers or default_layers(lm.n_layers))
            }
        )
        self.prompts, self.metric, self.texts = tune_prompts, metric, texts
        self.rungs = rungs(settings.min_samples, settings.samples, settings.eta)
        self.grid: list[Config] = []
        for i, p in enumerate(prepared):
            coeffs = settings.coeffs or p.source.default_coeffs
            locations = settings.locations or (p.source.default_location,)
            for layer in self.layers(i):
                for c in coeffs:
                    for loc in locations:
                        self.grid.append(Config(i, layer, float(c), loc))
        self.records: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.rows: list[pd.DataFrame] = []  # steered rows: key, prompt, seed, value, loss
        self.baseline: dict[tuple[str, int], tuple[float, float]] = {}  # (prompt, seed) -> v, loss
        self.generated = 0  # completions generated while searching
        self.seconds = {"fluency": 0.0, "generation": 0.0}

    def additions(self, c: Config) -> list[Any]:
        return self.prepared[c.source].additions(c.layer, c.coeff, c.location)

    def layers(self, i: int) -> list[int]:
        """The layers searched for source ``i`` (a stored vector: its own)."""
        p = self.prepared[i]
        return list(p.layers) if p.source.kind == "vector" else self.search_layers

    # Optuna's view of a configuration: one parameter per choice that has several options
    def _choices(self, i: int) -> dict[str, list[Any]]:
        p = self.prepared[i]
        pre = f"s{i}." if len(self.prepared) > 1 else ""
        ch: dict[str, list[Any]] = {
            pre + "layer": self.layers(i),
            pre + "coeff": [float(c) for c in (self.s.coeffs or p.source.default_coeffs)],
            pre + "location": list(self.s.locations or (p.source.default_location,)),
        }
        return {k: v for k, v in ch.items() if len(v) > 1}

    def params(self, c: Config) -> dict[str, Any]:
        pre = f"s{c.source}." if len(self.prepared) > 1 else ""
        full = {pre + "layer": c.layer, pre + "coeff": c.coeff, pre + "location": c.location}
        out = {k: v for k, v in full.items() if k in self._choices(c.source)}
        return {"source": c.source, **out} if len(self.prepared) > 1 else out

    def suggest(self, trial: Any) -> Config:
        i = 0
        if len(self.prepared) > 1:
            i = int(trial.suggest_categorical("source", list(range(len(self.prepared)))))
        p, pre = self.prepared[i], (f"s{i}." if len(self.prepared) > 1 else "")
        choices = self._choices(i)

        def pick(name: str, default: Any) -> Any:
            key = pre + name
            return trial.suggest_categorical(key, choices[key]) if key in choices else default

        coeffs = self.s.coeffs or p.source.default_coeffs
        locations = self.s.locations or (p.source.default_location,)
        return Config(
            i,
            int(pick("layer", self.layers(i)[0])),
            float(pick("coeff", float(coeffs[0]))),
            str(pick("location", locations[0])),
        )

    def run(self) -> Any:
        optuna = require("optuna", extra="tune", feature="actadd tune")
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # a log line per trial otherwise
        try:
            return self._run(optuna)
        finally:
            optuna.logging.set_verbosity(verbosity)

    def _run(self, optuna: Any) -> Any:
        s = self.s
        # TPE learns from the fluency constraint too: a region over budget is not proposed
        sampler = optuna.samplers.TPESampler(
            seed=s.seed, n_startup_trials=min(10, max(2, (s.trials or 0) // 3))
        )
        study = optuna.create_study(
            direction=s.direction,
            sampler=sampler,
            pruner=_halving_pruner(optuna, s.eta, self.rungs[-1]),
        )
        exhaustive = s.trials is None or s.trials >= len(self.grid)
        if exhaustive:
            for c in self.grid:
                study.enqueue_trial(self.params(c))
        budget = len(self.grid) if exhaustive else int(s.trials or 0)
        asked, idle = 0, 0
        while asked < budget and len(self.records) < len(self.grid) and idle < 3:
            k = budget - asked if exhaustive else min(s.batch_trials, budget - asked)
            batch: list[tuple[Any, Config]] = []
            for _ in range(k):
                trial = study.ask()
                c = self.suggest(trial)
                if c.key in self.records or any(c.key == b.key for _, b in batch):
                    trial.set_user_attr("duplicate", True)
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    continue
                batch.append((trial, c))
            idle = idle + 1 if not batch else 0
            asked += len(batch)
            self._evaluate(study, optuna, batch)
            reporting.report("tune: configurations", len(self.records), len(self.grid))
        return study

    def _evaluate(self, study: Any, optuna: Any, batch: list[tuple[Any, Config]]) -> None:
        if not batch:
            return
        s = self.s
        t0 = time.perf_counter()
        flu = fluency_scores(
            self.lm, [self.additions(c) for _, c in batch], self.texts, kind=s.fluency
        )
        self.seconds["fluency"] += time.perf_counter() - t0
        live = []
        for (trial, c), f in zip(batch, flu, strict=True):
            rec = {"config": c, "trial": trial.number, "fluency": f, "samples": 0, "status": ""}
            self.records[c.key] = rec
            over = f - s.limit if math.isfinite(f) else math.inf
            trial.set_user_attr("fluency", f)
            trial.set_constraint("fluency_over_budget", over if math.isfinite(over) else 1e9)
            if over > 0:
                rec["status"] = "over budget"
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                live.append((trial, c))
        prev = 0
        for r, n in enumerate(self.rungs):
            if not live:
                break
            self._generate([c for _, c in live], prev, n)
            survivors = []
            for trial, c in live:
                delta = self._delta(c)
                self.records[c.key]["samples"] = n
                trial.report(delta, step=n)
            for trial, c in live:
                if r < len(self.rungs) - 1 and trial.should_prune():
                    self.records[c.key]["status"] = f"pruned after {n} per prompt"
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                else:
                    survivors.append((trial, c))
            live, prev = survivors, n
        for trial, c in live:
            self.records[c.key]["status"] = "complete"
            study.tell(trial, self._delta(c))

    def _generate(self, configs: list[Config], lo: int, hi: int) -> None:
        """Completions ``lo..hi-1`` of every tune prompt under each configuration, as one
        batched sweep, plus any unsteered twins not yet generated."""
        from actadd.sweeps import sweep_over_prompts

        s = self.s
        need_base = any(
            (p, s.seed + i) not in self.baseline for p in self.prompts for i in range(lo, hi)
        )
        frame = pd.DataFrame(
            {
                "activation_additions": [self.additions(c) for c in configs],
                "key": [c.key for c in configs],
                "source": [self.prepared[c.source].source.label for c in configs],
                "layer": [c.layer for c in configs],
                "coeff": [c.coeff for c in configs],
                "location": [c.location for c in configs],
            }
        )
        t0 = time.perf_counter()
        normal, patched = sweep_over_prompts(
            self.lm,
            self.prompts,
            frame,
            num_normal_completions=(hi - lo) if need_base else 0,
            num_patched_completions=hi - lo,
            tokens_to_generate=s.tokens_to_generate,
            seed=s.seed + lo,
            temperature=s.temperature,
            top_p=s.top_p,
            freq_penalty=s.freq_penalty,
            batch_size=s.batch_size,
            progress=False,
        )
        self.seconds["generation"] += time.perf_counter() - t0
        if normal.attrs.get("interrupted"):
            raise KeyboardInterrupt
        self.generated += len(normal) + len(patched)
        both = pd.concat([normal, patched], ignore_index=True)
        both["value"] = np.asarray(self.metric(both), dtype=float)
        for r in both[~both.is_modified].itertuples():
            self.baseline[(r.prompts, int(r.seed))] = (float(r.value), float(r.loss))
        steered = both[both.is_modified]
        self.rows.append(steered[["key", "prompts", "seed", "value", "loss", "completions"]])

    def _delta(self, c: Config) -> float:
        d = self._steered(c)
        return float(d["diff"].mean()) if len(d) else math.nan

    def _steered(self, c: Config) -> pd.DataFrame:
        rows = pd.concat(self.rows, ignore_index=True) if self.rows else pd.DataFrame()
        if rows.empty:
            return rows
        mine = rows[rows.key == c.key].copy()
        mine["base"] = [
            self.baseline[(p, int(sd))][0] for p, sd in zip(mine.prompts, mine.seed, strict=True)
        ]
        mine["diff"] = mine.value - mine.base
        return mine

    def table(self) -> pd.DataFrame:
        """One row per configuration tried, with what was measured."""
        out = []
        for rec in self.records.values():
            c: Config = rec["config"]
            d = self._steered(c)
            per_prompt = d.groupby("prompts")["diff"].mean() if len(d) else pd.Series(dtype=float)
            out.append(
                {
                    "trial": rec["trial"],
                    "source": self.prepared[c.source].source.label,
                    "spec": self.prepared[c.source].source.spec,
                    "layer": c.layer,
                    "coeff": c.coeff,
                    "location": c.location,
                    "fluency": rec["fluency"],
                    "within_budget": bool(rec["fluency"] <= self.s.limit),
                    "status": rec["status"],
                    "samples": rec["samples"],
                    "n": len(d),
                    "value": float(d.value.mean()) if len(d) else math.nan,
                    "delta": float(d["diff"].mean()) if len(d) else math.nan,
                    "delta_sem": float(d["diff"].sem()) if len(d) > 1 else math.nan,
                    "loss": float(d.loss.mean()) if len(d) else math.nan,
                    "anti_steerable": float((self._sign * per_prompt < 0).mean())
                    if len(per_prompt)
                    else math.nan,
                }
            )
        return pd.DataFrame(out).sort_values("trial").reset_index(drop=True)

    @property
    def _sign(self) -> float:
        return 1.0 if self.s.direction == "maximize" else -1.0


# -- the entry point ---------------------------------------------------------------------------
def tune(
    lm: LM,
    sources: Any,
    prompts: Sequence[str] | str,
    *,
    metric: str | Callable[..., Any] = "sentiment",
    words: Sequence[str] | None = None,
    target: str | None = None,
    settings: TuneSettings | None = None,
    **options: Any,
) -> TuneResult:
    """Search layer × coefficient (× location × source) for steering that moves ``metric``
    within a fluency budget, then test the choice on held-out prompts (see the module docs).

    Args:
        lm: the model.
        sources: one source or several: a spec (``"pair:Love:Hate"``, ``"mean_diff:sentiment"``,
            ``"vector:v.safetensors"``), an ``(add, sub)`` tuple or a ``Source``.
        prompts: the prompts to steer (split into tune and test), or the name of a shipped
            prompt list (``"sentiment"``, ``"weddings"``) or a ``.txt`` file.
        metric: a name in ``actadd.metrics.METRICS`` or a function of the completions' rows
            (a DataFrame with ``completions`` and the configuration's ``layer``, ``coeff``,
            ``location``, ``source``) returning one number per row.
        words, target: for the ``words`` and ``similarity`` metrics.
        settings: a ``TuneSettings``; or give its fields as keywords:
        **options: the fields of ``TuneSettings`` (layers, coeffs, locations, fluency,
            budget, samples, trials, test_samples, controls, instructions, references,
            sampling, seed, ...), e.g. ``budget=1.25``.

    Returns:
        A ``TuneResult``: ``trials``, ``pareto``, ``chosen``, ``heldout``, ``contrasts``,
        ``per_prompt``, ``vector``, ``command``; ``.save(out)`` writes them.

    Example:
        >>> res = tune(lm, "pair:Love:Hate", "sentiment", metric="sentiment",
        ...            layers=[4, 6, 8], coeffs=[2, 5, 10], budget=1.25)  # doctest: +SKIP
        >>> res.chosen["layer"], res.heldout  # doctest: +SKIP
    """
    lm = as_lm(lm)
    started = time.perf_counter()
    src_list = [as_source(x) for x in (sources if isinstance(sources, list) else [sources])]
    if not src_list:
        raise ActAddError("give at least one steering source, e.g. 'pair:Love:Hate'")
    prompt_names = prompts if isinstance(prompts, str) else None
    prompt_list = _prompts(prompts)
    if settings is not None and options:
        raise ActAddError(f"give settings= or keyword options, not both ({sorted(options)})")
    settings = settings or TuneSettings(**options)
    score = _metric(metric, words, target)
    tune_prompts, test_prompts = split_prompts(
        prompt_list, test_fraction=settings.test_fraction, seed=settings.seed
    )
    layers = list(settings.layers or default_layers(lm.n_layers))
    from actadd.datasets import load_texts

    texts = (
        list(settings.neutral)
        if not isinstance(settings.neutral, str)
        else load_texts(settings.neutral)
    )
    # references may sit at layers outside the search: prepare those too
    extra = [int(r[0]) for r in settings.references]
    prepared = [s.prepare(lm, sorted({*layers, *extra})) for s in src_list]
    search = _Search(lm, prepared, settings, tune_prompts, score, texts)
    log.info(
        "tune: %d configurations, %d tune / %d test prompts, rounds of %s completions",
        len(search.grid),
        len(tune_prompts),
        len(test_prompts),
        search.rungs,
    )
    study = search.run()
    trials = search.table()
    done = trials[trials.status == "complete"]
    if done.empty:
        raise ActAddError(
            f"no configuration is within the fluency budget ({settings.fluency} ≤ "
            f"{settings.limit:g}; the best was {trials.fluency.min():.3g}): raise the budget "
            "or try smaller coefficients"
        )
    best = done.sort_values(
        ["delta", "fluency"], ascending=[settings.direction != "maximize", True]
    )
    chosen = best.iloc[0].to_dict()
    c = Config(
        next(i for i, p in enumerate(prepared) if p.source.label == chosen["source"]),
        int(chosen["layer"]),
        float(chosen["coeff"]),
        str(chosen["location"]),
    )
    search_seconds = time.perf_counter() - started

    # -- held-out: the choice, the controls, the prompting baseline, the references --------
    t0 = time.perf_counter()
    chosen_adds = search.additions(c)
    arms = [Arm("chosen", chosen_adds, kind="steering", info=_info(chosen))]
    if settings.controls:
        randoms = [RandomLike(tuple(chosen_adds), seed=k) for k in range(settings.controls)]
        arms.append(Arm("random", lambda sd: [randoms[sd % len(randoms)]], kind="control"))
    for ref in settings.references:
        rc = Config(c.source, int(ref[0]), float(ref[1]), ref[2] if len(ref) > 2 else c.location)
        arms.append(
            Arm(
                f"reference: layer {rc.layer} ×{rc.coeff:g} ({rc.location})",
                search.additions(rc),
                kind="reference",
                info={
                    "layer": rc.layer,
                    "coeff": rc.coeff,
                    "location": rc.location,
                    "source": chosen["source"],
                },
            )
        )
    instructions = settings.instructions
    if instructions is None:
        instructions = tuple(p.source.add for p in prepared[:1] if p.source.kind == "pair")
    for text in instructions:
        arms.append(Arm(f"prompting: {text!r}", prefix=text, kind="prompting"))
    # fluency of every steering arm, measured as in the search (the random control: the mean
    # over its directions)
    for a in arms:
        if a.kind in ("steering", "reference"):
            a.info["fluency"] = fluency_scores(lm, [a.rows_for(0)], texts, kind=settings.fluency)[0]
    if settings.controls:
        flu = fluency_scores(lm, [[r] for r in randoms], texts, kind=settings.fluency)
        next(a for a in arms if a.name == "random").info["fluency"] = float(np.mean(flu))
    test_seed = settings.seed + TEST_SEED_OFFSET
    if test_seed < settings.seed + settings.samples:  # cannot happen with sane sample counts
        raise ActAddError("held-out seeds would overlap the tuning seeds: lower samples")
    rows = score_arms(
        lm,
        test_prompts,
        arms,
        score,
        samples=settings.test_samples,
        seed=test_seed,
        tokens_to_generate=settings.tokens_to_generate,
        temperature=settings.temperature,
        top_p=settings.top_p,
        freq_penalty=settings.freq_penalty,
        batch_size=settings.batch_size,
    )
    heldout, contrasts, per_prompt = summarize_arms(
        rows,
        arms,
        contrasts=[("chosen", a.name) for a in arms if a.name != "chosen"],
        direction=settings.direction,
        seed=settings.seed,
    )
    vector = prepared[c.source].vector(
        c.layer,
        c.coeff,
        c.location,
        tune={
            "metric": metric if isinstance(metric, str) else getattr(metric, "__name__", "custom"),
            "fluency": settings.fluency,
            "budget": settings.limit,
            "tune_delta": chosen["delta"],
            "tune_fluency": chosen["fluency"],
            "heldout": heldout[heldout.arm == "chosen"].iloc[0].to_dict(),
            "contrasts": contrasts.to_dict("records"),
            "prompts": {"tune": tune_prompts, "test": test_prompts},
        },
    )
    naive = len(search.grid) * len(tune_prompts) * settings.samples
    stats = {
        "configurations": len(search.grid),
        "over_budget": int((trials.status == "over budget").sum()),
        "complete": len(done),
        "rounds": search.rungs,
        "search_completions": search.generated,
        "naive_grid_completions": naive + len(tune_prompts) * settings.samples,
        "heldout_completions": len(rows),
        "fluency_seconds": round(search.seconds["fluency"], 1),
        "search_generation_seconds": round(search.seconds["generation"], 1),
        "search_seconds": round(search_seconds, 1),
        "heldout_seconds": round(time.perf_counter() - t0, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "optuna_trials": len(study.trials),
    }
    return TuneResult(
        settings=settings,
        sources=[s.spec for s in src_list],
        metric=metric if isinstance(metric, str) else None,
        words=list(words) if words else None,
        target=target,
        prompts=prompt_names,
        split={"tune": tune_prompts, "test": test_prompts},
        trials=trials,
        pareto=pareto_front(trials, direction=settings.direction),
        chosen=chosen,
        heldout=heldout,
        contrasts=contrasts,
        per_prompt=per_prompt,
        rows=rows,
        vector=vector,
        stats=stats,
        model=lm.name,
    )


def _info(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("layer", "coeff", "location", "source", "fluency") if k in row}


def check_reference(text: str) -> tuple[int, float] | tuple[int, float, str]:
    """``"6:5"`` or ``"6:5:front"`` → a reference configuration (layer, coeff[, location])."""
    parts = text.split(":")
    try:
        layer, coeff = int(parts[0]), check_finite(parts[1], "reference coefficient")
    except (IndexError, ValueError) as e:
        raise ActAddError(
            f"cannot read reference {text!r}: write LAYER:COEFF or LAYER:COEFF:LOCATION"
        ) from e
    if len(parts) == 3:
        return (layer, coeff, check_location(parts[2]))
    if len(parts) > 3:
        raise ActAddError(f"cannot read reference {text!r}: write LAYER:COEFF[:LOCATION]")
    return (layer, coeff)
