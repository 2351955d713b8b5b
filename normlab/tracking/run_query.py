"""Reading runs back for a comparison (selection, tidy tables, metric histories, the
misclassified lists) and logging the comparison's own run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from normlab.engine.config import METRICS
from normlab.engine.registry import NORMS, variant_label
from normlab.errors import ResumeError, SelectionError
from normlab.tracking import EXPERIMENT
from normlab.tracking.connection import GIT_COMMIT_TAG, hide_credentialed_links, missing_store, run_id_from_env
from normlab.tracking.redaction import redact
from normlab.tracking.sweep_records import SWEEP_ROLE

TRAINING_RUN_TAG = "variant"  # set by log_run_setup; sweep parents and comparison runs lack it
COMPARED_RUNS_TAG = "compared_runs"  # on a comparison run: how many runs it compared
SPEEDUPS_TAG = "normlab.speedups"  # the engine's techniques a run trained with (run_log.log_run_setup)

COMPARISON_ARTIFACT_DIR = "comparison"

# Settings that are not part of a variant's name; when they differ between the selected
# runs, the variant label says so ("LN, batch 64") rather than averaging unlike runs as seeds.
DISTINGUISHING = {"dataset": "{}".format, "train_size": "{} train images".format,
                  "test_size": "{} test images".format, "epochs": lambda n: f"{n} epoch{'' if n == 1 else 's'}",
                  "batch_size": "batch {}".format, "lr": "lr {:g}".format, "momentum": "momentum {:g}".format,
                  "dropout": "dropout {:g}".format}

# Runs picked one by one (`--run-id`) are also told apart by the code that trained them (their
# tag GIT_COMMIT_TAG), so one seed before and after a change compares as two variants ("LN, code
# 1a2b3c4"). Selected by experiment, filter or parent they are one study whatever its commits: a
# variant and seed trained again counts its newest run (analysis.compare.newest_run_per_seed).
BY_CODE = {"code": "code {}".format}

RUN_COLUMNS = ("run_id", "variant", "norm", "l1", "groups", "batch_size", "seed", "status")


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

    if missing := missing_store():
        raise SelectionError(redact(f"there is no tracking store at {missing}, so no runs to compare; run this "
                                    f"in the folder the runs were trained in, or set MLFLOW_TRACKING_URI to "
                                    f"their store"))
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
    hint = ""
    if parent_run_id:
        parent = _get_run(client, parent_run_id, "parent run")
        if parent.info.experiment_id not in experiment_ids:  # a sweep's children live in its parent's experiment
            hint = (f"; the parent run is in experiment "
                    f"{client.get_experiment(parent.info.experiment_id).name!r}: give that as --experiment")
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
        raise SelectionError(f"no training runs to compare in {searched}{detail}{hint}")
    return Selection(runs, left_out, searched)


def check_resumable(run_id: str) -> None:
    """Refuses a `--resume` of a run the store does not have, a sweep's parent or a comparison,
    saying what to do instead. It needs MLflow only: a mistyped id is refused before torch's import."""
    from mlflow.exceptions import MlflowException

    if missing := missing_store():
        raise ResumeError(redact(f"no run {run_id!r}: there is no tracking store at {missing}; run the command "
                                 f"in the folder the run was trained in, or set MLFLOW_TRACKING_URI to its store"))
    try:
        tags = MlflowClient().get_run(run_id).data.tags
    except MlflowException as exc:
        raise ResumeError(redact(f"no run {run_id!r} in the tracking store {mlflow.get_tracking_uri()} "
                                 f"({str(exc).splitlines()[0]})")) from exc
    if tags.get(SWEEP_ROLE) == "parent":
        raise ResumeError(f"run {run_id} is a sweep's parent run, not a training run: run the same "
                          f"`normlab sweep` command again, which resumes its unfinished children")
    if COMPARED_RUNS_TAG in tags and TRAINING_RUN_TAG not in tags:  # --log-to-run can put one in a training run
        raise ResumeError(f"run {run_id} is a comparison (`normlab compare`), not a training run: "
                          f"--resume takes the id of one of the runs it compared")


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


def runs_frame(runs: list, by_code: bool = False):
    """One row per run: id, variant label, settings, status, timing (params parsed to numbers).

    The variant label comes from the norm, groups and L1 params, plus any other setting
    that differs between these runs (and, ``by_code``, the commit that trained them, BY_CODE);
    `variant` is a categorical in a stable reading order.
    """
    import pandas as pd

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
            "speedups": run.data.tags.get(SPEEDUPS_TAG),  # how it computed: compiled or not, say
            "code": _short_commit(run.data.tags.get(GIT_COMMIT_TAG)),
            "base_label": _base_label(norm, p, run.data.tags),
        })
    frame = pd.DataFrame(rows)
    for column in ("groups", "batch_size", "seed", "epochs", "parameters", "train_size", "test_size"):
        frame[column] = frame[column].astype("Int64")
    settings = {**DISTINGUISHING, **(BY_CODE if by_code else {})}
    differing = [k for k in settings if frame[k].nunique(dropna=True) > 1]
    frame["variant"] = [
        ", ".join([row.base_label] + [settings[k](getattr(row, k)) for k in differing])
        for row in frame.itertuples()
    ]
    order = frame.assign(norm_rank=frame["norm"].map({n: i for i, n in enumerate(NORMS)}).fillna(len(NORMS)),
                         code=frame.groupby("code", dropna=False)["start_time"].transform("min"))  # older code first
    order = order.sort_values(["norm_rank", "groups", "l1", *differing, "seed"], na_position="first")
    frame["variant"] = pd.Categorical(frame["variant"], categories=list(dict.fromkeys(order["variant"])),
                                      ordered=True)
    # the code is a setting only where it names variants (analysis.results' families)
    unused = ["base_label", *(["code"] if "code" not in differing else [])]
    return frame.drop(columns=unused).sort_values(["variant", "seed"]).reset_index(drop=True)


def _short_commit(commit: str | None) -> str | None:
    """'1a2b3c4' of a full commit id, keeping connection.git_commit's '-dirty'."""
    if not commit:
        return None
    sha, dirty, _ = commit.partition("-dirty")
    return sha[:7] + dirty


def _base_label(norm: str, params: dict, tags: dict) -> str:
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
    tags = {COMPARED_RUNS_TAG: str(len(compared_run_ids)),
            # MLflow caps tag values at 8,000 characters; runs.csv always lists every id
            "compared_run_ids": ids if len(ids) <= 8000 else "see comparison/runs.csv"}
    run_id = log_to_run_id or run_id_from_env()
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
