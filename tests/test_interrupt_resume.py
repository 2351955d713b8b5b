"""Interruption by real signals, resume into the same run, and a loss that diverges."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from normlab.checkpoint import load
from normlab.cli import main
from tests.conftest import ROOT, cli_env

METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")



@pytest.fixture(autouse=True)
def one_thread():
    """In-process training with one thread, like the subprocesses (same float results)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def signal_after_first_epoch(cmd: list[str], cwd: Path, sig: int, **env) -> tuple[subprocess.CompletedProcess, float]:
    """Start cmd in its own session, send `sig` to its process group (as a terminal does on
    Ctrl-C) once epoch 1 is reported; returns the finished process and seconds to exit."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=cli_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch   1/3"):
            os.killpg(proc.pid, sig)
            sent = time.monotonic()
            break
    out, err = proc.communicate(timeout=300)
    assert lines and lines[-1].startswith("epoch   1/3"), "".join(lines) + out + err
    waited = time.monotonic() - sent
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(lines) + out, err), waited


def histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {m: [(x.step, x.value) for x in client.get_metric_history(run_id, m)] for m in METRICS}


def resume(run_id: str, data_dir: Path, checkpoints: Path, *args: str):
    return CliRunner().invoke(main, ["train", "--resume", run_id, "--data-dir", str(data_dir), "--device", "cpu",
                                     "--checkpoint-dir", str(checkpoints), *args])


@pytest.fixture(scope="module")
def interrupted(small_mnist_dir, tmp_path_factory):
    """A 3-epoch run stopped by SIGTERM during epoch 2, in its own sqlite store."""
    tmp = tmp_path_factory.mktemp("interrupted")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "normlab", "train", "--data-dir", str(small_mnist_dir), "--device", "cpu",
           "--epochs", "3", "--checkpoint-dir", str(tmp / "checkpoints")]
    proc, waited = signal_after_first_epoch(cmd, tmp, signal.SIGTERM, MLFLOW_TRACKING_URI=uri)
    run_id = next(l for l in proc.stdout.splitlines() if l.startswith("MLflow run ")).split()[2]
    return dict(uri=uri, run_id=run_id, checkpoints=tmp / "checkpoints", proc=proc, waited=waited)


@pytest.fixture
def store(interrupted, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", interrupted["uri"])
    mlflow.set_tracking_uri(interrupted["uri"])
    yield MlflowClient(interrupted["uri"])
    mlflow.set_tracking_uri(None)


def test_sigterm_stops_after_the_current_step_and_records_interrupted(interrupted, store):
    proc, run_id = interrupted["proc"], interrupted["run_id"]
    assert proc.returncode == 143, proc.stderr  # 128 + SIGTERM
    assert interrupted["waited"] < 60
    assert "SIGTERM received: stopped " in proc.stderr  # after step k in, or before, epoch 2
    local = load(interrupted["checkpoints"] / run_id / "last.pt")
    done = local["epoch"]
    assert 1 <= done < 3
    run = store.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["normlab.status"] == "interrupted"
    assert "SIGTERM received" in run.data.tags["normlab.reason"]
    assert f"resume with: normlab train --resume {run_id}" in run.data.tags["normlab.reason"]
    logged = histories(store, run_id)
    assert {m: [s for s, _ in h] for m, h in logged.items()} == {m: list(range(1, done + 1)) for m in METRICS}
    assert [r["train_loss"] for r in local["records"]] == [v for _, v in logged["train_loss"]]
    artifact = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint/last.pt")
    assert load(Path(artifact))["epoch"] == done


def test_resume_refuses_a_config_that_differs_from_the_checkpoint(interrupted, store, small_mnist_dir):
    result = resume(interrupted["run_id"], small_mnist_dir, interrupted["checkpoints"], "--lr", "0.1", "--seed", "2")
    assert result.exit_code == 2
    assert "the config differs from its checkpoint (given vs checkpoint): lr: 0.1 vs 0.05; seed: 2 vs 1" in result.output


def test_resumed_run_continues_the_same_run_and_equals_an_uninterrupted_one(interrupted, store, small_mnist_dir, tmp_path):
    run_id = interrupted["run_id"]
    result = resume(run_id, small_mnist_dir, interrupted["checkpoints"])
    assert result.exit_code == 0, result.output
    assert f"resuming run {run_id} after epoch" in result.output
    uninterrupted = CliRunner().invoke(main, ["train", "--data-dir", str(small_mnist_dir), "--device", "cpu",
                                              "--epochs", "3", "--checkpoint-dir", str(tmp_path)])
    assert uninterrupted.exit_code == 0, uninterrupted.output
    runs = store.search_runs([store.get_experiment_by_name("normlab").experiment_id])
    assert len(runs) == 2  # the resume made no new run
    other = next(r.info.run_id for r in runs if r.info.run_id != run_id)
    resumed, reference = histories(store, run_id), histories(store, other)
    for m in METRICS:
        assert [s for s, _ in resumed[m]] == [1, 2, 3]
        assert [v for _, v in resumed[m]] == pytest.approx([v for _, v in reference[m]], abs=1e-6)
    run = store.get_run(run_id)
    assert (run.info.status, run.data.tags["normlab.status"]) == ("FINISHED", "finished")
    assert "normlab.reason" not in run.data.tags and "SIGTERM" in run.data.tags["normlab.resumed"]
    assert not (interrupted["checkpoints"] / run_id).exists()  # local copy dropped once finished
    assert load(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint/last.pt")))["epoch"] == 3


def test_ctrl_c_under_mlflow_run_is_recorded_as_interrupted(small_mnist_dir, tmp_path, tracking_uri):
    """Ctrl-C reaches `mlflow run` and its child; mlflow marks the run FAILED, the tag keeps the truth."""
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "mlflow"), "run", str(ROOT), "--env-manager", "local", "--experiment-name", "ctrl-c",
           "-P", "epochs=3", "-P", f"data_dir={small_mnist_dir}", "-P", "device=cpu"]
    proc, waited = signal_after_first_epoch(cmd, tmp_path, signal.SIGINT,
                                            PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                                            XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert proc.returncode != 0
    assert waited < 60
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("ctrl-c").experiment_id])
    assert run.info.status == "FAILED"  # `mlflow run` overwrote our KILLED
    assert run.data.tags["normlab.status"] == "interrupted"
    assert run.data.tags["normlab.reason"].startswith("SIGINT received: stopped ")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "test_acc")]
    assert steps and steps == list(range(1, len(steps) + 1)) and len(steps) < 3


def test_nan_loss_stops_the_run_as_failed_with_advice(small_mnist_dir, tmp_path, tracking_uri):
    result = CliRunner().invoke(main, ["train", "--data-dir", str(small_mnist_dir), "--device", "cpu",
                                       "--epochs", "2", "--lr", "1e4", "--checkpoint-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "the loss became non-finite in epoch 1" in result.output
    assert "lower the learning rate (for example --lr 1000)" in result.output
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("normlab").experiment_id])
    assert (run.info.status, run.data.tags["normlab.status"]) == ("FAILED", "failed")
    assert "training diverged at --lr 10000.0" in run.data.tags["normlab.reason"]
    assert client.get_metric_history(run.info.run_id, "train_loss") == []  # no NaN curve
