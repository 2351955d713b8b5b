"""A training run's life in MLflow: start (or resume) it, fit with progress, checkpoints and
per-epoch metrics, and record how it ended (finished, interrupted, failed) in its status and tags.

`normlab train` and every sweep worker call ``train_tracked`` for each run, so a sweep's child
is exactly what a run trained alone is. It returns how the run ended instead of exiting, so a
worker can go on to its next run; the command line turns the ending into an exit status.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable

import click

from normlab.engine.train import Callbacks, EpochRecord
from normlab.tracking import results_log, results_process, run_ending, run_log

Echo = Callable[..., None]  # echo(message, err=False)


class Progress(Callbacks):
    """A bar per epoch on a terminal; one line per epoch otherwise (logs, CI, mlflow run)."""

    def __init__(self, epochs: int, echo: Echo, bars: bool):
        self.epochs = epochs
        self.echo = echo
        self.bars = bars and sys.stdout.isatty()
        self.bar = None

    def epoch_started(self, epoch: int, steps: int) -> None:
        if self.bars:
            self.bar = click.progressbar(length=steps, label=f"epoch {epoch}/{self.epochs}")
            self.bar.__enter__()

    def step_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def epoch_done(self, record: EpochRecord) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
        self.echo(f"epoch {record.epoch:>3}/{self.epochs}  train_loss {record.train_loss:.4f}  "
                  f"train_acc {record.train_acc:6.2f}%  test_loss {record.test_loss:.4f}  "
                  f"test_acc {record.test_acc:6.2f}%  ({record.seconds:.1f} s)")


@dataclass(frozen=True)
class Ending:
    """How a run ended: ``outcome`` is finished, interrupted or failed (run_ending.RUN_STATUS)."""

    run_id: str
    outcome: str
    reason: str = ""
    test_acc: float | None = None
    test_loss: float | None = None
    aborted: bool = False  # a second Ctrl-C: the process should exit at once

    @property
    def status(self) -> str:
        return run_ending.RUN_STATUS[self.outcome]


def train_tracked(trainer, point, data_dir: str, experiment: str, checkpoint_dir: str,
                  run_id: str | None = None, echo: Echo = click.echo, bars: bool = True) -> Ending:
    """Fit inside an MLflow run and record how it ended: finished, interrupted (a stop
    request) or failed (diverged, store unreachable, any error), in tags as well as the run
    status; returns that ending. Errors that are not about this run's training (a bug)
    are recorded and raised.

    ``point`` is a resume.ResumePoint or None; ``run_id`` a run made beforehand (by a
    sweep); ``echo`` prints a line about this run (a worker prefixes it with the run's name).
    """
    from normlab.tracking.lease import Lease

    if point is None:
        run = run_log.start_training_run(trainer.config, experiment, run_id)
        owned = Lease(run.info.run_id, contested=False)
    else:
        owned = Lease(point.run_id)  # refuses (LeaseHeld) while another process trains it
        run = run_log.resume_training_run(point.run_id, trainer.epoch)
    try:
        return _train_in_run(trainer, point, run.info.run_id, data_dir, checkpoint_dir, echo, bars)
    finally:
        owned.release()


def _train_in_run(trainer, point, run_id: str, data_dir: str, checkpoint_dir: str, echo: Echo,
                  bars: bool) -> Ending:
    from mlflow.exceptions import MlflowException

    from normlab.engine.interrupts import release_interrupted
    from normlab.engine.train import CallbackList, TrainingStopped, fit
    from normlab.errors import NonFiniteLoss
    from normlab.tracking.redaction import redact

    config, data = trainer.config, trainer.data
    local = run_log.local_checkpoint_path(checkpoint_dir, run_id)
    resume_hint = f"resume with: normlab train --resume {run_id}"
    started, phases = time.perf_counter(), {}
    uploads = run_log.EpochUploads(run_id)
    checkpointer = None
    try:
        echo(f"MLflow run {run_id} ({config.run_name}); checkpoints: {local} and artifact "
             f"{run_log.CHECKPOINT_ARTIFACT}")
        if point is None:
            run_log.mark_running()
            run_log.log_run_setup(config, data, trainer.model, data_dir, trainer.speedups.described())
        else:
            relogged = run_log.log_missing_epochs(run_id, point.records)
            if relogged:
                echo(f"logged the metrics of epochs {relogged} from the checkpoint")
            if point.source_is_local:  # the artifact may lag behind: bring it up to date
                uploads.submit(run_log.upload_checkpoint, run_id, local)
            if trainer.epoch < config.epochs:
                run_log.tag_resumed_speedups(run_id, trainer.speedups.described(), trainer.epoch + 1)
        checkpointer = run_log.Checkpointer(trainer, uploads, local, point.records if point else [])
        phases["setup"] = time.perf_counter() - started
        phases["compile and capture"] = trainer.prepare() if trainer.epoch < config.epochs else 0.0
        if data.device.type == "cuda" or results_process.current() is not None:
            # The host idles while the GPU trains (and a results process warms itself up). On a
            # CPU the warm-up takes the training's own cores: on the 2-core machine, 3 epochs
            # took 4.1 s instead of 1.8 s for 1.7 s saved.
            results_log.warm_up_results_logging_in_background(config, data)
        progress = Progress(config.epochs, echo, bars)
        started = time.perf_counter()
        result = fit(trainer, CallbackList(checkpointer, run_log.MetricLogger(uploads), progress))
        phases["training and evaluation"] = time.perf_counter() - started
        started = time.perf_counter()
        uploads.close()
        results_log.log_results(config, data, result)
        phases["artifacts and model"] = time.perf_counter() - started
    except TrainingStopped as exc:
        _close_quietly(uploads)
        if checkpointer is not None and checkpointer.records:
            reason = f"{exc}; {resume_hint}"
            echo(f"interrupted: {exc}.\nLast checkpoint: {local}; {resume_hint}", err=True)
        else:
            reason = f"{exc}; no epoch completed, so there is nothing to resume: train it again"
            echo(f"interrupted: {reason}", err=True)
        run_ending.record_ending(run_id, "interrupted", reason)
        return Ending(run_id, "interrupted", reason)
    except KeyboardInterrupt as abort:
        release_interrupted(abort)
        reason = f"aborted by a second Ctrl-C; epochs up to the last checkpoint are kept; {resume_hint}"
        run_ending.record_ending(run_id, "interrupted", reason)
        echo(f"aborted: {reason}", err=True)
        return Ending(run_id, "interrupted", reason, aborted=True)
    except NonFiniteLoss as exc:
        _close_quietly(uploads)
        run_ending.record_ending(run_id, "failed", str(exc))
        echo(f"Error: {exc}", err=True)
        return Ending(run_id, "failed", str(exc))
    except MlflowException as exc:
        reason = f"MLflow failed during training: {redact(str(exc).splitlines()[0])}"
        run_ending.record_ending(run_id, "failed", f"{reason}; {resume_hint}")
        message = f"{reason}\nCompleted epochs are checkpointed in {local}; {resume_hint}"
        echo(f"Error: {message}", err=True)
        return Ending(run_id, "failed", message)
    except BaseException as exc:
        run_ending.record_ending(run_id, "failed", redact(f"{type(exc).__name__}: {exc}"))
        raise
    if run_ending.record_ending(run_id, "finished"):
        shutil.rmtree(local.parent, ignore_errors=True)  # the artifact keeps the final checkpoint
    final = checkpointer.records[-1] if checkpointer.records else None
    if final is None:
        return Ending(run_id, "finished")
    echo(f"done: test accuracy {final['test_acc']:.2f}%, test loss {final['test_loss']:.4f}")
    echo("phases: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in phases.items())
         + f"; training waited {uploads.waited_seconds:.2f} s for MLflow")
    return Ending(run_id, "finished", test_acc=final["test_acc"], test_loss=final["test_loss"])


def _close_quietly(uploads) -> None:
    """Log what the completed epochs queued before recording the ending; a store that fails
    now is already the reason, or will be reported by record_ending."""
    try:
        uploads.close()
    except Exception:
        pass
