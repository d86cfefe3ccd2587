"""actadd: steer Hugging Face causal LMs by adding activation vectors (ActAdd).

Example:
    >>> import actadd
    >>> lm = actadd.load_model()  # doctest: +SKIP
    >>> love_hate = actadd.get_x_vector("Love", "Hate", coeff=5, act_name=6)
    >>> actadd.print_n_comparisons("I hate you because", lm, 40, love_hate,
    ...                            num_comparisons=3, seed=0)  # doctest: +SKIP
"""

from actadd import metrics as metrics  # research toolkit modules: actadd.metrics.word_count, ...
from actadd import plots as plots
from actadd import sweeps as sweeps
from actadd.additions import ActivationAddition, get_activations, get_x_vector
from actadd.contrast import make_vector, mean_diff, pca
from actadd.datasets import ContrastDataset, ContrastPair, list_datasets, load_pairs
from actadd.diagnostics import steering_magnitudes_relative_to_prompt
from actadd.errors import (
    ActAddError,
    ModelLoadError,
    PromptError,
    SiteError,
    VectorFileError,
)
from actadd.generation import compare, gen_using_activation_additions, print_n_comparisons
from actadd.hooks import Injection, capture, hooked, steer
from actadd.metrics import MissingDependencyError
from actadd.model import LM, load_model
from actadd.optimize import OptimizeResult, optimize_vector
from actadd.search import search_pairs
from actadd.sites import Site, SiteMap, get_act_name
from actadd.sweeps import (
    SlicedAddition,
    make_activation_additions,
    reduce_sweep_results,
    sweep_over_prompts,
)
from actadd.vectors import SteeringVector

__version__ = "0.1.0"

__all__ = [
    "LM",
    "ActAddError",
    "ActivationAddition",
    "ContrastDataset",
    "ContrastPair",
    "Injection",
    "MissingDependencyError",
    "ModelLoadError",
    "OptimizeResult",
    "PromptError",
    "Site",
    "SiteError",
    "SiteMap",
    "SlicedAddition",
    "SteeringVector",
    "VectorFileError",
    "capture",
    "compare",
    "gen_using_activation_additions",
    "get_act_name",
    "get_activations",
    "get_x_vector",
    "hooked",
    "list_datasets",
    "load_model",
    "load_pairs",
    "make_activation_additions",
    "make_vector",
    "mean_diff",
    "optimize_vector",
    "pca",
    "print_n_comparisons",
    "reduce_sweep_results",
    "search_pairs",
    "steer",
    "steering_magnitudes_relative_to_prompt",
    "sweep_over_prompts",
]
