"""Time every convolution of both models (batch 128) over Triton tile configurations (CUDA).

For each convolution of the MNIST and CIFAR-10 models, its forward, input-gradient and
weight-gradient kernels (normlab.engine.fast.triton_conv) are timed with each tile configuration, each
configuration replayed in a CUDA graph (triton.testing.do_bench_cudagraph). Prints, per
kernel, the time with normlab's tiles, the best configuration and its time, and the totals
per training step; --json keeps every timing. This is how normlab.engine.fast.triton_conv's tile rules were
chosen (docs/speed.md).

--concurrent N also times N copies of each kernel at once, each on its own stream and its own
tensors, as a sweep's runs share a GPU (six at once by default): the time per copy, which
is what a configuration costs when the GPU is full rather than waiting on one kernel.

    python benchmarks/conv_tiles.py --json benchmarks/results/conv-tiles.json
    python benchmarks/conv_tiles.py --datasets mnist --layers 0,1,2 --stages 1,2,3 --concurrent 6
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from normlab.engine.registry import ARCHITECTURES  # noqa: E402  (torch-free: options are checked first)

if TYPE_CHECKING:
    import torch


def _load_torch() -> None:
    """torch and the Triton convolutions, once the options are known good: a mistyped option
    answers without the seconds their import takes."""
    global torch, conv, Conv2d, Net
    import torch
    from normlab.engine.fast import triton_conv as conv
    from normlab.engine.fast.triton_conv import Conv2d
    from normlab.engine.models import Net

BATCH = 128
# (rows, reduction columns, warps) of the gather-GEMM; and of the weight gradient, with its
# target program count; each with every --stages
GEMM_TILES = list(itertools.product((32, 64, 128), (16, 32, 64), (2, 4)))
WEIGHT_GRAD_TILES = list(itertools.product((64, 128), (16, 32), (2, 4), (512, 1024, 2048)))


def convolutions(dataset: str) -> list[tuple[tuple[int, ...], int, int, int]]:
    """(input shape, out channels, kernel, padding) of each convolution, in forward order."""
    arch = ARCHITECTURES[dataset]
    model = Net(dataset, "bn").cuda()
    found = []
    for layer in model.modules():
        if isinstance(layer, Conv2d):
            layer.register_forward_hook(
                lambda m, inputs, _: found.append((tuple(inputs[0].shape), m.out_channels, m.kernel_size[0], m.padding[0])))
    model(torch.zeros(BATCH, arch.in_channels, arch.image_size, arch.image_size, device="cuda"))
    return found


def gather_gemm(x: torch.Tensor, weight: torch.Tensor, out_channels: int, padding: int, flip: bool,
                config: tuple):
    """A launcher of normlab.engine.fast.triton_conv's gather-GEMM (forward, or input gradient) with
    this configuration: (rows, reduction columns, warps, stages, tap by tap)."""
    *tiles, by_tap = config
    return lambda: conv._conv(x, weight, out_channels, padding, flip, tuple(tiles), bool(by_tap))


def weight_grad(grad: torch.Tensor, x: torch.Tensor, weight_shape: tuple[int, ...], padding: int, config: tuple):
    """A launcher of normlab.engine.fast.triton_conv's weight-gradient partial sums with this configuration
    (rows, reduction columns, warps, target program count, stages)."""
    *blocks, target, stages = config
    return lambda: conv._weight_grad_partials(grad, x, list(weight_shape), padding, (*blocks, stages), target)


def rule(rows: int, channels: int, k: int, transposed: bool) -> tuple:
    """normlab's configuration for a gather-GEMM, as this script writes configurations."""
    tiles, by_tap = conv._gemm_tiles(rows, channels, k, transposed)
    return (*tiles, int(by_tap))


def at_once(launches: list) -> callable:
    """One launcher of every launch at once, each on a stream of its own (forked from and
    joined to the current stream, so a CUDA graph captures them as parallel branches)."""
    streams = [torch.cuda.Stream() for _ in launches]

    def launch_all():
        current = torch.cuda.current_stream()
        for stream, launch in zip(streams, launches):
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                launch()
        for stream in streams:
            current.wait_stream(stream)
    return launch_all


def microseconds(launch, copies: int = 1) -> float | None:
    """Median time of one launch (of ``copies`` launches at once, per copy), replayed in a
    CUDA graph; None where the tiles do not fit."""
    from triton.testing import do_bench_cudagraph

    try:
        launch()
        torch.cuda.synchronize()
        return do_bench_cudagraph(launch, rep=30) * 1e3 / copies
    except Exception:  # a configuration the chip cannot run (shared memory, registers)
        return None


def time_kernel(name: str, makers: list, configs: list[tuple], chosen: tuple) -> dict:
    """Each configuration, and normlab's choice, alone (the first maker's tensors) and, with
    several makers, all at once."""
    times = {config: microseconds(makers[0](config)) for config in dict.fromkeys([*configs, chosen])}
    ran = {config: t for config, t in times.items() if t is not None}
    best = min(ran, key=ran.get)
    row = {"kernel": name, "normlab": ran[chosen], "normlab_tiles": list(chosen), "best": ran[best],
           "best_tiles": list(best), "all": {str(config): t for config, t in ran.items()}}
    if len(makers) > 1:
        shared = {config: microseconds(at_once([make(config) for make in makers]), len(makers)) for config in ran}
        fits = {config: t for config, t in shared.items() if t is not None}
        best_shared = min(fits, key=fits.get)
        row.update(normlab_at_once=fits[chosen], best_at_once=fits[best_shared], best_at_once_tiles=list(best_shared),
                   all_at_once={str(config): t for config, t in fits.items()})
    return row


