"""The epoch loop's MLflow calls on their upload thread: in order, and failures not lost."""

from __future__ import annotations

import pytest
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from normlab.tracking.run_log import EpochUploads


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
