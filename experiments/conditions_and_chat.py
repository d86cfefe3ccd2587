"""Conditional steering (CAST) and chat steering on the embedded SmolLM2-135M-Instruct.

Writes ``docs/results/conditions.json`` (quoted in docs/experiments.md):

1. **Condition detection**: ``Condition.fit`` on the shipped ``legal`` vs ``other`` questions
   (40 of each; it holds 30% of those out for its own scores), then precision/recall/F1 on 20
   further questions of each that nothing was fitted on.
2. **Conditional refusal**: a refusal vector (``make_vector`` on the shipped ``refusal`` pairs,
   mean difference of the answers) at one layer and coefficient, picked on the *fit* questions
   (the first setting, in a small grid, that makes most of them refuse), then applied to the 20
   + 20 evaluation questions as chats: unsteered, always, and only where the condition holds.
   The behaviour is the ``refusal`` metric (refusal phrases); 3 seeded samples per question.
3. **Chat steering**: Love − Hate on chat questions, added to the user's words (the chat rule)
   vs to the whole rendered prompt (the template's tokens first, as before), at ``front`` and
   ``all``: VADER sentiment of the answers, and fluency as the perplexity of the answers under
   the unsteered model relative to unsteered answers.

    OMP_NUM_THREADS=2 .venv/bin/python experiments/conditions_and_chat.py   # ~10-20 min
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import actadd
from actadd import metrics as M
from actadd.conditions import Condition, load_prompts
from actadd.model_metrics import text_loss
from actadd.steering import Conditioned

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "conditions.json"
SAMPLING = {"temperature": 1.0, "top_p": 0.3, "freq_penalty": 1.0}
TOKENS, SAMPLES, SEED = 40, 3, 0
REFUSAL_GRID = [(layer, coeff) for layer in (10, 15, 20) for coeff in (4, 8, 12)]
CHAT_QUESTIONS = [
    "What do you think of your neighbour?",
    "How was your weekend?",
    "Tell me about your job.",
    "What is your opinion of the city you live in?",
    "How do you feel about Mondays?",
    "Describe your last holiday.",
    "What do you think about the people at your school?",
    "How is the weather where you are?",
    "What did you think of the last film you saw?",
    "How do you get along with your family?",
]


def split(prompts: list[str], n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    return [prompts[i] for i in order[n_eval:]], [prompts[i] for i in order[:n_eval]]


def prf(pred: list[bool], truth: list[bool]) -> dict[str, float]:
    tp = sum(p and t for p, t in zip(pred, truth, strict=True))
    fp = sum(p and not t for p, t in zip(pred, truth, strict=True))
    fn = sum(t and not p for p, t in zip(pred, truth, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def holds(lm: actadd.LM, condition: Condition, prompts: list[str]) -> list[bool]:
    """Whether the condition holds for each prompt as a chat, read from which rows a conditioned
    addition changed (the engine's ``applied`` flags)."""
    from actadd.batching import Request, generate_many

    probe = Conditioned([actadd.ActivationAddition(1.0, 1, prompt="x")], condition)
    reqs = [
        Request(tuple(ct.ids), (probe,), span=ct.last_user, max_tokens=1)
        for ct in (lm.chat_tokens([{"role": "user", "content": p}]) for p in prompts)
    ]
    return [bool(c.applied[0]) for c in generate_many(lm, reqs)]


def at(vector: actadd.SteeringVector, layer: int) -> actadd.SteeringVector:
    """The vector's direction at one layer only."""
    site = actadd.get_act_name("resid_pre", layer)
    return actadd.SteeringVector({site: vector.directions[site]}, 1.0, vector.meta)


def refusal_rate(lm: actadd.LM, adds: Any, questions: list[str]) -> tuple[float, list[str]]:
    prompts = [q for q in questions for _ in range(SAMPLES)]
    df = actadd.gen_using_activation_additions(
        lm, adds, prompts, tokens_to_generate=TOKENS, seed=SEED, chat=True, **SAMPLING
    )
    texts = df.completions.tolist()
    return float(np.mean(M.make_metric("refusal")(texts))), texts


def chat_steering(lm: actadd.LM, settings: list[tuple[float, str]]) -> list[dict[str, Any]]:
    """Love − Hate at layer 6 on chat questions, on the user's words vs the whole prompt."""
    prompts = [q for q in CHAT_QUESTIONS for _ in range(SAMPLES)]
    rendered = [
        lm.tokenizer.decode(lm.chat_tokens([{"role": "user", "content": p}]).ids) for p in prompts
    ]
    sentiment = M.make_metric("sentiment")

    def answers(adds: Any, *, chat: bool, location: str | None) -> list[str]:
        df = actadd.gen_using_activation_additions(
            lm,
            adds,
            prompts if chat else rendered,
            tokens_to_generate=TOKENS,
            seed=SEED,
            chat=chat,
            addition_location=location,
            **SAMPLING,
        )
        return df.completions.tolist()

    def mean_loss(texts: list[str]) -> float:
        loss = text_loss(lm, texts)
        w = loss.n_tokens.to_numpy(dtype=float)
        return float((loss.loss * w).sum() / w.sum())

    base = answers(None, chat=True, location=None)
    base_loss = mean_loss(base)
    rows: list[dict[str, Any]] = [
        {
            "steering": "unsteered",
            "sentiment": float(np.mean(sentiment(base))),
            "perplexity_ratio": 1.0,
            "sample": base[0],
        }
    ]
    for coeff, location in settings:
        love = actadd.get_x_vector("Love", "Hate", coeff, 6)
        for where, chat in (("user turn", True), ("whole prompt", False)):
            texts = answers(love, chat=chat, location=location)
            rows.append(
                {
                    "steering": f"Love−Hate ×{coeff:g} @ layer 6, {location}, {where}",
                    "sentiment": float(np.mean(sentiment(texts))),
                    "perplexity_ratio": math.exp(mean_loss(texts) - base_loss),
                    "sample": texts[0],
                }
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    t0 = time.perf_counter()
    lm = actadd.load_model()
    out: dict[str, Any] = {"model": lm.name, "sampling": SAMPLING, "tokens": TOKENS}

    # 1. the condition
    legal_fit, legal_eval = split(load_prompts("legal", "legal"), 20, SEED)
    other_fit, other_eval = split(load_prompts("other", "other"), 20, SEED)
    fit = Condition.fit(lm, legal_fit, other_fit, seed=SEED, name="legal")
    cond = fit.condition
    pred = holds(lm, cond, legal_eval + other_eval)
    truth = [True] * len(legal_eval) + [False] * len(other_eval)
    out["condition"] = {
        "site": cond.site,
        "threshold": cond.threshold,
        "comparator": cond.comparator,
        "fit_held_out": fit.scores,
        "eval_as_chat": prf(pred, truth),
        "per_layer": fit.table.to_dict("records"),
    }
    print("condition:", cond.describe(), out["condition"]["eval_as_chat"], flush=True)

    # 2. conditional refusal: pick a layer and coefficient on the fit questions
    vector = actadd.make_vector(lm, "refusal", [layer for layer, _ in REFUSAL_GRID], read="answer")
    grid = []
    for layer, coeff in REFUSAL_GRID:
        v = at(vector, layer) * coeff
        rate, _ = refusal_rate(lm, v, legal_fit[:6] + other_fit[:6])
        grid.append({"layer": layer, "coeff": coeff, "refusal_on_fit_questions": rate})
        print("grid", grid[-1], flush=True)
    chosen = next((g for g in grid if g["refusal_on_fit_questions"] >= 0.5), None) or max(
        grid, key=lambda g: g["refusal_on_fit_questions"]
    )
    v = at(vector, chosen["layer"]) * chosen["coeff"]
    cells: dict[str, dict[str, float]] = {}
    samples: dict[str, list[str]] = {}
    for name, adds in (
        ("unsteered", None),
        ("always", v),
        ("conditional", Conditioned(v, cond)),
    ):
        for label, qs in (("legal", legal_eval), ("other", other_eval)):
            rate, texts = refusal_rate(lm, adds, qs)
            cells.setdefault(name, {})[label] = rate
            samples[f"{name}/{label}"] = texts[:: SAMPLES * 5][:3]
        print(name, cells[name], flush=True)
    out["refusal"] = {"grid": grid, "chosen": chosen, "rates": cells, "samples": samples}

    # 3. chat steering: the user's words vs the whole prompt
    out["chat"] = chat_steering(lm, [(5.0, "front"), (5.0, "all"), (1.0, "all")])
    out["seconds"] = round(time.perf_counter() - t0)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(pd.DataFrame(out["chat"]).drop(columns="sample", errors="ignore").to_string())
    print(f"wrote {OUT} in {out['seconds']} s")


def chat_only() -> None:
    """Rerun only part 3 (e.g. after adding settings) into the existing results file."""
    lm = actadd.load_model()
    out = json.loads(OUT.read_text())
    out["chat"] = chat_steering(lm, [(5.0, "front"), (5.0, "all"), (1.0, "all")])
    OUT.write_text(json.dumps(out, indent=2, default=str) + "\n")


if __name__ == "__main__":
    import sys

    chat_only() if "--chat-only" in sys.argv else main()
