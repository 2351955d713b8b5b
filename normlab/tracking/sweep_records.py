"""The MLflow side of a sweep: its parent run, its children, and what is left to train.

MLflow is the sweep's only record. The parent run is found by the grid's hash; each child
carries its config's hash; a child is done when its run is FINISHED. Running the same
sweep again therefore trains only what is missing, resuming children that stopped part
way from their checkpoints, and two drivers of one sweep share it without a scheduler:
a child being trained holds a lease (normlab.tracking.lease), and two runs created for one config
at the same moment are settled by creation order, the later one giving way.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from normlab.engine.config import TrainConfig
from normlab.tracking import connection, lease
from normlab.tracking.run_ending import STATUS_TAG

# tags
SWEEP_HASH = "sweep_hash"
SWEEP_ROLE = "sweep_role"  # "parent" on the parent run
SWEEP_PARENT = "sweep_parent_id"
CONFIG_HASH = "config_hash"
ERROR = "sweep_error"  # why a child failed: the reason and its last lines of output
DEVICE = "normlab.worker_device"  # which device (GPU) trained the child
COMPARED = "sweep_compared"  # fingerprint of the children the last comparison used


def _order(run) -> tuple[int, str]:
    """Creation order, the same in every process: the earlier run of two wins."""
    return run.info.start_time, run.info.run_id


@dataclass(frozen=True)
class Plan:
    """What one pass of a sweep does with each config: leave it, resume it, or start it."""

    done: dict[str, str]  # config hash -> run id of its FINISHED child
    resume: dict[str, str]  # config hash -> run id to continue from its checkpoint
    busy: dict[str, str]  # config hash -> run id another live process trains now
    start: list[TrainConfig]  # configs with no usable child yet
    abandoned: list[str]  # RUNNING children whose process is gone (no live lease)


class SweepRecords:
    """A sweep's parent run and children in one experiment."""

    def __init__(self, experiment: str, sweep_hash: str, client: MlflowClient | None = None):

        self.client = client or MlflowClient()
        self.sweep_hash = sweep_hash
        launcher = os.environ.get("MLFLOW_RUN_ID")
        if launcher:  # under `mlflow run`: its run's experiment, not --experiment
            self.experiment_id = self.client.get_run(launcher).info.experiment_id
        else:
            self.experiment_id = connection.experiment_id(experiment, self.client)
        self.parent_id: str | None = None

    def _search(self, filter_string: str, view=ViewType.ACTIVE_ONLY) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=filter_string, run_view_type=view,
                                           max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    # -- the parent ---------------------------------------------------------------------

    def _parents(self) -> list:
        return sorted(self._search(f"tags.{SWEEP_HASH} = '{self.sweep_hash}' and tags.{SWEEP_ROLE} = 'parent'"),
                      key=_order)

    def open_parent(self, run_name: str, params: dict[str, str], description: str) -> tuple[str, bool]:
        """The one parent run of this grid, created if there is none; (run id, existed)."""
        existing = self._parents()
        launcher = os.environ.get("MLFLOW_RUN_ID")
        if existing:
            parent, existed = existing[0].info.run_id, True
        else:
            tags = {SWEEP_HASH: self.sweep_hash, SWEEP_ROLE: "parent", "mlflow.note.content": description}
            if launcher:
                parent = launcher
                for key, value in {**tags, MLFLOW_RUN_NAME: run_name}.items():
                    self.client.set_tag(parent, key, value)
            else:
                parent = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
            winner = self._parents()[0].info.run_id  # two drivers at once: the earlier parent
            if winner != parent and not launcher:
                self.client.delete_run(parent)
            parent, existed = winner, winner != parent
        if launcher and launcher != parent:  # `mlflow run`'s run: point it at the sweep it resumed
            self.client.set_tag(launcher, SWEEP_ROLE, "launcher")
            self.client.set_tag(launcher, SWEEP_PARENT, parent)
        logged = self.client.get_run(parent).data.params
        for key, value in params.items():
            if key not in logged:
                self.client.log_param(parent, key, value)
        self.client.update_run(parent, status="RUNNING")
        self.parent_id = parent
        return parent, existed

    def finish_parent(self, status: str) -> None:
        self.client.set_terminated(self.parent_id, status)

    def experiment_name(self) -> str:
        return self.client.get_experiment(self.experiment_id).name

    # -- the children -------------------------------------------------------------------

    def children(self) -> dict[str, list]:
        """Child runs by config hash, earliest first."""
        found: dict[str, list] = {}
        for run in self._search(f"tags.{MLFLOW_PARENT_RUN_ID} = '{self.parent_id}'"):
            if CONFIG_HASH in run.data.tags:
                found.setdefault(run.data.tags[CONFIG_HASH], []).append(run)
        for runs in found.values():
            runs.sort(key=_order)
        return found

    def plan(self, configs: list[TrainConfig], commit: str | None) -> Plan:
        """Decide from MLflow alone what each config needs.

        Done: a FINISHED child trained by this code version (another version is trained
        again). Busy: a child whose lease is live. Resume: the newest child that did not
        finish and has a checkpoint. Otherwise: start a new child."""
        children = self.children()
        done, resume, busy, start, abandoned = {}, {}, {}, [], []
        now = time.time()
        for config in configs:
            h = config.config_hash()
            runs = children.get(h, [])
            finished = [r for r in runs if r.info.status == "FINISHED" and _same_code(r, commit)]
            live = [r for r in runs if r.info.status == "RUNNING" and _alive(r, now)]
            abandoned += [r.info.run_id for r in runs if r.info.status == "RUNNING" and r not in live]
            unfinished = [r for r in runs if r.info.status != "FINISHED" and r not in live
                          and _same_code(r, commit) and self._has_checkpoint(r.info.run_id)]
            if finished:
                done[h] = finished[0].info.run_id
            elif live:
                busy[h] = live[0].info.run_id
            elif unfinished:
                resume[h] = unfinished[-1].info.run_id
            else:
                start.append(config)
        return Plan(done, resume, busy, start, abandoned)

    def _has_checkpoint(self, run_id: str) -> bool:
        return has_checkpoint(run_id, self.client)

    def child_tags(self, config: TrainConfig, commit: str | None) -> dict[str, str]:
        """The tags that make a run this sweep's child for this config."""
        tags = {MLFLOW_PARENT_RUN_ID: self.parent_id, SWEEP_PARENT: self.parent_id, SWEEP_HASH: self.sweep_hash,
                CONFIG_HASH: config.config_hash()}
        if commit:
            tags[connection.GIT_COMMIT_TAG] = commit
        return tags

    def mark_failed(self, run_id: str, status: str, reason: str) -> None:
        """Tag why a child did not finish and close it if it is still open."""
        from normlab.tracking.redaction import redact

        self.client.set_tag(run_id, ERROR, redact(reason)[-4000:])
        run = self.client.get_run(run_id)
        if run.info.status in ("RUNNING", "SCHEDULED"):
            self.client.set_tag(run_id, STATUS_TAG, {"KILLED": "interrupted"}.get(status, "failed"))
            self.client.set_terminated(run_id, status)

    def final_test_acc(self, run_id: str) -> float | None:
        return self.client.get_run(run_id).data.metrics.get("test_acc")

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def parent_tags(self) -> dict[str, str]:
        return self.client.get_run(self.parent_id).data.tags


