"""Big models across devices: accelerate's device maps, CPU and disk offload, and steering.

Steering casts each layout to the hooked tensor's device and dtype, so a model whose layers
live in different places steers exactly like the same model in one place. This machine has
only a CPU: the split tested everywhere is CPU + accelerate's disk offload (layers whose
weights stay on disk and are loaded by accelerate's hooks as the forward pass reaches them);
the CPU + GPU split runs only where CUDA is.
"""

from __future__ import annotations

import pytest
import torch

import actadd
from actadd.errors import ModelLoadError

PROMPT = "hello world, steer me"


def _device_map(lm: actadd.LM, where: dict[int, str]) -> dict[str, str]:
    """Every top-level module on the CPU except decoder layers placed by ``where``."""
    layers = lm.site_map.layers  # e.g. "model.layers"
    parent = layers.rpartition(".")[0]
    dm = {f"{parent}.{n}": "cpu" for n, _ in lm.base_model.named_children() if n != "layers"}
    dm.update({f"{layers}.{i}": where.get(i, "cpu") for i in range(lm.n_layers)})
    for n, _ in lm.model.named_children():
        if n != parent:
            dm[n] = "cpu"
    return dm


def _offloaded(module: torch.nn.Module) -> bool:
    """Every submodule with weights is offloaded by an accelerate hook."""
    with_weights = [m for m in module.modules() if list(m.parameters(recurse=False))]
    return all(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in with_weights)


def _steered_logits(lm: actadd.LM, adds: list, location: str | None = None) -> torch.Tensor:
    with torch.no_grad(), actadd.steer(lm, adds, addition_location=location):
        return lm.model(lm.to_tokens(PROMPT)).logits.cpu()


def _steered_greedy(lm: actadd.LM, adds: list) -> list[str]:
    df = actadd.gen_using_activation_additions(
        lm, adds, [PROMPT, "abc"], tokens_to_generate=8, temperature=0
    )
    return df.completions.tolist()


@pytest.fixture(scope="module")
def on_cpu(tiny_dir) -> actadd.LM:
    return actadd.load_model(tiny_dir("llama"), dtype="float64", device="cpu")


def test_disk_offloaded_layers_steer_like_the_model_on_the_cpu(tiny_dir, on_cpu, tmp_path):
    dm = _device_map(on_cpu, {1: "disk", 2: "disk"})
    split = actadd.load_model(
        tiny_dir("llama"), dtype="float64", device_map=dm, offload_folder=tmp_path / "off"
    )
    # the layers really are offloaded: placeholders, and accelerate's hooks read the weights
    # from disk (from the checkpoint's safetensors, or copies in offload_folder) at each call
    assert {p.device.type for p in split.layers[2].parameters()} == {"meta"}
    assert _offloaded(split.layers[2]) and not _offloaded(split.layers[0])
    assert split.device.type == "cpu"  # inputs go to a device that holds data
    assert split.spec is not None and split.spec.device_map == dm
    x_vector = list(actadd.get_x_vector("abc", "xyz", coeff=4, act_name=1))
    at_two = [actadd.ActivationAddition(3, "blocks.2.hook_resid_post", prompt="abcd")]
    vector = actadd.SteeringVector({"blocks.2.hook_resid_pre": torch.randn(on_cpu.d_model)}, 5.0)
    for adds, loc in ((x_vector, None), (at_two, "back"), ([vector], None)):
        expected = _steered_logits(on_cpu, adds, loc)
        assert not torch.equal(expected, _steered_logits(on_cpu, [], None))  # it does steer
        torch.testing.assert_close(_steered_logits(split, adds, loc), expected, rtol=0, atol=0)
    # generation through offloaded layers, with the KV cache: the same greedy text
    assert _steered_greedy(split, x_vector) == _steered_greedy(on_cpu, x_vector)


def test_layers_on_two_devices_steer_like_one_device(tiny_dir, on_cpu):
    """A model split across the CPU and a GPU (only where CUDA is: this CI machine has none)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to split layers across CPU and GPU (none here)")
    dm = _device_map(on_cpu, {1: "cuda:0", 2: "cuda:0"})
    split = actadd.load_model(tiny_dir("llama"), dtype="float64", device_map=dm)
    adds = list(actadd.get_x_vector("abc", "xyz", coeff=4, act_name=2))
    torch.testing.assert_close(_steered_logits(split, adds), _steered_logits(on_cpu, adds))


def test_placement_options_need_a_device_map(tiny_dir):
    with pytest.raises(ModelLoadError, match="device_map"):
        actadd.load_model(tiny_dir("llama"), offload_folder="/tmp/x")
    with pytest.raises(ModelLoadError, match="not both"):
        actadd.load_model(tiny_dir("llama"), device="cpu", device_map="auto")


@pytest.mark.slow
def test_embedded_gguf_model_with_disk_offload_steers_like_on_the_cpu(real_lm, tmp_path):
    """The GGUF path: the converted copy in the cache is what accelerate places. (Compared with
    the same copy loaded on the CPU: the model returned by the very first, converting load
    steers the same up to ~2e-5 in float32 logits, a different kernel path.)"""
    dm = _device_map(real_lm, {i: "disk" for i in range(20, real_lm.n_layers)})
    split = actadd.load_model(device_map=dm, offload_folder=tmp_path / "off")
    on_cpu = actadd.load_model(device="cpu")
    assert _offloaded(split.layers[25]) and not _offloaded(split.layers[0])
    for layer in (4, 24):  # before the offloaded layers, and inside them
        adds = list(actadd.get_x_vector("Love", "Hate", coeff=5, act_name=layer))
        expected = _steered_logits(on_cpu, adds)
        torch.testing.assert_close(_steered_logits(split, adds), expected, rtol=0, atol=0)
