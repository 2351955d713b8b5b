"""A sweep: a grid of training configs, each one child run of one parent MLflow run.

The sweep decides from MLflow what is left (tracking.sweep_records.SweepRecords.plan), hands the
runs to warm workers, one per device (executors: processes on this machine, or Ray actors
on a cluster), and, once every child has finished, compares them on the parent. Each child
is exactly an ordinary training run (lifecycle.train_tracked). Running the same command
again resumes: finished children are kept, interrupted ones continue from their checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import tempfile
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from normlab.analysis.renderers import figure_renderers
from normlab.engine.config import TrainConfig
from normlab.engine.interrupts import release_interrupted
from normlab.engine.registry import NORMS
from normlab.errors import ConfigError


# How a child's learning rate follows its batch size. "linear" keeps lr / batch size fixed
# (Goyal et al. 2017; the GroupNorm paper's rule): SGD then takes the same total step per
# epoch at every batch size, so a batch-size study shows the effect of the batch statistics
# rather than of how many steps an epoch gives. --lr is the rate at REFERENCE_BATCH.
LR_SCALINGS = ("none", "linear", "sqrt")
REFERENCE_BATCH = TrainConfig.batch_size


def scaled_lr(lr: float, batch_size: int, scaling: str) -> float:
    """The learning rate of a child with this batch size, under the scaling rule."""
    ratio = batch_size / REFERENCE_BATCH
    return lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[scaling]


@dataclass(frozen=True)
class Grid:
    """The axes of a sweep; the default is the classic study (BN + L1, LN, GN, 20 epochs)."""

    norms: tuple[str, ...] = ("bn", "ln", "gn")
    l1: tuple[float, ...] = (1e-5,)  # L1 weights (an axis) for the norms in l1_on
    l1_on: tuple[str, ...] = ("bn",)  # norms that get the L1 term; the others train with l1 = 0
    groups: tuple[int, ...] = (TrainConfig.groups,)  # only gn uses it
    batch_sizes: tuple[int, ...] = (TrainConfig.batch_size,)
    seeds: tuple[int, ...] = (1,)
    dataset: str = TrainConfig.dataset
    epochs: int = TrainConfig.epochs
    lr: float = TrainConfig.lr
    lr_scaling: str = "none"  # how lr follows the batch size: LR_SCALINGS

    def configs(self) -> list[TrainConfig]:
        """Every child config in a fixed order (norm, groups, L1, batch size, seed)."""
        out = []
        for norm in self.norms:
            for groups in self.groups if norm == "gn" else self.groups[:1]:
                for l1 in self.l1 if norm in self.l1_on else (0.0,):
                    for batch_size in self.batch_sizes:
                        for seed in self.seeds:
                            out.append(TrainConfig(norm=norm, groups=groups, l1=l1, dataset=self.dataset,
                                                   epochs=self.epochs, batch_size=batch_size,
                                                   lr=scaled_lr(self.lr, batch_size, self.lr_scaling), seed=seed))
        return out

    def validate(self) -> list[TrainConfig]:
        """Check the axes and every child config; ConfigError names the first problem."""
        if self.lr_scaling not in LR_SCALINGS:
            raise ConfigError(f"unknown --lr-scaling {self.lr_scaling!r}; valid choices: {', '.join(LR_SCALINGS)}")
        for axis in ("norms", "l1", "groups", "batch_sizes", "seeds"):
            values = getattr(self, axis)
            if not values:
                raise ConfigError(f"--{axis.replace('_', '-')} is empty; give at least one value")
            if len(set(values)) != len(values):
                raise ConfigError(f"--{axis.replace('_', '-')} repeats a value: {','.join(map(str, values))}")
        for norm in self.norms + self.l1_on:
            if norm not in NORMS:
                raise ConfigError(f"unknown norm {norm!r}; valid choices: {', '.join(NORMS)}")
        configs = self.configs()
        for config in configs:
            try:
                config.validate()
            except ConfigError as exc:
                raise ConfigError(f"child {config.run_name}: {exc}") from exc
        return configs

    def sweep_hash(self) -> str:
        """Same grid, same hash (order of the axes does not matter): finds the parent again."""
        hashes = sorted(c.config_hash() for c in self.configs())
        return hashlib.sha256(json.dumps(hashes).encode()).hexdigest()[:12]

    def run_name(self) -> str:
        n = len(self.configs())
        batches = f"-b{','.join(map(str, self.batch_sizes))}" if len(self.batch_sizes) > 1 else ""
        return f"sweep-{'+'.join(self.norms)}{batches}-x{len(self.seeds)}seeds-{n}runs"

    def description(self) -> str:
        """The parent run's description in the MLflow UI: what it holds and how to see it."""
        return (f"normlab sweep: {len(self.configs())} child runs ({', '.join(self.norms)} x seeds "
                f"{','.join(map(str, self.seeds))}, batch {','.join(map(str, self.batch_sizes))}, {self.epochs} "
                f"epochs on {self.dataset}). Expand this run in the runs table to see its children; select them "
                f"and open Chart view for test_acc and test_loss per epoch. The comparison figures and "
                f"results table are under this run's artifacts, comparison/.")

    def params(self) -> dict[str, str]:
        """The parent's params: the grid, as a user would type it."""
        return {
            "norms": ",".join(self.norms), "l1": ",".join(f"{v:g}" for v in self.l1), "l1_on": ",".join(self.l1_on),
            "groups": ",".join(map(str, self.groups)), "batch_sizes": ",".join(map(str, self.batch_sizes)),
            "seeds": ",".join(map(str, self.seeds)), "dataset": self.dataset, "epochs": str(self.epochs),
            "lr": f"{self.lr:g}", "lr_scaling": self.lr_scaling, "children": str(len(self.configs())),
        }


def check_resources(configs: list[TrainConfig], data_dir: str, device: str) -> None:
    """Device, speed switches and data once, before any run exists: a missing dataset is
    downloaded here, not by N children racing into one folder, and too-large batch sizes
    and bad NORMLAB_* settings fail now, not in every child."""
    from normlab.engine.data import load_raw
    from normlab.engine.fast import compile_choice, kernel_helpers
    from normlab.engine.train import resolve_device
    from normlab.engine.fast.trainer_pool import runs_per_gpu

    resolve_device(device)
    compile_choice()
    kernel_helpers()
    runs_per_gpu()
    raw = load_raw(configs[0].dataset, data_dir)
    for config in configs:
        config.check_fits(len(raw.train_labels))


@dataclass
class Outcome:
    """What a sweep invocation did: finished children (config hash -> run id), the runs it
    trained now, and the children that failed or were stopped, with why."""

    parent_id: str
    done: dict[str, str] = field(default_factory=dict)
    trained: list[str] = field(default_factory=list)
    failures: list = field(default_factory=list)  # worker.RunResult
    busy: dict[str, str] = field(default_factory=dict)  # trained by another driver meanwhile
    interrupted: bool = False


def run_sweep(grid: Grid, *, experiment: str, data_dir: str, device: str, checkpoint_dir: str,
              address: str | None = None, cpu_workers: int = 1, out_dir: Path | None = None,
              echo: Callable[[str], None] = print, engine=None) -> Outcome:
    """Validate, open the parent, train what MLflow says is left, then compare on the parent.

    ``address`` (a Ray cluster, or "auto") runs the workers as Ray actors; without it they
    are processes on this machine, one per GPU (``cpu_workers`` on a machine without one),
    or this process itself when there is one device, training in ``engine`` (an
    engine_process.EngineProcess) if the command started one."""
    from normlab.engine.config import steps_key
    from normlab.engine.train import resolve_device
    from normlab.sweep.executors import RayExecutor, WorkerSettings, local_executor
    from normlab.sweep.worker import RunRequest
    from normlab.tracking import connection
    from normlab.tracking import sweep_records as st

    configs = grid.validate()
    check_resources(configs, data_dir, device)
    connection.create_store_safely()
    records = st.SweepRecords(experiment, grid.sweep_hash())
    settings = WorkerSettings(str(data_dir), records.experiment_name(), checkpoint_dir, connection.tracking_uri())
    executor = (RayExecutor(address, settings, echo) if address  # refuses a bad cluster before any run exists
                else local_executor(device, cpu_workers, settings, echo, engine))
    parent_id, existed = records.open_parent(grid.run_name(), grid.params(), grid.description())
    commit = connection.git_commit()
    plan = records.plan(configs, commit)
    for run_id in plan.abandoned:
        records.mark_failed(run_id, "FAILED", "abandoned: the process training it is gone")
    outcome = Outcome(parent_id, done=dict(plan.done), busy=dict(plan.busy))
    by_hash = {c.config_hash(): c for c in configs}
    ahead = epochs_per_variant(configs)

    def request(config: TrainConfig, **resume) -> RunRequest:
        return RunRequest(config, records.child_tags(config, commit), records.experiment_id,
                          epochs_ahead=ahead[steps_key(config)], **resume)

    if engine is not None:  # it started the first runs early: these it will be handed, fresh
        engine.keep_early([(c, ahead[steps_key(c)]) for c in plan.start])
    by_config = {c.config_hash(): request(c) for c in plan.start}
    by_config.update({h: request(by_hash[h], run_id=run_id, resume=True) for h, run_id in plan.resume.items()})
    todo_in_grid_order = [c for c in configs if c.config_hash() in by_config]
    requests = [by_config[c.config_hash()] for c in training_order(todo_in_grid_order)]
    echo(f"sweep {grid.sweep_hash()}: {len(configs)} children, parent run {parent_id}"
         f"{' (resuming it)' if existed else ''}; {len(plan.done)} finished already, {len(plan.resume)} to "
         f"resume, {len(plan.start)} to start, {len(plan.busy)} being trained elsewhere; {executor.describe()}")
    renderers: contextlib.AbstractContextManager = contextlib.nullcontext()
    if resolve_device(device).type == "cuda":  # the host idles while its GPUs train
        _import_comparison_in_background()
        if requests:  # with nothing to train they would still be starting when the comparison needs them
            renderers = figure_renderers()
    started = time.perf_counter()
    echo(f"sweep: runs handed to the workers {_since_process_start():.1f} s after the command started")

    def settle(result) -> None:
        name = result.config.run_name
        if result.run_id and result.device:
            records.set_tag(result.run_id, st.DEVICE, result.device)
        if result.status == "FINISHED":
            outcome.done[result.config.config_hash()] = result.run_id
            outcome.trained.append(result.run_id)
            echo(f"finished {name} (run {result.run_id}) on {result.device}: test_acc {result.test_acc:.2f}% "
                 f"in {result.seconds:.1f} s")
        elif result.status == "SKIPPED":
            outcome.busy[result.config.config_hash()] = result.run_id or "-"
            echo(f"skipped  {name}: {result.reason}")
        else:
            if result.run_id:
                records.mark_failed(result.run_id, result.status, result.reason)
            outcome.failures.append(result)
            echo(f"{result.status:<8} {name} (run {result.run_id or '-'}): {result.reason.splitlines()[-1] if result.reason else ''}")

    with renderers as pool:
        try:
            executor.run(requests, settle)
        except KeyboardInterrupt as abort:
            release_interrupted(abort)  # before the parent's ending is recorded
            outcome.interrupted = True
        outcome.interrupted = outcome.interrupted or getattr(executor, "stopping", False)
        if outcome.busy:  # what other processes were training may have finished meanwhile
            after = records.plan(configs, commit)
            outcome.done.update(after.done)
            outcome.busy = dict(after.busy)
        echo(f"sweep: trained {len(outcome.trained)} children in {time.perf_counter() - started:.1f} s")
        if outcome.interrupted:
            records.finish_parent("KILLED")
        elif all(c.config_hash() in outcome.done for c in configs):
            try:
                started = time.perf_counter()
                compare_children(records, configs, outcome.done, out_dir, echo, pool)
                echo(f"sweep: comparison took {time.perf_counter() - started:.1f} s")
            except Exception:
                records.finish_parent("FAILED")
                raise
            records.finish_parent("FINISHED")
        elif outcome.failures:
            records.finish_parent("FAILED")
    return outcome


