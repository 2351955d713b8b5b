"""A training run's life in MLflow: start (or resume) it, fit with progress, checkpoints and
per-epoch metrics, and record how it ended (finished, interrupted, failed) in its status and tags.

`normlab train` and every sweep worker call ``train_tracked`` for each run, so a sweep's child
is exactly what a run trained alone is.
"""

from __future__ import annotations

import sys

import click

from normlab.train import Callbacks, EpochRecord


class Progress(Callbacks):
    """A bar per epoch on a terminal; one line per epoch otherwise (logs, CI, mlflow run)."""

    def __init__(self, epochs: int, stream=None, prefix: str = ""):
        self.epochs = epochs
        self.stream = stream or sys.stdout
        self.prefix = prefix  # set for runs side by side: no bars then, one prefixed line per epoch
        self.bar = None

    def epoch_started(self, epoch: int, steps: int) -> None:
        if self.stream.isatty() and not self.prefix:
            self.bar = click.progressbar(length=steps, label=f"epoch {epoch}/{self.epochs}", file=self.stream)
            self.bar.__enter__()

    def step_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def epoch_done(self, record: EpochRecord) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
        click.echo(
            f"{self.prefix}epoch {record.epoch:>3}/{self.epochs}  train_loss {record.train_loss:.4f}  "
            f"train_acc {record.train_acc:6.2f}%  test_loss {record.test_loss:.4f}  "
            f"test_acc {record.test_acc:6.2f}%  ({record.seconds:.1f} s)",
            file=self.stream,
        )


def train_tracked(trainer, point, data_dir: str, experiment: str, checkpoint_dir: str, signals: list[int],
                  run_id: str | None = None, prefix: str = "") -> None:
    """Fit inside an MLflow run and record how it ended: finished, interrupted (a signal) or
    failed (diverged, store unreachable, any error), in tags as well as the run status.

    ``signals`` lists those received (interrupts.stop_on_signals), for the exit code;
    ``run_id`` is a run made beforehand (by a sweep); ``prefix`` starts every line printed,
    so runs side by side can be told apart.
    """
    import shutil

    from mlflow.exceptions import MlflowException

    from normlab import tracking
    from normlab.interrupts import exit_code
    from normlab.train import CallbackList, NonFiniteLoss, TrainingStopped, fit

    def say(message: str, err: bool = False) -> None:
        click.echo("\n".join(prefix + line for line in message.splitlines()), err=err)

    config, data = trainer.config, trainer.data
    if point is None:
        run = tracking.start_training_run(config, experiment, run_id)
    else:
        run = tracking.resume_training_run(point.run_id, trainer.epoch)
    run_id = run.info.run_id
    local = tracking.local_checkpoint_path(checkpoint_dir, run_id)
    resume_hint = f"resume with: normlab train --resume {run_id}"
    uploads = tracking.EpochUploads(run_id)
    try:
        say(f"MLflow run {run_id} ({config.run_name}); checkpoints: {local} and artifact "
            f"{tracking.CHECKPOINT_ARTIFACT}")
        if point is None:
            tracking.mark_running()
            tracking.log_run_setup(config, data, trainer.model, data_dir)
        else:
            relogged = tracking.log_missing_epochs(run_id, point.records)
            if relogged:
                say(f"logged the metrics of epochs {relogged} from the checkpoint")
        checkpointer = tracking.Checkpointer(trainer, uploads, local, point.records if point else [])
        progress = Progress(config.epochs, prefix=prefix)
        if trainer.speedups.cuda_graphs and trainer.epoch < config.epochs:
            say("compiling the training step and capturing its CUDA graphs (10-25 s the first time on "
                "this machine, about 1 s once Inductor's cache holds the variant)")
            say(f"step ready in {trainer.prepare():.1f} s")
        result = fit(trainer, CallbackList(checkpointer, tracking.MetricLogger(uploads), progress))
        uploads.close()
        tracking.log_results(config, data, result)
    except TrainingStopped as exc:
        _close_quietly(uploads)
        tracking.record_ending(run_id, "interrupted", f"{exc}; {resume_hint}")
        say(f"interrupted: {exc}.\nLast checkpoint: {local}; {resume_hint}", err=True)
        sys.exit(exit_code(signals[0]))
    except KeyboardInterrupt:
        reason = f"aborted by a second Ctrl-C; epochs up to the last checkpoint are kept; {resume_hint}"
        tracking.record_ending(run_id, "interrupted", reason)
        say(f"aborted: {reason}", err=True)
        sys.exit(130)
    except NonFiniteLoss as exc:
        _close_quietly(uploads)
        tracking.record_ending(run_id, "failed", str(exc))
        raise click.ClickException(prefix + str(exc)) from exc
    except MlflowException as exc:
        reason = f"MLflow failed during training: {str(exc).splitlines()[0]}"
        tracking.record_ending(run_id, "failed", f"{reason}; {resume_hint}")
        raise click.ClickException(f"{prefix}{reason}\nCompleted epochs are checkpointed in {local}; "
                                   f"{resume_hint}") from exc
    except BaseException as exc:
        tracking.record_ending(run_id, "failed", f"{type(exc).__name__}: {exc}")
        raise
    if tracking.record_ending(run_id, "finished"):
        shutil.rmtree(local.parent, ignore_errors=True)  # the artifact keeps the final checkpoint
    final = result.records[-1] if result.records else None
    if final is not None:
        say(f"done: test accuracy {final.test_acc:.2f}%, test loss {final.test_loss:.4f}; MLflow calls of "
            f"the epoch loop: {uploads.busy_seconds:.2f} s on the upload thread, training waited "
            f"{uploads.waited_seconds:.2f} s for them")


def _close_quietly(uploads) -> None:
    """Log what the completed epochs queued before recording the ending; a store that fails
    now is already the reason, or will be reported by record_ending."""
    try:
        uploads.close()
    except Exception:
        pass
