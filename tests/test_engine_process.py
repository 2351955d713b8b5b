"""`normlab train` and `normlab sweep` with their engine in a process of their own
(engine/fast/engine_process.py).

On a GPU that is the default; CI has none, so these tests ask for it on the CPU with
NORMLAB_ENGINE_PROCESS=always: the same code, the same messages, the same runs. They check it
logs exactly what the one-process command logs, and that every ending crosses the process
boundary: a stop, a divergence, bad data, a dead engine process. A sweep's runs in an engine
process are checked in tests/test_sweep.py, whose stopped-and-resumed sweep runs both ways and
whose runs there log what each logs alone, bit for bit.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from mlflow import MlflowClient

from normlab.engine.checkpoint import load
from normlab.engine import devices
from normlab.engine.config import TrainConfig
from normlab.engine.fast import engine_process
from normlab.engine.train import Trainer, fit
from normlab.errors import NoGpuHere
from normlab.tracking import results_process
from tests.conftest import cli_env, run_cli, run_cli_noting_imports
from tests.process_output import Lines
from tests.test_sweep import histories, sweep_runs

SPLIT = {"NORMLAB_ENGINE_PROCESS": "always"}


def start(cwd: Path, *args: str, command: str = "train", **env) -> tuple[subprocess.Popen, Lines]:
    """`normlab train ARGS` (or another command) in a session of its own (a terminal's Ctrl-C
    reaches its whole group)."""
    proc = subprocess.Popen([sys.executable, "-m", "normlab", command, *args], cwd=cwd, env=cli_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, Lines(proc.stdout)


def engine_of(proc: subprocess.Popen) -> psutil.Process:
    """The command's engine process (not multiprocessing's resource tracker beside it, nor its
    results processes)."""
    [engine] = [c for c in spawned(proc) if c.name() not in results_process.PROCESS_NAMES.values()]
    return engine


def results_processes_of(proc: subprocess.Popen) -> dict[str, psutil.Process]:
    """The command's results processes, by role."""
    names = {name: role for role, name in results_process.PROCESS_NAMES.items()}
    helpers = {names[c.name()]: c for c in spawned(proc) if c.name() in names}
    assert sorted(helpers) == sorted(results_process.ROLES)
    return helpers


def spawned(proc: subprocess.Popen) -> list[psutil.Process]:
    return [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]


def kill_then_wait(child: psutil.Process, proc: subprocess.Popen, out: Lines) -> None:
    """Kill one of the command's processes, as the OOM killer would, and wait for the command's end."""
    child.kill()
    proc.wait(timeout=300)
    out.thread.join(timeout=10)


