"""Where an epoch's time goes, per variant: the epoch's parts and the step's operations.

A 60,000-image epoch on an H200 takes about 0.25 s with the default switches (CUDA graphs
of 8 steps, Triton convolutions, not compiled): about 0.5 ms for each of its 469 steps. This
prints, for each variant of the classic study, on the default device (a GPU where there is one):

- the epoch split into its parts, each timed alone (the GPU synchronized): the shuffle and
  augmentation, the steps, the evaluation, the checkpoint state an engine process sends;
- one step under torch.profiler, run as the engine runs it but outside a CUDA graph (a graph
  replays the same kernels): on a GPU how many kernels it launches, their summed GPU time and
  those that take most of it; on the CPU its operators' own time.

    python benchmarks/step_profile.py --data-dir DATA
    python benchmarks/step_profile.py --data-dir DATA --switches compile=1,triton_norms=0  # as ten seeds run

--switches changes the default switches of a short run (Speedups.default) as written: compile=1
alone keeps the Triton norms, which a compiled step by default does not use.
"""

from __future__ import annotations

import argparse
import collections
import io
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.speed import STUDY  # noqa: E402
from normlab.engine.data import DeviceData, load_raw  # noqa: E402
from normlab.engine.fast import Speedups  # noqa: E402
from normlab.engine.train import Callbacks, Trainer, resolve_device  # noqa: E402



def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(work, repeats: int = 5) -> float:
    """Median seconds of ``work()``, the GPU synchronized before and after."""
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        work()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def epoch_parts(trainer: Trainer) -> dict[str, float]:
    data, steps = trainer.data, trainer.steps
    group = trainer.optimizer.param_groups[0]
    rates = [(group["lr"], group["momentum"])] * steps.chunk

    def all_steps() -> None:
        trainer.model.train()  # as train_epoch does: the timed run_epoch's evaluation left it in eval mode
        steps.load(*data.training_epoch(trainer.generator))
        for first in range(0, trainer.steps_per_epoch, steps.chunk):
            steps.run(first, rates[:min(steps.chunk, trainer.steps_per_epoch - first)])

    def state() -> None:
        torch.save(trainer.state_dict(), io.BytesIO())

    return {
        "whole epoch (run_epoch)": timed(lambda: trainer.run_epoch(Callbacks())),
        "shuffle + augmentation": timed(lambda: data.training_epoch(trainer.generator)),
        "the steps (with the above)": timed(all_steps),
        "evaluation": timed(trainer.evaluate),
        "checkpoint state (torch.save)": timed(state),
    }


def step_operations(trainer: Trainer) -> tuple[int, float, list[tuple[str, int, float]]]:
    """One step's kernels (GPU) or operators (CPU): how many, their summed microseconds (the
    GPU's, or the CPU's own time) and the most costly, each with its count per step."""
    x = trainer.data.normalize(trainer.data.train_x[:trainer.config.batch_size])
    y = trainer.data.train_y[:trainer.config.batch_size]
    rates = torch.tensor([0.01, 0.9], device=x.device)
    trainer.model.train()  # as train_epoch does: epoch_parts' evaluation left it in eval mode
    for _ in range(3):
        trainer.train_step(x, y, rates)
    synchronize()
    cuda = x.device.type == "cuda"
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    steps = 10
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(steps):
            trainer.train_step(x, y, rates)
        synchronize()
    if cuda:
        timed_events = [(e.name, e.device_time) for e in prof.events()
                        if e.device_type == torch.autograd.DeviceType.CUDA]
    else:  # the operators' own time: an operator's time without the operators it called
        timed_events = [(e.name, e.self_cpu_time_total) for e in prof.events()
                        if e.self_cpu_time_total > 0]
    total_us = sum(us for _, us in timed_events) / steps
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for name, us in timed_events:
        by_name[name].append(us)
    top = sorted(((name[:90], len(v) // steps, sum(v) / steps) for name, v in by_name.items()),
                 key=lambda row: -row[2])
    return len(timed_events) // steps, total_us, top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--switches", default="", help="NAME=0|1,... changes to the default Speedups")
    args = parser.parse_args()
    device = resolve_device("auto")
    data = DeviceData(load_raw("mnist", args.data_dir, download=False), device)
    changes = {name: bool(int(value)) for name, _, value in
               (pair.partition("=") for pair in filter(None, args.switches.split(",")))}
    print(f"{data.device_name}, torch {torch.__version__}, {torch.get_num_threads()} threads, {data.train_size:,} "
          f"training and {data.test_size:,} test images, batch 128, each variant's default switches"
          f"{' with ' + args.switches if changes else ''}")
    for config in STUDY:
        speedups = replace(Speedups.default(device, config=config), **changes)  # as a short run of it has them
        trainer = Trainer(replace(config, epochs=40), data, speedups=speedups)  # epochs enough for the schedule
        trainer.prepare()
        trainer.run_epoch(Callbacks())
        print(f"\n{config.label}: {speedups.described()}")
        for part, seconds in epoch_parts(trainer).items():
            print(f"  {part:<32} {seconds * 1000:8.1f} ms")
        count, total_us, top = step_operations(trainer)
        steps, what = trainer.steps_per_epoch, "kernels" if device.type == "cuda" else "operators"
        print(f"  one step: {count} {what}, {total_us:.0f} us summed "
              f"({total_us * steps / 1000:.0f} ms for an epoch's {steps} steps)")
        for name, per_step, us in top[:args.top]:
            print(f"    {us:7.1f} us  {per_step:3d}x  {name}")


if __name__ == "__main__":
    main()
