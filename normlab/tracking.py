"""The only code that talks to MLflow: run setup, params, metrics, inputs, artifacts."""

from __future__ import annotations

import logging
import os
import platform
import queue
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

import normlab
from normlab import plots
from normlab.data import DeviceData
from normlab.models import summary_text
from normlab.redaction import redact
from normlab.train import TRACING_LOCK, Callbacks, EpochRecord, FitResult, TrainConfig

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


def experiment_id(name: str, client: MlflowClient | None = None) -> str:
    """The id of experiment ``name``, created when missing (or when another process created
    it a moment before); a deleted one is refused with how to restore it."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    client = client or MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "deleted":
        raise MlflowException(f"experiment {name!r} is deleted; restore it "
                              f"(mlflow experiments restore) or choose another --experiment")
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(name).experiment_id


def start_training_run(config: TrainConfig, experiment: str = EXPERIMENT, run_id: str | None = None) -> mlflow.ActiveRun:
    """Run `run_id` (a sweep made it), the run `mlflow run` created (MLFLOW_RUN_ID), or a
    new one in `experiment`. The active run is this thread's: runs side by side each start
    their own in their own thread."""
    if run_id:
        run = mlflow.start_run(run_id=run_id, log_system_metrics=_system_metrics())
    else:
        if mlflow.active_run() is None and not _run_id_from_env():
            # by id: mlflow.set_experiment(name) that loses a creation race to another process
            # returns without setting it, and the run lands in the Default experiment
            mlflow.set_experiment(experiment_id=experiment_id(experiment))
        run = mlflow.start_run(run_name=config.run_name, log_system_metrics=_system_metrics())
    mlflow.set_tag("mlflow.runName", config.run_name)  # `mlflow run` names runs randomly
    mark_model_training(run.info.experiment_id)
    return run


def _system_metrics() -> bool | None:
    """MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) on, unless
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING says otherwise (None: MLflow reads it). Measured on
    the 2-core CPU: ~20 ms per run and ~18 ms of CPU per 10-s sample, under 0.3% of a run."""
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # not 3 INFO lines a run
    return None if "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING" in os.environ else True


def _stop_system_metrics(run_id: str, wait: float = 5.0) -> None:
    """Stop the run's system-metrics sampler, waiting at most `wait` s: MLflow's own stop (in
    end_run) waits for the sampler's store call, minutes when the tracking server is down."""
    from mlflow.tracking.fluent import run_id_to_system_metrics_monitor

    monitor = run_id_to_system_metrics_monitor.pop(run_id, None)
    if monitor is not None:
        stopper = threading.Thread(target=monitor.finish, name=f"stop-system-metrics-{run_id[:8]}", daemon=True)
        stopper.start()
        stopper.join(wait)


# MLflow's experiment kind: `custom_model_development` is its model-training view (runs,
# metric charts, logged models) rather than the GenAI view (traces, evaluations).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
_KIND_CHECKED: set[str] = set()


def mark_model_training(experiment_id: str) -> None:
    """Tag the experiment as model training, unless someone chose its kind already (a kind
    MLflow inferred, ending in `_inferred`, is not a choice). Once per experiment and process."""
    if experiment_id in _KIND_CHECKED:
        return
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    kind = client.get_experiment(experiment_id).tags.get(EXPERIMENT_KIND_TAG, "")
    if kind in ("", "no_inferred_type") or kind.endswith("_inferred"):
        try:
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        except MlflowException:  # runs starting together: another one's insert came first
            if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
                raise
    _KIND_CHECKED.add(experiment_id)


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


def log_run_setup(config: TrainConfig, data: DeviceData, model: torch.nn.Module, data_dir: str) -> None:
    """Params, tags and the dataset input: everything needed to reproduce the run."""
    with _SETUP_LOCK:
        _log_run_setup(config, data, model, data_dir)


def _log_run_setup(config: TrainConfig, data: DeviceData, model: torch.nn.Module, data_dir: str) -> None:
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
        "normlab.device": str(data.device),  # what --device auto resolved to
        "normlab.data_dir": str(Path(data_dir).resolve()),  # where a resume finds the data
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
    try:
        mlflow.log_input(dataset_input(data), context="training")
    except mlflow.exceptions.MlflowException as exc:
        if "UNIQUE constraint failed: datasets" not in str(exc):
            raise
        # another process (a sweep's job) inserted the same dataset a moment ago; it exists now
        mlflow.log_input(dataset_input(data), context="training")


