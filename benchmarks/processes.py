"""Timing normlab's commands as processes, as users run them: a fresh tracking store of the
benchmark's own, each command's wall time and the time from its last line to its exit, and
another commit checked out to time against, alternately. Shared by exit_cost.py, data_cache.py,
commands.py, engine_start.py, results_start.py and e2e.py."""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import shutil
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]


def train_benchmark_args(description: str) -> argparse.Namespace:
    """--data-dir, --epochs and --repeats of a benchmark that times `normlab train` runs."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


def scratch_folder(prefix: str) -> str:
    """A new temporary folder, removed when the benchmark exits."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def isolated_store(prefix: str, checkouts: Sequence[Path] = ()) -> tuple[str, dict[str, str]]:
    """A new working folder and the environment whose sqlite store lives there, with this
    checkout importable (a sqlite store also keeps artifacts in the working folder's ./mlruns),
    and the bytecode an install leaves (bytecode_as_installed) for this checkout and ``checkouts``
    (a baseline's worktree, say)."""
    work = scratch_folder(prefix)
    print(f"bytecode: {bytecode_as_installed([ROOT, *checkouts])}", file=sys.stderr, flush=True)
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return work, env


def timed(command: list[str], env: dict[str, str], cwd: str, exit_status: int = 0,
          on_line: Callable[[str, float], None] | None = None) -> tuple[float, float]:
    """(wall seconds, seconds from the last line of output to the exit); stops the benchmark,
    with the command's last lines, when it does not exit with ``exit_status``. ``on_line(line,
    seconds since the start)`` sees each line of output as it comes."""
    start = time.perf_counter()
    last = start
    tail: collections.deque[str] = collections.deque(maxlen=20)
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        last = time.perf_counter()
        tail.append(line)
        if on_line is not None:
            on_line(line, last - start)
    if process.wait() != exit_status:
        sys.exit(f"{' '.join(command)} exited with {process.returncode}, not {exit_status}:\n{''.join(tail)}")
    end = time.perf_counter()
    return end - start, end - last


def bytecode_as_installed(checkouts: list[Path], leave: bool = False) -> str:
    """Where this Python writes no bytecode (PYTHONDONTWRITEBYTECODE, as some container images
    set) and the installed packages have none, compile it once, as ``pip install`` does; returns
    what was found and done, for the benchmark's output. Without it every command's processes
    compile torch's, Dynamo's, Inductor's and MLflow's source again at each start, which no user
    of an ordinary install pays: on an H100 machine (2026-12-05), importing torch took 3.1 s
    instead of 1.5-1.75 s, and torch with Dynamo and Inductor 9.4 s instead of 6.0-6.7 s; the
    ten-seed sweep's first compiled step was captured 11.5-16.8 s after its command started
    (four runs, three machines) instead of 8.4 s, and `normlab train` took 15.1 s instead of
    7.9 s (docs/speed.md, forty-ninth session). ``leave`` (--bytecode-as-is) keeps
    the Python as it is, as the measurements before that session had it."""
    from normlab.engine.bytecode import missing_bytecode  # torch-free: a stamped command's timer has not started

    if not sys.flags.dont_write_bytecode:
        return "written by Python as it imports (the first command's imports write it)"
    cached = missing_bytecode("torch") is None
    if leave:
        return f"not written (PYTHONDONTWRITEBYTECODE), left so{'' if cached else ': torch has none'}"
    folders = [str(Path(checkout) / "normlab") for checkout in checkouts]  # a baseline's worktree never has any
    if not cached:  # then the install left none (pip compiles every package it installs, or none)
        folders += [*site.getsitepackages(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *dict.fromkeys(folders)],
                   capture_output=True)
    seconds = time.perf_counter() - start
    if cached:
        return f"not written (PYTHONDONTWRITEBYTECODE); the packages have theirs, the checkouts compiled ({seconds:.0f} s)"
    return (f"not written (PYTHONDONTWRITEBYTECODE) and torch had none: the installed packages and the "
            f"checkouts compiled first, as pip install does ({seconds:.0f} s)")


def git_worktree(commit: str, folder: Path) -> Path:
    """``commit`` checked out (detached) at ``folder``, beside this checkout; remove_worktree
    takes it away."""
    subprocess.run(["git", "worktree", "add", "--detach", str(folder), commit], cwd=ROOT, check=True,
                   capture_output=True)
    return folder


def baseline_checkout(baseline: str, folder: Path) -> tuple[Path, bool]:
    """The normlab a --baseline names: a folder holding normlab/ (used as it is), or a commit,
    checked out at ``folder`` (then True: a worktree for remove_worktree to take away)."""
    if (Path(baseline) / "normlab").is_dir():
        return Path(baseline).resolve(), False
    try:
        return git_worktree(baseline, folder), True
    except subprocess.CalledProcessError:
        sys.exit(f"error: --baseline {baseline}: neither a folder holding normlab/ nor a commit")


def remove_worktree(folder: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(folder)], cwd=ROOT, capture_output=True)


def child_result(command: list[str], root: Path, cwd: str | None = None) -> dict:
    """The JSON that ``command``, a measurement's fresh process with ``root``'s normlab first on
    its path (the caller's PYTHONPATH after it), prints as its last line."""
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(command, capture_output=True, text=True, check=True, cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=path))
    return json.loads(proc.stdout.splitlines()[-1])


def alternately(baseline: str | None, repeats: int, measure: Callable[[Path], dict]) -> dict[str, list[dict]]:
    """``measure(root)`` ``repeats`` times for this checkout and, with ``baseline`` (as
    baseline_checkout takes it), for that one too, alternately, each with the bytecode an install
    leaves (bytecode_as_installed): each checkout's results, keyed "this checkout" and "baseline"."""
    checkouts = {"this checkout": ROOT}
    worktree = None
    if baseline:
        folder = Path(scratch_folder("normlab-baseline-")) / "baseline"
        checkouts["baseline"], made = baseline_checkout(baseline, folder)
        worktree = checkouts["baseline"] if made else None
    print(f"bytecode: {bytecode_as_installed(list(checkouts.values()))}", file=sys.stderr, flush=True)
    times: dict[str, list[dict]] = {name: [] for name in checkouts}
    try:
        for _ in range(repeats):
            for name, root in checkouts.items():
                times[name].append(measure(root))
    finally:
        if worktree:
            remove_worktree(worktree)
    return times
