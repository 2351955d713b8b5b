"""Checkpoint files: written atomically, read back without executing pickled code.

A checkpoint is Trainer.state_dict() plus the run id, the data digest and every epoch's
record so far; it marks the end of a completed epoch (a stop mid-epoch resumes from there).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from normlab.errors import DataError


def save(state: dict, path: Path) -> None:
    """Write to a temporary file next to `path`, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict:
    """The state saved by `save`, on the CPU (Trainer.load_state_dict moves it)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged zip or pickle
        raise DataError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); "
                        f"it is damaged or not a normlab checkpoint") from exc


def newest(*paths: Path | None) -> tuple[Path, dict] | None:
    """Of the given checkpoint files that exist, the one furthest along (most epochs). A
    damaged one is passed over when another can be read (a corrupt artifact must not block
    a resume from a good local copy); when none can, the first one's error is raised."""
    found, errors = [], []
    for path in paths:
        if path is None or not path.exists():
            continue
        try:
            found.append((path, load(path)))
        except DataError as exc:
            errors.append(exc)
    if errors and not found:
        raise errors[0]
    return max(found, key=lambda pair: pair[1]["epoch"], default=None)