def dataset_input(data: DeviceData) -> MetaDataset:
    """Name, torchvision's download address as source, and the content digest."""
    source = HTTPDatasetSource(url=data.spec.source)
    return MetaDataset(source=source, name=f"{data.spec.name}-{data.train_size}+{data.test_size}",
                       digest=data.raw.digest())


class EpochUploads:
    """The epoch loop's MLflow calls (metrics, checkpoint upload), made in order on a thread
    of their own, so training does not wait for the store.

    Each call takes ~40 ms on a local sqlite store and more on a server: as long as a
    tenth of an H200 epoch. A call that fails (after MLflow's own retries) is raised in the
    training thread at its next ``submit`` or at ``close``, where it would have been raised
    had it been made in place; later calls are then dropped, since the checkpoint's records
    let a resume log them (``log_missing_epochs``).
    """

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.client = MlflowClient()
        self.busy_seconds = 0.0  # spent in MLflow calls, on the upload thread
        self.waited_seconds = 0.0  # the training thread spent waiting for them in close()
        self._calls: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name=f"mlflow-{run_id[:8]}", daemon=True)
        self._thread.start()

    def submit(self, call, *args, **kwargs) -> None:
        self._raise_error()
        self._calls.put((call, args, kwargs))

    def close(self) -> None:
        """Wait until every queued call is made; raise the first that failed."""
        if self._thread.is_alive():
            start = time.perf_counter()
            self._calls.put(None)
            self._thread.join()
            self.waited_seconds += time.perf_counter() - start
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _work(self) -> None:
        while (item := self._calls.get()) is not None:
            call, args, kwargs = item
            if self._error is not None:
                continue
            start = time.perf_counter()
            try:
                call(*args, **kwargs)
            except BaseException as exc:  # handed to the training thread
                self._error = exc
            self.busy_seconds += time.perf_counter() - start


class MetricLogger(Callbacks):
    """Logs each epoch's four metrics in one call, with step = epoch (1-based)."""

    def __init__(self, uploads: EpochUploads):
        self.uploads = uploads

    def epoch_done(self, record: EpochRecord) -> None:
        timestamp = int(time.time() * 1000)
        metrics = [Metric(k, v, timestamp, record.epoch) for k, v in record.metrics().items()]
        self.uploads.submit(self.uploads.client.log_batch, self.uploads.run_id, metrics=metrics)


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
    model_id = log_model(result.model, data, name=config.run_name)
    link_final_metrics(mlflow.active_run().info.run_id, model_id)


MODEL_METRICS = ("test_acc", "test_loss")  # the columns of MLflow's models table


def link_final_metrics(run_id: str, model_id: str) -> None:
    """Link the run's last test accuracy and loss to its logged model, so the models table
    compares models by them. They are logged again with the step, time and value they have,
    which the SQL store (sqlite, server) keeps as one entry: the histories gain nothing."""
    client = MlflowClient()
    final = []
    for key in MODEL_METRICS:
        history = client.get_metric_history(run_id, key)
        if history:
            last = max(history, key=lambda m: (m.step, m.timestamp))
            final.append(Metric(key, last.value, last.timestamp, last.step, model_id=model_id))
    if final:
        client.log_batch(run_id, metrics=final)


@contextmanager
def _environment(settings: dict[str, str], keep_users: bool = False):
    """Within: these environment variables set (with ``keep_users``, only those not set
    already); afterwards each is as it was."""
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update({k: v for k, v in settings.items() if not (keep_users and saved[k] is not None)})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# MLflow checks the input example by loading the model on the GPU when there is one, which
# a model exported from the CPU cannot do (a warning for every GPU run): check on the CPU,
# unless the user chose a device.
CHECK_ON_CPU = {"MLFLOW_DEFAULT_PREDICTION_DEVICE": "cpu"}


