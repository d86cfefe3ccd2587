"""The original ``activation_additions`` README's code samples, run verbatim on the embedded model.

Users arrive with that README (Turner et al., MIT): its samples are copied here character for
character, in its order, and run with the original's imports changed to ``actadd``'s migration
modules and its models (``gpt2_small``, ``gpt2_xl``) set to ``actadd.load_model()``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import actadd

pytestmark = pytest.mark.slow

IMPORTS = """\
from actadd.prompt_utils import ActivationAddition, get_x_vector
from actadd.completion_utils import print_n_comparisons
"""

# The samples, in the README's order.
# The samples, verbatim and in the README's order, are data: tests/data/seed_readme_samples.txt
_DATA = Path(__file__).parent / "data" / "seed_readme_samples.txt"
_TEXT = "".join(line for line in _DATA.read_text().splitlines(True) if not line.startswith("# "))
SAMPLES = [block.strip("\n") for block in _TEXT.split("\n-----\n")]


def _runnable(sample: str) -> str:
    """The sample as Python accepts it: ``a, b = *f()`` is a SyntaxError in every Python 3
    ("can't use starred expression here"); the README meant ``a, b = f()``."""
    try:
        compile(sample, "<readme>", "exec")
        return sample
    except SyntaxError:
        fixed = sample.replace("= *get_x_vector(", "= get_x_vector(", 1)
        assert fixed != sample, sample
        return fixed


def test_the_one_sample_python_rejects_is_the_starred_assignment():
    rejected = []
    for s in SAMPLES:
        try:
            compile(s, "<readme>", "exec")
        except SyntaxError:
            rejected.append(s.splitlines()[0])
    assert rejected == ['praise_rp, hurt_rp = *get_x_vector(prompt1="Intent to praise",']


def test_every_sample_runs(real_lm, capsys):
    ns: dict = {}
    exec(IMPORTS, ns)
    ns["gpt2_small"] = ns["gpt2_xl"] = ns["model"] = real_lm
    for sample in SAMPLES:
        exec(_runnable(sample), ns)
    out = capsys.readouterr().out
    # two comparison tables of 15 rows each, each with both columns
    assert out.count("unsteered") == 2 and out.count("steered") >= 4
    assert "I hate you because" in out and "I want to kill you because" in out
    love, hate = ns["love_rp"], ns["hate_rp"]
    assert (love.coeff, hate.coeff, love.act_name) == (5.0, -5.0, "blocks.6.hook_resid_pre")
    praise, hurt = ns["praise_rp"], ns["hurt_rp"]
    assert len(praise.tokens) == len(hurt.tokens)  # padded to one length with spaces


def test_the_wedding_vector_pads_an_empty_prompt(real_lm):
    """The seed's " weddings" − "" x-vector (tokens_right): the empty side is all spaces."""
    model = real_lm
    weddings, empty = actadd.get_x_vector(
        prompt1=" weddings",
        prompt2="",
        coeff=4,
        act_name=20,
        model=model,
        pad_method="tokens_right",
        custom_pad_id=model.to_single_token(" "),
    )
    space = model.to_single_token(" ")
    assert weddings.tokens == tuple(model.token_ids(" weddings"))
    # the shared start token stays first on both sides (so position 0 cancels), spaces after
    lead = () if model.start_token_id is None else (model.start_token_id,)
    assert empty.tokens == lead + (space,) * (len(weddings.tokens) - len(lead))
    df = actadd.gen_using_activation_additions(
        model,
        [[], [weddings, empty]],
        ["I went up to my friend and said"] * 2,
        tokens_to_generate=8,
        seed=0,
    )
    assert df.completions[0] != df.completions[1]
