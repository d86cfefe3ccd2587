"""Sweeps over layers, coefficients and phrases, batched across configurations.

``make_activation_additions`` builds one list of additions per configuration (a DataFrame, as
in the original library); ``sweep_over_prompts`` generates unsteered and steered completions
for every prompt and configuration and scores them; ``reduce_sweep_results`` averages them per
configuration with error bars.

Batching: every completion is a row of a batched ``generate`` call, and rows of one call
carry *different* additions (``gen_using_activation_additions`` with one list per row). A
4 × 4 layer-by-coefficient sweep with 8 completions each is 128 rows: a few calls, not 16.

Seeds: completion ``i`` of every configuration, and of the unsteered baseline, samples with
seed ``seed + i``. Sampling is seeded per row (see ``actadd.generation``), so a row's text does
not depend on the batch size or on its neighbours, and steered and unsteered completion ``i``
share their random stream (paired sampling): their difference is the steering, not sampling
noise. ``reduce_sweep_results`` reports these paired differences too.

Interrupting (Ctrl-C / ``KeyboardInterrupt``) stops after the batch under way and returns the
rows finished so far, scored; ``df.attrs["interrupted"]`` is then True.

On a Ray cluster (``ray="local"``, ``"auto"``, ``"ray://host:port"``), the rows are cut into
chunks run by workers that each hold a model replica, and finished chunks can be kept in a
``store`` directory so that a rerun resumes (``actadd.sweep_chunks``); the rows are the same.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from actadd import display
from actadd import progress as reporting
from actadd.additions import ActivationAddition
from actadd.errors import ActAddError
from actadd.generation import gen_using_activation_additions
from actadd.loading import ModelSpec
from actadd.metrics import Metric, add_metric_cols
from actadd.model import LM, as_lm
from actadd.prompts import encode_prompts
from actadd.sites import canonical_act_name
from actadd.steering import Injection, Steerable

if TYPE_CHECKING:
    from actadd.executor import RayExecutor

__all__ = [
    "SlicedAddition",
    "auto_batch_size",
    "best_configurations",
    "make_activation_additions",
    "reduce_sweep_results",
    "sweep_over_prompts",
    "write_results",
]

log = logging.getLogger(__name__)

Phrases = Sequence[tuple[str, float]]
_BOOKKEEPING = {"seed", "completion_index", "activation_addition_index", "is_modified"}


@dataclass(frozen=True)
class SlicedAddition:
    """An addition restricted to some residual dimensions, per row (the "dimension fraction"
    experiment): the first ``fraction`` of the dimensions, or the ``dims`` slice.

    Unlike ``steer(..., res_stream_slice=...)``, which applies to the whole batch, this is a
    steerable value, so rows of one batch can use different fractions.

    Example:
        >>> half = SlicedAddition(ActivationAddition(4, 6, prompt=" weddings"), fraction=0.5)
        >>> half.describe()
        "+4 × ' weddings' @ blocks.6.hook_resid_pre [first 50% of dims]"
    """

    addition: Any
    fraction: float | None = None
    dims: slice | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.dims is None):
            raise ActAddError("give exactly one of fraction= or dims=")
        if self.fraction is not None and not 0 <= self.fraction <= 1:
            raise ActAddError(f"fraction must be in [0, 1], got {self.fraction}")
        if not isinstance(self.addition, Steerable):
            raise ActAddError(f"cannot slice {type(self.addition).__name__}: not steerable")

    def injections(self, lm: LM) -> list[Injection]:
        d = lm.d_model
        dims = self.dims if self.dims is not None else slice(0, round(d * (self.fraction or 0)))
        mask = torch.zeros(d)
        mask[dims] = 1.0
        return [
            Injection(i.site, i.tensor * mask.to(i.tensor), i.coeff, i.default_location)
            for i in self.addition.injections(lm)
        ]

    def describe(self) -> str:
        inner = getattr(self.addition, "describe", lambda: repr(self.addition))()
        what = f"first {self.fraction:.0%} of dims" if self.fraction is not None else self.dims
        return f"{inner} [{what}]"


def _phrase_list(p: Any) -> list[tuple[str, float]]:
    if isinstance(p, str):
        return [(p, 1.0)]
    items = list(p)
    if len(items) == 2 and isinstance(items[0], str) and not isinstance(items[1], str):
        items = [tuple(items)]  # a single (phrase, coeff) pair
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((item, 1.0))
            continue
        try:
            phrase, c = item
        except (TypeError, ValueError) as e:
            raise ActAddError(
                f"each phrase must be a string or a (phrase, coeff) pair, got {item!r}"
            ) from e
        out.append((str(phrase), float(c)))
    if not out:
        raise ActAddError("an empty list of phrases: give e.g. [(' weddings', 1.0), (' ', -1.0)]")
    return out


def _describe_phrases(phrases: list[tuple[str, float]]) -> str:
    parts = [f"{'+' if c >= 0 else '−'}{abs(c):g}×{p!r}" for p, c in phrases]
    return " ".join(parts)


def make_activation_additions(
    phrases: Sequence[Phrases | str],
    act_names: Iterable[int | str],
    coeffs: Iterable[float],
    *,
    pad: bool = False,
    model: LM | None = None,
    dim_fractions: Iterable[float] | None = None,
) -> pd.DataFrame:
    """Every combination of phrase list × site × coefficient (× dimension fraction).

    Args:
        phrases: a list of phrase lists, each ``[(phrase, coeff), ...]`` (a bare string means
            ``[(phrase, 1.0)]``); ``[(" weddings", 1.0), (" ", -1.0)]`` is an x-vector.
        act_names: layers (``6`` = ``blocks.6.hook_resid_pre``) or TransformerLens names.
        coeffs: overall coefficients, multiplied into each phrase's own.
        pad: right-pad the phrases of a list to one token length with the space token, as
            ``get_x_vector(pad_method="tokens_right")`` (needs ``model``).
        model: the model, for ``pad``.
        dim_fractions: also sweep the fraction of residual dimensions steered
            (``SlicedAddition``); adds a ``dim_fraction`` column.

    Returns:
        One row per configuration: ``activation_additions`` (the list to steer with),
        ``phrases`` (a readable description), ``act_name``, ``layer``, ``coeff`` and
        ``dim_fraction`` if swept.

    Example:
        >>> df = make_activation_additions([[(" weddings", 1.0), (" ", -1.0)]], [2, 6], [1, 4])
        >>> df[["phrases", "layer", "coeff"]].values.tolist()[:2]
        [["+1×' weddings' −1×' '", 2, 1.0], ["+1×' weddings' −1×' '", 2, 4.0]]
    """
    if pad and model is None:
        raise ActAddError("pad=True needs model= to tokenize the phrases")
    lists = [_phrase_list(p) for p in phrases]
    names = [canonical_act_name(a) for a in act_names]
    cs = [float(c) for c in coeffs]
    fracs: list[float | None] = (
        [None] if dim_fractions is None else [float(f) for f in dim_fractions]
    )
    if not lists or not names or not cs or not fracs:
        raise ActAddError("phrases, act_names, coeffs (and dim_fractions) must be non-empty")
    rows = []
    for plist in lists:
        tokens = _padded_tokens(model, plist) if pad else None
        for name in names:
            for c in cs:
                for frac in fracs:
                    adds: list[Any] = []
                    for k, (phrase, pc) in enumerate(plist):
                        if tokens is not None:
                            a = ActivationAddition(
                                pc * c, name, tokens=tokens[k], label=repr(phrase)
                            )
                        else:
                            a = ActivationAddition(pc * c, name, prompt=phrase)
                        adds.append(a if frac is None else SlicedAddition(a, fraction=frac))
                    row = {
                        "activation_additions": adds,
                        "phrases": _describe_phrases(plist),
                        "act_name": name,
                        "layer": int(name.split(".")[1]),
                        "coeff": c,
                    }
                    if frac is not None:
                        row["dim_fraction"] = frac
                    rows.append(row)
    return pd.DataFrame(rows)


def _padded_tokens(lm: LM | None, plist: list[tuple[str, float]]) -> list[tuple[int, ...]]:
    assert lm is not None
    ids = [lm.token_ids(p) for p, _ in plist]
    try:
        pad = lm.to_single_token(" ")
    except ActAddError:
        pad = lm.pad_token_id
    n = max(len(i) for i in ids)
    return [tuple(i + [pad] * (n - len(i))) for i in ids]


def auto_batch_size(
    lm: LM,
    prompt_tokens: int,
    tokens_to_generate: int,
    *,
    memory_bytes: int | None = None,
    max_batch: int = 64,
) -> int:
    """Rows per ``generate`` call that fit a memory budget (default: half the free GPU memory,
    or a quarter of the available RAM capped at 4 GiB on CPU), at most ``max_batch``.

    Per row it counts the KV cache, a few copies of the logits and of the hidden states.
    Results never depend on the batch size (per-row seeds), only speed and memory do.

    Example:
        >>> auto_batch_size(lm, 10, 40)  # doctest: +SKIP
        64
    """
    if memory_bytes is None:
        memory_bytes = free_memory(lm.device)
    cfg = lm.model.config
    T = prompt_tokens + tokens_to_generate
    heads = getattr(cfg, "num_attention_heads", None) or 1
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or lm.d_model // heads
    elt = torch.finfo(lm.dtype).bits // 8 if lm.dtype.is_floating_point else 4
    kv = 2 * lm.n_layers * kv_heads * head_dim * T * elt
    logits = 6 * lm.vocab_size * 4  # scores, log-softmax, noise, processors (float32)
    inter = getattr(cfg, "intermediate_size", None) or 4 * lm.d_model
    hidden = prompt_tokens * (4 * lm.d_model + 2 * inter) * elt
    per_row = kv + logits + hidden
    return int(max(1, min(max_batch, memory_bytes // per_row)))


def free_memory(device: torch.device, *, fraction: float | None = None) -> int:
    """Bytes one may use on ``device``: ``fraction`` of what is free (default: half the free
    GPU memory, or a quarter of the available RAM capped at 4 GiB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * (0.5 if fraction is None else fraction))
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 4 << 30
    if fraction is not None:
        return int(avail * fraction)
    return int(min(avail // 4, 4 << 30))


def sweep_over_prompts(
    model: LM | ModelSpec,
    prompts: str | Iterable[str],
    activation_additions: pd.DataFrame | Iterable[Sequence[Any]],
    num_normal_completions: int = 100,
    num_patched_completions: int = 100,
    tokens_to_generate: int = 40,
    seed: int | None = None,
    metrics_dict: dict[str, Metric] | None = None,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    freq_penalty: float = 0.0,
    top_k: int = 0,
    addition_location: str | None = None,
    res_stream_slice: slice = slice(None),
    batch_size: int | None = None,
    progress: bool = True,
    chat: bool = False,
    ray: str | RayExecutor | None = None,
    workers: int | None = None,
    store: str | os.PathLike[str] | None = None,
    chunk_size: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Unsteered and steered completions of every prompt under every configuration, scored.

    Args:
        model: the ``LM``; with ``ray=``, an ``LM`` from ``load_model`` or a ``ModelSpec``
            (then this process never loads the weights: only the workers do).
        prompts: one prompt or several.
        activation_additions: the frame from ``make_activation_additions`` (its other columns
            are copied onto each row), or an iterable of addition lists.
        num_normal_completions: unsteered completions per prompt.
        num_patched_completions: steered completions per prompt and configuration.
        tokens_to_generate: new tokens per completion.
        seed: completion ``i`` uses seed ``seed + i`` in every configuration (paired);
            None draws a base seed from torch's global RNG.
        metrics_dict: ``{name: metric}`` applied to the completions (``actadd.metrics``).
        temperature, top_p, freq_penalty: sampling, as in ``gen_using_activation_additions``
            (the original library's house settings: ``1, 0.3, 1``).
        addition_location, res_stream_slice: as in ``actadd.steer``, for every row.
        batch_size: rows per ``generate`` call; default ``auto_batch_size``. Results do not
            depend on it.
        progress: show a rich progress bar (on stderr).
        chat: each prompt is a user message in the model's chat template; additions land on
            its text (see ``gen_using_activation_additions``).
        ray: run on a Ray cluster: ``"local"`` (start one here), ``"auto"`` (join the one
            this machine belongs to), ``"ray://host:10001"`` or ``"host:6379"``; each worker
            loads the model (``pip install 'actadd[ray]'``). A running
            ``actadd.executor.RayExecutor`` is used as it is (no model reload).
        workers: Ray workers (model replicas); default one per GPU, else one per node.
        store: keep finished chunks here as Parquet (one file per chunk, named by a hash of
            what it depends on); rerunning the same sweep reads them back and runs only the
            missing ones. Works with or without ``ray``.
        chunk_size: rows per chunk with ``ray``/``store`` (default ``batch_size``, else 32).

    Returns:
        ``(normal_df, patched_df)``, one row per completion: ``prompts``, ``completions``,
        ``is_modified``, ``loss`` (mean NLL of the completion under the model that wrote it),
        ``seed``, ``completion_index``, the metrics, and in ``patched_df``
        ``activation_addition_index`` plus the configuration's columns. After a
        ``KeyboardInterrupt`` both hold the finished rows and ``attrs["interrupted"]`` is True.
        Chunked runs also set ``attrs["chunks"]``: ``{"total", "resumed", "ran", "retried",
        "seconds", "overhead_s"}``.

    Example:
        >>> adds = make_activation_additions([[(" weddings", 1), (" ", -1)]], [4, 6], [2, 4])
        >>> normal, patched = sweep_over_prompts(
        ...     lm, "I went up to my friend and said", adds, 8, 8, 40, seed=0,
        ...     metrics_dict={"wedding": get_word_count_metric()},
        ...     temperature=1, freq_penalty=1, top_p=0.3)  # doctest: +SKIP
    """
    chunked = ray is not None or store is not None
    if workers is not None and ray is None:
        raise ActAddError("workers= is the number of Ray workers: give ray= too")
    if not chunked:
        model = model.load() if isinstance(model, ModelSpec) else as_lm(model)
    elif not isinstance(model, ModelSpec):
        model = as_lm(model)
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if isinstance(activation_additions, pd.DataFrame):
        if "activation_additions" not in activation_additions.columns:
            raise ActAddError("the additions frame needs an 'activation_additions' column")
        configs = activation_additions.reset_index(drop=True)
        add_lists = [list(a) for a in configs["activation_additions"]]
        extra = configs.drop(columns=["activation_additions"])
    else:
        add_lists = [list(a) for a in activation_additions]
        extra = pd.DataFrame(index=range(len(add_lists)))
    if "additions" not in extra.columns:
        extra["additions"] = [
            "; ".join(getattr(a, "describe", lambda a=a: repr(a))() for a in adds)
            for adds in add_lists
        ]
    if not prompt_list or num_normal_completions < 0 or num_patched_completions < 0:
        raise ActAddError("need at least one prompt and non-negative completion counts")
    if any(not adds for adds in add_lists):
        raise ActAddError("a configuration has no additions (the baseline is added for you)")
    base = int(torch.randint(0, 2**31 - 1 - 10**6, ()).item()) if seed is None else int(seed)

    # the rows: (prompt index, configuration index or -1, completion index)
    jobs = [(p, -1, i) for p in range(len(prompt_list)) for i in range(num_normal_completions)]
    jobs += [
        (p, c, i)
        for p in range(len(prompt_list))
        for c in range(len(add_lists))
        for i in range(num_patched_completions)
    ]
    if batch_size is not None and batch_size < 1:
        raise ActAddError(f"batch_size must be >= 1, got {batch_size}")
    bars = display.progress_bars() if progress and not reporting.active() else nullcontext()
    if chunked:
        settings = {
            "tokens_to_generate": tokens_to_generate,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "freq_penalty": freq_penalty,
            "addition_location": addition_location,
            "res_stream_slice": res_stream_slice,
            "chat": chat,
        }
        with bars:
            rows, interrupted, stats = _run_chunked(
                model,
                jobs,
                add_lists,
                prompt_list,
                base,
                settings,
                ray,
                workers,
                store,
                chunk_size or batch_size or 32,
                batch_size,
            )
        return _finish(rows, extra, metrics_dict, interrupted, stats)
    assert isinstance(model, LM)
    if batch_size is None:
        longest = max(len(e.ids) for e in encode_prompts(model, prompt_list, chat=chat))
        batch_size = auto_batch_size(model, longest, tokens_to_generate)
        log.info("sweep: %d rows in batches of %d", len(jobs), batch_size)

    frames: list[pd.DataFrame] = []
    interrupted = False
    with bars:
        try:
            for lo in range(0, len(jobs), batch_size):
                chunk = jobs[lo : lo + batch_size]
                with reporting.silenced():  # one bar for the sweep, not one per batch
                    df = gen_using_activation_additions(
                        model,
                        [add_lists[c] if c >= 0 else [] for _, c, _ in chunk],
                        [prompt_list[p] for p, _, _ in chunk],
                        tokens_to_generate=tokens_to_generate,
                        seeds=[base + i for _, _, i in chunk],
                        temperature=temperature,
                        top_p=top_p,
                        top_k=top_k,
                        freq_penalty=freq_penalty,
                        addition_location=addition_location,
                        res_stream_slice=res_stream_slice,
                        chat=chat,
                    )
                df["completion_index"] = [i for _, _, i in chunk]
                df["activation_addition_index"] = [c for _, c, _ in chunk]
                frames.append(df)
                reporting.report("sweep", lo + len(chunk), len(jobs))
        except KeyboardInterrupt:
            interrupted = True
            done = sum(len(f) for f in frames)
            log.warning("sweep interrupted: returning the %d of %d rows finished", done, len(jobs))

    cols = [
        "prompts",
        "completions",
        "is_modified",
        "loss",
        "seed",
        "completion_index",
        "activation_addition_index",
    ]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
    return _finish(rows, extra, metrics_dict, interrupted, None)


def _run_chunked(
    model: LM | ModelSpec,
    jobs: list[tuple[int, int, int]],
    add_lists: list[list[Any]],
    prompts: list[str],
    base: int,
    settings: dict[str, Any],
    ray: str | RayExecutor | None,
    workers: int | None,
    store: str | os.PathLike[str] | None,
    chunk_size: int,
    batch_size: int | None,
) -> tuple[pd.DataFrame, bool, dict[str, Any]]:
    """The rows of a sweep from chunks: on Ray, or in this process with a store."""
    from actadd.executor import executor
    from actadd.sweep_chunks import run_sweep_chunks

    with executor(model, ray, workers) as ex:
        run = run_sweep_chunks(
            ex,
            jobs,
            add_lists,
            prompts,
            base,
            settings,
            store=store,
            chunk_size=chunk_size,
            batch_size=batch_size,
        )
        where = ex.describe()
    stats = {
        "total": run.chunks,
        "resumed": run.resumed,
        "ran": run.ran,
        "retried": run.map.retried,
        "worker_losses": run.map.worker_losses,
        "seconds": run.map.seconds,
        "overhead_s": run.map.overhead_s,
        "compute_s": run.map.compute_s,
        "round_trip_s": run.map.round_trip_s,
        "by_worker": run.map.by_worker,
        "where": where,
    }
    log.info(
        "sweep: %d chunks, %d resumed, %d run (%d retried) %s",
        run.chunks,
        run.resumed,
        run.ran,
        run.map.retried,
        where,
    )
    return run.rows, run.interrupted, stats


def _finish(
    rows: pd.DataFrame,
    extra: pd.DataFrame,
    metrics_dict: dict[str, Metric] | None,
    interrupted: bool,
    chunks: dict[str, Any] | None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split the rows into unsteered and steered frames, join the configurations, score."""
    rows["is_modified"] = rows["activation_addition_index"] >= 0
    normal = rows[rows.activation_addition_index < 0].drop(columns="activation_addition_index")
    patched = rows[rows.activation_addition_index >= 0]
    patched = patched.join(extra, on="activation_addition_index")
    if metrics_dict:
        normal = add_metric_cols(normal, metrics_dict)
        patched = add_metric_cols(patched, metrics_dict)
    normal, patched = normal.reset_index(drop=True), patched.reset_index(drop=True)
    for df in (normal, patched):
        df.attrs["interrupted"] = interrupted
        df.attrs["config_columns"] = list(extra.columns)
        if chunks is not None:
            df.attrs["chunks"] = chunks
    return normal, patched


def _metric_columns(normal: pd.DataFrame, patched: pd.DataFrame) -> list[str]:
    config = set(patched.attrs.get("config_columns", [])) | {"layer", "coeff", "dim_fraction"}
    return [
        c
        for c in patched.columns
        if c not in _BOOKKEEPING
        and c not in config
        and pd.api.types.is_numeric_dtype(patched[c])
        and not pd.api.types.is_bool_dtype(patched[c])
    ]


def reduce_sweep_results(
    normal_df: pd.DataFrame,
    patched_df: pd.DataFrame,
    activation_additions_df: pd.DataFrame | None = None,
    *,
    metrics: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-configuration means with error bars, and the paired steered − unsteered effect.

    For each metric ``m`` the reduced frames have ``m`` (mean), ``m_sem`` (standard error of
    the mean) and ``n``; ``reduced_patched`` also has ``m_diff`` and ``m_diff_sem``: the mean
    and standard error of steered − unsteered over completions with the same seed (paired,
    so usually much tighter than the two error bars suggest).

    Args:
        normal_df, patched_df: from ``sweep_over_prompts``.
        activation_additions_df: the configurations, joined on if ``patched_df`` lacks them.
        metrics: the columns to reduce (default: every numeric column that is a result).

    Returns:
        ``(reduced_normal, reduced_patched)``: one row per prompt, and one per prompt and
        configuration (with the configuration's columns).

    Example:
        >>> normal_r, patched_r = reduce_sweep_results(normal, patched)  # doctest: +SKIP
        >>> patched_r[["layer", "coeff", "wedding", "wedding_sem"]]  # doctest: +SKIP
    """
    cols = list(metrics) if metrics is not None else _metric_columns(normal_df, patched_df)
    missing = [c for c in cols if c not in patched_df.columns]
    if missing:
        raise ActAddError(f"no columns {missing} in the sweep results")

    def summarise(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
        g = df.groupby(keys, sort=False)
        mean = g[cols].mean()
        sem = g[cols].sem().add_suffix("_sem")
        return pd.concat([mean, sem, g.size().rename("n")], axis=1)

    reduced_normal = summarise(normal_df, ["prompts"]).reset_index()
    keys = ["prompts", "activation_addition_index"]
    reduced = summarise(patched_df, keys)
    # paired differences: steered completion i minus the unsteered completion with its seed
    base = normal_df.drop_duplicates(["prompts", "seed"])[["prompts", "seed", *cols]]
    paired = patched_df[[*keys, "seed", *cols]].merge(
        base, on=["prompts", "seed"], how="left", suffixes=("", "__u")
    )
    diff = pd.DataFrame({c: paired[c] - paired[f"{c}__u"] for c in cols}, index=paired.index)
    diff[keys] = paired[keys]
    g = diff.groupby(keys, sort=False)
    reduced = reduced.join(g[cols].mean().add_suffix("_diff"))
    reduced = reduced.join(g[cols].sem().add_suffix("_diff_sem")).reset_index()
    config = [c for c in patched_df.attrs.get("config_columns", []) if c in patched_df.columns]
    if config:
        first = patched_df.groupby("activation_addition_index")[config].first()
        reduced = reduced.join(first, on="activation_addition_index")
    elif activation_additions_df is not None:
        reduced = reduced.join(
            activation_additions_df.drop(columns=["activation_additions"], errors="ignore"),
            on="activation_addition_index",
        )
    return reduced_normal, reduced


def best_configurations(
    reduced: pd.DataFrame, metric: str, *, k: int = 5, ascending: bool = False
) -> pd.DataFrame:
    """The ``k`` configurations with the highest (or lowest) mean ``metric``."""
    if metric not in reduced.columns:
        raise ActAddError(f"no column {metric!r}; have {list(reduced.columns)}")
    return reduced.sort_values(metric, ascending=ascending).head(k)


def write_results(
    normal_df: pd.DataFrame,
    patched_df: pd.DataFrame,
    out: str | os.PathLike[str],
    *,
    metrics: Sequence[str] = (),
    plots: bool = True,
) -> tuple[list[Path], pd.DataFrame | None, pd.DataFrame | None]:
    """Write a sweep to ``out/``: ``rows.csv`` and ``rows.parquet`` (every completion),
    ``summary.csv`` (``reduce_sweep_results``) and, per metric and for ``loss``, a line plot by
    layer and a layer × coefficient heatmap (HTML and PNG; plots need ``actadd[research]``).

    Returns:
        ``(files written, reduced_normal, reduced_patched)``; the reduced frames are None when
        no steered row finished.
    """
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    rows = pd.concat([normal_df, patched_df], ignore_index=True)
    rows.to_csv(outdir / "rows.csv", index=False)
    written = [outdir / "rows.csv"]
    try:
        rows.to_parquet(outdir / "rows.parquet", index=False)
        written.append(outdir / "rows.parquet")
    except ImportError:
        log.warning("no pyarrow: skipped rows.parquet (pip install pyarrow)")
    if patched_df.empty:
        return written, None, None
    reduced_n, reduced = reduce_sweep_results(normal_df, patched_df)
    reduced.to_csv(outdir / "summary.csv", index=False)
    written.append(outdir / "summary.csv")
    if plots:
        from actadd import plots as P

        for m in [*metrics, "loss"]:
            figs = {
                f"{m}_by_layer": lambda b, m=m: P.line_plot(
                    reduced, m, baseline=reduced_n, backend=b
                ),
                f"{m}_heatmap": lambda b, m=m: P.heatmap(reduced, m, backend=b),
            }
            for name, make in figs.items():
                written.append(P.save_figure(make("plotly"), outdir / f"{name}.html"))
                written.append(P.save_figure(make("matplotlib"), outdir / f"{name}.png"))
    return written, reduced_n, reduced
