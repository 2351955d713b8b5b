"""Would K seeds trained as one model (grouped convolutions) beat K runs side by side?

A probe for the 10-seed target, not a feature: normlab trains each seed as its own model.
Here K copies of the MNIST Net become one model whose every layer is K times as wide with
``groups=K`` (BN over K*C channels, GroupNorm with K times the groups), so the copies never
mix; one step's loss is the sum of the K copies' mean NLLs, so each copy's gradient is what
it would get alone. Timed per training step (forward, loss, gradients, SGD update, captured
64 steps to a CUDA graph as normlab does), against K plain models replayed on K streams at
once, which is what the sweep's worker does today (three at a time).

    python benchmarks/stacked_seeds.py                     # bn, ln, gn; K = 1, 3, 10
    python benchmarks/stacked_seeds.py --compile           # the step compiled as well
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from normlab.engine.models import Net  # noqa: E402
from normlab.engine.step import sgd_update  # noqa: E402

STEPS_PER_GRAPH = 64
BATCH = 128


def widen(layer: nn.Module, k: int) -> nn.Module:
    """The layer for k copies side by side in the channel dimension."""
    if isinstance(layer, nn.Conv2d):
        return nn.Conv2d(layer.in_channels * k, layer.out_channels * k, layer.kernel_size,
                         padding=layer.padding, bias=False, groups=k)
    if isinstance(layer, nn.BatchNorm2d):
        return nn.BatchNorm2d(layer.num_features * k)
    if isinstance(layer, nn.GroupNorm):
        return nn.GroupNorm(layer.num_groups * k, layer.num_channels * k)
    return layer


class Stacked(nn.Module):
    """k copies of Net as one: input (N, k*C_in, H, W), output log-probabilities (N, k, 10)."""

    def __init__(self, norm: str, k: int):
        super().__init__()
        net = Net("mnist", norm, 2, 0.05)
        self.k = k
        self.body = nn.Sequential(*(self._widen_all(child, k) for name, child in net.named_children()
                                    if name not in ("flatten", "log_softmax")))

    def _widen_all(self, module: nn.Module, k: int) -> nn.Module:
        if isinstance(module, nn.Sequential):
            return nn.Sequential(*(self._widen_all(m, k) for m in module))
        return widen(module, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.body(x).flatten(1).view(x.shape[0], self.k, -1)
        return F.log_softmax(logits, dim=-1)


def stacked_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    log_probs = model(x)  # (N, k, classes)
    k = log_probs.shape[1]
    return F.nll_loss(log_probs.flatten(0, 1), y.flatten()) * k, (log_probs.argmax(-1) == y).sum(0)


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, compiled: bool):
    params = [p for p in model.parameters()]
    buffers = [torch.zeros_like(p) for p in params]
    lr, momentum = torch.tensor(0.01, device=x.device), torch.tensor(0.9, device=x.device)
    loss_sum, correct_sum = torch.zeros(y.shape[1:], device=x.device), torch.zeros(y.shape[1:], device=x.device, dtype=torch.int64)
    loss_fn = torch.compile(stacked_loss, dynamic=False) if compiled else stacked_loss
    update = torch.compile(sgd_update, dynamic=False) if compiled else sgd_update

    def step():
        nll, correct = loss_fn(model, x, y)
        grads = list(torch.autograd.grad(nll, params))
        with torch.no_grad():
            update(params, grads, buffers, lr, momentum, 1e-5, nll.detach(), correct, y.shape[0], loss_sum, correct_sum)
    return step


def captured(k: int, norm: str, compiled: bool, device: torch.device):
    """A CUDA graph of 64 steps of k stacked copies, warmed up and captured."""
    model = Stacked(norm, k).to(device)
    x = torch.randn(BATCH, k, 28, 28, device=device)
    y = torch.randint(0, 10, (BATCH, k), device=device)
    step = make_step(model, x, y, compiled)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(STEPS_PER_GRAPH):
            step()
    return graph


def time_per_step(graphs: list[torch.cuda.CUDAGraph], streams: list[torch.cuda.Stream], replays: int = 15) -> float:
    """Milliseconds per step of one graph, with each graph replayed on its own stream at once."""
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(replays):
            for graph, stream in zip(graphs, streams):
                with torch.cuda.stream(stream):
                    graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / (replays * STEPS_PER_GRAPH) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--norms", default="bn,ln,gn")
    parser.add_argument("--copies", default="1,3,10")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  batch {BATCH}  "
          f"{'compiled' if args.compile else 'eager'} steps, {STEPS_PER_GRAPH} per CUDA graph")
    print(f"{'norm':<5}{'K':>4}{'stacked ms/step':>17}{'K streams ms/step':>19}{'seeds per ms, stacked':>23}"
          f"{'per ms, streams':>17}{'stacked / streams':>19}")
    for norm in args.norms.split(","):
        for k in map(int, args.copies.split(",")):
            stacked = time_per_step([captured(k, norm, args.compile, device)], [torch.cuda.Stream()])
            singles = [captured(1, norm, args.compile, device) for _ in range(k)]
            side_by_side = time_per_step(singles, [torch.cuda.Stream() for _ in range(k)])
            print(f"{norm:<5}{k:>4}{stacked:>17.3f}{side_by_side:>19.3f}{k / stacked:>23.2f}"
                  f"{k / side_by_side:>17.2f}{side_by_side / stacked:>18.2f}x", flush=True)


if __name__ == "__main__":
    main()