def only_run(client: MlflowClient, experiment: str):
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def final_state(run_id: str) -> dict:
    return load(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint/last.pt")))


def test_a_run_trained_in_an_engine_process_logs_what_one_trained_in_one_process_logs(
        small_mnist_dir, tmp_path, tracking_uri):
    common = ("--norm", "gn", "--epochs", "2", "--data-dir", str(small_mnist_dir), "--checkpoint-dir", str(tmp_path))
    split = run_cli("train", *common, "--experiment", "split", **SPLIT, cwd=tmp_path)
    assert split.returncode == 0, split.stdout + split.stderr
    alone = run_cli("train", *common, "--experiment", "alone", NORMLAB_ENGINE_PROCESS="never", cwd=tmp_path)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    client = MlflowClient()
    ours, theirs = only_run(client, "split"), only_run(client, "alone")
    assert histories(client, ours.info.run_id) == histories(client, theirs.info.run_id)  # bit for bit
    assert [s for s, _ in histories(client, ours.info.run_id)["test_acc"]] == [1, 2]
    assert ours.data.params == theirs.data.params
    assert ours.data.params["device"] == "cpu" and int(ours.data.params["parameters"]) > 7000
    same_tags = ("device", "normlab.device", "config_hash", "torch_version", "normlab.status", "normlab.speedups")
    assert {t: ours.data.tags[t] for t in same_tags} == {t: theirs.data.tags[t] for t in same_tags}
    assert ours.inputs.dataset_inputs[0].dataset.digest == theirs.inputs.dataset_inputs[0].dataset.digest
    ours_state, theirs_state = final_state(ours.info.run_id), final_state(theirs.info.run_id)
    for name, weights in theirs_state["model"].items():
        assert torch.equal(ours_state["model"][name], weights), name
    mistakes = [mlflow.artifacts.load_dict(f"runs:/{r.info.run_id}/misclassified.json") for r in (ours, theirs)]
    assert mistakes[0] == mistakes[1] and len(mistakes[0]) == 10
    image = mlflow.artifacts.load_image(f"runs:/{ours.info.run_id}/misclassified.png")
    assert image.size[0] > 400  # the 5x2 grid of real digits drawn on this side
    # drawn and saved in the command's results process (split) or in the command (alone): the same files
    assert artifact_bytes(ours, "misclassified.png") == artifact_bytes(theirs, "misclassified.png")
    ours_model, theirs_model = model_files(ours), model_files(theirs)
    assert sorted(ours_model) == sorted(theirs_model) and "data/model.pt2" in ours_model
    assert ours_model == theirs_model  # MLmodel without its ids and time; the program byte for byte
    model = mlflow.pytorch.load_model(ours.data.tags["model_uri"])
    x = torch.zeros(2, 1, 28, 28)
    reference = mlflow.pytorch.load_model(theirs.data.tags["model_uri"])
    assert torch.equal(model(x), reference(x))


def artifact_bytes(run, path: str) -> bytes:
    return Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=path)).read_bytes()


MLMODEL_OWN = ("artifact_path:", "model_id:", "model_uuid:", "run_id:", "utc_time_created:")  # differ run to run


def model_files(run) -> dict[str, bytes]:
    """The run's logged model folder, file by file; MLmodel without the lines naming this run and model."""
    folder = Path(mlflow.artifacts.download_artifacts(run.data.tags["model_uri"]))
    files = {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}
    files["MLmodel"] = b"".join(line for line in files["MLmodel"].splitlines(keepends=True)
                                if not line.startswith(tuple(m.encode() for m in MLMODEL_OWN)))
    return files


def test_results_processes_that_die_leave_their_work_to_the_command_and_the_run_logs_everything(
        small_mnist_dir, tmp_path, tracking_uri):
    proc, out = start(tmp_path, "--norm", "ln", "--epochs", "2", "--data-dir", str(small_mnist_dir),
                      "--checkpoint-dir", str(tmp_path / "ck"), **SPLIT)
    run_id = out.wait_for(r"^MLflow run (\w+) ", timeout=300).group(1)
    helpers = results_processes_of(proc)
    helpers["figures"].kill()
    kill_then_wait(helpers["models"], proc, out)
    assert proc.returncode == 0, out.text
    for work in ("the models", "the misclassified grids"):
        assert (f"normlab: the results process for {work} ended (exit code -9); this process does that work "
                "from now") in out.text
    run = MlflowClient().get_run(run_id)
    assert (run.info.status, run.data.tags["normlab.status"]) == ("FINISHED", "finished")
    assert mlflow.artifacts.load_image(f"runs:/{run_id}/misclassified.png").size[0] > 400
    model = mlflow.pytorch.load_model(run.data.tags["model_uri"])
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_calls_waiting_together_on_a_dead_results_process_do_their_work_here_and_say_so_once(capfd):
    """A sweep's runs that finish together wait in turn on the results process: when it has
    died, each does its work in this process, and the death is told once, not once per run."""
    with results_process.started(True), ThreadPoolExecutor(4) as pool:
        helper = results_process.current()
        calls = [pool.submit(results_process.call, os.getpid) for _ in range(4)]
        time.sleep(0.5)  # one call sent to the helper, still warming up (seconds); three wait their turn
        helper._process.kill()
        pids = [call.result(timeout=60) for call in calls]
    assert pids == [os.getpid()] * 4  # each done in this process
    assert capfd.readouterr().err.count("normlab: the results process for the models ended (exit code -9)") == 1


