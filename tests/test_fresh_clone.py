"""The tests run in a fresh clone of the repository, with no ../shared folder beside it and
no internet: their digits come from the official MNIST files the repository ships."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SHIPPED = "tests/test_data.py::test_the_tests_digits_are_the_official_files_shipped_in_the_repository"
PARSED = "tests/test_data.py::test_mnist_folder_parses_through_torchvision_into_the_real_digits"


@pytest.fixture
def clone(tmp_path_factory) -> Path:
    """The checkout's committed HEAD, cloned into an empty folder (uncommitted work is not in it)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip(f"{ROOT} is not a git checkout (or git is not installed): nothing to clone")
    dest = tmp_path_factory.mktemp("fresh") / "normlab"
    subprocess.run(["git", "clone", "--quiet", "--depth", "1", f"file://{ROOT}", str(dest)], check=True, timeout=60)
    assert not (dest.parent / "shared").exists()
    return dest


def pytest_in(clone: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """This environment's pytest on the clone's tests, importing nothing from this checkout."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "-q", "-p", "no:cacheprovider", *args],
                          cwd=clone, env=environ, capture_output=True, text=True, timeout=120)


def test_a_fresh_clone_passes_the_data_tests_with_the_shipped_digits(clone):
    assert (clone / "tests" / "data" / "mnist-t10k" / "t10k-images-idx3-ubyte.gz").is_file()
    proc = pytest_in(clone, SHIPPED, PARSED)
    # the first asserts that the digits are the clone's own tests/data/mnist-t10k, md5-checked
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout + proc.stderr
    assert "skipped" not in proc.stdout


def test_a_clone_without_the_digits_skips_saying_where_they_belong(clone, tmp_path):
    """Offline, with neither the repository's copy nor ../shared, the digit tests skip (not
    fail) and say what was tried; with internet, torchvision's download serves them instead."""
    shutil.rmtree(clone / "tests" / "data" / "mnist-t10k")
    proc = pytest_in(clone, PARSED, "-rs", XDG_CACHE_HOME=str(tmp_path / "cache"))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    if "1 passed" in proc.stdout:  # this machine reached a download mirror
        assert (tmp_path / "cache" / "normlab" / "mnist-t10k" / "t10k-images-idx3-ubyte.gz").is_file()
    else:
        assert "1 skipped" in proc.stdout, output
        assert "the official MNIST test files" in output and "are not available" in output
        assert f"{clone / 'tests' / 'data' / 'mnist-t10k'}: no t10k-images-idx3-ubyte.gz" in output
        assert "torchvision's download into" in output and "ossci-datasets.s3.amazonaws.com" in output
        assert "They ship with the repository in tests/data/mnist-t10k" in output
