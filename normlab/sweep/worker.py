"""A warm worker: one process per device that trains run after run.

On a GPU a run's training takes seconds, while importing torch and MLflow, starting CUDA,
loading the data and compiling its step take longer. A worker pays those once: it keeps
each dataset on its device, and a run that finishes leaves its model, compiled step and
captured CUDA graphs to the worker's next run of that variant and batch size. Each
request is still one ordinary MLflow run trained by ``lifecycle.train_tracked``, exactly
what `normlab train` does (which is a worker with one run).

On a GPU a worker trains up to ``concurrent`` runs at once, each in a thread with its own
CUDA stream, because one run of this small model leaves most of the chip idle. Compiling
and capturing are not thread-safe; Trainer.prepare does them one run at a time.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator

import click
import torch

from normlab.engine.data import DeviceData, load_raw
from normlab.engine.config import TrainConfig, steps_key
from normlab.engine.train import Trainer, resolve_device
from normlab.errors import ConfigError, DataError, ResumeError
from normlab.tracking import run_log
from normlab.tracking.lifecycle import Ending, train_tracked
from normlab.tracking.redaction import redact

# Runs a GPU worker trains at once, each in a thread with its own CUDA stream: one run of this
# small model leaves most of the chip idle. On an H200 the 10-seed study (30 runs, warm) took
# 112.0 s three at once against 159.9 s one after another, 30 of 30 finished both ways
# (benchmarks/results/h200-2026-11-30-e2e-10seeds-x3-vs-x1.txt). Earlier, 5 of 30 captures
# failed three at once: a new pooled stream per capture was, after 32 captures, another
# thread's (stream() and chunked_steps.capture_stream rule that out). A CPU run uses every
# core alone.
RUNS_PER_GPU = 3
MAX_ATTEMPTS = 3  # tries per run when workers die under it, or captures break it
# CUDA errors that another thread's CUDA-graph capture causes in a run, or a run's capture
# meets from another thread's work: an event recorded on a capturing stream, then queried
# (pytorch/pytorch#193982), and the capture it invalidates. 2 of 30 runs of a 10-seed study
# (three at once, not compiled, 8,000 images an epoch) failed so on an H200; the runs after
# them in the same process finished
# (benchmarks/results/h200x2-2026-11-30-sweep10-8000images-1gpu-not-compiled.log).
CAPTURE_ERRORS = ("cudaErrorCapturedEvent", "cudaErrorStreamCaptureInvalidated")
LOG_LINES = 40  # the last lines of a run's output kept for its failure report
POOLED_STREAMS = 32  # torch's pool of CUDA streams per device and priority (c10/cuda/CUDAStream.h)
HIGH_PRIORITY = -1  # the pool a worker's threads take their streams from


# A run that finishes leaves its trainer to the worker's next run of the same steps_key
# (variant, L1, dropout, batch size), which takes over its model, compiled step and captured
# CUDA graphs with its own weights, optimizer and random streams (Trainer's ``warm``), instead
# of capturing, and compiling on a new model, again; NORMLAB_REUSE_STEPS=0 turns it off.
# Measured: docs/speed.md. Up to IDLE_TRAINERS_PER_RUN_AT_ONCE idle trainers per run a
# worker trains at once are kept (their graphs hold GPU memory); the oldest go first.
IDLE_TRAINERS_PER_RUN_AT_ONCE = 4


def reuse_steps() -> bool:
    """Whether a worker's runs take over finished runs' trainers: NORMLAB_REUSE_STEPS, 1 (default) or 0."""
    value = os.environ.get("NORMLAB_REUSE_STEPS", "1")
    if value not in ("0", "1"):
        raise ConfigError(f"NORMLAB_REUSE_STEPS={value!r}; valid: 1 (reuse, the default) or 0")
    return value == "1"


def runs_per_gpu() -> int:
    """How many runs a GPU worker trains at once: NORMLAB_RUNS_PER_GPU, else RUNS_PER_GPU."""
    value = os.environ.get("NORMLAB_RUNS_PER_GPU", str(RUNS_PER_GPU))
    if not value.isdigit() or not 1 <= int(value) <= POOLED_STREAMS:
        raise ConfigError(f"NORMLAB_RUNS_PER_GPU={value!r}; valid: a whole number from 1 to {POOLED_STREAMS}")
    return int(value)


@dataclass(frozen=True)
class RunRequest:
    """One run for a worker: a new run (``tags`` name its sweep) or ``resume`` of ``run_id``."""

    config: TrainConfig
    tags: dict = field(default_factory=dict)
    experiment_id: str | None = None
    run_id: str | None = None
    resume: bool = False
    epochs_ahead: int = 0  # epochs of this variant a worker trains in this sweep (compile when it pays)


@dataclass(frozen=True)
class RunResult:
    """What a worker reports of a request; ``status`` is FINISHED, FAILED, KILLED, or
    SKIPPED when another process already trains or trained it."""

    config: TrainConfig
    run_id: str | None
    status: str
    reason: str = ""
    test_acc: float | None = None
    seconds: float = 0.0
    device: str = ""


def retry_request(request: RunRequest, result: RunResult, attempts: dict[str, int],
                  checkpoint_dir: str | None = None) -> RunRequest | None:
    """The request that tries a run again after its worker died or a capture broke it (see
    CAPTURE_ERRORS), or None when out of tries: a resume of its run when it has a checkpoint
    (the artifact, or a local copy in ``checkpoint_dir`` on this machine), else a new run (it
    failed before its first epoch)."""
    key = request.config.config_hash()
    attempts[key] = attempts.get(key, 1) + 1
    if attempts[key] > MAX_ATTEMPTS:
        return None
    if result.run_id and has_checkpoint(result.run_id, checkpoint_dir):
        return replace(request, run_id=result.run_id, resume=True)
    return replace(request, run_id=None, resume=False)


def has_checkpoint(run_id: str, checkpoint_dir: str | None) -> bool:
    """Whether a resume of the run has a checkpoint to start from, here or in the store."""
    from normlab.tracking.run_log import local_checkpoint_path
    from normlab.tracking.sweep_records import has_checkpoint as has_checkpoint_artifact

    if checkpoint_dir and local_checkpoint_path(checkpoint_dir, run_id).exists():
        return True
    return has_checkpoint_artifact(run_id)


def broken_by_a_capture(exc: BaseException) -> bool:
    """Whether a run failed with one of CAPTURE_ERRORS (a CUDA error, so a torch.AcceleratorError)."""
    return isinstance(exc, torch.AcceleratorError) and any(name in str(exc) for name in CAPTURE_ERRORS)


class Worker:
    """Trains requests in this process on one device, keeping data and compiled steps warm."""

    def __init__(self, device: str, data_dir: str, experiment: str, checkpoint_dir: str,
                 concurrent: int | None = None, bars: bool = False, name: str | None = None):
        """``name`` tells this worker from others on the same device (CPU workers sharing
        the cores) in its runs' normlab.worker_device tag."""
        self.device = resolve_device(device)
        self.name = name
        self.data_dir = data_dir
        self.experiment = experiment
        self.checkpoint_dir = checkpoint_dir
        self.concurrent = concurrent or (runs_per_gpu() if self.device.type == "cuda" else 1)
        self.bars = bars
        self.datasets: dict[str, DeviceData] = {}
        self.compiled: set[tuple] = set()  # steps_keys compiled in this process: later runs reuse them
        self.reuse_steps = reuse_steps()
        self.idle: collections.OrderedDict[tuple, list[Trainer]] = collections.OrderedDict()  # steps_key -> finished
        self.trainers: list[Trainer] = []
        self.stop_reason: str | None = None
        self.lock = threading.Lock()
        self.streams: list[torch.cuda.Stream] = []  # on a GPU: every stream this worker took
        self.idle_streams: list[torch.cuda.Stream] = []  # ...and those no thread holds now

    @property
    def device_name(self) -> str:
        """The device as the machine numbers it (a worker pinned with CUDA_VISIBLE_DEVICES=3
        sees its GPU as cuda:0, and calls it cuda:3), and the worker's name if it has one."""
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            visible = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
            number = visible[index] if index < len(visible) else index
            where = f"cuda:{number} ({torch.cuda.get_device_name(index)})"
        else:
            where = self.device.type
        return f"{where} {self.name}" if self.name else where

    def data(self, dataset: str) -> DeviceData:
        """The dataset on this worker's device, loaded on first use (one thread at a time)."""
        with self.lock:
            if dataset not in self.datasets:
                self.datasets[dataset] = DeviceData(load_raw(dataset, self.data_dir), self.device)
                if self.device.type == "cuda":  # copied on this thread's stream; others read it next
                    torch.cuda.synchronize(self.device)
            return self.datasets[dataset]

    def request_stop(self, reason: str) -> None:
        """Stop every run at the end of its current step; later requests are not started."""
        with self.lock:
            self.stop_reason = reason
            for trainer in self.trainers:
                trainer.request_stop(reason)

    def train(self, request: RunRequest, echo=None, on_run=None) -> RunResult:
        """Train one request to its end; never raises for the run's own failures.
        ``on_run(run_id)`` is called once the request's run exists (and for a retry's).

        A run that a CUDA-graph capture broke (CAPTURE_ERRORS: nothing wrong with the run
        itself) is tried again here, resumed from its checkpoint, up to MAX_ATTEMPTS in all."""
        lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES)

        def say(message: str, err: bool = False) -> None:
            for line in redact(str(message)).splitlines():
                lines.append(line)
                (echo or click.echo)(f"[{request.config.run_name}] {line}", err=err)

        attempts: dict[str, int] = {}
        while True:
            result, broken = self._train_once(request, say, lines, on_run)
            retry = retry_request(request, result, attempts, self.checkpoint_dir) if broken else None
            if retry is None:
                return result
            say(f"a CUDA-graph capture broke this run; trying it again ({'resuming' if retry.resume else 'anew'})")
            request = retry

    def _train_once(self, request: RunRequest, say, lines: collections.deque,
                    on_run) -> tuple[RunResult, bool]:
        """One try: the request's result, and whether a capture broke it."""
        from normlab.errors import LeaseHeld
        from normlab.tracking import resume
        from normlab.tracking.sweep_records import create_child_run

        start = time.perf_counter()
        config = request.config

        def result(status: str, reason: str = "", ending: Ending | None = None, run_id=None,
                   broken: bool = False) -> tuple[RunResult, bool]:
            return RunResult(config, run_id or (ending.run_id if ending else request.run_id), status, reason,
                             ending.test_acc if ending else None, time.perf_counter() - start,
                             self.device_name), broken

        if self.stop_reason is not None:
            return result("KILLED", f"not started: {self.stop_reason}")
        trainer, run_id = None, None
        try:
            data = self.data(config.dataset)
            key = steps_key(config)
            ahead = float("inf") if key in self.compiled else max(request.epochs_ahead, config.epochs)
            warm = self._take_idle(key)
            trainer = Trainer(config, data, epochs_ahead=ahead, warm=warm)
            if warm is not None:
                say(f"takes over the model and steps of {warm.config.run_name}, which finished before it in "
                    f"this worker{': nothing to compile or capture' if self.device.type == 'cuda' else ''}")
            if trainer.speedups.compile:
                self.compiled.add(key)
            point = None
            if request.resume:
                point = resume.find(request.run_id, config, set(), self.checkpoint_dir)
                resume.check_same_data(point, data.digest)
                trainer.load_state_dict(point.state)
                say(f"resuming run {point.run_id} after epoch {trainer.epoch} ({point.source})")
            run_id = request.run_id if not request.resume else None
            if point is None and request.tags:
                run_id = create_child_run(request.experiment_id, config, request.tags)
                if run_id is None:
                    return result("SKIPPED", "another process trains or trained it")
            if on_run is not None:
                on_run(run_id or request.run_id)
            with self.lock:
                self.trainers.append(trainer)
                if self.stop_reason is not None:
                    trainer.request_stop(self.stop_reason)
            ending = train_tracked(trainer, point, self.data_dir, self.experiment, self.checkpoint_dir,
                                   run_id=run_id, echo=say, bars=self.bars and self.concurrent == 1)
        except LeaseHeld as exc:
            return result("SKIPPED", str(exc))
        except (ConfigError, DataError, ResumeError) as exc:
            say(f"Error: {exc}", err=True)
            if request.run_id and not request.resume:
                run_log.fail_run_if_open(request.run_id, str(exc))
            return result("FAILED", str(exc))
        except Exception as exc:  # a bug or a broken capture: train_tracked recorded it; report with the traceback
            say("".join(traceback.format_exception(exc)), err=True)
            return result("FAILED", "\n".join(lines), run_id=run_id, broken=broken_by_a_capture(exc))
        finally:
            if trainer is not None:
                with self.lock:
                    if trainer in self.trainers:
                        self.trainers.remove(trainer)
        if ending.aborted:
            raise KeyboardInterrupt
        if ending.outcome == "finished":
            self._keep_idle(key, trainer)
        else:
            run_log.attach_log(ending.run_id, "\n".join(lines))
            return result(ending.status, "\n".join(list(lines)[-15:]), ending)
        return result("FINISHED", "", ending)

    def _take_idle(self, key: tuple) -> Trainer | None:
        """A finished run's trainer of this steps_key for the next run to take over, if any."""
        with self.lock:
            idle = self.idle.get(key)
            return idle.pop() if idle else None

    def _keep_idle(self, key: tuple, trainer: Trainer) -> None:
        """Keep a finished run's trainer for a later run of its steps_key; the oldest kept go
        when there are more than IDLE_TRAINERS_PER_RUN_AT_ONCE per run trained at once."""
        if not self.reuse_steps:
            return
        with self.lock:
            self.idle.setdefault(key, []).append(trainer)
            self.idle.move_to_end(key)
            while sum(map(len, self.idle.values())) > IDLE_TRAINERS_PER_RUN_AT_ONCE * self.concurrent:
                oldest = next(iter(self.idle))
                self.idle[oldest].pop(0)
                if not self.idle[oldest]:
                    del self.idle[oldest]

    @contextmanager
    def stream(self) -> Iterator[None]:
        """A context for one thread of runs: on a GPU, a CUDA stream that no other thread holds
        meanwhile, on which its runs train and capture their graphs.

        torch.cuda.Stream() hands out 32 pooled streams round robin, so a stream taken anew per
        thread or per run is sooner or later one that another thread still trains on. The
        worker keeps the streams it took (from the high-priority pool, which nothing else in
        normlab draws from) and lends each to one thread at a time."""
        if self.device.type != "cuda":
            yield
            return
        with self.lock:
            stream = self.idle_streams.pop() if self.idle_streams else self._new_stream()
        try:
            with torch.cuda.stream(stream):
                yield
        finally:
            with self.lock:
                self.idle_streams.append(stream)

    def _new_stream(self) -> torch.cuda.Stream:
        """A pooled stream that none of this worker's streams already is."""
        held = {s.cuda_stream for s in self.streams}
        for _ in range(POOLED_STREAMS):
            stream = torch.cuda.Stream(self.device, priority=HIGH_PRIORITY)
            if stream.cuda_stream not in held:
                self.streams.append(stream)
                return stream
        raise RuntimeError(f"a worker cannot hold more than {POOLED_STREAMS} CUDA streams "
                           f"({len(self.streams)} held)")