def training_order(configs: list[TrainConfig]) -> list[TrainConfig]:
    """The configs round robin over their steps_keys (bn-s1, ln-s1, gn-s1, bn-s2, ...), each
    key's in grid order. Runs at once then spread over the variants, so the trainers they
    leave serve their variants' next runs, rather than each run at once needing a trainer of
    every variant in turn (one compile and capture each); and the first runs are those whose
    steps an engine process prepares ahead."""
    from normlab.engine.config import steps_key

    groups: dict[tuple, list[TrainConfig]] = {}
    for config in configs:
        groups.setdefault(steps_key(config), []).append(config)
    rounds = max(map(len, groups.values()), default=0)
    return [group[i] for i in range(rounds) for group in groups.values() if i < len(group)]


def epochs_per_variant(configs: list[TrainConfig]) -> dict[tuple, int]:
    """The epochs of each steps_key (variant and batch size) in the sweep's grid: what decides
    whether its steps compile (Speedups.default), and so how its runs round. Taken from the
    whole grid, not from what is left to train or from one worker's share, so that every run of
    a study computes alike whether the sweep ran at once or was resumed, on one GPU or several
    (a worker then compiles though its share is smaller: 0.5-2.6 s on warm caches)."""
    from normlab.engine.config import steps_key

    total: dict[tuple, int] = {}
    for config in configs:
        total[steps_key(config)] = total.get(steps_key(config), 0) + config.epochs
    return total


