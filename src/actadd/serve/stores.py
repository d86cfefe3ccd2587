"""The server's named files: steering vectors and conditions, checked against the model.

With a directory, files are loaded from it at start and uploads are written there (atomically,
after every check); without one they live in memory. Vectors are ``<dir>/<name>.safetensors``
(``SteeringVector.save``), conditions ``<dir>/conditions/<name>.safetensors``
(``Condition.save``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from actadd.conditions import Condition
from actadd.errors import ActAddError
from actadd.model import LM
from actadd.serve.schema import APIError, Limits
from actadd.vectors import SteeringVector

__all__ = ["Store", "check_name", "condition_store", "vector_store"]

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class Store:
    """Named files of one kind (``vector`` or ``condition``), validated against ``lm``.

    Args:
        lm: the model they must fit.
        kind: ``vector`` or ``condition`` (in messages and routes).
        directory: where ``*.safetensors`` files are read at start and uploads saved; None
            keeps uploads in memory.
        limits: ``max_vectors`` (how many), ``max_meta_bytes`` (each file's metadata).
        load: reads and checks one file for ``lm``.
        describe: what ``GET`` shows of one.
    """

    def __init__(
        self,
        lm: LM,
        kind: str,
        directory: Path | None,
        limits: Limits,
        load: Callable[[Path, LM], Any],
        describe: Callable[[Any], dict[str, Any]],
    ) -> None:
        self.lm, self.kind, self.dir, self.limits = lm, kind, directory, limits
        self._load, self._describe = load, describe
        self.items: dict[str, Any] = {}
        self._lock = threading.Lock()
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            for path in sorted(self.dir.glob("*.safetensors")):
                if not path.name.startswith("."):  # skip unfinished uploads
                    self.items[path.stem] = self._load(path, lm)
            log.info("loaded %d %ss from %s", len(self.items), kind, self.dir)

    def get(self, name: str, param: str) -> Any:
        item = self.items.get(name)
        if item is None:
            known = ", ".join(sorted(self.items)) or "none yet"
            raise APIError(
                400,
                f"unknown {self.kind} {name!r} (stored: {known}); upload it with "
                f"PUT /v1/{self.kind}s/{{name}}",
                param=param,
                code=f"unknown_{self.kind}",
            )
        return item

    def put(self, name: str, data: bytes) -> tuple[Any, bool]:
        """Check ``data`` (a saved file) and store it: ``(item, created)``."""
        check_name(name)
        if name not in self.items and len(self.items) >= self.limits.max_vectors:
            raise APIError(
                400,
                f"{len(self.items)} {self.kind}s are stored, the limit: delete one first",
                code=f"too_many_{self.kind}s",
            )
        fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".safetensors", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                item = self._load(Path(tmp), self.lm)
                described = self._checked(item)
            except (ActAddError, RecursionError) as e:
                msg = str(e).replace(tmp, f"the upload {name!r}")
                raise APIError(400, msg, param="body", code=f"invalid_{self.kind}") from e
            with self._lock:
                if self.dir is not None:
                    os.replace(tmp, self.dir / f"{name}.safetensors")
                created = name not in self.items
                self.items[name] = item
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("stored %s %r", self.kind, name)
        return described, created

    def _checked(self, item: Any) -> dict[str, Any]:
        """What ``describe`` shows, refusing what a JSON answer cannot hold: metadata too
        large or nested too deep, norms that overflow."""
        meta = getattr(item, "meta", {})
        try:
            size = len(json.dumps(meta, default=str))
        except (RecursionError, ValueError) as e:
            raise ActAddError(f"its metadata cannot be read as JSON: {e}") from e
        if size > self.limits.max_meta_bytes:
            raise ActAddError(f"its metadata is {size} bytes; at most {self.limits.max_meta_bytes}")
        if _depth(meta) > 16:
            raise ActAddError("its metadata is nested more than 16 levels deep")
        described = self._describe(item)
        json.dumps(described, allow_nan=False)  # a ValueError here is an overflowing norm
        return described

    def delete(self, name: str) -> None:
        with self._lock:
            if self.items.pop(name, None) is None:
                raise APIError(
                    404, f"no {self.kind} named {name!r}", param="name", code=f"unknown_{self.kind}"
                )
            if self.dir is not None:
                (self.dir / f"{name}.safetensors").unlink(missing_ok=True)

    def describe(self, name: str) -> dict[str, Any]:
        return {"id": name, **self._describe(self.items[name])}


def _depth(x: Any, level: int = 0) -> int:
    if level > 32:
        return level
    if isinstance(x, dict):
        return max((_depth(v, level + 1) for v in x.values()), default=level + 1)
    if isinstance(x, list):
        return max((_depth(v, level + 1) for v in x), default=level + 1)
    return level


def check_name(name: str) -> None:
    """Stored names are file names: letters, digits, ``_``, ``-``, ``.``; at most 64."""
    if not _NAME_RE.fullmatch(name):  # fullmatch: no trailing newline slips through
        raise APIError(
            400,
            f"bad name {name!r}: use letters, digits, '_', '-', '.' (up to 64, starting with a "
            "letter or digit)",
            param="name",
            code="invalid_name",
        )


def _finite_norms(v: SteeringVector) -> dict[str, float]:
    norms = v.norms()
    bad = [k for k, n in norms.items() if not math.isfinite(n)]
    if bad:
        raise ActAddError(f"the direction at {bad[0]} overflows (its norm is not finite)")
    return norms


def _describe_vector(v: SteeringVector) -> dict[str, Any]:
    return {
        "object": "steering_vector",
        "sites": v.sites,
        "coeff": v.coeff,
        "d_model": v.d_model,
        "norms": _finite_norms(v),
        "description": v.describe(),
        "meta": json.loads(json.dumps(dict(v.meta), default=str)),
    }


def _describe_condition(c: Condition) -> dict[str, Any]:
    norm = float(torch.linalg.vector_norm(c.direction.double()))
    if not math.isfinite(norm):
        raise ActAddError("the condition direction overflows (its norm is not finite)")
    return {
        "object": "condition",
        "site": c.site,
        "threshold": c.threshold,
        "comparator": c.comparator,
        "d_model": c.d_model,
        "description": c.describe(),
        "meta": json.loads(json.dumps(dict(c.meta), default=str)),
    }


def vector_store(lm: LM, directory: str | os.PathLike[str] | None, limits: Limits) -> Store:
    path = Path(directory) if directory is not None else None
    return Store(
        lm, "vector", path, limits, lambda p, m: SteeringVector.load(p, lm=m), _describe_vector
    )


def condition_store(lm: LM, directory: str | os.PathLike[str] | None, limits: Limits) -> Store:
    path = Path(directory) / "conditions" if directory is not None else None
    return Store(
        lm, "condition", path, limits, lambda p, m: Condition.load(p, m), _describe_condition
    )
