"""The engine in a process of its own, so that tracking and training stop taking turns.

A run has two sides: the engine (torch, CUDA, the data on the device, the model, optimizer
and captured step, the epochs) and the tracking (MLflow, its store, the run, its params,
metrics, artifacts and model). In one process they take turns: Python runs one thread at a
time, and both are interpreter work. As two processes they run at once. On an H200 the
engine's start took 4.8 s beside the tracking's, against 8.5 s for both in one process
(benchmarks/process_split.py; docs/speed.md has the end-to-end times).

``EngineProcess`` starts a child process holding a TrainerPool and hands it runs; for each it
returns a ``RemoteTrainer``, which the tracking side uses as it uses a Trainer: ``fit``, the
callbacks, the checkpointer and the run's logging read the child's reports (each epoch with
the state a checkpoint needs) over one pipe, each under its run's key, while the child trains
straight through. Stop requests go the other way. A sweep on one GPU hands it all its runs: a
run that finishes leaves its place to the next at once, while its artifacts and model are
logged on the tracking side. The child ignores Ctrl-C and SIGTERM: the command receives them
and passes on one stop, as `stop_on_signals` does in one process.

On a CPU the two processes would share the cores the training needs, so it is used where
training runs on a GPU (``NORMLAB_ENGINE_PROCESS``: auto, always, never). End to end on three
H200s, `normlab train` took 11.4-12.8 s against 15.0-16.8 s in one process (1.26-1.32x) and
`mlflow run` 1.21-1.25x (docs/speed.md; `benchmarks/e2e.py --rows train,mlflow-run
--also-with NORMLAB_ENGINE_PROCESS=never` times it against its switch).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import itertools
import multiprocessing
import os
import queue
import signal
import threading
import traceback
from dataclasses import dataclass, field

from normlab.engine import devices
from normlab.engine.config import TrainConfig
from normlab.engine.registry import DatasetSpec
from normlab.errors import ConfigError, DataError, NonFiniteLoss

CHOICES = ("auto", "always", "never")
STEPS_PER_REPORT = 8  # steps the engine process reports at once (a CUDA graph's chunk)


def wanted(device: str) -> bool:
    """Whether `normlab train --device DEVICE` trains in an engine process: on a GPU (auto), or
    as NORMLAB_ENGINE_PROCESS says. Decided without importing torch, which the engine process
    imports in the meantime."""
    choice = os.environ.get("NORMLAB_ENGINE_PROCESS", "auto")
    if choice not in CHOICES:
        raise ConfigError(f"NORMLAB_ENGINE_PROCESS={choice!r}; valid choices: {', '.join(CHOICES)}")
    if choice != "auto":
        return choice == "always"
    return trains_on_gpu(device)


def trains_on_gpu(device: str) -> bool:
    """Whether ``--device DEVICE`` trains on a GPU here, decided without importing torch."""
    if devices.cuda_index(device) is not None:
        return True
    return device == "auto" and devices.torch_has_cuda() and devices.cuda_devices() > 0


def wanted_for_sweep(device: str, cpu_workers: int) -> bool:
    """Whether a sweep on this machine trains in one engine process: where ``wanted`` says so
    and there is one device to train on (one GPU visible, or one CPU worker)."""
    if not wanted(device):
        return False
    gpus = devices.cuda_devices() if device in ("auto", "cuda") and devices.torch_has_cuda() else 0
    if gpus:
        return gpus == 1
    return device.startswith("cuda") or cpu_workers == 1


def start_beside_torch_import(device: str) -> None:
    """What a GPU engine process starts on threads before it imports torch: Triton's build
    hash, which its pool waits for at the first kernel (triton_build_hash), and the GPU's
    context. Imports no torch."""
    from normlab.engine.fast import triton_build_hash

    triton_build_hash.start()
    threading.Thread(target=_make_cuda_context, args=(device,), name="normlab-cuda-context", daemon=True).start()


def _make_cuda_context(device: str) -> None:
    """Make the GPU's primary context, the one torch's first CUDA call then takes, through the
    driver library (which lets go of the interpreter's lock), while torch imports: CUDA's
    start after torch's import took 0.02 s instead of 0.25-0.34 s on an H200, the thread 0.5 s
    beside an import of 1.2-1.4 s (h200-2026-12-02b-cuda-context.txt). A failure here is met
    again, and reported, by torch."""
    index = devices.cuda_index(device) or 0  # auto: torch's 0
    driver, handle, context = devices.cuda_driver(), ctypes.c_int(0), ctypes.c_void_p()
    if driver is not None and driver.cuDeviceGet(ctypes.byref(handle), index) == 0:
        driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), handle)


class EngineCrashed(RuntimeError):
    """A run failed in the engine process with an error of its own (its traceback is the message)."""


class EngineDied(EngineCrashed):
    """The engine process itself ended (killed, out of memory); its runs can be tried again."""


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
    """A TrainerPool in a child process (see the module's docstring): ``trainer(config)`` hands
    it a run and returns the RemoteTrainer the tracking side uses as it uses a Trainer. A new
    child starts in place of one that died. Use it as a context manager: leaving it ends the
    child."""

    def __init__(self, data_dir: str, device: str, concurrent: int | None = None,
                 ahead: tuple[list[TrainConfig], dict[tuple, int]] | None = None, early: bool = False):
        """``concurrent``: runs the child trains at once (default: TrainerPool's); ``ahead``:
        the configs (and epochs per steps_key) of the runs to come, whose data the child puts
        on its device and whose steps it prepares at once (TrainerPool.prepare_ahead); with
        ``early``, the child also starts training the first ``concurrent`` of them before they
        are handed over (``keep_early`` says which are wanted; ``trainer`` claims one): a
        sweep's command opens MLflow and its records first, seconds while the GPU would idle.
        On an H200 the classic sweep took 14.5 s against 16.0 s, alternately (1.10x;
        h200-2026-12-01h-e2e-sweep1-early-runs-2.txt)."""
        self.data_dir, self.device, self.ahead = str(data_dir), device, ahead
        self._concurrent = concurrent
        self._lock = threading.Lock()
        self._keys = itertools.count()
        self._channel = _Channel(self, early)

    def __enter__(self) -> "EngineProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def concurrent(self) -> int:
        """Runs the child trains at once (it tells, once started)."""
        return self._channel.hello()[1]

    @property
    def device_name(self) -> str:
        return self._channel.hello()[0]

    def trainer(self, config: TrainConfig, epochs_ahead: int = 0, state: dict | None = None) -> "RemoteTrainer":
        """Hand the child a run (continuing from ``state``, a checkpoint, if given), as
        TrainerPool.trainer does in this process; it starts when one of the child's places
        is free."""
        saved = None
        if state is not None:
            import torch

            buffer = io.BytesIO()
            torch.save(state, buffer)
            saved = buffer.getvalue()
        with self._lock:
            if self._channel.died is not None:  # a new child: the runs it replaces were handed over, none early
                self._channel = _Channel(self)
            channel, key = self._channel, next(self._keys)
        trainer = RemoteTrainer(channel, key, config, saved)
        channel.send(("train", key, config, epochs_ahead, saved))
        return trainer

    def keep_early(self, wanted: list[tuple[TrainConfig, int]]) -> None:
        """Of the runs the child started early, keep those of these (config, epochs ahead)
        pairs, the fresh runs the command will hand over; the others (trained already, to be
        resumed, or elsewhere) are stopped and forgotten."""
        self._channel.send(("keep early", wanted))

    def release(self, trainer: "RemoteTrainer", finished: bool) -> None:
        """The tracking side is done with the run (the child keeps a finished run's trainer itself)."""
        trainer.close()

    def request_stop(self, reason: str) -> None:
        """Stop every run the child trains, and every later one (safe in a signal handler)."""
        self._channel.send(("stop all", reason))

    @contextlib.contextmanager
    def stream(self):
        """Nothing to hold on this side: the child's threads hold the CUDA streams."""
        yield

    def close(self) -> None:
        """End the child: it exits at once, whatever it still trains (the runs on this side
        have ended, and everything they keep was written here)."""
        self._channel.close()


class _Channel:
    """One child process and its pipe: a thread sends what the tracking side asks (through a
    queue, so a signal handler may ask too) and a thread hands each message to its run."""

    def __init__(self, engine: EngineProcess, early: bool = False):
        context = multiprocessing.get_context("spawn")  # never fork a process that holds CUDA or threads
        self.conn, child_end = context.Pipe()
        self.process = context.Process(target=_serve, name="normlab-engine", daemon=True,
                                       args=(child_end, engine.data_dir, engine.device, engine._concurrent,
                                             engine.ahead, early, trains_on_gpu(engine.device)))
        self.process.start()
        child_end.close()
        self.inboxes: dict[int, queue.SimpleQueue] = {}
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.died: str | None = None
        self._hello: tuple | ConfigError | None = None
        self._hello_heard = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._send_all, name="normlab-engine-sender", daemon=True).start()
        threading.Thread(target=self._route_all, name="normlab-engine-router", daemon=True).start()

    def send(self, message: tuple) -> None:
        self.outbox.put(message)  # SimpleQueue.put may be called from a signal handler

    def hello(self) -> tuple:
        """(device name, runs at once) as the child reported them once started."""
        self._hello_heard.wait()
        if self._hello is None:
            raise EngineDied(self.died)
        if isinstance(self._hello, ConfigError):
            raise self._hello
        return self._hello

    def inbox(self, key: int) -> queue.SimpleQueue:
        with self._lock:
            inbox = self.inboxes[key] = queue.SimpleQueue()
            if self.died is not None:
                inbox.put(("died", self.died))
            return inbox

    def forget(self, key: int) -> None:
        with self._lock:
            self.inboxes.pop(key, None)

    def close(self) -> None:
        self.send(("close",))
        self.process.join(timeout=2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.outbox.put(None)

    def _send_all(self) -> None:
        while (message := self.outbox.get()) is not None:
            try:
                self.conn.send(message)
            except OSError:  # the child has ended: the router tells the runs
                return

    def _route_all(self) -> None:
        while True:
            try:
                key, *message = self.conn.recv()
            except (EOFError, OSError):
                break
            if key is None:  # the child's hello, or why it cannot train at all
                self._hello = tuple(message[1:]) if message[0] == "hello" else ConfigError(message[1])
                self._hello_heard.set()
                continue
            with self._lock:
                inbox = self.inboxes.get(key)
            if inbox is not None:  # else its run has ended on this side
                inbox.put(tuple(message))
        self.process.join(timeout=5)
        with self._lock:
            self.died = f"the engine process ended without a word (exit code {self.process.exitcode})"
            for inbox in self.inboxes.values():
                inbox.put(("died", self.died))
        self._hello_heard.set()
        self.conn.close()


# The kinds of a run's messages that more of its messages follow; any other kind is its last.
UNDER_WAY = ("built", "prepared", "started", "steps", "epoch")


class RemoteTrainer:
    """A run in the engine process, as the tracking side uses a Trainer: it reads the run's
    messages as they come (an epoch's record, with the state a checkpoint needs)."""

    def __init__(self, channel: _Channel, key: int, config: TrainConfig, state: bytes | None = None):
        self.config = config
        self.epoch = 0
        self.took_over: str | None = None  # the run whose model and steps the engine reused
        self._speedups = None  # the engine trainer's Speedups
        self._channel, self._key = channel, key
        self._inbox = channel.inbox(key)
        self._data: EngineData | None = None
        self._model = None
        self._state = state  # the last checkpoint's, as torch.save wrote it
        self._prepare_seconds: float | None = None
        self._mistakes = None
        self._stop_sent = False
        self._ended = False  # the engine has sent the run's last message

    @property
    def data(self) -> EngineData:
        """The data's facts, once the engine has built the run's trainer (raises its ConfigError or DataError)."""
        while self._data is None:
            self._handle(self._receive())
        return self._data

    @property
    def speedups(self):
        """The engine trainer's techniques (Speedups): they come with its data."""
        _ = self.data  # waits for the engine's "built" message, which brings both
        return self._speedups

    @property
    def model(self):
        """The model on the CPU: its summary before training, the trained weights after it."""
        if self._model is None:
            from normlab.engine.models import Net

            self._model = Net(self.config.dataset, self.config.norm, self.config.groups, self.config.dropout)
        return self._model

    def prepare(self) -> float:
        """Wait for the engine to compile and capture the run's step; the seconds that took it."""
        while self._prepare_seconds is None:
            self._handle(self._receive())
        seconds, self._prepare_seconds = self._prepare_seconds, 0.0
        return seconds

    def run_epoch(self, callbacks):
        """The engine's next epoch of the run, reported to callbacks as a Trainer reports its own."""
        while True:
            record = self._handle(self._receive(), callbacks)
            if record is not None:
                return record

    def mistakes(self, k: int = 10):
        """The final evaluation's most confident mistakes (k is the engine's: 10)."""
        while self._mistakes is None:
            self._handle(self._receive())
        return self._mistakes

    def state_dict(self) -> dict:
        """The engine's Trainer.state_dict() after the last reported epoch, on the CPU."""
        import torch

        return torch.load(io.BytesIO(self._state), map_location="cpu", weights_only=True)

    def request_stop(self, reason: str) -> None:
        """Ask the engine to stop the run after its current step (safe in a signal handler)."""
        if not self._stop_sent:
            self._stop_sent = True
            self._channel.send(("stop", self._key, reason))

    def close(self) -> None:
        """Done on this side: a run the engine still trains (the run ended here first) is stopped."""
        if not self._ended:
            self.request_stop("its run has ended")
        self._channel.forget(self._key)

    def _receive(self) -> tuple:
        message = self._inbox.get()
        if message[0] == "died":
            self._ended = True
            raise EngineDied(message[1])
        return message

    def _handle(self, message: tuple, callbacks=None):
        """Act on one message; an epoch's record is returned, errors are raised here."""
        kind, *body = message
        self._ended = kind not in UNDER_WAY
        if kind == "built":
            self._data, self.epoch, self.took_over, self._speedups = body
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
    """The engine's callbacks for one run: each event goes to the tracking side."""

    def __init__(self, send, key: int, trainer):
        self.send, self.key, self.trainer = send, key, trainer
        self.steps = 0

    def epoch_started(self, epoch: int, steps: int) -> None:
        self.send(self.key, "started", epoch, steps)

    def step_done(self) -> None:
        self.steps += 1
        if self.steps == STEPS_PER_REPORT:  # for a progress bar on the other side
            self.send(self.key, "steps", self.steps)
            self.steps = 0

    def epoch_done(self, record) -> None:
        import torch

        if self.steps:
            self.send(self.key, "steps", self.steps)
            self.steps = 0
        state = io.BytesIO()
        torch.save(self.trainer.state_dict(), state)
        self.send(self.key, "epoch", record, state.getvalue())


def _serve(conn, data_dir: str, device: str, concurrent: int | None, ahead, early: bool = False,
           on_gpu: bool = False) -> None:
    """The engine process: a TrainerPool whose threads train the runs the tracking side hands
    it, each reported on the one pipe under its key, until told to close (or the pipe ends).
    ``on_gpu``: the command found it trains on a GPU, so what CUDA and Triton first need starts
    on threads beside torch's import."""
    for signum in (signal.SIGINT, signal.SIGTERM):  # the command passes a stop on (module docstring)
        signal.signal(signum, signal.SIG_IGN)
    _no_semaphore_left_at_exit()
    sending = threading.Lock()

    def send(*message) -> None:
        with sending:
            conn.send(message)

    try:
        if on_gpu:
            start_beside_torch_import(device)
        from normlab.engine.fast.trainer_pool import TrainerPool

        try:
            pool = TrainerPool(device, data_dir, concurrent)
        except ConfigError as exc:  # a device there is not: every run is refused with the reason
            send(None, "refused", str(exc))
            runs = _Refusals(str(exc), send)
        else:
            if ahead:
                pool.prepare_ahead(*ahead)
            send(None, "hello", pool.device_name, pool.concurrent)
            runs = _Runs(pool, send)
            if ahead and early:
                runs.start_early(ahead[0][:pool.concurrent], ahead[1])
        while (message := conn.recv())[0] != "close":
            runs.act(*message)
    except (EOFError, OSError):
        pass  # the command has gone; nobody to tell
    finally:
        os._exit(0)  # at once: the runs' daemon threads and CUDA's teardown are not waited for


def _no_semaphore_left_at_exit() -> None:
    """This process ends with os._exit, so multiprocessing's exit handlers, which remove the
    semaphores it made, never run, and its resource tracker reports them leaked: a warning
    at the end of every compiled sweep. The one made is tqdm's lock, for Inductor's compile
    progress bars, where a thread lock serves one process."""
    try:
        import tqdm
    except ImportError:  # Inductor then draws no progress bars
        return
    tqdm.tqdm.set_lock(threading.RLock())


class _Refusals:
    """In an engine process that could not start its pool: each run handed over is refused."""

    def __init__(self, reason: str, send):
        self.reason, self.send = reason, send

    def act(self, kind: str, *body) -> None:
        if kind == "train":
            self.send(body[0], "config", self.reason)


@dataclass
class _EarlyRun:
    """A run the engine started before the command handed it over (EngineProcess's ``early``):
    its messages wait here until a handed-over run of the same config claims it."""

    config: TrainConfig
    epochs_ahead: int
    handed_to: int | None = None  # the key of the run that claimed it
    dropped: bool = False  # the command will not hand it over: stopped, its messages forgotten
    messages: list[tuple] = field(default_factory=list)


class _Runs:
    """In the engine process: the runs handed over, trained by ``pool.concurrent`` threads in
    the order they came, and the stops the tracking side asks for."""

    def __init__(self, pool, send):
        self.pool, self.send = pool, send
        self.waiting: queue.SimpleQueue = queue.SimpleQueue()
        self.stopped: dict[int, str] = {}  # run key -> why the tracking side stopped it, until its run ends
        self.training: dict[int, object] = {}  # run key -> its Trainer
        self.early: dict[int, _EarlyRun] = {}  # its own key (negative) -> a run started early
        self.claimed: dict[int, int] = {}  # a handed-over run's key -> the key of the early run it claimed
        self.lock = threading.Lock()
        for index in range(pool.concurrent):
            threading.Thread(target=self._serve_runs, name=f"normlab-engine-{index}", daemon=True).start()

    def start_early(self, configs: list[TrainConfig], epochs_ahead: dict[tuple, int]) -> None:
        """Train these runs from now on, before the command hands them over: it first opens
        the sweep's records and finds what is left (seconds of MLflow), while the GPU would idle."""
        from normlab.engine.config import steps_key

        for number, config in enumerate(configs, 1):
            ahead = epochs_ahead.get(steps_key(config), 0)
            self.early[-number] = _EarlyRun(config, ahead)
            self.waiting.put((-number, config, ahead, None))

    def act(self, kind: str, *body) -> None:
        if kind == "train":
            key, config, epochs_ahead, saved = body
            if saved is not None or not self._claim(key, config, epochs_ahead):
                self.waiting.put(body)
        elif kind == "keep early":
            self._keep_early(body[0])
        elif kind == "stop":
            key, reason = body
            with self.lock:
                key = self.claimed.get(key, key)
                self.stopped[key] = reason
                if key in self.training:
                    self.training[key].request_stop(reason)
        elif kind == "stop all":
            self.pool.request_stop(body[0])

    def _claim(self, key: int, config: TrainConfig, epochs_ahead: int) -> bool:
        """Give a handed-over run the early run of its config, if there is one: what that has
        reported so far goes out now under the run's key, the rest as it comes."""
        with self.lock:
            for early_key, run in self.early.items():
                if (run.handed_to is None and not run.dropped and run.config == config
                        and run.epochs_ahead == epochs_ahead):
                    run.handed_to, self.claimed[key] = key, early_key
                    for message in run.messages:
                        self.send(key, *message)
                    run.messages.clear()
                    return True
        return False

    def _keep_early(self, wanted: list[tuple[TrainConfig, int]]) -> None:
        with self.lock:
            for early_key, run in self.early.items():
                if run.handed_to is None and (run.config, run.epochs_ahead) not in wanted:
                    run.dropped = True
                    run.messages.clear()
                    self.stopped[early_key] = "the command does not train it now"
                    if early_key in self.training:
                        self.training[early_key].request_stop(self.stopped[early_key])

    def _send_run(self, key: int, *message) -> None:
        """Send one of a run's messages; an early run's wait until it is claimed."""
        if key in self.early:
            with self.lock:
                run = self.early[key]
                if run.handed_to is None:
                    if not run.dropped:
                        run.messages.append(message)
                    return
                key = run.handed_to
        self.send(key, *message)

    def _serve_runs(self) -> None:
        with self.pool.stream():
            while True:
                self._train(*self.waiting.get())

    def _train(self, key: int, config: TrainConfig, epochs_ahead: int, saved: bytes | None) -> None:
        """One run, start to end, every event sent under its key; never raises."""
        import torch

        from normlab.engine.train import TrainingStopped, fit

        with self.lock:
            reason = self.stopped.pop(key, self.pool.stop_reason)
        if reason is not None:
            return self._send_run(key, "stopped", f"not started: {reason}")
        try:
            state = None if saved is None else torch.load(io.BytesIO(saved), map_location="cpu", weights_only=True)
            trainer = self.pool.trainer(config, epochs_ahead, state)
        except ConfigError as exc:
            return self._send_run(key, "config", str(exc))
        except DataError as exc:
            return self._send_run(key, "data", str(exc))
        except BaseException:
            return self._send_run(key, "crashed", traceback.format_exc())
        finished = False
        try:
            with self.lock:
                self.training[key] = trainer
                if key in self.stopped:
                    trainer.request_stop(self.stopped[key])
            data = trainer.data
            self._send_run(key, "built", EngineData(data.spec, data.device, data.device_name, data.train_size,
                                                    data.test_size, data.digest, data.example_input()),
                           trainer.epoch, trainer.took_over, trainer.speedups)
            self._send_run(key, "prepared", trainer.prepare() if trainer.epoch < config.epochs else 0.0)
            try:
                result = fit(trainer, _Reporter(self._send_run, key, trainer))
            except TrainingStopped as exc:
                return self._send_run(key, "stopped", str(exc))
            except NonFiniteLoss as exc:
                return self._send_run(key, "diverged", str(exc))
            indices = [m.index for m in result.mistakes]
            self._send_run(key, "finished", result.mistakes, dict(zip(indices, data.test_images_of(indices))))
            finished = True
        except BaseException:
            self._send_run(key, "crashed", traceback.format_exc())
        finally:
            with self.lock:
                self.training.pop(key, None)
                self.stopped.pop(key, None)
            self.pool.release(trainer, finished)
