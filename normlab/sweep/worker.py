"""A warm worker: one per device, training run after run.

On a GPU a run's training takes seconds, while importing torch and MLflow, starting CUDA,
loading the data and compiling its step take longer. A worker pays those once: its engine,
a TrainerPool, keeps each dataset on its device and lends a finished run's model, compiled
step and captured CUDA graphs to its next run of that variant and batch size. Each request
is still one ordinary MLflow run trained by ``lifecycle.train_tracked``, exactly what
`normlab train` does (which is a worker with one run).

The pool is in this process, or (one GPU, normlab.engine.fast.engine_process) in an engine
process of its own, while this process tracks the runs: then more runs are handed over than
it trains at once, so that a run that finishes leaves its place to the next at once while its
artifacts and model are logged here.
"""

from __future__ import annotations

import collections
import time
import traceback
from dataclasses import dataclass, field, replace

import click
import torch

from normlab.engine.config import TrainConfig
from normlab.engine.fast.engine_process import EngineCrashed, EngineDied, EngineProcess
from normlab.engine.fast.trainer_pool import TrainerPool
from normlab.errors import ConfigError, DataError, ResumeError
from normlab.tracking import run_ending, run_log
from normlab.tracking.lifecycle import Ending, train_tracked
from normlab.tracking.redaction import redact

MAX_ATTEMPTS = 3  # tries per run when workers die under it, or captures break it
# CUDA errors that another thread's CUDA-graph capture causes in a run, or a run's capture
# meets from another thread's work: an event recorded on a capturing stream, then queried
# (pytorch/pytorch#193982), and the capture it invalidates. 2 of 30 runs of a 10-seed study
# (three at once, not compiled, 8,000 images an epoch) failed so on an H200; the runs after
# them in the same process finished
# (benchmarks/results/h200x2-2026-11-30-sweep10-8000images-1gpu-not-compiled.log).
CAPTURE_ERRORS = ("cudaErrorCapturedEvent", "cudaErrorStreamCaptureInvalidated")
LOG_LINES = 40  # the last lines of a run's output kept for its failure report


@dataclass(frozen=True)
class RunRequest:
    """One run for a worker: a new run (``tags`` name its sweep) or ``resume`` of ``run_id``."""

    config: TrainConfig
    tags: dict = field(default_factory=dict)
    experiment_id: str | None = None
    run_id: str | None = None
    resume: bool = False
    epochs_ahead: int = 0  # epochs of this variant in the sweep's grid (compile when they pay)


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


def worth_another_try(exc: BaseException) -> str | None:
    """Why a run failed for nothing wrong with the run itself, else None: one of
    CAPTURE_ERRORS (a CUDA error, so a torch.AcceleratorError, or its traceback from an
    engine process), or an engine process that died under it."""
    if isinstance(exc, EngineDied):
        return f"{exc} under this run"
    if isinstance(exc, (torch.AcceleratorError, EngineCrashed)) and any(name in str(exc) for name in CAPTURE_ERRORS):
        return "a CUDA-graph capture broke this run"
    return None


