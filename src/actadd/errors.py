"""The one exception family: every error actadd raises about user input is an ``ActAddError``.

``ActAddError`` subclasses ``ValueError`` so code that already catches ``ValueError`` keeps
working. Each message says what went wrong *and* how to fix it.
"""

from __future__ import annotations

__all__ = ["ActAddError", "ModelLoadError", "PromptError", "SiteError", "VectorFileError"]


class ActAddError(ValueError):
    """Base class of every error actadd raises on bad input."""


class SiteError(ActAddError):
    """An ``act_name`` / layer that does not exist on this model."""


class PromptError(ActAddError):
    """A prompt or token sequence that cannot be steered as asked (empty, too short, bad ids)."""


class VectorFileError(ActAddError):
    """A steering-vector file that is corrupted, not ours, or made for another model."""


class ModelLoadError(ActAddError):
    """A model that cannot be loaded (missing package, unknown name, offline hub)."""