def test_what_a_gpu_engine_starts_before_torchs_import_imports_no_torch_and_ends_quietly_without_a_gpu():
    """start_beside_torch_import, a GPU engine process's first step: in a fresh process it
    imports no torch (its point is to run beside torch's import), and its threads (Triton's
    build hash, the GPU's context) end without a word where there is no CUDA driver: torch
    reports a missing GPU itself, later."""
    code = ("import sys, threading\n"
            "from normlab.engine.fast import engine_process\n"
            "engine_process.start_beside_torch_import('cuda:0')\n"
            "for t in threading.enumerate():\n"
            "    if t.name.startswith('normlab-'): t.join(60)\n"
            "print('torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "False\n", ""), proc.stderr  # no thread raised


def test_the_results_switch_follows_the_engine_process_and_names_its_choices(monkeypatch, tmp_path):
    assert results_process.wanted(True) and not results_process.wanted(False)  # auto
    monkeypatch.setenv("NORMLAB_RESULTS_PROCESS", "never")
    assert not results_process.wanted(True)
    monkeypatch.setenv("NORMLAB_RESULTS_PROCESS", "always")
    assert results_process.wanted(False)
    result = run_cli("train", "--epochs", "1", NORMLAB_RESULTS_PROCESS="sometimes", cwd=tmp_path)
    assert result.returncode == 2
    assert "NORMLAB_RESULTS_PROCESS='sometimes'; valid choices: auto, always, never" in result.stderr
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()


def test_ctrl_c_reaches_the_engine_process_once_and_the_run_resumes_from_its_checkpoint(
        small_mnist_dir, tmp_path, tracking_uri):
    checkpoints = tmp_path / "ck"
    proc, out = start(tmp_path, "--epochs", "8", "--data-dir", str(small_mnist_dir), "--checkpoint-dir",
                      str(checkpoints), **SPLIT)
    run_id = out.wait_for(r"^MLflow run (\w+) ", timeout=300).group(1)
    engine, helpers = engine_of(proc), results_processes_of(proc)
    out.wait_for(r"^epoch   1/8", timeout=300)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the command, its engine and results processes
    proc.wait(timeout=120)
    out.thread.join(timeout=10)
    assert proc.returncode == 130, out.text
    assert out.text.count("Ctrl-C again to abort now") == 1 and "aborted" not in out.text, out.text  # one stop
    assert "results process ended" not in out.text and "Traceback" not in out.text, out.text
    for child in (engine, *helpers.values()):
        assert not psutil.pid_exists(child.pid) or child.status() == psutil.STATUS_ZOMBIE
    client = MlflowClient()
    run = client.get_run(run_id)
    assert (run.info.status, run.data.tags["normlab.status"]) == ("KILLED", "interrupted")
    assert "SIGINT received: stopped " in run.data.tags["normlab.reason"]
    done = load(checkpoints / run_id / "last.pt")["epoch"]
    assert 1 <= done < 8  # stopped within the epoch it was in, or the next
    assert [s for s, _ in histories(client, run_id)["test_acc"]] == list(range(1, done + 1))
    resumed = run_cli("train", "--resume", run_id, "--epochs", "8", "--checkpoint-dir", str(checkpoints),
                      cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming run {run_id} after epoch {done}" in resumed.stdout
    assert [s for s, _ in histories(client, run_id)["test_acc"]] == list(range(1, 9))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_an_engine_process_that_dies_fails_the_run_and_says_so(small_mnist_dir, tmp_path, tracking_uri):
    proc, out = start(tmp_path, "--epochs", "20", "--data-dir", str(small_mnist_dir), "--checkpoint-dir",
                      str(tmp_path / "ck"), **SPLIT)
    run_id = out.wait_for(r"^MLflow run (\w+) ", timeout=300).group(1)
    out.wait_for(r"^epoch   1/20", timeout=300)
    kill_then_wait(engine_of(proc), proc, out)
    assert proc.returncode == 1, out.text
    assert "the engine process ended without a word (exit code -9)" in out.text
    run = MlflowClient().get_run(run_id)
    assert (run.info.status, run.data.tags["normlab.status"]) == ("FAILED", "failed")
    assert "EngineDied: the engine process ended without a word (exit code -9)" in run.data.tags["normlab.reason"]


def test_a_diverging_run_fails_with_its_advice_across_the_process_boundary(small_mnist_dir, tmp_path, tracking_uri):
    result = run_cli("train", "--lr", "1e4", "--epochs", "2", "--data-dir", str(small_mnist_dir), "--checkpoint-dir",
                     str(tmp_path), **SPLIT, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "training diverged at --lr 10000.0; lower the learning rate" in result.stderr
    run = only_run(MlflowClient(), "normlab")
    assert (run.info.status, run.data.tags["normlab.status"]) == ("FAILED", "failed")
    assert "training diverged at --lr 10000.0" in run.data.tags["normlab.reason"]


def test_bad_data_is_reported_before_any_run_and_the_engine_process_ends(small_mnist_dir, tmp_path, tracking_uri):
    data = tmp_path / "data" / "MNIST" / "raw"
    data.mkdir(parents=True)
    for file in (small_mnist_dir / "MNIST" / "raw").iterdir():
        (data / file.name).write_bytes(file.read_bytes()[:1000])  # truncated: parsing fails, nothing downloads
    result = run_cli("train", "--data-dir", str(tmp_path / "data"), **SPLIT, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the file is truncated or corrupt; delete it and download again" in result.stderr
    assert "Traceback" not in result.stderr
    client = MlflowClient()
    experiment = client.get_experiment_by_name("normlab")
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []


def test_a_batch_larger_than_the_data_is_a_usage_error_from_the_engine_process(small_mnist_dir, tmp_path, tracking_uri):
    result = run_cli("train", "--batch-size", "5000", "--data-dir", str(small_mnist_dir), **SPLIT, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--batch-size 5000 is larger than the training split (1000 images); choose at most 1000" in result.stderr


def test_the_switch_names_its_choices_and_auto_means_a_gpu(monkeypatch):
    monkeypatch.setenv("NORMLAB_ENGINE_PROCESS", "sometimes")
    with pytest.raises(Exception, match=r"NORMLAB_ENGINE_PROCESS='sometimes'; valid choices: auto, always, never"):
        engine_process.wanted("auto")
    monkeypatch.setenv("NORMLAB_ENGINE_PROCESS", "auto")
    assert engine_process.wanted("cuda") and engine_process.wanted("cuda:1")
    assert not engine_process.wanted("cpu")
    assert engine_process.wanted("auto") == (torch.version.cuda is not None and devices.cuda_devices() > 0)
    assert devices.torch_has_cuda() == (torch.version.cuda is not None)  # the installed build, unimported
    if "CUDA_VISIBLE_DEVICES" not in os.environ:  # both honour it, but torch may read it before this test sets it
        assert devices.cuda_devices() == torch.cuda.device_count()
    monkeypatch.setenv("NORMLAB_ENGINE_PROCESS", "never")
    assert not engine_process.wanted("cuda")


def test_a_missing_gpu_is_named_from_the_drivers_count_and_a_rocm_torch_is_left_to_torch(monkeypatch):
    assert [devices.cuda_index(d) for d in ("cuda", "cuda:2", "auto", "cpu", "cuda:x")] == [0, 2, None, None, None]
    monkeypatch.setattr(devices, "_torch_library", lambda pattern: pattern == "libtorch_cuda*")
    monkeypatch.setattr(devices, "cuda_devices", lambda: 2)
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:1"):
        devices.refuse_a_missing_gpu(device)
    with pytest.raises(NoGpuHere, match=r"^--device cuda:2 was requested but this machine has 2 CUDA GPUs "
                                        r"\(cuda:0 to cuda:1\); use one of them, cuda, cpu or auto$"):
        devices.refuse_a_missing_gpu("cuda:2")
    monkeypatch.setattr(devices, "cuda_devices", lambda: 1)
    with pytest.raises(NoGpuHere, match=r"has 1 CUDA GPU \(cuda:0\); use one of them"):
        devices.refuse_a_missing_gpu("cuda:1")
    monkeypatch.setattr(devices, "cuda_devices", lambda: 0)
    with pytest.raises(NoGpuHere, match="no CUDA GPU is available here"):
        devices.refuse_a_missing_gpu("cuda")
    monkeypatch.setattr(devices, "_torch_library", lambda pattern: pattern == "libtorch_hip*")
    devices.refuse_a_missing_gpu("cuda")  # ROCm: its GPUs are torch's to count


def test_gpus_hidden_by_cuda_visible_devices_are_named_in_the_refusal_and_for_auto(monkeypatch):
    """The machine's count comes from NVML (the NVIDIA driver's library), here stood in for: CI has
    no GPU (the GPU test below checks it as typed on one)."""
    monkeypatch.setattr(devices, "_torch_library", lambda pattern: pattern == "libtorch_cuda*")
    monkeypatch.setattr(devices, "machine_gpus", lambda: 2)
    monkeypatch.setattr(devices, "cuda_devices", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,0")
    hidden = ("CUDA_VISIBLE_DEVICES='0,0' shows CUDA 0 of this machine's 2 GPUs: name each of 0 to 1 at most once, "
              "or unset it for all")
    with pytest.raises(NoGpuHere) as refused:
        devices.refuse_a_missing_gpu("cuda")
    assert str(refused.value) == (f"--device cuda was requested but no CUDA GPU is available here ({hidden}); "
                                  f"use --device cpu or auto")
    assert devices.auto_on_the_cpu_note("auto") == f"--device auto trains on the CPU: {hidden}"
    assert devices.auto_on_the_cpu_note("cpu") == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(devices, "cuda_devices", lambda: 1)
    with pytest.raises(NoGpuHere, match=r"^--device cuda:1 was requested but CUDA sees 1 CUDA GPU \(cuda:0\) "
                                        r"\(CUDA_VISIBLE_DEVICES='1' shows CUDA 1 of this machine's 2 GPUs"):
        devices.refuse_a_missing_gpu("cuda:1")
    assert devices.auto_on_the_cpu_note("auto") == ""  # it trains on the GPU CUDA sees
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(devices, "cuda_devices", lambda: 2)
    assert devices.hidden_gpus_note(2) == ""
    monkeypatch.setattr(devices, "machine_gpus", lambda: 0)  # no NVIDIA driver: nothing is hidden
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(devices, "cuda_devices", lambda: 0)
    assert devices.hidden_gpus_note(0) == "" and devices.auto_on_the_cpu_note("auto") == ""


def test_a_bad_switch_is_refused_before_anything_starts(tmp_path):
    result = run_cli("train", "--epochs", "1", NORMLAB_ENGINE_PROCESS="sometimes", cwd=tmp_path)
    assert result.returncode == 2
    assert "NORMLAB_ENGINE_PROCESS='sometimes'; valid choices: auto, always, never" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def sweep_children(client: MlflowClient, experiment: str) -> dict[str, list]:
    """A sweep's child runs (test_sweep.sweep_runs) by name: a name with two runs shows as two."""
    children: dict[str, list] = {}
    for run in sweep_runs(client, experiment)[1].values():
        children.setdefault(run.info.run_name, []).append(run)
    return children


SWEEP = ("--norms", "bn,ln", "--seeds", "2", "--epochs", "2")


def test_a_sweeps_engine_process_killed_mid_run_is_replaced_and_every_child_finishes_once(
        small_mnist_dir, tmp_path, tracking_uri):
    """Killed under ln-s1, the second run: the first, bn-l1_1e-05-s1, the engine started early
    (before the command handed it over) and has trained by then on these 1,000 digits."""
    proc, out = start(tmp_path, *SWEEP, "--data-dir", str(small_mnist_dir), "--checkpoint-dir", str(tmp_path / "ck"),
                      command="sweep", **SPLIT)
    run_id = out.wait_for(r"^\[ln-s1\] MLflow run (\w+) ", timeout=300).group(1)
    out.wait_for(r"^\[ln-s1\] epoch   1/2", timeout=300)
    kill_then_wait(engine_of(proc), proc, out)
    assert proc.returncode == 0, out.text
    assert ("[ln-s1] the engine process ended without a word (exit code -9) under this run; "
            "trying it again (resuming)") in out.text
    assert f"[ln-s1] resuming run {run_id} after epoch 1" in out.text
    client = MlflowClient()
    children = sweep_children(client, "normlab")
    assert sorted(children) == ["bn-l1_1e-05-s1", "bn-l1_1e-05-s2", "ln-s1", "ln-s2"]
    for name, runs in children.items():
        assert [r.info.status for r in runs] == ["FINISHED"], name  # one run each, finished
        assert [s for s, _ in histories(client, runs[0].info.run_id)["test_acc"]] == [1, 2], name
    assert children["ln-s1"][0].info.run_id == run_id
    assert "sweep: 4 of 4 children finished" in out.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_train_has_an_engine_process_by_default_and_logs_what_one_process_logs(
        small_mnist_dir, tmp_path, tracking_uri):
    gpu = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES") or "0"}
    common = ("--epochs", "3", "--data-dir", str(small_mnist_dir), "--checkpoint-dir", str(tmp_path))
    proc, out = start(tmp_path, *common, "--experiment", "split", **gpu)  # as typed: auto, on a GPU
    out.wait_for(r"^MLflow run (\w+) ", timeout=300)
    assert engine_of(proc).is_running()
    proc.wait(timeout=300)
    out.thread.join(timeout=10)
    assert proc.returncode == 0, out.text
    assert "device cuda" in out.text
    alone = run_cli("train", *common, "--experiment", "alone", NORMLAB_ENGINE_PROCESS="never", **gpu, cwd=tmp_path)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    client = MlflowClient()
    ours, theirs = only_run(client, "split"), only_run(client, "alone")
    assert ours.data.params["device"] == "cuda" and ours.data.tags["device"] == torch.cuda.get_device_name(0)
    assert histories(client, ours.info.run_id) == histories(client, theirs.info.run_id)  # bit for bit
    ours_state, theirs_state = final_state(ours.info.run_id), final_state(theirs.info.run_id)
    for name, weights in theirs_state["model"].items():
        assert torch.equal(ours_state["model"][name], weights), name



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_machine_gpus_hidden_by_cuda_visible_devices_are_named(small_mnist_dir, tmp_path, tracking_uri):
    """As typed with a GPU named twice, which CUDA cannot start on: --device cuda is refused
    saying why, and auto says it trains on the CPU, then does."""
    hidden = r"CUDA_VISIBLE_DEVICES='0,0' shows CUDA 0 of this machine's \d+ GPUs?: name each of 0 to \d+ at most once"
    refused = run_cli_noting_imports("train", "--device", "cuda", cwd=tmp_path, CUDA_VISIBLE_DEVICES="0,0")
    assert refused.returncode == 2 and "imported: []" in refused.stdout, refused.stdout + refused.stderr
    assert re.search(rf"no CUDA GPU is available here \({hidden}.*\); use --device cpu or auto", refused.stderr)
    auto = run_cli("train", "--epochs", "1", "--data-dir", str(small_mnist_dir), "--checkpoint-dir", str(tmp_path),
                   cwd=tmp_path, CUDA_VISIBLE_DEVICES="0,0")
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert re.search(rf"^note: --device auto trains on the CPU: {hidden}", auto.stderr, re.M), auto.stderr
    assert only_run(MlflowClient(), "normlab").data.tags["normlab.device"] == "cpu"


LOCK_THEN_EXIT = """
import multiprocessing, os, sys

def engine(prepared):
    from normlab.engine.fast import engine_process
    if prepared:
        engine_process._no_semaphore_left_at_exit()
    import tqdm
    tqdm.tqdm(total=1, disable=True)  # as Inductor's compile progress bar: tqdm makes its lock
    os._exit(0)  # as the engine process ends

if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=engine, args=(sys.argv[1] == "1",))
    child.start()
    child.join()
"""


def test_an_engine_process_that_compiled_leaves_no_semaphore_for_the_tracker_to_warn_about(tmp_path):
    """The engine process ends with os._exit, past multiprocessing's exit handlers: a semaphore
    it made (tqdm's lock, for Inductor's progress bars when it compiles) was reported leaked at
    the end of every compiled sweep. The engine's start makes tqdm's lock a thread lock."""
    script = tmp_path / "lock_then_exit.py"
    script.write_text(LOCK_THEN_EXIT)
    warned = {}
    for prepared in ("0", "1"):
        proc = subprocess.run([sys.executable, str(script), prepared], env=cli_env(), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        warned[prepared] = "leaked semaphore" in proc.stderr
    assert warned == {"0": True, "1": False}


def test_runs_started_early_are_claimed_by_their_configs_and_those_not_wanted_are_dropped(small_mnist_dir):
    """The engine process of a sweep starts training its first runs before the command hands
    them over (EngineProcess's ``early``): a handed-over run of the same config and epochs
    ahead receives everything its early run reported, in order, and trains what a run handed
    over normally trains; an early run the command does not want (trained already, say) is
    stopped and nothing of it is ever sent; a run of that config handed over anyway trains anew."""
    from normlab.engine.config import steps_key
    from normlab.engine.fast.trainer_pool import TrainerPool

    messages: list[tuple] = []
    all_sent = threading.Condition()

    def send(*message) -> None:
        with all_sent:
            messages.append(message)
            all_sent.notify_all()

    def ended(key: int) -> bool:
        return any(m[0] == key and m[1] not in engine_process.UNDER_WAY for m in messages)

    first, second = (TrainConfig(norm=norm, epochs=2, batch_size=100, seed=3) for norm in ("ln", "gn"))
    ahead = {steps_key(first): 2, steps_key(second): 2}
    pool = TrainerPool("cpu", str(small_mnist_dir), concurrent=2)
    runs = engine_process._Runs(pool, send)
    runs.start_early([first, second], ahead)
    runs.act("keep early", [(first, 2)])  # the second is not wanted: stopped, never sent
    runs.act("train", 7, first, 2, None)  # claims the first's early run
    with all_sent:
        assert all_sent.wait_for(lambda: ended(7), timeout=300)
    runs.act("train", 8, second, 2, None)  # its early run was dropped: trains anew
    with all_sent:
        assert all_sent.wait_for(lambda: ended(8), timeout=300)
    assert {m[0] for m in messages} == {7, 8}  # nothing under an early run's own key
    claimed = [m[1:] for m in messages if m[0] == 7]
    anew = [m[1:] for m in messages if m[0] == 8]
    assert [m[0] for m in claimed] == [m[0] for m in anew]  # built, prepared, started/steps/epoch..., finished
    assert [kind for kind, *_ in claimed if kind == "epoch"] == ["epoch", "epoch"]
    assert claimed[-1][0] == anew[-1][0] == "finished"
    for config, sent in ((first, claimed), (second, anew)):
        alone = fit(Trainer(config, pool.data("mnist")))  # a run of its own, with the same default speedups
        assert [body[0].metrics() for kind, *body in sent if kind == "epoch"] == [r.metrics() for r in alone.records]


def test_an_engine_process_started_in_place_of_a_dead_one_starts_no_run_early(monkeypatch):
    """Its runs were handed over already (and come back resumed): a new child that started the
    sweep's first runs early again would train them to no one, in the places of those runs."""
    started: list[bool] = []

    class Child:  # the child process each _Channel starts, recorded instead
        def __init__(self, engine, early=False):
            started.append(early)
            self.died = "killed" if len(started) == 1 else None

        def send(self, message) -> None:
            pass

        def inbox(self, key):
            return None

    monkeypatch.setattr(engine_process, "_Channel", Child)
    config = TrainConfig(norm="ln", epochs=1)
    engine = engine_process.EngineProcess("data", "cpu", ahead=([config], {}), early=True)
    engine.trainer(config)  # the first child has died: a second takes its place
    assert started == [True, False]
