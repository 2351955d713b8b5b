"""What a run logs at its end: the misclassified grid and list, the model's summary, the
model itself (a torch.export program, traced once per architecture and process, ahead while
a GPU run trains), and its final metrics linked to that model; with the warm-up that pays a
process's first-time costs of all this while its first GPU run trains. The grid is drawn and
the model saved in the command's results process when it has one (results_process.py)."""

from __future__ import annotations

import copy
import sys
import tempfile
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import mlflow
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from normlab.engine.config import TrainConfig, architecture_key
from normlab.engine.data import DeviceData
from normlab.engine.models import Net, summary_text
from normlab.engine.rng import RunRNG
from normlab.engine.train import TRACING_LOCK, FitResult
from normlab.tracking import results_process
from normlab.tracking.connection import _environment


_RESULTS_LOGGING_WARM = threading.Lock()  # held while a process pays log_results' first-time costs
_results_logging_warmed = False


def warm_up_results_logging() -> None:
    """Pay what the first log_results of a process costs beyond later ones, ahead of it: on a
    background thread while the run trains on a GPU and the host is idle. Measured on the
    2-core CPU: importing torch.export's tracer (torch.export.export imports it on first
    call) 2.3 s, matplotlib 0.8 s. Each is paid once per process; a later caller waits for a
    warm-up in progress rather than paying it again.
    (The host is idle only on a GPU: lifecycle warms up there.) Nothing here in a command
    whose results processes do this work: they warm themselves up."""
    global _results_logging_warmed
    if results_process.current() is not None:
        return
    with _RESULTS_LOGGING_WARM:
        if _results_logging_warmed:
            return
        warm_up_model_saving()
        from normlab.analysis import plots  # noqa: F401

        _results_logging_warmed = True


def warm_up_model_saving() -> None:
    """log_model's first-time cost: torch.export's tracer imported."""
    with TRACING_LOCK:  # imports torch's tracing modules: not while another thread traces
        import torch.export._trace  # noqa: F401


def warm_up_results_logging_in_background(config: TrainConfig, data: DeviceData) -> None:
    """warm_up_results_logging and export_ahead(config, ...) on a daemon thread, in the results
    process if there is one (which warms itself up); an error there is met again, and reported,
    by the run's own log_results."""
    def warm_up() -> None:
        try:
            warm_up_results_logging()
            results_process.call(export_ahead, config, data.example_input())
        except Exception:
            pass

    threading.Thread(target=warm_up, name="normlab-warm-up", daemon=True).start()


def log_results(config: TrainConfig, data: DeviceData, result: FitResult) -> None:
    """Artifacts at the end of a run: misclassified grid and list, summary, the model. The
    grid is drawn, and the model saved, in the results processes if there are."""
    warm_up_results_logging()  # done already, unless the run was shorter than the warm-up
    mistakes = result.mistakes
    title = f"{config.label}: most confident mistakes on {config.dataset} test ({len(mistakes)})"
    images = data.test_images_of([m.index for m in mistakes])
    with tempfile.TemporaryDirectory(prefix="normlab-figure-") as folder:
        figure = Path(folder) / "misclassified.png"
        results_process.call(results_process.draw_misclassified, figure, images, [m.true for m in mistakes],
                             [m.pred for m in mistakes], data.spec.classes, title, role="figures")
        mlflow.log_artifact(str(figure))
    mlflow.log_dict([asdict(m) for m in mistakes], "misclassified.json")
    mlflow.log_text(summary_text(result.model, config.dataset), "model_summary.txt")
    model_id = log_model(result.model, data, name=model_name(config.run_name), architecture=architecture_key(config))
    link_final_metrics(mlflow.active_run().info.run_id, model_id)


MODEL_METRICS = ("test_acc", "test_loss")  # the columns of MLflow's models table
# The step Model.log records the model at: it also links to the model every metric the run
# has at that step. No metric has step -1 (epochs count from 1, MLflow's system-metric samples
# from 0, which at its default step 0 made the first sample the model's metrics): the model
# has only what link_final_metrics links.
MODEL_STEP = -1


def link_final_metrics(run_id: str, model_id: str) -> None:
    """Link the run's last test accuracy and loss to its logged model, so the models table
    compares models by them. They are logged again with the step, time and value they have,
    which the SQL store (sqlite, server) keeps as one entry: the histories gain nothing."""
    client = MlflowClient()
    final = []
    for key in MODEL_METRICS:
        history = client.get_metric_history(run_id, key)
        if history:
            last = max(history, key=lambda m: (m.step, m.timestamp))
            final.append(Metric(key, last.value, last.timestamp, last.step, model_id=model_id))
    if final:
        client.log_batch(run_id, metrics=final)