def log_model(model: torch.nn.Module, data: DeviceData, name: str = "model") -> str:
    """The trained model as a torch.export program (pt2), so `mlflow.pytorch.load_model` works
    anywhere without normlab's code; named after the run (`gn2-s1`), as the models table lists
    it. Returns its model id. No code_paths: MLflow would put the artifact's code/ first on the
    loader's sys.path, so whoever can write to the store could run code as normlab there."""
    model = model.cpu().eval()
    example = data.test_x[:2].cpu().numpy().astype(np.float32)
    with TRACING_LOCK, _environment(CHECK_ON_CPU, keep_users=True):  # torch.export traces
        info = mlflow.pytorch.log_model(
            model,
            name=name,
            input_example=example,
            serialization_format="pt2",  # not pickle (MLflow's default on Databricks), which needs the code
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        )
    mlflow.set_tag("model_uri", info.model_uri)
    return info.model_id



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
    hide_credentialed_links()
    retries = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(h, _RetryReporter) for h in retries.handlers):
        retries.addHandler(_RetryReporter())


def hide_credentialed_links() -> None:
    """When the tracking URI carries a user or password, stop MLflow printing its "View run
    at" links, which it builds from the whole URI, secret included, on every run it ends."""
    from urllib.parse import urlsplit

    uri = urlsplit(mlflow.get_tracking_uri())
    if uri.username or uri.password:
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


class _RetryReporter(logging.Handler):
    """urllib3's retry warnings, written to whatever sys.stderr is at the time."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(asctime)s tracking server did not answer; %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        print(redact(self.format(record)), file=sys.stderr, flush=True)


# What a refusing server's status means for the user, by HTTP status.
REFUSAL_ADVICE = {
    401: "it asks for credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
         "(MLflow's basic-auth app) or MLFLOW_TRACKING_TOKEN",
    403: "it refuses this client: a server started with --allowed-hosts must list the host name "
         "in MLFLOW_TRACKING_URI ({host}); with authentication, this user needs permission",
}


def check_tracking_reachable(timeout: float = 5.0) -> None:
    """Fail within seconds, before any data is loaded, when an http(s) tracking server does
    not answer or refuses normlab's calls, with the server's reason. It makes an API call
    (experiments/search, as a run does) with the credentials MLflow sends: a server whose
    security middleware or authentication refuses every API call (403 Invalid Host header,
    401) still answers /health. MLflow's own retries would take minutes to give up."""
    from urllib.parse import urlsplit

    from mlflow.tracking._tracking_service.utils import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                                max_retries=0, timeout=timeout, raise_on_status=False,
                                params={"max_results": 1})
    except Exception as exc:  # MLflow wraps the connection error (refused, DNS, TLS, timeout)
        cause = exc.__cause__ or exc.__context__ or exc
        raise TrackingUnreachable(
            f"the MLflow tracking server {redact(uri)} cannot be reached ({type(cause).__name__}); start it, "
            f"or point MLFLOW_TRACKING_URI at one that runs (unset it for a local store)") from None
    if not response.ok:
        reason = " ".join(response.text.split())[:300] or response.reason
        advice = REFUSAL_ADVICE.get(response.status_code, "see the server's log").format(
            host=urlsplit(uri).hostname)
        raise TrackingUnreachable(redact(
            f"the MLflow tracking server {uri} refuses normlab's requests: HTTP {response.status_code} "
            f"{reason!r}; {advice}"))


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
    hide_credentialed_links()  # a refused command's ending may come before use_bounded_http_retries
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


def local_checkpoint_path(checkpoint_dir: str | Path, run_id: str) -> Path:
    return Path(checkpoint_dir).expanduser() / run_id / Path(CHECKPOINT_ARTIFACT).name


def check_checkpoint_dir(checkpoint_dir: str | Path) -> None:
    """Refuse a --checkpoint-dir where no file can be written, before data loads: otherwise
    the first epoch trains and then fails at its checkpoint. Creates the folder, as the
    first checkpoint would."""
    import tempfile

    from normlab.models import ConfigError

    folder = Path(checkpoint_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"--checkpoint-dir {folder} is not writable ({exc.strerror or exc}); choose "
                          f"another --checkpoint-dir or make it writable") from exc


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
        self.data_digest = trainer.data.raw.digest()

    def epoch_done(self, record: EpochRecord) -> None:
        from normlab import checkpoint

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
    from normlab.redaction import redact

    try:
        MlflowClient().log_text(run_id, redact(text) + "\n", LOG_ARTIFACT)
    except Exception:
        pass


