"""Issue 15's smaller trust items, on real files, stores and processes: a damaged checkpoint
does not hide a good one, two identical sweeps on a fresh store, --resume into another
experiment, and an unwritable --out refused before any run exists."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from normlab.engine import checkpoint
from normlab.errors import DataError
from tests.conftest import cli_env, run_cli, scratch_folder


def test_a_damaged_checkpoint_is_passed_over_for_a_good_one(tmp_path):
    good, damaged = tmp_path / "local.pt", tmp_path / "artifact.pt"
    checkpoint.save({"epoch": 2, "weights": torch.arange(3.0)}, good)
    damaged.write_bytes(b"PK\x03\x04 not a zip any more")
    path, state = checkpoint.newest(good, damaged)
    assert path == good and state["epoch"] == 2 and state["weights"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(DataError, match="cannot be read"):
        checkpoint.newest(damaged)


def test_two_identical_sweeps_started_together_on_a_fresh_store_both_end_cleanly(small_mnist_dir,
                                                                                 fresh_tracking_uri):
    command = [sys.executable, "-m", "normlab", "sweep", "--norms", "ln", "--epochs", "1",
               "--data-dir", str(small_mnist_dir)]
    processes = [subprocess.Popen(command, cwd=scratch_folder("normlab-cli-"), env=cli_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for process, output in zip(processes, outputs):
        assert "OperationalError" not in output and "Traceback" not in output, output
        assert process.returncode == 0, output
    client = MlflowClient(fresh_tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("normlab").experiment_id])
    finished = [r for r in runs if r.data.tags.get("config_hash") and r.info.status == "FINISHED"]
    assert len(finished) == 1  # one child for the one config, trained once


def test_resume_into_another_experiment_is_refused(small_mnist_dir, tracking_uri):
    done = run_cli("train", "--norm", "ln", "--epochs", "1", "--data-dir", str(small_mnist_dir))
    assert done.returncode == 0, done.stderr
    run_id = MlflowClient(tracking_uri).search_runs(
        [MlflowClient(tracking_uri).get_experiment_by_name("normlab").experiment_id])[0].info.run_id
    refused = run_cli("train", "--resume", run_id, "--experiment", "elsewhere", "--data-dir", str(small_mnist_dir))
    assert refused.returncode == 2
    assert f"run {run_id} is in experiment 'normlab'" in refused.stderr


@pytest.mark.parametrize("command,option", [("sweep", "--out"), ("sweep", "--checkpoint-dir"), ("compare", "--out")])
def test_an_unwritable_folder_is_refused_before_any_run(command, option, small_mnist_dir, tracking_uri, tmp_path):
    """A folder under a file, as typed: named before the data loads or a run is made. A sweep's
    children found their --checkpoint-dir unwritable only at their first epoch, each FAILED
    under a parent run; compare found its --out after reading the runs, with a traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder is wanted")
    folder = blocker / "results"
    args = ("--norms", "ln", "--epochs", "1", "--data-dir", str(small_mnist_dir)) if command == "sweep" else ()
    result = run_cli(command, *args, option, str(folder))
    assert result.returncode == 2, result.stdout + result.stderr
    assert (f"Error: {option} {folder} is not writable (Not a directory); choose another {option} or make it "
            f"writable") in result.stderr
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("normlab")
    assert experiment is None or not client.search_runs([experiment.experiment_id])