def _import_comparison_in_background() -> None:
    """Import the comparison's modules (pandas, scipy's statistics, the figures: 1.35 s of a
    4.4 s first comparison on the 2-core CPU) while the runs train, not after the last one."""
    threading.Thread(target=importlib.import_module, args=("normlab.analysis.compare",),
                     name="normlab-import-comparison", daemon=True).start()


def _since_process_start() -> float:
    import normlab

    return time.time() - normlab.IMPORTED_AT


def compare_children(records, configs: list[TrainConfig], done: dict[str, str], out_dir: Path | None,
                     echo: Callable[[str], None], renderers: Executor | None = None) -> None:
    """The comparison of the finished children, logged on the parent (once per set of children);
    its figures drawn by ``renderers`` if given (analysis/renderers.py)."""
    from normlab.analysis.compare import run_comparison
    from normlab.tracking import sweep_records as st

    run_ids = [done[c.config_hash()] for c in configs]
    fingerprint = hashlib.sha256(",".join(sorted(run_ids)).encode()).hexdigest()[:12]
    if records.parent_tags().get(st.COMPARED) == fingerprint and out_dir is None:
        echo("comparison: already logged on the parent for these children")
        return
    with tempfile.TemporaryDirectory(prefix="normlab-compare-") as tmp:
        target = Path(out_dir) if out_dir else Path(tmp)
        result = run_comparison(target, experiment=records.experiment_name(), parent_run_id=records.parent_id,
                                run_ids=run_ids, log_to_run_id=records.parent_id, renderers=renderers)
    records.set_tag(records.parent_id, st.COMPARED, fingerprint)
    echo(f"comparison: logged under 'comparison/' of parent run {records.parent_id}")
    if out_dir is not None:
        echo(f"comparison: wrote {len(result.files)} files to {out_dir}/ "
             f"({', '.join(sorted(p.name for p in result.files.values()))})")
        if result.removed:
            echo(f"comparison: {result.removed_note(out_dir)}")
