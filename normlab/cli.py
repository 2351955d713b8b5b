"""Command line: the only place options are parsed; wires data, engine and tracking."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import NoReturn

import click
from click.core import ParameterSource

from normlab.engine.bytecode import uncached_source_note
from normlab.engine.config import TrainConfig
from normlab.engine import devices
from normlab.engine.fast import compile_choice, engine_process, kernel_helpers
from normlab.engine.interrupts import release_interrupted
from normlab.engine.registry import DATASETS, NORMS
from normlab.errors import ConfigError, DataError, ResumeError, TrackingUnreachable
from normlab.folders import folders_to_make, remove_if_empty
from normlab.sweep.driver import LR_SCALINGS, REFERENCE_BATCH, Grid, epochs_per_variant, run_sweep, training_order
from normlab.tracking import EXPERIMENT, results_process

# Torch and MLflow (2-5 s to import) are imported by the commands that use them, so that
# `--help` and a mistyped option answer at once; tests/test_project.py checks it.

DEFAULTS = TrainConfig()
CONFIG_OPTIONS = ("norm", "groups", "l1", "dataset", "epochs", "batch_size", "lr", "seed")
DEFAULT_CHECKPOINT_DIR = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                             / "normlab" / "checkpoints")


@contextlib.contextmanager
def _reported():
    """normlab's errors as the command line reports them: a ConfigError is a usage error (exit
    2); bad data, a resume that cannot be, an unreachable store fail the command (exit 1)."""
    try:
        yield
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    except (DataError, ResumeError, TrackingUnreachable) as exc:
        raise click.ClickException(str(exc)) from exc


def _experiment_name(ctx, param, name: str) -> str:
    """A name MLflow accepts for an experiment: it refused '' only where the run started,
    after the data and the model, with a traceback."""
    if not name.strip():
        raise click.BadParameter(f"an experiment needs a name; leave --experiment out for {EXPERIMENT!r}")
    if len(name) > 500:  # MLflow's MAX_EXPERIMENT_NAME_LENGTH
        raise click.BadParameter(f"{len(name)} characters; MLflow takes at most 500")
    return name


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="normlab", message="normlab %(version)s")
def main() -> None:
    """normlab: normalization experiments on small CNNs, tracked in MLflow."""


def _note_what_slows_it(device: str) -> None:
    """Say so where the command would be much slower than the user expects, for a reason of this
    machine's: --device auto quietly on the CPU of a GPU machine (its GPUs hidden by
    CUDA_VISIBLE_DEVICES), or torch's source compiled again in every process (engine/bytecode.py)."""
    for note in (devices.auto_on_the_cpu_note(device), uncached_source_note()):
        if note:
            click.echo(f"note: {note}", err=True)


def _check_writable(folder: str, option: str, keep: bool = True) -> None:
    """A folder the user names, made and checked to take files before any data loads or run
    starts (a typo in it was found after the training, or after reading the runs); with
    ``keep=False`` the folders made for the check are removed again."""
    folder = Path(folder).expanduser()
    made = folders_to_make(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".normlab-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{option} {folder} is not writable ({exc.strerror or exc}); choose another {option} "
                          f"or make it writable") from exc
    finally:
        if not keep:
            remove_if_empty(made)