def tracking_uri() -> str:
    """The store this process logs to (MLFLOW_TRACKING_URI, else MLflow's default)."""
    return mlflow.get_tracking_uri()


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
    launched = _run_id_from_env()
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


def require_run(run_id: str) -> None:
    """Raise a clear error when the tracking store has no such run."""
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise LookupError(redact(f"no run {run_id!r} in the tracking store {mlflow.get_tracking_uri()} "
                                 f"({str(exc).splitlines()[0]})")) from exc


def mark_running() -> None:
    mlflow.set_tag(STATUS_TAG, "running")


# --- Reading runs back: selection, tidy histories, artifacts, logging a comparison ---

TRAINING_RUN_TAG = "variant"  # set by log_run_setup; sweep parents and comparison runs lack it
COMPARISON_ARTIFACT_DIR = "comparison"
# Settings that are not part of a variant's name; when they differ between the selected
# runs, the variant label says so ("LN, batch 64") rather than averaging unlike runs as seeds.
DISTINGUISHING = {"dataset": "{}".format, "epochs": lambda n: f"{n} epoch{'' if n == 1 else 's'}",
                  "batch_size": "batch {}".format, "lr": "lr {:g}".format, "momentum": "momentum {:g}".format,
                  "dropout": "dropout {:g}".format}
RUN_COLUMNS = ("run_id", "variant", "norm", "l1", "groups", "batch_size", "seed", "status")


class SelectionError(LookupError):
    """The runs asked for cannot be compared (none match, unknown name, bad filter)."""


@dataclass(frozen=True)
class Selection:
    runs: list  # mlflow.entities.Run, the training runs to compare
    left_out: list  # training runs that matched but are not FINISHED (and were not asked for)
    searched: str  # what was searched, for messages: "experiment 'normlab', parent run abc"


MLFLOW_DEFAULT_EXPERIMENT = "Default"  # where MLflow puts runs that name no experiment


def select_runs(experiment: str = EXPERIMENT, filter_string: str | None = None,
                parent_run_id: str | None = None, run_ids: list[str] | None = None,
                include_unfinished: bool = False) -> Selection:
    """Training runs of an experiment, narrowed by filter, parent (sweep) run or run ids.

    The experiment "normlab" (the default) also takes in the training runs in MLflow's
    "Default" experiment, where `mlflow run` puts them unless told otherwise. Explicit run
    ids are looked up wherever they live (the experiment is then not used).
    Raises SelectionError, naming what was searched, when nothing is left to compare.
    """
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    clauses = [filter_string] if filter_string else []  # MLflow filters have AND only, no parentheses
    if run_ids:
        experiment_ids = sorted({_get_run(client, run_id, "run").info.experiment_id for run_id in run_ids})
        clauses.append("attributes.run_id IN ({})".format(", ".join(f"'{r}'" for r in run_ids)))
        searched = f"run ids {', '.join(run_ids)}"
    else:
        found = client.get_experiment_by_name(experiment)
        experiment_ids = [found.experiment_id] if found is not None else []
        searched = f"experiment {experiment!r}"
        if experiment == EXPERIMENT:
            # `mlflow run . -P norm=ln` without --experiment-name trains in MLflow's "Default"
            # experiment (MLproject cannot name one): normlab's runs there count as normlab's
            default = client.get_experiment_by_name(MLFLOW_DEFAULT_EXPERIMENT)
            if default is not None and default.lifecycle_stage == "active":
                experiment_ids.append(default.experiment_id)
                searched += f" and normlab's runs in {MLFLOW_DEFAULT_EXPERIMENT!r} (from `mlflow run`)"
        if not experiment_ids:
            names = sorted(e.name for e in client.search_experiments())
            raise SelectionError(f"no experiment named {experiment!r} in {redact(mlflow.get_tracking_uri())}; "
                                 f"experiments there: {', '.join(names) or 'none'}")
    if parent_run_id:
        _get_run(client, parent_run_id, "parent run")
        clauses.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
        searched += f", parent run {parent_run_id}"
    if filter_string:
        searched += f", filter {filter_string!r}"
    try:
        matched = _search_all(client, experiment_ids, " AND ".join(clauses), ViewType.ACTIVE_ONLY)
    except MlflowException as exc:
        raise SelectionError(f"MLflow could not search {searched}: {redact(exc.message)}") from exc
    training = [r for r in matched if TRAINING_RUN_TAG in r.data.tags]
    if include_unfinished:
        runs, left_out = training, []
    else:
        runs = [r for r in training if r.info.status == "FINISHED"]
        left_out = [r for r in training if r.info.status != "FINISHED"]
    if not runs:
        detail = f" ({len(left_out)} matched but are not FINISHED: use --include-unfinished)" if left_out else ""
        raise SelectionError(f"no training runs to compare in {searched}{detail}")
    return Selection(runs, left_out, searched)


