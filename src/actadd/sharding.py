"""A loop over items (texts, pairs, generation rows) cut into slices and run on an executor.

The ``ray=`` option of the corpus metrics and of pair search comes down to this: the same
function that runs locally, ``fn(lm, items, **kwargs)``, is called on consecutive slices of
the items by Ray workers (each with its own model replica), and the slices' results come back
in order. Sweeps (kept on disk, resumable) and vector building (summed statistics) use the
executor directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from actadd.errors import ActAddError
from actadd.identity import digest
from actadd.model import LM

if TYPE_CHECKING:
    from actadd.executor import RayExecutor, WorkerContext

__all__ = ["map_slices"]

DEFAULT_SLICE = 64


def _call(ctx: WorkerContext, payload: dict[str, Any]) -> Any:
    """On a worker: the local function on one slice."""
    return payload["fn"](ctx.lm, payload["items"], **payload["kwargs"])


def map_slices(
    lm: LM,
    fn: Callable[..., Any],
    items: Sequence[Any],
    *,
    ray: str | RayExecutor,
    workers: int | None,
    chunk_size: int | None,
    task: str,
    **kwargs: Any,
) -> list[Any]:
    """``[fn(lm, items[a:b], **kwargs) for each slice]``, run on Ray workers, in order.

    Args:
        lm: the model (``load_model``'s, so workers can load it from ``lm.spec``).
        fn: a module-level function of (model, items, keyword options).
        items: what to cut; each slice has ``chunk_size`` items (default 64).
        ray, workers: as in ``sweep_over_prompts``.
        task: the progress task's name.

    Raises:
        KeyboardInterrupt: when interrupted (a partial corpus score means nothing).

    Example:
        >>> parts = map_slices(lm, perplexity_ratio, texts, ray="local", workers=2,
        ...                    chunk_size=32, task="scoring")  # doctest: +SKIP
    """
    from actadd.executor import Chunk, executor

    size = chunk_size or DEFAULT_SLICE
    if size < 1:
        raise ActAddError(f"chunk_size must be >= 1, got {size}")
    spans = [(lo, min(lo + size, len(items))) for lo in range(0, len(items), size)]
    chunks = [
        Chunk(
            digest([i, lo, hi]),
            {"fn": fn, "items": list(items[lo:hi]), "kwargs": kwargs},
            rows=hi - lo,
        )
        for i, (lo, hi) in enumerate(spans)
    ]
    with executor(lm, ray, workers) as ex:
        result = ex.map(_call, chunks, task=task)
    if result.interrupted:
        raise KeyboardInterrupt
    return [result.results[c.key] for c in chunks]