# MLflow checks the input example by loading the model on the GPU when there is one, which
# a model exported from the CPU cannot do (a warning for every GPU run): check on the CPU,
# unless the user chose a device.
CHECK_ON_CPU = {"MLFLOW_DEFAULT_PREDICTION_DEVICE": "cpu"}


# Characters MLflow refuses in a logged model's name; a run name has '.' for --l1 1e-4 (bn-l1_0.0001-s1).
MODEL_NAME_FORBIDDEN = "/:.%\"'"


def model_name(run_name: str) -> str:
    """The run's name as a model name MLflow accepts: 'bn-l1_0.0001-s1' -> 'bn-l1_0_0001-s1'."""
    return "".join("_" if c in MODEL_NAME_FORBIDDEN else c for c in run_name)


def model_requirements() -> list[str]:
    """What a logged model needs to load: this torch and this MLflow."""
    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]


# torch.export traces the model anew for every run: 0.7-0.8 s a run on the 2-core CPU, though
# every model of one architecture gives the same graph and only the weights differ. So the
# program exported for a process's first run of an architecture is kept, and a later run's is
# that program with the later run's weights copied in. Measured: docs/speed.md.
_EXPORTED: dict[tuple, tuple[torch.export.ExportedProgram, tuple]] = {}  # architecture -> (program, its call)


@contextmanager
def _exports_reusing_graphs(architecture: tuple) -> Iterator[None]:
    """Within, holding TRACING_LOCK: torch.export.export, as MLflow calls it, gives the program
    kept for this architecture with the given model's weights, when its weights' names, shapes
    and types, its input shapes and export's other arguments are the kept program's; otherwise
    it exports (and keeps) anew."""
    export = torch.export.export

    def export_reusing_graph(model, args, *more, **options):
        weights, call = model.state_dict(), (tuple(tuple(a.shape) for a in args), more, options)
        kept = _EXPORTED.get(architecture)
        if kept is not None and kept[1] == call and not kept[0].constants and _same_layout(kept[0].state_dict, weights):
            with torch.no_grad():
                for name, tensor in kept[0].state_dict.items():
                    tensor.copy_(weights[name])
            return kept[0]
        program = export(model, args, *more, **options)
        _EXPORTED[architecture] = (program, call)
        return program

    torch.export.export = export_reusing_graph
    try:
        yield
    finally:
        torch.export.export = export


