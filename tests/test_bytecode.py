"""normlab/engine/bytecode.py: a Python that would compile torch's source again in every process is
named, with the command that ends it, before a command does any work."""

from __future__ import annotations

import ast
import shlex
import subprocess
import sys

from tests.conftest import cli_env

NOTE = ("import sys; from normlab.engine.bytecode import uncached_source_note; "
        "print(repr(uncached_source_note(sys.argv[1])))")


def _note(package: str, *flags: str, **env: str) -> str:
    """The note, as a fresh process of this Python (with ``flags``) finds it for ``package``."""
    proc = subprocess.run([sys.executable, *flags, "-c", NOTE, package], env=cli_env(**env),
                          capture_output=True, text=True, check=True)
    return ast.literal_eval(proc.stdout)


def test_a_package_without_bytecode_under_a_python_that_writes_none_is_named_and_the_fix_given_works(tmp_path):
    site = tmp_path / "site"
    (site / "slowpkg").mkdir(parents=True)
    (site / "slowpkg" / "__init__.py").write_text("VALUE = 1\n")
    path = f"{site}:{cli_env()['PYTHONPATH']}"
    note = _note("slowpkg", "-B", PYTHONPATH=path)
    assert note.startswith("this Python writes no bytecode (PYTHONDONTWRITEBYTECODE or -B) and slowpkg has none")
    fix = note.split("compile it once: ")[1]
    assert fix == f"python -m compileall -q -j 0 {site}"
    subprocess.run([sys.executable, *shlex.split(fix)[1:]], check=True)  # as given, with this Python
    assert list((site / "slowpkg" / "__pycache__").glob("__init__.*.pyc"))
    assert _note("slowpkg", "-B", PYTHONPATH=path) == ""  # ended
    assert _note("no_such_package_here", "-B") == ""


def test_a_python_that_writes_its_bytecode_gets_no_note(tmp_path):
    site = tmp_path / "site"
    (site / "slowpkg").mkdir(parents=True)
    (site / "slowpkg" / "__init__.py").write_text("VALUE = 1\n")
    env = {"PYTHONPATH": f"{site}:{cli_env()['PYTHONPATH']}", "PYTHONDONTWRITEBYTECODE": ""}
    assert _note("slowpkg", **env) == ""  # Python writes it at the first import


def test_train_and_sweep_say_so_before_their_work_where_torchs_bytecode_is_missing(tmp_path):
    """PYTHONPYCACHEPREFIX at an empty folder: this Python then finds no bytecode of torch's (it
    would compile torch's source as it imported it); the commands note it before refusing a bad
    --data-dir, which they do before importing torch."""
    blocking = tmp_path / "a-file"
    blocking.write_text("")
    env = cli_env(PYTHONDONTWRITEBYTECODE="1", PYTHONPYCACHEPREFIX=str(tmp_path / "empty-prefix"))
    for command in (["train"], ["sweep"]):
        proc = subprocess.run([sys.executable, "-m", "normlab", *command, "--data-dir", str(blocking)],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr, proc.stderr
        assert "note: this Python writes no bytecode (PYTHONDONTWRITEBYTECODE or -B) and torch has none" in proc.stderr
        assert "python -m compileall -q -j 0 " in proc.stderr
    plain = subprocess.run([sys.executable, "-m", "normlab", "train", "--data-dir", str(blocking)],
                           env=cli_env(PYTHONDONTWRITEBYTECODE="1"), capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "bytecode" not in plain.stderr, plain.stderr  # the venv's torch has its own
