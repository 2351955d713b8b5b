"""The engine in a process of its own, so that a run's two starts overlap.

One `normlab train` starts two things before its first epoch: the engine (torch, CUDA, the
data on the device, the model, optimizer and captured step) and the tracking (MLflow, its
store, the run and its params). In one process they take turns: Python runs one thread at a
time, and both are interpreter work. As two processes they start at once. On an H200 the
engine's start took 4.8 s beside the tracking's, against 8.5 s for both in one process
(benchmarks/process_split.py; docs/speed.md has the end-to-end times).

``EngineProcess`` is what the command's side (the tracking side) holds instead of a Trainer:
``fit``, the callbacks, the checkpointer and the run's logging use it as they use a Trainer,
while the Trainer itself runs in a child process that trains straight through and reports
each epoch, with the state a checkpoint needs, over a pipe. A stop request goes the other
way. The child ignores Ctrl-C and SIGTERM: the command receives them and passes on one stop,
as `stop_on_signals` does in one process.

On a CPU the two processes would share the cores the training needs, so it is used where
training runs on a GPU (``NORMLAB_ENGINE_PROCESS``: auto, always, never). End to end on three
H200s, `normlab train` took 11.4-12.8 s against 15.0-16.8 s in one process (1.26-1.32x) and
`mlflow run` 1.21-1.25x (docs/speed.md; `benchmarks/e2e.py --rows train,mlflow-run
--also-with NORMLAB_ENGINE_PROCESS=never` times it against its switch).
"""

from __future__ import annotations

import ctypes
import importlib.util
import io
import multiprocessing
import os
import signal
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from normlab.engine.config import TrainConfig
from normlab.engine.registry import DatasetSpec
from normlab.errors import ConfigError, DataError, NonFiniteLoss

CHOICES = ("auto", "always", "never")
STEPS_PER_REPORT = 8  # steps the engine process reports at once (a CUDA graph's chunk)


def wanted(device: str) -> bool:
    """Whether `normlab train --device DEVICE` trains in an engine process: on a GPU (auto),
    or as NORMLAB_ENGINE_PROCESS says. Decided without importing torch, which the engine
    process imports in the meantime."""
    choice = os.environ.get("NORMLAB_ENGINE_PROCESS", "auto")
    if choice not in CHOICES:
        raise ConfigError(f"NORMLAB_ENGINE_PROCESS={choice!r}; valid choices: {', '.join(CHOICES)}")
    if choice != "auto":
        return choice == "always"
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        return True
    return device == "auto" and _torch_has_cuda() and _cuda_devices() > 0


def _torch_has_cuda() -> bool:
    """Whether the installed torch is a CUDA build (a CPU-only wheel on a GPU machine would
    train on the CPU), from its files: finding a package does not import it."""
    spec = importlib.util.find_spec("torch")
    return bool(spec and spec.origin and any((Path(spec.origin).parent / "lib").glob("libtorch_cuda*")))


def _cuda_devices() -> int:
    """How many GPUs CUDA's driver sees (0 without one), through the driver library itself:
    about a millisecond, where `torch.cuda.is_available()` first needs torch's 1.4 s import."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    except (OSError, AttributeError):
        return 0


class EngineCrashed(RuntimeError):
    """The engine process failed with an error of its own (its traceback is the message) or died."""


@dataclass
class EngineData:
    """What the tracking side knows of the engine's data: DeviceData's facts, without the
    tensors. The test images of the final mistakes arrive with them."""

    spec: DatasetSpec
    device: object  # torch.device
    device_name: str
    train_size: int
    test_size: int
    digest: str
    example: object  # numpy (2, C, H, W) float32: DeviceData.example_input()
    mistake_images: dict[int, object] = field(default_factory=dict)  # test index -> (H, W, C) uint8

    def example_input(self):
        return self.example

    def test_images_of(self, indices: list[int]):
        import numpy as np

        return np.stack([self.mistake_images[i] for i in indices])


class EngineProcess:
    """A Trainer in a child process, as the tracking side uses a Trainer (see the module's
    docstring). Use it as a context manager: leaving it ends the child."""

    def __init__(self, config: TrainConfig, data_dir: str, device: str):
        self.config = config
        self.epoch = 0
        context = multiprocessing.get_context("spawn")  # never fork a process that holds CUDA or threads
        self._conn, child_end = context.Pipe()
        self._process = context.Process(target=_serve, args=(child_end, config, str(data_dir), device),
                                        name=f"normlab-engine-{config.run_name}", daemon=True)
        self._process.start()
        child_end.close()
        self._data: EngineData | None = None
        self._model = None
        self._state: bytes | None = None
        self._prepare_seconds: float | None = None
        self._mistakes = None
        self._stop_sent = False
        self._ended = False  # the child has sent its last message

    def __enter__(self) -> "EngineProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End the child. One that has reported its end gets two seconds to exit; one still
        training is killed at once: the run has ended on this side (a second Ctrl-C, a store
        that failed), and everything the run keeps was written here."""
        if self._ended:
            self._process.join(timeout=2)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()

    # What a Trainer offers the tracking side

    @property
    def data(self) -> EngineData:
        """The data's facts, once the child has built its trainer (raises its ConfigError or DataError)."""
        while self._data is None:
            self._handle(self._receive())
        return self._data

    @property
    def model(self):
        """The model on the CPU: its summary before training, the trained weights after it."""
        if self._model is None:
            from normlab.engine.models import Net

            self._model = Net(self.config.dataset, self.config.norm, self.config.groups, self.config.dropout)
        return self._model

    def prepare(self) -> float:
        """Wait for the child to compile and capture its step; the seconds that took it."""
        while self._prepare_seconds is None:
            self._handle(self._receive())
        seconds, self._prepare_seconds = self._prepare_seconds, 0.0
        return seconds

    def run_epoch(self, callbacks):
        """The child's next epoch, reported to callbacks as a Trainer reports its own."""
        while True:
            record = self._handle(self._receive(), callbacks)
            if record is not None:
                return record

    def mistakes(self, k: int = 10):
        """The final evaluation's most confident mistakes (k is the child's: 10)."""
        while self._mistakes is None:
            self._handle(self._receive())
        return self._mistakes

    def state_dict(self) -> dict:
        """The child's Trainer.state_dict() after its last reported epoch, on the CPU."""
        import torch

        return torch.load(io.BytesIO(self._state), map_location="cpu", weights_only=True)

    def request_stop(self, reason: str) -> None:
        """Ask the child to stop after its current step (safe in a signal handler)."""
        if self._stop_sent:
            return
        self._stop_sent = True
        try:
            self._conn.send(("stop", reason))
        except OSError:  # the child has ended already
            pass

    # The pipe

    def _receive(self) -> tuple:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            self._process.join(timeout=5)
            raise EngineCrashed(f"the engine process ended without a word "
                                f"(exit code {self._process.exitcode})") from None

    def _handle(self, message: tuple, callbacks=None):
        """Act on one message; an epoch's record is returned, errors are raised here."""
        kind, *body = message
        self._ended = kind not in ("built", "prepared", "started", "steps", "epoch")
        if kind == "built":
            self._data = body[0]
        elif kind == "prepared":
            self._prepare_seconds = body[0]
        elif kind == "started" and callbacks is not None:
            callbacks.epoch_started(*body)
        elif kind == "steps" and callbacks is not None:
            for _ in range(body[0]):
                callbacks.step_done()
        elif kind == "epoch":
            record, self._state = body
            self.epoch = record.epoch
            if callbacks is not None:
                callbacks.epoch_done(record)
            return record
        elif kind == "finished":
            mistakes, images = body
            self._data.mistake_images = images
            self.model.load_state_dict(self.state_dict()["model"])
            self._mistakes = mistakes
        else:
            raise _error(kind, body[0])
        return None


