"""``actadd cache``: the converted copies of GGUF models that make later loads fast."""

from __future__ import annotations

import typer

from actadd.cli.common import console

app = typer.Typer(help="Show or clear the cache of converted GGUF models.", no_args_is_help=True)


@app.command("info")
def info() -> None:
    """Where the cache is and what it holds."""
    from actadd.loading import cache_dir

    root = cache_dir() / "models"
    entries = sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []
    console.print(f"{cache_dir()}", highlight=False)
    for entry in entries:
        size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        console.print(f"  {entry.name}  {size / 2**20:.0f} MB", highlight=False)
    if not entries:
        console.print("  (empty)")


@app.command("clear")
def clear() -> None:
    """Delete every cached model (the next load converts its GGUF file again)."""
    from actadd.loading import cache_dir, clear_cache

    freed = clear_cache()
    console.print(f"freed {freed / 2**20:.0f} MB in {cache_dir()}", highlight=False)
