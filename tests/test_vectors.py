"""SteeringVector: values, steering mechanics, and files (safetensors, GGUF) on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import actadd
from actadd import SteeringVector, VectorFileError, steer
from actadd.hooks import capture
from actadd.provenance import provenance
from actadd.sites import parse_site

PROMPT = "abcdefghij"


def vec(lm, sites=("blocks.2.hook_resid_pre",), coeff=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SteeringVector(
        {s: torch.randn(lm.d_model, generator=g) for s in sites}, coeff, provenance(lm)
    )


def logits(lm, vectors, text=PROMPT, location="all"):
    with torch.no_grad(), steer(lm, vectors, addition_location=location):
        return lm.model(lm.to_tokens(text)).logits


# -- values -------------------------------------------------------------------------------------
def test_arithmetic_returns_new_values(llama):
    a, b = (
        vec(llama, seed=1),
        vec(llama, ("blocks.2.hook_resid_pre", "blocks.1.hook_resid_post"), coeff=-2.0, seed=2),
    )
    da, db = a.directions["blocks.2.hook_resid_pre"], b.directions["blocks.2.hook_resid_pre"]
    s = a + b
    assert s is not a and s.coeff == 1.0 and a.coeff == 1.5  # operands unchanged
    assert s.sites == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"]  # forward order
    torch.testing.assert_close(s.directions["blocks.2.hook_resid_pre"], 1.5 * da - 2.0 * db)
    torch.testing.assert_close(
        s.directions["blocks.1.hook_resid_post"], -2.0 * b.directions["blocks.1.hook_resid_post"]
    )
    assert (a * 2).coeff == 3.0 and (2 * a).coeff == 3.0 and (-a).coeff == -1.5
    assert (a / 3).coeff == pytest.approx(0.5) and a.with_coeff(7).coeff == 7.0
    diff = a - a
    assert diff.directions["blocks.2.hook_resid_pre"].abs().max() == 0
    assert s.meta["method"] == "sum" and len(s.meta["parts"]) == 2
    assert s.meta["fingerprint"] == llama.fingerprint
    with pytest.raises(actadd.ActAddError):
        a / 0
    with pytest.raises(actadd.ActAddError):
        a * float("nan")
    with pytest.raises(dataclasses_error()):
        a.coeff = 3  # frozen


def dataclasses_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_adding_vectors_of_different_models_raises(llama):
    a = vec(llama)
    b = SteeringVector(a.directions, 1.0, {**a.meta, "fingerprint": "0000", "model": "other"})
    with pytest.raises(actadd.ActAddError, match="different models"):
        a + b


def test_construction_validates():
    with pytest.raises(actadd.ActAddError, match="at least one"):
        SteeringVector({})
    with pytest.raises(actadd.ActAddError, match="1-D"):
        SteeringVector({1: torch.ones(2, 3)})
    with pytest.raises(actadd.ActAddError, match="one size"):
        SteeringVector({1: torch.ones(3), 2: torch.ones(4)})
    with pytest.raises(actadd.ActAddError, match="NaN"):
        SteeringVector({1: torch.tensor([1.0, float("nan")])})
    with pytest.raises(actadd.ActAddError, match="twice"):
        SteeringVector({1: torch.ones(3), "blocks.1.hook_resid_pre": torch.ones(3)})
    with pytest.raises(actadd.SiteError):
        SteeringVector({"blocks.x.resid": torch.ones(3)})
    v = SteeringVector({6: torch.ones(1, 4)})  # [1, D] is accepted as [D]
    assert v.sites == ["blocks.6.hook_resid_pre"] and v.layers == [6] and v.d_model == 4
    assert v.norms() == {"blocks.6.hook_resid_pre": pytest.approx(2.0)}


def test_to_returns_a_cast_copy(llama):
    v = vec(llama)
    w = v.to(dtype=torch.float64)
    assert w is not v and w.directions["blocks.2.hook_resid_pre"].dtype == torch.float64
    assert v.directions["blocks.2.hook_resid_pre"].dtype == torch.float32
    assert w.allclose(v)


# -- steering -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_injection_adds_coeff_times_direction_at_every_position(tiny_factory, arch):
    lm = tiny_factory(arch)
    v = vec(lm, ("blocks.1.hook_resid_pre", "blocks.2.hook_resid_post"))
    injs = v.injections(lm)
    assert [i.tensor.shape for i in injs] == [(1, lm.d_model)] * 2
    ids = lm.to_tokens(PROMPT)
    site = parse_site("blocks.1.hook_resid_pre", lm.n_layers)
    before = capture(lm, ids, [site])[site][0]
    with steer(lm, v, addition_location="all"):
        after = capture(lm, ids, [site], steered=True)[site][0]
    expected = (1.5 * v.directions[site.name]).to(before)  # float32 product, as injected
    torch.testing.assert_close(after - before, expected.expand_as(before), rtol=1e-9, atol=1e-9)


def test_scaling_is_the_coefficient(llama):
    v = vec(llama, coeff=1.0)
    doubled = SteeringVector({k: 2 * d for k, d in v.directions.items()}, 1.0)
    torch.testing.assert_close(logits(llama, v * 2), logits(llama, doubled))
    assert torch.equal(logits(llama, v * 0), logits(llama, []))  # coeff 0 = unsteered


def test_vector_in_batched_generation_equals_solo(llama):
    v = vec(llama, coeff=3.0)
    prompts = ["abcdef", "xyz", "hello there"]
    rows = [[v], [], [v, -v * 0.5]]
    kw = dict(tokens_to_generate=6, temperature=0, addition_location="all")
    batch = actadd.gen_using_activation_additions(llama, rows, prompts, **kw)
    for i, p in enumerate(prompts):
        solo = actadd.gen_using_activation_additions(llama, rows[i], [p], **kw)
        assert batch.completions[i] == solo.completions[0]
    assert batch.completions[0] != batch.completions[1] or batch.completions[0] != ""


def test_from_additions_matches_the_additions_at_location_all(llama):
    adds = actadd.get_x_vector("Lo", "Ha", coeff=2.0, act_name=1)
    v = SteeringVector.from_additions(llama, adds)
    assert v.meta["method"] == "actadd" and v.coeff == 1.0
    torch.testing.assert_close(logits(llama, v), logits(llama, list(adds)))


def test_vector_for_another_width_is_rejected(llama):
    v = SteeringVector({1: torch.ones(32)})
    with pytest.raises(actadd.ActAddError, match="d_model=32"), steer(llama, v):
        pass


# -- safetensors --------------------------------------------------------------------------------
def test_safetensors_round_trip(llama, tmp_path):
    v = vec(
        llama,
        ("blocks.1.hook_resid_pre", "blocks.2.hook_mlp_out", "blocks.-1.hook_resid_post"),
        coeff=-2.5,
    )
    path = tmp_path / "v.safetensors"
    v.save(path)
    w = SteeringVector.load(path, llama)
    assert w.sites == v.sites and w.coeff == -2.5 and w.meta == json.loads(json.dumps(v.meta))
    for k in v.sites:
        assert torch.equal(w.directions[k], v.directions[k])
    assert torch.equal(logits(llama, w), logits(llama, v))
    # the file is plain safetensors: other tools can read the tensors and the metadata
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == "actadd.steering_vector"
        assert set(f.keys()) == set(v.sites)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_corrupted_and_foreign_files_raise_clear_errors(llama, tmp_path):
    good = tmp_path / "good.safetensors"
    vec(llama).save(good)
    raw = good.read_bytes()
    cases = {
        "truncated": (_write(tmp_path / "t.safetensors", raw[: len(raw) // 2]), "corrupted"),
        "garbage": (_write(tmp_path / "g.safetensors", b"\x00\x01not a file" * 10), "corrupted"),
        "empty": (_write(tmp_path / "e.safetensors", b""), "corrupted"),
        "missing": (tmp_path / "nope.safetensors", "no such"),
    }
    from safetensors.torch import save_file

    weights = tmp_path / "model.safetensors"
    save_file({"lm_head.weight": torch.ones(3, 4)}, str(weights))
    cases["foreign"] = (weights, "not an actadd steering vector")
    newer = tmp_path / "newer.safetensors"
    save_file(
        {"blocks.1.hook_resid_pre": torch.ones(4)},
        str(newer),
        metadata={"format": "actadd.steering_vector", "format_version": "99", "coeff": "1"},
    )
    cases["version"] = (newer, "upgrade actadd")
    broken = tmp_path / "broken.safetensors"
    save_file(
        {"blocks.1.hook_resid_pre": torch.tensor([1.0, float("nan")])},
        str(broken),
        metadata={"format": "actadd.steering_vector", "format_version": "1", "coeff": "1"},
    )
    cases["nan"] = (broken, "damaged")
    gg = tmp_path / "v.gguf"
    vec(llama).to_gguf(gg)
    cases["gguf"] = (gg, "from_gguf")
    for name, (path, match) in cases.items():
        with pytest.raises(VectorFileError, match=match):
            SteeringVector.load(path)
        assert name  # each case raised


def test_loading_into_another_model_raises(llama, tmp_path):
    path = tmp_path / "v.safetensors"
    vec(llama).save(path)
    other_tokenizer = actadd.LM(llama.model, llama.tokenizer, prepend_bos=False)  # new fingerprint
    with pytest.raises(VectorFileError, match=r"fingerprint.*BOS"):
        SteeringVector.load(path, other_tokenizer)
    assert SteeringVector.load(path, other_tokenizer, strict=False).sites == vec(llama).sites
    narrow = SteeringVector({1: torch.ones(32)}, 1.0, {"model": "narrow"})
    narrow.save(path)
    with pytest.raises(VectorFileError, match=r"d_model=32.*narrow"):
        SteeringVector.load(path, llama)
    deep = SteeringVector({9: torch.ones(llama.d_model)}, 1.0, {"model": "deep", "n_layers": 12})
    deep.save(path)
    with pytest.raises(VectorFileError, match=r"deep.*blocks.9"):
        SteeringVector.load(path, llama)


# -- GGUF ---------------------------------------------------------------------------------------
def test_gguf_round_trip_and_layer_numbering(llama, tmp_path):
    """resid_pre N and resid_post N-1 are one point; llama.cpp calls it direction.{N-1}."""
    import gguf

    v = vec(llama, ("blocks.2.hook_resid_pre", "blocks.2.hook_resid_post"), coeff=3.0)
    path = tmp_path / "v.gguf"
    v.to_gguf(path)
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    assert reader.get_field("controlvector.layer_count").contents() == 2
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {"direction.1", "direction.2"}
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    np.testing.assert_allclose(
        np.array(tensors["direction.1"].data),
        3.0 * v.directions["blocks.2.hook_resid_pre"].numpy(),
        rtol=1e-6,
    )
    w = SteeringVector.from_gguf(path, llama)
    assert w.sites == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    made = actadd.mean_diff(llama, [("good day", "bad day")], 2)
    made.to_gguf(tmp_path / "made.gguf")
    stats = SteeringVector.from_gguf(tmp_path / "made.gguf").meta["stats"]
    assert stats == {"blocks.1.hook_resid_post": made.meta["stats"]["blocks.2.hook_resid_pre"]}
    assert w.coeff == 1.0 and w.meta["fingerprint"] == llama.fingerprint
    torch.testing.assert_close(logits(llama, w), logits(llama, v), rtol=1e-6, atol=1e-6)
    # exporting the import gives the same file content
    w.to_gguf(tmp_path / "again.gguf")
    again = {
        t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / "again.gguf")).tensors
    }
    for name, t in tensors.items():
        np.testing.assert_array_equal(again[name], np.array(t.data))


def test_gguf_sites_without_a_slot_raise(llama, tmp_path):
    for site, match in [
        ("blocks.1.hook_resid_pre", "direction.0"),
        ("blocks.0.hook_resid_post", "direction.0"),
        ("blocks.1.hook_attn_out", "no GGUF"),
    ]:
        with pytest.raises(VectorFileError, match=match):
            vec(llama, (site,)).to_gguf(tmp_path / "x.gguf")


def test_gguf_written_like_repeng_loads_and_foreign_gguf_raises(llama, tmp_path):
    import gguf

    # a repeng-style file: model_hint, layer_count, direction.N, nothing of ours
    path = tmp_path / "repeng.gguf"
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", 1)
    w.add_tensor("direction.1", np.arange(llama.d_model, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    v = SteeringVector.from_gguf(path, llama)
    assert v.sites == ["blocks.1.hook_resid_post"] and v.meta["gguf_model_hint"] == "llama"
    assert torch.equal(v.directions["blocks.1.hook_resid_post"], torch.arange(64.0))

    model = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(model), "llama")
    w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(VectorFileError, match=r"architecture 'llama'.*model file"):
        SteeringVector.from_gguf(model)
    bad = _write(tmp_path / "bad.gguf", path.read_bytes()[:40])
    with pytest.raises(VectorFileError, match="corrupted"):
        SteeringVector.from_gguf(bad)
    narrow = tmp_path / "narrow.gguf"
    SteeringVector({"blocks.2.hook_resid_pre": torch.ones(32)}).to_gguf(narrow)
    with pytest.raises(VectorFileError, match="d_model=32"):
        SteeringVector.from_gguf(narrow, llama)


@pytest.mark.parametrize(
    ("name", "dtype", "why"),
    [("direction.0", np.float32, "layer 0"), ("direction.1", np.float16, "F16")],
)
def test_gguf_files_llama_cpp_would_ignore_load_with_a_warning(llama, tmp_path, name, dtype, why):
    import gguf

    path = tmp_path / "v.gguf"
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", 1)
    w.add_tensor(name, np.ones(llama.d_model, dtype=dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.warns(actadd.errors.CompatibilityWarning, match=f"llama.cpp would ignore.*{why}"):
        v = SteeringVector.from_gguf(path, llama)
    assert v.directions[v.sites[0]].dtype == torch.float32  # actadd still reads it


def test_vectors_in_a_sweep(llama):
    from actadd.sweeps import sweep_over_prompts

    v = vec(llama)
    normal, patched = sweep_over_prompts(
        llama,
        ["abcdef"],
        [[v * 1], [v * 4]],
        2,
        2,
        3,
        seed=0,
        temperature=0,
        addition_location="all",
        progress=False,
    )
    assert len(normal) == 2 and len(patched) == 4
    assert patched.additions.iloc[0].startswith("+1.5 ×")
    solo = actadd.gen_using_activation_additions(
        llama, [v * 4], ["abcdef"], tokens_to_generate=3, temperature=0, addition_location="all"
    )
    strong = patched[patched.activation_addition_index == 1]
    assert strong.completions.iloc[0] == solo.completions[0]
