"""A sweep: a grid of training configs run as child runs of one parent MLflow run.

Each child is `python -m normlab train ...` in its own process with MLFLOW_RUN_ID set to a
child run the sweep created under the parent, so a child is exactly an ordinary training
run (same code path, same logged content) and a crash in one child cannot take down the
others or the sweep. On a GPU, where one run leaves most of the chip idle, a process
trains several children side by side (`normlab train-side-by-side`: one thread, CUDA stream
and MLflow run each, the same training code, each run its own random streams). Coordination through MLflow (parent election, claims, liveness)
lives in sweep_tracking.py; this module owns the grid and the worker processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import normlab
from normlab import sweep_tracking as st
from normlab.models import NORMS, ConfigError
from normlab.train import TrainConfig

POLL_S = 5.0  # how often a worker re-reads the sweep while it waits (at once when a child exits)
# Runs per process on a GPU: three side by side had 1.5x the throughput of one after another
# on an H200, and six, nine or twelve no more (README, Speed). On a CPU each run has the cores.
SIDE_BY_SIDE_ON_GPU = 3


@dataclass(frozen=True)
class Grid:
    """The axes of a sweep; the default is the classic study (BN + L1, LN, GN, 20 epochs)."""

    norms: tuple[str, ...] = ("bn", "ln", "gn")
    l1: float = 1e-5
    l1_on: tuple[str, ...] = ("bn",)  # norms that get the L1 term; the others train with l1 = 0
    groups: tuple[int, ...] = (TrainConfig.groups,)  # only gn uses it
    batch_sizes: tuple[int, ...] = (TrainConfig.batch_size,)
    seeds: tuple[int, ...] = (1,)
    dataset: str = TrainConfig.dataset
    epochs: int = TrainConfig.epochs
    lr: float = TrainConfig.lr

    def configs(self) -> list[TrainConfig]:
        """Every child config in a fixed order (norm, groups, batch size, seed)."""
        out = []
        for norm in self.norms:
            for groups in self.groups if norm == "gn" else self.groups[:1]:
                for batch_size in self.batch_sizes:
                    for seed in self.seeds:
                        out.append(TrainConfig(norm=norm, groups=groups, l1=self.l1 if norm in self.l1_on else 0.0,
                                               dataset=self.dataset, epochs=self.epochs, batch_size=batch_size,
                                               lr=self.lr, seed=seed))
        return out

    def validate(self) -> list[TrainConfig]:
        """Check the axes and every child config; ConfigError names the first problem."""
        for axis in ("norms", "groups", "batch_sizes", "seeds"):
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

    def params(self) -> dict[str, str]:
        """The parent's params: the grid, as a user would type it."""
        return {
            "norms": ",".join(self.norms), "l1": f"{self.l1:g}", "l1_on": ",".join(self.l1_on),
            "groups": ",".join(map(str, self.groups)), "batch_sizes": ",".join(map(str, self.batch_sizes)),
            "seeds": ",".join(map(str, self.seeds)), "dataset": self.dataset, "epochs": str(self.epochs),
            "lr": f"{self.lr:g}", "children": str(len(self.configs())),
        }


def shard(configs: list[TrainConfig], k: int, n: int) -> list[TrainConfig]:
    """Share k of n (1-based), round robin so every share mixes norms and seeds."""
    if not (n >= 1 and 1 <= k <= n):
        raise ConfigError(f"--shard {k}/{n}: need 1 <= K <= N (K is 1-based)")
    return configs[k - 1::n]


def visible_gpus() -> list[str]:
    """GPU ids a child can be pinned to: CUDA_VISIBLE_DEVICES's entries, else 0..count-1."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def job_environment(slot: int, jobs: int, device: str, gpus: list[str], cpus: int) -> dict[str, str]:
    """Per-job environment: one GPU per job slot when there are several; CPU threads split."""
    env: dict[str, str] = {}
    if device in ("auto", "cuda") and len(gpus) > 1:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    elif (device == "cpu" or not gpus) and jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, cpus // jobs))  # N jobs x all cores oversubscribes
    return env


def side_by_side_default(device: str) -> int:
    """How many children one process trains at once when --side-by-side is not given."""
    from normlab.train import resolve_device

    return SIDE_BY_SIDE_ON_GPU if resolve_device(device).type == "cuda" else 1


def train_command(config: TrainConfig, data_dir: str, device: str) -> list[str]:
    """The `normlab train` command line for `config` (the child's config_hash tag is checked
    against the sweep's, so a drift between the two would show as a failed child)."""
    return [sys.executable, "-m", "normlab", "train", "--norm", config.norm, "--groups", str(config.groups),
            "--l1", repr(config.l1), "--dataset", config.dataset, "--data-dir", str(data_dir),
            "--epochs", str(config.epochs), "--batch-size", str(config.batch_size), "--lr", repr(config.lr),
            "--seed", str(config.seed), "--device", device]


@dataclass(frozen=True)
class Child:
    config: TrainConfig
    run_id: str
    attempt: int


@dataclass
class Job:
    """One training process and the children it trains (several when side by side)."""

    children: list[Child]
    slot: int
    process: subprocess.Popen
    log_path: Path
    started: float = field(default_factory=time.time)

    def output_of(self, child: Child) -> str:
        """The last lines the process printed about this child."""
        if len(self.children) == 1:
            return tail(self.log_path)
        prefix = f"[{child.config.run_name}] "
        lines = [line for line in tail(self.log_path, 10_000).splitlines() if line.startswith(prefix)]
        return "\n".join(lines[-15:]) or tail(self.log_path)


@dataclass
class Failure:
    config: TrainConfig
    run_id: str
    reason: str


@dataclass
class Outcome:
    done: dict[str, str]  # config hash -> finished child run id (whole grid)
    trained: list[str]  # run ids this worker trained to FINISHED
    failures: list[Failure]
    parent_id: str


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Interrupted(Exception):
    """SIGTERM or SIGINT: stop the children, mark them killed, exit."""


class SweepWorker:
    """Runs this worker's share of a sweep: claims open children and runs up to `jobs` at once."""

    def __init__(self, store, grid: Grid, share: list[TrainConfig], *, jobs: int, side_by_side: int,
                 data_dir: str, device: str, log_dir: Path, echo: Callable[[str], None] = print):
        from normlab.tracking import git_commit

        self.store = store
        self.grid = grid
        self.all_configs = grid.configs()
        self.share = share
        self.jobs = jobs
        self.side_by_side = side_by_side
        self.data_dir = data_dir
        self.device = device
        self.log_dir = log_dir
        self.echo = echo
        self.worker = st.Worker.me()
        self.commit = git_commit()
        self.started_at = time.time()
        self.gpus = visible_gpus() if device in ("auto", "cuda") else []
        self.cpus = os.cpu_count() or 1
        self.jobs_running: list[Job] = []
        self.lock = threading.Lock()
        self.stop_beating = threading.Event()

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> Outcome:
        tried: set[str] = set()
        trained: list[str] = []
        failures: list[Failure] = []
        beat = threading.Thread(target=self._heartbeat, daemon=True)
        beat.start()
        previous = {s: signal.signal(s, self._interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while True:
                states = self._states()
                for config in self.share:
                    state = states[config.config_hash()]
                    if state.kind == st.DEAD:
                        self.echo(f"{config.run_name}: run {state.child.run_id} was left RUNNING by a dead "
                                  f"worker; marking it FAILED and running it again")
                        self.store.mark_unsuccessful(state.child.run_id, "FAILED", "abandoned",
                                                     "its sweep process or training process died")
                        states[config.config_hash()] = st.State(st.OPEN, state.next_attempt)
                self._launch(states, tried)
                running = self._running_hashes()
                waiting = [h for h in (c.config_hash() for c in self.share)
                           if h not in running and states[h].kind == st.ACTIVE]
                finished_any = self._reap(trained, failures, timeout=POLL_S)
                if not self.jobs_running and not waiting and not finished_any and not self._launchable(states, tried):
                    break
        except Interrupted:
            self._stop_children()
            raise
        finally:
            self.stop_beating.set()
            for s, handler in previous.items():
                signal.signal(s, handler)
        states = self._states()
        done = {h: s.child.run_id for h, s in states.items() if s.kind == st.DONE}
        failed_ids = {f.config.config_hash() for f in failures}
        for config in self.share:  # whatever of the share is not done is reported, with why
            s = states[config.config_hash()]
            if s.kind == st.DONE or config.config_hash() in failed_ids:
                continue
            if s.kind == st.FAILED:  # failed in another worker during this sweep
                failures.append(Failure(config, s.child.run_id, s.child.tags.get(st.ERROR, "failed")))
            elif s.child is not None and s.child.status == "FINISHED":
                failures.append(Failure(config, s.child.run_id, (
                    f"finished with code version {s.child.tags.get(st.GIT_COMMIT)}, but this sweep runs "
                    f"{self.commit}: the code changed during the sweep; run again to retrain it")))
            else:
                failures.append(Failure(config, s.child.run_id if s.child else "-", f"not finished ({s.kind})"))
        return Outcome(done, trained, failures, self.store.parent_id)

    def _states(self) -> dict[str, st.State]:
        claims, children = self.store.snapshot()
        now = time.time()
        return {c.config_hash(): st.config_state(claims.get(c.config_hash(), []),
                                                      children.get(c.config_hash(), []),
                                                      commit=self.commit, now=now,
                                                      started_at=self.started_at, host=self.worker.host)
                for c in self.all_configs}

    def _launchable(self, states, tried) -> bool:
        return any(states[c.config_hash()].kind == st.OPEN and c.config_hash() not in tried
                   for c in self.share)

    def _running_hashes(self) -> set[str]:
        return {c.config.config_hash() for job in self.jobs_running for c in job.children}

    def _launch(self, states, tried: set[str]) -> None:
        batch: list[Child] = []
        running = self._running_hashes()
        for config in self.share:
            if len(self.jobs_running) >= self.jobs:
                return
            h = config.config_hash()
            state = states[h]
            if h in running or h in tried or state.kind != st.OPEN:
                continue
            if not self.store.claim(config, state.next_attempt, self.worker):
                continue  # another worker got it first
            tried.add(h)
            run_id = self.store.create_child(config, state.next_attempt, self.worker, self.commit)
            batch.append(Child(config, run_id, state.next_attempt))
            if len(batch) == self.side_by_side:
                self._start(batch)
                batch = []
        if batch:
            self._start(batch)

    def _start(self, children: list[Child]) -> None:
        slot = min(set(range(self.jobs)) - {j.slot for j in self.jobs_running})
        env = dict(os.environ)
        package_root = str(Path(normlab.__file__).resolve().parents[1])
        env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
        pinned = job_environment(slot, self.jobs, self.device, self.gpus, self.cpus)
        env.update(pinned)
        env["MLFLOW_TRACKING_URI"] = self.store.client.tracking_uri  # the store this sweep uses
        env["PYTHONUNBUFFERED"] = "1"
        first = children[0]
        log_path = self.log_dir / f"{first.config.run_name}-{first.run_id}.log"
        if len(children) == 1:
            env["MLFLOW_RUN_ID"] = first.run_id
            command = train_command(first.config, self.data_dir, self.device)
        else:
            runs_json = log_path.with_suffix(".json")
            runs_json.write_text(json.dumps([{"run_id": c.run_id, "config": asdict(c.config)} for c in children]))
            command = [sys.executable, "-m", "normlab", "train-side-by-side", "--runs-json", str(runs_json),
                       "--data-dir", str(self.data_dir), "--device", self.device]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        job = Job(children, slot, process, log_path)
        for child in children:
            self.store.set_tag(child.run_id, st.CHILD_PID, str(process.pid))
        with self.lock:
            self.jobs_running.append(job)
        where = f" on GPU {pinned['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in pinned else ""
        together = f", side by side in process {process.pid}" if len(children) > 1 else ""
        for child in children:
            self.echo(f"started  {child.config.run_name} (run {child.run_id}, attempt {child.attempt})"
                      f"{where}{together}")

    def _reap(self, trained: list[str], failures: list[Failure], timeout: float) -> bool:
        """Wait up to `timeout` for a training process to exit; record how each child ended."""
        deadline = time.time() + timeout
        ended = []
        while not ended:
            ended = [j for j in self.jobs_running if j.process.poll() is not None]
            if ended or time.time() >= deadline:
                break
            time.sleep(0.2)
        for job in ended:
            with self.lock:
                self.jobs_running.remove(job)
            for child in job.children:
                self._settle(job, child, trained, failures)
        return bool(ended)

    def _settle(self, job: Job, child: Child, trained: list[str], failures: list[Failure]) -> None:
        """A child is done when its run is FINISHED with its config; its process's exit code
        also covers its side-by-side siblings, so it only explains a failure."""
        code = job.process.returncode
        status, tags = self.store.status(child.run_id)
        seconds = time.time() - job.started
        if status == "FINISHED" and tags.get(st.CONFIG_HASH) == child.config.config_hash():
            acc = self.store.final_test_acc(child.run_id)
            self.echo(f"finished {child.config.run_name} (run {child.run_id}): test_acc "
                      f"{acc:.2f}% in {seconds:.0f} s")
            trained.append(child.run_id)
            return
        if code < 0:
            why = f"killed by signal {signal.Signals(-code).name}"
        elif code != 0:
            why = f"exited with status {code}"
        else:
            why = (f"exited 0 but its run is {status} with config_hash {tags.get(st.CONFIG_HASH)} "
                   f"(expected FINISHED with {child.config.config_hash()})")
        reason = f"{why}; last output:\n{job.output_of(child)}"
        self.store.mark_unsuccessful(child.run_id, "FAILED", "error", reason, job.log_path)
        failures.append(Failure(child.config, child.run_id, reason))
        self.echo(f"FAILED   {child.config.run_name} (run {child.run_id}): {why}")

    # -- heartbeat and interruption ------------------------------------------------------

    def _heartbeat(self) -> None:
        while not self.stop_beating.wait(st.HEARTBEAT_S):
            with self.lock:
                run_ids = [c.run_id for j in self.jobs_running for c in j.children]
            for run_id in run_ids:
                try:
                    self.store.heartbeat(run_id)
                except Exception as exc:  # a missed beat is harmless; a stale one is detected
                    self.echo(f"warning: heartbeat for run {run_id} failed: {exc}")

    def _interrupt(self, signum, frame) -> None:
        raise Interrupted(signal.Signals(signum).name)

    def _stop_children(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        jobs = list(self.jobs_running)
        for job in jobs:
            if job.process.poll() is None:
                job.process.terminate()
        for job in jobs:
            try:
                job.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                job.process.kill()
                job.process.wait()
            for child in job.children:
                self.store.mark_unsuccessful(child.run_id, "KILLED", "interrupted",
                                             "the sweep was interrupted", job.log_path)
                self.echo(f"stopped  {child.config.run_name} (run {child.run_id}): marked KILLED")


def check_resources(configs: list[TrainConfig], data_dir: str, device: str) -> None:
    """Device and data once, before any run exists: a missing dataset is downloaded here,
    not by N children racing into one folder, and too-large batch sizes fail now."""
    from normlab.data import load_raw
    from normlab.train import resolve_device

    resolve_device(device)
    raw = load_raw(configs[0].dataset, data_dir)
    for config in configs:
        config.check_fits(len(raw.train_labels))


def run_sweep(grid: Grid, *, experiment: str, data_dir: str, device: str, jobs: int,
              side_by_side: int | None = None, shard_k: int = 1, shard_n: int = 1,
              out_dir: Path | None = None, echo: Callable[[str], None] = print) -> Outcome:
    """Validate, open the parent, run this worker's share, then compare when the grid is done.

    ``jobs`` processes at a time, each training up to ``side_by_side`` children at once
    (None: SIDE_BY_SIDE_ON_GPU on a GPU, 1 on a CPU)."""
    configs = grid.validate()
    share = shard(configs, shard_k, shard_n)
    check_resources(configs, data_dir, device)
    side_by_side = side_by_side or side_by_side_default(device)
    store = st.SweepStore(experiment, grid.sweep_hash())
    parent_id, resumed = store.open_parent(grid.run_name(), grid.params())
    echo(f"sweep {grid.sweep_hash()}: {len(configs)} children, parent run {parent_id}"
         f"{' (existing: resuming or joining it)' if resumed else ''}; "
         f"this worker: {len(share)} (shard {shard_k}/{shard_n}), --jobs {jobs}, --side-by-side {side_by_side}")
    with tempfile.TemporaryDirectory(prefix="normlab-sweep-") as logs:
        worker = SweepWorker(store, grid, share, jobs=jobs, side_by_side=side_by_side, data_dir=data_dir,
                             device=device, log_dir=Path(logs), echo=echo)
        try:
            outcome = worker.run()
        except Interrupted:
            store.finish_parent("KILLED")
            raise
    complete = all(c.config_hash() in outcome.done for c in configs)
    if complete:
        try:
            compare_children(store, configs, outcome.done, out_dir, worker.worker, echo)
        except Exception:
            store.finish_parent("FAILED")
            raise
        store.finish_parent("FINISHED")
    elif outcome.failures:
        store.finish_parent("FAILED")
    return outcome


def compare_children(store, configs: list[TrainConfig], done: dict[str, str],
                     out_dir: Path | None, worker, echo: Callable[[str], None]) -> None:
    """The comparison of the finished children, logged on the parent.

    Once per set of children: a worker claims it like a child (so two workers finishing
    together do not write the same artifacts at once), and a claim whose owner died is
    taken over by the next sweep.
    """
    run_ids = [done[c.config_hash()] for c in configs]
    fingerprint = hashlib.sha256(",".join(sorted(run_ids)).encode()).hexdigest()[:12]
    _, tags = store.status(store.parent_id)
    if tags.get(st.COMPARED) == fingerprint:
        echo("comparison: already logged on the parent for these children")
        return
    claims = store.claims(st.COMPARE_PREFIX).get(fingerprint, [])
    latest = max(claims, key=lambda c: c.attempt, default=None)
    if latest is not None and st.claim_alive(latest, time.time(), worker.host):
        echo(f"comparison: being made by worker {latest.owner}")
        return
    if not store.claim_param(f"{st.COMPARE_PREFIX}{fingerprint}.{latest.attempt + 1 if latest else 1}", worker):
        echo("comparison: another worker claimed it first")
        return
    from normlab.compare import run_comparison

    with tempfile.TemporaryDirectory(prefix="normlab-compare-") as tmp:
        target = Path(out_dir) if out_dir else Path(tmp)
        run_comparison(target, experiment=store.experiment_name(), parent_run_id=store.parent_id,
                       run_ids=run_ids, log_to_run_id=store.parent_id)
    store.set_tag(store.parent_id, st.COMPARED, fingerprint)
    echo(f"comparison: logged on parent run {store.parent_id}")