def _check_data_folder(data_dir: str) -> None:
    """--data-dir names a folder, made by the download where missing; a file there or on its
    path was reported through torchvision's failed download ("Not a directory"), after torch's
    import and the engine's start."""
    folder = Path(data_dir).expanduser()
    blocking = next((path for path in (folder, *folder.parents) if path.exists() and not path.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"--data-dir {folder}: {blocking} is a file, not a folder; give the folder that holds "
                          f"the datasets (or will receive them)")


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
@click.option("--experiment", default=EXPERIMENT, callback=_experiment_name,
              help="MLflow experiment (ignored under `mlflow run`).")
@click.option("--resume", "resume_run", default="", metavar="RUN_ID",
              help="Continue this run from its last checkpoint; options left out come from the checkpoint "
                   "(--data-dir from the run).")
@click.option("--checkpoint-dir", default=DEFAULT_CHECKPOINT_DIR,
              help="Local copy of each unfinished run's last checkpoint: DIR/RUN_ID/last.pt.")
@click.pass_context
def train(ctx, norm, groups, l1, dataset, data_dir, epochs, batch_size, lr, seed, device, experiment,
          resume_run, checkpoint_dir) -> None:
    """Train one variant as one MLflow run: params, per-epoch metrics, mistakes, model."""
    config = TrainConfig(norm=norm, groups=groups, l1=l1, dataset=dataset, epochs=epochs,
                         batch_size=batch_size, lr=lr, seed=seed)
    with _reported():
        config.validate()  # before torch and MLflow are even imported
        devices.refuse_a_missing_gpu(device)
        _note_what_slows_it(device)
        _check_writable(checkpoint_dir, "--checkpoint-dir")
        if not resume_run or ctx.get_parameter_source("data_dir") not in (ParameterSource.DEFAULT,
                                                                           ParameterSource.DEFAULT_MAP):
            _check_data_folder(data_dir)  # a resume without it trains on the data folder the run logged
        compile_choice(), kernel_helpers()  # the speed settings the engine reads
        own_process = not resume_run and engine_process.wanted(device)
        results_elsewhere = results_process.wanted(own_process)
    with contextlib.ExitStack() as stack:
        # its torch, CUDA, data and trainer start now, beside our MLflow; then the results process
        engine = (stack.enter_context(engine_process.EngineProcess(data_dir, device, concurrent=1))
                  if own_process else None)
        stack.enter_context(results_process.started(results_elsewhere))
        _train(ctx, config, engine.trainer(config) if engine else None, data_dir, device, experiment, resume_run,
               checkpoint_dir)


def _train(ctx, config: TrainConfig, remote: engine_process.RemoteTrainer | None, data_dir: str, device: str,
           experiment: str, resume_run: str, checkpoint_dir: str) -> None:
    """`normlab train` once its options are valid: the trainer here, or ``remote``, the run in an engine process."""
    from normlab.tracking import connection, run_query

    with _reported():
        connection.use_command_defaults()
        connection.check_tracking_reachable()
        if resume_run:  # a mistyped id, a sweep's parent or a comparison: refused before torch's import
            run_query.check_resumable(resume_run)
    from normlab.engine.data import DeviceData, load_raw
    from normlab.engine.train import Trainer, resolve_device
    from normlab.tracking import resume, run_log
    from normlab.tracking.lifecycle import train_tracked

    with _reported():
        torch_device = resolve_device(device) if remote is None else None  # the engine process resolves its own
        point = None
        if resume_run:
            explicit = {name for name in CONFIG_OPTIONS if ctx.get_parameter_source(name)
                        not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}
            if ctx.get_parameter_source("experiment") not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
                run_experiment = run_log.experiment_of(resume_run)
                if run_experiment not in (None, experiment):
                    raise click.UsageError(f"--experiment {experiment!r}: run {resume_run} is in experiment "
                                           f"{run_experiment!r}, and a resume continues it there; leave "
                                           f"--experiment out")
            point = resume.find(resume_run, config, explicit, checkpoint_dir)
            config = point.config
            if ctx.get_parameter_source("data_dir") in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
                data_dir = run_log.logged_data_dir(resume_run) or data_dir  # as the hint prints it: no --data-dir
        if remote is None:
            data = DeviceData(load_raw(config.dataset, data_dir), torch_device)
            trainer = Trainer(config, data)
            if point is not None:
                resume.check_same_data(point, data.digest)
                trainer.load_state_dict(point.state)
        connection.create_store_safely()
        if remote is not None:
            trainer, data = remote, remote.data  # waits for the engine's trainer
            torch_device = data.device
    click.echo(f"{config.label} on {config.dataset} ({data.train_size} train / {data.test_size} test), "
               f"{config.epochs} epochs, device {torch_device}")
    if point is not None:
        click.echo(f"resuming run {point.run_id} after epoch {trainer.epoch} ({point.source})")
    from normlab.engine.interrupts import exit_code, stop_on_signals
    from normlab.errors import LeaseHeld

    with stop_on_signals(trainer.request_stop) as signals:
        try:
            ending = train_tracked(trainer, point, data_dir, experiment, checkpoint_dir)
        except LeaseHeld as exc:
            raise click.ClickException(str(exc)) from exc
    if ending.aborted:
        sys.exit(130)
    if signals.count(signal.SIGINT) > 1:  # the abort's KeyboardInterrupt was dropped (below)
        click.echo(f"the second Ctrl-C did not abort: something swallowed it (Python drops exceptions "
                   f"raised in garbage-collector callbacks), and the run ended {ending.outcome}", err=True)
        sys.exit(130)
    if ending.outcome == "interrupted":
        sys.exit(exit_code(signals[0]) if signals else 130)
    if ending.outcome == "failed":
        sys.exit(1)


def entry() -> None:
    """`normlab` / `python -m normlab`: click's main, and when `mlflow run` created the run
    (MLFLOW_RUN_ID), a command that fails, even in click's own parsing, fails that run too,
    with the reason in its tags, instead of leaving it RUNNING or calling it FINISHED."""
    try:
        _main_failing_launched_run()
    except SystemExit as ending:
        _exit_leaving_memory_to_the_os(ending.code)
    finally:  # an uncaught error (a traceback): Python's own exit, the collector's walks skipped
        gc.freeze()


def _exit_leaving_memory_to_the_os(code) -> NoReturn:
    """Python's exit without its teardown of every object torch, Dynamo and MLflow made. What
    matters of it runs first: threads joined (threading's exit hooks), atexit handlers, the
    streams flushed. The teardown walks the objects twice: the garbage collector's last
    collections, then each module's namespace freed object by object. From a `normlab train`'s
    last line to its exit (benchmarks/exit_cost.py, medians): on the 2-core CPU 2.62 s with
    both, 0.40 s with the collector frozen, 0.13 s without the teardown; on an H200's host
    1.67, 0.51 and 0.29 s. The OS frees the memory at once."""
    gc.freeze()
    threading._shutdown()  # what Python's exit calls first: non-daemon threads and executors joined
    atexit._run_exitfuncs()
    if code is not None and not isinstance(code, int):  # sys.exit("message"), as Python reports it
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing left to tell
            stream.flush()
    os._exit(code or 0)


def _main_failing_launched_run() -> None:
    launched_run = os.environ.get("MLFLOW_RUN_ID")
    try:
        result = main(standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        _fail_launched_run(launched_run, exc.format_message())
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt) as abort:  # click turns a Ctrl-C it meets into Abort
        ctrl_c = isinstance(abort, KeyboardInterrupt) or isinstance(abort.__context__, KeyboardInterrupt)
        release_interrupted(abort)  # a store write it cut short must not lock the run's ending
        click.echo("Aborted!", err=True)
        _fail_launched_run(launched_run, "aborted (Ctrl-C)" if ctrl_c else "aborted")
        sys.exit(130 if ctrl_c else 1)
    except SystemExit as exc:
        if exc.code not in (0, None):
            _fail_launched_run(launched_run, f"exited with code {exc.code}")
        raise
    except Exception as exc:  # a bug: its traceback, without the credentials it may quote
        import traceback

        from normlab.tracking.redaction import redact

        _fail_launched_run(launched_run, redact(f"{type(exc).__name__}: {exc}"))
        click.echo(redact("".join(traceback.format_exception(exc))), err=True)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)


