"""The training engine: config, L1 penalty, one epoch, evaluation, misclassified samples.

It reports through callbacks and returns records; it imports neither mlflow nor
matplotlib, so it can be tested and timed on its own.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from normlab.engine.config import METRICS, WARM_UP, TrainConfig, steps_key
from normlab.engine.data import DeviceData, batch_slices
from normlab.engine.devices import hidden_gpus_note
from normlab.engine.fast import Speedups
from normlab.engine.fast.chunked_steps import EpochSteps
from normlab.engine.fast.deferred_dynamo import defer_dynamo_imports
from normlab.engine.fast.host_memory import keep_freed_memory
from normlab.engine.fast.triton_conv import use_triton_convs
from normlab.engine.fast.triton_norms import use_triton_norms
from normlab.engine.models import Net
from normlab.engine.rng import RunRNG, data_seed
from normlab.engine.step import TrainStep
from normlab.errors import ConfigError, NoGpuHere, NonFiniteLoss

# Dynamo, AOTAutograd and torch.export share process-wide tracing state, and a CUDA graph
# must not capture another thread's work: runs side by side in one process (engine/fast/trainer_pool.py)
# compile, capture and export their models one at a time, holding this lock, and train
# concurrently in between.
TRACING_LOCK = threading.Lock()


def resolve_device(requested: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without a GPU is an error."""
    choices = ("auto", "cpu", "cuda")
    if requested not in choices and not requested.startswith("cuda:"):
        raise ConfigError(f"unknown --device {requested!r}; valid choices: {', '.join(choices)} or cuda:N")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda"):
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (torch.device(requested).index or 0) >= gpus:
            raise NoGpuHere(requested, gpus, hidden_gpus_note(gpus))
    return torch.device(requested)


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float  # mean NLL over the epoch's training samples (L1 term excluded)
    train_acc: float  # percent, on the augmented training samples, in train mode
    test_loss: float  # mean NLL over the full test split
    test_acc: float  # percent
    lr: float  # learning rate at the end of the epoch
    seconds: float  # wall time of training plus evaluation

    def metrics(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in METRICS}


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    predictions: torch.Tensor  # (N,) predicted class per test sample
    confidence: torch.Tensor  # (N,) probability of the predicted class


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> Evaluation:
    """Mean NLL and accuracy over the whole split, in eval mode; one host sync at the end."""
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    preds, confs = [], []
    for s in batch_slices(len(y), batch_size):
        log_probs = model(x[s])
        loss_sum += F.nll_loss(log_probs, y[s], reduction="sum")
        conf, pred = log_probs.max(dim=1)
        preds.append(pred)
        confs.append(conf.exp())
    predictions = torch.cat(preds)
    correct = (predictions == y).sum()
    return Evaluation(
        loss=loss_sum.item() / len(y),
        accuracy=100.0 * correct.item() / len(y),
        predictions=predictions,
        confidence=torch.cat(confs),
    )


@dataclass(frozen=True)
class Misclassified:
    index: int  # position in the test split
    true: int
    pred: int
    confidence: float  # probability given to the wrong prediction


def most_confident_mistakes(evaluation: Evaluation, labels: torch.Tensor, k: int = 10) -> list[Misclassified]:
    """The k wrong test predictions the model was most sure of (fewer if it made fewer)."""
    wrong = (evaluation.predictions != labels).nonzero().flatten()
    order = evaluation.confidence[wrong].argsort(descending=True)[:k]
    picked = wrong[order].tolist()
    return [
        Misclassified(i, int(labels[i]), int(evaluation.predictions[i]), float(evaluation.confidence[i]))
        for i in picked
    ]


class Callbacks:
    """Hooks the engine calls; the CLI and tracking layer override what they need."""

    def epoch_started(self, epoch: int, steps: int) -> None: ...

    def step_done(self) -> None: ...

    def epoch_done(self, record: EpochRecord) -> None: ...


class CallbackList(Callbacks):
    """Several callbacks called in order."""

    def __init__(self, *callbacks: Callbacks):
        self.callbacks = callbacks

    def epoch_started(self, epoch: int, steps: int) -> None:
        for c in self.callbacks:
            c.epoch_started(epoch, steps)

    def step_done(self) -> None:
        for c in self.callbacks:
            c.step_done()

    def epoch_done(self, record: EpochRecord) -> None:
        for c in self.callbacks:
            c.epoch_done(record)


class TrainingStopped(Exception):
    """Training stopped on request (a signal) at the end of a step; completed epochs are intact."""


@dataclass
class FitResult:
    model: Net
    records: list[EpochRecord]
    mistakes: list[Misclassified] = field(default_factory=list)


