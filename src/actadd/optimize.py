"""Learn a steering vector by gradient descent; the model's weights stay frozen and untouched.

The vector ``v`` is added at one site (``addition_location="all"``: every token) through the
ordinary ``steer`` hooks, whose layouts are differentiable, so the loss reaches ``v`` and
nothing else. Two objectives:

* ``likelihood``: ``target + avoid_weight × avoid``, where ``target`` is the negative
  log-likelihood per token of the target texts (or of completions after prompts) and ``avoid``
  the unlikelihood ``-log(1 - p)`` per token of the texts to avoid;
* ``contrast`` (for paired data, the default then): ``-log σ(β (Δ⁺ − Δ⁻))`` per pair, where
  ``Δ = log p_steered(text) − log p_unsteered(text)``, summed over the text's tokens (BiPO,
  Cao et al. 2024). The tokens both texts of a pair share cancel, so the gradient is about what
  differs (on whole sentences, likelihood is dominated by the shared words).

Both add ``kl_weight × KL(unsteered || steered)`` of the next-token distributions on unrelated
text, so that steering changes what it should and leaves the rest alone, and optionally
``norm_weight × ||v||²``. ``target`` and ``avoid`` are reported for both objectives.

Gradients are taken with ``torch.autograd.grad`` with respect to ``v`` only, while every
parameter's ``requires_grad`` is off (restored afterwards): no parameter ever gets a ``.grad``
and the weights are bit-identical after.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from actadd import progress
from actadd.datasets import ContrastDataset, as_dataset, load_texts
from actadd.errors import ActAddError
from actadd.hooks import capture
from actadd.model import LM, as_lm
from actadd.provenance import provenance
from actadd.sites import Site, parse_site
from actadd.steering import Injection, steer
from actadd.vectors import SteeringVector

__all__ = ["OptimizeResult", "optimize_vector"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Trainable:
    """A steerable whose tensor is the live parameter (no copy), so gradients reach it."""

    site: Site
    v: Tensor  # [D], requires grad

    def injections(self, lm: LM) -> list[Injection]:
        return [Injection(self.site, self.v[None, :], default_location="all")]


@dataclass(frozen=True)
class OptimizeResult:
    """The learned ``vector`` (coeff 1) and the loss curve (one row per step)."""

    vector: SteeringVector
    losses: pd.DataFrame  # step, loss, target, avoid, kl, norm


@dataclass
class _Batch:
    ids: Tensor  # [B, T] right-padded
    mask: Tensor  # [B, T]
    scored: Tensor  # [B, T-1] bool: is token t+1 scored (part of the completion)?


def _batch(lm: LM, items: Sequence[tuple[str, str]]) -> _Batch:
    rows, starts = [], []
    for prompt, text in items:
        ids, start = lm.encode_with_answer(prompt, text)
        if len(ids) < 2:
            raise ActAddError(f"{(prompt + text)!r} is one token: nothing to score after it")
        rows.append(ids)
        starts.append(max(start, 1))
    batch, mask = lm.pad(rows, side="right")
    width = batch.shape[1]
    pos = torch.arange(1, width, device=lm.device)[None, :]  # position of the predicted token
    lengths = torch.tensor([len(r) for r in rows], device=lm.device)[:, None]
    first = torch.tensor(starts, device=lm.device)[:, None]
    return _Batch(batch, mask, (pos >= first) & (pos < lengths))


def _token_logprobs(lm: LM, b: _Batch) -> Tensor:
    """``[B, T-1, V]`` log-probabilities of each next token (float32)."""
    logits = lm.model(input_ids=b.ids, attention_mask=b.mask, use_cache=False).logits
    return torch.log_softmax(logits[:, :-1].float(), -1)


def _chunks(items: list[Any], size: int, step: int) -> list[Any]:
    if not items:
        return []
    lo = (step * size) % len(items)
    out = (items[lo:] + items[:lo])[:size]
    return out


def optimize_vector(
    lm: LM,
    targets: ContrastDataset | str | os.PathLike[str] | Iterable[Any],
    *,
    layer: int | str = 6,
    avoid: Iterable[Any] | None = None,
    neutral: Sequence[str] | str | None = "neutral",
    steps: int = 40,
    lr: float = 0.1,
    batch_size: int = 8,
    avoid_weight: float = 1.0,
    kl_weight: float = 1.0,
    norm_weight: float = 0.0,
    objective: str | None = None,
    beta: float = 1.0,
    init: SteeringVector | None = None,
    callback: Callable[[dict[str, float]], None] | None = None,
) -> OptimizeResult:
    """Gradient-descend a vector at one site so that steered text looks like ``targets``.

    Args:
        lm: the model (never modified).
        targets: texts to make likely: a contrast dataset (its positives become targets and, if
            ``avoid`` is None, its negatives the texts to avoid), or strings, or
            ``(prompt, completion)`` tuples (only the completion is scored).
        layer: an int (``blocks.L.hook_resid_pre``) or a site name.
        avoid: texts or ``(prompt, completion)`` tuples to make unlikely; ``[]`` for none.
        neutral: unrelated texts for the KL penalty (default: the shipped ``neutral`` set);
            None or ``[]`` for none.
        steps: Adam steps; each sees ``batch_size`` targets, avoided and neutral texts.
        lr: Adam's learning rate, in units of the site's typical per-dimension residual
            size, measured on the neutral (or target) texts, so it means the same for any model.
        avoid_weight, kl_weight, norm_weight: weights of the loss terms.
        objective: ``contrast`` or ``likelihood`` (see the module docs); default ``contrast``
            when ``targets`` is a dataset of pairs and ``avoid`` is not given, else
            ``likelihood``.
        beta: the ``contrast`` objective's inverse temperature.
        init: start here instead of at zero.
        callback: called with each step's losses (e.g. for a progress bar).

    Returns:
        ``OptimizeResult(vector, losses)``; ``losses`` has one row per step: ``loss`` (what is
        minimised), ``target``, ``avoid``, ``contrast``, ``kl`` and ``norm`` (of ``v``).

    Example:
        >>> res = optimize_vector(lm, "sentiment", layer=6, steps=30)  # doctest: +SKIP
        >>> res.losses.loss.iloc[-1] < res.losses.loss.iloc[0]  # doctest: +SKIP
        True
    """
    lm = as_lm(lm)
    site = parse_site(layer, lm.n_layers)
    paired = isinstance(targets, (ContrastDataset, str, os.PathLike)) and avoid is None
    tgt, avd, name = _targets(targets, avoid)
    objective = objective or ("contrast" if paired else "likelihood")
    if objective not in ("contrast", "likelihood"):
        raise ActAddError(f"objective must be 'contrast' or 'likelihood', got {objective!r}")
    if objective == "contrast" and len(tgt) != len(avd):
        raise ActAddError(
            "objective='contrast' needs one text to avoid per target (pairs): give a contrast "
            "dataset, or avoid= of the same length as targets"
        )
    texts = load_texts(neutral) if isinstance(neutral, str) else list(neutral or [])
    if steps < 1 or batch_size < 1:
        raise ActAddError("steps and batch_size must be >= 1")
    params = [p for p in lm.model.parameters() if p.requires_grad]
    # residual scale at the site: lr is relative to it
    probe = _batch(lm, [("", t) for t in (texts or [t for _, t in tgt])[:8]])
    with torch.no_grad():
        h = capture(lm, probe.ids, [site], attention_mask=probe.mask)[site].float()
        norms = h[:, 1:].norm(dim=-1)[probe.mask[:, 1:].bool()]
        scale = float(norms.median()) / math.sqrt(lm.d_model)
    if init is not None and site.name not in init.directions:
        raise ActAddError(f"init has sites {init.sites}, not {site.name}")
    v0 = init.directions[site.name] * init.coeff if init is not None else None
    v = (v0.detach().float().clone() if v0 is not None else torch.zeros(lm.d_model)).to(lm.device)
    v.requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr * scale)
    records = []
    try:
        for p in params:
            p.requires_grad_(False)
        for step in range(steps):
            batch = [_chunks(x, batch_size, step) for x in (tgt, avd, texts)]
            terms = _losses(lm, site, v, *batch, beta=beta, contrast=objective == "contrast")
            main = (
                terms["contrast"]
                if objective == "contrast"
                else terms["target"] + avoid_weight * terms["avoid"]
            )
            loss = main + kl_weight * terms["kl"] + norm_weight * v.pow(2).sum()
            (grad,) = torch.autograd.grad(loss, [v])
            opt.zero_grad(set_to_none=True)
            v.grad = grad
            opt.step()
            row = {
                "step": step,
                "loss": float(loss.detach()),
                **{k: float(t.detach()) for k, t in terms.items()},
                "norm": float(v.detach().norm()),
            }
            records.append(row)
            progress.report("optimising", step + 1, steps)
            if callback is not None:
                callback(row)
            log.debug("step %d %s", step, row)
    finally:
        for p in params:
            p.requires_grad_(True)
        v.grad = None
    losses = pd.DataFrame.from_records(records)
    meta = provenance(
        lm,
        method="optimized",
        data=name,
        optimizer={
            "objective": objective,
            "beta": beta,
            "steps": steps,
            "lr": lr,
            "lr_abs": lr * scale,
            "batch_size": batch_size,
            "avoid_weight": avoid_weight,
            "kl_weight": kl_weight,
            "norm_weight": norm_weight,
            "n_neutral": len(texts),
        },
        loss_first=records[0]["loss"],
        loss_last=records[-1]["loss"],
    )
    return OptimizeResult(SteeringVector({site.name: v.detach().clone()}, 1.0, meta), losses)


def _pairs_of(items: Iterable[Any]) -> list[tuple[str, str]]:
    out = []
    for it in items:
        if isinstance(it, str):
            out.append(("", it))
        elif isinstance(it, (tuple, list)) and len(it) == 2:
            out.append((str(it[0]), str(it[1])))
        else:
            raise ActAddError(f"cannot read {it!r} as a text or a (prompt, completion) pair")
    return out


def _targets(
    targets: Any, avoid: Iterable[Any] | None
) -> tuple[list[tuple[str, str]], list[tuple[str, str]], dict[str, Any]]:
    if isinstance(targets, (ContrastDataset, str, os.PathLike)):
        ds = as_dataset(targets)
        tgt = [(p.prompt, p.positive) for p in ds]
        avd = [(p.prompt, p.negative) for p in ds] if avoid is None else _pairs_of(avoid)
        return tgt, avd, ds.describe()
    tgt = _pairs_of(targets)
    avd = _pairs_of(avoid or [])
    if not tgt:
        raise ActAddError("no target texts to optimise for")
    return tgt, avd, {"name": "texts", "n_targets": len(tgt), "n_avoid": len(avd)}


def _steered_token_logprobs(lm: LM, site: Site, v: Tensor, b: _Batch) -> Tensor:
    """``[B, T-1]`` log-probability of each actual next token under steering."""
    with steer(lm, [_Trainable(site, v)], addition_location="all"):
        lp = _token_logprobs(lm, b)
    return lp.gather(-1, b.ids[:, 1:, None])[..., 0]


def _losses(
    lm: LM,
    site: Site,
    v: Tensor,
    tgt: list[tuple[str, str]],
    avd: list[tuple[str, str]],
    neutral: list[str],
    *,
    beta: float = 1.0,
    contrast: bool = False,
) -> dict[str, Tensor]:
    zero = v.new_zeros(())
    out = {"target": zero, "avoid": zero, "contrast": zero, "kl": zero}
    seq: dict[str, Tensor] = {}  # summed log-probability of each text, steered minus unsteered
    for key, items in (("target", tgt), ("avoid", avd)):
        if not items:
            continue
        b = _batch(lm, items)
        tok = _steered_token_logprobs(lm, site, v, b)  # [B, T-1]
        n = b.scored.sum()
        if key == "target":
            out[key] = -(tok * b.scored).sum() / n
        else:  # unlikelihood -log(1 - p): bounded, unlike +log p, so it cannot run away
            out[key] = (-torch.log1p(-tok.exp().clamp(max=1 - 1e-6)) * b.scored).sum() / n
        if contrast:
            with torch.no_grad():
                ref = _token_logprobs(lm, b).gather(-1, b.ids[:, 1:, None])[..., 0]
            seq[key] = ((tok - ref) * b.scored).sum(-1)  # [B]
    if contrast and seq:
        margin = seq["target"] - seq["avoid"]  # [B] pairs
        out["contrast"] = -torch.nn.functional.logsigmoid(beta * margin).mean()
    if neutral:
        b = _batch(lm, [("", t) for t in neutral])
        with torch.no_grad():
            ref_lp = _token_logprobs(lm, b)
        with steer(lm, [_Trainable(site, v)], addition_location="all"):
            lp = _token_logprobs(lm, b)
        kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)  # [B, T-1]
        out["kl"] = (kl * b.scored).sum() / b.scored.sum()
    return out
