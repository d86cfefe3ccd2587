"""Why actadd serves with its own scheduler: transformers' continuous batching on this machine.

Runs the same greedy work three ways on the embedded model and checks they make the same
tokens: one padded ``generate`` (the floor), transformers' continuous-batching engine
(``model.generate_batch`` with a ``ContinuousBatchingConfig``; prefix sharing off, since shared
blocks would carry one request's steered keys into another's), and ``actadd.generate_many``.

    python benchmarks/hf_engine.py [--reps 3] [--long]

``--long`` adds 16 prompts of ~500 tokens (8 new tokens each), where a packed batch attends
every query to every packed key. The default configuration of the engine is run last (its
peak memory is the process's). Results go to ``benchmarks/results/hf-engine-<time>.json``;
docs/serving.md quotes them.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

import actadd
from actadd.batching import Request, generate_many

logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
TUNED = {"num_blocks": 24, "page_size": 32, "max_batch_tokens": 512}


def padded(lm: actadd.LM, prompts: list[list[int]], n: int) -> list[list[int]]:
    ids, mask = lm.pad(prompts)
    with torch.no_grad():
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=lm.pad_token_id,
        )
    return out[:, ids.shape[1] :].tolist()


def hf_engine(lm: actadd.LM, prompts: list[list[int]], n: int, **config: Any) -> list[list[int]]:
    gc = GenerationConfig(
        do_sample=False, eos_token_id=-1, max_new_tokens=n, pad_token_id=lm.pad_token_id
    )
    cfg = ContinuousBatchingConfig(allow_block_sharing=False, **config)
    out = lm.model.generate_batch(prompts, generation_config=gc, continuous_batching_config=cfg)
    return [list(out[k].generated_tokens) for k in sorted(out, key=lambda k: int(k.split("_")[-1]))]


def actadd_engine(lm: actadd.LM, prompts: list[list[int]], n: int) -> list[list[int]]:
    outs = generate_many(lm, [Request(tuple(p), max_tokens=n) for p in prompts], max_rows=16)
    return [o.tokens for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--long", action="store_true")
    args = ap.parse_args()
    lm = actadd.load_model()
    lm.model.generation_config.eos_token_id = None  # every variant makes all n tokens
    chat = lm.chat_tokens([{"role": "user", "content": "Write a short story about a dragon."}])
    work = {"8 x 32 tokens": ([list(chat.ids)] * 8, 32)}
    if args.long:
        g = torch.Generator().manual_seed(0)
        long = [torch.randint(100, 40000, (500,), generator=g).tolist() for _ in range(16)]
        work["16 x 500-token prompts, 8 tokens"] = (long, 8)
    record: dict[str, Any] = {"machine": C.machine(), "commit": C.git_commit(), "results": []}
    for name, (prompts, n) in work.items():
        variants = {
            "generate (padded)": lambda p=prompts, n=n: padded(lm, p, n),
            "transformers engine (tuned)": lambda p=prompts, n=n: hf_engine(lm, p, n, **TUNED),
            "actadd.generate_many": lambda p=prompts, n=n: actadd_engine(lm, p, n),
        }
        tokens = {k: f() for k, f in variants.items()}  # warm-up, and the tokens
        same = {k: v == tokens["generate (padded)"] for k, v in tokens.items()}
        times = C.interleaved(variants, reps=args.reps)
        for k in variants:
            row = {
                "work": name,
                "variant": k,
                "seconds": C.med(times[k]),
                "cpu_seconds": C.med(times.cpu[k]),
                "same_tokens_as_generate": same[k],
            }
            record["results"].append(row)
            print(
                f"{name:36s} {k:30s} {row['seconds']:7.2f} s  cpu {row['cpu_seconds']:7.2f} s"
                f"  same tokens: {same[k]}",
                flush=True,
            )
    prompts, n = work["8 x 32 tokens"]
    t0 = time.perf_counter()
    hf_engine(lm, prompts, n)  # transformers' default configuration
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    default = {"seconds": time.perf_counter() - t0, "peak_rss_gib": peak}
    record["default_config"] = default
    print(
        f"default ContinuousBatchingConfig, 8 x 32: {default['seconds']:.1f} s, "
        f"peak RSS {peak:.1f} GiB"
    )
    print(f"wrote {C.write_json('hf-engine', record)}")


if __name__ == "__main__":
    main()
