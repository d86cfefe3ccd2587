"""Self-contained HTML reports: sections of tables, figures and code in one file that opens
anywhere, offline (figures are PNGs inlined as data URIs; no script, no CDN).

Example:
    >>> html = page("demo", [("A table", table(pd.DataFrame({"a": [1.5]})))])
    >>> "<table" in html and html.startswith("<!DOCTYPE html>")
    True
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import pandas as pd

__all__ = ["code", "figure", "page", "paragraph", "table"]

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 12px; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; white-space: pre-wrap; }
img { max-width: 100%; } .wide { overflow-x: auto; }
"""


def table(df: pd.DataFrame, *, digits: int = 3) -> str:
    """A DataFrame as an HTML table, floats rounded to ``digits`` significant figures."""
    if df.empty:
        return "<p><em>(none)</em></p>"
    shown = df.copy()
    for c in shown.columns:
        if pd.api.types.is_float_dtype(shown[c]):
            shown[c] = shown[c].map(lambda v: "" if pd.isna(v) else f"{v:.{digits}g}")
    return f'<div class="wide">{shown.to_html(index=False, escape=True, border=0)}</div>'


def figure(fig: Any, *, dpi: int = 110) -> str:
    """A matplotlib figure as an inline PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def code(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def paragraph(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """One HTML document: a title and ``(heading, html)`` sections."""
    body = "\n".join(f"<h2>{html.escape(h)}</h2>\n{content}" for h, content in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )
