"""Does training the study's variants side by side on one GPU pay? (CUDA only)

One process, the three study runs (BN + L1, LN, GN): first one after another, then in
lockstep, each on its own CUDA stream, so the GPU can overlap one run's small kernels with
another's. Prints the wall time of each way for the same epochs.

    python benchmarks/side_by_side.py --epochs 5

A prototype for a sweep, not part of the package: the lockstep loop here repeats
Trainer.train_epoch's few lines per run. All three runs share the default CUDA generator,
so their dropout masks depend on the interleaving.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import ROOT, STUDY, prepare_mnist  # noqa: E402

from normlab.data import DeviceData, batch_slices, load_raw  # noqa: E402
from normlab.train import Callbacks, TrainConfig, Trainer, evaluate  # noqa: E402


def lockstep_epoch(trainers: list[Trainer], streams: list[torch.cuda.Stream]) -> None:
    """One epoch of every trainer, step i of each before step i+1 of any."""
    epochs = []
    for trainer, stream in zip(trainers, streams):
        with torch.cuda.stream(stream):
            trainer.model.train()
            trainer.train_step.start_epoch()
            epochs.append(trainer.data.training_epoch(trainer.generator))
    slices = list(batch_slices(trainers[0].data.train_size, trainers[0].config.batch_size))
    for s in slices:
        for trainer, stream, (x, y) in zip(trainers, streams, epochs):
            with torch.cuda.stream(stream):
                trainer.train_step.follow(trainer.optimizer.param_groups[0])
                trainer.run_step(x[s], y[s])
                trainer.scheduler.step()
    for trainer, stream in zip(trainers, streams):
        with torch.cuda.stream(stream):
            trainer.last_evaluation = evaluate(trainer.model, trainer.data.test_x, trainer.data.test_y)
            trainer.epoch += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--data-dir", type=Path, default=ROOT / "data")
    p.add_argument("--shared-mnist", type=Path, default=ROOT.parent / "shared" / "data" / "mnist-t10k")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("side_by_side.py measures CUDA streams; no CUDA GPU here")
    with tempfile.TemporaryDirectory() as tmp:
        root, source = prepare_mnist(args.data_dir, args.shared_mnist, Path(tmp), None, None)
        data = DeviceData(load_raw("mnist", root, download=False), "cuda")
    configs = [TrainConfig(**{**c.__dict__, "epochs": args.epochs + 1}) for c in STUDY]
    times = {}
    for way in ("one after another", "side by side"):
        trainers = [Trainer(c, data) for c in configs]
        streams = [torch.cuda.Stream() for _ in trainers]
        for t in trainers:  # capture outside the timing
            t.run_epoch(Callbacks())
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.epochs):
            if way == "one after another":
                for t in trainers:
                    t.run_epoch(Callbacks())
            else:
                lockstep_epoch(trainers, streams)
        torch.cuda.synchronize()
        times[way] = time.perf_counter() - start
        accs = ", ".join(f"{c.label} {t.last_evaluation.accuracy:.2f}%" for c, t in zip(configs, trainers))
        print(f"{way}: {times[way]:.2f} s for 3 runs x {args.epochs} epochs ({accs})")
    print(f"{torch.cuda.get_device_name()}, {source}: side by side is "
          f"{times['one after another'] / times['side by side']:.2f}x the throughput")


if __name__ == "__main__":
    main()