def _error(kind: str, message: str) -> BaseException:
    from normlab.engine.train import TrainingStopped

    errors = {"config": ConfigError, "data": DataError, "stopped": TrainingStopped, "diverged": NonFiniteLoss,
              "crashed": EngineCrashed}
    return errors[kind](message)


class _Reporter:
    """The child's callbacks: each event goes to the tracking side."""

    def __init__(self, conn, trainer):
        self.conn = conn
        self.trainer = trainer
        self.steps = 0

    def epoch_started(self, epoch: int, steps: int) -> None:
        self.conn.send(("started", epoch, steps))

    def step_done(self) -> None:
        self.steps += 1
        if self.steps == STEPS_PER_REPORT:  # for a progress bar on the other side
            self.conn.send(("steps", self.steps))
            self.steps = 0

    def epoch_done(self, record) -> None:
        import torch

        if self.steps:
            self.conn.send(("steps", self.steps))
            self.steps = 0
        state = io.BytesIO()
        torch.save(self.trainer.state_dict(), state)
        self.conn.send(("epoch", record, state.getvalue()))


def _serve(conn, config: TrainConfig, data_dir: str, device: str) -> None:
    """The engine process: build the trainer, report it, prepare, train, report the mistakes."""
    for signum in (signal.SIGINT, signal.SIGTERM):  # the command passes a stop on (module docstring)
        signal.signal(signum, signal.SIG_IGN)
    stop = _StopListener(conn)
    try:
        from normlab.engine.data import DeviceData, load_raw
        from normlab.engine.train import Trainer, TrainingStopped, fit, resolve_device

        try:
            data = DeviceData(load_raw(config.dataset, data_dir), resolve_device(device))
            trainer = Trainer(config, data)
        except ConfigError as exc:
            return conn.send(("config", str(exc)))
        except DataError as exc:
            return conn.send(("data", str(exc)))
        stop.watch(trainer)
        conn.send(("built", EngineData(data.spec, data.device, data.device_name, data.train_size, data.test_size,
                                       data.digest, data.example_input())))
        conn.send(("prepared", trainer.prepare()))
        try:
            result = fit(trainer, _Reporter(conn, trainer))
        except TrainingStopped as exc:
            return conn.send(("stopped", str(exc)))
        except NonFiniteLoss as exc:
            return conn.send(("diverged", str(exc)))
        indices = [m.index for m in result.mistakes]
        conn.send(("finished", result.mistakes, dict(zip(indices, data.test_images_of(indices)))))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the command has gone; nobody to tell
    except BaseException:
        conn.send(("crashed", traceback.format_exc()))
    finally:
        conn.close()


class _StopListener:
    """In the child: a thread that turns the command's stop message, or its end, into
    Trainer.request_stop."""

    def __init__(self, conn):
        self.conn = conn
        self.trainer = None
        self.reason: str | None = None
        threading.Thread(target=self._listen, name="normlab-stop-listener", daemon=True).start()

    def watch(self, trainer) -> None:
        self.trainer = trainer
        if self.reason is not None:
            trainer.request_stop(self.reason)

    def _listen(self) -> None:
        try:
            _, reason = self.conn.recv()
        except (EOFError, OSError):
            reason = "the command that started this engine process ended"
        self.reason = reason
        if self.trainer is not None:
            self.trainer.request_stop(reason)
