"""Shared fixtures: real MNIST digits in torchvision's layout, temporary MLflow stores,
and a helper that runs the real command line in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mnist_fixture import SHARED_MNIST, write_mnist

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """--data-dir with train = first 8,000 real test digits, test = last 2,000."""
    if not SHARED_MNIST.exists():
        pytest.fail(f"the real MNIST digits are expected in {SHARED_MNIST}")
    return write_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="session")
def small_mnist_dir(tmp_path_factory) -> Path:
    """A faster split for tests that check plumbing, not accuracy: 1,000 / 500 digits."""
    return write_mnist(tmp_path_factory.mktemp("mnist-small"), train=1000, test=500)


@pytest.fixture(autouse=True)
def restore_environ():
    """In-process commands set MLFLOW_EXPERIMENT_ID (mlflow.set_experiment) and retry settings
    in os.environ; put it back so later subprocesses and tests start clean."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh sqlite store (and artifact folder) for this test, also for subprocesses."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a normlab subprocess: this checkout importable, quiet, CPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    env.setdefault("OMP_NUM_THREADS", "1")  # CI has 2 cores: more threads per process only thrash
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """`python -m normlab ARGS` as a user would run it; returns the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "normlab", *args],
        cwd=cwd or ROOT, env=cli_env(**env), capture_output=True, text=True, timeout=timeout,
    )
