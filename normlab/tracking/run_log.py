"""Writing one training run: its setup, params and inputs, per-epoch metrics, checkpoints,
how it ended, and what a resume reads back from it. What it logs at its end (artifacts and
model) is results_log's."""

from __future__ import annotations

import logging
import os
import platform
import queue
import threading
import time
from dataclasses import asdict
from pathlib import Path

import mlflow
import torch
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

import normlab
from normlab.engine.config import METRICS, TrainConfig
from normlab.engine.data import DeviceData
from normlab.engine.train import Callbacks, EpochRecord
from normlab.tracking import EXPERIMENT
from normlab.tracking.connection import (
    GIT_COMMIT_TAG,
    experiment_id,
    git_commit,
    mark_model_training,
    run_id_from_env,
)
from normlab.tracking.redaction import redact
from normlab.tracking.run_ending import REASON_TAG, STATUS_TAG
from normlab.tracking.run_query import SPEEDUPS_TAG


def start_training_run(config: TrainConfig, experiment: str = EXPERIMENT, run_id: str | None = None) -> mlflow.ActiveRun:
    """Run `run_id` (a sweep made it), the run `mlflow run` created (MLFLOW_RUN_ID), or a
    new one in `experiment`. The active run is this thread's: runs side by side each start
    their own in their own thread."""
    if run_id:
        run = mlflow.start_run(run_id=run_id, log_system_metrics=_system_metrics())
    else:
        # by id, and for this run only: mlflow.set_experiment(name) that loses a creation race to
        # another process returns without setting it (the run then lands in the Default
        # experiment), and it sets the process's experiment, for every thread and every later run
        in_experiment = experiment_id(experiment) if mlflow.active_run() is None and not run_id_from_env() else None
        run = mlflow.start_run(experiment_id=in_experiment, run_name=config.run_name,
                               log_system_metrics=_system_metrics())
    mlflow.set_tag("mlflow.runName", config.run_name)  # `mlflow run` names runs randomly
    mark_model_training(run.info.experiment_id)
    return run


def _system_metrics() -> bool | None:
    """MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) on, unless
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING says otherwise (None: MLflow reads it). Measured on
    the 2-core CPU: ~20 ms per run and ~18 ms of CPU per 10-s sample, under 0.3% of a run."""
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # not 3 INFO lines a run
    return None if "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING" in os.environ else True


def _same_value(logged: str, ours: str) -> bool:
    """MLflow stores params as strings; '1e-5' (from -P) and '1e-05' (ours) are equal."""
    if logged == ours:
        return True
    try:
        return float(logged) == float(ours)
    except ValueError:
        return False


# Params `mlflow run` logs as the user asked, which normlab resolves to another value: the
# request stays the param; what it resolved to is in the tag `normlab.<name>`.
AS_REQUESTED = ("device",)


def log_params(params: dict[str, object]) -> None:
    """Log params, skipping those `mlflow run` already logged with an equal value.

    MLflow refuses to change a logged param, so re-logging '0.05' over '.05' would fail;
    `device=auto` from `mlflow run` stays (AS_REQUESTED), whatever device auto picked.
    """
    run_id = mlflow.active_run().info.run_id
    existing = MlflowClient().get_run(run_id).data.params
    fresh = {}
    for key, value in params.items():
        text = str(value)
        if key in existing:
            if key not in AS_REQUESTED and not _same_value(existing[key], text):
                raise ValueError(f"param {key} was logged as {existing[key]!r} but the run uses {text!r}")
            continue
        fresh[key] = text
    if fresh:
        mlflow.log_params(fresh)


# Runs side by side start together and log the same dataset input at once; MLflow's store
# looks the dataset up and then inserts it, so simultaneous inserts of one digest collide.
_SETUP_LOCK = threading.Lock()


def log_run_setup(config: TrainConfig, data: DeviceData, model: torch.nn.Module, data_dir: str,
                  speedups: str) -> None:
    """Params, tags and the dataset input: everything needed to reproduce the run, among it the
    techniques it trains with (``speedups``: Speedups.described())."""
    with _SETUP_LOCK:
        _log_run_setup(config, data, model, data_dir, speedups)


