"""Shared fixtures: real MNIST digits in torchvision's layout, temporary MLflow stores,
and a helper that runs the real command line in a subprocess."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.mnist_fixture import write_mnist

ROOT = Path(__file__).resolve().parents[1]
# What MLflow and normlab write relative to the working directory; tests write elsewhere.
WRITTEN_BY_DEFAULT = ("mlruns", "mlflow.db", "results")
_PRESENT_AT_START = {name for name in WRITTEN_BY_DEFAULT if (ROOT / name).exists()}


# The longest files first (CI's --durations), in this order (pyproject.toml turns off
# xdist's own reordering by number of tests): with two workers taking whole files, a long
# file scheduled late ran alone at the end, one core idle for three minutes.
LONGEST_FIRST = ["test_sweep.py", "test_benchmark.py", "test_ray.py", "test_engine_process.py",
                 "test_readme_commands.py", "test_compare.py", "test_interrupt_resume.py", "test_tracking_server.py",
                 "test_project.py", "test_ui_browser.py", "test_cifar10.py", "test_bad_input.py", "test_models.py",
                 "test_trust_extras.py", "test_train.py", "test_fresh_clone.py", "test_data.py", "test_norms.py",
                 "test_conv.py"]  # measured 2026-12-05: 205 s of test_sweep.py down to 16 s of test_conv.py


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if the tests wrote MLflow stores or results into the repository."""
    if hasattr(session.config, "workerinput"):  # pytest-xdist workers: the controller checks
        return
    written = [name for name in WRITTEN_BY_DEFAULT if (ROOT / name).exists() and name not in _PRESENT_AT_START]
    if written:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nerror: the tests wrote {', '.join(written)} into the repository {ROOT}")


_scratch: list[Path] = []  # the session's folder for scratch_folder, set by work_outside_the_repository


@pytest.fixture(scope="session", autouse=True)
def work_outside_the_repository(tmp_path_factory):
    """Tests run from a temporary folder: a store first opened in this process (an
    MlflowClient's first query) puts its Default experiment's artifacts in ./mlruns of the
    working directory, and runs that a command logs there (`mlflow run` without an
    experiment name) would otherwise write into the checkout."""
    os.chdir(tmp_path_factory.mktemp("cwd"))
    _scratch.append(tmp_path_factory.mktemp("scratch"))


def scratch_folder(prefix: str) -> str:
    """A new folder for a subprocess to work in, under pytest's temporary folders (which
    pytest removes after a few sessions), not loose in /tmp, where each run of the suite left
    about 25 and they had piled up by the hundred."""
    return tempfile.mkdtemp(prefix=prefix, dir=_scratch[0])


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """--data-dir with train = first 8,000 real test digits, test = last 2,000."""
    return write_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="session")
def small_mnist_dir(tmp_path_factory) -> Path:
    """A faster split for tests that check plumbing, not accuracy: 1,000 / 500 digits."""
    return write_mnist(tmp_path_factory.mktemp("mnist-small"), train=1000, test=500)


@pytest.fixture
def one_thread():
    """In-process training on one intra-op thread, as the subprocesses train (cli_env): CPU
    kernels then add up in one order, whatever the machine's cores or what set the process's
    thread count before."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def restore_environ():
    """In-process commands set MLflow's retry settings in os.environ; put it back so later
    subprocesses and tests start clean."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, served artifacts), one per test module."""
    from tests.mlflow_server import MlflowServer

    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory) -> Path:
    """A sqlite store as MLflow creates it, for tracking_uri to copy: creating one (its schema's
    migrations) costs the process that opens it first 1.1-1.4 s on CI's CPU, once for every
    test that uses tracking_uri. The stores the commands create themselves are tested where that is
    the point (the README's commands, a fresh_tracking_uri, the Ray and server tests)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("migrated-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def fresh_tracking_uri(tmp_path, monkeypatch) -> str:
    """A new sqlite store (and artifact folder) for this test, also for subprocesses, created by
    whatever opens it first. The test runs in tmp_path: a sqlite store puts new experiments'
    artifacts in ./mlruns."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture
def tracking_uri(migrated_store, tmp_path, fresh_tracking_uri) -> str:
    """fresh_tracking_uri's store, already created: a copy of migrated_store whose Default
    experiment keeps its artifacts in tmp_path/mlruns/0, as if created here."""
    store = tmp_path / "mlflow.db"
    shutil.copy(migrated_store, store)
    with contextlib.closing(sqlite3.connect(store)) as db, db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                   (str(tmp_path / "mlruns" / "0"),))
    return fresh_tracking_uri


def no_runs_logged(tracking_uri: str) -> bool:
    """True when the store holds no run (or was never even created)."""
    from mlflow import MlflowClient

    if not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        return True
    client = MlflowClient()
    return not client.search_runs([e.experiment_id for e in client.search_experiments()])


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a normlab subprocess: this checkout importable, quiet, CPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    env.setdefault("OMP_NUM_THREADS", "1")  # CI has 2 cores: more threads per process only thrash
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


IMPORT_PROBE = """import atexit, sys
from normlab.cli import entry
sys.argv[1:] = sys.argv[2:]
atexit.register(lambda: print('imported:', sorted({'torch', 'mlflow', 'torchvision'} & set(sys.modules))))
entry()
"""


def run_cli_noting_imports(*args: str, cwd: Path | None = None, timeout: float = 300,
                           **env: str) -> subprocess.CompletedProcess:
    """`normlab ARGS` through its entry in a fresh process that prints, last, which of torch,
    MLflow and torchvision it imported ("imported: ['mlflow']"), from an atexit handler (the
    entry ends the process itself, after running them)."""
    return subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, "normlab", *args],
        cwd=cwd or scratch_folder("normlab-cli-"), env=cli_env(**env), capture_output=True, text=True,
        timeout=timeout,
    )


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """`python -m normlab ARGS` as a user would run it, by default in a fresh temporary folder
    (what it writes relative to the working directory, such as a sqlite store's ./mlruns,
    stays out of the repository); returns the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "normlab", *args],
        cwd=cwd or scratch_folder("normlab-cli-"), env=cli_env(**env), capture_output=True, text=True,
        timeout=timeout,
    )
