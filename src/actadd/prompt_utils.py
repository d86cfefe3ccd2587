"""Migration from ``activation_additions``: its ``prompt_utils`` names, from actadd.

``from activation_additions.prompt_utils import ActivationAddition, get_x_vector`` becomes
``from actadd.prompt_utils import ...`` and the code runs on any Hugging Face model loaded with
``actadd.load_model``. Differences: ``act_name`` accepts only the residual-stream sites
(``resid_pre``/``resid_post``/``attn_out``/``mlp_out``, not ``embed``), so
``weighted_prompt_superposition`` is not provided; ``pad_tokens_to_match_activation_additions``
is not needed (positions are handled by ``addition_location``).
"""

from __future__ import annotations

from actadd.additions import ActivationAddition, get_x_vector
from actadd.sites import get_act_name

__all__ = ["ActivationAddition", "get_block_name", "get_x_vector"]


def get_block_name(block_num: int) -> str:
    """``blocks.{block_num}.hook_resid_pre``, the input of that decoder layer."""
    return get_act_name("resid_pre", block_num)
