"""The MLflow side of a sweep: the parent run, claims on children, child runs, liveness.

Part of the tracking layer (the only code that talks to MLflow), kept apart from
tracking.py because it is about coordinating processes, not about logging one run.

Coordination uses only what every MLflow backend (sqlite, PostgreSQL, a remote
`mlflow server`) enforces atomically, so no extra lock service is needed:

- Electing the parent: experiment names are unique (a database constraint), so the
  first worker to create the hidden experiment `.normlab-sweep-lock-<exp>-<hash>-<gen>`
  with tag parent_run_id wins; everyone else reads the winner from that tag. The lock
  experiment is deleted at once (deleted names stay reserved), so the UI stays clean.
- Claiming a child: a run's params cannot change once logged (primary key run+key), so
  `log_param(parent, "claim.<config_hash>.<attempt>", owner)` succeeds for exactly one
  owner; the loser gets "Changing param values is not allowed". A retry of a failed
  child claims the next attempt number.
- Liveness: the supervising sweep process tags its children with host, its pid and the
  child's pid, and refreshes a heartbeat tag while the child lives. A RUNNING child is
  dead when, on the same host, neither pid is alive, or, elsewhere, its heartbeat is stale.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from normlab.train import TrainConfig

HEARTBEAT_S = 20.0  # how often a supervising sweep refreshes its children's heartbeat
STALE_S = 180.0  # a RUNNING child on another host with an older heartbeat is dead
CLAIM_PREFIX = "claim."  # claim.<config hash>.<attempt>: who trains that attempt
COMPARE_PREFIX = "compare."  # compare.<children fingerprint>.<attempt>: who makes the comparison

# tags
SWEEP_HASH = "sweep_hash"
SWEEP_ROLE = "sweep_role"  # "parent" on the parent run
SWEEP_PARENT = "sweep_parent_id"
CONFIG_HASH = "config_hash"
ATTEMPT = "sweep_attempt"
WORKER = "sweep_worker"  # host:pid:token of the supervising sweep process
CHILD_PID = "sweep_child_pid"
HEARTBEAT = "sweep_heartbeat"  # unix seconds
OUTCOME = "sweep_outcome"  # on unsuccessful children: error | abandoned | interrupted
ERROR = "sweep_error"  # why it failed: exit status and last lines of output
COMPARED = "sweep_compared"  # fingerprint of the children the last comparison used
GIT_COMMIT = "git_commit"


@dataclass(frozen=True)
class Worker:
    """Who a claim or a child belongs to: host, pid and a random token (pids get reused)."""

    host: str
    pid: int
    token: str

    @classmethod
    def me(cls) -> "Worker":
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:8])

    @classmethod
    def parse(cls, text: str) -> "Worker | None":
        try:
            host, pid, token = text.rsplit(":", 2)
            return cls(host, int(pid), token)
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.token}"


def pid_alive(pid: int) -> bool:
    """True for a live process on this host; a zombie (exited, not yet reaped) is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class Child:
    """One attempt at one config: an MLflow run under the parent."""

    run_id: str
    config_hash: str
    attempt: int
    status: str  # RUNNING, SCHEDULED, FINISHED, FAILED, KILLED
    start_time: float  # unix seconds
    end_time: float | None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Claim:
    attempt: int
    owner: Worker | None
    claimed_at: float


# What a worker may do about one config, decided by config_state().
DONE, ACTIVE, DEAD, OPEN, FAILED = "done", "active", "dead", "open", "failed"


@dataclass(frozen=True)
class State:
    kind: str
    next_attempt: int = 0  # for OPEN (and DEAD, once marked failed)
    child: Child | None = None  # DONE: the finished one; DEAD/FAILED/ACTIVE: the latest


def _commit_matches(child: Child, commit: str | None) -> bool:
    theirs = child.tags.get(GIT_COMMIT)
    return commit is None or theirs is None or theirs == commit


def claim_alive(claim: Claim, now: float, host: str) -> bool:
    """The claimer may still be working: its process lives here, or elsewhere it is recent."""
    owner = claim.owner
    if owner is not None and owner.host == host:
        return pid_alive(owner.pid)
    return now - claim.claimed_at <= STALE_S


def is_dead(child: Child, now: float, host: str) -> bool:
    """A RUNNING child whose supervising process (and the child itself) is gone."""
    worker = Worker.parse(child.tags.get(WORKER, ""))
    if worker is not None and worker.host == host:
        pids = [worker.pid] + ([int(child.tags[CHILD_PID])] if child.tags.get(CHILD_PID, "").isdigit() else [])
        return not any(pid_alive(p) for p in pids)
    beat = float(child.tags.get(HEARTBEAT, child.start_time))
    return now - beat > STALE_S


