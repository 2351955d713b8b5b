"""The training step as one host-free function, and the CUDA graphs that launch an epoch of it.

At batch 128 this 7,750-parameter model does a few hundred microseconds of GPU work per
step, while eager PyTorch needs several milliseconds of Python and driver calls to launch
its ~150 small kernels. So the step is written as one function over fixed tensors that
never reads a value back to the host: the learning rate and momentum come from a device
table, loss and correct counts accumulate in device scalars, and the SGD update is a few
foreach kernels. That function runs eagerly on the CPU. On CUDA its forward and loss, and
its update, are compiled (Inductor fuses each ReLU, norm and dropout, their backward, the
loss, and the update over all parameters), and 64 consecutive steps are captured as one
CUDA graph, replayed for every such chunk of the epoch: an epoch is eight replays, and the
host is idle while the GPU trains. A step draws its dropout masks from its run's own
generators (normlab.rng), so several runs can train side by side in one process.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from normlab.models import ConfigError
from normlab.rng import RunRNG


@dataclass(frozen=True)
class Speedups:
    """Which engine techniques are on; ``default`` picks what measured faster (README, Speed)."""

    cuda_graphs: bool = False  # capture the steps as CUDA graphs, one per chunk (CUDA only)
    chunk_steps: int = 1  # consecutive steps launched together (one graph each with cuda_graphs)
    channels_last: bool = False  # NHWC activations and weights
    keep_freed_memory: bool = False  # glibc keeps freed activations for reuse (normlab.host_memory)
    compile: bool = False  # torch.compile the step's forward and loss (so their backward) and update
    triton_convs: bool = False  # convolutions as normlab.conv's Triton kernels, not cuDNN (CUDA only)
    eval_batch_size: int = 500  # test images per forward pass in evaluation

    @classmethod
    def default(cls, device: torch.device, epochs_ahead: int = 0) -> "Speedups":
        """On a GPU: CUDA graphs of 64 steps each with normlab.conv's convolutions, evaluation in
        batches of 2000, and the step compiled when ``epochs_ahead`` (the epochs this process
        will train of this variant and batch size) reach COMPILE_PAYS_FROM_EPOCHS. On the CPU:
        malloc keeps freed memory, evaluation in batches of 500 (under glibc's mmap limit), no
        compiling (it made CPU steps slower). docs/speed.md has the measurements."""
        cuda = device.type == "cuda"
        choice = os.environ.get("NORMLAB_COMPILE", "auto")
        if choice not in COMPILE_CHOICES:
            raise ConfigError(f"NORMLAB_COMPILE={choice!r}; valid choices: {', '.join(COMPILE_CHOICES)}")
        compiled = {"always": True, "never": False}.get(choice, epochs_ahead >= COMPILE_PAYS_FROM_EPOCHS)
        return cls(cuda_graphs=cuda, chunk_steps=64 if cuda else 1, keep_freed_memory=not cuda,
                   compile=cuda and compiled,
                   triton_convs=cuda, eval_batch_size=2000 if cuda else 500)


# Compiling the step saves about 0.11 s of a 60,000-image epoch on an H200 (0.14 instead of
# 0.25 s) and costs 22-29 s per variant on a machine whose compile caches are empty, 1.7-2.9 s
# once they hold it (benchmarks/results/h200-2026-11-29-compile-rule.txt). A process cannot
# tell which it will get, so it compiles when even the cold cost is paid back: from 200
# epochs of one variant and batch size (ten 20-epoch runs, a 10-seed study's share).
COMPILE_PAYS_FROM_EPOCHS = 200
COMPILE_CHOICES = ("auto", "always", "never")  # NORMLAB_COMPILE overrides the rule on a GPU


class TrainStep:
    """Forward, NLL (+ L1), gradients and the SGD-with-momentum update of one batch.

    Numerically the same update as ``torch.optim.SGD(momentum=m)``: its first step sets the
    momentum buffer to the gradient, which equals ``m * 0 + grad`` on a zero buffer. The
    learning rate and ``m`` come in as ``rates``, a tensor ``(lr, m)`` on the device, since
    OneCycleLR moves both every step. The buffers are the optimizer's own
    ``momentum_buffer`` state, so ``optimizer.state_dict()`` stays true;
    ``bind_optimizer_state`` adopts buffers the optimizer loaded from a checkpoint.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.SGD, l1: float, rng: RunRNG,
                 channels_last: bool = False, compiled: bool = False):
        if len(optimizer.param_groups) != 1:
            raise ValueError("TrainStep drives an optimizer with exactly one parameter group")
        group = optimizer.param_groups[0]
        for key, plain in (("weight_decay", 0), ("dampening", 0), ("nesterov", False), ("maximize", False)):
            if group.get(key, plain) != plain:
                raise ValueError(f"TrainStep implements plain SGD with momentum; {key}={group[key]!r} is not supported")
        self.model = model
        self.optimizer = optimizer
        self.params: list[torch.Tensor] = list(group["params"])
        self.l1 = l1
        self.rng = rng
        self.channels_last = channels_last
        self.compiled_shapes: set[tuple[int, ...]] = set()  # batch shapes prepare() compiled
        self.compiled_versions: dict[Callable, Callable] = {}  # plain function -> compiled
        if compiled:
            # Every run, variant and batch shape is a recompile of the same two functions: allow them all.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
            self.compiled_versions = {f: torch.compile(f, dynamic=False) for f in (loss_and_correct, sgd_update)}
        device = self.params[0].device
        self.loss_sum = torch.zeros((), device=device)  # sum of per-sample NLL this epoch
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.buffers = [torch.zeros_like(p) for p in self.params]
        self.bind_optimizer_state()

    def bind_optimizer_state(self) -> None:
        """Make the optimizer's momentum buffers ours, copying in any it loaded meanwhile."""
        for p, buf in zip(self.params, self.buffers):
            state = self.optimizer.state[p]
            current = state.get("momentum_buffer")
            if current is not buf:
                if current is None:
                    buf.zero_()
                else:
                    buf.copy_(current)
                state["momentum_buffer"] = buf

    def start_epoch(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()
        self.bind_optimizer_state()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, rates: torch.Tensor) -> None:
        with self.rng.active():
            self._step(x, y, rates[0], rates[1])

    def _step(self, x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor, momentum: torch.Tensor) -> None:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        nll, correct = self._call(loss_and_correct, self.model, x, y)
        grads = list(torch.autograd.grad(nll, self.params))
        with torch.no_grad():
            self._call(sgd_update, self.params, grads, self.buffers, lr, momentum, self.l1,
                       nll.detach(), correct, y.shape[0], self.loss_sum, self.correct)

    def prepare(self, x: torch.Tensor, y: torch.Tensor, rates: torch.Tensor) -> None:
        """Compile the step for this batch shape now, with one step that is undone (x and y
        serve only as warm-up data); nothing to do when it is not compiled."""
        shape = tuple(x.shape)
        if not self.compiled or shape in self.compiled_shapes:
            return
        with self.rng.active():
            run_and_undo(self, x, y, rates, steps=1)
        self.compiled_shapes.add(shape)

    @property
    def compiled(self) -> bool:
        return bool(self.compiled_versions)

    def _call(self, function: Callable, *args):
        """Call the function's compiled version if there is one; where compiling fails (no C
        compiler, say), warn, stop compiling, and call the plain functions from then on."""
        if function not in self.compiled_versions:
            return function(*args)
        drawn = torch.get_rng_state()  # a failed compile draws from it: put that back
        try:
            return self.compiled_versions[function](*args)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            torch.set_rng_state(drawn)
            warnings.warn(f"torch.compile failed, so this run trains without it (the same model, slower "
                          f"steps): {str(exc).strip().splitlines()[0]}", RuntimeWarning, stacklevel=3)
            self.compiled_versions = {}
            return function(*args)


