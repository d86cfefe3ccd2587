"""Shared fixtures: tiny random-weight models of many architectures, and the real embedded model.

Tiny models run in float64 so that argmax ties of random weights do not hide real differences;
their tokenizer is character-level and built here (no hub access).
"""

from __future__ import annotations

import os
import string
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# converted GGUF models are kept here between runs (a fresh clone converts them once)
os.environ.setdefault(
    "ACTADD_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".actadd-cache")
)

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import actadd

SPECIALS = ["<|endoftext|>", "<pad>", "<s>"]
VOCAB = {t: i for i, t in enumerate(SPECIALS + list(string.printable[:95]))}

_LLAMA = dict(
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    head_dim=16,
)
_GEMMA = dict(
    _LLAMA,
    query_pre_attn_scalar=16,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
)
# model_type -> config kwargs (besides vocab/hidden size and special ids), 3 layers each
ARCH_KWARGS: dict[str, dict] = {
    "gpt2": dict(n_positions=256, n_embd=64, n_layer=3, n_head=4, n_inner=128),
    "llama": _LLAMA,
    "gemma3_text": _GEMMA,
    "gemma2": _GEMMA,
    "qwen2": {k: v for k, v in _LLAMA.items() if k != "head_dim"},
    "qwen3": _LLAMA,
    "gpt_neox": dict(
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=256,
    ),
    "phi": dict(_LLAMA, num_key_value_heads=4, head_dim=None),
    "phi3": {k: v for k, v in _LLAMA.items() if k != "head_dim"},
    "mistral": _LLAMA,
    "opt": dict(
        num_hidden_layers=3,
        ffn_dim=128,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
    ),
    "falcon": dict(num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=256),
    "gptj": dict(n_positions=256, n_embd=64, n_layer=3, n_head=4, rotary_dim=8, n_inner=128),
    "bloom": dict(n_layer=3, n_head=4),
    "mixtral": dict(_LLAMA, num_local_experts=4, num_experts_per_tok=2),
    "olmo2": {k: v for k, v in _LLAMA.items() if k != "head_dim"},
    "stablelm": {k: v for k, v in _LLAMA.items() if k != "head_dim"},
    "starcoder2": {k: v for k, v in _LLAMA.items() if k != "head_dim"},
    "smollm3": {k: v for k, v in _LLAMA.items() if k != "head_dim"},
    "granite": {k: v for k, v in _LLAMA.items() if k != "head_dim"},
}
ARCHS = list(ARCH_KWARGS)
# float32 where float64 fails in transformers itself: torch's grouped-GEMM MoE kernel has no
# float64 (mixtral), and gemma2's and bloom's eager attention give NaN on left-padded rows in
# float64 (unsteered too).
ARCH_DTYPE = {"mixtral": torch.float32, "gemma2": torch.float32, "bloom": torch.float32}


def char_tokenizer(bos: str = "<|endoftext|>") -> PreTrainedTokenizerFast:
    """Character-level tokenizer; ``bos == eos`` gives the GPT-2 sequence-start policy."""
    tk = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=bos, eos_token="<|endoftext|>", pad_token="<pad>"
    )


