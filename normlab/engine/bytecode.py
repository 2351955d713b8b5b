"""Whether this Python compiles torch's source again in every process.

A container that sets PYTHONDONTWRITEBYTECODE over a torch installed without its bytecode makes
every process that imports torch compile its Python source first: on an H100 machine `import
torch` took 3.1 s instead of 1.5-1.75 s, and `normlab train --norm ln` 15.1 s instead of 7.9 s
(docs/speed.md, forty-ninth session). normlab cannot write the bytecode for the user (it is their
installation); it says so, with the command that does, once per command."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def missing_bytecode(package: str = "torch") -> Path | None:
    """``package``'s source file where it has no cached bytecode (None otherwise, or where it is
    not installed as source). Found without importing ``package``."""
    spec = importlib.util.find_spec(package)
    if spec is None or not (spec.origin or "").endswith(".py"):
        return None
    return None if Path(importlib.util.cache_from_source(spec.origin)).exists() else Path(spec.origin)


def uncached_source_note(package: str = "torch") -> str:
    """Where this Python writes no bytecode and ``package`` has none, a sentence saying what that
    costs and how to end it ('' otherwise)."""
    if not sys.flags.dont_write_bytecode:
        return ""  # Python writes what is missing at the first import
    source = missing_bytecode(package)
    if source is None:
        return ""
    return (f"this Python writes no bytecode (PYTHONDONTWRITEBYTECODE or -B) and {package} has none, so every "
            f"process compiles {package}'s source again as it imports it, seconds a command "
            f"(docs/troubleshooting.md); compile it once: python -m compileall -q -j 0 {source.parents[1]}")