class Trainer:
    """Model, optimizer, schedule and RNG for one config; one call of run_epoch per epoch.

    ``speedups`` defaults to what pays on the data's device for ``epochs_ahead`` epochs of
    this variant in this process (default: this run's; normlab.engine.fast.Speedups); any choice
    trains the same steps with the same schedule.
    """

    def __init__(self, config: TrainConfig, data: DeviceData, *, speedups: Speedups | None = None,
                 epochs_ahead: int | None = None, warm: "Trainer | None" = None):
        """``warm``: a finished run's trainer of the same ``steps_key`` on the same data, whose
        model, compiled step and captured CUDA graphs this one takes over with its own initial
        weights, optimizer, schedule and random streams (engine/fast/trainer_pool.py): it trains what
        a new trainer would, bit for bit, without compiling or capturing again."""
        config.validate().check_fits(data.train_size)
        if warm is not None and (steps_key(warm.config) != steps_key(config) or warm.data is not data):
            raise ValueError(f"{warm.config.run_name}'s steps cannot train {config.run_name}: "
                             f"they differ in {steps_key(warm.config)} vs {steps_key(config)} or in data")
        self.config = config
        self.data = data
        device = data.device
        self.generator = torch.Generator(device=device).manual_seed(data_seed(config.seed))  # shuffle, augmentation
        if warm is None:
            self.rng = RunRNG(config.seed, device)  # weights and dropout
            self.speedups = speedups or Speedups.default(device, config.epochs if epochs_ahead is None else epochs_ahead,
                                                         config)
        else:
            self.rng, self.speedups = warm.rng.reseed(config.seed), warm.speedups
        defer_dynamo_imports()  # for the whole process, as malloc's settings below: Dynamo only if compiling
        if self.speedups.keep_freed_memory:
            keep_freed_memory()
        if self.speedups.switch_interval:  # for the whole process, as malloc's settings above
            sys.setswitchinterval(self.speedups.switch_interval)
        with self.rng.active():
            self.model = Net(config.dataset, config.norm, config.groups, config.dropout).to(device)
        if warm is None:
            use_triton_convs(self.model, self.speedups.triton_convs)
            use_triton_norms(self.model, self.speedups.triton_norms)
            if self.speedups.channels_last:
                self.model.to(memory_format=torch.channels_last)
        else:
            warm.model.load_state_dict(self.model.state_dict())
            self.model = warm.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=config.lr, momentum=config.momentum,
                                         foreach=True)
        self.steps_per_epoch = config.steps_per_epoch(data.train_size)
        # The lr alone is cycled: SGD's momentum stays config.momentum, as the run logs it (torch's
        # default, cycle_momentum=True, would train 0.95 -> 0.85 -> 0.95 whatever the config says).
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=config.lr, epochs=config.epochs,
            steps_per_epoch=self.steps_per_epoch, pct_start=WARM_UP, cycle_momentum=False,
        )
        # TrainStep updates the weights itself, so the scheduler would warn that it steps
        # before the optimizer ever did. The mark optimizer.step() leaves for the scheduler says
        # it has (no process-wide warning filter, which threads side by side would race on; no
        # empty step, whose first call imports Dynamo: 1.1 s, deferred_dynamo.py).
        self.optimizer._opt_called = True
        if warm is None:
            self.train_step = TrainStep(self.model, self.optimizer, config.l1, self.rng, self.speedups.compile)
            self.steps = EpochSteps(self.train_step, list(batch_slices(data.train_size, config.batch_size)),
                                    self.speedups.chunk_steps, self.speedups.cuda_graphs)
        else:
            self.train_step, self.steps = warm.train_step, warm.steps
            self.train_step.adopt(self.optimizer)
        self.prepared = warm is not None and warm.prepared
        self.took_over = warm.config.run_name if warm is not None else None  # the run whose steps it reuses
        self.epoch = 0
        self.last_evaluation: Evaluation | None = None
        self.stop_reason: str | None = None

    def request_stop(self, reason: str) -> None:
        """Ask training to stop at the end of the current step (safe to call from a signal handler)."""
        self.stop_reason = reason

    def _stop_if_requested(self, step: int) -> None:
        if self.stop_reason is not None:
            where = f"after step {step} of {self.steps_per_epoch} in" if step else "before"
            raise TrainingStopped(f"{self.stop_reason}: stopped {where} epoch {self.epoch + 1}; "
                                  f"{self.epoch} epochs complete")

    def state_dict(self) -> dict:
        """Everything needed to continue exactly after the last completed epoch."""
        device = self.data.device
        rng = {"generator": self.generator.get_state(), **self.rng.state_dict()}
        return {
            "config": asdict(self.config),
            "config_hash": self.config.config_hash(),
            "device_type": device.type,
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from state_dict(); refuses a different config or device type, saying why."""
        saved = TrainConfig(**state["config"])
        if state["config_hash"] != self.config.config_hash():
            raise ConfigError("the config differs from the checkpoint's (given vs checkpoint): "
                              + "; ".join(self.config.differences(saved)))
        device = self.data.device
        if state["device_type"] != device.type:
            raise ConfigError(f"the checkpoint was written on {state['device_type']} but this run uses "
                              f"{device.type}; resume with --device {state['device_type']}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = state["epoch"]
        self.generator.set_state(state["rng"]["generator"])
        self.rng.load_state_dict(state["rng"])

    def evaluate(self) -> Evaluation:
        return evaluate(self.model, self.data.test_x, self.data.test_y, self.speedups.eval_batch_size)

    def prepare(self) -> float:
        """Compile the step for every batch size of an epoch and capture its CUDA graphs now, not
        in the first epoch, and build the Triton convolutions' kernels for evaluation's shapes
        with one evaluation; returns the seconds it took (about 0 when there is nothing to do,
        or it was done). What the warm-up steps train is undone, so preparing changes no result."""
        start = time.perf_counter()
        if self.prepared:
            return 0.0
        with TRACING_LOCK:
            if self.train_step.compiled or self.steps.graphed:
                self.steps.prepare(self.data.normalize(self.data.train_x), self.data.train_y)
            if self.speedups.triton_convs and self.last_evaluation is None:
                self.evaluate()
        self.prepared = True
        return time.perf_counter() - start

    def train_epoch(self, callbacks: Callbacks) -> tuple[float, float]:
        """One pass over the shuffled, augmented training split; returns (loss, acc %).

        The schedule is stepped on the host a chunk ahead of the GPU: each chunk's steps are
        launched with the learning rates and momenta OneCycleLR gives them."""
        self.model.train()
        self.steps.load(*self.data.training_epoch(self.generator))
        self.train_step.start_epoch()
        group = self.optimizer.param_groups[0]
        for first in range(0, self.steps_per_epoch, self.steps.chunk):
            rates = []
            for _ in range(min(self.steps.chunk, self.steps_per_epoch - first)):
                rates.append((group["lr"], group["momentum"]))
                self.scheduler.step()
            self.steps.run(first, rates)
            for _ in rates:
                callbacks.step_done()
            self._stop_if_requested(first + len(rates))
        n = self.data.train_size
        return self.train_step.loss_sum.item() / n, 100.0 * self.train_step.correct.item() / n

    def run_epoch(self, callbacks: Callbacks) -> EpochRecord:
        self._stop_if_requested(0)
        start = time.perf_counter()
        callbacks.epoch_started(self.epoch + 1, self.steps_per_epoch)
        train_loss, train_acc = self.train_epoch(callbacks)
        self.last_evaluation = self.evaluate()
        self._check_finite(train_loss, self.last_evaluation.loss)
        self.epoch += 1
        record = EpochRecord(
            epoch=self.epoch,
            train_loss=train_loss,
            train_acc=train_acc,
            test_loss=self.last_evaluation.loss,
            test_acc=self.last_evaluation.accuracy,
            lr=self.optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - start,
        )
        callbacks.epoch_done(record)
        return record

    def _check_finite(self, train_loss: float, test_loss: float) -> None:
        if not (math.isfinite(train_loss) and math.isfinite(test_loss)):
            raise NonFiniteLoss(
                f"the loss became non-finite in epoch {self.epoch + 1} (train_loss {train_loss}, "
                f"test_loss {test_loss}): training diverged at --lr {self.config.lr}; "
                f"lower the learning rate (for example --lr {self.config.lr / 10:g})")

    def mistakes(self, k: int = 10) -> list[Misclassified]:
        if self.last_evaluation is None:
            self.last_evaluation = self.evaluate()
        return most_confident_mistakes(self.last_evaluation, self.data.test_y, k)


def fit(trainer: Trainer, callbacks: Callbacks | None = None) -> FitResult:
    """Train the remaining epochs; every epoch is reported to callbacks and returned."""
    callbacks = callbacks or Callbacks()
    if trainer.epoch < trainer.config.epochs:
        trainer.prepare()
    records = [trainer.run_epoch(callbacks) for _ in range(trainer.epoch, trainer.config.epochs)]
    return FitResult(trainer.model, records, trainer.mistakes())