def _log_run_setup(config: TrainConfig, data: DeviceData, model: torch.nn.Module, data_dir: str,
                   speedups: str) -> None:
    from normlab.engine.models import count_parameters, summarize

    params: dict[str, object] = dict(asdict(config))
    params.update(
        data_dir=data_dir,
        device=str(data.device),
        parameters=count_parameters(model),
        mult_adds=sum(r.mult_adds for r in summarize(model, config.dataset)),
        train_size=data.train_size,
        test_size=data.test_size,
        augmentation=data.spec.augmentation,
        optimizer="SGD with constant momentum, OneCycleLR on the lr",
    )
    log_params(params)
    tags = {
        "variant": config.label,
        "norm": config.norm,
        "dataset": config.dataset,
        "device": data.device_name,
        "normlab.device": str(data.device),  # what --device auto resolved to
        "normlab.data_dir": str(Path(data_dir).resolve()),  # where a resume finds the data
        SPEEDUPS_TAG: speedups,  # compiled steps, say, add in another order than uncompiled ones
        "config_hash": config.config_hash(),
        "normlab_version": normlab.__version__,
        "torch_version": torch.__version__,
        "mlflow_version": mlflow.__version__,
        "python_version": platform.python_version(),
    }
    # A sweep's child already carries the commit its sweep started with, the code its processes
    # loaded: the tree edited (or committed) while it trains must not relabel it, which split the
    # sweep's comparison by code and made a re-run retrain it.
    commit = mlflow.active_run().data.tags.get(GIT_COMMIT_TAG) or git_commit()
    if commit:
        tags[GIT_COMMIT_TAG] = commit
    mlflow.set_tags(tags)
    try:
        mlflow.log_input(dataset_input(data), context="training")
    except mlflow.exceptions.MlflowException as exc:
        if "UNIQUE constraint failed: datasets" not in str(exc):
            raise
        # another process (a sweep's job) inserted the same dataset a moment ago; it exists now
        mlflow.log_input(dataset_input(data), context="training")


def tag_resumed_speedups(run_id: str, described: str, from_epoch: int) -> None:
    """A resumed run's techniques from ``from_epoch`` on, beside those log_run_setup tagged: a
    run resumed with other ones (a compiled sweep's child resumed by `normlab train`, say)
    keeps both, with the epoch the new ones took over."""
    client = MlflowClient()
    before = client.get_run(run_id).data.tags.get(SPEEDUPS_TAG)
    if before is None:  # a run from before the tag
        value = described
    else:
        *earlier, last = before.split("; from epoch ")
        if (last.split(": ", 1)[-1] if earlier else last) == described:
            return
        value = f"{before}; from epoch {from_epoch}: {described}"
    client.set_tag(run_id, SPEEDUPS_TAG, value)


def dataset_input(data: DeviceData) -> MetaDataset:
    """Name, torchvision's download address as source, and the content digest."""
    source = HTTPDatasetSource(url=data.spec.source)
    return MetaDataset(source=source, name=f"{data.spec.name}-{data.train_size}+{data.test_size}",
                       digest=data.digest)


class EpochUploads:
    """The epoch loop's MLflow calls (metrics, checkpoint upload), made in order on a thread
    of their own, so training does not wait for the store.

    Each call takes ~40 ms on a local sqlite store and more on a server: as long as a
    tenth of an H200 epoch. A call that fails (after MLflow's own retries) is raised in the
    training thread by ``raise_failure``, which MetricLogger calls as each epoch starts, or
    at ``close``: the epoch whose upload failed still ends whole (checkpoint saved, line
    printed) and the next one does not start. Later calls are dropped, since the
    checkpoint's records let a resume log them (``log_missing_epochs``).
    """

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.client = MlflowClient()
        self.busy_seconds = 0.0  # spent in MLflow calls, on the upload thread
        self.waited_seconds = 0.0  # the training thread spent waiting for them in close()
        self._calls: queue.Queue = queue.Queue()
        self.failure: BaseException | None = None  # the first call that failed
        self._failure_raised = False
        self._thread = threading.Thread(target=self._work, name=f"mlflow-{run_id[:8]}", daemon=True)
        self._thread.start()

    def submit(self, call, *args, **kwargs) -> None:
        """Queue a call; after a failure it is dropped. Never raises, so that an epoch's
        callbacks all run (its checkpoint saved, its line printed) even when one of its
        uploads has already failed."""
        self._calls.put((call, args, kwargs))

    def raise_failure(self) -> None:
        """Raise the first call that failed, once."""
        if self.failure is not None and not self._failure_raised:
            self._failure_raised = True
            raise self.failure

    def close(self) -> None:
        """Wait until every queued call is made; raise the first that failed."""
        if self._thread.is_alive():
            start = time.perf_counter()
            self._calls.put(None)
            self._thread.join()
            self.waited_seconds += time.perf_counter() - start
        self.raise_failure()

    def _work(self) -> None:
        while (item := self._calls.get()) is not None:
            call, args, kwargs = item
            if self.failure is not None:
                continue
            start = time.perf_counter()
            try:
                call(*args, **kwargs)
            except BaseException as exc:  # handed to the training thread
                self.failure = exc
            self.busy_seconds += time.perf_counter() - start


class MetricLogger(Callbacks):
    """Logs each epoch's four metrics in one call, with step = epoch (1-based); an upload that
    failed stops training as the next epoch starts."""

    def __init__(self, uploads: EpochUploads):
        self.uploads = uploads

    def epoch_started(self, epoch: int, steps: int) -> None:
        self.uploads.raise_failure()

    def epoch_done(self, record: EpochRecord) -> None:
        timestamp = int(time.time() * 1000)
        metrics = [Metric(k, v, timestamp, record.epoch) for k, v in record.metrics().items()]
        self.uploads.submit(self.uploads.client.log_batch, self.uploads.run_id, metrics=metrics)


CHECKPOINT_ARTIFACT = "checkpoint/last.pt"