def integers(valid: range):
    """An argparse type: comma-separated integers, each in ``valid``."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
        wrong = [v for v in values if v not in valid]
        if wrong:
            raise argparse.ArgumentTypeError(f"{wrong} out of range; valid: {valid.start} to {valid.stop - 1}")
        return values
    return parse


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="mnist,cifar10", help="comma-separated: mnist, cifar10")
    p.add_argument("--layers", type=integers(range(0, 64)),
                   help="comma-separated convolution indices (forward order); default: all")
    p.add_argument("--stages", type=integers(range(1, 9)), default=[1],
                   help="comma-separated software-pipeline stages to try (Triton num_stages)")
    p.add_argument("--by-tap", type=integers(range(0, 2)), default=[0, 1],
                   help="the gather-GEMM's forms to try: 0 one flat reduction, 1 tap by tap")
    p.add_argument("--concurrent", type=int, default=1, help="also time this many copies at once, per copy")
    p.add_argument("--json", type=Path, help="write every timing here")
    args = p.parse_args(argv)
    if args.concurrent < 1:
        p.error(f"argument --concurrent: {args.concurrent}; it counts copies, at least 1")
    datasets = args.datasets.split(",")
    unknown = sorted(set(datasets) - set(ARCHITECTURES))
    if unknown:
        sys.exit(f"error: unknown dataset(s) {', '.join(unknown)}; valid choices: {', '.join(ARCHITECTURES)}")
    _load_torch()
    if conv.triton is None or not torch.cuda.is_available():
        sys.exit("error: conv_tiles.py times Triton kernels on a CUDA GPU; none is available here")
    concurrent = args.concurrent
    gemm_tiles = [(*t, s, f) for t in GEMM_TILES for s in args.stages for f in args.by_tap]
    weight_grad_tiles = [(*t, s) for t in WEIGHT_GRAD_TILES for s in args.stages]
    torch.backends.cudnn.allow_tf32 = True  # normlab's default precision: TF32
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; batch {BATCH}; us per kernel"
          + (f"; 'at once': per copy with {concurrent} copies at once" if concurrent > 1 else ""))
    results = []
    for dataset in datasets:
        layers = list(enumerate(convolutions(dataset)))
        if args.layers:
            if max(args.layers) >= len(layers):
                sys.exit(f"error: --layers {max(args.layers)}: the {dataset} model's convolutions are 0 to "
                         f"{len(layers) - 1}")
            layers = [layers[i] for i in args.layers]
        for index, (shape, o, k, padding) in layers:
            n, c, h, w = shape
            ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
            copies = [(torch.randn(shape, device="cuda"), torch.randn(o, c, k, k, device="cuda"),
                       torch.randn(n, o, ho, wo, device="cuda")) for _ in range(concurrent)]
            kernels = [("forward", [lambda t, x=x, weight=weight: gather_gemm(x, weight, o, padding, False, t)
                                    for x, weight, _ in copies], gemm_tiles, rule(n * ho * wo, c, k, False))]
            if index > 0:  # the first layer's input needs no gradient
                kernels.append(("input gradient",
                                [lambda t, g=g, w_t=w.transpose(0, 1): gather_gemm(g, w_t, c, k - 1 - padding, True, t)
                                 for _, w, g in copies],
                                gemm_tiles, rule(n * h * w, o, k, True)))
            *blocks, weight_grad_stages = conv._WEIGHT_GRAD_TILES
            kernels.append(("weight gradient", [lambda t, x=x, g=g: weight_grad(g, x, (o, c, k, k), padding, t)
                                                for x, _, g in copies], weight_grad_tiles,
                            (*blocks, conv._WEIGHT_GRAD_PROGRAMS, weight_grad_stages)))
            for name, makers, configs, chosen in kernels:
                r = {"dataset": dataset, "layer": index, "shape": [c, o, k, padding, h],
                     **time_kernel(name, makers, configs, chosen)}
                results.append(r)
                shared = (f"   at once: normlab {r['normlab_at_once']:6.2f}  best {r['best_at_once']:6.2f} "
                          f"{tuple(r['best_at_once_tiles'])}" if "best_at_once" in r else "")
                print(f"{dataset} conv {index} (in {c}, out {o}, k {k}, pad {padding}, {h}x{h}) {r['kernel']:15s} "
                      f"normlab {r['normlab']:6.2f}  best {r['best']:6.2f} {tuple(r['best_tiles'])}{shared}",
                      flush=True)
        for key, label in (("", "alone"), ("_at_once", "at once")):
            if f"best{key}" in results[-1]:
                ours = sum(r[f"normlab{key}"] for r in results if r["dataset"] == dataset)
                best = sum(r[f"best{key}"] for r in results if r["dataset"] == dataset)
                print(f"{dataset}, {label}: {ours:.1f} us with normlab's tiles, {best:.1f} with each kernel's best "
                      f"({'these layers' if args.layers else 'a training step'})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
