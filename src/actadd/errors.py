"""The one exception family: every error actadd raises about user input is an ``ActAddError``.

``ActAddError`` subclasses ``ValueError`` so code that already catches ``ValueError`` keeps
working. Each message says what went wrong *and* how to fix it. This module also owns the two
checks every other module needs: finite numbers (``check_finite``) and optional dependencies
(``require``, which names the ``actadd[...]`` extra to install).
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Any

__all__ = [
    "ActAddError",
    "ClusterError",
    "CompatibilityWarning",
    "MissingDependencyError",
    "ModelLoadError",
    "OutlierWarning",
    "PromptError",
    "SiteError",
    "VectorFileError",
    "check_finite",
    "install_hint",
    "require",
]


class ActAddError(ValueError):
    """Base class of every error actadd raises on bad input.

    ``param`` names the argument (or request field) to change when the raiser knows it; the
    server answers it as OpenAI's ``error.param``.
    """

    param: str | None = None


class SiteError(ActAddError):
    """An ``act_name`` / layer that does not exist on this model."""


class PromptError(ActAddError):
    """A prompt or token sequence that cannot be steered as asked (empty, too short, bad ids)."""


class VectorFileError(ActAddError):
    """A steering-vector file that is corrupted, not ours, or made for another model."""


class ModelLoadError(ActAddError):
    """A model that cannot be loaded (missing package, unknown name, offline hub)."""


class MissingDependencyError(ActAddError, ImportError):
    """An optional dependency (an ``actadd[...]`` extra) is not installed."""


class ClusterError(RuntimeError):
    """A Ray cluster that cannot do the work: workers that do not start, or that all died.
    (Not an ``ActAddError``: the input was fine. Finished chunks are kept where they are
    written, so rerunning resumes.)"""


class OutlierWarning(UserWarning):
    """Steering that will not act as intended: an addition whose norm dwarfs the residual
    stream, or one that lands only on the attention sink (position 0)."""


class CompatibilityWarning(UserWarning):
    """A file actadd reads, but another tool (llama.cpp) would read differently or ignore."""


def install_hint(extra: str) -> str:
    """The shell command that installs an extra, e.g. ``pip install 'actadd[serve]'``."""
    return f"pip install 'actadd[{extra}]'"


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise a ``MissingDependencyError`` naming the extra that brings it.

    Example:
        >>> require("math", extra="research", feature="plots").pi > 3
        True
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{feature} needs the {module.split('.')[0]!r} package: {install_hint(extra)}"
        ) from e


def check_finite(value: Any, what: str) -> float:
    """Return ``float(value)`` or raise if it is NaN, infinite or not a number.

    Example:
        >>> check_finite("2.5", "coeff")
        2.5
    """
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise ActAddError(f"{what} must be a number, got {value!r}") from e
    if not math.isfinite(f):
        raise ActAddError(f"{what} must be finite, got {value!r}")
    return f
