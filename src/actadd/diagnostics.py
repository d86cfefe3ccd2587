"""Where an addition lands and how big it is next to the prompt's own residual stream.

Many models park an *attention sink* on their first position, whose residual norm is tens of
times larger than elsewhere. An addition position that is such an outlier swamps the others:
``steering_magnitudes_relative_to_prompt`` shows it and warns.
"""

from __future__ import annotations

import warnings
from typing import Any

import pandas as pd
import torch

from actadd.errors import ActAddError, OutlierWarning
from actadd.hooks import capture
from actadd.model import LM, as_lm
from actadd.positions import injected_span
from actadd.steering import as_rows, resolve, row_locations

__all__ = ["OutlierWarning", "steering_magnitudes_relative_to_prompt"]

# Each addition adds coeff × (a residual vector of typical norm), so by the triangle inequality
# a position's summed addition should not exceed Σ|coeff| × typical norm. Twice that means one
# of the recorded vectors is abnormally large: an attention sink, or a pad token acting as one.
OUTLIER_FACTOR = 2.0


@torch.no_grad()
def steering_magnitudes_relative_to_prompt(
    lm: LM,
    prompt: str,
    activation_additions: Any,
    *,
    addition_location: str | None = None,
    warn: bool = True,
) -> pd.DataFrame:
    """Per site and prompt position: the norm of the summed additions and of the prompt's own
    residual stream there, and their ratio.

    Returns a DataFrame with columns ``site``, ``position``, ``token``, ``addition_norm``,
    ``prompt_norm``, ``relative`` and ``outlier``. ``outlier`` (and an ``OutlierWarning``) marks
    positions whose summed addition exceeds 2 × Σ|coeff| × the prompt's median residual norm at
    that site: a recorded vector far larger than the residual stream normally is.

    Example:
        >>> df = steering_magnitudes_relative_to_prompt(
        ...     lm, "I hate you because", get_x_vector("Love", "Hate", 5, 6))  # doctest: +SKIP
    """
    lm = as_lm(lm)
    rows, per_row = as_rows(activation_additions)
    if per_row:
        raise ActAddError("give one list of additions, not one per row")
    (location,) = row_locations(addition_location, 1, False)
    injections = resolve(lm, rows)[0]
    ids = lm.to_tokens(prompt)
    P = ids.shape[1]
    sites = sorted({i.site for i in injections}, key=lambda s: s.order)
    resid = capture(lm, ids, sites)
    tokens = lm.to_str_tokens(ids[0].tolist())
    records = []
    for site in sites:
        total = torch.zeros(P, lm.d_model, dtype=torch.float32, device=lm.device)
        budget = torch.zeros(P, dtype=torch.float32, device=lm.device)  # Σ|coeff| per position
        for inj in (i for i in injections if i.site == site):
            t = inj.tensor.float()
            where = location or inj.default_location
            span = injected_span(where, P, t.shape[0])
            total[span] += t.mean(0) if where == "all" else t
            budget[span] += abs(inj.coeff)
        add_norm = total.norm(dim=-1)
        prompt_norm = resid[site][0].float().norm(dim=-1)
        typical = float(prompt_norm.median())
        outlier = add_norm > OUTLIER_FACTOR * budget * typical
        for pos in range(P):
            records.append(
                {
                    "site": site.name,
                    "position": pos,
                    "token": tokens[pos],
                    "addition_norm": float(add_norm[pos]),
                    "prompt_norm": float(prompt_norm[pos]),
                    "relative": float(add_norm[pos] / prompt_norm[pos].clamp_min(1e-12)),
                    "outlier": bool(outlier[pos]),
                }
            )
            if warn and outlier[pos]:
                warnings.warn(
                    f"{site.name}: the addition at position {pos} ({tokens[pos]!r}) has norm "
                    f"{float(add_norm[pos]):.0f}, {float(add_norm[pos] / budget[pos]):.0f} per "
                    f"unit of coefficient against a typical residual norm of {typical:.0f}: "
                    "it will dominate. Often this is the attention sink or a pad token acting "
                    "as one: try another pad (custom_pad_id), the other sequence-start policy "
                    "(prepend_bos), or an x-vector whose two sides cancel it",
                    OutlierWarning,
                    stacklevel=2,
                )
    return pd.DataFrame.from_records(records)
