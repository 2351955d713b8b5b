"""The training step as one host-free function, and its CUDA graph.

At batch 128 this 7,750-parameter model does a few hundred microseconds of GPU work per
step, while eager PyTorch needs several milliseconds of Python and driver calls to launch
its ~150 small kernels. So the step is written as one function over fixed tensors that
never reads a value back to the host: the learning rate comes from a device scalar, loss
and correct counts accumulate in device scalars, and the SGD update is a few foreach
kernels. That function runs eagerly on the CPU; on CUDA its forward is compiled (Inductor
fuses each ReLU, norm and dropout, and so their backward) and the whole step is captured
once per batch shape as a CUDA graph, so each batch costs one replay instead of ~150
launches. A step draws its dropout masks from its run's own generators
(normlab.rng), so several runs can train side by side in one process.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from normlab.rng import RunRNG


@dataclass(frozen=True)
class Speedups:
    """Which engine techniques are on; ``default`` picks what measured faster (README, Speed)."""

    cuda_graphs: bool = False  # capture the step as one CUDA graph per batch shape (CUDA only)
    channels_last: bool = False  # NHWC activations and weights
    keep_freed_memory: bool = False  # glibc keeps freed activations for reuse (normlab.host_memory)
    compile: bool = False  # torch.compile the step's forward (and so its backward)
    triton_convs: bool = False  # convolutions as normlab.conv's Triton kernels, not cuDNN (CUDA only)
    eval_batch_size: int = 500  # test images per forward pass in evaluation

    @classmethod
    def default(cls, device: torch.device) -> "Speedups":
        """On a GPU: CUDA graphs of a compiled step with normlab.conv's convolutions. Compiling
        (Inductor fuses each ReLU, norm and dropout) made the H200's epochs 1.2x (BN) to 1.35x
        (LN, GN) shorter, for 9-22 s of compiling per variant, under 2.5 s once the caches hold
        it; the Triton convolutions another 1.5x; NHWC made them slower. On the CPU: malloc
        keeps freed memory, and evaluation batches of 500, whose activations stay under glibc's
        32 MB mmap limit (1000 took twice as long); compiling made CPU steps slower."""
        cuda = device.type == "cuda"
        return cls(cuda_graphs=cuda, keep_freed_memory=not cuda, compile=cuda, triton_convs=cuda,
                   eval_batch_size=1000 if cuda else 500)


class TrainStep:
    """Forward, NLL (+ L1), gradients and the SGD-with-momentum update of one batch.

    Numerically the same update as ``torch.optim.SGD(momentum=m)``: its first step sets the
    momentum buffer to the gradient, which equals ``m * 0 + grad`` on a zero buffer; ``m``
    and the learning rate are device scalars that follow the schedule (``follow``). The
    buffers are the optimizer's own ``momentum_buffer`` state, so ``optimizer.state_dict()``
    stays true; ``bind_optimizer_state`` adopts buffers the optimizer loaded from a checkpoint.
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
        self.forward = model
        self.compiled_shapes: set[tuple[int, ...]] = set()  # batch shapes prepare() compiled
        if compiled:
            # Every run, variant and batch shape is a recompile of one forward: allow them all.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
            self.forward = torch.compile(model, dynamic=False)
        device = self.params[0].device
        # Filled from the optimizer's param group before each step: OneCycleLR moves both.
        self.lr = torch.zeros((), device=device)
        self.momentum = torch.zeros((), device=device)
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

    def follow(self, group: dict) -> None:
        """Take this step's learning rate and momentum from the optimizer's param group."""
        self.lr.fill_(group["lr"])
        self.momentum.fill_(group["momentum"])

    def start_epoch(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()
        self.bind_optimizer_state()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with self.rng.active():
            self._step(x, y)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        log_probs = self._forward(x)
        nll = F.nll_loss(log_probs, y)
        grads = list(torch.autograd.grad(nll, self.params))
        with torch.no_grad():
            if self.l1 > 0:  # d/dw of l1 * sum|w| is l1 * sign(w): two kernels, no autograd graph
                torch._foreach_add_(grads, torch._foreach_sign(self.params), alpha=self.l1)
            torch._foreach_mul_(self.buffers, self.momentum)
            torch._foreach_add_(self.buffers, grads)
            torch._foreach_sub_(self.params, torch._foreach_mul(self.buffers, self.lr))
            self.loss_sum.add_(nll.detach(), alpha=y.shape[0])
            self.correct += (log_probs.argmax(dim=1) == y).sum()

    def prepare(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Compile the forward for this batch shape now, with one step that is undone (x and y
        serve only as warm-up data); nothing to do when it is not compiled."""
        shape = tuple(x.shape)
        if self.forward is self.model or shape in self.compiled_shapes:
            return
        with self.rng.active():
            run_and_undo(self, x, y, steps=1)
        self.compiled_shapes.add(shape)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The compiled forward; where compiling fails (no C compiler, say), the model's own."""
        if self.forward is self.model:
            return self.model(x)
        drawn = torch.get_rng_state()  # a failed compile draws from it: put that back
        try:
            return self.forward(x)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            torch.set_rng_state(drawn)
            warnings.warn(f"torch.compile failed, so this run trains without it (the same model, slower "
                          f"steps): {str(exc).strip().splitlines()[0]}", RuntimeWarning, stacklevel=2)
            self.forward = self.model
            return self.model(x)


def run_and_undo(step: TrainStep, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """Run ``steps`` steps on (x, y), then put back everything they changed.

    Weights, norm statistics, momentum buffers, accumulators and the device's RNG state are
    restored bit for bit, so warming up before a capture does not change what is trained.
    """
    device = step.lr.device
    state = [*step.model.state_dict().values(), *step.buffers, step.loss_sum, step.correct]
    saved = [t.detach().clone() for t in state]
    rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    for _ in range(steps):
        step(x, y)
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


class GraphedTrainStep:
    """A TrainStep that replays one CUDA graph per batch shape (the full batches and the
    epoch's short last one), so after the first epoch no step launches kernels one by one.

    A graph reads its batch from static buffers (one copy each per step). It is captured
    the first time its shape comes, inside the run's RNG scope (so its dropout advances
    the run's own generator), after a few warm-up steps on a side stream (cuDNN and
    autograd set themselves up there) whose effects are undone (``run_and_undo``).
    """

    def __init__(self, step: TrainStep, warmup_steps: int = 3):
        device = step.lr.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {device}")
        self.step = step
        self.warmup_steps = warmup_steps
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        graph, static_x, static_y = self.prepare(x, y)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()

    def prepare(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        """The graph for this batch shape, captured now if the shape is new (x and y serve
        only as warm-up data: nothing they train is kept)."""
        shape = tuple(x.shape)
        if shape not in self.graphs:
            self.graphs[shape] = self.capture(x, y)
        return self.graphs[shape]

    def capture(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_x, static_y = x.clone(), y.clone()
        with _CAPTURE_LOCK, self.step.rng.active(), torch.cuda.device(x.device):
            caller = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(caller)
            with torch.cuda.stream(side):
                run_and_undo(self.step, static_x, static_y, self.warmup_steps)
            caller.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                self.step(static_x, static_y)
            caller.wait_stream(side)
            side.synchronize()
        return graph, static_x, static_y
