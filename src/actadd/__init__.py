"""actadd: steer Hugging Face causal LMs by adding activation vectors (ActAdd).

Example:
    >>> import actadd
    >>> lm = actadd.load_model()  # doctest: +SKIP
    >>> love_hate = actadd.get_x_vector("Love", "Hate", coeff=5, act_name=6)
    >>> actadd.print_n_comparisons("I hate you because", lm, 40, love_hate,
    ...                            num_comparisons=3, seed=0)  # doctest: +SKIP
"""

from actadd.additions import ActivationAddition, get_activations, get_x_vector
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
from actadd.model import LM, load_model
from actadd.sites import Site, SiteMap, get_act_name

__version__ = "0.1.0"

__all__ = [
    "LM",
    "ActAddError",
    "ActivationAddition",
    "Injection",
    "ModelLoadError",
    "PromptError",
    "Site",
    "SiteError",
    "SiteMap",
    "VectorFileError",
    "capture",
    "compare",
    "gen_using_activation_additions",
    "get_act_name",
    "get_activations",
    "get_x_vector",
    "hooked",
    "load_model",
    "print_n_comparisons",
    "steer",
    "steering_magnitudes_relative_to_prompt",
]
