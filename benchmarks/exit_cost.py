"""What a command's exit costs: `normlab train` as users run it (`python -m normlab`, whose
entry freezes the garbage collector on the way out) against the same command through click's
plain main (Python's full collection at exit), alternately, in one invocation.

    python benchmarks/exit_cost.py --data-dir /tmp/mnist1k --repeats 5            # the 2-core CPU
    python benchmarks/exit_cost.py --data-dir /root/split --epochs 20 --repeats 3  # a GPU

Prints each way's median wall time and median time from the command's last line to its exit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAYS = {
    "normlab (frozen at exit)": [sys.executable, "-m", "normlab"],
    "click main (full collection)": [sys.executable, "-c",
                                     "import sys; from normlab.cli import main; sys.exit(main(standalone_mode=False) or 0)"],
}


def timed(command: list[str], env: dict[str, str], cwd: str) -> tuple[float, float]:
    """(wall seconds, seconds from the last line of output to the exit)."""
    start = time.perf_counter()
    last = start
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in process.stdout:
        last = time.perf_counter()
    if process.wait() != 0:
        raise SystemExit(f"{' '.join(command)} exited with {process.returncode}")
    end = time.perf_counter()
    return end - start, end - last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="normlab-exit-")
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    train = ["train", "--norm", "ln", "--data-dir", str(Path(args.data_dir).resolve()), "--epochs", str(args.epochs)]
    subprocess.run(WAYS["normlab (frozen at exit)"] + train, env=env, cwd=work, capture_output=True, check=True)  # the store
    times: dict[str, list[tuple[float, float]]] = {way: [] for way in WAYS}
    for _ in range(args.repeats):
        for way, command in WAYS.items():
            times[way].append(timed(command + train, env, work))
    for way, measured in times.items():
        print(f"{way:<30} wall {statistics.median(w for w, _ in measured):6.2f} s   last line to exit "
              f"{statistics.median(e for _, e in measured):5.2f} s   (median of {args.repeats})")


if __name__ == "__main__":
    main()
