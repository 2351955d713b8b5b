"""The dependency rules of docs/architecture.md, checked on the source: the engine imports
neither MLflow nor matplotlib nor the packages above it, and its plain modules do not
reach into the speed wing's internals; only the tracking package imports MLflow; the
analysis package writes nothing to MLflow itself; nothing imports the command line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "normlab"
MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                 for p in PACKAGE.rglob("*.py"))
PACKAGES = ("normlab.engine", "normlab.tracking", "normlab.sweep", "normlab.analysis")


def imports(module: str) -> set[str]:
    """Every module name the source imports, at any depth (function-level imports included)."""
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_every_module_belongs_to_a_package_or_is_one_of_the_few_at_the_top():
    top = {m for m in MODULES if not any(in_package(m, p) for p in PACKAGES)}
    assert top == {"normlab", "normlab.__main__", "normlab.cli", "normlab.errors", "normlab.folders"}


@pytest.mark.parametrize("module", [m for m in MODULES if in_package(m, "normlab.engine")])
def test_the_engine_imports_neither_mlflow_nor_matplotlib_nor_the_packages_above(module):
    names = imports(module)
    assert not {n for n in names if n.split(".")[0] in ("mlflow", "matplotlib")}
    assert not {n for n in names if any(in_package(n, p) for p in PACKAGES if p != "normlab.engine")}
    assert "normlab.cli" not in names


@pytest.mark.parametrize("module", MODULES)
def test_only_the_tracking_package_imports_mlflow(module):
    if not in_package(module, "normlab.tracking"):
        assert not {n for n in imports(module) if n.split(".")[0] == "mlflow"}


@pytest.mark.parametrize("module", [m for m in MODULES if in_package(m, "normlab.analysis")])
def test_analysis_writes_no_run_it_reads_them_through_run_query(module):
    """Of the tracking package, analysis uses the store's name and settings (connection),
    the reader (run_query: selection, histories, the comparison's own run) and redaction,
    and the default experiment's name (EXPERIMENT)."""
    used = {n.split(".")[2] for n in imports(module) if in_package(n, "normlab.tracking") and n.count(".") >= 2}
    assert used <= {"connection", "run_query", "redaction", "EXPERIMENT"}


@pytest.mark.parametrize("module", MODULES)
def test_nothing_imports_the_command_line(module):
    if module != "normlab.__main__":
        assert "normlab.cli" not in imports(module)
