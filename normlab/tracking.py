"""The only code that talks to MLflow: run setup, params, metrics, inputs, artifacts."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.tracking import MlflowClient

import normlab
from normlab import plots
from normlab.data import DeviceData
from normlab.models import summary_text
from normlab.train import Callbacks, EpochRecord, FitResult, TrainConfig

EXPERIMENT = "normlab"
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")
PACKAGE_DIR = Path(normlab.__file__).parent


def git_commit() -> str | None:
    """The commit of the normlab checkout, with '-dirty' when it has local changes."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True,
                                  check=True, timeout=5).stdout.strip()
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--", ".") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def start_training_run(config: TrainConfig, experiment: str = EXPERIMENT) -> mlflow.ActiveRun:
    """The run `mlflow run` already created (MLFLOW_RUN_ID), or a new one in `experiment`."""
    if mlflow.active_run() is None and not _run_id_from_env():
        mlflow.set_experiment(experiment)
    run = mlflow.start_run(run_name=config.run_name)
    mlflow.set_tag("mlflow.runName", config.run_name)  # `mlflow run` names runs randomly
    return run


def _run_id_from_env() -> str | None:
    from mlflow.environment_variables import MLFLOW_RUN_ID

    return MLFLOW_RUN_ID.get()


def _same_value(logged: str, ours: str) -> bool:
    """MLflow stores params as strings; '1e-5' (from -P) and '1e-05' (ours) are equal."""
    if logged == ours:
        return True
    try:
        return float(logged) == float(ours)
    except ValueError:
        return False


def log_params(params: dict[str, object]) -> None:
    """Log params, skipping those `mlflow run` already logged with an equal value.

    MLflow refuses to change a logged param, so re-logging '0.05' over '.05' would fail.
    """
    run_id = mlflow.active_run().info.run_id
    existing = MlflowClient().get_run(run_id).data.params
    fresh = {}
    for key, value in params.items():
        text = str(value)
        if key in existing:
            if not _same_value(existing[key], text):
                raise ValueError(f"param {key} was logged as {existing[key]!r} but the run uses {text!r}")
            continue
        fresh[key] = text
    if fresh:
        mlflow.log_params(fresh)


def log_run_setup(config: TrainConfig, data: DeviceData, model: torch.nn.Module, data_dir: str) -> None:
    """Params, tags and the dataset input: everything needed to reproduce the run."""
    from normlab.models import count_parameters, summarize

    params: dict[str, object] = dict(asdict(config))
    params.update(
        data_dir=data_dir,
        device=str(data.device),
        parameters=count_parameters(model),
        mult_adds=sum(r.mult_adds for r in summarize(model, config.dataset)),
        train_size=data.train_size,
        test_size=data.test_size,
        augmentation=data.spec.augmentation,
        optimizer="SGD momentum, OneCycleLR",
    )
    log_params(params)
    tags = {
        "variant": config.label,
        "norm": config.norm,
        "dataset": config.dataset,
        "device": torch.cuda.get_device_name(data.device) if data.device.type == "cuda" else platform.processor() or "cpu",
        "config_hash": config.config_hash(),
        "normlab_version": normlab.__version__,
        "torch_version": torch.__version__,
        "mlflow_version": mlflow.__version__,
        "python_version": platform.python_version(),
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    mlflow.set_tags(tags)
    mlflow.log_input(dataset_input(data), context="training")


def dataset_input(data: DeviceData) -> MetaDataset:
    """Name, torchvision's download address as source, and the content digest."""
    source = HTTPDatasetSource(url=data.spec.source)
    return MetaDataset(source=source, name=f"{data.spec.name}-{data.train_size}+{data.test_size}",
                       digest=data.raw.digest())


class MetricLogger(Callbacks):
    """Logs each epoch's four metrics in one call, with step = epoch (1-based)."""

    def epoch_done(self, record: EpochRecord) -> None:
        mlflow.log_metrics(record.metrics(), step=record.epoch)


def log_results(config: TrainConfig, data: DeviceData, result: FitResult) -> None:
    """Artifacts at the end of a run: misclassified grid and list, summary, the model."""
    mistakes = result.mistakes
    title = f"{config.label}: most confident mistakes on {config.dataset} test ({len(mistakes)})"
    images = data.raw.test_images[[m.index for m in mistakes]].permute(0, 2, 3, 1).numpy()
    figure = plots.misclassified_grid(images, [m.true for m in mistakes], [m.pred for m in mistakes],
                                      data.spec.classes, title)
    mlflow.log_figure(figure, "misclassified.png")
    import matplotlib.pyplot as plt

    plt.close(figure)
    mlflow.log_dict([asdict(m) for m in mistakes], "misclassified.json")
    mlflow.log_text(summary_text(result.model, config.dataset), "model_summary.txt")
    log_model(result.model, data)


def log_model(model: torch.nn.Module, data: DeviceData) -> None:
    """The trained model with its source code, so `mlflow.pytorch.load_model` works anywhere."""
    model = model.cpu().eval()
    example = data.test_x[:2].cpu().numpy().astype(np.float32)
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        input_example=example,
        code_paths=[str(PACKAGE_DIR)],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
    )
    mlflow.set_tag("model_uri", info.model_uri)



# --- Reliability: reachability, retries, how a run ended, checkpoints, resume ----------------

STATUS_TAG = "normlab.status"  # running | finished | interrupted | failed: the truth `mlflow run` cannot overwrite
REASON_TAG = "normlab.reason"  # why a run was interrupted or failed, in words
RUN_STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}
CHECKPOINT_ARTIFACT = "checkpoint/last.pt"
# Ride out tracking-server outages of up to ~2 min (urllib3 waits 0, 2, 4, 8, 16, 32, 64 s
# between attempts), then stop with a clear error and a resumable local checkpoint.
# MLflow's own default (factor 2, 120 s timeout) keeps a run hanging for 4 minutes or more.
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


