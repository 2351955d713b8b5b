"""How a run ended, in MLflow: its status and normlab's own tags for it. Apart from
run_log, which imports torch, so that a command refused under `mlflow run` fails the run
MLflow made without torch's import (2.7 s on the 2-core CPU)."""

from __future__ import annotations

import sys
import threading

import mlflow
from mlflow.tracking import MlflowClient

from normlab.tracking.connection import _environment, hide_credentialed_links
from normlab.tracking.redaction import redact

STATUS_TAG = "normlab.status"  # running | finished | interrupted | failed: the truth `mlflow run` cannot overwrite

REASON_TAG = "normlab.reason"  # why a run was interrupted or failed, in words

RUN_STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}

# MLflow HTTP calls that try twice with a short timeout: for recording an ending, which must
# not hang for minutes when the server is the reason the run is ending.
FEW_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def record_ending(run_id: str, outcome: str, reason: str | None = None) -> bool:
    """Tag how the run ended (normlab.status, normlab.reason) and set its MLflow status.

    Ends the active run when it is this one. When MLflow cannot be reached, says so on
    stderr and returns False instead of hanging or raising: the reason is already
    on the console and the local checkpoint is intact.
    """
    tags = {STATUS_TAG: outcome}
    if reason:
        tags[REASON_TAG] = redact(reason)[:4000]
    hide_credentialed_links()  # a refused command's ending may come before use_command_defaults
    _stop_system_metrics(run_id)
    with _environment(FEW_RETRIES):
        try:
            client = MlflowClient()
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
            active = mlflow.active_run()
            if active is not None and active.info.run_id == run_id:
                mlflow.end_run(RUN_STATUS[outcome])
            else:
                client.set_terminated(run_id, RUN_STATUS[outcome])
            return True
        except Exception as exc:  # the store is what failed; report and let the caller exit
            print(redact(f"warning: could not record that run {run_id} {outcome} in MLflow ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})"), file=sys.stderr)
            if mlflow.active_run() is not None:  # drop it, so MLflow's atexit hook does not retry
                try:
                    mlflow.end_run(RUN_STATUS[outcome])
                except Exception:
                    pass
            return False


def fail_run_if_open(run_id: str, reason: str) -> None:
    """Mark a run FAILED with the reason, unless it already records how it ended (a run
    `mlflow run` created, whose command failed before or outside training)."""
    with _environment(FEW_RETRIES):
        try:
            tags = MlflowClient().get_run(run_id).data.tags
        except Exception:
            tags = {}
    if tags.get(STATUS_TAG, "running") == "running":
        record_ending(run_id, "failed", reason)


def _stop_system_metrics(run_id: str, wait: float = 5.0) -> None:
    """Stop the run's system-metrics sampler, waiting at most `wait` s: MLflow's own stop (in
    end_run) waits for the sampler's store call, minutes when the tracking server is down."""
    from mlflow.tracking.fluent import run_id_to_system_metrics_monitor

    monitor = run_id_to_system_metrics_monitor.pop(run_id, None)
    if monitor is not None:
        stopper = threading.Thread(target=monitor.finish, name=f"stop-system-metrics-{run_id[:8]}", daemon=True)
        stopper.start()
        stopper.join(wait)