def _same_layout(kept: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> bool:
    return kept.keys() == weights.keys() and all(
        kept[k].shape == weights[k].shape and kept[k].dtype == weights[k].dtype for k in kept)


def log_model(model: torch.nn.Module, data: DeviceData, name: str = "model", architecture: tuple | None = None) -> str:
    """The trained model as a torch.export program (pt2), so `mlflow.pytorch.load_model` works
    anywhere without normlab's code; named after the run (`gn2-s1`), as the models table lists
    it. Returns its model id. No code_paths: MLflow would put the artifact's code/ first on the
    loader's sys.path, so whoever can write to the store could run code as normlab there.
    ``architecture`` (normlab.engine.config.architecture_key) names the models whose exported
    graph is the same, to trace it once per process.

    It is what mlflow.pytorch.log_model logs, through MLflow's Model.log with mlflow.pytorch's
    save_model run where results_process.call runs it."""
    from mlflow.models import Model

    # a copy: the worker's next run may train this one (Trainer's warm); channels first, the
    # plain model's memory order, however it trained (Speedups.channels_last)
    model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()
    info = Model.log(
        artifact_path=None,
        name=name,
        flavor=_PyTorchSaving(architecture),
        flavor_name="mlflow.pytorch",  # as mlflow.pytorch.log_model names it
        pytorch_model=model,
        # MLflow would load the saved program again and predict the example (~0.5 s a run);
        # tests/test_bad_input.py loads and predicts with it in a process without normlab
        validate_serving_input=False,
        step=MODEL_STEP,
        **_save_options(data.example_input()),
    )
    mlflow.set_tag("model_uri", info.model_uri)
    return info.model_id


class _PyTorchSaving:
    """mlflow.pytorch as the flavor Model.log saves with, its save_model called through
    results_process.call (Model.log passes the model and the options it was given)."""

    def __init__(self, architecture: tuple | None):
        self.architecture = architecture

    def save_model(self, path: str, mlflow_model, pytorch_model: torch.nn.Module, **options) -> None:
        saved = results_process.call(save_pytorch_model, path, mlflow_model, pytorch_model, self.architecture,
                                     options)
        vars(mlflow_model).update(vars(saved))  # as filled there: flavors, signature, input example


def save_pytorch_model(path: str, mlflow_model, model: torch.nn.Module, architecture: tuple | None,
                       options: dict):
    """mlflow.pytorch.save_model into ``path``, filling ``mlflow_model``, which it returns."""
    with _model_saving(architecture):
        pytorch_flavor().save_model(model, path, mlflow_model=mlflow_model, **options)
    return mlflow_model


# mlflow.pytorch imports this module at its own import, for an autologging callback normlab
# never uses; where pytorch_lightning is installed (common beside torch) it imports it, and
# through it torchmetrics and transformers: 2.9 s more to import mlflow.pytorch on the 2-core
# CPU. Declined there: `normlab train` 1.30x (7.16 -> 5.50 s), `normlab sweep` 1.15x
# (docs/speed.md, 2026-12-05, forty-sixth session).
LIGHTNING_AUTOLOG = "mlflow.pytorch._lightning_autolog"


def pytorch_flavor():
    """mlflow.pytorch, imported as where pytorch_lightning is not installed: its autologging
    callback's import is declined (None in sys.modules raises the ImportError mlflow.pytorch
    expects of a missing pytorch_lightning: MLflow 3.1 to 3.17 all import it in a try whose
    except ImportError passes). Where mlflow.pytorch was imported already, it is as it was."""
    sys.modules.setdefault(LIGHTNING_AUTOLOG, None)
    import mlflow.pytorch

    return mlflow.pytorch


@contextmanager
def _model_saving(architecture: tuple | None) -> Iterator[None]:
    """How MLflow saves a model here: holding TRACING_LOCK (torch.export traces), reusing the
    program kept for ``architecture``, without its check of the requirements, checking the
    input example on the CPU."""
    reusing = _exports_reusing_graphs(architecture) if architecture is not None else nullcontext()
    with TRACING_LOCK, reusing, _requirements_not_checked(), _environment(CHECK_ON_CPU, keep_users=True):
        yield


@contextmanager
def _requirements_not_checked() -> Iterator[None]:
    """Within, holding TRACING_LOCK: MLflow's saving does not check the model's requirements
    against the installed packages. That check only warns, and ours (model_requirements) are
    this process's own torch and MLflow, met by construction; its first call in a process scans
    every installed distribution, 0.7 s on the 2-core CPU, on the critical path of a short GPU
    run whose models process is the last to be ready. Without it the command waited 0.8 s for
    a run's results after training instead of 2.1 s (medians), `normlab train` 1.14x on two
    H200s (docs/speed.md, twenty-second session)."""
    from mlflow.utils import environment

    check = environment.warn_dependency_requirement_mismatches
    environment.warn_dependency_requirement_mismatches = lambda requirements: None
    try:
        yield
    finally:
        environment.warn_dependency_requirement_mismatches = check


def _save_options(example) -> dict:
    """What log_model and export_ahead both pass MLflow's saving: the same export call, so
    that the program export_ahead keeps is the one log_model's export asks for."""
    return {"input_example": example,
            "serialization_format": "pt2",  # not pickle (MLflow's default on Databricks), which needs the code
            "pip_requirements": model_requirements()}


def export_ahead(config: TrainConfig, example) -> None:
    """Export the model of ``config``'s architecture now, as log_model will (into a folder
    thrown away; ``example`` is the data's example_input()), so that the run's log_model only
    copies its trained weights into the kept program: tracing the model then happens while the
    run trains, not after it, where the classic sweep's three models, finishing together,
    traced one after another (TRACING_LOCK). The trace was 0.86 s of a 1.09 s log_model on the
    2-core CPU; on an H200 the classic sweep ran 1.10x faster end to end (docs/speed.md). Once
    per architecture and process."""
    architecture = architecture_key(config)
    if architecture in _EXPORTED:
        return
    with RunRNG(0, torch.device("cpu")).active():  # its initial weights draw nothing from other runs' streams
        model = Net(config.dataset, config.norm, config.groups, config.dropout).eval()
    with _model_saving(architecture), tempfile.TemporaryDirectory(prefix="normlab-export-ahead-") as folder:
        pytorch_flavor().save_model(model, Path(folder) / "model", **_save_options(example))
