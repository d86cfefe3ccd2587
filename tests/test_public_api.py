"""The curated public surface: everything in __all__ exists, and the core names are there."""

from __future__ import annotations

import actadd

CORE = {
    "LM",
    "load_model",
    "ActivationAddition",
    "get_x_vector",
    "steer",
    "gen_using_activation_additions",
    "print_n_comparisons",
    "compare",
    "ActAddError",
    "steering_magnitudes_relative_to_prompt",
    "get_act_name",
}


def test_all_is_exact_and_importable():
    assert len(actadd.__all__) == len(set(actadd.__all__))
    for name in actadd.__all__:
        assert hasattr(actadd, name), name
    public = {n for n in dir(actadd) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(actadd, n)).__name__ == "module"}
    assert public - modules - {"annotations"} == set(actadd.__all__)
    assert set(actadd.__all__) >= CORE


def test_every_error_is_an_actadd_error():
    for name in actadd.__all__:
        obj = getattr(actadd, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and not issubclass(obj, Warning):
            assert issubclass(obj, actadd.ActAddError) and issubclass(obj, ValueError)