def _fail_launched_run(run_id: str | None, reason: str) -> None:
    if run_id:
        from normlab.tracking import run_ending  # no torch: a refused command ends at once

        run_ending.fail_run_if_open(run_id, reason)


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

    from normlab.analysis import explain as worked

    norms = worked.EXPLAINED if norm == "all" else (norm,)
    try:
        if out or "gn" in norms:
            worked.check_example_groups(groups)
        result = worked.explain(norms, groups)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(worked.render(result), nl=False)
    if out:
        from normlab.analysis import plots

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
    from normlab.engine.models import Net, count_parameters, summary_text
    from normlab.engine.registry import check_norm, variant_label

    try:
        check_norm(norm, groups, dataset)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    model = Net(dataset, norm, groups)
    click.echo(f"{variant_label(norm, groups)} on {dataset}: {count_parameters(model):,} trainable parameters")
    click.echo(summary_text(model, dataset))


# -- sweep ------------------------------------------------------------------------------

def _comma_list(kind: type):
    """A click callback turning 'a,b,c' into a tuple of `kind`, naming the bad item.

    An empty item ('bn,ln,' or 'bn,,ln') is refused: it is more likely a value left out
    than a stray comma, and a sweep without it would run for minutes before anyone noticed.
    """
    def parse(ctx, param, value: str):
        items = [v.strip() for v in value.split(",")]
        if value.strip() and "" in items:
            raise click.BadParameter(f"{value!r} has an empty item; give a comma-separated list without "
                                     f"a comma at either end or two together")
        try:
            return tuple(kind(v) for v in items if v)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of {kind.__name__}s") from None
    return parse


def _seeds(ctx, param, value: str) -> tuple[int, ...]:
    """'3' means seeds 1, 2, 3; '1,5,9' (or '7,' for seed 7 alone) is the list itself."""
    if "," not in value:
        try:
            count = int(value)
        except ValueError:
            raise click.BadParameter(f"{value!r}: give a count (3 = seeds 1..3) or a list (1,5,9)") from None
        if count < 1:
            raise click.BadParameter(f"{value!r}: the seed count must be at least 1")
        return tuple(range(1, count + 1))
    first, _, rest = value.partition(",")
    if not rest.strip():  # '7,': seed 7 alone
        value = first
    return _comma_list(int)(ctx, param, value)


