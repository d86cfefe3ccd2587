"""The server's named steering vectors: ``SteeringVector`` files checked against the model.

With a directory, vectors are loaded from ``<dir>/<name>.safetensors`` at start and uploads are
written there (atomically, after validation); without one they live in memory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from actadd.errors import ActAddError
from actadd.model import LM
from actadd.serve.schema import APIError, Limits
from actadd.vectors import SteeringVector

__all__ = ["VectorStore"]

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class VectorStore:
    """Named ``SteeringVector`` objects, validated against ``lm``.

    Args:
        lm: the model the vectors must fit (``d_model``, layers, tokenizer fingerprint).
        directory: where ``*.safetensors`` files are read at start and uploads saved; None
            keeps uploads in memory.
        limits: ``max_vectors``.

    Example:
        >>> store = VectorStore(lm, "vectors/", Limits())  # doctest: +SKIP
        >>> sorted(store.vectors)  # doctest: +SKIP
        ['love-hate']
    """

    def __init__(self, lm: LM, directory: str | os.PathLike[str] | None, limits: Limits) -> None:
        self.lm, self.limits = lm, limits
        self.dir = Path(directory) if directory is not None else None
        self.vectors: dict[str, Any] = {}
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            for path in sorted(self.dir.glob("*.safetensors")):
                if not path.name.startswith("."):  # skip unfinished uploads
                    self.vectors[path.stem] = SteeringVector.load(path, lm=lm)
            log.info("loaded %d steering vectors from %s", len(self.vectors), self.dir)

    def get(self, name: str, param: str) -> Any:
        v = self.vectors.get(name)
        if v is None:
            known = ", ".join(sorted(self.vectors)) or "none yet"
            raise APIError(
                400,
                f"unknown steering vector {name!r} (stored: {known}); upload it with "
                "PUT /v1/vectors/{name}",
                param=param,
                code="unknown_vector",
            )
        return v

    def put(self, name: str, data: bytes) -> tuple[Any, bool]:
        """Check ``data`` (a ``SteeringVector.save`` file) and store it: ``(vector, created)``."""
        check_name(name)
        if name not in self.vectors and len(self.vectors) >= self.limits.max_vectors:
            raise APIError(
                400,
                f"{len(self.vectors)} vectors are stored, the limit: delete one first",
                code="too_many_vectors",
            )
        fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".safetensors", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                vector = SteeringVector.load(tmp, lm=self.lm)
            except ActAddError as e:
                msg = str(e).replace(tmp, f"the upload {name!r}")
                raise APIError(400, msg, param="body", code="invalid_vector") from e
            if self.dir is not None:
                os.replace(tmp, self.dir / f"{name}.safetensors")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        created = name not in self.vectors
        self.vectors[name] = vector
        return vector, created

    def delete(self, name: str) -> None:
        if self.vectors.pop(name, None) is None:
            raise APIError(
                404, f"no steering vector named {name!r}", param="name", code="unknown_vector"
            )
        if self.dir is not None:
            (self.dir / f"{name}.safetensors").unlink(missing_ok=True)

    def describe(self, name: str) -> dict[str, Any]:
        v = self.vectors[name]
        return {
            "id": name,
            "object": "steering_vector",
            "sites": v.sites,
            "coeff": v.coeff,
            "d_model": v.d_model,
            "norms": v.norms(),
            "description": v.describe(),
            "meta": json.loads(json.dumps(dict(v.meta), default=str)),
        }


def check_name(name: str) -> None:
    """Vector names are file names: letters, digits, ``_``, ``-``, ``.``; at most 64."""
    if not _NAME_RE.match(name):
        raise APIError(
            400,
            f"bad vector name {name!r}: use letters, digits, '_', '-', '.' (up to 64, "
            "starting with a letter or digit)",
            param="name",
            code="invalid_name",
        )