def config_state(claims: list[Claim], children: list[Child], *, commit: str | None, now: float,
                 started_at: float, host: str) -> State:
    """Decide one config from its claims and child runs (pure: the rules in one place).

    Finished with this code version: done. Otherwise the latest claim decides: its child is
    running (active), dead (to be marked failed, then retried), failed before this sweep
    started or abandoned (open again), or failed during this sweep (not retried now, so a
    child that always fails does not loop). A claim whose owner never created the child is
    open again once the owner is gone.
    """
    finished = [c for c in children if c.status == "FINISHED" and _commit_matches(c, commit)]
    if finished:
        return State(DONE, child=max(finished, key=lambda c: c.attempt))
    if not claims:
        return State(OPEN, next_attempt=1)
    claim = max(claims, key=lambda c: c.attempt)
    nxt = claim.attempt + 1
    child = next((c for c in children if c.attempt == claim.attempt), None)
    if child is None:
        return State(ACTIVE) if claim_alive(claim, now, host) else State(OPEN, next_attempt=nxt)
    if child.status in ("RUNNING", "SCHEDULED"):
        return State(DEAD, next_attempt=nxt, child=child) if is_dead(child, now, host) else State(ACTIVE, child=child)
    if child.status == "FAILED" and child.tags.get(OUTCOME, "error") == "error" \
            and (child.end_time or now) >= started_at:
        return State(FAILED, child=child)
    return State(OPEN, next_attempt=nxt, child=child)  # failed earlier, killed, abandoned, or older code


