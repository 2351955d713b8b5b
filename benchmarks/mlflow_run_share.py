"""What `mlflow run . -P norm=ln` adds to the `normlab train` it starts, phase by phase.

MLflow's command line imports MLflow, opens the store and creates the run, then runs the
entry point's command (`python -m normlab train ...`) and, once that has exited, ends the run
and exits itself. This times `normlab train` and `mlflow run` as processes, alternately in one
invocation, and splits each `mlflow run` at the lines MLflow prints: its start (to "=== Running
command"), its command (to "=== Run (ID ...) succeeded ==="), and its exit (to the end of the
process). A third way runs the same MLflow command line with Python's collection at exit
skipped (the garbage collector frozen, as normlab's own commands do), to show how much of
that exit is the collection: MLflow's process is not normlab's to change.

    python benchmarks/mlflow_run_share.py --data-dir /tmp/mnist1k --repeats 5      # the 2-core CPU
    python benchmarks/mlflow_run_share.py --data-dir /root/split --epochs 20 --repeats 3  # a GPU
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

from processes import ROOT, isolated_store, timed, train_benchmark_args

RUNNING, SUCCEEDED = "=== Running command", ") succeeded ==="
FROZEN_AT_EXIT = ("import gc, sys\nfrom mlflow.cli import cli\ntry:\n    cli(prog_name='mlflow')\n"
                  "finally:\n    gc.freeze()\n")


def stamped(command: list[str], env: dict[str, str], cwd: str) -> tuple[float, dict[str, float]]:
    """(wall seconds, seconds from the start to the first line containing each marker)."""
    seen: dict[str, float] = {}

    def note(line: str, seconds: float) -> None:
        for marker in (RUNNING, SUCCEEDED):
            if marker in line:
                seen.setdefault(marker, seconds)

    wall, _ = timed(command, env, cwd, on_line=note)
    return wall, seen


def main() -> None:
    args = train_benchmark_args(__doc__)
    work, env = isolated_store("normlab-mlflow-run-")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]  # the entry point's `python`
    data_dir = str(Path(args.data_dir).resolve())
    train = [sys.executable, "-m", "normlab", "train", "--norm", "ln", "--data-dir", data_dir,
             "--epochs", str(args.epochs)]
    project = ["run", str(ROOT), "--env-manager", "local", "-P", "norm=ln", "-P", f"data_dir={data_dir}",
               "-P", f"epochs={args.epochs}"]
    ways = {
        "normlab train": train,
        "mlflow run": [sys.executable, "-m", "mlflow", *project],
        "mlflow run, its exit frozen": [sys.executable, "-c", FROZEN_AT_EXIT, *project],
    }
    subprocess.run(train, env=env, cwd=work, capture_output=True, check=True)  # the store, the data's parse
    measured: dict[str, list[tuple[float, dict[str, float]]]] = {way: [] for way in ways}
    for _ in range(args.repeats):
        for way, command in ways.items():
            measured[way].append(stamped(command, env, work))
    print(f"medians of {args.repeats}, alternately; {args.epochs} epoch(s) of LN on {data_dir}")
    for way, runs in measured.items():
        wall = statistics.median(w for w, _ in runs)
        if way == "normlab train":
            print(f"{way:<28} {wall:6.2f} s")
            continue
        start = statistics.median(s[RUNNING] for _, s in runs)
        command = statistics.median(s[SUCCEEDED] - s[RUNNING] for _, s in runs)
        ending = statistics.median(w - s[SUCCEEDED] for w, s in runs)
        print(f"{way:<28} {wall:6.2f} s = its start {start:5.2f} s + its command {command:5.2f} s "
              f"+ its exit {ending:5.2f} s")


if __name__ == "__main__":
    main()
