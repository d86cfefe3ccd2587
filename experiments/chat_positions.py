"""Where additions land in a chat prompt: draws ``docs/img/chat_positions.png``.

The embedded model's own chat template renders a system and a user message; each row of the
picture is one location, and the coloured cells are the positions a two-token addition
("Love" − "Hate" with the start token) writes to, computed by the core's pure position
functions (``actadd.positions.injected_span``) on the span ``lm.chat_tokens`` records for the
user's words. Nothing is hand-placed.

    .venv/bin/python experiments/chat_positions.py
"""

from __future__ import annotations

from pathlib import Path

import actadd
from actadd.positions import injected_span

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img" / "chat_positions.png"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How was your weekend?"},
]
GENERATED = ["I", " had", " a", " great", "…"]


def main() -> None:
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    lm = actadd.load_model()
    ct = lm.chat_tokens(MESSAGES)
    add_len = len(lm.token_ids("Love"))  # "Love" and "Hate" are one token each, + start
    labels = [lm.tokenizer.convert_ids_to_tokens(i) for i in ct.ids]
    labels = [t.replace("Ġ", "␣").replace("Ċ", "⏎") for t in labels] + GENERATED
    n_prompt, n = len(ct.ids), len(labels)
    user = ct.last_user

    def written(location: str) -> set[int]:
        cells = set(range(*injected_span(location, n_prompt, add_len, user).indices(n_prompt)))
        if location in ("all", "generated"):
            cells |= set(range(n_prompt, n))
        return cells

    rows = ["front", "mid", "back", "all", "generated"]
    fig = Figure(figsize=(min(0.42 * n + 2.2, 22), 0.55 * len(rows) + 2.2), layout="constrained")
    ax = fig.subplots()
    for r, location in enumerate(rows):
        y = len(rows) - 1 - r
        on = written(location)
        for k in range(n):
            colour = "C3" if k in on else ("0.93" if k < n_prompt else "0.97")
            edge = "C0" if user[0] <= k < user[1] else "0.75"
            rect = Rectangle((k, y + 0.08), 0.92, 0.84, facecolor=colour, edgecolor=edge, lw=1.2)
            ax.add_patch(rect)
        ax.text(-0.3, y + 0.5, location, ha="right", va="center", fontsize=10)
    for k, label in enumerate(labels):
        ax.text(k + 0.46, len(rows) + 0.1, label, rotation=70, ha="left", va="bottom", fontsize=7)
    ax.axvline(n_prompt - 0.04, color="0.4", lw=1, ls="--")
    ax.text(n_prompt + 0.1, -0.45, "generated →", fontsize=8, color="0.3")
    ax.set_xlim(-4, n + 0.5)
    ax.set_ylim(-0.6, len(rows) + 3.2)
    ax.axis("off")
    ax.set_title(
        f"Where a {add_len}-token addition lands in {lm.name}'s chat template (red); the user's "
        "words outlined in blue. Prompt positions left of the dashed line, generated right.",
        fontsize=9,
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=130)
    print(f"wrote {OUT}: prompt {n_prompt} tokens, user span {user}, addition {add_len} tokens")


if __name__ == "__main__":
    main()
