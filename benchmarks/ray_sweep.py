"""The same 64-configuration sweep locally and on a local two-worker Ray cluster.

``make bench``'s ``ray`` workload runs this file in a fresh loopback-only network namespace
(``unshare``: Ray binds the primary address otherwise, and benchmarks here stay on loopback).
One process: the embedded model, 64 configurations (Love − Hate at 8 layers × 8 coefficients)
× ``--n`` sampled completions + ``--n`` unsteered, ``--tokens`` tokens, house sampling
settings; first the local sweep (torch with every core), then a ``ray.cluster_utils.Cluster``
of two nodes with one CPU each and two workers (one torch thread each: the same cores). Prints
one JSON line: times, rows/s, each worker's model-load time, Ray's per-chunk overhead and
whether the two sweeps' rows are identical.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import struct
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
for key, value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}.items():
    os.environ.setdefault(key, value)

PROMPT = "I hate you because"
LAYERS = (2, 4, 6, 8, 10, 12, 14, 16)
COEFFS = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)
SAMPLING = {"temperature": 1.0, "top_p": 0.3, "freq_penalty": 1.0}


def lo_up() -> None:
    """Bring up ``lo`` in a fresh network namespace (SIOCGIFFLAGS / SIOCSIFFLAGS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, 0x8913, req))[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", flags | 0x1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=2, help="completions per configuration")
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--chunk-size", type=int, default=16)
    args = p.parse_args()
    if [n for _, n in socket.if_nameindex()] != ["lo"]:
        raise SystemExit("run me in a loopback-only network namespace (run.py does)")
    lo_up()
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rb", dir="/tmp"))

    import ray
    import torch
    from ray.cluster_utils import Cluster

    import actadd
    from actadd import sweeps as S

    lm = actadd.load_model()
    configs = S.make_activation_additions([[("Love", 1.0), ("Hate", -1.0)]], LAYERS, COEFFS)
    run = {"seed": 0, "progress": False, **SAMPLING}
    S.sweep_over_prompts(lm, PROMPT, configs.head(2), 1, 1, 4, **run)  # warm-up
    threads = torch.get_num_threads()
    local_s = {}
    for n_threads in (threads, 1):  # every core, then one thread (what each worker gets)
        torch.set_num_threads(n_threads)
        t = time.perf_counter()
        local = S.sweep_over_prompts(lm, PROMPT, configs, args.n, args.n, args.tokens, **run)
        local_s[n_threads] = time.perf_counter() - t
    torch.set_num_threads(threads)
    rows = len(local[0]) + len(local[1])

    node = {"num_cpus": 1, "object_store_memory": 128 * 2**20, "node_ip_address": "127.0.0.1"}
    t = time.perf_counter()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node, "include_dashboard": False, "include_log_monitor": False},
    )
    cluster.add_node(**node, include_log_monitor=False)
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    cluster.wait_for_nodes(timeout=120)
    cluster_s = time.perf_counter() - t
    try:
        with actadd.RayExecutor(lm, address="auto", workers=2, start_timeout=600) as ex:
            loads = [w.info["load_s"] for w in ex.workers]
            start_s = ex.start_s
            t = time.perf_counter()
            remote = S.sweep_over_prompts(
                lm,
                PROMPT,
                configs,
                args.n,
                args.n,
                args.tokens,
                ray=ex,
                chunk_size=args.chunk_size,
                **run,
            )
            ray_s = time.perf_counter() - t
    finally:
        ray.shutdown()
        cluster.shutdown()
    stats = remote[0].attrs["chunks"]
    same = all(a.equals(b) for a, b in zip(remote, local, strict=True))
    texts_same = all(
        (a.completions == b.completions).all() for a, b in zip(remote, local, strict=True)
    )
    loss_diff = max(
        float((a.loss - b.loss).abs().max()) for a, b in zip(remote, local, strict=True)
    )
    per_worker = {str(w): n for w, n in stats["by_worker"].items()}  # chunks each finished
    print(
        json.dumps(
            {
                "rows": rows,
                "configurations": len(configs),
                "tokens": args.tokens,
                "chunk_size": args.chunk_size,
                "chunks": stats["total"],
                "local_s": local_s[threads],
                "local_rows_per_s": rows / local_s[threads],
                "local_torch_threads": threads,
                "local_1thread_s": local_s[1],
                "local_1thread_rows_per_s": rows / local_s[1],
                "cluster_start_s": cluster_s,
                "workers_start_s": start_s,
                "worker_load_s": loads,
                "ray_sweep_s": ray_s,
                "ray_map_s": stats["seconds"],
                "ray_rows_per_s": rows / ray_s,
                "rows_per_s_per_worker": rows / sum(stats["compute_s"]),
                "chunk_compute_s": stats["compute_s"],
                "chunk_round_trip_s": stats["round_trip_s"],
                "overhead_per_chunk_s": stats["overhead_s"],
                "driver_outside_map_s": ray_s - stats["seconds"],
                "chunks_per_worker": per_worker,
                "identical_rows": bool(same),
                "identical_completions": bool(texts_same),
                "max_abs_loss_diff": loss_diff,
                "frames_checked": [len(x) for x in remote],
            }
        )
    )
    if os.environ.get("RAY_SWEEP_STRICT") == "1":
        assert same, "the Ray sweep's rows differ from the local sweep's"


if __name__ == "__main__":
    main()
