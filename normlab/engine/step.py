"""One training step: forward, NLL (+ L1), gradients, and the SGD-with-momentum update.

It is written as one function over fixed tensors that never reads a value back to the
host: the learning rate and momentum come in as a device tensor, loss and correct counts
accumulate in device scalars, and the update is a few foreach kernels. On the CPU it runs
as it reads. That shape is what lets the speed wing (engine/fast/) compile it and capture
chunks of it as CUDA graphs without changing a number. A step draws its dropout masks from
its run's own generators (normlab.engine.rng), so runs in one process do not share them.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from normlab.engine.rng import RunRNG


# Inductor's deterministic mode: where a reduction kernel has several candidate tile
# configurations, which add in different orders, it takes one by rule instead of timing them
# on the GPU at its first call (the winner then kept in the compile cache). Timed, the choice
# depended on the machine's load: two processes compiling the same LN run at once on empty
# caches trained it to 99.05% and 99.35% after 3 epochs; in this mode both to 99.05%, and the
# epochs are as fast (six BN runs at once 0.077 s a run-epoch, 0.078 s before:
# h200-2026-12-01d-inductor-deterministic.txt, h200-2026-12-01d-concurrency-deterministic.txt).
COMPILE_OPTIONS = {"deterministic": True}


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
                 compiled: bool = False):
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
        self.compiled_shapes: set[tuple[int, ...]] = set()  # batch shapes prepare() compiled
        self.compiled_versions: dict[Callable, Callable] = {}  # plain function -> compiled
        if compiled:  # kept on disk whole, so that a later process loads rather than compiles them
            from normlab.engine.fast.precompiled import Precompiled
            self.compiled_versions = {f: Precompiled(f, COMPILE_OPTIONS) for f in (loss_and_correct, sgd_update)}
        device = self.params[0].device
        self.loss_sum = torch.zeros((), device=device)  # sum of per-sample NLL this epoch
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.buffers = [torch.zeros_like(p) for p in self.params]
        self.bind_optimizer_state()

    def adopt(self, optimizer: torch.optim.SGD) -> None:
        """Drive a new optimizer over the same parameters (a worker's next run of this
        variant), whose momentum starts from zero as a new TrainStep's would."""
        given = optimizer.param_groups[0]["params"]
        if len(given) != len(self.params) or any(a is not b for a, b in zip(given, self.params)):
            raise ValueError("the new optimizer must hold this step's parameters")
        self.optimizer = optimizer
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


