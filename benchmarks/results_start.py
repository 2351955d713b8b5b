"""How soon a command's models process can save a run's model: from the command starting it
(results_process.ResultsProcess("models"), as `normlab train` does beside its engine) to the
process's warm-up done, and to its export of the run's architecture ahead done, while the
command imports torch and MLflow and loads the data beside it, as the command does. On a GPU
a short run's end waits for this when its engine trains sooner (docs/speed.md).

Each measurement is a fresh process; with --baseline, another checkout's (a folder holding its
normlab/, or a commit, checked out beside this one as e2e.py does), alternately.

    python benchmarks/results_start.py --data-dir DATA --repeats 5 --baseline REV

Prints each checkout's median seconds to "warm" and to "ready", and the ratio of the readies.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(data_dir: str, norm: str) -> dict[str, float]:
    """In this process (its checkout first on sys.path): start the models process, then do what
    the command does meanwhile, then wait for the process's warm-up and its export ahead."""
    started = time.perf_counter()
    from normlab.tracking import results_process

    with results_process.started(True):
        from normlab.engine.config import TrainConfig
        from normlab.engine.data import DeviceData, load_raw
        from normlab.tracking import results_log  # torch and MLflow, as the command imports them

        data = DeviceData(load_raw("mnist", data_dir), "cpu")
        seconds = {"command's imports and data": time.perf_counter() - started}
        results_process.call(os.getpid)  # answered once the process has warmed up
        seconds["warm"] = time.perf_counter() - started
        results_process.call(results_log.export_ahead, TrainConfig(norm=norm), data.example_input())
        seconds["ready"] = time.perf_counter() - started
    return seconds


def time_start(root: Path, args: argparse.Namespace) -> dict[str, float]:
    """One fresh process's times with ``root``'s normlab."""
    from benchmarks.processes import child_result

    command = [sys.executable, __file__, "--child", "--data-dir", args.data_dir, "--norm", args.norm]
    return child_result(command, root, cwd=tempfile.gettempdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--norm", default="ln")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", help="another checkout's folder, or a commit, timed alternately")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # a measurement's process
    args = parser.parse_args()
    args.data_dir = str(Path(args.data_dir).resolve())
    if args.child:
        print(json.dumps(measure(args.data_dir, args.norm)))
        return
    sys.path.insert(0, str(ROOT))
    from benchmarks.processes import alternately

    times = alternately(args.baseline, args.repeats, lambda root: time_start(root, args))
    checkouts = list(times)
    print(f"{'seconds (median)':<28}" + "".join(f"{name:>16}" for name in checkouts))
    medians = {}
    for phase in times["this checkout"][0]:
        for name in checkouts:
            medians[name, phase] = statistics.median(t[phase] for t in times[name])
        print(f"{phase:<28}" + "".join(f"{medians[name, phase]:16.2f}" for name in checkouts))
    for name in checkouts:
        print(f"{name} ready: " + ", ".join(f"{t['ready']:.2f}" for t in times[name]))
    if args.baseline:
        ratio = medians["baseline", "ready"] / medians["this checkout", "ready"]
        print(f"ready: this checkout {ratio:.2f}x the baseline's speed (medians of {args.repeats})")


if __name__ == "__main__":
    main()