def _run_ids(ctx, param, values: tuple[str, ...]) -> tuple[str, ...]:
    """Every --run-id, each a run id or a comma list of them; an empty one (the MLproject's
    default) means none given."""
    return tuple(run_id for value in values for run_id in _comma_list(str)(ctx, param, value))


def _l1_on(ctx, param, value: str) -> str | tuple[str, ...]:
    """'all', or the comma list of norms that get --l1."""
    return "all" if value.strip() == "all" else _comma_list(str)(ctx, param, value)


@main.command()
@click.option("--norms", default="bn,ln,gn", callback=_comma_list(str),
              help=f"Comma-separated norms, from: {', '.join(NORMS)}.")
@click.option("--l1", default="1e-5", callback=_comma_list(float),
              help="Comma-separated L1 weights (an axis) for the norms in --l1-on; 1e-5 is the classic BN + L1.")
@click.option("--l1-on", default="bn", callback=_l1_on, help="Comma-separated norms that get --l1, or 'all'.")
@click.option("--groups", default=str(DEFAULTS.groups), callback=_comma_list(int),
              help="Comma-separated group counts for gn (an axis of the grid).")
@click.option("--batch-sizes", default=str(DEFAULTS.batch_size), callback=_comma_list(int),
              help="Comma-separated batch sizes (an axis; several give the batch-size figure).")
@click.option("--seeds", default="1", callback=_seeds, help="A count (3 = seeds 1..3) or a comma list (1,5,9).")
@click.option("--dataset", type=click.Choice(list(DATASETS)), default=DEFAULTS.dataset, help="Dataset.")
@click.option("--data-dir", default="data", help="Folder holding (or receiving) the datasets.")
@click.option("--epochs", type=int, default=DEFAULTS.epochs, help="Training epochs of every child.")
@click.option("--lr", type=float, default=DEFAULTS.lr,
              help=f"Peak learning rate of every child (at batch {REFERENCE_BATCH} under --lr-scaling).")
@click.option("--lr-scaling", type=click.Choice(LR_SCALINGS), default="none",
              help=f"How a child's lr follows its batch size: linear = --lr x batch/{REFERENCE_BATCH} (the GroupNorm "
                   f"paper's rule, for batch-size studies), sqrt, or none.")
@click.option("--device", default="auto",
              help="auto (every visible GPU, one worker each; else the CPU), cpu, cuda or cuda:N.")
@click.option("--address", default=lambda: os.environ.get("RAY_ADDRESS", ""), show_default="$RAY_ADDRESS",
              help="Run the workers on this Ray cluster (auto, or HOST:PORT) instead of this machine.")
@click.option("--workers", type=click.IntRange(min=1), default=1,
              help="Worker processes on a machine without a GPU, sharing its cores (with GPUs: one per GPU).")
@click.option("--checkpoint-dir", default=DEFAULT_CHECKPOINT_DIR,
              help="Local copy of each unfinished child's last checkpoint: DIR/RUN_ID/last.pt.")
@click.option("--experiment", default=EXPERIMENT, callback=_experiment_name,
              help="MLflow experiment (ignored under `mlflow run`).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Also keep the comparison files in this folder (they are logged on the parent anyway).")
