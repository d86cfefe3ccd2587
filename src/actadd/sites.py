"""Sites: where in the forward pass an addition is read and written.

Users name sites the TransformerLens way (``blocks.6.hook_resid_pre``, ``hook_resid_post``,
``hook_attn_out``, ``hook_mlp_out``) or with a bare layer number (= ``hook_resid_pre``). This
module maps those names onto the modules of a Hugging Face model through one table of known
architectures, a guesser for the rest, and a user override (``LM(..., layers="model.layers")``).

=================  ==========================================  ==========================
site               Hugging Face module                          hook
=================  ==========================================  ==========================
``resid_pre``      decoder layer ``L`` (its input)             forward pre-hook
``resid_post``     decoder layer ``L`` (its output)            forward hook
``attn_out``       attention output as added to the residual   forward hook
``mlp_out``        MLP output as added to the residual         forward hook
=================  ==========================================  ==========================
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from torch import nn

from actadd.errors import SiteError

__all__ = [
    "ARCHITECTURES",
    "Site",
    "SiteMap",
    "canonical_act_name",
    "get_act_name",
    "guess_site_map",
    "parse_site",
]

log = logging.getLogger(__name__)

KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
# where each kind sits inside a decoder layer, in forward order
_FORWARD_ORDER = ("resid_pre", "attn_out", "mlp_out", "resid_post")


@dataclass(frozen=True)
class Site:
    """A point in the forward pass: ``kind`` at decoder layer ``layer`` (0-based, normalised)."""

    kind: str
    layer: int

    @property
    def name(self) -> str:
        """The TransformerLens name, e.g. ``blocks.6.hook_resid_pre``."""
        return get_act_name(self.kind, self.layer)

    @property
    def order(self) -> tuple[int, int]:
        """Sort key in forward order (negative layers, not yet resolved, after the others)."""
        layer = self.layer if self.layer >= 0 else 10**6 + self.layer
        return layer, _FORWARD_ORDER.index(self.kind)

    @classmethod
    def from_name(cls, act_name: int | str) -> Site:
        """The site an ``act_name`` names, with its layer as written (see ``parse_site``)."""
        m = _NAME_RE.match(canonical_act_name(act_name))
        assert m is not None  # canonical_act_name returns a name the pattern matches
        return cls(m.group(2), int(m.group(1)))

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class SiteMap:
    """Where a model keeps its decoder layers and, inside each, what feeds the residual stream.

    Paths are dotted attribute paths: ``layers`` from the top-level model, the others from
    one decoder layer. ``None`` means the architecture has no such single module.
    """

    layers: str
    attn_out: str | None = None
    mlp_out: str | None = None


# model_type -> SiteMap. attn_out/mlp_out name the module whose *output* is what the layer adds
# to the residual stream: for sandwich-norm models (Gemma 2/3, OLMo 2) that is the post-norm.
ARCHITECTURES: dict[str, SiteMap] = {
    "gpt2": SiteMap("transformer.h", "attn", "mlp"),
    "gptj": SiteMap("transformer.h", "attn", "mlp"),
    "gpt_neox": SiteMap("gpt_neox.layers", "attention", "mlp"),
    # OPT has no MLP module (fc2 runs on flattened [B*T, D] tokens).
    "opt": SiteMap("model.decoder.layers", "self_attn", None),
    "falcon": SiteMap("transformer.h", "self_attention", "mlp"),
    # BLOOM adds the residual inside its attention module, so its output is not attn_out.
    "bloom": SiteMap("transformer.h", None, None),
    "phi": SiteMap("model.layers", "self_attn", "mlp"),
    "gemma2": SiteMap("model.layers", "post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3_text": SiteMap(
        "model.layers", "post_attention_layernorm", "post_feedforward_layernorm"
    ),
    "olmo2": SiteMap("model.layers", "post_attention_layernorm", "post_feedforward_layernorm"),
    "mixtral": SiteMap("model.layers", "self_attn", "mlp"),
    # Granite scales both outputs by residual_multiplier before adding them.
    "granite": SiteMap("model.layers", None, None),
}
# Llama-style decoders: model.layers[i].self_attn / .mlp
_LLAMA_LIKE = "llama mistral qwen2 qwen3 gemma phi3 smollm3 stablelm starcoder2 olmo cohere"
for _t in (*_LLAMA_LIKE.split(), "qwen2_moe", "qwen3_moe"):
    ARCHITECTURES.setdefault(_t, SiteMap("model.layers", "self_attn", "mlp"))

_NAME_RE = re.compile(r"^blocks\.(-?\d+)\.(?:hook_)?(resid_pre|resid_post|attn_out|mlp_out)$")


def get_act_name(kind: str, layer: int) -> str:
    """``get_act_name("resid_pre", 6) == "blocks.6.hook_resid_pre"`` (TransformerLens style)."""
    if kind not in KINDS:
        raise SiteError(f"unknown site kind {kind!r}; use one of {', '.join(KINDS)}")
    return f"blocks.{layer}.hook_{kind}"


def parse_site(act_name: int | str | Site, n_layers: int) -> Site:
    """Parse an int layer or a TransformerLens name; negative layers count from the end.

    Example:
        >>> parse_site(6, 30), parse_site("blocks.-1.hook_resid_post", 30).name
        (Site(kind='resid_pre', layer=6), 'blocks.29.hook_resid_post')
    """
    site = act_name if isinstance(act_name, Site) else Site.from_name(act_name)
    kind, layer = site.kind, site.layer
    normal = layer + n_layers if layer < 0 else layer
    if not 0 <= normal < n_layers:
        raise SiteError(
            f"layer {layer} is out of range: this model has {n_layers} layers "
            f"(use 0..{n_layers - 1}, or -1 for the last)"
        )
    return Site(kind, normal)


def canonical_act_name(act_name: int | str) -> str:
    """Check the syntax of an ``act_name`` and return its TransformerLens spelling.

    The layer range is checked later, against a model (``parse_site``).
    """
    if isinstance(act_name, bool) or not isinstance(act_name, (int, str)):
        raise SiteError(f"act_name must be a layer number or a site name, got {act_name!r}")
    if isinstance(act_name, int):
        return get_act_name("resid_pre", act_name)
    if re.fullmatch(r"\s*-?\d+\s*", act_name):  # "6" from a command line or a config file
        return get_act_name("resid_pre", int(act_name))
    m = _NAME_RE.match(act_name.strip())
    if m is None:
        raise SiteError(
            f"unknown site {act_name!r}: write a layer number (6) or a TransformerLens "
            f"name 'blocks.<layer>.hook_<kind>' with kind one of {', '.join(KINDS)}"
        )
    return get_act_name(m.group(2), int(m.group(1)))


def get_module(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule`` with an error that says which part of the path is missing."""
    try:
        return root.get_submodule(path)
    except AttributeError as e:
        raise SiteError(f"module path {path!r} not found in {type(root).__name__}: {e}") from e


def guess_site_map(model: nn.Module) -> SiteMap:
    """Look up ``model.config.model_type`` in the table, else guess from the module tree.

    The guess takes the longest ``ModuleList`` whose length equals ``config.num_hidden_layers``
    and, inside one layer, the children named like attention and MLP modules.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    n = getattr(config, "num_hidden_layers", None)
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n)
    ]
    if not candidates:
        raise SiteError(
            f"cannot find the decoder layers of {type(model).__name__}: pass "
            "LM(model, tokenizer, layers='<dotted path to the ModuleList of layers>')"
        )
    path, layers = max(candidates, key=lambda c: len(c[1]))
    children = dict(layers[0].named_children())
    attn = next((c for c in children if "attn" in c or "attention" in c), None)
    mlp = next((c for c in children if c in ("mlp", "feed_forward", "ffn")), None)
    guess = SiteMap(path, attn, mlp)
    log.info("guessed site map for model_type=%r: %s", model_type, guess)
    return guess