def loss_and_correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL of the batch and how many it classifies right. Compiled, Inductor fuses the
    loss, the argmax and the count with the model's last layers."""
    log_probs = model(x)
    return F.nll_loss(log_probs, y), (log_probs.argmax(dim=1) == y).sum()


def sgd_update(params: list[torch.Tensor], grads: list[torch.Tensor], buffers: list[torch.Tensor],
               lr: torch.Tensor, momentum: torch.Tensor, l1: float, nll: torch.Tensor, correct: torch.Tensor,
               batch_size: int, loss_sum: torch.Tensor, correct_sum: torch.Tensor) -> None:
    """SGD with momentum (+ the L1 term's gradient: d/dw of l1 * sum|w| is l1 * sign(w)) and
    the epoch's sums, as foreach ops: eagerly a few kernels over all parameters, compiled
    Inductor fuses them."""
    if l1 > 0:
        torch._foreach_add_(grads, torch._foreach_sign(params), alpha=l1)
    torch._foreach_mul_(buffers, momentum)
    torch._foreach_add_(buffers, grads)
    torch._foreach_sub_(params, torch._foreach_mul(buffers, lr))
    loss_sum.add_(nll, alpha=batch_size)
    correct_sum.add_(correct)


def run_and_undo(step: TrainStep, x: torch.Tensor, y: torch.Tensor, rates: torch.Tensor, steps: int) -> None:
    """Run ``steps`` steps on (x, y), then put back everything they changed.

    Weights, norm statistics, momentum buffers, accumulators and the device's RNG state are
    restored bit for bit, so warming up before a capture does not change what is trained.
    """
    device = step.loss_sum.device
    state = [*step.model.state_dict().values(), *step.buffers, step.loss_sum, step.correct]
    saved = [t.detach().clone() for t in state]
    rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    for _ in range(steps):
        step(x, y, rates)
    with torch.no_grad():
        for t, v in zip(state, saved):
            t.copy_(v)
    if device.type == "cuda":
        torch.cuda.set_rng_state(rng, device)
    else:
        torch.set_rng_state(rng)


