"""Provenance: what every vector (and every file actadd writes) records about where it came from."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from actadd.model import LM

__all__ = ["SITE_CONVENTION", "now", "provenance"]

SITE_CONVENTION = (
    "transformer_lens: blocks.L.hook_resid_pre is the input of decoder layer L (0-based), "
    "blocks.L.hook_resid_post its output"
)


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provenance(lm: LM, **fields: Any) -> dict[str, Any]:
    """The model facts a vector made from ``lm`` carries, its creation time, and ``fields``
    (``method``, ``data``, ...).

    The fingerprint ties a vector to the model's shape, tokenizer and sequence-start policy,
    so a file is refused by a model it does not fit (``SteeringVector.load(path, lm)``).
    """
    from actadd import __version__

    return {
        "model": lm.name,
        "model_type": getattr(lm.model.config, "model_type", None),
        "fingerprint": lm.fingerprint,
        "d_model": lm.d_model,
        "n_layers": lm.n_layers,
        "prepend_bos": lm.prepend_bos,
        "site_convention": SITE_CONVENTION,
        "actadd_version": __version__,
        "created": now(),
        **fields,
    }
