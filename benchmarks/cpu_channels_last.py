"""A CPU training step with the activations in channels-last memory order against the default
(channels first), for each norm and dataset: which gain, which lose.

oneDNN's convolutions (forward and backward) run faster on channels-last tensors, but the
norms' CPU kernels differ: GroupNorm with few groups runs well there, BatchNorm and GroupNorm
with one channel per group (IN) do not. Each (dataset, norm) gets an engine TrainStep both
ways in this process (malloc keeping freed memory, as the engine sets it on the CPU), on random
images of the dataset's shape (the content does not change the timing); blocks of steps
alternate between the two, and the table gives medians and the ratio.

    python benchmarks/cpu_channels_last.py --rounds 7     # about two minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from normlab.engine.fast.host_memory import keep_freed_memory  # noqa: E402
from normlab.engine.models import Net  # noqa: E402
from normlab.engine.registry import ARCHITECTURES, NORMS  # noqa: E402
from normlab.engine.rng import RunRNG  # noqa: E402
from normlab.engine.step import TrainStep  # noqa: E402

FORMATS = {"channels first": torch.contiguous_format, "channels last": torch.channels_last}


def step_of(dataset: str, norm: str, memory_format: torch.memory_format):
    """A TrainStep over a fresh model whose weights are in that memory order (the activations
    follow them), and a batch of 128 for it."""
    arch = ARCHITECTURES[dataset]
    torch.manual_seed(0)
    model = Net(dataset, norm).to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = TrainStep(model, optimizer, 1e-5 if norm == "bn" else 0.0, RunRNG(0, torch.device("cpu")))
    x = torch.randn(128, arch.in_channels, arch.image_size, arch.image_size)  # channels first, as the engine's data
    return lambda: step(x, torch.randint(0, arch.classes, (128,)), torch.tensor([0.01, 0.9]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="timed blocks per way, alternating")
    parser.add_argument("--steps", type=int, default=5, help="steps per block")
    parser.add_argument("--datasets", default="mnist,cifar10")
    args = parser.parse_args()
    keep_freed_memory()
    print(f"CPU training step, batch 128, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"medians of {args.rounds} blocks of {args.steps} steps, the two ways alternating")
    print("| dataset | norm | channels first | channels last | channels last's speed-up |\n| --- | --- | ---: | ---: | ---: |")
    for dataset in args.datasets.split(","):
        for norm in NORMS:
            steps = {name: step_of(dataset, norm, fmt) for name, fmt in FORMATS.items()}
            for step in steps.values():  # warm up: oneDNN builds its kernels for the shapes
                for _ in range(3):
                    step()
            blocks: dict[str, list[float]] = {name: [] for name in FORMATS}
            for _ in range(args.rounds):
                for name, step in steps.items():
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        step()
                    blocks[name].append((time.perf_counter() - start) / args.steps * 1000)
            first, last = (statistics.median(blocks[name]) for name in FORMATS)
            print(f"| {dataset} | {norm} | {first:.1f} ms | {last:.1f} ms | {first / last:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