def _get_run(client: MlflowClient, run_id: str, what: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        raise SelectionError(f"{what} {run_id!r} not found in {redact(mlflow.get_tracking_uri())}") from exc


def _search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str, view_type) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, view_type, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def describe_run(run) -> str:
    """'abc123de (LN, seed 2, FAILED)' for warnings."""
    tags, params = run.data.tags, run.data.params
    return f"{run.info.run_id} ({tags.get(TRAINING_RUN_TAG, '?')}, seed {params.get('seed', '?')}, {run.info.status})"


def runs_frame(runs: list):
    """One row per run: id, variant label, settings, status, timing (params parsed to numbers).

    The variant label comes from the norm, groups and L1 params, plus any other setting
    that differs between these runs; `variant` is a categorical in a stable reading order.
    """
    import pandas as pd

    from normlab.models import NORMS

    rows = []
    for run in runs:
        p = run.data.params
        norm = p.get("norm", "?")
        start, end = run.info.start_time, run.info.end_time
        rows.append({
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "experiment_id": run.info.experiment_id,
            "status": run.info.status,
            "norm": norm,
            "groups": _number(p.get("groups"), int) if norm == "gn" else None,
            "l1": _number(p.get("l1"), float) or 0.0,
            "batch_size": _number(p.get("batch_size"), int),
            "seed": _number(p.get("seed"), int),
            "dataset": p.get("dataset"),
            "epochs": _number(p.get("epochs"), int),
            "lr": _number(p.get("lr"), float),
            "momentum": _number(p.get("momentum"), float),
            "dropout": _number(p.get("dropout"), float),
            "parameters": _number(p.get("parameters"), int),
            "train_size": _number(p.get("train_size"), int),
            "test_size": _number(p.get("test_size"), int),
            "start_time": pd.to_datetime(start, unit="ms", utc=True),
            "end_time": pd.to_datetime(end, unit="ms", utc=True) if end else pd.NaT,
            "duration_s": (end - start) / 1000 if end else float("nan"),
            "base_label": _base_label(norm, p, run.data.tags),
        })
    frame = pd.DataFrame(rows)
    for column in ("groups", "batch_size", "seed", "epochs", "parameters", "train_size", "test_size"):
        frame[column] = frame[column].astype("Int64")
    differing = [k for k in DISTINGUISHING if frame[k].nunique(dropna=True) > 1]
    frame["variant"] = [
        ", ".join([row.base_label] + [DISTINGUISHING[k](getattr(row, k)) for k in differing])
        for row in frame.itertuples()
    ]
    order = frame.assign(norm_rank=frame["norm"].map({n: i for i, n in enumerate(NORMS)}).fillna(len(NORMS)))
    order = order.sort_values(["norm_rank", "groups", "l1", *differing, "seed"], na_position="first")
    frame["variant"] = pd.Categorical(frame["variant"], categories=list(dict.fromkeys(order["variant"])),
                                      ordered=True)
    return frame.drop(columns="base_label").sort_values(["variant", "seed"]).reset_index(drop=True)


def _base_label(norm: str, params: dict, tags: dict) -> str:
    from normlab.models import NORMS, variant_label

    if norm not in NORMS:
        return tags.get(TRAINING_RUN_TAG, norm)
    return variant_label(norm, _number(params.get("groups"), int) or 1, _number(params.get("l1"), float) or 0.0)


def _number(text: str | None, kind: type):
    """MLflow params are strings ('2', '2.0' from `mlflow run -P`, '1e-05'); None stays None."""
    if text is None or text == "":
        return None
    return kind(float(text))


