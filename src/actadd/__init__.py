"""actadd: steer Hugging Face causal LMs by adding activation vectors (ActAdd).

The public API is ``__all__``; each name is imported from its module on first use, so
``import actadd`` (and ``actadd --help``) is quick and torch loads only when needed.

Example:
    >>> import actadd
    >>> lm = actadd.load_model()  # doctest: +SKIP
    >>> love_hate = actadd.get_x_vector("Love", "Hate", coeff=5, act_name=6)
    >>> actadd.print_n_comparisons("I hate you because", lm, 40, love_hate,
    ...                            num_comparisons=3, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that owns it
_EXPORTS = {
    "ActAddError": "errors",
    "ActivationAddition": "additions",
    "activation_cache": "additions",
    "Condition": "conditions",
    "Conditioned": "steering",
    "ContrastDataset": "datasets",
    "ContrastPair": "datasets",
    "Injection": "steering",
    "LM": "model",
    "MissingDependencyError": "errors",
    "ModelLoadError": "errors",
    "ModelSpec": "loading",
    "OptimizeResult": "optimize",
    "OutlierWarning": "errors",
    "PromptError": "errors",
    "RayExecutor": "executor",
    "Site": "sites",
    "SiteError": "errors",
    "SiteMap": "sites",
    "SlicedAddition": "sweeps",
    "Source": "sources",
    "SteeringVector": "vectors",
    "TuneResult": "tune_result",
    "TuneSettings": "tune_result",
    "VectorFileError": "errors",
    "capture": "hooks",
    "compare": "generation",
    "gen_using_activation_additions": "generation",
    "generate_many": "batching",
    "get_act_name": "sites",
    "get_activations": "additions",
    "get_x_vector": "additions",
    "hooked": "hooks",
    "list_datasets": "datasets",
    "load_suite": "evaluation",
    "load_model": "loading",
    "load_pairs": "datasets",
    "make_activation_additions": "sweeps",
    "make_vector": "contrast",
    "mean_diff": "contrast",
    "optimize_vector": "optimize",
    "pca": "contrast",
    "print_n_comparisons": "generation",
    "reduce_sweep_results": "sweeps",
    "run_suite": "evaluation",
    "search_pairs": "search",
    "steer": "steering",
    "steering_magnitudes_relative_to_prompt": "diagnostics",
    "sweep_over_prompts": "sweeps",
    "tune": "tuning",
}
# research toolkit modules, as attributes: actadd.metrics.word_count, actadd.plots, ...
_MODULES = ("metrics", "plots", "sweeps")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"actadd.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    if name in _MODULES:
        return importlib.import_module(f"actadd.{name}")
    raise AttributeError(f"module 'actadd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, *_MODULES, "__version__"])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from actadd import metrics, plots, sweeps
    from actadd.additions import (
        ActivationAddition,
        activation_cache,
        get_activations,
        get_x_vector,
    )
    from actadd.batching import generate_many
    from actadd.conditions import Condition
    from actadd.contrast import make_vector, mean_diff, pca
    from actadd.datasets import ContrastDataset, ContrastPair, list_datasets, load_pairs
    from actadd.diagnostics import steering_magnitudes_relative_to_prompt
    from actadd.errors import (
        ActAddError,
        MissingDependencyError,
        ModelLoadError,
        OutlierWarning,
        PromptError,
        SiteError,
        VectorFileError,
    )
    from actadd.evaluation import load_suite, run_suite
    from actadd.executor import RayExecutor
    from actadd.generation import compare, gen_using_activation_additions, print_n_comparisons
    from actadd.hooks import capture, hooked
    from actadd.loading import ModelSpec, load_model
    from actadd.model import LM
    from actadd.optimize import OptimizeResult, optimize_vector
    from actadd.search import search_pairs
    from actadd.sites import Site, SiteMap, get_act_name
    from actadd.sources import Source
    from actadd.steering import Conditioned, Injection, steer
    from actadd.sweeps import (
        SlicedAddition,
        make_activation_additions,
        reduce_sweep_results,
        sweep_over_prompts,
    )
    from actadd.tune_result import TuneResult, TuneSettings
    from actadd.tuning import tune
    from actadd.vectors import SteeringVector
