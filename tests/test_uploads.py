"""The epoch loop's MLflow calls on their upload thread: in order, and failures not lost."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from normlab.engine.config import TrainConfig
from normlab.engine.train import EpochRecord
from normlab.tracking.run_log import EpochUploads, MetricLogger


def test_calls_are_made_in_order_and_all_are_made_by_close(tracking_uri):
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("uploads")).info.run_id
    uploads = EpochUploads(run_id)
    for epoch in range(1, 6):
        uploads.submit(client.log_batch, run_id, metrics=[Metric("test_acc", 90.0 + epoch, 0, epoch)])
    uploads.close()
    history = client.get_metric_history(run_id, "test_acc")
    assert [(m.step, m.value) for m in history] == [(e, 90.0 + e) for e in range(1, 6)]
    assert uploads.busy_seconds > 0


def test_a_failed_call_is_raised_in_the_training_thread_and_later_calls_are_dropped(tracking_uri):
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("uploads")).info.run_id
    uploads = EpochUploads(run_id)
    uploads.submit(client.log_batch, "no-such-run", metrics=[Metric("test_acc", 1.0, 0, 1)])
    uploads.submit(client.log_batch, run_id, metrics=[Metric("test_acc", 2.0, 0, 2)])
    with pytest.raises(MlflowException, match="no-such-run"):
        uploads.close()
    assert client.get_metric_history(run_id, "test_acc") == []  # dropped: a resume logs it from the checkpoint


def test_a_failed_upload_lets_its_epoch_end_and_stops_the_next_one_from_starting(tracking_uri):
    """Seen in CI: the store died as the last epoch ended, its checkpoint upload failed before
    its metrics were queued, and raising at that submit left the trained, checkpointed epoch
    unprinted. Queuing never raises; the failure is raised as the next epoch starts."""
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("uploads")).info.run_id
    uploads = EpochUploads(run_id)
    logger = MetricLogger(uploads)
    logger.epoch_started(1, 10)
    uploads.submit(client.log_artifact, "no-such-run", __file__)  # epoch 1's checkpoint
    deadline = time.monotonic() + 30
    while uploads.failure is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert uploads.failure is not None
    logger.epoch_done(EpochRecord(1, 0.5, 80.0, 0.4, 85.0, 0.01, 1.0))  # queued, not raised
    with pytest.raises(MlflowException, match="no-such-run"):
        logger.epoch_started(2, 10)
    uploads.close()  # raised once: the ending is recorded without a second error
    assert client.get_metric_history(run_id, "test_acc") == []  # dropped: a resume logs it from the checkpoint


def test_the_results_warm_up_is_paid_once_and_a_run_ending_meanwhile_waits_for_it(monkeypatch):
    """On a GPU the first run's one-time artifact costs are paid on a background thread while
    it trains; a run whose log_results comes first must wait for that, not pay them again."""
    import threading
    import time

    from normlab.tracking import results_log

    warm_ups, warming = [], threading.Event()

    def slow_warm_up():
        warming.set()
        time.sleep(0.3)
        warm_ups.append(1)

    monkeypatch.setattr(results_log, "warm_up_model_saving", slow_warm_up)
    monkeypatch.setattr(results_log, "_results_logging_warmed", False)
    exported = threading.Event()
    monkeypatch.setattr(results_log, "export_ahead", lambda config, example: exported.set())
    results_log.warm_up_results_logging_in_background(TrainConfig(norm="ln"), SimpleNamespace(example_input=list))
    assert warming.wait(30)
    results_log.warm_up_results_logging()  # what log_results calls first
    assert warm_ups == [1]  # done, and only once
    results_log.warm_up_results_logging()
    assert warm_ups == [1]
    assert exported.wait(30)  # then the run's architecture, on the same thread


def test_a_logged_model_requires_this_torch_and_mlflow_without_scanning_the_installed_packages(
        tracking_uri, small_mnist_dir, monkeypatch):
    """MLflow's saving checks the requirements it writes against every installed distribution
    (a scan of 0.7 s, once per process); normlab's are this process's torch and MLflow, which
    that check passes, so saving skips it: the logged requirements are those, and no scan ran."""
    import mlflow
    import torch
    from mlflow.utils import requirements_utils

    from normlab.engine.config import architecture_key
    from normlab.engine.data import DeviceData, load_raw
    from normlab.engine.models import Net
    from normlab.tracking import results_log

    data = DeviceData(load_raw("mnist", str(small_mnist_dir)), torch.device("cpu"))
    config = TrainConfig(norm="ln", epochs=1)
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)  # as in a new process
    monkeypatch.setattr(requirements_utils, "_PACKAGES_TO_MODULES", None)
    with mlflow.start_run():
        model_id = results_log.log_model(Net(config.dataset, config.norm, config.groups, config.dropout), data,
                                         architecture=architecture_key(config))
    assert requirements_utils._MODULES_TO_PACKAGES is None  # nothing scanned
    logged = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}")) / "requirements.txt"
    version = torch.__version__.split("+")[0]
    assert logged.read_text().split() == [f"torch=={version}", f"mlflow=={mlflow.__version__}"]
    # what the skipped check would have found, scanning: nothing to warn of
    met = [requirements_utils._check_requirement_satisfied(r) for r in results_log.model_requirements()]
    assert met == [None, None]


def test_a_model_exported_ahead_is_logged_with_its_own_weights_and_traced_no_more(tracking_uri, small_mnist_dir,
                                                                                 monkeypatch):
    """export_ahead traces a run's architecture while it trains; its log_model at the end then
    traces nothing, and logs a program that predicts what a program traced from the trained
    model itself predicts, bit for bit, though that model trained in channels-last order."""
    import mlflow
    import mlflow.pytorch
    import torch

    from normlab.engine.config import architecture_key
    from normlab.engine.data import DeviceData, load_raw
    from normlab.engine.models import Net
    from normlab.tracking import results_log

    data = DeviceData(load_raw("mnist", str(small_mnist_dir)), torch.device("cpu"))
    config = TrainConfig(norm="gn", epochs=1)
    traces, export = [], torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *args, **kwargs: traces.append(1) or export(*args, **kwargs))
    monkeypatch.setattr(results_log, "_EXPORTED", {})
    results_log.export_ahead(config, data.example_input())
    results_log.export_ahead(config, data.example_input())
    assert len(traces) == 1  # once per architecture

    torch.manual_seed(7)
    trained = Net(config.dataset, config.norm, config.groups, config.dropout)  # weights other than export_ahead's
    trained.to(memory_format=torch.channels_last)  # as the engine trains GN on the CPU (Speedups.channels_last)
    predicted = []
    for kept in (True, False):
        if not kept:
            monkeypatch.setattr(results_log, "_EXPORTED", {})
        with mlflow.start_run():
            model_id = results_log.log_model(trained, data, name="gn-s1", architecture=architecture_key(config))
        with torch.no_grad():
            predicted.append(mlflow.pytorch.load_model(f"models:/{model_id}")(data.test_x[:64]))
    assert len(traces) == 2  # the kept program served the first log_model; the second traced anew
    assert torch.equal(predicted[0], predicted[1])
    with torch.no_grad():
        assert torch.allclose(predicted[0], trained.eval()(data.test_x[:64]), atol=1e-5)
