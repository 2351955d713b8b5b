"""Command line: the only place options are parsed; wires data, engine and tracking."""

from __future__ import annotations

import sys

import click

from normlab.data import DATASETS, DataError
from normlab.models import NORMS, ConfigError
from normlab.train import Callbacks, EpochRecord, TrainConfig

DEFAULTS = TrainConfig()


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
def train(norm, groups, l1, dataset, data_dir, epochs, batch_size, lr, seed, device, experiment) -> None:
    """Train one variant as one MLflow run: params, per-epoch metrics, mistakes, model."""
    from normlab import tracking
    from normlab.data import DeviceData, load_raw
    from normlab.train import CallbackList, Trainer, fit, resolve_device

    config = TrainConfig(norm=norm, groups=groups, l1=l1, dataset=dataset, epochs=epochs,
                         batch_size=batch_size, lr=lr, seed=seed)
    try:
        config.validate()
        torch_device = resolve_device(device)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        data = DeviceData(load_raw(dataset, data_dir), torch_device)
    except DataError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        trainer = Trainer(config, data)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc

    click.echo(f"{config.label} on {dataset} ({data.train_size} train / {data.test_size} test), "
               f"{config.epochs} epochs, device {torch_device}")
    with tracking.start_training_run(config, experiment) as run:
        click.echo(f"MLflow run {run.info.run_id} ({config.run_name})")
        tracking.log_run_setup(config, data, trainer.model, data_dir)
        result = fit(trainer, CallbackList(tracking.MetricLogger(), Progress(config.epochs)))
        tracking.log_results(config, data, result)
    final = result.records[-1]
    click.echo(f"done: test accuracy {final.test_acc:.2f}%, test loss {final.test_loss:.4f}")


@main.command("explain")
@click.option("--norm", type=click.Choice(["all", *(n for n in NORMS if n != "none")]), default="all",
              help="Which normalization to work through.")
@click.option("--groups", type=int, default=2, help="Groups for gn; must divide the example's 4 channels.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Also save the figure of which elements share statistics as OUT/normalizations.png.")
def explain_command(norm, groups, out) -> None:
    """Worked example of BN, LN, GN and IN, checked against torch.

    A 2 x 4 x 2 x 2 integer tensor: which elements share each mean and variance, the statistics,
    the normalized values, and every number compared with the torch layer that computes it.
    """
    from pathlib import Path

    from normlab import explain as worked

    norms = worked.EXPLAINED if norm == "all" else (norm,)
    try:
        if out or "gn" in norms:
            worked.check_example_groups(groups)
        result = worked.explain(norms, groups)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(worked.render(result), nl=False)
    if out:
        from normlab import plots

        path = Path(out) / "normalizations.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = plots.normalization_sets(*worked.figure_panels(groups))
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plots.plt.close(fig)
        click.echo(f"\nsaved {path}")
    if not worked.all_checks_pass(result):
        raise click.ClickException("some numbers above differ from torch's (marked MISMATCH)")


@main.command("summary")
@click.option("--norm", type=click.Choice(list(NORMS)), default=DEFAULTS.norm, help="Normalization of the model.")
@click.option("--dataset", type=click.Choice(list(DATASETS)), default=DEFAULTS.dataset,
              help="Dataset whose model to describe (input size and channel plan).")
@click.option("--groups", type=int, default=DEFAULTS.groups, help="Groups for --norm gn.")
def summary_command(norm, dataset, groups) -> None:
    """The model's layers: output shape, parameters, mult-adds, totals.

    The same table a training run logs as model_summary.txt.
    """
    from normlab.models import Net, check_norm, count_parameters, summary_text, variant_label

    try:
        check_norm(norm, groups, dataset)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    model = Net(dataset, norm, groups)
    click.echo(f"{variant_label(norm, groups)} on {dataset}: {count_parameters(model):,} trainable parameters")
    click.echo(summary_text(model, dataset))