def sweep(norms, l1, l1_on, groups, batch_sizes, seeds, dataset, data_dir, epochs, lr, lr_scaling, device, address,
          workers, checkpoint_dir, experiment, out) -> None:
    """Run a grid of variants x seeds as child runs of one parent run, then compare them.

    The children train in warm worker processes, one per GPU (or one on the CPU), or on a
    Ray cluster with --address. Re-running the same command resumes: finished children are
    kept, interrupted and failed ones continue from their checkpoints, missing ones train.
    """
    l1_norms = norms if l1_on == "all" else l1_on
    grid = Grid(norms=norms, l1=l1, l1_on=l1_norms, groups=groups, batch_sizes=batch_sizes, seeds=seeds,
                dataset=dataset, epochs=epochs, lr=lr, lr_scaling=lr_scaling)
    address = address or os.environ.get("RAY_ADDRESS") or None
    with _reported():
        configs = grid.validate()  # before torch and MLflow are even imported
        if out:
            _check_writable(out, "--out")
        if not address:  # a cluster's GPUs and disks are its own
            devices.refuse_a_missing_gpu(device)
            _note_what_slows_it(device)
            _check_writable(checkpoint_dir, "--checkpoint-dir")
            _check_data_folder(data_dir)
        one_engine = not address and engine_process.wanted_for_sweep(device, workers)
        results_elsewhere = results_process.wanted(one_engine)
    with contextlib.ExitStack() as stack:
        # its torch, CUDA, the data on the GPU and the runs' steps start now, beside our MLflow
        engine = stack.enter_context(engine_process.EngineProcess(
            data_dir, device, ahead=(training_order(configs), epochs_per_variant(configs)), early=True)
        ) if one_engine else None
        stack.enter_context(results_process.started(results_elsewhere))
        outcome = _sweep(grid, experiment, data_dir, device, checkpoint_dir, address, workers, out, engine)
    click.echo(f"sweep: {len(outcome.done)} of {len(configs)} children finished; parent run {outcome.parent_id}")
    if outcome.interrupted:
        click.echo("sweep interrupted; run the same command again to resume", err=True)
        sys.exit(130)
    if outcome.busy:
        click.echo(f"{len(outcome.busy)} children are being trained by another process; run the same command "
                   f"again once it is done to compare them", err=True)
    if outcome.failures:
        click.echo(f"{len(outcome.failures)} children failed (run the same command again to retry them):", err=True)
        for failure in outcome.failures:
            reason = failure.reason.strip().splitlines()
            click.echo(f"- {failure.config.run_name} (run {failure.run_id or '-'}): "
                       f"{reason[-1] if reason else failure.status}", err=True)
        sys.exit(1)


def _sweep(grid: Grid, experiment: str, data_dir: str, device: str, checkpoint_dir: str, address: str | None,
           workers: int, out: str | None, engine: engine_process.EngineProcess | None):
    """run_sweep, its errors as the command line reports them."""
    from normlab.tracking import connection

    connection.use_command_defaults()
    with _reported():
        connection.check_tracking_reachable()
        return run_sweep(grid, experiment=experiment, data_dir=data_dir, device=device, checkpoint_dir=checkpoint_dir,
                         address=address, cpu_workers=workers, out_dir=Path(out) if out else None, echo=click.echo,
                         engine=engine)


@main.command()
@click.option("--experiment", default=EXPERIMENT, callback=_experiment_name,
              help="MLflow experiment holding the training runs.")
@click.option("--filter", "filter_string", default="",
              help="MLflow search filter, e.g. \"params.dataset = 'mnist' and params.epochs = '20'\".")
@click.option("--parent", "parent_run_id", default="", help="Only the child runs of this (sweep) run.")
@click.option("--run-id", "run_ids", multiple=True, callback=_run_ids,
              help="Compare exactly these runs (repeat, or comma-separate); --experiment is then not used.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="results",
              help="Folder for the figures, galleries and tables (created if missing).")
@click.option("--include-unfinished", type=click.BOOL, is_flag=False, flag_value=True, default=False,
              help="Also compare runs that are not FINISHED (running, failed, killed).")
@click.option("--log-to-run", "log_to_run_id", default="",
              help="Log the outputs into this run (default: the `mlflow run` run, else a new one).")
@click.option("--band", type=click.Choice(["range", "ci"]), default="range",
              help="What the curves' bands and the whiskers span: the seeds' min-max, or the 95% "
                   "confidence interval of the mean (Student t).")
def compare(experiment, filter_string, parent_run_id, run_ids, out_dir, include_unfinished, log_to_run_id,
            band) -> None:
    """Compare variants: curves over epochs, final accuracy per seed, mistakes, results table."""
    import warnings

    from normlab.analysis.compare import SkippedRunsWarning, run_comparison
    from normlab.errors import SelectionError
    from normlab.tracking import connection

    connection.use_command_defaults()
    folder = Path(out_dir)  # as the user typed it, less a trailing slash (named below as "results/")
    with _reported():
        _check_writable(out_dir, "--out", keep=False)  # a comparison that finds no runs leaves no folder
        connection.check_tracking_reachable()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = run_comparison(folder, experiment, filter_string or None, parent_run_id or None,
                                    list(run_ids) or None, log_to_run_id or None,
                                    include_unfinished=include_unfinished, band=band)
        except SelectionError as exc:
            raise click.ClickException(str(exc)) from exc
        finally:
            for warning in caught:
                if issubclass(warning.category, SkippedRunsWarning):
                    click.echo(f"warning: {warning.message}", err=True)
    click.echo(f"compared {result.describe()} from {result.searched}")
    click.echo(result.files["results.md"].read_text())
    click.echo(f"wrote {len(result.files)} files to {folder}/; logged under "
               f"'comparison/' of MLflow run {result.logged_to_run_id}")
    if result.removed:
        click.echo(result.removed_note(folder))
