"""What the user waits for: normlab's commands timed as processes, against the notebook pipeline.

Each row is one command run as a user runs it (a new process), timed from start to exit: cold
(empty Inductor and Triton caches and a new MLflow store, as on a fresh machine) or warm (the
compile caches filled and one store shared, as by a user's earlier commands, each row in an
experiment of its own). The notebook pipeline (benchmarks/speed.py's DataLoader + PIL
loop) runs as one process per study variant for --notebook-epochs epochs; its wall time for
the full study is that process's fixed cost plus the study's epochs at its median epoch time,
said so in the output. Per-phase times are read from the commands' own output. Where the
Python writes no bytecode and torch has none (some container images), the installed packages'
bytecode is compiled first, as pip install does, so no command pays for compiling torch's
source (--bytecode-as-is: left so, as before 2026-12-05).

    python benchmarks/e2e.py --out benchmarks/results/e2e.json            # GPU: the full table
    python benchmarks/e2e.py --rows sweep1,sweep10 --runs-per-gpu 1,3     # GPU: 1 vs 3 runs at once per GPU
    python benchmarks/e2e.py --rows sweep10 --also-with NORMLAB_REUSE_STEPS=0  # with and without a switch
    python benchmarks/e2e.py --rows train,mlflow-run --also-with NORMLAB_ENGINE_PROCESS=never --repeats 3
    python benchmarks/e2e.py --rows sweep1,train --baseline REV --repeats 3  # against other commits, alternately
    python benchmarks/e2e.py --epochs 2 --rows train,sweep1 --device cpu  # a quick CPU look
    python benchmarks/e2e.py --epochs 1 --rows sweep10 --device cpu --train-images 1000  # CPU overhead per run

Data: 60,000 training images (the first 8,000 real MNIST test digits, tiled) and the other
2,000 as test set, unless --data-dir holds full MNIST.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.processes import baseline_checkout, bytecode_as_installed, remove_worktree  # noqa: E402
from benchmarks.speed import STUDY, prepare_mnist  # noqa: E402
from normlab.engine.fast.trainer_pool import RUNS_PER_GPU  # noqa: E402
import torch  # noqa: E402

ROWS = ("sweep1-cold", "sweep1", "sweep10", "train", "mlflow-run", "notebook")


# Installed beside torch, these cost a process that imports mlflow.pytorch seconds, unless it
# declines them as normlab does (results_log.pytorch_flavor; a baseline before 91ff29f pays
# them): said in the output, so that figures from two machines, or two setups of one, are read
# with it.
HEAVY_OPTIONAL = ("pytorch_lightning", "lightning", "transformers")


def environment() -> dict:
    """What besides the code sets a command's wall time: the cores this process may use, the
    MLflow it imports, and which of HEAVY_OPTIONAL are importable."""
    import importlib.metadata
    import importlib.util

    return {"cpus": len(os.sched_getaffinity(0)), "mlflow": importlib.metadata.version("mlflow"),
            "importable": [name for name in HEAVY_OPTIONAL if importlib.util.find_spec(name)]}


def run(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> tuple[float, str, int]:
    """Run a command as a process; (wall seconds, its output, exit status)."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    output = done.stdout + done.stderr
    log.write_text(output)
    return wall, output, done.returncode


def phases(output: str) -> dict[str, float]:
    """Sum each phase over the runs in a command's output, plus the sweep's own phases."""
    total: dict[str, float] = {}
    for line in re.findall(r"phases: (.*?);", output):
        for name, seconds in re.findall(r"([a-z ]+?) ([0-9.]+) s", line):
            total[name.strip()] = total.get(name.strip(), 0.0) + float(seconds)
    for pattern, name in ((r"runs handed to the workers ([0-9.]+) s", "start (imports, store, data check)"),
                          (r"comparison took ([0-9.]+) s", "comparison")):
        found = re.search(pattern, output)
        if found:
            total[name] = float(found.group(1))
    return total


def finished(output: str) -> int:
    return len(re.findall(r"^finished ", output, re.M)) or len(re.findall(r"\] done: test accuracy|^\S*done: test", output, re.M))


def same_histories(store: Path, *runs: tuple[str, str]) -> bool | None:
    """Whether the named runs (experiment, run name) logged the same test_acc history."""
    if not store.exists():
        return None
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store}")
    histories = []
    for experiment, run_name in runs:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return None
        matches = client.search_runs([found.experiment_id], f"tags.mlflow.runName = '{run_name}'")
        if not matches:
            return None
        histories.append([(m.step, m.value) for m in client.get_metric_history(matches[0].info.run_id, "test_acc")])
    return all(h == histories[0] for h in histories)


