"""The one input normaliser of metrics: texts as strings, lists, Series or DataFrame columns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import pandas as pd

from actadd.errors import ActAddError

__all__ = ["TextData", "texts_of"]

TextData: TypeAlias = "str | Sequence[str] | pd.Series | pd.DataFrame"


def texts_of(data: TextData, column: str | None = None) -> tuple[list[str], pd.Index]:
    """The texts of ``data`` and the index results should carry.

    A DataFrame's texts are in ``column`` (default ``completions``, else ``text``).

    Example:
        >>> texts_of(pd.DataFrame({"completions": ["a", "b"]}, index=[3, 4]))
        (['a', 'b'], Index([3, 4], dtype='int64'))
    """
    if isinstance(data, str):
        return [data], pd.RangeIndex(1)
    if isinstance(data, pd.DataFrame):
        col = column or next((c for c in ("completions", "text") if c in data.columns), None)
        if col is None or col not in data.columns:
            raise ActAddError(
                f"DataFrame has no column {column or 'completions/text'!r} "
                f"(columns: {list(data.columns)}); pass column=<the column with the texts>"
            )
        series = data[col]
    elif isinstance(data, pd.Series):
        series = data
    else:
        series = pd.Series(list(data), dtype=object)
    texts = series.tolist()
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ActAddError(f"rows {bad[:5]} are not strings: metrics take texts")
    return texts, series.index
