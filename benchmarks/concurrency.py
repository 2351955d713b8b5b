"""How much more training one GPU does with several runs at once, engine alone.

The sweep's engine trains up to RUNS_PER_GPU runs at once on a GPU, each in a thread with its
own CUDA stream. This times whole epochs of ordinary Trainers (shuffle and augmentation,
graphed steps, evaluation, the per-epoch reads) without MLflow, one run alone against N
threads at once, for each set of speed switches (SWITCH_SETS), to show what one GPU can give
the sweep's runs at most.

    python benchmarks/concurrency.py --data-dir DATA --epochs 5 --runs 1,3,6
    python benchmarks/concurrency.py --data-dir DATA --runs 1,6,10 --sets compiled
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from normlab.engine.data import DeviceData, load_raw  # noqa: E402
from normlab.engine.fast import Speedups  # noqa: E402
from normlab.engine.config import TrainConfig
from normlab.engine.train import Callbacks, Trainer  # noqa: E402


# name -> (what it is, its changes to the default switches on a GPU)
SWITCH_SETS = {
    "default": ("graphs + Triton convs and norms (the default for a short study)", {}),
    "cudnn": ("graphs + cuDNN convs, torch's norms", {"triton_convs": False, "triton_norms": False}),
    "compiled": ("graphs + Triton convs, compiled (the default for 10 seeds)",
                 {"compile": True, "triton_norms": False}),
    "compiled-cudnn": ("graphs + cuDNN convs, compiled",
                       {"compile": True, "triton_convs": False, "triton_norms": False}),
    "compiled-triton-norms": ("graphs + Triton convs and norms, compiled", {"compile": True, "triton_norms": True}),
    # fewer graph replays an epoch (8 instead of 59): do six runs at once wait for the GPU or for Python?
    "compiled-64-steps": ("graphs of 64 steps + Triton convs, compiled",
                          {"compile": True, "triton_norms": False, "chunk_steps": 64}),
}


def train_at_once(trainers: list[Trainer], epochs: int, streams: list[torch.cuda.Stream]) -> float:
    """Wall seconds for every trainer to run ``epochs`` epochs, each in its own thread and stream."""
    def work(trainer: Trainer, stream: torch.cuda.Stream) -> None:
        with torch.cuda.stream(stream):
            for _ in range(epochs):
                trainer.run_epoch(Callbacks())
            stream.synchronize()

    torch.cuda.synchronize()
    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=pair) for pair in zip(trainers, streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--runs", default="1,3,6")
    parser.add_argument("--norm", default="ln")
    parser.add_argument("--sets", default=",".join(SWITCH_SETS), help=f"comma list from {', '.join(SWITCH_SETS)}")
    args = parser.parse_args()
    device = torch.device("cuda")
    data = DeviceData(load_raw("mnist", args.data_dir, download=False), device)
    base = Speedups.default(device)
    counts = [int(n) for n in args.runs.split(",")]
    print(f"{torch.cuda.get_device_name()}  {data.train_size:,} training images  {args.norm}  "
          f"{args.epochs} epochs per run (after one to warm up)")
    for name in args.sets.split(","):
        description, changes = SWITCH_SETS[name]
        speedups = replace(base, **changes)
        trainers = []
        for seed in range(1, max(counts) + 1):
            config = TrainConfig(norm=args.norm, seed=seed, epochs=args.epochs * len(counts) + 5)
            trainer = Trainer(config, data, speedups=speedups)
            trainer.prepare()
            trainer.run_epoch(Callbacks())
            trainers.append(trainer)
        streams = [torch.cuda.Stream() for _ in trainers]
        alone = statistics.median(train_at_once(trainers[:1], 1, streams) for _ in range(3))
        print(f"\n{description}: one epoch alone {alone:.3f} s")
        for n in counts:
            wall = train_at_once(trainers[:n], args.epochs, streams)
            per_epoch = wall / args.epochs
            print(f"  {n} at once: {per_epoch:.3f} s per epoch of all {n}, "
                  f"{per_epoch / n:.3f} s per run-epoch, {n * alone / per_epoch:.2f}x the training of one at a time",
                  flush=True)


if __name__ == "__main__":
    main()
