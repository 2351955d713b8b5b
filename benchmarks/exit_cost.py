"""What a command's exit costs: `normlab train` as users run it (`python -m normlab`, whose
entry freezes the garbage collector on the way out) against the same command through click's
plain main (Python's full collection at exit), alternately, in one invocation.

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

WAYS = {
    "normlab (frozen at exit)": [sys.executable, "-m", "normlab"],
    "click main (full collection)": [sys.executable, "-c",
                                     "import sys; from normlab.cli import main; sys.exit(main(standalone_mode=False) or 0)"],
}


def main() -> None:
    args = train_benchmark_args(__doc__)
    work, env = isolated_store("normlab-exit-")
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
