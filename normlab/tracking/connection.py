"""The tracking store itself: which experiment, whether the server answers, bounded retries,
a fresh sqlite store created safely, credentials kept out of MLflow's printed links."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

import normlab
from normlab.errors import ConfigError, TrackingUnreachable
from normlab.tracking.redaction import redact

PACKAGE_DIR = Path(normlab.__file__).parent


# The tag holding git_commit() on each training run: a sweep reuses only runs of its own code,
# and `compare --run-id` tells codes apart.
GIT_COMMIT_TAG = "git_commit"


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


def run_id_from_env() -> str | None:
    """The run `mlflow run` created for this command (MLFLOW_RUN_ID), if any."""
    from mlflow.environment_variables import MLFLOW_RUN_ID

    return MLFLOW_RUN_ID.get()


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


# Ride out tracking-server outages of up to ~2 min (urllib3 waits 0, 2, 4, 8, 16, 32, 64 s
# between attempts), then stop with a clear error and a resumable local checkpoint.
# MLflow's own default (factor 2, 120 s timeout) keeps a run hanging for 4 minutes or more.
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


# normlab downloads small artifacts one at a time (each run's gallery for a comparison, a
# checkpoint to resume from). Where tqdm is installed MLflow draws a progress bar for each:
# six at the end of the classic sweep, sixty for a ten-seed one.
QUIET_DOWNLOAD_DEFAULTS = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def use_command_defaults() -> None:
    """Apply HTTP_RETRY_DEFAULTS and QUIET_DOWNLOAD_DEFAULTS where the user has not chosen
    their own values, and show each HTTP retry on stderr (urllib3 logs them to a
    NullHandler), so an outage is visible."""
    for name, value in {**HTTP_RETRY_DEFAULTS, **QUIET_DOWNLOAD_DEFAULTS}.items():
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
    _check_store_scheme(uri)
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


def _check_store_scheme(uri: str) -> None:
    """A tracking URI whose scheme no MLflow store serves (a typo: `sqllite:///`, `htp://`),
    refused before any data loads: MLflow itself finds it only where the run starts, after
    the data and the model, with a traceback. Asks MLflow's own registry of stores."""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry as stores

    try:
        stores.get_store_builder(uri)
    except Exception:
        schemes = ", ".join(f"{scheme}://" for scheme in sorted(stores._registry) if scheme)
        raise ConfigError(f"the tracking URI {redact(uri)!r} (MLFLOW_TRACKING_URI) names no kind of store MLflow "
                          f"knows; valid schemes: {schemes}, or a folder path (unset it for the default, "
                          f"sqlite:///mlflow.db)") from None


def create_store_safely() -> None:
    """Create a new sqlite store under a file lock: runs started together on a fresh store
    otherwise race on its schema migrations and all fail."""
    import fcntl

    uri = mlflow.get_tracking_uri()
    db = sqlite_file(uri)
    if db is None:
        return
    try:
        lock = open(db.with_name(db.name + ".lock"), "w")
    except OSError as exc:
        raise TrackingUnreachable(f"the sqlite tracking store {uri} cannot be created here ({exc}); "
                                  f"point MLFLOW_TRACKING_URI at a writable folder") from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient().search_experiments(max_results=1)  # creates and migrates the schema


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite tracking URI; None for other stores."""
    return Path(uri[len("sqlite:///"):].split("?")[0]) if uri.startswith("sqlite:///") else None


def missing_store() -> str | None:
    """The tracking URI when it names a sqlite file that is not there (MLflow's default,
    ./mlflow.db, in a folder where nothing was trained): reading it would create an empty one."""
    uri = mlflow.get_tracking_uri()
    store = sqlite_file(uri)
    return uri if store is not None and not store.exists() else None


def tracking_uri() -> str:
    """The store this process logs to (MLFLOW_TRACKING_URI, else MLflow's default)."""
    return mlflow.get_tracking_uri()