class Worker:
    """Tracks requests on one device, each run trained by its engine (see the module's docstring)."""

    def __init__(self, device: str, data_dir: str, experiment: str, checkpoint_dir: str,
                 concurrent: int | None = None, bars: bool = False, name: str | None = None,
                 engine: EngineProcess | None = None):
        """``engine``: an engine process that trains the runs; without one, a TrainerPool
        on ``device`` in this process (``concurrent`` and ``name`` are its)."""
        self.engine = engine or TrainerPool(device, data_dir, concurrent, name)
        self.data_dir = data_dir
        self.experiment = experiment
        self.checkpoint_dir = checkpoint_dir
        self.bars = bars
        self.stop_reason: str | None = None

    @property
    def concurrent(self) -> int:
        """Runs trained at once."""
        return self.engine.concurrent

    @property
    def threads(self) -> int:
        """Threads that track runs: one per run trained at once, twice that with an engine
        process, whose places then never wait for the artifacts of the run before."""
        return self.concurrent * (2 if isinstance(self.engine, EngineProcess) else 1)

    @property
    def device_name(self) -> str:
        return self.engine.device_name

    def stream(self):
        """A context for one thread of runs (TrainerPool.stream)."""
        return self.engine.stream()

    def request_stop(self, reason: str) -> None:
        """Stop every run at the end of its current step; later requests are not started."""
        self.stop_reason = reason
        self.engine.request_stop(reason)

    def train(self, request: RunRequest, echo=None, on_run=None, handed_over=None) -> RunResult:
        """Train one request to its end; never raises for the run's own failures.
        ``on_run(run_id)`` is called once the request's run exists (and for a retry's);
        ``handed_over()`` once the engine has it (it may wait there for a place).

        A run that a CUDA-graph capture or a dying engine process broke (worth_another_try:
        nothing wrong with the run itself) is tried again here, resumed from its checkpoint,
        up to MAX_ATTEMPTS in all."""
        lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES)

        def say(message: str, err: bool = False) -> None:
            for line in redact(str(message)).splitlines():
                lines.append(line)
                (echo or click.echo)(f"[{request.config.run_name}] {line}", err=err)

        attempts: dict[str, int] = {}
        while True:
            result, broken = self._train_once(request, say, lines, on_run, handed_over)
            retry = retry_request(request, result, attempts, self.checkpoint_dir) if broken else None
            if retry is None:
                return result
            say(f"{broken}; trying it again ({'resuming' if retry.resume else 'anew'})")
            request = retry

    def _train_once(self, request: RunRequest, say, lines: collections.deque,
                    on_run, handed_over) -> tuple[RunResult, str | None]:
        """One try: the request's result, and why it is worth another (worth_another_try)."""
        from normlab.engine.train import TrainingStopped
        from normlab.errors import LeaseHeld
        from normlab.tracking import resume
        from normlab.tracking.sweep_records import create_child_run

        start = time.perf_counter()
        config = request.config

        def result(status: str, reason: str = "", ending: Ending | None = None, run_id=None,
                   broken: str | None = None) -> tuple[RunResult, str | None]:
            return RunResult(config, run_id or (ending.run_id if ending else request.run_id), status, reason,
                             ending.test_acc if ending else None, time.perf_counter() - start,
                             self._device_name()), broken

        if self.stop_reason is not None:
            return result("KILLED", f"not started: {self.stop_reason}")
        trainer, run_id, ending = None, None, None
        try:
            point = resume.find(request.run_id, config, set(), self.checkpoint_dir) if request.resume else None
            trainer = self.engine.trainer(config, request.epochs_ahead, point.state if point else None)
            if handed_over is not None:
                handed_over()
            data = trainer.data  # an engine process's: once it has built the trainer
            if trainer.took_over:
                say(f"takes over the model and steps of {trainer.took_over}"
                    f"{': nothing to compile or capture' if data.device.type == 'cuda' else ''}")
            if point is not None:
                resume.check_same_data(point, data.digest)
                say(f"resuming run {point.run_id} after epoch {trainer.epoch} ({point.source})")
            run_id = request.run_id if not request.resume else None
            if point is None and request.tags:
                run_id = create_child_run(request.experiment_id, config, request.tags)
                if run_id is None:
                    return result("SKIPPED", "another process trains or trained it")
            if on_run is not None:
                on_run(run_id or request.run_id)
            ending = train_tracked(trainer, point, self.data_dir, self.experiment, self.checkpoint_dir,
                                   run_id=run_id, echo=say, bars=self.bars and self.threads == 1)
        except LeaseHeld as exc:
            return result("SKIPPED", str(exc))
        except TrainingStopped as exc:  # an engine process's, stopped before the run existed
            return result("KILLED", str(exc))
        except (ConfigError, DataError, ResumeError) as exc:
            say(f"Error: {exc}", err=True)
            if request.run_id and not request.resume:
                run_ending.fail_run_if_open(request.run_id, str(exc))
            return result("FAILED", str(exc))
        except Exception as exc:  # a bug, a broken capture, a dead engine: train_tracked recorded it
            say("".join(traceback.format_exception(exc)), err=True)
            return result("FAILED", "\n".join(lines), run_id=run_id, broken=worth_another_try(exc))
        finally:
            if trainer is not None:
                self.engine.release(trainer, finished=ending is not None and ending.outcome == "finished")
        if ending.aborted:
            raise KeyboardInterrupt
        if ending.outcome != "finished":
            run_log.attach_log(ending.run_id, "\n".join(lines))
            return result(ending.status, "\n".join(list(lines)[-15:]), ending)
        return result("FINISHED", "", ending)

    def _device_name(self) -> str:
        """The device_name, or nothing where an engine process died before it said."""
        try:
            return self.device_name
        except EngineDied:
            return ""
