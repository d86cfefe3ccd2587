"""Contrastive datasets: pairs of texts that differ in one concept (positive vs negative).

actadd ships small hand-written datasets (``list_datasets()``): ``sentiment`` (50 pairs),
``weddings`` (40, wedding talk vs the same sentence about something else), ``formality``
(40, formal vs casual), ``refusal`` (40 questions, each with a refusal and a helpful answer:
read with ``read="answer"``), and ``neutral`` (30 unrelated sentences, used to keep steering from
disturbing other text). Your own data loads from JSONL, JSON or CSV with the columns
``positive``, ``negative`` and optionally ``prompt`` (shared text before both answers);
CAA's JSON (``question``, ``answer_matching_behavior``, ``answer_not_matching_behavior``) is
read as is.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from actadd.errors import ActAddError

__all__ = [
    "ContrastDataset",
    "ContrastPair",
    "as_dataset",
    "list_datasets",
    "list_prompts",
    "load_pairs",
    "load_prompts",
    "load_texts",
]

# column aliases: CAA's field names map onto ours
_ALIASES = {
    "prompt": ("prompt", "question"),
    "positive": ("positive", "answer_matching_behavior", "pos"),
    "negative": ("negative", "answer_not_matching_behavior", "neg"),
}


@dataclass(frozen=True)
class ContrastPair:
    """Two texts that differ in the concept; ``prompt`` is shared text before both.

    The model reads ``prompt + positive`` and ``prompt + negative``.
    """

    positive: str
    negative: str
    prompt: str = ""

    def __post_init__(self) -> None:
        for name in ("positive", "negative", "prompt"):
            if not isinstance(getattr(self, name), str):
                raise ActAddError(f"pair field {name!r} must be text, got {getattr(self, name)!r}")
        if not self.positive or not self.negative:
            raise ActAddError("a contrast pair needs a non-empty positive and negative text")


@dataclass(frozen=True)
class ContrastDataset:
    """A named sequence of pairs; ``digest`` identifies its content in vector metadata."""

    name: str
    pairs: tuple[ContrastPair, ...]

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ActAddError(f"dataset {self.name!r} has no pairs")

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[ContrastPair]:
        return iter(self.pairs)

    def __getitem__(self, i: int) -> ContrastPair:
        return self.pairs[i]

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for p in self.pairs:
            h.update(json.dumps([p.prompt, p.positive, p.negative]).encode())
        return h.hexdigest()[:16]

    def split(self, n_first: int) -> tuple[ContrastDataset, ContrastDataset]:
        """The first ``n_first`` pairs and the rest (e.g. train / held out)."""
        return (
            ContrastDataset(f"{self.name}[:{n_first}]", self.pairs[:n_first]),
            ContrastDataset(f"{self.name}[{n_first}:]", self.pairs[n_first:]),
        )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "n_pairs": len(self.pairs), "sha256": self.digest}


def list_datasets() -> list[str]:
    """Names of the datasets shipped with actadd (``load_pairs(name)``)."""
    files = resources.files("actadd") / "data"
    return sorted(f.name[: -len(".jsonl")] for f in files.iterdir() if f.name.endswith(".jsonl"))


def _shipped(name: str) -> str | None:
    f = resources.files("actadd") / "data" / f"{name}.jsonl"
    return f.read_text(encoding="utf-8") if f.is_file() else None


def _rows(source: str | os.PathLike[str]) -> tuple[str, list[dict[str, Any]]]:
    text = _shipped(str(source)) if isinstance(source, str) and "/" not in source else None
    if text is not None:
        return str(source), _jsonl(text, str(source))
    path = Path(source)
    if not path.is_file():
        shipped = ", ".join(list_datasets())
        if path.suffix or os.sep in str(source) or "/" in str(source):  # meant as a file
            raise ActAddError(
                f"file not found: {path} (pairs come from a .jsonl/.json/.csv file, or one of "
                f"the shipped datasets: {shipped})"
            )
        raise ActAddError(
            f"no dataset {str(source)!r}: give a .jsonl/.json/.csv file or one of the shipped "
            f"datasets ({shipped})"
        )
    raw = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return str(path), list(csv.DictReader(raw.splitlines()))
    if suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ActAddError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, list):
            raise ActAddError(f"{path}: expected a JSON list of objects")
        return str(path), data
    return str(path), _jsonl(raw, str(path))


def _jsonl(text: str, where: str) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ActAddError(f"{where} line {i}: not valid JSON ({e})") from e
    return rows


def _field(row: dict[str, Any], key: str) -> str | None:
    for alias in _ALIASES[key]:
        if alias in row and row[alias] is not None:
            return str(row[alias])
    return None


def load_pairs(source: str | os.PathLike[str]) -> ContrastDataset:
    """Load a shipped dataset by name, or a JSONL / JSON / CSV file of pairs.

    Args:
        source: ``"sentiment"``, ``"weddings"``, ``"formality"`` or a path.

    Example:
        >>> ds = load_pairs("sentiment")
        >>> len(ds), ds[0].positive[:17]
        (50, 'I loved this movi')
    """
    name, rows = _rows(source)
    pairs = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ActAddError(f"{name} row {i}: expected an object with positive/negative")
        pos, neg = _field(row, "positive"), _field(row, "negative")
        if pos is None or neg is None:
            raise ActAddError(
                f"{name} row {i} has fields {sorted(row)}; each row needs 'positive' and "
                "'negative' (and optionally 'prompt')"
            )
        pairs.append(ContrastPair(pos, neg, _field(row, "prompt") or ""))
    return ContrastDataset(name, tuple(pairs))


def load_texts(source: str | os.PathLike[str] = "neutral") -> list[str]:
    """Plain texts (a ``text`` field per row, or one line each for ``.txt`` files)."""
    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".txt"):
        return [ln for ln in Path(source).read_text(encoding="utf-8").splitlines() if ln.strip()]
    name, rows = _rows(source)
    texts = [str(r["text"]) for r in rows if isinstance(r, dict) and r.get("text")]
    if not texts:
        raise ActAddError(f"{name}: no rows with a 'text' field")
    return texts


def list_prompts() -> list[str]:
    """Names of the prompt lists shipped with actadd (``load_prompts(name)``)."""
    files = resources.files("actadd") / "data" / "prompts"
    return sorted(f.name[: -len(".txt")] for f in files.iterdir() if f.name.endswith(".txt"))


def load_prompts(source: str | os.PathLike[str]) -> list[str]:
    """Prompts to steer: a shipped list (``sentiment``: 24 sentence openings, ``weddings``:
    16), a ``.txt`` file (one per line) or a ``.jsonl``/``.json``/``.csv`` file with a
    ``prompt`` or ``text`` field.

    Example:
        >>> len(load_prompts("sentiment"))
        24
    """
    name = str(source)
    shipped = resources.files("actadd") / "data" / "prompts" / f"{name}.txt"
    if "/" not in name and not name.endswith(".txt") and shipped.is_file():
        text = shipped.read_text(encoding="utf-8")
        return [ln for ln in text.splitlines() if ln.strip()]
    path = Path(source)
    if not path.is_file():
        raise ActAddError(
            f"no prompts {name!r}: give a .txt file (one prompt per line), a .jsonl/.json/.csv "
            f"file with a 'prompt' field, or a shipped list ({', '.join(list_prompts())})"
        )
    if path.suffix.lower() == ".txt":
        return [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    _, rows = _rows(path)
    out = [str(r.get("prompt") or r.get("text") or "") for r in rows if isinstance(r, dict)]
    out = [p for p in out if p.strip()]
    if not out:
        raise ActAddError(f"{path}: no rows with a 'prompt' or 'text' field")
    return out


def as_dataset(
    data: ContrastDataset | str | os.PathLike[str] | Iterable[Any], name: str = "pairs"
) -> ContrastDataset:
    """Accept a dataset, a name/path, or pairs given as ``ContrastPair``, tuples or dicts."""
    if isinstance(data, ContrastDataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_pairs(data)
    pairs = []
    for item in data:
        if isinstance(item, ContrastPair):
            pairs.append(item)
        elif isinstance(item, dict):
            pos, neg = _field(item, "positive"), _field(item, "negative")
            if pos is None or neg is None:
                raise ActAddError(f"pair {item!r} needs 'positive' and 'negative'")
            pairs.append(ContrastPair(pos, neg, _field(item, "prompt") or ""))
        elif isinstance(item, Sequence) and len(item) in (2, 3):
            pairs.append(ContrastPair(*item))
        else:
            raise ActAddError(
                f"cannot read {item!r} as a pair: use (positive, negative), a dict or ContrastPair"
            )
    return ContrastDataset(name, tuple(pairs))
