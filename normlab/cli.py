"""Command line: the only place options are parsed; wires data, engine and tracking."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from normlab.data import DATASETS, DataError
from normlab.models import NORMS, ConfigError
from normlab.train import Callbacks, EpochRecord, TrainConfig

DEFAULTS = TrainConfig()
CONFIG_OPTIONS = ("norm", "groups", "l1", "dataset", "epochs", "batch_size", "lr", "seed")
DEFAULT_CHECKPOINT_DIR = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                             / "normlab" / "checkpoints")


class Progress(Callbacks):
    """A bar per epoch on a terminal; one line per epoch otherwise (logs, CI, mlflow run)."""

    def __init__(self, epochs: int, stream=None):
        self.epochs = epochs
        self.stream = stream or sys.stdout
        self.bar = None

    def epoch_started(self, epoch: int, steps: int) -> None:
        if self.stream.isatty():
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
            f"epoch {record.epoch:>3}/{self.epochs}  train_loss {record.train_loss:.4f}  "
            f"train_acc {record.train_acc:6.2f}%  test_loss {record.test_loss:.4f}  "
            f"test_acc {record.test_acc:6.2f}%  ({record.seconds:.1f} s)",
            file=self.stream,
        )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="normlab", message="normlab %(version)s")
def main() -> None:
    """normlab: normalization experiments on small CNNs, tracked in MLflow."""


@main.command()
@click.option("--norm", type=click.Choice(list(NORMS)), default=DEFAULTS.norm,
              help="Normalization after each 3x3 conv: batch, layer, group, instance or none.")
@click.option("--groups", type=int, default=DEFAULTS.groups,
              help="Groups for --norm gn; must divide every normalized channel count.")
@click.option("--l1", type=float, default=DEFAULTS.l1,
              help="L1 weight: lambda x sum |w| over all trainable parameters is added to the loss.")
@click.option("--dataset", type=click.Choice(list(DATASETS)), default=DEFAULTS.dataset,
              help="Dataset, downloaded by torchvision into --data-dir when missing.")
@click.option("--data-dir", default="data", help="Folder holding (or receiving) the datasets.")
@click.option("--epochs", type=int, default=DEFAULTS.epochs, help="Training epochs.")
@click.option("--batch-size", type=int, default=DEFAULTS.batch_size, help="Training batch size.")
@click.option("--lr", type=float, default=DEFAULTS.lr, help="Peak learning rate of the one-cycle schedule.")
@click.option("--seed", type=int, default=DEFAULTS.seed, help="Seed for weights, shuffling, augmentation, dropout.")
@click.option("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--experiment", default="normlab", help="MLflow experiment (ignored under `mlflow run`).")
@click.option("--resume", "resume_run", default="", metavar="RUN_ID",
              help="Continue this run from its last checkpoint; options left out come from the checkpoint.")
@click.option("--checkpoint-dir", default=DEFAULT_CHECKPOINT_DIR,
              help="Local copy of each unfinished run's last checkpoint: DIR/RUN_ID/last.pt.")
@click.pass_context
def train(ctx, norm, groups, l1, dataset, data_dir, epochs, batch_size, lr, seed, device, experiment,
          resume_run, checkpoint_dir) -> None:
    """Train one variant as one MLflow run: params, per-epoch metrics, mistakes, model."""
    from normlab import resume, tracking
    from normlab.data import DeviceData, load_raw
    from normlab.train import Trainer, resolve_device

    config = TrainConfig(norm=norm, groups=groups, l1=l1, dataset=dataset, epochs=epochs,
                         batch_size=batch_size, lr=lr, seed=seed)
    try:
        config.validate()
        torch_device = resolve_device(device)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    tracking.use_bounded_http_retries()
    try:
        tracking.check_tracking_reachable()
    except tracking.TrackingUnreachable as exc:
        raise click.ClickException(str(exc)) from exc
    point = None
    if resume_run:
        explicit = {name for name in CONFIG_OPTIONS
                    if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}
        try:
            point = resume.find(resume_run, config, explicit, checkpoint_dir)
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from exc
        except (resume.ResumeError, DataError) as exc:
            raise click.ClickException(str(exc)) from exc
        config = point.config
    try:
        data = DeviceData(load_raw(config.dataset, data_dir), torch_device)
    except DataError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        trainer = Trainer(config, data)
        if point is not None:
            resume.check_same_data(point, data.raw.digest())
            trainer.load_state_dict(point.state)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        tracking.create_store_safely()
    except tracking.TrackingUnreachable as exc:
        raise click.ClickException(str(exc)) from exc

    click.echo(f"{config.label} on {config.dataset} ({data.train_size} train / {data.test_size} test), "
               f"{config.epochs} epochs, device {torch_device}")
    if point is not None:
        click.echo(f"resuming run {point.run_id} after epoch {trainer.epoch} ({point.source})")
    train_tracked(trainer, point, data_dir, experiment, checkpoint_dir)


def train_tracked(trainer, point, data_dir: str, experiment: str, checkpoint_dir: str) -> None:
    """Fit inside an MLflow run and record how it ended: finished, interrupted (a signal) or
    failed (diverged, store unreachable, any error), in tags as well as the run status."""
    import shutil

    from mlflow.exceptions import MlflowException

    from normlab import tracking
    from normlab.interrupts import exit_code, stop_on_signals
    from normlab.train import CallbackList, NonFiniteLoss, TrainingStopped, fit

    config, data = trainer.config, trainer.data
    with stop_on_signals(trainer.request_stop) as signals:
        if point is None:
            run = tracking.start_training_run(config, experiment)
        else:
            run = tracking.resume_training_run(point.run_id, trainer.epoch)
        run_id = run.info.run_id
        local = tracking.local_checkpoint_path(checkpoint_dir, run_id)
        resume_hint = f"resume with: normlab train --resume {run_id}"
        try:
            click.echo(f"MLflow run {run_id} ({config.run_name}); checkpoints: {local} and artifact "
                       f"{tracking.CHECKPOINT_ARTIFACT}")
            if point is None:
                tracking.mark_running()
                tracking.log_run_setup(config, data, trainer.model, data_dir)
            else:
                relogged = tracking.log_missing_epochs(run_id, point.records)
                if relogged:
                    click.echo(f"logged the metrics of epochs {relogged} from the checkpoint")
            checkpointer = tracking.Checkpointer(trainer, run_id, local, point.records if point else [])
            result = fit(trainer, CallbackList(checkpointer, tracking.MetricLogger(), Progress(config.epochs)))
            tracking.log_results(config, data, result)
        except TrainingStopped as exc:
            tracking.record_ending(run_id, "interrupted", f"{exc}; {resume_hint}")
            click.echo(f"interrupted: {exc}.\nLast checkpoint: {local}; {resume_hint}", err=True)
            sys.exit(exit_code(signals[0]))
        except KeyboardInterrupt:
            reason = f"aborted by a second Ctrl-C; epochs up to the last checkpoint are kept; {resume_hint}"
            tracking.record_ending(run_id, "interrupted", reason)
            click.echo(f"aborted: {reason}", err=True)
            sys.exit(130)
        except NonFiniteLoss as exc:
            tracking.record_ending(run_id, "failed", str(exc))
            raise click.ClickException(str(exc)) from exc
        except MlflowException as exc:
            reason = f"MLflow failed during training: {str(exc).splitlines()[0]}"
            tracking.record_ending(run_id, "failed", f"{reason}; {resume_hint}")
            raise click.ClickException(f"{reason}\nCompleted epochs are checkpointed in {local}; "
                                       f"{resume_hint}") from exc
        except BaseException as exc:
            tracking.record_ending(run_id, "failed", f"{type(exc).__name__}: {exc}")
            raise
    if tracking.record_ending(run_id, "finished"):
        shutil.rmtree(local.parent, ignore_errors=True)  # the artifact keeps the final checkpoint
    final = result.records[-1] if result.records else None
    if final is not None:
        click.echo(f"done: test accuracy {final.test_acc:.2f}%, test loss {final.test_loss:.4f}")


def entry() -> None:
    """`normlab` / `python -m normlab`: click's main, and when `mlflow run` created the run
    (MLFLOW_RUN_ID), a command that fails, even in click's own parsing, fails that run too,
    with the reason in its tags, instead of leaving it RUNNING or calling it FINISHED."""
    launched_run = os.environ.get("MLFLOW_RUN_ID")
    try:
        result = main(standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        _fail_launched_run(launched_run, exc.format_message())
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Aborted!", err=True)
        _fail_launched_run(launched_run, "aborted")
        sys.exit(1)
    except SystemExit as exc:
        if exc.code not in (0, None):
            _fail_launched_run(launched_run, f"exited with code {exc.code}")
        raise
    except BaseException as exc:
        _fail_launched_run(launched_run, f"{type(exc).__name__}: {exc}")
        raise
    sys.exit(result if isinstance(result, int) else 0)


def _fail_launched_run(run_id: str | None, reason: str) -> None:
    if run_id:
        from normlab import tracking

        tracking.fail_run_if_open(run_id, reason)
