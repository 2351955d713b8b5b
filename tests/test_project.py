"""The MLflow project end to end: `mlflow run .` and `normlab train` into real sqlite stores."""

import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, cli_env, run_cli, run_cli_noting_imports, scratch_folder

METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")


def mlflow_run(*params: str, experiment: str | None = "project-test", entry: str = "main",
               timeout: float = 900) -> subprocess.CompletedProcess:
    """`mlflow run ROOT` from another folder, without this checkout on PYTHONPATH: as in the
    environment MLflow builds from conda.yaml, the project runs from its own folder.
    experiment=None names none, as a user typing `mlflow run .` does."""
    args = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "-e", entry]
    if experiment is not None:
        args += ["--experiment-name", experiment]
    for p in params:
        args += ["-P", p]
    env = cli_env(PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("PYTHONPATH")
    return subprocess.run(args, env=env, cwd=scratch_folder("mlflow-run-"), capture_output=True, text=True,
                          timeout=timeout)


def runs_of(experiment: str):
    exp = MlflowClient().get_experiment_by_name(experiment)
    return [] if exp is None else MlflowClient().search_runs([exp.experiment_id])


def test_mlflow_run_trains_one_fully_recorded_run(tracking_uri, small_mnist_dir, tmp_path):
    proc = mlflow_run("norm=gn", "epochs=2", "l1=1e-5", f"data_dir={small_mnist_dir}")
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


# A bad parameter refused by normlab's checks under the real `mlflow run` (half a minute on
# CI); click's own parse errors there: tests/test_bad_input.py. Every message itself is
# tested on `normlab train` (tests/test_bad_input.py, tests/test_train.py, tests/test_explain.py).
@pytest.mark.parametrize("param,message", [
    ("groups=3", "--groups 3 does not divide the mnist model's channel counts [10, 20]; valid choices: 1, 2, 5, 10"),
])
def test_bad_parameters_fail_before_training(tracking_uri, small_mnist_dir, param, message):
    params = {"norm": "gn", "data_dir": str(small_mnist_dir)}
    key, value = param.split("=")
    params[key] = value
    proc = mlflow_run(*(f"{k}={v}" for k, v in params.items()), experiment="bad")
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "epoch " not in proc.stdout  # no training line was printed
    [run] = runs_of("bad")  # the run `mlflow run` made for the command, which failed it
    assert run.info.status == "FAILED"
    assert MlflowClient().get_metric_history(run.info.run_id, "test_acc") == []


def test_mlflow_run_as_typed_then_ctrl_c_then_the_printed_resume_then_compare(tracking_uri, small_mnist_dir,
                                                                                tmp_path):
    """What a user types: `mlflow run` with the defaults (device=auto, no experiment name)
    and their own spellings (`-P lr=.05 -P l1=1e-5 -P seed=3`), Ctrl-C during epoch 2, the
    resume command exactly as printed (no --data-dir), then `mlflow run -e compare` with its
    defaults. One `mlflow run` of each entry point: they take half a minute each."""
    cache = tmp_path / "cache"  # the default --checkpoint-dir lives under XDG_CACHE_HOME
    args = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "-P", "norm=ln",
            "-P", "epochs=2", "-P", "lr=.05", "-P", "l1=1e-5", "-P", "seed=3", "-P", f"data_dir={small_mnist_dir}"]
    # MLflow's system metrics sampled each second, as a run of minutes is sampled each 10 s: their
    # first sample (step 0) is in the store before the model is logged
    sampled = dict(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1", MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING="1")
    env = cli_env(PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], XDG_CACHE_HOME=str(cache),
                  **sampled)
    env.pop("PYTHONPATH")
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch   1/2"):
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal reaches `mlflow run`
            break
    out, err = proc.communicate(timeout=300)
    assert lines and lines[-1].startswith("epoch   1/2"), "".join(lines) + out + err
    [hint] = re.findall(r"resume with: (normlab train --resume \w+)", err)

    [run] = runs_of("Default")  # where `mlflow run` puts a run when no experiment is named
    assert run.data.tags["normlab.status"] == "interrupted"
    assert hint.split()[-1] == run.info.run_id
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = subprocess.run(shlex.split(hint), cwd=elsewhere, env=cli_env(XDG_CACHE_HOME=str(cache), **sampled),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming run {run.info.run_id} after epoch 1" in resumed.stdout

    client = MlflowClient()
    run = client.get_run(run.info.run_id)
    params, tags = run.data.params, run.data.tags
    # as the user typed them, next to what normlab resolved
    assert params["device"] == "auto" and tags["normlab.device"] == "cpu"
    assert params["lr"] == ".05" and params["l1"] == "1e-5" and params["seed"] == "3"
    assert params["groups"] == "2" and params["batch_size"] == "128" and params["dataset"] == "mnist"
    assert params["resume"] == "''"  # MLflow logs an empty default as the shell's quoted ''
    assert tags["normlab.data_dir"] == str(Path(small_mnist_dir).resolve())
    assert tags["mlflow.runName"] == "ln-l1_1e-05-s3" and tags["normlab.status"] == "finished"
    # the CPU's techniques for LN, the same before and after the resume
    assert tags["normlab.speedups"] == "keep_freed_memory=True, channels_last=True"
    for metric in METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2], metric
    [model] = client.search_logged_models([run.info.experiment_id])
    assert model.name == "ln-l1_1e-05-s3" and model.source_run_id == run.info.run_id
    assert any(key.startswith("system/") for key in run.data.metrics)  # sampled, and not the model's:
    final = {m.key: m.value for m in model.metrics}
    assert final == {k: run.data.metrics[k] for k in ("test_acc", "test_loss")}
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    # `mlflow run -e compare` with its defaults finds the run although it is in "Default"
    compared = mlflow_run("out=" + str(tmp_path / "out"), entry="compare", experiment=None)
    assert compared.returncode == 0, compared.stderr[-3000:]
    table = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert table["run_id"].tolist() == [run.info.run_id]
    [comparison] = [r for r in runs_of("Default") if r.info.run_id != run.info.run_id]
    assert comparison.data.tags["compared_run_ids"] == run.info.run_id


