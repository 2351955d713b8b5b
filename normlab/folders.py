"""Folders the user names (--checkpoint-dir, --out): made, and checked to take files, before
any data loads or run starts, so that a typo in one is not found after the training."""

from __future__ import annotations

import tempfile
from pathlib import Path

from normlab.errors import ConfigError


def check_writable(folder: str | Path, option: str) -> Path:
    """``folder`` (with ~ expanded), created now as its first file would create it; a
    ConfigError naming ``option`` where it cannot take files."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".normlab-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{option} {folder} is not writable ({exc.strerror or exc}); choose another {option} "
                          f"or make it writable") from exc
    return folder
