"""Shared by the bench scripts: print a markdown result and, when asked, write it to a file."""

from __future__ import annotations

from pathlib import Path


def emit(text: str, out: str | None) -> None:
    """Print ``text``; with ``out``, also write it there (creating the folder)."""
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
