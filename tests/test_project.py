"""The MLflow project end to end: `mlflow run .` and `normlab train` into real sqlite stores."""

import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, cli_env, run_cli

METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")


def mlflow_run(*params: str, experiment: str = "project-test", timeout: float = 900) -> subprocess.CompletedProcess:
    """`mlflow run ROOT` from another folder, without this checkout on PYTHONPATH: as in the
    environment MLflow builds from conda.yaml, the project runs from its own folder."""
    args = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local",
            "--experiment-name", experiment]
    for p in params:
        args += ["-P", p]
    env = cli_env(PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("PYTHONPATH")
    return subprocess.run(args, env=env, cwd=Path(tempfile.gettempdir()), capture_output=True, text=True,
                          timeout=timeout)


def runs_of(experiment: str):
    exp = MlflowClient().get_experiment_by_name(experiment)
    return [] if exp is None else MlflowClient().search_runs([exp.experiment_id])


def test_mlflow_run_trains_one_fully_recorded_run(tracking_uri, small_mnist_dir, tmp_path):
    proc = mlflow_run("norm=gn", "epochs=2", "l1=1e-5", f"data_dir={small_mnist_dir}", "device=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run] = runs_of("project-test")
    client = MlflowClient()
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["norm"] == "gn" and params["groups"] == "2" and float(params["l1"]) == 1e-5
    assert params["parameters"] == "7750" and int(params["mult_adds"]) > 1_000_000
    assert params["train_size"] == "1000" and params["test_size"] == "500"
    tags = run.data.tags
    assert tags["variant"] == "GN (2 groups) + L1 (1e-05)"
    assert tags["mlflow.runName"] == "gn2-l1_1e-05-s1"
    assert tags["dataset"] == "mnist" and tags["torch_version"] == torch.__version__
    for metric in METRICS:
        history = client.get_metric_history(run.info.run_id, metric)
        assert [m.step for m in history] == [1, 2], metric
    acc = [m.value for m in client.get_metric_history(run.info.run_id, "test_acc")]
    assert all(0 <= a <= 100 for a in acc)
    [dataset_input] = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "mnist-1000+500" and len(dataset_input.dataset.digest) == 16

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"misclassified.png", "misclassified.json", "model_summary.txt"} <= artifacts
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path)))
    mistakes = yaml.safe_load((local / "misclassified.json").read_text())
    assert len(mistakes) == 10 and all(m["true"] != m["pred"] for m in mistakes)
    png = (local / "misclassified.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "7,750" in (local / "model_summary.txt").read_text()

    model = mlflow.pytorch.load_model(tags["model_uri"])
    x = torch.randn(4, 1, 28, 28)
    log_probs = model(x)
    assert log_probs.shape == (4, 10)
    np.testing.assert_allclose(log_probs.exp().sum(1).detach().numpy(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("param,message", [
    ("norm=xx", "'xx' is not one of 'bn', 'ln', 'gn', 'in', 'none'"),
    ("epochs=0", "--epochs must be positive, got 0"),
    ("groups=3", "--groups 3 does not divide the mnist model's channel counts [10, 20]; valid choices: 1, 2, 5, 10"),
    ("epochs=abc", "'abc' is not a valid integer"),
])
def test_bad_parameters_fail_before_training(tracking_uri, small_mnist_dir, param, message):
    params = {"norm": "gn", "data_dir": str(small_mnist_dir), "device": "cpu"}
    key, value = param.split("=")
    params[key] = value
    proc = mlflow_run(*(f"{k}={v}" for k, v in params.items()), experiment="bad")
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "epoch " not in proc.stdout  # no training line was printed
    for run in runs_of("bad"):
        assert run.info.status == "FAILED"
        assert MlflowClient().get_metric_history(run.info.run_id, "test_acc") == []


def test_params_given_in_mlflow_spelling_do_not_conflict(tracking_uri, small_mnist_dir):
    """`-P lr=.05 -P l1=1e-5` is logged by MLflow as typed; ours ('0.05', '1e-05') must not clash."""
    proc = mlflow_run("norm=ln", "epochs=1", "lr=.05", "l1=1e-5", "batch_size=256",
                      f"data_dir={small_mnist_dir}", "device=cpu", experiment="spelling")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run] = runs_of("spelling")
    assert run.info.status == "FINISHED" and run.data.params["lr"] == ".05"


def test_normlab_train_creates_its_own_named_run(tracking_uri, small_mnist_dir):
    proc = run_cli("train", "--norm", "bn", "--epochs", "1", "--seed", "4", "--data-dir", str(small_mnist_dir),
                   "--device", "cpu", "--experiment", "direct")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"epoch +1/1 +train_loss \d\.\d{4} +train_acc +\d+\.\d\d% +test_loss", proc.stdout)
    [run] = runs_of("direct")
    assert run.info.run_name == "bn-s4" and run.info.status == "FINISHED"
    assert run.data.params["seed"] == "4"


def test_cuda_without_a_gpu_is_refused(tracking_uri, small_mnist_dir):
    proc = run_cli("train", "--device", "cuda", "--data-dir", str(small_mnist_dir))
    assert proc.returncode == 2 and "no CUDA GPU is available" in proc.stderr


def test_every_mlproject_parameter_is_declared_typed_and_defaulted_and_reaches_the_command():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert project["conda_env"] == "conda.yaml"
    for name, entry in project["entry_points"].items():
        for param, spec in entry["parameters"].items():
            assert spec["type"] in {"string", "float", "path", "uri"}, (name, param)
            assert "default" in spec, (name, param)
            assert "{" + param + "}" in entry["command"], (name, param)
    main = project["entry_points"]["main"]
    required = {"norm", "l1", "groups", "dataset", "data_dir", "epochs", "batch_size", "lr", "seed", "device"}
    assert required <= set(main["parameters"])


def test_conda_env_lists_the_package_dependencies():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(pip_deps) == sorted(pyproject["project"]["dependencies"])
    assert "python=3.11" in conda["dependencies"]


def test_every_file_the_readme_points_to_is_in_the_repository():
    """Graphs, galleries and benchmark outputs the README shows or cites are committed, not
    left behind by an ignore rule (CI runs on a clean clone, so a missing file fails here)."""
    readme = (ROOT / "README.md").read_text()
    cited = set(re.findall(r"\b((?:docs|benchmarks/results)/[\w./-]+\.(?:png|json|txt|md|csv))", readme))
    assert len(cited) >= 8, cited  # the findings' graphs and galleries, the benchmark outputs
    missing = sorted(path for path in cited if not (ROOT / path).is_file())
    assert not missing, f"the README cites files the repository lacks: {missing}"
