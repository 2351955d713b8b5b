"""Time every convolution of both models (batch 128) over Triton tile configurations (CUDA).

For each convolution of the MNIST and CIFAR-10 models, its forward, input-gradient and
weight-gradient kernels (normlab.engine.fast.triton_conv) are timed with each tile configuration, each
configuration replayed in a CUDA graph (triton.testing.do_bench_cudagraph). Prints, per
kernel, the time with normlab's tiles, the best configuration and its time, and the totals
per training step; --json keeps every timing. This is how normlab.engine.fast.triton_conv's tile rules were
chosen (docs/speed.md).

    python benchmarks/conv_tiles.py --json benchmarks/results/conv-tiles.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from normlab.engine.fast import triton_conv as conv  # noqa: E402
from normlab.engine.fast.triton_conv import Conv2d  # noqa: E402
from normlab.engine.models import Net
from normlab.engine.registry import ARCHITECTURES

BATCH = 128
# (rows, reduction columns, warps) of the gather-GEMM; and of the weight gradient, with its
# target program count
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
                tiles: tuple[int, int, int]):
    """A launcher of normlab.engine.fast.triton_conv's gather-GEMM with these tiles (forward, or input gradient)."""
    return lambda: conv._conv(x, weight, out_channels, padding, flip, tiles)


def weight_grad(grad: torch.Tensor, x: torch.Tensor, weight_shape: tuple[int, ...], padding: int,
                tiles: tuple[int, int, int, int]):
    """A launcher of normlab.engine.fast.triton_conv's weight-gradient partial sums with these tiles and target
    program count."""
    *blocks, target = tiles
    return lambda: conv._weight_grad_partials(grad, x, list(weight_shape), padding, tuple(blocks), target)


def microseconds(launch) -> float | None:
    """Median time of one launch, replayed in a CUDA graph; None where the tiles do not fit."""
    from triton.testing import do_bench_cudagraph

    try:
        launch()
        torch.cuda.synchronize()
        return do_bench_cudagraph(launch, rep=30) * 1e3
    except Exception:  # a configuration the chip cannot run (shared memory, registers)
        return None


def time_kernel(name: str, make, configs: list[tuple], chosen: tuple) -> dict:
    times = {config: microseconds(make(config)) for config in configs}
    ran = {config: t for config, t in times.items() if t is not None}
    best = min(ran, key=ran.get)
    return {"kernel": name, "normlab": ran[chosen], "normlab_tiles": list(chosen), "best": ran[best],
            "best_tiles": list(best), "all": {str(config): t for config, t in ran.items()}}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="mnist,cifar10", help="comma-separated: mnist, cifar10")
    p.add_argument("--json", type=Path, help="write every timing here")
    args = p.parse_args(argv)
    if conv.triton is None or not torch.cuda.is_available():
        sys.exit("error: conv_tiles.py times Triton kernels on a CUDA GPU; none is available here")
    datasets = args.datasets.split(",")
    unknown = sorted(set(datasets) - set(ARCHITECTURES))
    if unknown:
        sys.exit(f"error: unknown dataset(s) {', '.join(unknown)}; valid choices: {', '.join(ARCHITECTURES)}")
    torch.backends.cudnn.allow_tf32 = True  # normlab's default precision: TF32
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; batch {BATCH}; us per kernel")
    results = []
    for dataset in datasets:
        for index, (shape, o, k, padding) in enumerate(convolutions(dataset)):
            n, c, h, w = shape
            x, weight = torch.randn(shape, device="cuda"), torch.randn(o, c, k, k, device="cuda")
            ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
            grad = torch.randn(n, o, ho, wo, device="cuda")
            kernels = [("forward", lambda t: gather_gemm(x, weight, o, padding, False, t), conv._gemm_tiles(n * ho * wo))]
            if index > 0:  # the first layer's input needs no gradient
                kernels.append(("input gradient",
                                lambda t: gather_gemm(grad, weight.transpose(0, 1), c, k - 1 - padding, True, t),
                                conv._gemm_tiles(n * h * w)))
            for name, make, chosen in kernels:
                results.append({"dataset": dataset, "layer": index, "shape": [c, o, k, padding, h],
                                **time_kernel(name, make, GEMM_TILES, chosen)})
            results.append({"dataset": dataset, "layer": index, "shape": [c, o, k, padding, h],
                            **time_kernel("weight gradient", lambda t: weight_grad(grad, x, (o, c, k, k), padding, t),
                                          WEIGHT_GRAD_TILES, (*conv._WEIGHT_GRAD_TILES, conv._WEIGHT_GRAD_PROGRAMS))})
            for r in results[-len(kernels) - 1:]:
                print(f"{dataset} conv {index} (in {c}, out {o}, k {k}, pad {padding}, {h}x{h}) {r['kernel']:15s} "
                      f"normlab {r['normlab']:6.2f}  best {r['best']:6.2f} {tuple(r['best_tiles'])}", flush=True)
        ours = sum(r["normlab"] for r in results if r["dataset"] == dataset)
        best = sum(r["best"] for r in results if r["dataset"] == dataset)
        print(f"{dataset}: {ours:.1f} us per training step with normlab's tiles, {best:.1f} with each kernel's best")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
