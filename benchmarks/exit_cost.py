"""What a command's exit costs: `normlab train` as users run it (`python -m normlab`, whose
entry freezes the garbage collector and leaves the memory to the OS, skipping Python's
teardown of its objects) against the same command through click's plain main (Python's full
exit) and through it with the collector frozen (the entry before the teardown was skipped),
alternately, in one invocation.

    python benchmarks/exit_cost.py --data-dir /tmp/mnist1k --repeats 5            # the 2-core CPU
    python benchmarks/exit_cost.py --data-dir /root/split --epochs 20 --repeats 3  # a GPU

Prints each way's median wall time and median time from the command's last line to its exit.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

from processes import isolated_store, timed, train_benchmark_args

CLICK_MAIN = ("import gc, sys\nfrom normlab.cli import main\n"
              "try:\n    code = main(standalone_mode=False) or 0\nfinally:\n")
WAYS = {
    "normlab (no teardown)": [sys.executable, "-m", "normlab"],
    "click main, frozen": [sys.executable, "-c", CLICK_MAIN + "    gc.freeze()\nsys.exit(code)"],
    "click main (full exit)": [sys.executable, "-c", CLICK_MAIN + "    pass\nsys.exit(code)"],
}


def main() -> None:
    args = train_benchmark_args(__doc__)
    work, env = isolated_store("normlab-exit-")
    train = ["train", "--norm", "ln", "--data-dir", str(Path(args.data_dir).resolve()), "--epochs", str(args.epochs)]
    # the store, created first
    subprocess.run(WAYS["normlab (no teardown)"] + train, env=env, cwd=work, capture_output=True, check=True)
    times: dict[str, list[tuple[float, float]]] = {way: [] for way in WAYS}
    for _ in range(args.repeats):
        for way, command in WAYS.items():
            times[way].append(timed(command + train, env, work))
    for way, measured in times.items():
        print(f"{way:<30} wall {statistics.median(w for w, _ in measured):6.2f} s   last line to exit "
              f"{statistics.median(e for _, e in measured):5.2f} s   (median of {args.repeats})")


if __name__ == "__main__":
    main()
