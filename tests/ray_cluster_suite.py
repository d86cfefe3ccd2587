"""Ray tests on a local two-node cluster, loopback only.

Run by ``tests/test_ray.py``, which starts pytest on this file inside a fresh network and PID
namespace whose only interface is ``lo`` (``tests/netns.py``): Ray binds 127.0.0.1 there and
every process it starts ends with the namespace. Outside such a namespace the module skips.

The cluster: ``ray.cluster_utils.Cluster`` with a head and a second node, one CPU each, so the
two workers are two processes on two Ray nodes. The model: the tiny random Llama of
``conftest.py``, saved to disk and loaded by every worker in float64.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest

import actadd
from actadd import progress
from actadd import sweeps as S
from netns import FLAG, in_loopback_only_netns, lo_up

if os.environ.get(FLAG) != "1":
    pytest.skip(
        "runs inside a loopback-only namespace, started by tests/test_ray.py",
        allow_module_level=True,
    )

PROMPTS = ["hello there", "abcdefgh"]
GREEDY = {"temperature": 0.0}
SAMPLED = {"temperature": 1.0, "top_p": 0.9, "freq_penalty": 1.0}
TIMEOUT = 120  # seconds for any one sweep here


@pytest.fixture(scope="module")
def cluster():
    lo_up()
    assert in_loopback_only_netns()
    import ray
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 96 * 2**20, "node_ip_address": "127.0.0.1"}
    head = {**node, "include_dashboard": False, "include_log_monitor": False, "no_monitor": True}
    t0 = time.perf_counter()
    c = Cluster(initialize_head=True, head_node_args=head)
    c.add_node(**node, include_log_monitor=False)
    ray.init(address=c.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    c.wait_for_nodes(timeout=60)
    print(f"two-node cluster up in {time.perf_counter() - t0:.1f} s")
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def lm(tiny_dir) -> actadd.LM:
    return actadd.load_model(tiny_dir("llama"), dtype="float64", device="cpu")


@pytest.fixture(scope="module")
def configs() -> pd.DataFrame:
    return S.make_activation_additions([[("abc", 1.0), ("xyz", -1.0)]], [0, 1, 2], [2, 6])


@pytest.fixture(scope="module")
def workers(cluster, lm):
    """Two workers kept for the rest of the module (each test would otherwise reload the
    model). They hold both CPUs of the cluster: the one test that starts its own workers
    (through the CLI) comes before the first test that uses this fixture."""
    from actadd.executor import RayExecutor

    with RayExecutor(lm, address="auto", workers=2, start_timeout=TIMEOUT) as ex:
        yield ex


def sweep(lm, configs, sampling, **kwargs):
    return S.sweep_over_prompts(
        lm, PROMPTS, configs, 2, 2, 6, seed=5, progress=False, **sampling, **kwargs
    )


def model_worker_pids() -> list[int]:
    """Processes of actadd's Ray workers (this PID namespace holds only the test's)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::ModelWorker"):
                pids.append(int(d.name))
    return pids


def test_cli_sweep_on_ray_resumes_and_writes_what_a_local_run_writes(tiny_dir, cluster, tmp_path):
    from typer.testing import CliRunner

    from actadd.cli import app

    args = ["sweep", "--model", str(tiny_dir("llama")), "--prompt", "hello there"]
    args += ["--add", "abc", "--sub", "xyz", "--layers", "0,2", "--coeffs", "2,6", "--n", "2"]
    args += ["--tokens", "5", "--metric", "words", "--words", "e", "--top-p", "0.9"]
    local = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    on_ray = [*args, "--ray", "auto", "--workers", "2", "--chunk-size", "3"]
    on_ray += ["--out", str(tmp_path / "ray")]
    # the address path: the command starts two workers, which load the model (this process
    # does not), and stops them
    first = CliRunner().invoke(app, on_ray)
    assert first.exit_code == 0, first.output
    said = " ".join(first.output.split())  # rich wraps lines at the console's width
    assert "4 chunks: 0 resumed" in said and "2 workers on 1 node" in said, first.output
    again = CliRunner().invoke(app, on_ray)
    assert again.exit_code == 0, again.output
    said = " ".join(again.output.split())  # e.g. "0 run" after a long temporary path
    assert "4 chunks: 4 resumed" in said and ", 0 run in" in said, again.output
    assert len(list((tmp_path / "ray" / "chunks").glob("*.parquet"))) == 4
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "ray" / "rows.csv"), pd.read_csv(tmp_path / "local" / "rows.csv")
    )


def test_sweep_on_two_workers_equals_the_local_sweep(lm, configs, workers):
    local = sweep(lm, configs, SAMPLED)
    # the sweep gets only the spec: the driver needs no weights for a Ray run
    remote = sweep(lm.spec, configs, SAMPLED, ray=workers, chunk_size=4)
    pd.testing.assert_frame_equal(remote[0], local[0])
    pd.testing.assert_frame_equal(remote[1], local[1])
    stats = remote[0].attrs["chunks"]
    assert stats["total"] == stats["ran"] == 7  # 28 rows in chunks of 4
    assert stats["where"].startswith("2 workers on 1 node")  # one host, two Ray nodes
    assert sorted(stats["by_worker"]) == [0, 1], stats["by_worker"]  # both did work
    assert local[1].completions.nunique() > 4  # the steering changes the text


