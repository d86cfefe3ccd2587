"""Conditions: steer only the inputs that match (Conditional Activation Steering, CAST).

A ``Condition`` is a direction ``c`` at one site with a threshold and a comparator. It is
checked once per row, on the row's prompt, inside the same batched forward pass that steers:
at its site the prompt's hidden states ``h_t`` (the row's real prompt tokens, or the span the
caller named, e.g. a chat's last user message) are averaged into ``h``, and the row's score is
CAST's (Lee et al. 2024, IBM's ``activation-steering``)::

    score = cos(h, tanh(ĉ ĉᵀ h))        ĉ = c / ‖c‖

the cosine between the mean hidden state and the tanh of its projection on the condition
direction. The condition holds when ``score > threshold`` (``comparator=">"``) or
``score < threshold`` (``"<"``). Conditions compose: ``a | b`` (``AnyOf``), ``a & b``
(``AllOf``), ``~a`` (``Not``), and ``actadd.Conditioned(additions, condition)`` is steering
that applies to a row only if the condition holds for it (``actadd.steering``).

``Condition.fit`` builds one from two prompt sets (the behaviour to detect and the rest): at
each candidate layer a direction (mean difference, or PCA like CAST), then the threshold and
comparator with the best F1 on a training split; it reports precision, recall and F1 on the
held-out split.

Files: ``save``/``load`` write safetensors with metadata, like steering vectors.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pandas as pd
import torch
from torch import Tensor

from actadd import progress
from actadd.errors import ActAddError, VectorFileError, check_finite
from actadd.hooks import capture
from actadd.model import LM, as_lm
from actadd.provenance import provenance
from actadd.sites import Site, canonical_act_name, parse_site

__all__ = [
    "AllOf",
    "AnyOf",
    "Condition",
    "ConditionFit",
    "Conditional",
    "Not",
    "list_prompt_sets",
    "load_prompts",
]

log = logging.getLogger(__name__)

COMPARATORS = (">", "<")
FORMAT = "actadd.condition"
FORMAT_VERSION = "1"


@runtime_checkable
class Conditional(Protocol):
    """Anything that decides per row: a ``Condition`` or a composition of them."""

    def leaves(self) -> list[Condition]: ...

    def holds(self, scores: Mapping[Condition, Tensor]) -> Tensor: ...

    def describe(self) -> str: ...


class _Composable:
    def __or__(self, other: Conditional) -> AnyOf:
        return AnyOf((self, other))  # type: ignore[arg-type]

    def __and__(self, other: Conditional) -> AllOf:
        return AllOf((self, other))  # type: ignore[arg-type]

    def __invert__(self) -> Not:
        return Not(self)  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class Condition(_Composable):
    """A direction at a site, a threshold and a comparator (see the module docs).

    Args:
        direction: the condition direction ``c``, ``[D]``.
        site: where it is read: a layer (``blocks.L.hook_resid_pre``) or a site name.
        threshold: the score threshold.
        comparator: ``">"`` (holds above the threshold) or ``"<"``.
        meta: provenance (model, data, fit scores), kept through files.

    Example:
        >>> import torch
        >>> c = Condition(torch.tensor([1.0, 0.0]), 3, threshold=0.5)
        >>> c.site, c.holds({c: torch.tensor([0.9, 0.1])}).tolist()
        ('blocks.3.hook_resid_pre', [True, False])
    """

    direction: Tensor
    site: str | int
    threshold: float = 0.0
    comparator: str = ">"
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        d = torch.as_tensor(self.direction).detach().float().reshape(-1)
        if d.numel() == 0 or not torch.isfinite(d).all() or float(d.norm()) == 0:
            raise ActAddError("a condition needs a finite, non-zero direction [D]")
        if self.comparator not in COMPARATORS:
            raise ActAddError(f"comparator must be '>' or '<', got {self.comparator!r}")
        object.__setattr__(self, "direction", d)
        object.__setattr__(self, "site", canonical_act_name(self.site))
        object.__setattr__(self, "threshold", check_finite(self.threshold, "threshold"))
        object.__setattr__(self, "meta", dict(self.meta))

    @property
    def d_model(self) -> int:
        return int(self.direction.shape[0])

    def resolve_site(self, lm: LM) -> Site:
        if self.d_model != lm.d_model:
            raise ActAddError(
                f"this condition has width {self.d_model} but {lm.name} has d_model="
                f"{lm.d_model}: it was made for another model ({self.meta.get('model', '?')})"
            )
        return parse_site(self.site, lm.n_layers)

    def score(self, mean_hidden: Tensor) -> Tensor:
        """CAST's score of each row's mean hidden state ``[B, D]`` → ``[B]``."""
        h = mean_hidden.float()
        c = self.direction.to(h.device)
        c = c / c.norm()
        projected = torch.tanh((h @ c)[:, None] * c[None, :])  # [B, D]
        return torch.nn.functional.cosine_similarity(h, projected, dim=-1, eps=1e-12)

    def leaves(self) -> list[Condition]:
        return [self]

    def holds(self, scores: Mapping[Condition, Tensor]) -> Tensor:
        s = scores[self]
        return s > self.threshold if self.comparator == ">" else s < self.threshold

    def with_threshold(self, threshold: float, comparator: str | None = None) -> Condition:
        return Condition(
            self.direction, self.site, threshold, comparator or self.comparator, self.meta
        )

    def describe(self) -> str:
        name = self.meta.get("name") or self.meta.get("data", {}).get("positive", "condition")
        return f"{name} @ {self.site} (score {self.comparator} {self.threshold:.4g})"

    def __repr__(self) -> str:
        return f"Condition({self.describe()}, d_model={self.d_model})"

    # -- files --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a ``.safetensors`` file: the direction and the rest as metadata."""
        from safetensors.torch import save_file

        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "site": str(self.site),
            "threshold": repr(self.threshold),
            "comparator": self.comparator,
            "meta": json.dumps(dict(self.meta), default=str),
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({"direction": self.direction.contiguous()}, str(path), metadata=header)

    @classmethod
    def load(cls, path: str | os.PathLike[str], lm: LM | None = None) -> Condition:
        """Read a file written by ``save``; with ``lm``, check that it fits that model."""
        from safetensors import SafetensorError, safe_open

        p = Path(path)
        if not p.is_file():
            raise VectorFileError(f"no such condition file: {p}")
        try:
            with safe_open(str(p), framework="pt") as f:
                header = f.metadata() or {}
                if header.get("format") != FORMAT:
                    raise VectorFileError(
                        f"{p} is not an actadd condition (format={header.get('format')!r}; a "
                        "steering vector loads with SteeringVector.load)"
                    )
                direction = f.get_tensor("direction")
        except (SafetensorError, OSError, RuntimeError) as e:
            raise VectorFileError(f"{p} is not a readable condition file: {e}") from e
        try:
            meta = json.loads(header.get("meta", "{}"))
            c = cls(
                direction, header["site"], float(header["threshold"]), header["comparator"], meta
            )
        except (KeyError, ValueError, RecursionError) as e:
            raise VectorFileError(f"{p} is damaged: {e}") from e
        if lm is not None:
            c.resolve_site(lm)
            fp = c.meta.get("fingerprint")
            if fp and fp != lm.fingerprint:
                raise VectorFileError(
                    f"{p} was made for {c.meta.get('model')} (fingerprint {fp}), not {lm.name}"
                )
        return c

    # -- fitting --------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        lm: LM,
        positive: Sequence[str] | str | os.PathLike[str],
        negative: Sequence[str] | str | os.PathLike[str],
        *,
        layers: Iterable[int | str] | None = None,
        method: str = "mean_diff",
        test_fraction: float = 0.3,
        seed: int = 0,
        batch_size: int = 16,
        name: str | None = None,
    ) -> ConditionFit:
        """Find the layer, threshold and comparator that best tell ``positive`` prompts from
        ``negative`` ones (F1 on a training split), and score them on the held-out rest.

        Args:
            lm: the model.
            positive, negative: prompts (lists, or files: one per line, or JSONL with a
                ``prompt``/``text`` field).
            layers: candidate layers (default: every layer from 1 to the last).
            method: ``mean_diff`` (difference of the class means) or ``pca`` (first
                principal component of the centred readings, signed towards positive).
            test_fraction: the share of each set held out for the reported scores.
            seed: shuffles the split.
            batch_size: prompts per forward pass.
            name: what the condition detects (kept in its metadata).

        Returns:
            A ``ConditionFit``: the best ``condition`` (fitted on the training split) and a
            ``table`` with one row per layer (train F1, held-out precision/recall/F1).

        Example:
            >>> fit = Condition.fit(lm, "legal.txt", "other.txt")  # doctest: +SKIP
            >>> fit.condition.save("legal.safetensors")  # doctest: +SKIP
        """
        lm = as_lm(lm)
        pos, neg = load_prompts(positive, "positive"), load_prompts(negative, "negative")
        if method not in ("mean_diff", "pca"):
            raise ActAddError(f"method must be 'mean_diff' or 'pca', got {method!r}")
        if not 0 < test_fraction < 1:
            raise ActAddError(f"test_fraction must be in (0, 1), got {test_fraction}")
        rng = random.Random(seed)
        splits = {}
        for label, prompts in (("pos", pos), ("neg", neg)):
            order = list(range(len(prompts)))
            rng.shuffle(order)
            n_test = max(1, round(len(order) * test_fraction))
            if len(order) - n_test < 1:
                raise ActAddError(f"need at least 2 {label}itive-class prompts to split")
            splits[label] = (
                [prompts[i] for i in order[n_test:]],
                [prompts[i] for i in order[:n_test]],
            )
        candidates = list(layers) if layers is not None else list(range(1, lm.n_layers))
        sites = list(dict.fromkeys(parse_site(c, lm.n_layers) for c in candidates))
        texts = [*splits["pos"][0], *splits["neg"][0], *splits["pos"][1], *splits["neg"][1]]
        means = _mean_hidden(lm, texts, sites, batch_size)  # site -> [N, D]
        n_tr_p, n_tr_n, n_te_p = (
            len(splits["pos"][0]),
            len(splits["neg"][0]),
            len(splits["pos"][1]),
        )
        y_train = torch.tensor([True] * n_tr_p + [False] * n_tr_n)
        y_test = torch.tensor([True] * n_te_p + [False] * len(splits["neg"][1]))
        rows, best = [], None
        for site in sites:
            h = means[site]
            train, test = h[: n_tr_p + n_tr_n], h[n_tr_p + n_tr_n :]
            direction = _direction(train[:n_tr_p], train[n_tr_p:], method)
            probe = cls(direction, site.name)
            s_train, s_test = probe.score(train), probe.score(test)
            threshold, comparator, f1_train = _best_threshold(s_train, y_train)
            fitted = probe.with_threshold(threshold, comparator)
            held = _prf(fitted.holds({fitted: s_test}), y_test)
            rows.append(
                {
                    "site": site.name,
                    "layer": site.layer,
                    "threshold": threshold,
                    "comparator": comparator,
                    "f1_train": f1_train,
                    **held,
                }
            )
            if best is None or f1_train > best[0]:
                best = (f1_train, fitted, held)
        assert best is not None
        _, fitted, held = best
        data = {"positive": name or "positive", "n_positive": len(pos), "n_negative": len(neg)}
        meta = provenance(
            lm,
            method=method,
            data=data,
            name=name or "condition",
            test_fraction=test_fraction,
            seed=seed,
            scores=held,
        )
        condition = fitted.with_threshold(fitted.threshold)
        object.__setattr__(condition, "meta", meta)
        return ConditionFit(condition, pd.DataFrame(rows))


