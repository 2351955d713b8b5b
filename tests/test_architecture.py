"""The dependency rules of docs/architecture.md, checked on the source: the engine imports
neither MLflow nor matplotlib nor the layers above it; only the tracking layer imports
MLflow; nothing imports the command line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "normlab"
ENGINE = {"models", "data", "train", "step", "conv", "rng", "host_memory", "checkpoint", "interrupts"}
TRACKING = {"tracking", "lifecycle", "lease", "sweep_tracking"}  # the only modules that talk to MLflow
ABOVE_ENGINE = {"tracking", "lifecycle", "lease", "sweep", "sweep_tracking", "worker", "executors", "resume",
                "compare", "results", "statistics", "plots", "explain", "cli", "redaction"}


def imports(module: str) -> set[str]:
    """Every module name the source imports, at any depth (function-level imports included)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "normlab":
                found |= {f"normlab.{alias.name}" for alias in node.names}
    return found


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def test_the_module_lists_name_real_modules():
    assert ENGINE | TRACKING <= set(MODULES)


@pytest.mark.parametrize("module", sorted(ENGINE))
def test_the_engine_imports_neither_mlflow_nor_matplotlib_nor_the_layers_above(module):
    names = imports(module)
    assert not {n for n in names if n.split(".")[0] in ("mlflow", "matplotlib")}
    assert not {n for n in names if n.startswith("normlab.") and n.split(".")[1] in ABOVE_ENGINE}


@pytest.mark.parametrize("module", MODULES)
def test_only_the_tracking_layer_imports_mlflow(module):
    if module not in TRACKING:
        assert not {n for n in imports(module) if n.split(".")[0] == "mlflow"}


@pytest.mark.parametrize("module", MODULES)
def test_nothing_imports_the_command_line(module):
    if module != "__main__":
        assert "normlab.cli" not in imports(module)
