"""The cache of converted GGUF models: later loads read it, give the same model, and a damaged
copy is rebuilt (the session's embedded model was loaded through it)."""

from __future__ import annotations

import shutil

import pytest
import torch

import actadd
from actadd import loading

pytestmark = pytest.mark.slow


def logits(lm: actadd.LM) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(lm.to_tokens("I hate you because")).logits


def _no_conversion(*args, **kwargs):
    raise AssertionError("the GGUF file was converted again instead of read from the cache")


def cached_dir() -> object:
    (entry,) = [p for p in (loading.cache_dir() / "models").iterdir() if "SmolLM2" in p.name]
    return entry


def test_a_second_load_reads_the_cache_and_gives_the_same_model(real_lm, monkeypatch):
    assert (cached_dir() / "model.safetensors").exists()
    monkeypatch.setattr(loading, "_from_gguf", _no_conversion)
    again = actadd.load_model()
    assert again.fingerprint == real_lm.fingerprint and again.name == real_lm.name
    assert torch.equal(logits(again), logits(real_lm))
    assert again.model.dtype == torch.float32


def test_a_damaged_cache_is_rebuilt_and_clear_cache_empties_it(real_lm, monkeypatch, tmp_path):
    shutil.copytree(cached_dir(), tmp_path / "models" / cached_dir().name)
    monkeypatch.setenv("ACTADD_CACHE_DIR", str(tmp_path))
    weights = cached_dir() / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    converted = []

    def convert(path, kwargs):  # the real conversion takes ~40 s: reuse the loaded model
        converted.append(path)
        return real_lm.model, real_lm.tokenizer

    monkeypatch.setattr(loading, "_from_gguf", convert)
    lm = actadd.load_model()
    assert converted and torch.equal(logits(lm), logits(real_lm))
    assert (cached_dir() / "model.safetensors").stat().st_size > 10**8  # written again
    assert loading.clear_cache() > 10**8 and not (tmp_path / "models").exists()


def test_load_model_without_the_cache_still_works(real_lm, monkeypatch, tmp_path):
    monkeypatch.setenv("ACTADD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(loading, "_from_gguf", lambda p, kw: (real_lm.model, real_lm.tokenizer))
    lm = actadd.load_model(cache=False)
    assert lm.model is real_lm.model and not (tmp_path / "models").exists()
