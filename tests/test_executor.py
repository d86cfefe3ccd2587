"""The executor's parts that need no cluster: identities, chunk stores and resume in this
process, summed statistics, and errors. (On a Ray cluster: tests/ray_cluster_suite.py.)"""

from __future__ import annotations

import sys

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import actadd
from actadd import progress
from actadd import sweeps as S
from actadd.cli import app
from actadd.contrast import _sites
from actadd.contrast_stats import vector_statistics_on_ray
from actadd.datasets import as_dataset
from actadd.executor import check_address, spec_of
from actadd.identity import digest, model_identity

SAMPLED = {"temperature": 1.0, "top_p": 0.9, "freq_penalty": 1.0}


def test_digests_follow_what_steers_and_nothing_else():
    a = actadd.ActivationAddition(2.0, 3, prompt="abc", label="shown as x")
    same = actadd.ActivationAddition(2.0, "blocks.3.hook_resid_pre", prompt="abc")
    assert digest([a]) == digest([same])  # labels and int/str layer names do not matter
    assert digest([a]) != digest([a * 2])
    assert digest([a]) != digest([actadd.ActivationAddition(2.0, 3, prompt="abd")])
    v = actadd.SteeringVector({3: torch.ones(4)}, 1.0, {"created": "today"})
    w = actadd.SteeringVector({3: torch.ones(4)}, 1.0, {"created": "tomorrow"})
    assert digest(v) == digest(w)  # provenance does not steer
    assert digest(v) != digest(actadd.SteeringVector({3: torch.ones(4) * 1.5}, 1.0))
    assert digest({"t": 1.0, "s": slice(0, 4)}) == digest({"s": slice(0, 4), "t": 1.0})
    with pytest.raises(TypeError):
        digest(object())


def test_model_identity_sees_the_weights(tiny_factory):
    lm = tiny_factory("llama")
    before = model_identity(lm)
    assert model_identity(lm) == before
    with torch.no_grad():
        lm.model.lm_head.weight[0, 0] += 1.0
    try:
        assert model_identity(lm) != before
    finally:
        with torch.no_grad():
            lm.model.lm_head.weight[0, 0] -= 1.0


def test_addresses_and_specs_are_checked():
    for ok in ("local", "auto", "ray://head:10001", "10.0.0.2:6379"):
        assert check_address(ok) == ok
    for bad in ("", "head", "http://head:8265", "ray:/x"):
        with pytest.raises(actadd.ActAddError, match="ray://HOST:10001"):
            check_address(bad)
    wrapped = actadd.LM(*_tiny_pair())
    with pytest.raises(actadd.ActAddError, match=r"load it with actadd.load_model"):
        spec_of(wrapped)
    assert spec_of("gpt2") == actadd.ModelSpec("gpt2")
    assert actadd.ModelSpec("./some/dir").name.startswith("/")  # absolute for other processes


def _tiny_pair():
    from conftest import build_tiny

    lm = build_tiny("gpt2")
    return lm.model, lm.tokenizer


@pytest.fixture(scope="module")
def saved(tiny_dir) -> actadd.LM:
    return actadd.load_model(tiny_dir("llama"), dtype="float64", device="cpu")


def test_chunked_sweep_in_this_process_equals_the_local_one_and_resumes(saved, tmp_path):
    configs = S.make_activation_additions([[("abc", 1.0), ("xyz", -1.0)]], [0, 2], [2, 6])
    run = {"seed": 1, "progress": False, **SAMPLED}
    local = S.sweep_over_prompts(saved, ["hello", "abcdefg"], configs, 2, 2, 5, **run)
    store = tmp_path / "chunks"

    def stop(task: str, done: int, total: int) -> None:
        if task == "sweep" and done >= 8:
            raise KeyboardInterrupt

    with progress.listening(stop):
        part = S.sweep_over_prompts(
            saved, ["hello", "abcdefg"], configs, 2, 2, 5, store=store, chunk_size=4, **run
        )
    assert part[0].attrs["interrupted"] and part[0].attrs["chunks"]["ran"] == 2
    assert len(list(store.glob("*.parquet"))) == 2
    full = S.sweep_over_prompts(
        saved, ["hello", "abcdefg"], configs, 2, 2, 5, store=store, chunk_size=4, **run
    )
    stats = full[0].attrs["chunks"]
    assert (stats["total"], stats["resumed"], stats["ran"]) == (5, 2, 3)
    pd.testing.assert_frame_equal(full[0], local[0])
    pd.testing.assert_frame_equal(full[1], local[1])
    # a damaged chunk file is run again, not trusted
    victim = sorted(store.glob("*.parquet"))[0]
    victim.write_bytes(b"not parquet")
    again = S.sweep_over_prompts(
        saved, ["hello", "abcdefg"], configs, 2, 2, 5, store=store, chunk_size=4, **run
    )
    assert again[0].attrs["chunks"]["ran"] == 1
    pd.testing.assert_frame_equal(again[1], local[1])


@pytest.mark.parametrize(
    ("method", "center"), [("mean_diff", False), ("pca", False), ("pca", True)]
)
def test_summed_shard_statistics_give_the_local_vector(tiny_factory, method, center):
    lm = tiny_factory("llama")
    ds = as_dataset("sentiment")
    local = actadd.make_vector(lm, ds, "0-2", method=method, center=center)
    dirs, stats = vector_statistics_on_ray(
        lm,
        ds,
        _sites(lm, "0-2", "resid_pre"),
        method=method,
        read="mean",
        batch_size=16,
        center=center,
        ray=None,
        workers=None,
        chunk_size=16,
    )
    for site, d in dirs.items():
        expected = local.directions[site]
        assert (d - expected).abs().max() <= 1e-6 * expected.abs().max()
        assert stats[site]["agreement"] == local.meta["stats"][site]["agreement"]
        assert stats[site]["norm"] == pytest.approx(local.meta["stats"][site]["norm"], rel=1e-9)


def test_without_the_ray_extra_every_door_names_it(monkeypatch, saved, tmp_path):
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    configs = S.make_activation_additions(["abc"], [1], [2])
    hint = r"pip install 'actadd\[ray\]'"
    with pytest.raises(actadd.MissingDependencyError, match=hint):
        S.sweep_over_prompts(saved, "hello", configs, 1, 1, 3, ray="local", progress=False)
    with pytest.raises(actadd.MissingDependencyError, match=hint):
        actadd.make_vector(saved, "sentiment", 1, ray="local")
    from actadd.model_metrics import perplexity_ratio

    with pytest.raises(actadd.MissingDependencyError, match=hint):
        perplexity_ratio(saved, ["hello"], configs.activation_additions[0], ray="local")
    result = CliRunner().invoke(
        app, ["sweep", "--ray", "local", "--out", str(tmp_path), "--model", "x"]
    )
    assert result.exit_code == 2
    assert "pip install 'actadd[ray]'" in result.output, result.output


def test_ray_options_are_checked_before_any_model_loads(tmp_path):
    result = CliRunner().invoke(app, ["sweep", "--workers", "2", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "give --ray too" in result.output
    result = CliRunner().invoke(app, ["sweep", "--ray", "nowhere", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "ray://HOST:10001" in result.output
