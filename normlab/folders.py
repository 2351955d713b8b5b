"""Folders normlab makes for the user and takes back when the work that needed them failed:
an empty folder left behind (``data/MNIST/raw`` after an offline download, a mistyped
``--out``) reads as something put in the wrong place."""

from __future__ import annotations

import contextlib
from pathlib import Path


def folders_to_make(folder: Path) -> list[Path]:
    """The folders that making ``folder`` would create, the deepest first."""
    return [path for path in (folder, *folder.parents) if not path.exists()]


def nearest_existing(folder: Path) -> Path:
    """``folder`` itself where it exists, else its deepest existing parent: where making it
    would start, so the place whose permissions decide whether it can be made."""
    return next(path for path in (folder, *folder.parents) if path.exists())


def remove_if_empty(folders: list[Path]) -> None:
    """Remove each folder (the deepest first) where it is empty; one holding a file, or
    already gone, is left as it is."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()