# One capture at a time in the process: capturing is rare and short, and another thread's
# capture or warm-up could otherwise be recorded into the wrong graph's memory pool.
_CAPTURE_LOCK = threading.Lock()


class EpochSteps:
    """An epoch's training steps, launched ``chunk`` consecutive steps at a time.

    Step i trains on rows ``slices[i]`` of the epoch's shuffled, augmented data at the rates
    the caller gives for it. A chunk's rows and rates are first copied into fixed buffers (one
    device copy per chunk), and its steps run over those. With ``graphed`` (CUDA) the steps
    of a chunk are one CUDA graph, captured once per chunk shape (an MNIST epoch has two: 64
    full batches, and the last 20 with the short one) and replayed for every chunk of that
    shape: the host launches eight replays an epoch instead of ~60 kernels a step, and waits
    for none of them. Without graphs the same steps run one by one over the same buffers.
    """

    def __init__(self, step: TrainStep, slices: list[slice], chunk: int = 1, graphed: bool = False,
                 warmup_steps: int = 3):
        device = step.loss_sum.device
        if graphed and device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {device}")
        if chunk < 1:
            raise ValueError(f"a chunk is at least one step, not {chunk}")
        self.step = step
        self.slices = slices
        self.chunk = chunk
        self.graphed = graphed
        self.warmup_steps = warmup_steps
        self.rates = torch.zeros(chunk, 2, device=device)  # (lr, momentum) of each step of the chunk
        # written on the host, a row per step of the epoch, then copied without waiting for the
        # GPU (pinned memory); a row is rewritten only in the next epoch, after the GPU read it
        self.staged_rates = torch.zeros(len(slices), 2, pin_memory=device.type == "cuda")
        self.rows = max(rows.stop - rows.start for rows in map(self._rows, self._firsts()))
        self.x: torch.Tensor | None = None  # the chunk's rows, allocated for the data's shape
        self.y: torch.Tensor | None = None
        self.epoch_x: torch.Tensor | None = None
        self.epoch_y: torch.Tensor | None = None
        self.graphs: dict[tuple[int, ...], torch.cuda.CUDAGraph] = {}  # batch sizes of a chunk -> its graph

    def _firsts(self) -> range:
        return range(0, len(self.slices), self.chunk)

    def _sizes(self, first: int, count: int | None = None) -> tuple[int, ...]:
        """Batch sizes of the chunk's steps: what its graph depends on."""
        last = min(first + (count or self.chunk), len(self.slices))
        return tuple(s.stop - s.start for s in self.slices[first:last])

    def _rows(self, first: int, count: int | None = None) -> slice:
        last = min(first + (count or self.chunk), len(self.slices)) - 1
        return slice(self.slices[first].start, self.slices[last].stop)

    def load(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Train the coming steps on this epoch's data."""
        self.epoch_x, self.epoch_y = x, y
        if self.x is None:
            self.x = x.new_empty((self.rows, *x.shape[1:]))
            self.y = y.new_empty((self.rows, *y.shape[1:]))

    def prepare(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Compile the step for every batch size of an epoch and, graphed, capture every chunk
        shape now (x and y: a whole epoch's worth of warm-up data; what they train is undone)."""
        self.load(x, y)
        for size in sorted({s.stop - s.start for s in self.slices}, reverse=True):
            self.step.prepare(x[:size], y[:size], self.rates[0])
        if self.graphed:
            for first in self._firsts():
                sizes = self._sizes(first)
                if sizes not in self.graphs:
                    self._stage(first, sizes)
                    self._capture(sizes)

    def run(self, first: int, rates: list[tuple[float, float]]) -> None:
        """Steps ``first`` to ``first + len(rates) - 1``, which start a chunk, at these rates."""
        if first % self.chunk or len(rates) > self.chunk:
            raise ValueError(f"steps {first}-{first + len(rates) - 1} are not one chunk of {self.chunk}")
        sizes = self._sizes(first, len(rates))
        self.staged_rates[first:first + len(rates)] = torch.tensor(rates)
        self._stage(first, sizes)
        if not self.graphed:
            self._steps(sizes)
            return
        if sizes not in self.graphs:
            self._capture(sizes)
        self.graphs[sizes].replay()

    def _stage(self, first: int, sizes: tuple[int, ...]) -> None:
        """Copy the chunk's rows and rates into the buffers its steps read."""
        rows = self._rows(first, len(sizes))
        self.x[:rows.stop - rows.start].copy_(self.epoch_x[rows])
        self.y[:rows.stop - rows.start].copy_(self.epoch_y[rows])
        self.rates[:len(sizes)].copy_(self.staged_rates[first:first + len(sizes)], non_blocking=True)

    def _steps(self, sizes: tuple[int, ...]) -> None:
        start = 0
        for j, size in enumerate(sizes):
            self.step(self.x[start:start + size], self.y[start:start + size], self.rates[j])
            start += size

    def _capture(self, sizes: tuple[int, ...]) -> None:
        """Warm up each batch size on a side stream (autograd and the compiled kernels set
        themselves up there; undone), then capture the chunk's steps inside the run's RNG
        scope, so replays advance the run's own generator. A run's graphs share a memory pool."""
        pool = next(iter(self.graphs.values())).pool() if self.graphs else None
        with _CAPTURE_LOCK, self.step.rng.active(), torch.cuda.device(self.x.device):
            caller = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(caller)
            with torch.cuda.stream(side):
                for size in set(sizes):
                    run_and_undo(self.step, self.x[:size], self.y[:size], self.rates[0], self.warmup_steps)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                self._steps(sizes)
            caller.wait_stream(side)
            side.synchronize()
        self.graphs[sizes] = graph
