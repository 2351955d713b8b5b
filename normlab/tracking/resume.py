"""Where a resumed run continues from: its newest checkpoint and the config it trained with.

Options left out of `normlab train --resume RUN_ID` are taken from the checkpoint; options
given must equal it, otherwise the resume is refused with the fields that differ.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from normlab.engine import checkpoint
from normlab.engine.config import TrainConfig
from normlab.errors import ConfigError, ResumeError
from normlab.tracking import run_log
from normlab.tracking.run_query import check_resumable


@dataclass(frozen=True)
class ResumePoint:
    run_id: str
    config: TrainConfig
    state: dict  # Trainer.state_dict() plus run_id, data_digest and records
    source: str  # where the checkpoint came from, for the console
    source_is_local: bool  # the local copy was newer than (or instead of) the artifact

    @property
    def records(self) -> list[dict]:
        return self.state["records"]


def merged_config(run_id: str, given: TrainConfig, explicit: set[str], saved: TrainConfig) -> TrainConfig:
    """The saved config with the explicitly given fields; refuses when those differ from it."""
    config = replace(saved, **{name: getattr(given, name) for name in explicit})
    differences = config.differences(saved)
    if differences:
        raise ConfigError(f"cannot resume run {run_id}: the config differs from its checkpoint "
                          f"(given vs checkpoint): {'; '.join(differences)}. Leave these options out "
                          f"or give the checkpoint's values")
    return config


def find(run_id: str, given: TrainConfig, explicit: set[str], checkpoint_dir: str | Path) -> ResumePoint:
    """The newest checkpoint of run_id (local copy or artifact) and the config to continue with."""
    from normlab.errors import LeaseHeld
    from normlab.tracking.lease import check_free

    check_resumable(run_id)
    try:
        check_free(run_id)
    except LeaseHeld as exc:
        raise ResumeError(str(exc)) from exc
    local = run_log.local_checkpoint_path(checkpoint_dir, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        found = checkpoint.newest(local, run_log.download_checkpoint(run_id, tmp))
        if found is None:
            raise ResumeError(f"run {run_id} has no checkpoint: neither {local} nor its artifact "
                              f"{run_log.CHECKPOINT_ARTIFACT} exists, so it cannot be resumed")
        path, state = found
        is_local = path == local
        source = str(path) if is_local else f"artifact {run_log.CHECKPOINT_ARTIFACT}"
    config = merged_config(run_id, given, explicit, TrainConfig(**state["config"]))
    if state["epoch"] >= config.epochs and run_log.run_outcome(run_id) == "finished":
        raise ResumeError(f"run {run_id} already finished all {config.epochs} epochs; nothing to resume")
    last_logged = max(run_log.logged_steps(run_id), default=0)
    if last_logged > state["epoch"]:
        raise ResumeError(f"run {run_id} has metrics up to epoch {last_logged} but its newest checkpoint "
                          f"({source}) ends at epoch {state['epoch']}; resuming would log those epochs twice")
    return ResumePoint(run_id, config, state, source, is_local)


def check_same_data(point: ResumePoint, digest: str) -> None:
    if point.state["data_digest"] != digest:
        raise ConfigError(f"cannot resume run {point.run_id}: the data in --data-dir (digest {digest}) is not "
                          f"the data it trained on (digest {point.state['data_digest']})")
