"""What ``actadd.tune`` is asked (``TuneSettings``) and what it returns (``TuneResult``): the
tables, the chosen vector, the Pareto front, and the files they are saved as and read from.

Files written by ``TuneResult.save(out)``:

* ``report.json``: settings, sources, the prompt split, the choice, the held-out summary and
  contrasts, run statistics and the command that reproduces the run;
* ``trials.csv`` (every configuration tried), ``pareto.csv``, ``heldout.csv``,
  ``contrasts.csv``, ``per_prompt.csv``, ``completions.csv.gz`` (the held-out completions);
* ``chosen.safetensors``: the chosen configuration as a ``SteeringVector`` with provenance,
  scores and the recipe that rebuilds it (``actadd.sources.additions_of``);
* ``pareto.png``, ``steerability.png`` and ``report.html`` (needs ``actadd[research]``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from actadd.errors import ActAddError, check_finite
from actadd.positions import check_location
from actadd.vectors import SteeringVector

__all__ = ["TuneResult", "TuneSettings", "pareto_front"]

log = logging.getLogger(__name__)

_DEFAULT_BUDGET = {"ppl": 1.25, "kl": 0.25}


@dataclass(frozen=True)
class TuneSettings:
    """Everything ``tune`` can be told besides the model, sources, prompts and metric.

    Args:
        layers: layers to search (default: about six over the first two thirds).
        coeffs: coefficients to search (default: 1–12 for pairs, norms 4–64 for vectors).
        locations: where additions land (default: each source's own: pairs ``front``,
            vectors ``all``); several are searched.
        direction: ``maximize`` the metric or ``minimize`` it.
        fluency: ``ppl`` (perplexity ratio of neutral text) or ``kl`` (next-token KL, nats).
        budget: the largest fluency cost allowed (default 1.25 for ``ppl``, 0.25 for ``kl``).
        neutral: texts for the fluency measure (a shipped name, a file or a list).
        samples: completions per tune prompt for the finalists.
        min_samples, eta: successive halving: the first round's completions per prompt, and
            the factor by which rounds grow (and the field shrinks).
        trials: configurations to try (None: all of the grid; fewer: Optuna's TPE picks).
        batch_trials: configurations proposed per batch when ``trials`` is set.
        test_fraction: the share of prompts held out for the test.
        test_samples: completions per test prompt, with fresh seeds.
        controls: random directions for the random control (0: none).
        instructions: prompting baselines, prefixed to each test prompt (default: the pair's
            positive prompt, as in the ActAdd paper); ``()`` for none.
        references: configurations of the chosen source to test too, ``(layer, coeff)`` or
            ``(layer, coeff, location)``, e.g. a default you want to beat.
        tokens_to_generate, temperature, top_p, freq_penalty: sampling (the original
            library's house settings by default).
        seed: of the split, the sampler and the completions (completion ``i`` of every
            configuration uses seed ``seed + i``; test completions ``seed + 1,000,000 + i``).
        batch_size: rows per ``generate`` call (default: what fits); results do not depend on it.
    """

    layers: tuple[int, ...] | None = None
    coeffs: tuple[float, ...] | None = None
    locations: tuple[str, ...] | None = None
    direction: str = "maximize"
    fluency: str = "ppl"
    budget: float | None = None
    neutral: str | tuple[str, ...] = "neutral"
    samples: int = 8
    min_samples: int = 2
    eta: int = 2
    trials: int | None = None
    batch_trials: int = 8
    test_fraction: float = 0.5
    test_samples: int = 8
    controls: int = 4
    instructions: tuple[str, ...] | None = None
    references: tuple[tuple[Any, ...], ...] = ()
    tokens_to_generate: int = 40
    temperature: float = 1.0
    top_p: float = 0.3
    freq_penalty: float = 1.0
    seed: int = 0
    batch_size: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.direction not in ("maximize", "minimize"):
            raise ActAddError(f"direction must be 'maximize' or 'minimize', got {self.direction!r}")
        if self.fluency not in _DEFAULT_BUDGET:
            raise ActAddError(f"fluency must be 'ppl' or 'kl', got {self.fluency!r}")
        budget = _DEFAULT_BUDGET[self.fluency] if self.budget is None else self.budget
        put("budget", check_finite(budget, "budget"))
        if self.layers is not None:
            put("layers", tuple(int(x) for x in self.layers))
            if not self.layers:
                raise ActAddError("layers is empty: give e.g. layers=[4, 6, 8]")
        if self.coeffs is not None:
            put("coeffs", tuple(check_finite(c, "coeff") for c in self.coeffs))
            if not self.coeffs:
                raise ActAddError("coeffs is empty: give e.g. coeffs=[2, 5, 10]")
        if self.locations is not None:
            put("locations", tuple(check_location(x) for x in self.locations))
        if not isinstance(self.neutral, str):
            put("neutral", tuple(str(t) for t in self.neutral))
        for name, lo in (("samples", 1), ("min_samples", 1), ("eta", 2), ("test_samples", 1)):
            if int(getattr(self, name)) < lo:
                raise ActAddError(f"{name} must be >= {lo}, got {getattr(self, name)}")
        if self.min_samples > self.samples:
            raise ActAddError(
                f"min_samples ({self.min_samples}) must not exceed samples ({self.samples})"
            )
        if self.trials is not None and self.trials < 1:
            raise ActAddError(
                f"trials must be >= 1 (or None for the whole grid), got {self.trials}"
            )
        if self.controls < 0 or self.batch_trials < 1 or self.tokens_to_generate < 1:
            raise ActAddError("controls must be >= 0, batch_trials and tokens_to_generate >= 1")
        if self.instructions is not None:
            put("instructions", tuple(str(t) for t in self.instructions))
        refs = []
        for r in self.references:
            r = tuple(r)
            if len(r) not in (2, 3):
                raise ActAddError(f"a reference is (layer, coeff) or (layer, coeff, location): {r}")
            ref = (int(r[0]), check_finite(r[1], "reference coeff"))
            refs.append(ref + ((check_location(r[2]),) if len(r) == 3 else ()))
        put("references", tuple(refs))
        for name in ("temperature", "top_p", "freq_penalty", "test_fraction"):
            put(name, check_finite(getattr(self, name), name))

    @property
    def limit(self) -> float:
        """The budget as a number (``budget`` after its default is filled in)."""
        return float(self.budget if self.budget is not None else _DEFAULT_BUDGET[self.fluency])

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TuneSettings:
        known = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known
        }
        if "references" in kw:
            kw["references"] = tuple(tuple(r) for r in kw["references"])
        return cls(**kw)


def pareto_front(trials: pd.DataFrame, *, direction: str = "maximize") -> pd.DataFrame:
    """The configurations no other beats on both effect and fluency cost, among those measured
    with the full sample count (``status == "complete"``: their effects are comparable).

    Example:
        >>> t = pd.DataFrame({"delta": [0.1, 0.3, 0.2], "fluency": [1.0, 1.2, 1.3],
        ...                   "status": ["complete"] * 3})
        >>> pareto_front(t)[["delta", "fluency"]].values.tolist()
        [[0.1, 1.0], [0.3, 1.2]]
    """
    d = trials[(trials.status == "complete") & trials.delta.notna()]
    sign = 1.0 if direction == "maximize" else -1.0
    keep = []
    for i, r in d.iterrows():
        dominated = (
            (sign * d.delta >= sign * r.delta)
            & (d.fluency <= r.fluency)
            & ((sign * d.delta > sign * r.delta) | (d.fluency < r.fluency))
        ).any()
        if not dominated:
            keep.append(i)
    return d.loc[keep].sort_values("fluency").reset_index(drop=True)


@dataclass
class TuneResult:
    """The outcome of ``actadd.tune`` (see its module docs for how each part is made)."""

    settings: TuneSettings
    sources: list[str]
    metric: str | None
    words: list[str] | None
    target: str | None
    prompts: str | None  # the prompt list's name or file, if given so
    split: dict[str, list[str]]
    trials: pd.DataFrame
    pareto: pd.DataFrame
    chosen: dict[str, Any]
    heldout: pd.DataFrame
    contrasts: pd.DataFrame
    per_prompt: pd.DataFrame
    rows: pd.DataFrame
    vector: SteeringVector
    stats: dict[str, Any]
    model: str = ""

    # -- the command that reproduces the run ----------------------------------------------------
    def command(self, out: str | os.PathLike[str] = "tune-results") -> str:
        """One shell line that reruns this search (same split, seeds and settings)."""
        from actadd.loading import EMBEDDED_LABEL

        s = self.settings
        args = ["actadd", "tune"]
        for spec in self.sources:
            args += ["--source", spec]
        if self.prompts is not None:
            args += ["--prompts", self.prompts]
        else:
            for p in self.split["tune"] + self.split["test"]:
                args += ["--prompt", p]
        args += ["--metric", self.metric or "CUSTOM"]
        if self.words:
            args += ["--words", ",".join(self.words)]
        if self.target:
            args += ["--target", self.target]
        if s.layers:
            args += ["--layers", ",".join(str(x) for x in s.layers)]
        if s.coeffs:
            args += ["--coeffs", ",".join(f"{c:g}" for c in s.coeffs)]
        if s.locations:
            args += ["--locations", ",".join(s.locations)]
        if s.direction != "maximize":
            args += ["--direction", s.direction]
        args += ["--fluency", s.fluency, "--budget", f"{s.limit:g}"]
        if isinstance(s.neutral, str) and s.neutral != "neutral":
            args += ["--neutral", s.neutral]
        args += ["--samples", str(s.samples), "--min-samples", str(s.min_samples)]
        args += ["--eta", str(s.eta)]
        if s.trials is not None:
            args += ["--trials", str(s.trials), "--batch-trials", str(s.batch_trials)]
        args += ["--test-fraction", f"{s.test_fraction:g}", "--test-samples", str(s.test_samples)]
        args += ["--controls", str(s.controls)]
        if s.instructions is not None:
            args += [a for text in s.instructions for a in ("--instruction", text)]
            if not s.instructions:
                args += ["--no-instructions"]
        for r in s.references:
            args += [
                "--reference",
                ":".join(f"{x:g}" if isinstance(x, float) else str(x) for x in r),
            ]
        args += ["--tokens", str(s.tokens_to_generate), "--temperature", f"{s.temperature:g}"]
        args += ["--top-p", f"{s.top_p:g}", "--freq-penalty", f"{s.freq_penalty:g}"]
        args += ["--seed", str(s.seed), "--out", str(out)]
        if self.model and self.model != EMBEDDED_LABEL:
            args += ["--model", self.model]
        line = shlex.join(args)
        if self.metric is None:
            line += "  # the metric was a Python function: pass it to actadd.tune(metric=...)"
        if not isinstance(s.neutral, str):
            line += "  # neutral texts were a Python list: pass them as a .txt file (--neutral)"
        return line

    # -- files ---------------------------------------------------------------------------------
    def save(self, out: str | os.PathLike[str], *, plots: bool = True) -> list[Path]:
        """Write the report files to ``out/`` (see the module docs); returns their paths."""
        outdir = Path(out)
        outdir.mkdir(parents=True, exist_ok=True)
        written = []
        tables = {
            "trials.csv": self.trials,
            "pareto.csv": self.pareto,
            "heldout.csv": self.heldout,
            "contrasts.csv": self.contrasts,
            "per_prompt.csv": self.per_prompt,
        }
        for name, df in tables.items():
            df.to_csv(outdir / name, index=False)
            written.append(outdir / name)
        rows = outdir / "completions.csv.gz"
        self.rows.to_csv(rows, index=False, compression={"method": "gzip", "mtime": 0})
        written.append(rows)
        self.vector.save(outdir / "chosen.safetensors")
        written.append(outdir / "chosen.safetensors")
        report = {
            "model": self.model,
            "sources": self.sources,
            "metric": self.metric,
            "words": self.words,
            "target": self.target,
            "prompts": self.prompts,
            "settings": self.settings.to_dict(),
            "split": self.split,
            "chosen": _jsonable(self.chosen),
            "heldout": _jsonable(self.heldout.to_dict("records")),
            "contrasts": _jsonable(self.contrasts.to_dict("records")),
            "stats": self.stats,
            "command": self.command(outdir),
        }
        (outdir / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
        written.append(outdir / "report.json")
        if plots:
            written += self._plots(outdir)
        return written

    def _plots(self, outdir: Path) -> list[Path]:
        from actadd import html_report
        from actadd import plots as P

        metric = self.metric or "metric"
        pareto = P.pareto_plot(
            self.trials,
            budget=self.settings.limit,
            fluency_label=_FLUENCY_LABEL[self.settings.fluency],
            effect_label=f"Δ {P.axis_label(metric)} on tune prompts (paired)",
            chosen=self.chosen,
            direction=self.settings.direction,
        )
        effects = P.effects_plot(
            self.per_prompt,
            self.heldout,
            effect_label=f"Δ {P.axis_label(metric)} per test prompt (paired)",
            direction=self.settings.direction,
        )
        paths = [P.save_figure(pareto, outdir / "pareto.png")]
        paths.append(P.save_figure(effects, outdir / "steerability.png"))
        html = html_report.page(
            f"actadd tune: {', '.join(self.sources)} on {self.model}",
            [
                ("Command", html_report.code(self.command(outdir))),
                ("Choice", html_report.table(pd.DataFrame([self.chosen]))),
                ("Held-out test", html_report.table(self.heldout)),
                ("Contrasts (paired, same prompts and seeds)", html_report.table(self.contrasts)),
                ("Pareto front (tune prompts)", html_report.figure(pareto)),
                ("Pareto configurations", html_report.table(self.pareto)),
                ("Steerability per test prompt", html_report.figure(effects)),
                ("Every configuration", html_report.table(self.trials)),
                ("Run", html_report.table(pd.DataFrame([self.stats]))),
            ],
        )
        (outdir / "report.html").write_text(html, encoding="utf-8")
        return [*paths, outdir / "report.html"]

    @classmethod
    def load(cls, out: str | os.PathLike[str]) -> TuneResult:
        """Read a report written by ``save``; raises naming the missing file."""
        outdir = Path(out)
        need = [
            "report.json",
            "trials.csv",
            "pareto.csv",
            "heldout.csv",
            "contrasts.csv",
            "per_prompt.csv",
            "completions.csv.gz",
            "chosen.safetensors",
        ]
        missing = [n for n in need if not (outdir / n).is_file()]
        if missing:
            raise ActAddError(f"{outdir} is not a complete tune report: missing {missing}")
        report = json.loads((outdir / "report.json").read_text())

        def csv(name: str) -> pd.DataFrame:
            try:
                return pd.read_csv(outdir / name)
            except pd.errors.EmptyDataError:
                return pd.DataFrame()

        return cls(
            settings=TuneSettings.from_dict(report["settings"]),
            sources=report["sources"],
            metric=report["metric"],
            words=report.get("words"),
            target=report.get("target"),
            prompts=report.get("prompts"),
            split=report["split"],
            trials=csv("trials.csv"),
            pareto=csv("pareto.csv"),
            chosen=report["chosen"],
            heldout=csv("heldout.csv"),
            contrasts=csv("contrasts.csv"),
            per_prompt=csv("per_prompt.csv"),
            rows=pd.read_csv(outdir / "completions.csv.gz"),
            vector=SteeringVector.load(outdir / "chosen.safetensors"),
            stats=report["stats"],
            model=report.get("model", ""),
        )

    def summary(self) -> dict[str, Any]:
        """The headline numbers: the choice, its held-out effect, and what it beat."""
        h = self.heldout.set_index("arm")
        out = {
            "chosen": {k: self.chosen[k] for k in ("source", "layer", "coeff", "location")},
            "tune_delta": self.chosen["delta"],
            "fluency": self.chosen["fluency"],
            "heldout_delta": float(h.loc["chosen", "delta"]),
            "heldout_ci": (float(h.loc["chosen", "ci_low"]), float(h.loc["chosen", "ci_high"])),
            "anti_steerable": float(h.loc["chosen", "anti_steerable"]),
        }
        for r in self.contrasts.to_dict("records"):
            out[f"beats {r['against']}"] = bool(r["beats"])
        return out


_FLUENCY_LABEL = {
    "ppl": "perplexity ratio of neutral text (steered / unsteered)",
    "kl": "next-token KL on neutral text (nats)",
}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            return _jsonable(x.item())
        except (ValueError, AttributeError):
            pass
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
