"""How many runs side by side pay on one GPU, and do they train what they train alone?

The study's variants (BN + L1, LN, GN) x seeds, each a whole `fit` (setup, compile from
Inductor's cache, capture, all epochs, evaluation every epoch): first one after another,
then N at a time with normlab.side_by_side (one thread and CUDA stream per run). Prints the
wall time of each way, the throughput ratio, and the largest difference between a run's
per-epoch test loss trained alone and side by side (0 when each run's random streams are
its own and cuDNN's algorithms deterministic).

    python benchmarks/side_by_side.py --epochs 5 --runs 3,6,9
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

from normlab.data import DeviceData, load_raw  # noqa: E402
from normlab.side_by_side import run_side_by_side  # noqa: E402
from normlab.train import TrainConfig, Trainer, fit  # noqa: E402


def study_configs(runs: int, epochs: int) -> list[TrainConfig]:
    """The study's variants, seed 1, then seed 2, ...: `runs` of them."""
    configs = [TrainConfig(**{**c.__dict__, "epochs": epochs, "seed": 1 + i // len(STUDY)})
               for i, c in enumerate(STUDY * (-(-runs // len(STUDY))))]
    return configs[:runs]


def test_losses(config: TrainConfig, data: DeviceData) -> list[float]:
    return [r.test_loss for r in fit(Trainer(config, data)).records]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--runs", default="3,6,9", help="how many runs side by side, comma-separated")
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data")
    p.add_argument("--shared-mnist", type=Path, default=ROOT.parent / "shared" / "data" / "mnist-t10k")
    p.add_argument("--train-images", type=int)
    args = p.parse_args()
    device = torch.device(args.device)
    sizes = [int(n) for n in args.runs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root, source = prepare_mnist(args.data_dir, args.shared_mnist, Path(tmp), args.train_images, None)
        data = DeviceData(load_raw("mnist", root, download=False), device)
    configs = study_configs(max(sizes), args.epochs)
    for config in configs[:len(STUDY)]:  # compile each variant (Inductor caches it), warm up cuDNN
        test_losses(config, data)
    alone, seconds_alone = [], []
    for config in configs:
        start = time.perf_counter()
        alone.append(test_losses(config, data))
        seconds_alone.append(time.perf_counter() - start)
    print(f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, {source}, "
          f"{args.epochs} epochs per run")
    print("| runs | one after another (s) | side by side (s) | throughput | max |test loss diff| |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n in sizes:
        start = time.perf_counter()
        outcomes = run_side_by_side([lambda c=c: test_losses(c, data) for c in configs[:n]], device)
        together = time.perf_counter() - start
        for o in outcomes:
            if o.error is not None:
                raise o.error
        diff = max(abs(a - b) for o, ref in zip(outcomes, alone) for a, b in zip(o.value, ref))
        sequential = sum(seconds_alone[:n])
        print(f"| {n} | {sequential:.2f} | {together:.2f} | {sequential / together:.2f}x | {diff:.2e} |")


if __name__ == "__main__":
    main()