class SweepStore:
    """A sweep's parent run and children in one experiment, through MlflowClient."""

    def __init__(self, experiment: str, sweep_hash: str, client: MlflowClient | None = None):
        self.client = client or MlflowClient()
        self.sweep_hash = sweep_hash
        launcher = os.environ.get("MLFLOW_RUN_ID")
        if launcher:  # under `mlflow run`: its run's experiment, not --experiment
            self.experiment_id = self.client.get_run(launcher).info.experiment_id
        else:
            found = self.client.get_experiment_by_name(experiment)
            if found is not None and found.lifecycle_stage == "deleted":
                raise MlflowException(f"experiment {experiment!r} is deleted; restore it "
                                      f"(mlflow experiments restore) or choose another --experiment")
            self.experiment_id = found.experiment_id if found else self._create_experiment(experiment)
        self.parent_id: str | None = None

    def _create_experiment(self, name: str) -> str:
        try:
            return self.client.create_experiment(name)
        except MlflowException as exc:  # another worker created it first
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            return self.client.get_experiment_by_name(name).experiment_id

    # -- the parent ---------------------------------------------------------------------

    def open_parent(self, run_name: str, params: dict[str, str]) -> tuple[str, bool]:
        """The one parent run of this sweep hash, creating it if needed; (run id, resumed)."""
        existing = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{SWEEP_HASH} = '{self.sweep_hash}' and tags.{SWEEP_ROLE} = 'parent'",
            order_by=["attributes.start_time ASC"], max_results=10,
        )
        launcher = os.environ.get("MLFLOW_RUN_ID")
        if existing:
            candidate, created = existing[0].info.run_id, False
        elif launcher:
            candidate, created = launcher, False
            self.client.set_tag(candidate, MLFLOW_RUN_NAME, run_name)
        else:
            candidate, created = self.client.create_run(self.experiment_id, run_name=run_name).info.run_id, True
        self.client.set_tag(candidate, SWEEP_HASH, self.sweep_hash)
        self.client.set_tag(candidate, SWEEP_ROLE, "parent")
        winner = self._elect(candidate)
        if created and winner != candidate:
            self.client.delete_run(candidate)
        if launcher and launcher != winner:  # `mlflow run`'s run: point it at the sweep it resumed
            self.client.set_tag(launcher, SWEEP_ROLE, "launcher")
            self.client.set_tag(launcher, SWEEP_PARENT, winner)
        already = self.client.get_run(winner).data.params
        fresh = {k: v for k, v in params.items() if k not in already}
        for key, value in fresh.items():
            self.client.log_param(winner, key, value)
        self.client.update_run(winner, status="RUNNING")
        self.parent_id = winner
        return winner, bool(existing) or winner != candidate

    def _elect(self, candidate: str) -> str:
        """Atomic election through a unique experiment name (see the module docstring)."""
        for generation in range(1, 100):
            lock = f".normlab-sweep-lock-{self.experiment_id}-{self.sweep_hash}-{generation}"
            try:
                lock_id = self.client.create_experiment(lock, tags={"parent_run_id": candidate})
                self.client.delete_experiment(lock_id)
                return candidate
            except MlflowException as exc:
                if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                    raise
            winner = self.client.get_experiment_by_name(lock).tags.get("parent_run_id")
            try:
                if winner and self.client.get_run(winner).info.lifecycle_stage == "active":
                    return winner
            except MlflowException:
                pass  # the winner was deleted for good: next generation
        raise MlflowException(f"could not elect a parent run for sweep {self.sweep_hash}")

    def finish_parent(self, status: str) -> None:
        self.client.set_terminated(self.parent_id, status)

    # -- reading the state --------------------------------------------------------------

    def snapshot(self) -> tuple[dict[str, list[Claim]], dict[str, list[Child]]]:
        """All claims (parent params) and all child runs, grouped by config hash."""
        claims = self.claims(CLAIM_PREFIX)
        children: dict[str, list[Child]] = {}
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{self.parent_id}'",
                run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token,
            )
            for run in page:
                tags = run.data.tags
                if ATTEMPT not in tags or CONFIG_HASH not in tags:
                    continue
                children.setdefault(tags[CONFIG_HASH], []).append(Child(
                    run_id=run.info.run_id, config_hash=tags[CONFIG_HASH], attempt=int(tags[ATTEMPT]),
                    status=run.info.status, start_time=run.info.start_time / 1000,
                    end_time=run.info.end_time / 1000 if run.info.end_time else None, tags=dict(tags),
                ))
            token = page.token
            if not token:
                return claims, children

    def claims(self, prefix: str) -> dict[str, list[Claim]]:
        """Claims logged as '<prefix><subject>.<attempt>' params of the parent, by subject."""
        found: dict[str, list[Claim]] = {}
        for key, value in self.client.get_run(self.parent_id).data.params.items():
            if key.startswith(prefix):
                subject, attempt = key[len(prefix):].rsplit(".", 1)
                owner_text, _, at = value.partition("@")
                found.setdefault(subject, []).append(Claim(int(attempt), Worker.parse(owner_text), float(at or 0)))
        return found

    # -- claiming and running children --------------------------------------------------

    def claim(self, config: TrainConfig, attempt: int, worker: Worker) -> bool:
        """Claim a child: True for exactly one worker per (config, attempt)."""
        return self.claim_param(f"{CLAIM_PREFIX}{config.config_hash()}.{attempt}", worker)

    def claim_param(self, key: str, worker: Worker) -> bool:
        """Log `key` = owner on the parent; params never change, so one owner wins."""
        try:
            self.client.log_param(self.parent_id, key, f"{worker}@{time.time():.0f}")
            return True
        except MlflowException as exc:
            if "Changing param values is not allowed" in str(exc):
                return False
            raise

    def create_child(self, config: TrainConfig, attempt: int, worker: Worker, commit: str | None) -> str:
        tags = {
            MLFLOW_PARENT_RUN_ID: self.parent_id,
            SWEEP_PARENT: self.parent_id,
            SWEEP_HASH: self.sweep_hash,
            CONFIG_HASH: config.config_hash(),
            ATTEMPT: str(attempt),
            WORKER: str(worker),
            HEARTBEAT: f"{time.time():.0f}",
        }
        if commit:
            tags[GIT_COMMIT] = commit
        run = self.client.create_run(self.experiment_id, run_name=config.run_name, tags=tags)
        return run.info.run_id

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def heartbeat(self, run_id: str) -> None:
        self.client.set_tag(run_id, HEARTBEAT, f"{time.time():.0f}")

    def status(self, run_id: str) -> tuple[str, dict[str, str]]:
        run = self.client.get_run(run_id)
        return run.info.status, run.data.tags

    def mark_unsuccessful(self, run_id: str, status: str, outcome: str, error: str,
                          log_file: Path | None = None) -> None:
        """Tag why a child did not finish, attach its output, and terminate it if still open."""
        self.client.set_tag(run_id, OUTCOME, outcome)
        self.client.set_tag(run_id, ERROR, error[-4000:])
        if log_file is not None and log_file.exists():
            self.client.log_artifact(run_id, str(log_file))
        if self.client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
            self.client.set_terminated(run_id, status)
        elif status == "FAILED":  # the child closed its run before failing afterwards
            self.client.set_terminated(run_id, "FAILED")

    def experiment_name(self) -> str:
        return self.client.get_experiment(self.experiment_id).name

    def final_test_acc(self, run_id: str) -> float | None:
        return self.client.get_run(run_id).data.metrics.get("test_acc")
