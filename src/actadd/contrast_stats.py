"""Mean-difference and PCA vectors from sharded pairs, by summing sufficient statistics.

``make_vector(..., ray=...)`` runs here. The pairs are cut into shards; a Ray worker reads a
shard (``contrast.read_pairs``, with its own model replica) and returns, per site, the count
``n``, the sum ``Σ d`` of the differences ``d = positive − negative`` and, for PCA, their
second moment ``Σ d dᵀ`` (``[D, D]``), all in float64. The driver adds them up:

* mean difference: ``Σ d / n``;
* PCA: the top eigenvector of ``Σ d dᵀ`` (uncentred) or of ``Σ d dᵀ − n μ μᵀ`` (centred),
  which is the first right singular vector the local ``svd`` finds; signed and scaled as
  locally, and ``explained`` is its eigenvalue over the trace.

Only the per-pair *agreement* (the share of pairs whose own difference points the vector's
way) needs each difference again once the direction is known: every worker keeps its shards'
differences, and a second, cheap round asks each worker to count on what it holds; a shard
whose worker was lost is read again. The transfer per shard is ``O(D)`` (``O(D²)`` for PCA),
not ``O(pairs × D)``.

Shards of a multiple of ``batch_size / 2`` pairs are read in the same batches as a local run,
so the readings are the local ones bit for bit; the sums differ from a local ``mean`` only in
float64 summation order.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from actadd.datasets import ContrastDataset, ContrastPair
from actadd.errors import ActAddError
from actadd.model import LM
from actadd.sites import Site, parse_site

if TYPE_CHECKING:
    from actadd.executor import RayExecutor, WorkerContext

__all__ = ["direction_from_statistics", "vector_statistics_on_ray"]

log = logging.getLogger(__name__)

Stats = dict[str, dict[str, Any]]  # site name -> {"n", "sum", "gram"}


def _differences(lm: LM, payload: dict[str, Any]) -> dict[str, Tensor]:
    from actadd.contrast import read_pairs

    sites = [parse_site(name, lm.n_layers) for name in payload["sites"]]
    pos, neg = read_pairs(
        lm, payload["pairs"], sites, read=payload["read"], batch_size=payload["batch_size"]
    )
    return {s.name: pos[s] - neg[s] for s in sites}  # [N, D] float32


def shard_statistics(ctx: WorkerContext, payload: dict[str, Any]) -> Stats:
    """On a worker: a shard's ``n``, ``Σ d`` and (for PCA) ``Σ d dᵀ`` per site; the shard's
    differences stay in the worker for the agreement round."""
    diffs = _differences(ctx.lm, payload)
    ctx.scratch[(payload["run"], payload["key"])] = diffs
    out: Stats = {}
    for name, d in diffs.items():
        x = d.double()
        out[name] = {"n": x.shape[0], "sum": x.sum(0), "gram": x.T @ x if payload["gram"] else None}
    return out


def _count(diffs: dict[str, Tensor], units: dict[str, Tensor]) -> dict[str, int]:
    return {name: int(((d.double() @ units[name]) > 0).sum()) for name, d in diffs.items()}


def held_agreement(ctx: WorkerContext, payload: dict[str, Any]) -> dict[str, dict[str, int]]:
    """On a worker: per shard it holds from this run, how many pairs agree with each unit
    direction (then the shard is dropped)."""
    run = payload["run"]
    mine = [k for k in list(ctx.scratch) if isinstance(k, tuple) and k[0] == run]
    return {key: _count(ctx.scratch.pop((r, key)), payload["units"]) for r, key in mine}


def reread_agreement(ctx: WorkerContext, payload: dict[str, Any]) -> dict[str, int]:
    """On a worker: read a shard again (its first worker was lost) and count agreement."""
    return _count(_differences(ctx.lm, payload), payload["units"])


def direction_from_statistics(
    n: int, total: Tensor, gram: Tensor | None, method: str, center: bool
) -> tuple[Tensor, dict[str, float]]:
    """The direction (float32) and its statistics from summed float64 statistics, as
    ``contrast._direction`` finds them from the differences themselves (less agreement)."""
    mean = total / n
    if method == "mean_diff":
        return mean.float(), {"norm": float(mean.norm())}
    if gram is None:
        raise ActAddError("PCA needs the second moment of the differences")
    second = gram - n * torch.outer(mean, mean) if center else gram
    values, vectors = torch.linalg.eigh(second)  # ascending
    pc = vectors[:, -1]
    proj = mean @ pc  # the mean projection of the (uncentred) differences
    sign = 1.0 if float(proj) >= 0 else -1.0
    direction = sign * pc * proj.abs()
    explained = float(values[-1] / values.clamp_min(0).sum())
    return direction.float(), {"explained": explained, "norm": float(direction.norm())}


def vector_statistics_on_ray(
    lm: LM,
    ds: ContrastDataset,
    sites: Sequence[Site],
    *,
    method: str,
    read: str,
    batch_size: int,
    center: bool,
    ray: str | RayExecutor | None,
    workers: int | None,
    chunk_size: int | None,
) -> tuple[dict[str, Tensor], dict[str, dict[str, float]]]:
    """Directions and their statistics per site, from shards read by Ray workers (with
    ``ray=None``, by this process: the same arithmetic, for tests and small data).

    Raises:
        KeyboardInterrupt: when interrupted (a vector from part of the data is not asked for).
    """
    from actadd.executor import Chunk, executor
    from actadd.identity import digest

    size = chunk_size or 8 * batch_size  # a multiple of the pairs in one batch (batch_size/2)
    if size < 1:
        raise ActAddError(f"chunk_size must be >= 1, got {size}")
    run = uuid.uuid4().hex
    pairs: list[ContrastPair] = list(ds)
    spans = [(lo, min(lo + size, len(pairs))) for lo in range(0, len(pairs), size)]
    names = [s.name for s in sites]

    def payload(lo: int, hi: int, key: str) -> dict[str, Any]:
        return {
            "pairs": pairs[lo:hi],
            "sites": names,
            "read": read,
            "batch_size": batch_size,
            "gram": method == "pca",
            "run": run,
            "key": key,
        }

    keys = [digest([run, lo, hi]) for lo, hi in spans]
    chunks = [
        Chunk(k, payload(lo, hi, k), rows=hi - lo) for k, (lo, hi) in zip(keys, spans, strict=True)
    ]
    with executor(lm, ray, workers) as ex:
        first = ex.map(shard_statistics, chunks, task="reading pairs")
        if first.interrupted:
            raise KeyboardInterrupt
        dirs, stats, units = {}, {}, {}
        for name in names:
            parts = [first.results[k][name] for k in keys]
            n = sum(p["n"] for p in parts)
            total = torch.stack([p["sum"] for p in parts]).sum(0)
            gram = torch.stack([p["gram"] for p in parts]).sum(0) if method == "pca" else None
            dirs[name], stats[name] = direction_from_statistics(n, total, gram, method, center)
            units[name] = dirs[name].double() / dirs[name].double().norm().clamp_min(1e-12)
        counts: dict[str, dict[str, int]] = {}
        for answer in ex.broadcast(held_agreement, {"run": run, "units": units}):
            counts.update(answer)
        lost = [c for c in chunks if c.key not in counts]
        if lost:
            log.info("re-reading %d shards for agreement (their worker was lost)", len(lost))
            again = ex.map(
                reread_agreement,
                [Chunk(c.key, {**c.payload, "units": units}, c.rows) for c in lost],
                task="agreement",
            )
            if again.interrupted:
                raise KeyboardInterrupt
            counts.update(again.results)
    for name in names:
        agree = sum(counts[k][name] for k in keys)
        stats[name]["agreement"] = agree / len(pairs)
    return dirs, stats
