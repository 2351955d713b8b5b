"""A real tracking server that goes away mid-run, and runs training at once against one store."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from contextlib import contextmanager

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from normlab.cli import main
from normlab.engine.checkpoint import load
from tests.conftest import cli_env
from tests.mlflow_server import MlflowServer, free_port
from tests.process_output import Lines

METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")


@contextmanager
def outage(server: MlflowServer):
    """The server is down inside the block, and up again after it, even when the block fails
    (the module's later tests share it)."""
    server.stop()
    try:
        yield
    finally:
        if server.proc is None:
            server.start()


def checkpoint_artifacts(client: MlflowClient, run_id: str) -> list[str]:
    return [f.path for f in client.list_artifacts(run_id, "checkpoint")]


def start_training(data_dir, tmp_path, *args, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "normlab", "train", "--data-dir", str(data_dir),
         "--checkpoint-dir", str(tmp_path / "checkpoints"), *args],
        cwd=tmp_path, env=cli_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def histories(client: MlflowClient, run_id: str) -> dict[str, list[int]]:
    return {m: [x.step for x in client.get_metric_history(run_id, m)] for m in METRICS}


def test_run_rides_out_a_server_restart_with_every_epoch_logged(server, small_mnist_dir, tmp_path):
    """Stop the server after epoch 1 is logged and start it again, on the same port and store,
    once the run is retrying: MLflow's retries (bounded by normlab to about two minutes)
    carry the run through, and every epoch's metrics arrive."""
    proc = start_training(small_mnist_dir, tmp_path, "--epochs", "3", MLFLOW_TRACKING_URI=server.uri)
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    out.wait_for("epoch   1/3", timeout=300)
    with outage(server):
        err.wait_for("Retrying", timeout=120)  # the run met the outage
    assert proc.wait(timeout=300) == 0, err.text
    run_id = out.wait_for(r"^MLflow run (\w+) ", timeout=1).group(1)
    run = MlflowClient(server.uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["normlab.status"] == "finished"
    assert histories(MlflowClient(server.uri), run_id) == {m: [1, 2, 3] for m in METRICS}


def test_longer_outage_stops_with_a_resumable_checkpoint_and_resume_fills_the_gap(
        server, small_mnist_dir, tmp_path, monkeypatch):
    """With retries exhausted (the user's MLFLOW_HTTP_REQUEST_MAX_RETRIES=1 stands for an
    outage longer than the retry window) the run stops with a clear error. Epoch uploads run
    on their own thread, and a failure stops training as the next epoch starts: after epoch 2
    when its uploads fail, else after epoch 3 (or 4, at the end). The local checkpoint holds
    every trained epoch, whose metrics never reached the server.
    Resuming against the restarted server logs them from the checkpoint, then trains the rest."""
    proc = start_training(small_mnist_dir, tmp_path, "--epochs", "4", MLFLOW_TRACKING_URI=server.uri,
                          MLFLOW_HTTP_REQUEST_MAX_RETRIES="1")
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    client = MlflowClient(server.uri)
    out.wait_for("epoch   1/4", timeout=300)
    run_id = out.wait_for(r"^MLflow run (\w+) ", timeout=1).group(1)
    deadline = time.time() + 60
    while time.time() < deadline and (histories(client, run_id) != {m: [1] for m in METRICS}
                                      or checkpoint_artifacts(client, run_id) != ["checkpoint/last.pt"]):
        time.sleep(0.2)  # epoch 1's uploads (metrics, then checkpoint) finish before the outage
    with outage(server):
        assert proc.wait(timeout=120) == 1
    local = tmp_path / "checkpoints" / run_id / "last.pt"
    assert "MLflow failed during training" in err.text
    assert f"checkpointed in {local}; resume with: normlab train --resume {run_id}" in err.text
    trained = load(local)["epoch"]
    assert trained in (2, 3, 4)

    assert histories(client, run_id) == {m: [1] for m in METRICS}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    mlflow.set_tracking_uri(server.uri)
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(main, ["train", "--resume", run_id, "--data-dir", str(small_mnist_dir),
                                           "--device", "cpu", "--checkpoint-dir", str(tmp_path / "checkpoints")])
    finally:
        mlflow.set_tracking_uri(None)
    assert result.exit_code == 0, result.output
    assert f"logged the metrics of epochs {list(range(2, trained + 1))} from the checkpoint" in result.output
    assert histories(client, run_id) == {m: [1, 2, 3, 4] for m in METRICS}
    assert client.get_run(run_id).data.tags["normlab.status"] == "finished"


def train_three_at_once(data_dir, tmp_path, uri, *args: str) -> list[str]:
    """Three training processes started together; returns their run ids once all are done."""
    procs = [start_training(data_dir, tmp_path, "--epochs", "2", "--seed", str(seed), *args, MLFLOW_TRACKING_URI=uri)
             for seed in range(1, 4)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    return [next(l for l in out.splitlines() if l.startswith("MLflow run ")).split()[2] for out, _ in results]


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_runs_at_once_all_finish_with_complete_histories(store, request, small_mnist_dir, tmp_path):
    """A fresh sqlite store (tracking.create_store_safely makes its schema under a lock) or the server."""
    uri = request.getfixturevalue("server").uri if store == "server" else f"sqlite:///{tmp_path / 'mlflow.db'}"
    # a new experiment each: the three processes race to create it
    run_ids = train_three_at_once(small_mnist_dir, tmp_path, uri, "--experiment", f"at-once-{store}")
    client = MlflowClient(uri)
    assert len(set(run_ids)) == 3
    # all in it: mlflow.set_experiment(name), when another process created it first, returned
    # without setting it, so that run went to the Default experiment
    experiment = client.get_experiment_by_name(f"at-once-{store}").experiment_id
    assert {client.get_run(r).info.experiment_id for r in run_ids} == {experiment}
    for run_id in run_ids:
        run = client.get_run(run_id)
        assert (run.info.status, run.data.tags["normlab.status"]) == ("FINISHED", "finished")
        assert histories(client, run_id) == {m: [1, 2] for m in METRICS}


def test_credentials_in_the_tracking_uri_reach_no_tag_param_artifact_or_output(server, small_mnist_dir, tmp_path):
    """MLFLOW_TRACKING_URI=http://USER:SECRET@host:port (the plain server ignores the basic auth
    MLflow sends): a whole `normlab train`, and one against a server that is not there, print
    neither the user nor the password (MLflow's own "View run at" links are built from the
    whole URI), and the server's database and artifact folder, which hold every tag, param,
    metric, artifact and logged model, contain neither."""
    user, secret = f"alice{uuid.uuid4().hex[:6]}", f"s3cret-{uuid.uuid4().hex}"
    uri = server.uri.replace("http://", f"http://{user}:{secret}@")
    proc = start_training(small_mnist_dir, tmp_path, "--epochs", "1", MLFLOW_TRACKING_URI=uri)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    run_id = next(l for l in out.splitlines() if l.startswith("MLflow run ")).split()[2]
    run = MlflowClient(server.uri).get_run(run_id)
    assert run.data.tags["normlab.status"] == "finished" and "model_uri" in run.data.tags
    assert secret not in out + err and user not in out + err

    stored = [p for p in server.root.rglob("*") if p.is_file() and p != server.log]
    assert {"MLmodel", "last.pt", "misclassified.json"} <= {p.name for p in stored}
    assert [p for p in stored if secret.encode() in p.read_bytes() or user.encode() in p.read_bytes()] == []

    nowhere = f"http://{user}:{secret}@127.0.0.1:{free_port()}"
    proc = start_training(small_mnist_dir, tmp_path, MLFLOW_TRACKING_URI=nowhere)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "the MLflow tracking server http://***@127.0.0.1:" in err and "cannot be reached" in err
    assert secret not in out + err and user not in out + err


def test_a_server_that_refuses_this_host_is_reported_before_data_loads(tmp_path, monkeypatch):
    """MLflow's security middleware answers /health but refuses every API call whose Host
    header it was not told to allow (403 Invalid Host header): normlab's reachability check
    makes an API call, so the run stops at once with the server's reason, not after loading
    data. The server is started with --allowed-hosts through its environment variable
    (MLFLOW_SERVER_ALLOWED_HOSTS is what that option reads)."""
    monkeypatch.setenv("MLFLOW_SERVER_ALLOWED_HOSTS", "mlflow.example.org")
    refusing = MlflowServer(tmp_path / "server")
    refusing.root.mkdir()
    refusing.start()
    try:
        assert "Allowed hosts: mlflow.example.org" in refusing.log.read_text()
        data = tmp_path / "never-created"  # loading data would create it (and try to download)
        start = time.monotonic()
        proc = start_training(data, tmp_path, MLFLOW_TRACKING_URI=refusing.uri)
        out, err = proc.communicate(timeout=120)
        assert time.monotonic() - start < 60
    finally:
        refusing.stop()
    assert proc.returncode == 1, err[-3000:]
    assert (f"the MLflow tracking server {refusing.uri} refuses normlab's requests: HTTP 403 "
            f"'Invalid Host header - possible DNS rebinding attack detected'") in err
    assert "--allowed-hosts must list the host name in MLFLOW_TRACKING_URI (127.0.0.1)" in err
    assert "Traceback" not in err and not data.exists()