def local_checkpoint_path(checkpoint_dir: str | Path, run_id: str) -> Path:
    return Path(checkpoint_dir).expanduser() / run_id / Path(CHECKPOINT_ARTIFACT).name


class Checkpointer(Callbacks):
    """After each epoch: the trainer's state, the data digest and all epoch records, saved to
    local disk first and then as the run's artifact checkpoint/last.pt (replacing the last).

    Put it before MetricLogger: a checkpoint is then never behind the logged metrics, and
    the records it carries let a resume log any epoch whose metrics did not reach MLflow.
    """

    def __init__(self, trainer, uploads: EpochUploads, local_path: Path, records: list[dict] | None = None):
        self.trainer = trainer
        self.uploads = uploads
        self.run_id = uploads.run_id
        self.local_path = local_path
        self.records = list(records or [])
        self.data_digest = trainer.data.digest

    def epoch_done(self, record: EpochRecord) -> None:
        from normlab.engine import checkpoint

        self.records.append(asdict(record))
        state = self.trainer.state_dict()
        state.update(run_id=self.run_id, data_digest=self.data_digest, records=self.records)
        checkpoint.save(state, self.local_path)
        self.uploads.submit(self.uploads.client.log_artifact, self.run_id, str(self.local_path),
                            str(Path(CHECKPOINT_ARTIFACT).parent))


LOG_ARTIFACT = "normlab.log"  # where a run that did not finish keeps its last lines of output


def attach_log(run_id: str, text: str) -> None:
    """Keep a run's last lines of output as its artifact normlab.log (credentials redacted),
    so a failed or stopped sweep child can be read in MLflow; best effort, since a store
    that fails now is usually why the run ended."""
    try:
        MlflowClient().log_text(run_id, redact(text) + "\n", LOG_ARTIFACT)
    except Exception:
        pass


def upload_checkpoint(run_id: str, local_path: Path) -> None:
    """The local checkpoint as the run's artifact checkpoint/last.pt (replacing it)."""
    MlflowClient().log_artifact(run_id, str(local_path), str(Path(CHECKPOINT_ARTIFACT).parent))


def experiment_of(run_id: str) -> str | None:
    """The name of the experiment a run belongs to; None when there is no such run."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        return client.get_experiment(client.get_run(run_id).info.experiment_id).name
    except MlflowException:
        return None


def run_outcome(run_id: str) -> str:
    """What normlab recorded of how the run ended (running, finished, interrupted, failed)."""
    return MlflowClient().get_run(run_id).data.tags.get(STATUS_TAG, "running")


def download_checkpoint(run_id: str, dst_dir: str | Path) -> Path | None:
    """The run's checkpoint artifact, downloaded into dst_dir; None when it has none."""
    names = {f.path for f in MlflowClient().list_artifacts(run_id, str(Path(CHECKPOINT_ARTIFACT).parent))}
    if CHECKPOINT_ARTIFACT not in names:
        return None
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT,
                                                    dst_path=str(dst_dir)))


def logged_steps(run_id: str, metric: str = "train_loss") -> list[int]:
    """The steps (epochs) a run's metric history holds, in order."""
    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, metric))


def log_missing_epochs(run_id: str, records: list[dict]) -> list[int]:
    """Log the records whose epoch has no metrics yet (lost when the store failed mid-epoch)."""
    have = set(logged_steps(run_id))
    missing = [r for r in records if r["epoch"] not in have]
    for r in missing:
        mlflow.log_metrics({k: r[k] for k in METRICS}, step=r["epoch"], run_id=run_id)
    return [r["epoch"] for r in missing]


def resume_training_run(run_id: str, after_epoch: int) -> mlflow.ActiveRun:
    """Reopen an existing run (it becomes RUNNING again) to log its remaining epochs.

    Why it stopped moves from normlab.reason to normlab.resumed (the last resume). Under
    `mlflow run` the run MLflow made for this invocation is noted as a resume of `run_id`;
    its own status is left to `mlflow run`.
    """
    client = MlflowClient()
    previous = client.get_run(run_id).data.tags
    launched = run_id_from_env()
    if launched and launched != run_id:
        client.set_tag(launched, "mlflow.note.content",
                       f"This invocation resumed run {run_id}; its metrics are logged there.")
        client.set_tag(launched, "normlab.resumed_run", run_id)
    run = mlflow.start_run(run_id=run_id, log_system_metrics=_system_metrics())
    mlflow.set_tags({STATUS_TAG: "running", "normlab.resumed": f"after epoch {after_epoch} "
                     f"(it had ended {previous.get(STATUS_TAG, 'without a status tag')}: "
                     f"{previous.get(REASON_TAG, 'no reason recorded')})"})
    if REASON_TAG in previous:
        client.delete_tag(run_id, REASON_TAG)
    return run


def logged_data_dir(run_id: str) -> str | None:
    """The data folder a run trained on: the absolute path it logged (tag normlab.data_dir),
    else its data_dir param (runs from before that tag); None when it logged neither."""
    data = MlflowClient().get_run(run_id).data
    return data.tags.get("normlab.data_dir") or data.params.get("data_dir")


def mark_running() -> None:
    mlflow.set_tag(STATUS_TAG, "running")