@dataclass(frozen=True)
class ConditionFit:
    """The fitted ``condition`` and, per candidate layer, its train F1 and held-out
    ``precision``, ``recall`` and ``f1``."""

    condition: Condition
    table: pd.DataFrame

    @property
    def scores(self) -> dict[str, float]:
        return dict(self.condition.meta.get("scores", {}))


@dataclass(frozen=True, eq=False)
class AnyOf(_Composable):
    """Holds when any of ``conditions`` holds."""

    conditions: tuple[Conditional, ...]

    def leaves(self) -> list[Condition]:
        return list(dict.fromkeys(leaf for c in self.conditions for leaf in c.leaves()))

    def holds(self, scores: Mapping[Condition, Tensor]) -> Tensor:
        return torch.stack([c.holds(scores) for c in self.conditions]).any(0)

    def describe(self) -> str:
        return "(" + " or ".join(c.describe() for c in self.conditions) + ")"


@dataclass(frozen=True, eq=False)
class AllOf(_Composable):
    """Holds when every one of ``conditions`` holds."""

    conditions: tuple[Conditional, ...]

    def leaves(self) -> list[Condition]:
        return list(dict.fromkeys(leaf for c in self.conditions for leaf in c.leaves()))

    def holds(self, scores: Mapping[Condition, Tensor]) -> Tensor:
        return torch.stack([c.holds(scores) for c in self.conditions]).all(0)

    def describe(self) -> str:
        return "(" + " and ".join(c.describe() for c in self.conditions) + ")"


