"""A sweep's rows cut into chunks with stable keys, run by an executor, kept as Parquet files.

``sweep_over_prompts(..., ray=...)`` (or ``store=``) runs here. Its rows (prompt ×
configuration × completion, in the order of a local run) are cut into chunks of consecutive
rows. A chunk's key hashes everything its result depends on: the model's identity (weights
sample, dtype, device kind, tokenizer: ``identity.model_identity``, as the workers report it),
the generation settings, and each row's prompt, additions and seed. Finished chunks are written
as they arrive to ``store/<key>.parquet`` (written to a temporary name, then renamed, so a file
is whole or absent); a rerun of the same sweep reads them back and runs only the missing ones,
and a different sweep can never pick up another's rows: its keys differ.

A row's completion does not depend on its chunk or batch (each row samples from its own seeded
stream, and additions sit on logical positions), so the merged rows equal a local run's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from actadd.errors import ActAddError, require
from actadd.executor import Chunk, Executor, MapResult, WorkerContext
from actadd.identity import digest

__all__ = ["Job", "SweepRun", "generate_chunk", "run_sweep_chunks"]

log = logging.getLogger(__name__)

Job = tuple[int, int, int]  # (prompt index, configuration index or -1, completion index)
RESULT_COLUMNS = ["row_id", "prompts", "seed", "completions", "loss"]


@dataclass
class SweepRun:
    """The rows of a chunked sweep and how they came about."""

    rows: pd.DataFrame  # prompts, completions, loss, seed, completion_index, ...
    interrupted: bool
    chunks: int  # in the whole sweep
    resumed: int  # read back from the store
    ran: int  # run by this call
    map: MapResult


def generate_chunk(ctx: WorkerContext, payload: dict[str, Any]) -> pd.DataFrame:
    """On a worker: one chunk's completions (``completions``, ``loss``), in row order."""
    from actadd.generation import gen_using_activation_additions
    from actadd.sweeps import auto_batch_size

    lm = ctx.lm
    settings = payload["settings"]
    batch = payload["batch_size"]
    if batch is None:
        longest = max(len(lm.token_ids(p)) for p in payload["prompts"])
        batch = auto_batch_size(lm, longest, settings["tokens_to_generate"])
    adds, prompts, seeds = payload["adds"], payload["prompts"], payload["seeds"]
    df = gen_using_activation_additions(
        lm, adds, prompts, seeds=seeds, batch_size=batch, **settings
    )
    return df[["completions", "loss"]]


def _read(path: Path, row_ids: list[str]) -> pd.DataFrame | None:
    """A stored chunk, if it is whole and holds exactly these rows."""
    if not path.exists():
        return None
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # truncated or foreign: run the chunk again
        log.warning("ignoring unreadable chunk %s (%s)", path.name, e)
        return None
    if list(df.columns[: len(RESULT_COLUMNS)]) != RESULT_COLUMNS or df.row_id.tolist() != row_ids:
        log.warning("ignoring chunk %s: it holds other rows", path.name)
        return None
    return df


def _write(path: Path, df: pd.DataFrame) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)  # whole or absent, even if the driver dies now


def run_sweep_chunks(
    ex: Executor,
    jobs: Sequence[Job],
    add_lists: Sequence[Sequence[Any]],
    prompts: Sequence[str],
    base_seed: int,
    settings: dict[str, Any],
    *,
    store: str | os.PathLike[str] | None,
    chunk_size: int,
    batch_size: int | None,
) -> SweepRun:
    """Run (or read back) every chunk of a sweep's ``jobs``; the rows in job order.

    Args:
        ex: a started executor (its ``identity`` is the model's).
        jobs: ``(prompt, configuration or -1, completion)`` per row, in output order.
        add_lists: the configurations' additions.
        prompts: the prompts.
        base_seed: completion ``i`` samples with ``base_seed + i``.
        settings: ``gen_using_activation_additions`` options (tokens, sampling, location).
        store: directory of finished chunks (created); None keeps nothing.
        chunk_size: rows per chunk.
        batch_size: rows per ``generate`` on a worker (None: what fits its memory).
    """
    if chunk_size < 1:
        raise ActAddError(f"chunk_size must be >= 1, got {chunk_size}")
    folder = None
    if store is not None:
        require("pyarrow", extra="ray", feature="keeping sweep chunks as Parquet")
        folder = Path(store)
        folder.mkdir(parents=True, exist_ok=True)
    config_ids = [digest(list(adds)) for adds in add_lists]
    common = digest({"model": ex.identity, "settings": settings})
    row_ids = [
        digest([common, prompts[p], config_ids[c] if c >= 0 else None, base_seed + i], 16)
        for p, c, i in jobs
    ]
    spans = [(lo, min(lo + chunk_size, len(jobs))) for lo in range(0, len(jobs), chunk_size)]
    keys = [digest(row_ids[lo:hi]) for lo, hi in spans]
    found: dict[str, pd.DataFrame] = {}
    todo: list[Chunk] = []
    for (lo, hi), key in zip(spans, keys, strict=True):
        stored = _read(folder / f"{key}.parquet", row_ids[lo:hi]) if folder else None
        if stored is not None and folder is not None:
            found[key] = stored
            continue
        part = jobs[lo:hi]
        payload = {
            "prompts": [prompts[p] for p, _, _ in part],
            "adds": [list(add_lists[c]) if c >= 0 else [] for _, c, _ in part],
            "seeds": [base_seed + i for _, _, i in part],
            "settings": settings,
            "batch_size": batch_size,
        }
        todo.append(Chunk(key, payload, rows=hi - lo))
    if found:
        log.info("resuming: %d of %d chunks are already in %s", len(found), len(keys), folder)
    where = {key: span for key, span in zip(keys, spans, strict=True)}

    def finished(chunk: Chunk, result: pd.DataFrame) -> None:
        lo, hi = where[chunk.key]
        df = pd.DataFrame(
            {
                "row_id": row_ids[lo:hi],
                "prompts": chunk.payload["prompts"],
                "seed": chunk.payload["seeds"],
                "completions": result["completions"].to_numpy(),
                "loss": result["loss"].to_numpy(),
            }
        )
        found[chunk.key] = df
        if folder is not None:
            _write(folder / f"{chunk.key}.parquet", df)

    rows_done = sum(len(df) for df in found.values())
    result = ex.map(
        generate_chunk,
        todo,
        task="sweep",
        on_result=finished,
        rows_done=rows_done,
        rows_total=len(jobs),
    )
    frames = []
    for (lo, hi), key in zip(spans, keys, strict=True):
        if key not in found:
            continue  # interrupted before this chunk finished
        df = found[key].drop(columns="row_id")
        part = jobs[lo:hi]
        df["is_modified"] = [c >= 0 for _, c, _ in part]
        df["completion_index"] = [i for _, _, i in part]
        df["activation_addition_index"] = [c for _, c, _ in part]
        frames.append(df)
    cols = ["prompts", "completions", "is_modified", "loss", "seed"]
    rows = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=[*cols, "completion_index", "activation_addition_index"])
    )
    rows = rows[[*cols, "completion_index", "activation_addition_index"]]
    return SweepRun(
        rows,
        result.interrupted,
        chunks=len(keys),
        resumed=len(keys) - len(todo),
        ran=len(result.results),
        map=result,
    )
