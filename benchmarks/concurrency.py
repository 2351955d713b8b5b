"""How much more training one GPU does with several runs at once, engine alone.

The sweep's worker trains up to three runs at once, each in a thread with its own CUDA
stream. In the 10-seed study (benchmarks/e2e.py) three compiled runs at once gave only 1.33x
the training of one, while three bare step graphs replayed on three streams give about 2x
(benchmarks/stacked_seeds.py). This times whole epochs of ordinary Trainers (shuffle and
augmentation, 64-step graphs, evaluation, the per-epoch reads) without MLflow, one after
another against N threads at once, for each set of speed switches, to find where it is lost.

    python benchmarks/concurrency.py --data-dir DATA --epochs 5 --runs 1,3,6
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
    args = parser.parse_args()
    device = torch.device("cuda")
    data = DeviceData(load_raw("mnist", args.data_dir, download=False), device)
    base = Speedups.default(device)
    switch_sets = {
        "graphs + Triton convs (default)": base,
        "graphs + cuDNN convs": replace(base, triton_convs=False),
        "graphs + Triton convs, compiled": replace(base, compile=True),
        "graphs + cuDNN convs, compiled": replace(base, compile=True, triton_convs=False),
    }
    counts = [int(n) for n in args.runs.split(",")]
    print(f"{torch.cuda.get_device_name()}  {data.train_size:,} training images  {args.norm}  "
          f"{args.epochs} epochs per run (after one to warm up)")
    for name, speedups in switch_sets.items():
        trainers = []
        for seed in range(1, max(counts) + 1):
            trainer = Trainer(TrainConfig(norm=args.norm, seed=seed, epochs=args.epochs * len(counts) + 5), data, speedups=speedups)
            trainer.prepare()
            trainer.run_epoch(Callbacks())
            trainers.append(trainer)
        streams = [torch.cuda.Stream() for _ in trainers]
        alone = statistics.median(train_at_once(trainers[:1], 1, streams) for _ in range(3))
        print(f"\n{name}: one epoch alone {alone:.3f} s")
        for n in counts:
            wall = train_at_once(trainers[:n], args.epochs, streams)
            per_epoch = wall / args.epochs
            print(f"  {n} at once: {per_epoch:.3f} s per epoch of all {n}, "
                  f"{per_epoch / n:.3f} s per run-epoch, {n * alone / per_epoch:.2f}x the training of one at a time",
                  flush=True)


if __name__ == "__main__":
    main()