@dataclass(frozen=True, eq=False)
class Not(_Composable):
    """Holds when ``condition`` does not."""

    condition: Conditional

    def leaves(self) -> list[Condition]:
        return self.condition.leaves()

    def holds(self, scores: Mapping[Condition, Tensor]) -> Tensor:
        return ~self.condition.holds(scores)

    def describe(self) -> str:
        return f"not {self.condition.describe()}"


def list_prompt_sets() -> list[str]:
    """Names of the prompt sets shipped with actadd (``legal``: 60 questions asking for legal
    advice; ``other``: 60 everyday questions), for ``load_prompts(name)``."""
    files = resources.files("actadd") / "data" / "prompts"
    return sorted(f.name[: -len(".txt")] for f in files.iterdir() if f.name.endswith(".txt"))


def load_prompts(
    source: Sequence[str] | str | os.PathLike[str], what: str = "prompts"
) -> list[str]:
    """Prompts from a list, a shipped set (``list_prompt_sets()``), or a file: plain text (one
    per line) or JSONL (``prompt``, ``text`` or ``question``)."""
    if isinstance(source, str) and source in list_prompt_sets():
        source = str(resources.files("actadd") / "data" / "prompts" / f"{source}.txt")
    if isinstance(source, (str, os.PathLike)) and not (isinstance(source, str) and "\n" in source):
        p = Path(source)
        if not p.is_file():
            shipped = ", ".join(list_prompt_sets())
            raise ActAddError(f"{what}: file not found: {p} (shipped prompt sets: {shipped})")
        lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        if p.suffix.lower() == ".jsonl":
            out = []
            for i, line in enumerate(lines, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ActAddError(f"{p}:{i}: not JSON ({e})") from e
                text = next((row[k] for k in ("prompt", "text", "question") if k in row), None)
                if not isinstance(text, str):
                    raise ActAddError(f"{p}:{i}: needs a 'prompt' (or 'text') string field")
                out.append(text)
        else:
            out = [line.strip() for line in lines]
    else:
        out = [str(t) for t in source]
    if not out or any(not t.strip() for t in out):
        raise ActAddError(f"{what}: an empty prompt set (or an empty prompt): give some prompts")
    return out


# -- fitting helpers ------------------------------------------------------------------------------
@torch.no_grad()
def _mean_hidden(
    lm: LM, texts: list[str], sites: list[Site], batch_size: int
) -> dict[Site, Tensor]:
    """Each text's mean hidden state over its tokens at each site: ``{site: [N, D]}``."""
    out: dict[Site, list[Tensor]] = {s: [] for s in sites}
    for lo in range(0, len(texts), batch_size):
        progress.report("reading prompts", lo, len(texts))
        chunk = [lm.token_ids(t) for t in texts[lo : lo + batch_size]]
        ids, mask = lm.pad(chunk, side="right")
        acts = capture(lm, ids, sites, attention_mask=mask)
        w = mask.float()[..., None]  # [B, T, 1]
        for s in sites:
            h = acts[s].float()
            out[s].append(((h * w).sum(1) / w.sum(1)).cpu())
    progress.report("reading prompts", len(texts), len(texts))
    return {s: torch.cat(v) for s, v in out.items()}


def _direction(pos: Tensor, neg: Tensor, method: str) -> Tensor:
    diff = pos.mean(0) - neg.mean(0)
    if method == "mean_diff":
        return diff
    x = torch.cat([pos, neg]).double()
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    pc = vh[0].float()
    return pc if float(pc @ diff) >= 0 else -pc


def _prf(pred: Tensor, truth: Tensor) -> dict[str, float]:
    tp = float((pred & truth).sum())
    precision = tp / max(float(pred.sum()), 1.0)
    recall = tp / max(float(truth.sum()), 1.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _best_threshold(scores: Tensor, truth: Tensor) -> tuple[float, str, float]:
    """The threshold (a midpoint between neighbouring scores) and comparator with the best
    F1; ties go to the threshold with the widest gap around it."""
    values = torch.sort(torch.unique(scores)).values
    mids = ((values[1:] + values[:-1]) / 2).tolist() or [float(values[0])]
    gaps = (values[1:] - values[:-1]).tolist() or [0.0]
    best = (-1.0, -1.0, 0.0, ">")
    for t, gap in zip(mids, gaps, strict=True):
        for comparator in COMPARATORS:
            pred = scores > t if comparator == ">" else scores < t
            f1 = _prf(pred, truth)["f1"]
            if (f1, gap) > best[:2]:
                best = (f1, gap, t, comparator)
    return best[2], best[3], best[0]
