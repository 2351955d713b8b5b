"""The commands that train nothing, timed as processes against another commit: `normlab
--help`, a mistyped option, and `normlab compare` over the runs of one small sweep, each run
from this checkout and from a git worktree of --baseline, alternately, in one invocation.

    python benchmarks/commands.py --data-dir DATA --baseline 58c2585 --repeats 5

Prints each command's median wall time both ways and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from processes import ROOT, git_worktree, isolated_store, remove_worktree, scratch_folder, timed

COMMANDS = {
    "normlab --help": ["--help"],
    "normlab train --norm xx": ["train", "--norm", "xx"],
    "normlab compare": ["compare", "--out", "compared"],
}


def run(checkout: Path, args: list[str], env: dict[str, str], cwd: str) -> float:
    """Wall seconds of `python -m normlab ARGS` importing normlab from ``checkout``; the
    mistyped option must be refused (exit status 2), the rest succeed."""
    return timed([sys.executable, "-m", "normlab", *args], dict(env, PYTHONPATH=str(checkout)), cwd,
                 exit_status=2 if "xx" in args else 0)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--baseline", required=True, help="the commit to compare against")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    baseline = git_worktree(args.baseline, Path(scratch_folder("normlab-baseline-")) / "baseline")
    work, env = isolated_store("normlab-commands-", checkouts=[baseline])  # its bytecode too: a worktree has none
    try:
        subprocess.run([sys.executable, "-m", "normlab", "sweep", "--seeds", "1", "--epochs", "1", "--data-dir",
                        str(Path(args.data_dir).resolve())], env=env, cwd=work,
                       capture_output=True, check=True)  # three runs to compare
        ways = {"this checkout": ROOT, f"baseline {args.baseline}": baseline}
        times = {(name, way): [] for name in COMMANDS for way in ways}
        for _ in range(args.repeats):
            for name, command in COMMANDS.items():
                for way, checkout in ways.items():
                    times[name, way].append(run(checkout, command, env, work))
        for name in COMMANDS:
            ours, theirs = (statistics.median(times[name, way]) for way in ways)
            print(f"{name:<26} this checkout {ours:6.2f} s   baseline {theirs:6.2f} s   {theirs / ours:5.1f}x   "
                  f"(medians of {args.repeats})")
    finally:
        remove_worktree(baseline)


if __name__ == "__main__":
    main()