def load_histories(runs, metrics: tuple[str, ...] = METRICS, workers: int = 8):
    """Tidy metric histories: one row per (run, metric, epoch) with the run's identity columns.

    One get_metric_history call per run and metric (the full history, not the latest value);
    calls overlap in a thread pool, which pays against a tracking server (network round
    trips) and costs little against a local sqlite store.
    """
    from concurrent.futures import ThreadPoolExecutor

    import pandas as pd

    client = MlflowClient()
    jobs = [(run_id, metric) for run_id in runs["run_id"] for metric in metrics]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        histories = list(pool.map(lambda job: client.get_metric_history(*job), jobs))
    records = [
        (run_id, metric, m.step, m.value)
        for (run_id, metric), history in zip(jobs, histories)
        for m in history
    ]
    tidy = pd.DataFrame(records, columns=["run_id", "metric", "epoch", "value"]).astype({"epoch": "int64"})
    tidy = runs[list(RUN_COLUMNS)].merge(tidy, on="run_id", how="inner")
    return tidy.sort_values(["variant", "seed", "run_id", "metric", "epoch"]).reset_index(drop=True)


def download_misclassified(run_id: str, dest: Path) -> tuple[Path, list[dict]] | None:
    """The run's misclassified.png (path after download) and misclassified.json; None if absent,
    or, with a warning, when they are not what log_results writes (a store's artifacts can be
    written by anyone with access: a crafted list must not crash the comparison)."""
    import json
    import warnings

    client = MlflowClient()
    names = {a.path for a in client.list_artifacts(run_id)}
    if not {"misclassified.png", "misclassified.json"} <= names:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    png = Path(client.download_artifacts(run_id, "misclassified.png", str(dest)))
    listed = Path(client.download_artifacts(run_id, "misclassified.json", str(dest)))
    try:
        mistakes = json.loads(listed.read_text())
        problem = _misclassified_problem(mistakes)
    except ValueError:  # not UTF-8, not JSON
        problem = "is not JSON"
    if problem is None and not png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"):
        problem = "has a misclassified.png that is not a PNG image"
    if problem:
        warnings.warn(f"run {run_id}: its misclassified.json {problem}; its gallery is left out")
        return None
    return png, mistakes


def _misclassified_problem(mistakes) -> str | None:
    """What is wrong with a misclassified.json's content, or None: it must be a list of
    {index, true, pred: integers, confidence: a number in [0, 1]} (train.Misclassified)."""
    if not isinstance(mistakes, list):
        return f"holds a {type(mistakes).__name__}, not a list of mistakes"
    for i, m in enumerate(mistakes):
        fields = m if isinstance(m, dict) else {}
        integers = all(type(fields.get(k)) is int for k in ("index", "true", "pred"))
        confidence = fields.get("confidence")
        if not (integers and type(confidence) in (int, float) and 0 <= confidence <= 1):
            return (f"entry {i} ({ascii(m)[:80]}) is not {{index, true, pred: integers, confidence: a number "
                    f"in [0, 1]}}")
    return None


def log_comparison(files: list[Path], compared_run_ids: list[str], params: dict[str, str],
                   log_to_run_id: str | None = None, experiment_id: str | None = None) -> str:
    """Log the comparison's files under 'comparison/' of a run, tagged with the compared ids.

    The run is `log_to_run_id` (a sweep's parent), else the run `mlflow run` started for
    this command (MLFLOW_RUN_ID), else a new FINISHED run in `experiment_id`.
    """
    from mlflow.entities import Param

    client = MlflowClient()
    ids = ",".join(compared_run_ids)
    tags = {"compared_runs": str(len(compared_run_ids)),
            # MLflow caps tag values at 8,000 characters; runs.csv always lists every id
            "compared_run_ids": ids if len(ids) <= 8000 else "see comparison/runs.csv"}
    run_id = log_to_run_id or _run_id_from_env()
    created = run_id is None
    if created:
        run_id = client.create_run(experiment_id, run_name="comparison",
                                   tags={"mlflow.runName": "comparison", "normlab.role": "comparison"}).info.run_id
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    for path in files:
        client.log_artifact(run_id, str(path), COMPARISON_ARTIFACT_DIR)
    if created:
        hide_credentialed_links()
        client.set_terminated(run_id, "FINISHED")
    return run_id