class TrackingUnreachable(RuntimeError):
    """The tracking server does not answer; the message says which URI and what to do."""


def use_bounded_http_retries() -> None:
    """Apply HTTP_RETRY_DEFAULTS where the user has not chosen their own values, and show
    each retry on stderr (urllib3 logs them to a NullHandler), so an outage is visible."""
    for name, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    retries = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(h, _RetryReporter) for h in retries.handlers):
        retries.addHandler(_RetryReporter())


class _RetryReporter(logging.Handler):
    """urllib3's retry warnings, written to whatever sys.stderr is at the time."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(asctime)s tracking server did not answer; %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


def check_tracking_reachable(timeout: float = 5.0) -> None:
    """Fail within seconds, before any data is loaded, when an http(s) tracking server does
    not answer its /health (MLflow's own retries would take minutes to give up)."""
    import requests

    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=timeout).raise_for_status()
        except requests.RequestException as exc:
            raise TrackingUnreachable(
                f"the MLflow tracking server {uri} cannot be reached ({type(exc).__name__}); start it, "
                f"or point MLFLOW_TRACKING_URI at one that runs (unset it for a local store)") from exc


def create_store_safely() -> None:
    """Create a new sqlite store under a file lock: runs started together on a fresh store
    otherwise race on its schema migrations and all fail."""
    import fcntl

    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///"):].split("?")[0])
    try:
        lock = open(db.with_name(db.name + ".lock"), "w")
    except OSError as exc:
        raise TrackingUnreachable(f"the sqlite tracking store {uri} cannot be created here ({exc}); "
                                  f"point MLFLOW_TRACKING_URI at a writable folder") from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient().search_experiments(max_results=1)  # creates and migrates the schema


@contextmanager
def _few_retries():
    """Within: MLflow HTTP calls try twice with a short timeout (for recording an ending,
    which must not hang for minutes when the server is the reason the run is ending)."""
    settings = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def record_ending(run_id: str, outcome: str, reason: str | None = None) -> bool:
    """Tag how the run ended (normlab.status, normlab.reason) and set its MLflow status.

    Ends the active run when it is this one. When MLflow cannot be reached, says so on
    stderr and returns False instead of hanging or raising: the reason is already
    on the console and the local checkpoint is intact.
    """
    tags = {STATUS_TAG: outcome}
    if reason:
        tags[REASON_TAG] = reason[:4000]
    with _few_retries():
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
            print(f"warning: could not record that run {run_id} {outcome} in MLflow ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0] if str(exc) else ''})", file=sys.stderr)
            if mlflow.active_run() is not None:  # drop it, so MLflow's atexit hook does not retry
                try:
                    mlflow.end_run(RUN_STATUS[outcome])
                except Exception:
                    pass
            return False


def fail_run_if_open(run_id: str, reason: str) -> None:
    """Mark a run FAILED with the reason, unless it already records how it ended (a run
    `mlflow run` created, whose command failed before or outside training)."""
    with _few_retries():
        try:
            tags = MlflowClient().get_run(run_id).data.tags
        except Exception:
            tags = {}
    if tags.get(STATUS_TAG, "running") == "running":
        record_ending(run_id, "failed", reason)


def local_checkpoint_path(checkpoint_dir: str | Path, run_id: str) -> Path:
    return Path(checkpoint_dir).expanduser() / run_id / Path(CHECKPOINT_ARTIFACT).name


class Checkpointer(Callbacks):
    """After each epoch: the trainer's state, the data digest and all epoch records, saved to
    local disk first and then as the run's artifact checkpoint/last.pt (replacing the last).

    Put it before MetricLogger: a checkpoint is then never behind the logged metrics, and
    the records it carries let a resume log any epoch whose metrics did not reach MLflow.
    """

    def __init__(self, trainer, run_id: str, local_path: Path, records: list[dict] | None = None):
        self.trainer = trainer
        self.run_id = run_id
        self.local_path = local_path
        self.records = list(records or [])
        self.data_digest = trainer.data.raw.digest()

    def epoch_done(self, record: EpochRecord) -> None:
        from normlab import checkpoint

        self.records.append(asdict(record))
        state = self.trainer.state_dict()
        state.update(run_id=self.run_id, data_digest=self.data_digest, records=self.records)
        checkpoint.save(state, self.local_path)
        mlflow.log_artifact(str(self.local_path), artifact_path=str(Path(CHECKPOINT_ARTIFACT).parent))


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
    launched = _run_id_from_env()
    if launched and launched != run_id:
        MlflowClient().set_tag(launched, "mlflow.note.content",
                               f"This invocation resumed run {run_id}; its metrics are logged there.")
        MlflowClient().set_tag(launched, "normlab.resumed_run", run_id)
    run = mlflow.start_run(run_id=run_id)
    mlflow.set_tags({STATUS_TAG: "running", "normlab.resumed": f"after epoch {after_epoch} "
                     f"(it had ended {previous.get(STATUS_TAG, 'without a status tag')}: "
                     f"{previous.get(REASON_TAG, 'no reason recorded')})"})
    if REASON_TAG in previous:
        client.delete_tag(run_id, REASON_TAG)
    return run


def require_run(run_id: str) -> None:
    """Raise a clear error when the tracking store has no such run."""
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise LookupError(f"no run {run_id!r} in the tracking store {mlflow.get_tracking_uri()} "
                          f"({str(exc).splitlines()[0]})") from exc


def mark_running() -> None:
    mlflow.set_tag(STATUS_TAG, "running")
