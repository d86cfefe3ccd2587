"""Deterministic identities of what a result depends on: values (additions, settings) and models.

Results kept on disk between runs (a sweep's chunks) are keyed by these digests, so a rerun
finds exactly the work it already did, and a different sweep, model or setting never picks up
another's results. A digest is stable across processes and machines: it hashes a canonical
JSON form (dataclass fields by name, tensors by dtype, shape and bytes), never ``hash()`` or a
pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch

from actadd.model import LM

__all__ = ["canonical", "digest", "model_identity"]

# fields that describe a value without changing what it does (SteeringVector provenance)
_IGNORED_FIELDS = {"meta"}


def canonical(value: Any) -> Any:
    """``value`` as JSON-able data that is equal exactly when the values steer the same.

    Dataclasses become their class name and compared fields (labels and provenance left out),
    tensors a digest of their dtype, shape and bytes, slices their bounds.

    Example:
        >>> canonical(slice(0, 4))
        ['slice', 0, 4, None]
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)  # exact, and the same on every machine
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return ["tensor", h.hexdigest()]
    if isinstance(value, slice):
        return ["slice", canonical(value.start), canonical(value.stop), canonical(value.step)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {
            f.name: canonical(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.compare and f.name not in _IGNORED_FIELDS
        }
        return [type(value).__qualname__, fields]
    if isinstance(value, Mapping):
        return ["map", sorted([str(k), canonical(v)] for k, v in value.items())]
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    raise TypeError(f"cannot make a stable identity of a {type(value).__name__}")


def digest(value: Any, size: int = 24) -> str:
    """A hex digest of ``canonical(value)``.

    Example:
        >>> digest({"temperature": 1.0, "tokens": 40}) == digest({"tokens": 40, "temperature": 1.0})
        True
    """
    text = json.dumps(canonical(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:size]


def model_identity(lm: LM) -> str:
    """What a model's results depend on, hashed: its name, dtype, the kind of device it computes
    on, shapes and tokenizer (``lm.fingerprint``) and a strided sample of every weight tensor
    that holds data (a fine-tune with the same shapes gets another identity). Parameters that
    accelerate offloaded to disk count by name and shape.

    Example:
        >>> model_identity(lm)  # doctest: +SKIP
        '3f1c0a9b2d4e5f60'
    """
    h = hashlib.sha256()
    h.update(f"{lm.name}|{lm.dtype}|{lm.device.type}|{lm.fingerprint}".encode())
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            h.update(f"{name}{tuple(p.shape)}".encode())
            if p.device.type == "meta":
                continue
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            h.update(flat[::step][:64].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]