def print_medians(results: list[dict], baselines: list[str], settings: list[str]) -> None:
    """Each row's median wall time over its repeats, and each baseline's and setting's
    (``+NAME=VALUE`` rows) against it."""
    walls: dict[str, list[float]] = {}
    for row in results:
        walls.setdefault(row["row"], []).append(row["wall_s"])
    print("\nmedians (and this checkout's speed-up, as it is, over each baseline and setting):")
    for name, seconds in walls.items():
        if "@" in name or "+" in name or name.startswith("warm-up"):
            continue
        ours = statistics.median(seconds)
        print(f"  {name:<14} this checkout {ours:7.2f} s (of {len(seconds)})")
        for other in baselines + settings:
            theirs = walls.get(f"{name}{other}")
            if theirs:
                print(f"  {'':<14} {other[1:]:<13} {statistics.median(theirs):7.2f} s   "
                      f"{statistics.median(theirs) / ours:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--notebook-epochs", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list from {', '.join(ROWS)}")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--train-images", type=int, help="train on the first N images only (slow devices)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--logs", type=Path, help="keep each command's output in this folder")
    parser.add_argument("--runs-per-gpu", default=str(RUNS_PER_GPU),
                        help="comma list of NORMLAB_RUNS_PER_GPU values: the warm sweep rows run once with each, "
                             f"so the layouts compare in one invocation (rows named sweep1-x1 and so on for all "
                             f"but the default, {RUNS_PER_GPU})")
    parser.add_argument("--baseline", default="",
                        help="comma list of other checkouts (a folder, or a commit to check out in a git worktree): "
                             "each row runs from each of them too, alternately with this one, and the medians are "
                             "compared (rows named train@NAME, NAME the folder's name or the commit)")
    parser.add_argument("--repeats", type=int, default=1, help="times each row runs (medians are printed)")
    parser.add_argument("--bytecode-as-is", action="store_true",
                        help="where this Python writes no bytecode and packages have none, leave it so (every "
                             "process then compiles torch's source; the measurements before 2026-12-05 did)")
    parser.add_argument("--also-with", default="",
                        help="comma list of NAME=VALUE settings (say NORMLAB_REUSE_STEPS=0): the warm rows run "
                             "again with each, in this invocation (rows named sweep1+REUSE_STEPS=0 and so on)")
    args = parser.parse_args()
    rows = args.rows.split(",")
    # (row suffix, runs per GPU, extra environment) of each warm sweep row
    variants = [("" if int(n) == RUNS_PER_GPU else f"-x{n}", int(n), {}) for n in args.runs_per_gpu.split(",")]
    settings: dict[str, dict[str, str]] = {}  # row suffix -> the setting
    for setting in filter(None, args.also_with.split(",")):
        name, _, value = setting.partition("=")
        settings[f"+{name.removeprefix('NORMLAB_')}={value}"] = {name: value}
    variants += [(suffix, RUNS_PER_GPU, setting) for suffix, setting in settings.items()]
    work = Path(tempfile.mkdtemp(prefix="normlab-e2e-"))
    digits = next((p for p in (ROOT / "tests" / "data" / "mnist-t10k", ROOT.parent / "shared" / "data" / "mnist-t10k")
                   if p.exists()), ROOT / "tests" / "data" / "mnist-t10k")
    data, source = prepare_mnist(args.data_dir, digits, work / "data", args.train_images, None, holdout=2000)
    if args.train_images:
        source += f"; the first {args.train_images:,} training images of it"
    logs = args.logs or work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                PYTHONUNBUFFERED="1")
    # Caches set in the environment (filled by an earlier process) are the warm ones; else
    # the "warm-up" row fills this invocation's own.
    warm_cache = {"TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor")),
                  "TRITON_CACHE_DIR": os.environ.get("TRITON_CACHE_DIR", str(work / "triton"))}
    prewarmed = "TORCHINDUCTOR_CACHE_DIR" in os.environ
    results: list[dict] = []
    epochs = ["--epochs", str(args.epochs)]
    setup = environment()
    print(f"environment: {setup['cpus']} CPUs, MLflow {setup['mlflow']}, importable of {', '.join(HEAVY_OPTIONAL)}: "
          f"{', '.join(setup['importable']) or 'none'}", flush=True)

    def time_row(name: str, command: list[str], cold: bool = False, runs: int = 1,
                 runs_per_gpu: int = RUNS_PER_GPU, setting: dict[str, str] | None = None,
                 checkout: Path = ROOT, repeat: int = 0) -> None:
        """Warm rows share one store, as a user's commands do (a new one costs seconds of
        schema migrations), each in its own experiment so that nothing is found done; a cold
        row starts from nothing, a fresh store and compile caches included. ``checkout`` is
        the normlab that runs (this one, or the baseline)."""
        experiment = name if repeat == 0 else f"{name}-{repeat + 1}"
        folder = work / experiment
        store = folder / "mlflow.db" if cold else work / "mlflow.db"
        env = dict(base, MLFLOW_TRACKING_URI=f"sqlite:///{store}", NORMLAB_RUNS_PER_GPU=str(runs_per_gpu),
                   **warm_cache, **(setting or {}))
        env["PYTHONPATH"] = str(checkout) + os.pathsep + os.environ.get("PYTHONPATH", "")
        command = [str(checkout) if part == str(ROOT) else part for part in command]  # mlflow run's project
        command = command + ["--experiment-name" if "mlflow" in command[:3] else "--experiment", experiment]
        if cold:
            env.update(TORCHINDUCTOR_CACHE_DIR=str(folder / "cold-inductor"),
                       TRITON_CACHE_DIR=str(folder / "cold-triton"))
        folder.mkdir(parents=True, exist_ok=True)
        wall, output, status = run(command, env, folder, logs / f"{experiment}.log")
        row = {"row": name, "command": " ".join(command[2:] if command[0] == sys.executable else command),
               "cache": "cold" if cold else "warm", "runs_per_gpu": runs_per_gpu, "setting": setting or {},
               "checkout": str(checkout), "wall_s": round(wall, 2),
               "exit": status,
               "runs_finished": finished(output), "runs": runs, "phases_s": phases(output)}
        # what the user waits for beyond the training itself, per run: imports, store, data,
        # setup, compiling, artifacts, model and comparison, shared out over the command's runs
        row["overhead_per_run_s"] = round((wall - row["phases_s"].get("training and evaluation", 0.0)) / runs, 2)
        results.append(row)
        print(f"{name:<12} {row['cache']:<5} {wall:7.1f} s  exit {status}  finished {row['runs_finished']}/{runs}  "
              f"overhead {row['overhead_per_run_s']:.2f} s/run  "
              f"{json.dumps({k: round(v, 1) for k, v in row['phases_s'].items()})}", flush=True)
        if status != 0:
            print(output[-3000:], flush=True)

    normlab = [sys.executable, "-m", "normlab"]
    common = ["--data-dir", str(data), "--device", args.device]
    subprocess.run([sys.executable, "-c", "import mlflow; mlflow.search_experiments()"], check=True,
                   env=dict(base, MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}"))  # the shared store
    checkouts, worktrees = {"": ROOT}, []  # row suffix -> the normlab it runs; the worktrees made for them
    for baseline in filter(None, args.baseline.split(",")):
        checkout, made = baseline_checkout(baseline, work / f"worktree-{baseline}")
        checkouts[f"@{baseline}" if made else f"@{Path(baseline).name}"] = checkout
        if made:
            worktrees.append(checkout)
    setup["bytecode"] = bytecode_as_installed(list(checkouts.values()), leave=args.bytecode_as_is)
    print(f"bytecode: {setup['bytecode']}", flush=True)
    # A GPU's Triton kernels are built by the first command that needs them (9.3 s of an
    # `mlflow run` row that came first: h200-2026-11-30i-e2e-mlflow-run.txt), so any warm row
    # on a GPU, not only the sweep's, has the warm-up before it.
    on_gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    warm_rows = {"sweep1", "sweep10", "train", "mlflow-run"} if on_gpu else {"sweep1"}
    mlflow_run = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "-P", "norm=ln",
                  "-P", f"data_dir={data}", "-P", f"epochs={args.epochs}"]
    for suffix, checkout in checkouts.items():  # fill the warm caches, as an earlier study on the machine would have
        if warm_rows & set(rows) and not prewarmed:
            time_row(f"warm-up{suffix}", normlab + ["sweep", *common, *epochs], runs=3, checkout=checkout)
        if "mlflow-run" in rows:  # a machine's first `mlflow run` took 14.8 s, its next three 12.3-13.4 s
            # (h200-2026-12-02d-e2e-no-requirements-scan.txt), though sweeps and `normlab train` had run before
            time_row(f"warm-up-mlflow-run{suffix}", mlflow_run, checkout=checkout)
        if "sweep10" in rows and args.device != "cpu":  # nothing is compiled on a CPU
            # The 10-seed study compiles its steps (normlab.engine.fast.COMPILE_PAYS_FROM_EPOCHS)
            time_row(f"warm-up-compiled{suffix}", normlab + ["sweep", *common, "--epochs", "1"], runs=3,
                     setting={"NORMLAB_COMPILE": "always"}, checkout=checkout)
    for repeat in range(args.repeats):
        for suffix, checkout in checkouts.items():
            def row(name: str, command: list[str], **options) -> None:
                time_row(name + suffix, command, checkout=checkout, repeat=repeat, **options)

            if "sweep1-cold" in rows:
                row("sweep1-cold", normlab + ["sweep", *common, *epochs], cold=True, runs=3)
            if "sweep1" in rows:
                for variant, n, setting in variants:
                    row(f"sweep1{variant}", normlab + ["sweep", *common, *epochs], runs=3, runs_per_gpu=n,
                        setting=setting)
            if "sweep10" in rows:
                for variant, n, setting in variants:
                    row(f"sweep10{variant}", normlab + ["sweep", "--seeds", "10", *common, *epochs], runs=30,
                        runs_per_gpu=n, setting=setting)
            for variant, setting in [("", {}), *settings.items()]:  # one run: the settings, not the layouts
                if "train" in rows:
                    row(f"train{variant}", normlab + ["train", "--norm", "ln", *common, *epochs], setting=setting)
                if "mlflow-run" in rows:
                    row(f"mlflow-run{variant}", mlflow_run, setting=setting)
    if args.repeats > 1 or len(checkouts) > 1 or settings:
        print_medians(results, [suffix for suffix in checkouts if suffix], list(settings))
    notebook = None
    if "notebook" in rows:
        per_variant = []
        for config in STUDY:
            code = ("import json,sys,torch; sys.path.insert(0, %r); from benchmarks.speed import notebook_runs; "
                    "from normlab.engine.train import TrainConfig, resolve_device; "
                    "r = notebook_runs(__import__('pathlib').Path(%r), resolve_device(%r), %d, [1], 2, "
                    "TrainConfig(norm=%r, groups=%d, l1=%r)); print(json.dumps(r.epoch_seconds))"
                    % (str(ROOT), str(data), args.device, args.notebook_epochs, config.norm, config.groups, config.l1))
            wall, output, status = run([sys.executable, "-c", code], base, work, logs / f"notebook-{config.norm}.log")
            seconds = json.loads(output.strip().splitlines()[-1])
            fixed = wall - sum(seconds)
            per_variant.append({"variant": config.label, "process_wall_s": round(wall, 2), "epoch_seconds": seconds,
                                "fixed_s": round(fixed, 2),
                                "study_wall_s": round(fixed + args.epochs * statistics.median(seconds), 1)})
            print(f"notebook {config.label:<12} {wall:6.1f} s for {args.notebook_epochs} epochs "
                  f"(median epoch {statistics.median(seconds):.2f} s, fixed {fixed:.1f} s)", flush=True)
        notebook = {"variants": per_variant, "study_wall_s": round(sum(v["study_wall_s"] for v in per_variant), 1),
                    "how": f"each variant's process fixed cost + {args.epochs} x its median epoch "
                           f"(measured over {args.notebook_epochs} epochs)"}
        print(f"notebook study (3 variants x {args.epochs} epochs, one after another): {notebook['study_wall_s']:.1f} s "
              f"({notebook['how']})")
        for row in results:
            if row["row"].startswith("sweep"):  # against as many notebook runs as the sweep trains
                notebook_wall = notebook["study_wall_s"] * row["runs"] / len(STUDY)
                row["x_notebook"] = round(notebook_wall / row["wall_s"], 1)
                print(f"{row['row']}: {row['x_notebook']}x faster than its {row['runs']} runs the notebook way "
                      f"({notebook_wall:.0f} s)")
    same = same_histories(work / "mlflow.db", ("sweep1", "ln-s1"), ("train", "ln-s1"))
    if same is not None:
        print(f"ln-s1 trained by the sweep's worker and alone by normlab train: "
              f"test_acc histories {'identical' if same else 'differ'}")
    report = {"date": time.strftime("%Y-%m-%d"), "data": source, "epochs": args.epochs,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
              "torch": torch.__version__, "python": platform.python_version(), "environment": setup, "rows": results,
              "notebook": notebook}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    for folder in worktrees:
        remove_worktree(folder)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
