"""How many training steps one CUDA graph should hold: what capturing them costs a run before
its first epoch, against the epoch time they give.

A run captures one graph per chunk shape (a full chunk, and the epoch's last one) after a
few warm-up steps, all under the capture lock, so in a sweep the runs that start together
capture one after another. For each norm and each chunk size this builds a fresh Trainer
in one warm process (a throwaway trainer first pays the process's one-time costs: Triton
kernels loaded, the step compiled), times its prepare() and then its epochs.

    python benchmarks/chunk_steps.py --data-dir DATA --chunks 64,16,8,4
    python benchmarks/chunk_steps.py --data-dir DATA --chunks 64,8 --compiled
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from normlab.engine.config import TrainConfig  # noqa: E402
from normlab.engine.data import DeviceData, load_raw  # noqa: E402
from normlab.engine.fast import Speedups  # noqa: E402
from normlab.engine.train import Callbacks, Trainer  # noqa: E402


def prepare_and_epochs(data: DeviceData, speedups: Speedups, norm: str, epochs: int) -> tuple[float, float]:
    """(seconds of a new trainer's prepare(), median seconds of its epochs after the first)."""
    trainer = Trainer(TrainConfig(norm=norm, seed=1), data, speedups=speedups)
    prepared = trainer.prepare()
    seconds = [trainer.run_epoch(Callbacks()).seconds for _ in range(epochs)]
    torch.cuda.synchronize()
    return prepared, statistics.median(seconds[1:] or seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--chunks", default="64,16,8,4")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--compiled", action="store_true", help="compile the step (the 10-seed study's default)")
    args = parser.parse_args()
    device = torch.device("cuda")
    data = DeviceData(load_raw("mnist", args.data_dir, download=False), device)
    base = replace(Speedups.default(device), compile=args.compiled)
    chunks = [int(c) for c in args.chunks.split(",")]
    print(f"{torch.cuda.get_device_name()}  {data.train_size:,} training images, batch {TrainConfig.batch_size}  "
          f"{'compiled' if args.compiled else 'not compiled'}; median epoch of {args.epochs - 1} after the first")
    for norm in ("bn", "ln", "gn"):
        start = time.perf_counter()
        prepare_and_epochs(data, replace(base, chunk_steps=chunks[0]), norm, 1)  # this norm's one-time costs
        print(f"{norm}: first trainer in the process {time.perf_counter() - start:.2f} s (not counted)")
        for chunk in chunks:
            prepared, epoch = prepare_and_epochs(data, replace(base, chunk_steps=chunk), norm, args.epochs)
            print(f"  {chunk:3d} steps per graph: prepare {prepared:.2f} s, epoch {epoch:.3f} s", flush=True)


if __name__ == "__main__":
    main()
