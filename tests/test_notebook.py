"""examples/quickstart.ipynb: committed with the outputs of one real run, and runs end to end.

The slow test executes a copy in a temporary directory (the committed notebook is never
overwritten); any cell that raises fails it. To regenerate the committed outputs, run this
file: ``OMP_NUM_THREADS=1 .venv/bin/python tests/test_notebook.py`` (then check the diff).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"
MAX_BYTES = 500_000  # static PNGs and HTML tables only; plotly's JS would be megabytes


def execute(path: Path, *, workdir: Path) -> nbformat.NotebookNode:
    """Run every cell of a fresh copy of the notebook in this venv's kernel; return it."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    for cell in _code_cells(nb):
        cell.outputs, cell.execution_count = [], None
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    ).execute()
    return nb


def _code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


def _errors(nb: nbformat.NotebookNode) -> list[str]:
    return [
        f"cell {i}: {o.get('ename')}: {o.get('evalue')}"
        for i, c in enumerate(_code_cells(nb))
        for o in c.outputs
        if o.output_type == "error"
    ]


def test_committed_notebook_has_outputs_of_one_clean_run():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    cells = _code_cells(nb)
    assert len(cells) >= 10
    # executed once, top to bottom, every cell
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
    assert _errors(nb) == []
    pngs = [o for c in cells for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 3, "the sweep, magnitude and prompt-length plots render as PNG"
    assert NOTEBOOK.stat().st_size < MAX_BYTES


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
    # Only this venv's kernel: ignore a user-level "python3" kernelspec pointing elsewhere.
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = execute(NOTEBOOK, workdir=tmp_path)  # raises CellExecutionError if any cell fails
    nbformat.write(nb, tmp_path / "quickstart.ipynb")
    assert _errors(nb) == []
    assert all(c.execution_count for c in _code_cells(nb))


if __name__ == "__main__":  # regenerate the committed outputs
    import os
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        executed = execute(NOTEBOOK, workdir=Path(tmp))
    nbformat.write(executed, NOTEBOOK)
    print(f"wrote {NOTEBOOK} ({NOTEBOOK.stat().st_size / 1000:.0f} kB)")
