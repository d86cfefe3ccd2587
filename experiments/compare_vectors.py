"""Single-pair ActAdd vs mean difference vs PCA vs an optimised vector, same metric and budget.

Run: ``OMP_NUM_THREADS=1 python experiments/compare_vectors.py`` (about 25 min on a busy
2-core CPU).

Every vector steers the embedded SmolLM2-135M-Instruct at ``blocks.6.hook_resid_pre`` on every
token (``addition_location="all"``), rescaled to the same norm per token, so only its direction
differs. Metric: VADER compound sentiment of 30-token completions (8 prompts × 4 seeds,
temperature 1, top_p 0.3, freq_penalty 1), paired by seed with unsteered completions.
Side effects: the completions' loss under the steered model, and the next-token KL(unsteered ‖
steered) on held-out neutral sentences that no method saw.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path

import torch
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

import actadd
from actadd.vectors import SteeringVector

LAYER = 6
NORMS = (8.0, 16.0, 32.0)
PROMPTS = [
    "I hate you because", "The movie was", "Yesterday at work, my boss", "My neighbour is",
    "I think that this city", "The food at the party", "When I woke up this morning",
    "The customer support team",
]  # fmt: skip
SEEDS = 4
HELD_OUT_NEUTRAL = [
    "The invoice number is printed in the top right corner.",
    "Granite is an igneous rock made mostly of quartz and feldspar.",
    "The ferry crosses the bay twice a day in summer.",
    "Press the green button to start the washing cycle.",
    "The census counts every household once every ten years.",
    "Most maps put north at the top of the page.",
]
vader = SentimentIntensityAnalyzer()


def unit(v: SteeringVector) -> SteeringVector:
    d = v.directions[f"blocks.{LAYER}.hook_resid_pre"] * v.coeff
    return SteeringVector({LAYER: d / d.norm()}, 1.0, v.meta)


def generate(lm, rows):
    texts = [p for p in PROMPTS for _ in range(SEEDS)]
    seeds = list(range(len(texts)))
    return actadd.gen_using_activation_additions(
        lm, [rows] * len(texts) if rows and not isinstance(rows[0], list) else rows or None,
        texts, tokens_to_generate=30, seeds=seeds, temperature=1.0, top_p=0.3,
        freq_penalty=1.0, addition_location="all", batch_size=32,
    )  # fmt: skip


@torch.no_grad()
def neutral_kl(lm, v) -> float:
    ids, mask = lm.batch_tokens(HELD_OUT_NEUTRAL)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    ref = torch.log_softmax(lm.model(ids, attention_mask=mask, position_ids=pos).logits.float(), -1)
    with actadd.steer(lm, [v], addition_location="all"):
        out = lm.model(ids, attention_mask=mask, position_ids=pos).logits.float()
    lp = torch.log_softmax(out, -1)
    kl = (ref.exp() * (ref - lp)).sum(-1)  # [B, T]
    return float((kl * mask).sum() / mask.sum())


def main() -> None:
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    with contextlib.redirect_stderr(io.StringIO()):
        lm = actadd.load_model()
    torch.manual_seed(0)
    vectors, build = {}, {}
    t = time.time()
    vectors["ActAdd pair (Love − Hate)"] = SteeringVector.from_additions(
        lm, actadd.get_x_vector("Love", "Hate", 1.0, LAYER)
    )
    build["ActAdd pair (Love − Hate)"] = ("1 pair of 1-token prompts", time.time() - t)
    sentiment = actadd.load_pairs("sentiment")
    t = time.time()
    vectors["one dataset pair"] = actadd.mean_diff(lm, sentiment.split(1)[0], LAYER)
    build["one dataset pair"] = ("1 pair (the first)", time.time() - t)
    for method in ("mean_diff", "pca"):
        t = time.time()
        vectors[method] = actadd.make_vector(lm, sentiment, LAYER, method=method, read="mean")
        build[method] = ("50 pairs, 1 forward pass", time.time() - t)
    for objective in ("likelihood", "contrast"):
        name = f"optimised ({objective})"
        t = time.time()
        res = actadd.optimize_vector(lm, sentiment, layer=LAYER, steps=30, batch_size=8, lr=0.1,
                                     objective=objective)  # fmt: skip
        vectors[name] = res.vector
        build[name] = ("50 pairs + 30 neutral texts, 30 Adam steps of 8", time.time() - t)
        res.losses.to_csv(out_dir / f"optimise_{objective}_losses.csv", index=False)
        print(f"{name} loss:", [round(x, 3) for x in res.losses.loss], flush=True)
    for name, v in vectors.items():
        print(f"built {name}: norm {v.norms()}  ({build[name][1]:.0f} s)", flush=True)

    d = {k: unit(v).directions[f"blocks.{LAYER}.hook_resid_pre"] for k, v in vectors.items()}
    names = list(d)
    cos = {f"{a} · {b}": float(d[a] @ d[b]) for i, a in enumerate(names) for b in names[i + 1 :]}

    base = generate(lm, [])
    base["vader"] = [vader.polarity_scores(c)["compound"] for c in base.completions]
    rows = [{"vector": "unsteered", "norm": 0.0, "vader": base.vader.mean(),
             "loss": base.loss.mean(), "kl": 0.0}]  # fmt: skip
    print(f"unsteered: vader {base.vader.mean():+.3f}", flush=True)
    # the original ActAdd recipe as a reference: Love − Hate on the first tokens, coeff 5
    front = actadd.gen_using_activation_additions(
        lm, list(actadd.get_x_vector("Love", "Hate", 5.0, LAYER)),
        [p for p in PROMPTS for _ in range(SEEDS)], tokens_to_generate=30,
        seeds=list(range(len(PROMPTS) * SEEDS)), top_p=0.3, freq_penalty=1.0, batch_size=32,
    )  # fmt: skip
    front["vader"] = [vader.polarity_scores(c)["compound"] for c in front.completions]
    paired = front.vader.values - base.vader.values
    rows.append({"vector": "ActAdd Love − Hate, front, coeff 5", "norm": float("nan"),
                 "vader": front.vader.mean(), "delta": float(paired.mean()),
                 "delta_sem": float(paired.std(ddof=1) / len(paired) ** 0.5),
                 "wins": float((paired > 0).mean()), "loss": front.loss.mean(),
                 "kl": float("nan")})  # fmt: skip
    examples = {}
    per_row = [base.assign(vector="unsteered", norm=0.0)]
    for norm in NORMS:
        for name, v in vectors.items():
            w = unit(v) * norm
            df = generate(lm, [w])
            df["vader"] = [vader.polarity_scores(c)["compound"] for c in df.completions]
            paired = df.vader.values - base.vader.values  # same prompt and seed
            wins = float((paired > 0).mean())
            sem = float(paired.std(ddof=1) / len(paired) ** 0.5)
            rows.append({"vector": name, "norm": norm, "vader": df.vader.mean(),
                         "delta": float(paired.mean()), "delta_sem": sem, "wins": wins,
                         "loss": df.loss.mean(), "kl": neutral_kl(lm, w)})  # fmt: skip
            per_row.append(df.assign(vector=name, norm=norm))
            examples[f"{name} @ {norm:g}"] = df.completions.iloc[0]
            print(rows[-1], flush=True)
    result = {"rows": rows, "cosines": cos, "build": build, "examples": examples,
              "unsteered_example": base.completions.iloc[0]}  # fmt: skip
    import pandas as pd

    pd.concat(per_row).to_csv(out_dir / "compare_vectors_rows.csv", index=False)
    (out_dir / "compare_vectors.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
