"""The speed benchmark runs end to end in its tiny mode and prints the figures it promises."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, cli_env
from tests.mnist_fixture import mnist_t10k


def test_tiny_benchmark_prints_medians_ratio_accuracies_costs_and_memory(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/speed.py", "--tiny", "--device", "cpu", "--study-epochs", "1",
         "--data-dir", str(tmp_path / "no-mnist-here"), "--shared-mnist", str(mnist_t10k()), "--json", str(out)],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "the 10,000 real MNIST test digits tiled 6x; 256 train / 128 test images" in text
    rows = {m.group(1): m for m in re.finditer(
        r"^\| (notebook|normlab engine) \| ([\d.]+) \| 1 \| ([\d.]+) \| - \| (\d+) \|$", text, re.M)}
    assert set(rows) == {"notebook", "normlab engine"}, text
    ratio = float(re.search(r"per-epoch speed-up \(notebook median / engine median\): ([\d.]+)x", text).group(1))
    medians = {k: float(m.group(2)) for k, m in rows.items()}
    assert abs(ratio - medians["notebook"] / medians["normlab engine"]) < 0.06
    for m in rows.values():
        assert 0 <= float(m.group(3)) <= 100 and int(m.group(4)) > 0  # accuracy %, peak RSS MiB
    assert re.search(r"normlab engine: data load to device: median [\d.]+", text)
    assert re.search(r"notebook: data and model setup: median [\d.]+", text)
    assert "device: " in text and "(cpu)" in text
    saved = json.loads(out.read_text())
    assert len(saved["notebook"]["epoch_seconds"]) == 1 and saved["ratio"] > 0
    # the study: the notebook's estimate is each study variant's own epoch median, times the epochs
    study = saved["study"]
    variants = study["notebook_variants"]
    assert [v["name"] for v in variants] == ["notebook BN + L1 (1e-05)", "notebook LN", "notebook GN (2 groups)"]
    estimate = sum(statistics.median(v["epoch_seconds"]) for v in variants)
    assert abs(study["notebook_estimate_seconds"] - estimate) < 1e-9
    wall = study["one after another"]["wall_seconds"]
    row = re.search(r"^\| one after another \| ([\d.]+) \| ([\d.]+)x \|", text, re.M)
    assert row and abs(float(row.group(1)) - wall) < 0.06 and abs(float(row.group(2)) - estimate / wall) < 0.06


def test_cpu_step_benchmark_times_each_variant_in_fresh_processes():
    proc = subprocess.run([sys.executable, "benchmarks/cpu_step.py", "--rounds", "1", "--warmup", "0", "--steps", "1"],
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = re.findall(r"^\| (.+?) \| ([\d.]+) \| ([\d.]+)x \|$", proc.stdout, re.M)
    assert [r[0] for r in rows] == ["torch's dropout, glibc malloc defaults", "normlab's dropout, glibc malloc defaults",
                                    "torch's dropout, malloc keeps freed memory",
                                    "normlab's dropout, malloc keeps freed memory (engine default)"], proc.stdout
    base = float(rows[0][1])
    for _, ms, ratio in rows:
        assert float(ms) > 0 and abs(float(ratio) - base / float(ms)) < 0.01


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU it times ~1,000 kernel configurations")
def test_the_tile_benchmark_says_it_needs_a_gpu_and_times_nothing_without_one(tmp_path):
    out = tmp_path / "tiles.json"
    proc = subprocess.run([sys.executable, "benchmarks/conv_tiles.py", "--json", str(out)],
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "times Triton kernels on a CUDA GPU; none is available here" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("option, message", [
    (["--by-tap", "2"], "argument --by-tap: [2] out of range; valid: 0 to 1"),
    (["--stages", "1,two"], "argument --stages: '1,two' is not a comma-separated list of integers"),
    (["--concurrent", "0"], "argument --concurrent: 0; it counts copies, at least 1"),
])
def test_the_tile_benchmark_refuses_a_wrong_option_before_timing_anything(tmp_path, option, message):
    out = tmp_path / "tiles.json"
    proc = subprocess.run([sys.executable, "benchmarks/conv_tiles.py", *option, "--json", str(out)],
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not out.exists()


def test_the_tile_benchmark_refuses_an_unknown_dataset_before_importing_torch(tmp_path):
    """The dataset is checked first, so the message names it (not the missing GPU) and comes
    without torch's import."""
    probe = ("import runpy, sys; sys.argv = ['conv_tiles.py', '--datasets', 'mnist,svhn']\n"
             "try:\n    runpy.run_path('benchmarks/conv_tiles.py', run_name='__main__')\n"
             "finally:\n    print('torch imported:', 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert "unknown dataset(s) svhn; valid choices: mnist, cifar10" in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "torch imported: False"


def test_model_logging_benchmark_times_both_ways_and_prints_their_ratio(small_mnist_dir):
    """benchmarks/model_logging.py: log_model with the kept graph and traced anew, alternately."""
    proc = subprocess.run([sys.executable, "benchmarks/model_logging.py", "--data-dir", str(small_mnist_dir),
                           "--repeats", "1"], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seconds = dict(re.findall(r"^log_model, (reusing the graph|tracing anew) +([\d.]+) s", proc.stdout, re.M))
    assert seconds.keys() == {"reusing the graph", "tracing anew"}, proc.stdout
    ratio = float(re.search(r"^ratio: ([\d.]+)x$", proc.stdout, re.M).group(1))
    assert all(float(s) > 0 for s in seconds.values())
    assert ratio == pytest.approx(float(seconds["tracing anew"]) / float(seconds["reusing the graph"]), rel=0.2)


def test_end_to_end_benchmark_times_a_command_from_this_checkout_a_baseline_and_a_setting_alternately(tmp_path):
    """benchmarks/e2e.py --baseline FOLDER --also-with NAME=VALUE: `normlab train` run as a
    process from this checkout, from the baseline's and with the setting, each finished, and
    the medians compared (how docs/speed.md's before/after tables are measured). The setting is
    two CPU threads (the tests' processes have one): a real setting, under which the command
    starts no more processes than without it. Under a Python that writes no bytecode (as the
    device machines' image), the benchmark compiles the checkouts' first, as an install would."""
    baseline = tmp_path / "base"
    for part in ("normlab", "MLproject", "pyproject.toml", "conda.yaml"):
        if (ROOT / part).is_dir():
            shutil.copytree(ROOT / part, baseline / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / part, baseline / part)
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, "benchmarks/e2e.py", "--rows", "train", "--epochs", "1", "--device", "cpu",
                           "--train-images", "256", "--data-dir", str(tmp_path / "no-mnist-here"),
                           "--baseline", str(baseline), "--also-with", "OMP_NUM_THREADS=2",
                           "--out", str(out)],
                          cwd=ROOT, env=cli_env(PYTHONDONTWRITEBYTECODE="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    bytecode = report["environment"].pop("bytecode")
    assert bytecode.startswith("not written (PYTHONDONTWRITEBYTECODE)") and f"bytecode: {bytecode}\n" in proc.stdout
    assert list((baseline / "normlab" / "__pycache__").glob("cli.*.pyc")), "the baseline's normlab not compiled"
    import importlib.util

    import mlflow  # the setup it ran in, said: the cores, MLflow, and which heavy optional packages
    heavy = [name for name in ("pytorch_lightning", "lightning", "transformers") if importlib.util.find_spec(name)]
    assert report["environment"] == {"cpus": len(os.sched_getaffinity(0)), "mlflow": mlflow.__version__,
                                     "importable": heavy}
    assert (f"environment: {len(os.sched_getaffinity(0))} CPUs, MLflow {mlflow.__version__}, importable of "
            f"pytorch_lightning, lightning, transformers: {', '.join(heavy) or 'none'}") in proc.stdout
    rows = {row["row"]: row for row in report["rows"]}
    setting = "train+OMP_NUM_THREADS=2"
    assert rows.keys() == {"train", "train@base", setting, f"{setting}@base"}, proc.stdout
    assert rows["train"]["checkout"] == str(ROOT) and rows["train@base"]["checkout"] == str(baseline)
    assert rows[setting]["setting"] == {"OMP_NUM_THREADS": "2"} and rows["train"]["setting"] == {}
    for row in rows.values():
        assert (row["exit"], row["runs_finished"]) == (0, 1) and row["phases_s"]["training and evaluation"] >= 0
    assert rows["train"]["phases_s"]["training and evaluation"] > 0  # trained in the command's process
    ours = float(re.search(r"^  train +this checkout +([\d.]+) s \(of 1\)$", proc.stdout, re.M).group(1))
    assert ours == rows["train"]["wall_s"]
    for other, row in (("base", "train@base"), ("OMP_NUM_THREADS=2", setting)):
        theirs, ratio = re.search(rf"^ +{other} +([\d.]+) s +([\d.]+)x$", proc.stdout, re.M).groups()
        assert float(theirs) == rows[row]["wall_s"]
        assert float(ratio) == pytest.approx(float(theirs) / ours, abs=0.01)


def test_stamped_benchmark_puts_the_engines_and_the_commands_events_on_one_time_line(small_mnist_dir, tmp_path):
    """benchmarks/stamped.py: `normlab train` (with its engine and results in processes of their
    own, as on a GPU), `mlflow run` of this project and a one-run sweep run from a stamped copy
    of it; each command's events stamped once (a trainer's build once per trainer), in order,
    on the output's own clock, the sweep's warm-up step by step, and this checkout left as it was."""
    from benchmarks.stamped import EVENTS

    data = ["--epochs", "1", "--data-dir", str(small_mnist_dir)]
    commands = {
        "train": ["normlab", "train", "--norm", "ln", *data],
        "mlflow run": ["mlflow", "run", str(ROOT), "--env-manager", "local", "-P", "norm=ln", "-P", "epochs=1",
                       "-P", f"data_dir={small_mnist_dir}"],
        "sweep": ["normlab", "sweep", "--norms", "ln", *data],
    }
    env = cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", NORMLAB_ENGINE_PROCESS="always")
    for name, command in commands.items():  # from a folder of their own: the store's artifacts land there
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stamped.py"), *command], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        lines = [re.match(r"^ *([\d.]+) (.*)$", line).groups() for line in proc.stdout.splitlines()]
        assert lines[-1][1] == "exit 0" and any("done: test accuracy" in text for _, text in lines)
        events, built = {}, 0
        for seconds, text in lines:
            stamp = re.match(r"^\[ *([\d.]+)\] (.*)$", text)
            if stamp:
                assert float(stamp.group(1)) <= float(seconds) + 0.05  # one clock: stamped, then printed
                if stamp.group(2) == "built: Triton's hash ready":
                    built += 1
                    continue
                assert stamp.group(2) not in events, f"{name}: {stamp.group(2)} twice"
                events[stamp.group(2)] = float(stamp.group(1))
        if name == "sweep":  # its engine's warm-up, step by step, then the run that takes it over
            prepared = ["prepare: kernel specs next", "prepare: kernels checked (or compiled side by side)",
                        "engine: steps set up and captured, evaluation's kernels next", "prepare: a warm-up ready",
                        "engine: run built", "engine: run prepared, training", "engine: run trained"]
            assert [event for event in events if event in prepared] == prepared, events
            assert [events[event] for event in prepared] == sorted(events[event] for event in prepared)
            assert built == 2, "one build for the warm-up and one for the run"
            continue
        assert built == 1 and not any(event.startswith("prepare") for event in events), events  # none ahead
        for side in ("engine", "tracking", "models", "figures"):  # each side's events, all there and in order
            expected = [event for _, _, event in EVENTS if event.startswith(side)]
            assert [event for event in events if event.startswith(side)] == expected, (name, events)
            assert [events[event] for event in expected] == sorted(events[event] for event in expected)
    assert "NORMLAB_T0" not in (ROOT / "normlab" / "cli.py").read_text()


def test_results_start_benchmark_times_the_models_process_from_the_commands_start(small_mnist_dir):
    """benchmarks/results_start.py: the command's models process, from its start to its warm-up
    and to its export ahead done, in a fresh process. (Its --baseline is processes.alternately,
    which the engine start's test below runs against a folder and a commit.)"""
    proc = subprocess.run([sys.executable, "benchmarks/results_start.py", "--data-dir", str(small_mnist_dir),
                           "--repeats", "1"], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(command's imports and data|warm|ready) +([\d.]+)$", proc.stdout, re.M)}
    assert set(rows) == {"command's imports and data", "warm", "ready"}, proc.stdout
    # the process warms up beside the command's imports, then exports
    assert 0 < rows["command's imports and data"] and 0 < rows["warm"] < rows["ready"], rows
    assert f"this checkout ready: {rows['ready']:.2f}" in proc.stdout


@pytest.mark.parametrize("given", ["folder", "commit"])
def test_engine_start_benchmark_times_each_phase_against_a_baseline_checkout(small_mnist_dir, tmp_path, given):
    """benchmarks/engine_start.py: an engine's start phase by phase, in fresh processes, this
    checkout against another's folder, or a commit checked out for the while, alternately, and
    their ratio; the first epoch after, outside the start's sum."""
    baseline = tmp_path / "baseline"
    shutil.copytree(ROOT / "normlab", baseline / "normlab", ignore=shutil.ignore_patterns("__pycache__"))
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout
    proc = subprocess.run([sys.executable, "benchmarks/engine_start.py", "--data-dir", str(small_mnist_dir),
                           "--device", "cpu", "--repeats", "1", "--epochs", "1",
                           "--baseline", str(baseline) if given == "folder" else "HEAD"],
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout == worktrees
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^(import torch|data|trainer|prepare|after torch|epoch 1) +([\d.]+) +([\d.]+)$",
                                 proc.stdout, re.M)}
    assert set(rows) == {"import torch", "data", "trainer", "prepare", "after torch", "epoch 1"}, proc.stdout
    assert rows["epoch 1"][0] > 0 and rows["epoch 1"][1] > 0
    for column in (0, 1):
        parts = sum(rows[p][column] for p in ("data", "trainer", "prepare"))
        assert rows["after torch"][column] == pytest.approx(parts, abs=0.002) and rows["trainer"][column] > 0
    ratio = float(re.search(r"this checkout ([\d.]+)x the baseline's speed", proc.stdout).group(1))
    ours, baseline = rows["after torch"]  # each printed to 0.001 s, the ratio to 0.01: bounds from that rounding
    assert (baseline - 0.0005) / (ours + 0.0005) - 0.005 <= ratio <= (baseline + 0.0005) / (ours - 0.0005) + 0.005
