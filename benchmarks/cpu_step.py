"""What normlab's two CPU techniques save per training step, each measured in fresh processes.

glibc's malloc behaves differently once a process has freed large blocks, and a setting
made with ``mallopt`` cannot be undone, so an in-process A/B of host memory handling would
measure the history of the process. Here every variant is a new Python process that warms
up for some steps and then times steps of the engine's TrainStep (BN + L1, batch 128, random
images: the content does not change the timing); the rounds interleave the variants, and
the table gives medians and ratios against torch's dropout under glibc's defaults.

    python benchmarks/cpu_step.py --rounds 5          # about three minutes on 2 cores (3:13 on 2026-12-04)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.notebook_layers import with_torch_dropout  # noqa: E402
from normlab.engine.fast.host_memory import keep_freed_memory  # noqa: E402
from normlab.engine.models import Net  # noqa: E402
from normlab.engine.rng import RunRNG  # noqa: E402
from normlab.engine.step import TrainStep  # noqa: E402

VARIANTS = {  # name -> (normlab's dropout, malloc keeps freed memory)
    "torch's dropout, glibc malloc defaults": (False, False),
    "normlab's dropout, glibc malloc defaults": (True, False),
    "torch's dropout, malloc keeps freed memory": (False, True),
    "normlab's dropout, malloc keeps freed memory (engine default)": (True, True),
}


def time_steps(variant: str, warmup: int, steps: int) -> float:
    """Median milliseconds per step over 5 blocks of ``steps`` steps, in this process."""
    ours, reuse = VARIANTS[variant]
    if reuse:
        keep_freed_memory()
    torch.manual_seed(0)
    model = Net("mnist", "bn").train()
    if not ours:
        with_torch_dropout(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = TrainStep(model, optimizer, 1e-5, RunRNG(0, torch.device("cpu")))
    x, y, rates = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,)), torch.tensor([0.01, 0.9])
    for _ in range(warmup):
        step(x, y, rates)
    blocks = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(steps):
            step(x, y, rates)
        blocks.append((time.perf_counter() - start) / steps * 1000)
    return statistics.median(blocks)


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="fresh processes per variant, interleaved")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps in each process")
    p.add_argument("--steps", type=int, default=10, help="steps per timed block (5 blocks per process)")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(time_steps(args.child, args.warmup, args.steps)))
        return {}
    if min(args.rounds, args.steps) < 1 or args.warmup < 0:
        p.error("--rounds and --steps must be at least 1, --warmup at least 0")
    results: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--warmup", str(args.warmup),
                                  "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            results[variant].append(json.loads(out.stdout.splitlines()[-1]))
    base = statistics.median(results[next(iter(VARIANTS))])
    print(f"CPU training step, BN + L1, batch 128, {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"median of {args.rounds} fresh processes each")
    print("| variant | ms per step | vs torch's dropout, glibc defaults |\n| --- | ---: | ---: |")
    for variant, values in results.items():
        print(f"| {variant} | {statistics.median(values):.1f} | {base / statistics.median(values):.2f}x |")
    return results


if __name__ == "__main__":
    main()