@pytest.mark.parametrize("args, shown", [
    (["--help"], "Commands:"),
    (["train", "--help"], "--norm [bn|ln|gn|in|none]"),
    (["sweep", "--norms", "bn,xx"], "xx"),
    (["train", "--norm", "xx"], "'xx' is not one of 'bn', 'ln', 'gn', 'in', 'none'"),
    (["train", "--norm", "gn", "--groups", "3"], "--groups 3 does not divide"),
    (["train", "--experiment", ""], "Invalid value for '--experiment': an experiment needs a name; leave "
                                    "--experiment out for 'normlab'"),  # was MLflow's traceback after the data
    (["sweep", "--experiment", "x" * 501],
     "Invalid value for '--experiment': 501 characters; MLflow takes at most 500"),
    (["compare", "--experiment", " "], "an experiment needs a name"),
])
def test_help_and_mistyped_options_answer_without_importing_torch_or_mlflow(args, shown):
    """They answer in a fraction of a second: torch and MLflow cost 4-5 s to import on CI's CPU."""
    done = run_cli_noting_imports(*args, timeout=60)
    assert done.stdout.splitlines()[-1] == "imported: []", done.stdout[-2000:] + done.stderr[-2000:]
    assert shown in done.stdout + done.stderr


EXIT_PROBE = """import atexit, sys, threading, time
from pathlib import Path
from normlab.cli import entry
out = Path(sys.argv[1])
sys.argv[1:] = sys.argv[2:]
atexit.register(lambda: print("atexit handler ran"))  # stdout piped: held in its buffer until flushed
def late():
    time.sleep(0.5)
    (out / "thread").write_text("joined")
threading.Thread(target=late).start()
entry()
"""


@pytest.mark.parametrize("args, status, stream, shown", [
    (["--help"], 0, "stdout", "  train    Train one variant as one MLflow run: params, per-epoch..."),
    (["train", "--norm", "xx"], 2, "stderr",
     "Error: Invalid value for '--norm': 'xx' is not one of 'bn', 'ln', 'gn', 'in', 'none'."),
])
def test_the_entry_ends_the_process_as_python_would(tmp_path, args, status, stream, shown):
    """The entry leaves the memory to the OS (cli._exit_leaving_memory_to_the_os): the exit
    status, atexit handlers, a running thread joined, and output piped (so block-buffered, as
    with `| tee`) all as Python's own exit has them."""
    env = cli_env()
    del env["PYTHONUNBUFFERED"]
    done = subprocess.run([sys.executable, "-c", EXIT_PROBE, str(tmp_path), *args],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == status
    assert shown in getattr(done, stream).splitlines()
    assert done.stdout.splitlines()[-1] == "atexit handler ran" and (tmp_path / "thread").read_text() == "joined"


def test_normlab_train_creates_its_own_named_run(tracking_uri, small_mnist_dir):
    proc = run_cli("train", "--norm", "bn", "--epochs", "1", "--seed", "4", "--data-dir", str(small_mnist_dir),
                   "--experiment", "direct")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"epoch +1/1 +train_loss \d\.\d{4} +train_acc +\d+\.\d\d% +test_loss", proc.stdout)
    [run] = runs_of("direct")
    assert run.info.run_name == "bn-s4" and run.info.status == "FINISHED"
    assert run.data.params["seed"] == "4"


@pytest.mark.parametrize("command,device", [("train", "cuda"), ("sweep", "cuda:1")])
def test_cuda_without_a_gpu_is_refused_before_anything_starts(command, device, small_mnist_dir, tmp_path):
    """No GPU visible (the CLI tests' CUDA_VISIBLE_DEVICES=""): refused from CUDA's driver,
    before torch or MLflow is imported, a process started or a store made."""
    proc = run_cli_noting_imports(command, "--device", device, "--data-dir", str(small_mnist_dir), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # on a GPU machine the message says which setting hides its GPUs (test_engine_process checks it there)
    assert re.search(rf"Error: --device {device} was requested but no CUDA GPU is available here"
                     rf"( \(CUDA_VISIBLE_DEVICES='' shows CUDA 0 of this machine's \d+ GPUs?.*\))?; "
                     rf"use --device cpu or auto", proc.stderr), proc.stderr
    assert "imported: []" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists()


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


def test_system_metrics_are_on_so_psutil_is_a_declared_dependency(monkeypatch):
    """MLflow refuses to start a run with system metrics on and psutil missing; the test
    extras bring psutil (through ipykernel), a user's `pip install -e .` did not."""
    from normlab.tracking.run_log import _system_metrics

    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    assert _system_metrics() is True
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.match(r"psutil\b", d) for d in declared), declared


def test_every_file_the_readme_points_to_is_in_the_repository():
    """Graphs, galleries and benchmark outputs the README shows or cites are committed, not
    left behind by an ignore rule (CI runs on a clean clone, so a missing file fails here)."""
    readme = (ROOT / "README.md").read_text()
    cited = set(re.findall(r"\b((?:docs|benchmarks/results)/[\w./-]+\.(?:png|json|txt|md|csv))", readme))
    assert len(cited) >= 8, cited  # the findings' graphs and galleries, the benchmark outputs
    missing = sorted(path for path in cited if not (ROOT / path).is_file())
    assert not missing, f"the README cites files the repository lacks: {missing}"
