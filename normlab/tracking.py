"""The only code that talks to MLflow: run setup, params, metrics, inputs, artifacts."""

from __future__ import annotations

import platform
import subprocess
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.tracking import MlflowClient

import normlab
from normlab import plots
from normlab.data import DeviceData
from normlab.models import summary_text
from normlab.train import Callbacks, EpochRecord, FitResult, TrainConfig

EXPERIMENT = "normlab"
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")
PACKAGE_DIR = Path(normlab.__file__).parent


def git_commit() -> str | None:
    """The commit of the normlab checkout, with '-dirty' when it has local changes."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True,
                                  check=True, timeout=5).stdout.strip()
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--", ".") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def start_training_run(config: TrainConfig, experiment: str = EXPERIMENT) -> mlflow.ActiveRun:
    """The run `mlflow run` already created (MLFLOW_RUN_ID), or a new one in `experiment`."""
    if mlflow.active_run() is None and not _run_id_from_env():
        mlflow.set_experiment(experiment)
    run = mlflow.start_run(run_name=config.run_name)
    mlflow.set_tag("mlflow.runName", config.run_name)  # `mlflow run` names runs randomly
    return run


def _run_id_from_env() -> str | None:
    from mlflow.environment_variables import MLFLOW_RUN_ID

    return MLFLOW_RUN_ID.get()


def _same_value(logged: str, ours: str) -> bool:
    """MLflow stores params as strings; '1e-5' (from -P) and '1e-05' (ours) are equal."""
    if logged == ours:
        return True
    try:
        return float(logged) == float(ours)
    except ValueError:
        return False


def log_params(params: dict[str, object]) -> None:
    """Log params, skipping those `mlflow run` already logged with an equal value.

    MLflow refuses to change a logged param, so re-logging '0.05' over '.05' would fail.
    """
    run_id = mlflow.active_run().info.run_id
    existing = MlflowClient().get_run(run_id).data.params
    fresh = {}
    for key, value in params.items():
        text = str(value)
        if key in existing:
            if not _same_value(existing[key], text):
                raise ValueError(f"param {key} was logged as {existing[key]!r} but the run uses {text!r}")
            continue
        fresh[key] = text
    if fresh:
        mlflow.log_params(fresh)


def log_run_setup(config: TrainConfig, data: DeviceData, model: torch.nn.Module, data_dir: str) -> None:
    """Params, tags and the dataset input: everything needed to reproduce the run."""
    from normlab.models import count_parameters, summarize

    params: dict[str, object] = dict(asdict(config))
    params.update(
        data_dir=data_dir,
        device=str(data.device),
        parameters=count_parameters(model),
        mult_adds=sum(r.mult_adds for r in summarize(model, config.dataset)),
        train_size=data.train_size,
        test_size=data.test_size,
        augmentation=data.spec.augmentation,
        optimizer="SGD momentum, OneCycleLR",
    )
    log_params(params)
    tags = {
        "variant": config.label,
        "norm": config.norm,
        "dataset": config.dataset,
        "device": torch.cuda.get_device_name(data.device) if data.device.type == "cuda" else platform.processor() or "cpu",
        "config_hash": config.config_hash(),
        "normlab_version": normlab.__version__,
        "torch_version": torch.__version__,
        "mlflow_version": mlflow.__version__,
        "python_version": platform.python_version(),
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    mlflow.set_tags(tags)
    mlflow.log_input(dataset_input(data), context="training")


def dataset_input(data: DeviceData) -> MetaDataset:
    """Name, torchvision's download address as source, and the content digest."""
    source = HTTPDatasetSource(url=data.spec.source)
    return MetaDataset(source=source, name=f"{data.spec.name}-{data.train_size}+{data.test_size}",
                       digest=data.raw.digest())


class MetricLogger(Callbacks):
    """Logs each epoch's four metrics in one call, with step = epoch (1-based)."""

    def epoch_done(self, record: EpochRecord) -> None:
        mlflow.log_metrics(record.metrics(), step=record.epoch)


def log_results(config: TrainConfig, data: DeviceData, result: FitResult) -> None:
    """Artifacts at the end of a run: misclassified grid and list, summary, the model."""
    mistakes = result.mistakes
    title = f"{config.label}: most confident mistakes on {config.dataset} test ({len(mistakes)})"
    images = data.raw.test_images[[m.index for m in mistakes]].permute(0, 2, 3, 1).numpy()
    figure = plots.misclassified_grid(images, [m.true for m in mistakes], [m.pred for m in mistakes],
                                      data.spec.classes, title)
    mlflow.log_figure(figure, "misclassified.png")
    import matplotlib.pyplot as plt

    plt.close(figure)
    mlflow.log_dict([asdict(m) for m in mistakes], "misclassified.json")
    mlflow.log_text(summary_text(result.model, config.dataset), "model_summary.txt")
    log_model(result.model, data)


def log_model(model: torch.nn.Module, data: DeviceData) -> None:
    """The trained model with its source code, so `mlflow.pytorch.load_model` works anywhere."""
    model = model.cpu().eval()
    example = data.test_x[:2].cpu().numpy().astype(np.float32)
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        input_example=example,
        code_paths=[str(PACKAGE_DIR)],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
    )
    mlflow.set_tag("model_uri", info.model_uri)

