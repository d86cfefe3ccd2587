"""Evaluation suites: several behaviours × methods on one model, one HTML report and a CSV.

A suite is a YAML file (``actadd eval SUITE.yaml``; ``quick`` is shipped and runs on the
embedded model in a few minutes):

.. code-block:: yaml

    samples: 4                 # completions per prompt and method (same seeds for all)
    tokens: 30
    behaviours:
      - name: sentiment
        metric: sentiment      # a name in actadd.metrics.METRICS
        prompts: sentiment     # a shipped list, a file, or a list of strings
        methods:
          - {kind: pair, add: Love, sub: Hate, layer: 6, coeff: 5}
          - {kind: mean_diff, pairs: sentiment, layer: 6, coeff: 16}
          - {kind: prompting, instruction: "Write lovingly:"}

Method kinds: ``pair`` (ActAdd), ``mean_diff``, ``pca``, ``optimized`` (from ``pairs``),
``vector`` (a file, ``path``) and ``prompting`` (``instruction`` prefixed to each prompt). For
vectors ``coeff`` is the norm added per token; for pairs it is ActAdd's coefficient.

Every method is scored like the tuner's held-out test (``actadd.heldout``): the paired effect
against the unsteered completion with the same prompt and seed, a bootstrap interval over
prompts, the share of prompts moved the wrong way, the fluency cost on neutral text, and for
each steering method a random direction of the same norm at the same place (``controls``).

The file is checked before anything runs; an error names the field (``behaviours[0].
methods[1].layer: Field required``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from actadd import progress as reporting
from actadd.errors import ActAddError, require
from actadd.heldout import Arm, score_arms, summarize_arms
from actadd.model import LM, as_lm
from actadd.sources import RandomLike, Source

__all__ = ["SuiteResult", "list_suites", "load_suite", "run_suite"]

log = logging.getLogger(__name__)

STEERING_KINDS = ("pair", "mean_diff", "pca", "optimized", "vector")


def _models() -> Any:
    """The pydantic models of a suite (built on first use: pydantic is an optional extra)."""
    require("pydantic", extra="tune", feature="evaluation suites")
    from pydantic import BaseModel, ConfigDict, Field, model_validator

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class Method(Strict):
        kind: Literal["pair", "mean_diff", "pca", "optimized", "vector", "prompting"]
        name: str | None = None
        add: str | None = None
        sub: str = ""
        pad: bool = False
        pairs: str | None = None
        path: str | None = None
        layer: int | None = None
        coeff: float | None = Field(default=None, allow_inf_nan=False)
        location: Literal["front", "mid", "back", "all"] | None = None
        steps: int = Field(default=20, ge=1)
        instruction: str | None = None

        @model_validator(mode="after")
        def needs(self) -> Method:
            need = {
                "pair": ["add"],
                "mean_diff": ["pairs"],
                "pca": ["pairs"],
                "optimized": ["pairs"],
                "vector": ["path"],
                "prompting": ["instruction"],
            }[self.kind]
            if self.kind in STEERING_KINDS:  # a vector file keeps its own layers
                need += ["coeff"] if self.kind == "vector" else ["layer", "coeff"]
            missing = [f for f in need if getattr(self, f) in (None, "")]
            if missing:
                raise ValueError(f"a {self.kind} method needs {', '.join(missing)}")
            return self

        def label(self) -> str:
            if self.name:
                return self.name
            if self.kind == "prompting":
                return f"prompting: {self.instruction!r}"
            if self.kind == "vector":
                return f"vector({self.path}) ×{self.coeff:g}"
            what = f"{self.add!r} − {self.sub!r}" if self.kind == "pair" else self.kind
            return f"{what} L{self.layer} ×{self.coeff:g}"

    class Behaviour(Strict):
        name: str = Field(min_length=1)
        metric: str
        words: list[str] | None = None
        target: str | None = None
        direction: Literal["maximize", "minimize"] = "maximize"
        prompts: str | list[str]
        max_prompts: int | None = Field(default=None, ge=1)
        methods: list[Method] = Field(min_length=1)

        @model_validator(mode="after")
        def distinct(self) -> Behaviour:
            labels = [m.label() for m in self.methods]
            dup = sorted({x for x in labels if labels.count(x) > 1})
            if dup:
                raise ValueError(f"methods named twice: {dup} (give each a distinct name)")
            return self

    class Suite(Strict):
        model: str | None = None
        seed: int = 0
        samples: int = Field(default=4, ge=1)
        tokens: int = Field(default=30, ge=1)
        temperature: float = Field(default=1.0, ge=0, allow_inf_nan=False)
        top_p: float = Field(default=0.3, gt=0, le=1)
        freq_penalty: float = Field(default=1.0, allow_inf_nan=False)
        fluency: Literal["ppl", "kl"] = "ppl"
        neutral: str = "neutral"
        controls: int = Field(default=4, ge=0)
        behaviours: list[Behaviour] = Field(min_length=1)

    return Suite


def list_suites() -> list[str]:
    """Names of the suites shipped with actadd (``load_suite(name)``)."""
    files = resources.files("actadd") / "data" / "suites"
    return sorted(f.name[: -len(".yaml")] for f in files.iterdir() if f.name.endswith(".yaml"))


def load_suite(source: str | os.PathLike[str] | dict[str, Any]) -> Any:
    """A suite, checked: a YAML file, a shipped suite's name, or a dict.

    Raises an ``ActAddError`` naming every bad field (``behaviours[0].methods[1].layer:
    Field required``) or the YAML syntax error's line.

    Example:
        >>> suite = load_suite("quick")
        >>> [b.name for b in suite.behaviours]
        ['sentiment', 'weddings']
    """
    Suite = _models()
    where = "suite"
    if isinstance(source, dict):
        data = source
    else:
        yaml = require("yaml", extra="tune", feature="evaluation suites")
        name = str(source)
        shipped = resources.files("actadd") / "data" / "suites" / f"{name}.yaml"
        if "/" not in name and not name.endswith((".yaml", ".yml")) and shipped.is_file():
            text, where = shipped.read_text(encoding="utf-8"), f"{name} (shipped)"
        else:
            path = Path(source)
            if not path.is_file():
                raise ActAddError(
                    f"no suite {name!r}: give a .yaml file or a shipped suite "
                    f"({', '.join(list_suites())})"
                )
            text, where = path.read_text(encoding="utf-8"), str(path)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ActAddError(f"{where} is not valid YAML{at}: {problem}") from e
        if not isinstance(data, dict):
            raise ActAddError(f"{where}: the top level must be a mapping (model:, behaviours:)")
    from pydantic import ValidationError

    try:
        return Suite.model_validate(data)
    except ValidationError as e:
        problems = [f"{_loc(err['loc'])}: {_msg(err)}" for err in e.errors()]
        raise ActAddError(f"{where}: " + "; ".join(problems)) from None


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _msg(err: Any) -> str:
    if err.get("type") == "extra_forbidden":
        return "unknown field (check its spelling)"
    msg = str(err.get("msg", "invalid"))
    return msg.removeprefix("Value error, ")


@dataclass
class SuiteResult:
    """Per behaviour and method: effects, intervals, fluency (``results``), per-prompt effects
    (``per_prompt``), contrasts with the random controls (``contrasts``) and every completion
    (``rows``)."""

    results: pd.DataFrame
    per_prompt: pd.DataFrame
    contrasts: pd.DataFrame
    rows: pd.DataFrame
    model: str
    seconds: float

    def save(self, out: str | os.PathLike[str], *, title: str = "actadd eval") -> list[Path]:
        """Write ``results.csv``, ``completions.csv.gz`` and a self-contained ``report.html``."""
        from actadd import html_report
        from actadd import plots as P

        outdir = Path(out)
        outdir.mkdir(parents=True, exist_ok=True)
        self.results.to_csv(outdir / "results.csv", index=False)
        self.rows.to_csv(
            outdir / "completions.csv.gz", index=False, compression={"method": "gzip", "mtime": 0}
        )
        grid = self.results[self.results.kind != "unsteered"].pivot_table(
            index="method", columns="behaviour", values="delta", sort=False
        )
        sections = [
            (
                "Effect of each method (paired Δ of the behaviour's metric vs unsteered)",
                html_report.table(grid.reset_index()),
            )
        ]
        for b, res in self.results.groupby("behaviour", sort=False):
            pp = self.per_prompt[self.per_prompt.behaviour == b]
            summary = res[res.kind != "unsteered"]
            fig = P.effects_plot(
                pp,
                summary.rename(columns={"method": "arm"}),
                effect_label=f"Δ {P.axis_label(str(res.metric.iloc[0]))} per prompt (paired)",
                direction=str(res.direction.iloc[0]),
                title=f"{b}: effect per prompt (dots), mean and 95% CI",
            )
            cols = [c for c in res.columns if c not in ("behaviour",)]
            sections.append((f"{b}", html_report.table(res[cols])))
            sections.append((f"{b}: per prompt", html_report.figure(fig)))
            con = self.contrasts[self.contrasts.behaviour == b]
            if len(con):
                sections.append((f"{b}: methods vs their random controls", html_report.table(con)))
        sections.append(("Run", html_report.paragraph(f"model {self.model}; {self.seconds:.0f} s")))
        (outdir / "report.html").write_text(html_report.page(title, sections), encoding="utf-8")
        return [outdir / "results.csv", outdir / "completions.csv.gz", outdir / "report.html"]


def _one_of(randoms: list[RandomLike], seed: int) -> list[RandomLike]:
    """The random direction a completion with this seed is steered by (they take turns)."""
    return [randoms[seed % len(randoms)]]


def run_suite(lm: LM, suite: Any) -> SuiteResult:
    """Score every behaviour's methods (see the module docs).

    Args:
        lm: the model (the suite's ``model:`` is for the command line, which loads it).
        suite: from ``load_suite`` (or a name, path or dict, loaded here).

    Example:
        >>> res = run_suite(actadd.load_model(), "quick")  # doctest: +SKIP
        >>> res.save("eval-report/")  # doctest: +SKIP
    """
    from actadd.datasets import load_prompts, load_texts
    from actadd.metrics import make_metric
    from actadd.tuning import fluency_scores

    lm = as_lm(lm)
    if not hasattr(suite, "behaviours"):
        suite = load_suite(suite)
    started = time.perf_counter()
    texts = load_texts(suite.neutral)
    results, per_prompt, contrasts, all_rows = [], [], [], []
    for bi, b in enumerate(suite.behaviours):
        prompts = load_prompts(b.prompts) if isinstance(b.prompts, str) else list(b.prompts)
        prompts = prompts[: b.max_prompts] if b.max_prompts else prompts
        metric = make_metric(b.metric, words=b.words, target=b.target)
        arms, pairs = [], []
        for m in b.methods:
            if m.kind == "prompting":
                arms.append(Arm(m.label(), prefix=m.instruction, kind="prompting"))
                continue
            src = Source(
                m.kind,
                add=m.add or "",
                sub=m.sub,
                pad=m.pad,
                data=m.pairs or m.path or "",
                steps=m.steps,
            )
            prepared = src.prepare(lm, [] if m.layer is None else [m.layer])
            layer = prepared.layers[0] if m.layer is None else m.layer
            adds = prepared.additions(layer, float(m.coeff), m.location)
            where = m.location or src.default_location
            info = {"layer": layer, "coeff": m.coeff, "location": where, "source": src.label}
            arm = Arm(m.label(), adds, kind="steering", info=info)
            arm.info["fluency"] = fluency_scores(lm, [adds], texts, kind=suite.fluency)[0]
            arms.append(arm)
            if suite.controls:  # random directions of the same norms, one per seed in turn
                randoms = [RandomLike(tuple(adds), seed=k) for k in range(suite.controls)]
                flu = fluency_scores(lm, [[r] for r in randoms], texts, kind=suite.fluency)
                control = Arm(
                    f"random like {m.label()}",
                    partial(_one_of, randoms),
                    kind="control",
                    info={"fluency": sum(flu) / len(flu)},
                )
                arms.append(control)
                pairs.append((arm.name, control.name))
        rows = score_arms(
            lm,
            prompts,
            arms,
            metric,
            samples=suite.samples,
            seed=suite.seed,
            tokens_to_generate=suite.tokens,
            temperature=suite.temperature,
            top_p=suite.top_p,
            freq_penalty=suite.freq_penalty,
        )
        summary, con, pp = summarize_arms(
            rows, arms, contrasts=pairs, direction=b.direction, seed=suite.seed
        )
        summary = summary.rename(columns={"arm": "method", "info_fluency": "fluency"})
        extra = {"behaviour": b.name, "metric": b.metric, "direction": b.direction}
        results.append(summary.assign(**extra))
        per_prompt.append(pp.assign(behaviour=b.name))
        contrasts.append(con.assign(behaviour=b.name))
        all_rows.append(rows.assign(behaviour=b.name))
        reporting.report("suite: behaviours", bi + 1, len(suite.behaviours))
    res = pd.concat(results, ignore_index=True)
    first = ["behaviour", "method", "kind", "metric", "direction"]
    res = res[first + [c for c in res.columns if c not in first]]
    return SuiteResult(
        results=res,
        per_prompt=pd.concat(per_prompt, ignore_index=True),
        contrasts=pd.concat(contrasts, ignore_index=True),
        rows=pd.concat(all_rows, ignore_index=True),
        model=lm.name,
        seconds=time.perf_counter() - started,
    )