def test_greedy_sweep_on_running_workers_equals_the_local_sweep(lm, configs, workers):
    local = sweep(lm, configs, GREEDY)
    remote = sweep(lm, configs, GREEDY, ray=workers, chunk_size=3)
    pd.testing.assert_frame_equal(remote[0], local[0])
    pd.testing.assert_frame_equal(remote[1], local[1])
    assert remote[0].attrs["chunks"]["total"] == 10  # 28 rows in chunks of 3


def test_a_worker_killed_mid_sweep_loses_no_row_and_repeats_none(lm, configs, workers):
    local = sweep(lm, configs, SAMPLED)
    killed: list[int] = []

    def kill_one(task: str, done: int, total: int) -> None:
        if task == "sweep" and done > 0 and not killed:
            pids = model_worker_pids()
            assert len(pids) == 2, pids
            os.kill(pids[0], signal.SIGKILL)  # the other is mid-chunk, or this one is
            killed.append(pids[0])

    with progress.listening(kill_one):
        normal, patched = sweep(lm, configs, SAMPLED, ray=workers, chunk_size=4)
    assert killed
    pd.testing.assert_frame_equal(normal, local[0])
    pd.testing.assert_frame_equal(patched, local[1])
    stats = normal.attrs["chunks"]
    assert stats["worker_losses"] >= 1 and stats["retried"] >= 1, stats
    assert stats["ran"] == stats["total"] == 7
    # every row exactly once: no duplicate (prompt, configuration, completion)
    keys = ["prompts", "activation_addition_index", "completion_index"]
    assert not patched.duplicated(keys).any() and not normal.duplicated(keys[::2]).any()


def test_stop_half_way_then_rerun_runs_only_the_missing_chunks(lm, configs, workers, tmp_path):
    local = sweep(lm, configs, GREEDY)
    store = tmp_path / "chunks"

    def stop_half_way(task: str, done: int, total: int) -> None:
        if task == "sweep" and done >= total // 2:
            raise KeyboardInterrupt  # what Ctrl-C does in the driver

    with progress.listening(stop_half_way):
        first = sweep(lm, configs, GREEDY, ray=workers, store=store, chunk_size=4)
    assert first[0].attrs["interrupted"]
    kept = sorted(store.glob("*.parquet"))
    ran = first[0].attrs["chunks"]["ran"]
    assert 0 < ran == len(kept) < 7
    assert len(first[0]) + len(first[1]) == sum(len(pd.read_parquet(f)) for f in kept)
    mtimes = {f: f.stat().st_mtime_ns for f in kept}

    second = sweep(lm, configs, GREEDY, ray=workers, store=store, chunk_size=4)
    stats = second[0].attrs["chunks"]
    assert not second[0].attrs["interrupted"]
    assert stats["resumed"] == len(kept) and stats["ran"] == 7 - len(kept), stats
    assert {f: f.stat().st_mtime_ns for f in kept} == mtimes  # finished chunks not redone
    pd.testing.assert_frame_equal(second[0], local[0])
    pd.testing.assert_frame_equal(second[1], local[1])
    # a different sweep (other seed) shares no chunk with this one: nothing is resumed
    other = S.sweep_over_prompts(
        lm,
        PROMPTS,
        configs,
        2,
        2,
        6,
        seed=6,
        progress=False,
        ray=workers,
        store=store,
        chunk_size=4,
        **GREEDY,
    )
    assert other[0].attrs["chunks"]["resumed"] == 0


@pytest.mark.parametrize(("method", "center"), [("mean_diff", False), ("pca", True)])
def test_vector_from_shards_on_two_workers_equals_the_local_one(lm, workers, method, center):
    local = actadd.make_vector(lm, "sentiment", "0-2", method=method, center=center)
    remote = actadd.make_vector(
        lm, "sentiment", "0-2", method=method, center=center, ray=workers, chunk_size=16
    )
    for site, expected in local.directions.items():
        diff = float((remote.directions[site] - expected).abs().max())
        print(f"{method} center={center} {site}: max |ray − local| = {diff:.3g}")
        assert diff <= 1e-6 * float(expected.abs().max())
        ours, theirs = remote.meta["stats"][site], local.meta["stats"][site]
        assert ours["agreement"] == theirs["agreement"]
        assert ours["norm"] == pytest.approx(theirs["norm"], rel=1e-9)


def test_corpus_metrics_and_pair_search_on_two_workers_equal_local(lm, workers):
    from actadd.model_metrics import logit_shift, perplexity_ratio, text_loss

    texts = [f"text number {i}: {'abcdefgh' * (1 + i % 3)}" for i in range(20)]
    adds = list(actadd.get_x_vector("abc", "xyz", coeff=4, act_name=1))
    opts = {"ray": workers, "chunk_size": 6}
    pd.testing.assert_frame_equal(
        perplexity_ratio(lm, texts, adds, **opts), perplexity_ratio(lm, texts, adds)
    )
    pd.testing.assert_frame_equal(text_loss(lm, texts, **opts), text_loss(lm, texts))
    shift = logit_shift(lm, texts, adds, positions="all", aligned_tokens=[5, 6], **opts)
    pd.testing.assert_frame_equal(
        shift, logit_shift(lm, texts, adds, positions="all", aligned_tokens=[5, 6])
    )
    search = {"candidates": ["abc", "bcd", "xyz", "hello"], "negatives": [" ", "q"]}
    search |= {"layer": 1, "coeff": 6, "rescore": 2, "samples": 2, "tokens": 4, "top_p": 0.9}
    local = actadd.search_pairs(lm, ["a"], ["hello world"], **search)
    remote = actadd.search_pairs(lm, ["a"], ["hello world"], ray=workers, chunk_size=3, **search)
    pd.testing.assert_frame_equal(remote, local)
