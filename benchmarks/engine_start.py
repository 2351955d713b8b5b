"""An engine's start, phase by phase, from torch's import to a run ready to train: CUDA's
start, the data on the device, the run's trainer (model, optimizer and its steps' choice), and
its prepare (the first Triton kernels, the CUDA graphs' capture); then, with --epochs K, its
first K epochs (the first pays what its launches first set up). On a GPU, what an engine
process starts beside torch's import is started first, where the checkout has it
(engine_process.start_beside_torch_import). Each measurement is a fresh process; with
--baseline, another checkout's (a folder holding its normlab/, e.g. from `git archive`, or a
commit, checked out beside this one as e2e.py does), alternately.

    python benchmarks/engine_start.py --data-dir DATA --repeats 4 --baseline DIR_OR_REV --epochs 2
    python benchmarks/engine_start.py --data-dir DATA --profile     # cProfile of each phase

Prints each phase's median seconds per checkout, and the ratio of their starts after torch.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("import torch", "cuda", "data", "trainer", "prepare")


def measure(root: Path, data_dir: str, device: str, norm: str, profile: bool, epochs: int = 0) -> dict[str, float]:
    """In this process: the phases' wall seconds with ``root``'s normlab (cProfile printed if asked)."""
    sys.path.insert(0, str(root))
    from normlab.engine.fast import engine_process

    if hasattr(engine_process, "start_beside_torch_import") and engine_process.trains_on_gpu(device):
        engine_process.start_beside_torch_import(device)
    seconds = {}
    started = time.perf_counter()
    import torch

    seconds["import torch"] = time.perf_counter() - started
    from normlab.engine.config import TrainConfig
    from normlab.engine.fast.trainer_pool import TrainerPool
    from normlab.engine.train import Callbacks

    pool = TrainerPool(device, data_dir, 1)
    on_gpu = pool.device.type == "cuda"

    def phase(name, work):
        profiler = cProfile.Profile() if profile else None
        start = time.perf_counter()
        result = profiler.runcall(work) if profiler else work()
        if on_gpu:
            torch.cuda.synchronize()
        seconds[name] = time.perf_counter() - start
        if profiler:
            print(f"== {name}: {seconds[name]:.2f} s")
            stats = pstats.Stats(profiler, stream=sys.stdout)
            stats.sort_stats("cumulative").print_stats(28)
            stats.sort_stats("tottime").print_stats(15)  # where the time is spent itself (or waited)
        return result

    if on_gpu:
        phase("cuda", lambda: torch.zeros(1, device=pool.device))
    phase("data", lambda: pool.data("mnist"))
    trainer = phase("trainer", lambda: pool.trainer(TrainConfig(norm=norm)))
    phase("prepare", trainer.prepare)
    for epoch in range(1, epochs + 1):
        phase(f"epoch {epoch}", lambda: trainer.run_epoch(Callbacks()))
    return seconds


def time_start(root: Path, args: argparse.Namespace) -> dict[str, float]:
    """One fresh process's phases with ``root``'s normlab."""
    from benchmarks.processes import child_result

    command = [sys.executable, __file__, "--child", str(root), "--data-dir", args.data_dir,
               "--device", args.device, "--norm", args.norm, "--epochs", str(args.epochs)]
    return child_result(command, root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--norm", default="ln")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", help="another checkout's folder, or a commit, timed alternately")
    parser.add_argument("--epochs", type=int, default=0, help="the run's first epochs, timed after its start")
    parser.add_argument("--profile", action="store_true", help="one start, each phase under cProfile")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # a measurement's process: its checkout
    args = parser.parse_args()
    if args.child or args.profile:
        seconds = measure(args.child or ROOT, args.data_dir, args.device, args.norm, args.profile, args.epochs)
        print(json.dumps(seconds))
        return
    sys.path.insert(0, str(ROOT))
    from benchmarks.processes import alternately

    times = alternately(args.baseline, args.repeats, lambda root: time_start(root, args))
    checkouts = list(times)
    print(f"{'phase (median s)':<18}" + "".join(f"{name:>16}" for name in checkouts))
    medians = {}
    measured = list(times["this checkout"][0])
    epochs = [p for p in measured if p.startswith("epoch ")]
    for phase in [p for p in PHASES if p in measured] + ["after torch"] + epochs:
        row = []
        for name in checkouts:
            values = [sum(t[p] for p in PHASES[1:] if p in t) if phase == "after torch" else t[phase]
                      for t in times[name]]
            medians[name, phase] = statistics.median(values)
            row.append(f"{medians[name, phase]:16.3f}")  # ms: a CPU trainer takes a few
        print(f"{phase:<18}" + "".join(row))
    if args.baseline:
        ratio = medians["baseline", "after torch"] / medians["this checkout", "after torch"]
        print(f"start after torch: this checkout {ratio:.2f}x the baseline's speed (medians of {args.repeats})")


if __name__ == "__main__":
    main()