def has_checkpoint(run_id: str, client: MlflowClient | None = None) -> bool:
    """Whether the run has its checkpoint artifact (so it can be resumed anywhere)."""
    from normlab.tracking.run_log import CHECKPOINT_ARTIFACT

    folder = CHECKPOINT_ARTIFACT.rsplit("/", 1)[0]
    return any(f.path == CHECKPOINT_ARTIFACT for f in (client or MlflowClient()).list_artifacts(run_id, folder))


def _alive(run, now: float) -> bool:
    """A RUNNING child is alive while its lease lasts, or, just created, before it has one."""
    if lease.OWNER_TAG in run.data.tags:
        return lease.holder(run.data.tags, now) is not None or run.data.tags[lease.OWNER_TAG].startswith(lease.OWNER)
    return now - run.info.start_time / 1000 < lease.lease_seconds()


def _same_code(run, commit: str | None) -> bool:
    """A child counts for this sweep when it ran this code (or either side has no commit)."""
    theirs = run.data.tags.get(connection.GIT_COMMIT_TAG)
    return not commit or not theirs or theirs == commit


def _same_config(tags: dict[str, str]) -> str:
    """The search filter for the children of one sweep parent with one config."""
    return f"tags.{MLFLOW_PARENT_RUN_ID} = '{tags[MLFLOW_PARENT_RUN_ID]}' and tags.{CONFIG_HASH} = '{tags[CONFIG_HASH]}'"


def create_child_run(experiment_id: str, config: TrainConfig, tags: dict[str, str],
                     client: MlflowClient | None = None) -> str | None:
    """Create the child run for ``config`` and take its lease; None when another process
    created one for the same config first and still trains it (or finished it)."""
    client = client or MlflowClient()
    run = client.create_run(experiment_id, run_name=config.run_name, tags=tags)
    rivals = [r for r in client.search_runs([experiment_id], filter_string=_same_config(tags))
        if r.info.status in ("RUNNING", "FINISHED") and r.info.run_id != run.info.run_id
        and _same_code(r, tags.get(connection.GIT_COMMIT_TAG))
        and (r.info.status == "FINISHED" or (_alive(r, time.time()) and _order(r) < _order(run)))]
    if rivals:
        client.delete_run(run.info.run_id)
        return None
    return run.info.run_id


def child_made_by(experiment_id: str, tags: dict[str, str], worker_tag: str, worker: str) -> str | None:
    """The newest child with these sweep tags that ``worker`` (tagged ``worker_tag``) created."""
    runs = MlflowClient().search_runs(
        [experiment_id], filter_string=f"{_same_config(tags)} and tags.`{worker_tag}` = '{worker}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None