def build_tiny(
    arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float64, bos: str = "<|endoftext|>"
) -> actadd.LM:
    kwargs = {k: v for k, v in ARCH_KWARGS[arch].items() if v is not None}
    size_key = "n_embd" if "n_embd" in kwargs else "hidden_size"
    kwargs.setdefault(size_key, 64)
    tok = char_tokenizer(bos)
    config = CONFIG_MAPPING[arch](
        vocab_size=len(VOCAB),
        pad_token_id=1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=0,
        **kwargs,
    )
    torch.manual_seed(seed)
    dtype = ARCH_DTYPE.get(arch, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    # Random weights give near-uniform logits; sharpen them so greedy choices are stable.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return actadd.LM(model, tok, name=f"tiny-{arch}")


@pytest.fixture(scope="session")
def tiny_factory() -> Callable[..., actadd.LM]:
    cache: dict[str, actadd.LM] = {}

    def get(arch: str = "llama") -> actadd.LM:
        if arch not in cache:
            cache[arch] = build_tiny(arch)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_dir(arch)``: a float32 tiny model saved to disk (for the CLI and load_model)."""
    cache: dict[str, Path] = {}

    def get(arch: str = "llama") -> Path:
        if arch not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            lm = build_tiny(arch, dtype=torch.float32)
            lm.model.save_pretrained(path)
            lm.tokenizer.save_pretrained(path)
            cache[arch] = path
        return cache[arch]

    return get


@pytest.fixture
def llama(tiny_factory: Callable[..., actadd.LM]) -> actadd.LM:
    return tiny_factory("llama")


@pytest.fixture
def gpt2(tiny_factory: Callable[..., actadd.LM]) -> actadd.LM:
    return tiny_factory("gpt2")


@pytest.fixture(scope="session")
def real_lm() -> actadd.LM:
    """The embedded SmolLM2-135M-Instruct, loaded once per session (~20 s)."""
    return actadd.load_model()


# -- helpers shared by the mechanics tests ------------------------------------------------------
PROMPT = "abcdefghij"


def resid_pre_independent(lm: actadd.LM, text: str, layer: int) -> torch.Tensor:
    """Input of decoder layer ``layer`` from output_hidden_states: no hooks involved."""
    with torch.no_grad():
        out = lm.base_model(input_ids=lm.to_tokens(text), output_hidden_states=True)
    return out.hidden_states[layer][0]


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to rounding: float64 models to 1e-9, float32 ones (mixtral) to 1e-5."""
    tol = 1e-9 if actual.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def all_hooks(lm: actadd.LM) -> int:
    """Hooks on the model (transformers registers a few of its own; compare with a baseline)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())


def logits(lm: actadd.LM, text: str = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(lm.to_tokens(text)).logits


def greedy(lm: actadd.LM, prompts: list[str], tokens: int = 6, **kwargs) -> torch.Tensor:
    """Greedy ``generate`` of a left-padded batch (ids of prompt and completion)."""
    ids, mask = lm.batch_tokens(prompts)
    return lm.model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=tokens,
        do_sample=False,
        pad_token_id=lm.pad_token_id,
        **kwargs,
    )


def check_batch_solo_cache(
    lm: actadd.LM, adds: list, prompts: list[str], *, tokens: int, location: str | None = None
) -> None:
    """Each row of a batch equals the row alone, and cached generation equals uncached."""
    batch = actadd.gen_using_activation_additions(
        lm, adds, prompts, tokens_to_generate=tokens, temperature=0, addition_location=location
    )
    for i, prompt in enumerate(prompts):
        solo = actadd.gen_using_activation_additions(
            lm,
            adds[i],
            [prompt],
            tokens_to_generate=tokens,
            temperature=0,
            addition_location=location,
        )
        assert batch.completions[i] == solo.completions[0], (lm.name, location, i)
    outs = []
    for use_cache in (True, False):
        with actadd.steer(lm, adds, addition_location=location):
            outs.append(greedy(lm, prompts, tokens, use_cache=use_cache))
    assert torch.equal(outs[0], outs[1]), (lm.name, location)


# -- a live server ----------------------------------------------------------------------------
@contextmanager
def live_server(app: Any) -> Iterator[tuple[str, Any]]:
    """uvicorn in a thread on 127.0.0.1 (a free port); stopped the way Ctrl-C stops it."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(30)


def check_packed_equals_alone(lm: actadd.LM) -> None:
    """A real model takes mixed steps, and they match each request alone: logits within
    float32 rounding (``probe_error``, printed), and 6 greedy completions (Love − Hate and
    unsteered), each joining while the ones before it decode, the same as with no packed
    forward at all."""
    from actadd.batching import Request, Scheduler, _cache_keyword
    from actadd.packing import packable, probe_error

    err = probe_error(lm, _cache_keyword(lm.model))
    print(f"{lm.name}: packed vs alone, max |Δ logit| = {err:.2e} of the largest logit")
    assert err < 1e-4 and packable(lm, _cache_keyword(lm.model))
    love = tuple(actadd.get_x_vector("Love", "Hate", 5, 6))
    prompts = [
        "I hate you because",
        "The weather today is",
        "Once upon a time, in a small village,",
        "My favourite food is",
        "Science is",
        "He walked into the room",
    ]
    reqs = [
        Request.from_prompt(lm, p, additions=love if i % 2 else (), max_tokens=10 + i)
        for i, p in enumerate(prompts)
    ]

    def run(sched: Scheduler, order: Sequence[int]) -> list[str]:
        texts = ["" for _ in reqs]
        for i in order:

            def on(kind: str, args: tuple, i: int = i) -> None:
                if kind == "delta":
                    texts[i] += args[0]

            sched.submit(reqs[i], on)
            sched.step()  # each joins while the ones before it decode
        while sched.busy:
            sched.step()
        return texts

    batched = Scheduler(lm, max_rows=8, mix_min_rows=1)
    texts = run(batched, range(len(reqs)))
    plain = Scheduler(lm, max_rows=1, mixed_steps=False)  # no packed forward at all
    alone = [run(plain, [i])[i] for i in range(len(reqs))]
    differ = [i for i, (x, y) in enumerate(zip(texts, alone, strict=True)) if x != y]
    print(f"{lm.name}: {len(differ)} of {len(reqs)} greedy completions differ from alone")
    assert batched.stats["mixed"] >= len(reqs) - 1
    assert not differ, [(texts[i], alone[i]) for i in differ]
