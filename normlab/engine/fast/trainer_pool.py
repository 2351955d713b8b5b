"""A device's trainers across many runs: the engine side of a sweep's worker.

On a GPU a run's training takes seconds, while loading the data and compiling and capturing
its step take longer. A pool pays those once per process: it keeps each dataset on its
device, and a run that finishes leaves its model, compiled step and captured CUDA graphs to
the pool's next run of that variant and batch size (Trainer's ``warm``); an engine process
prepares trainers for the first runs while its command starts (``prepare_ahead``). Several
runs may train at once, each in a thread of its own holding a CUDA stream of its own (``stream``).
The pool knows nothing of MLflow: a sweep's worker (normlab.sweep.worker) or an engine
process (engine_process.py) asks it for trainers and trains them.
"""

from __future__ import annotations

import collections
import os
import threading
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch

from normlab.engine.config import TrainConfig, steps_key
from normlab.engine.data import DeviceData, load_raw
from normlab.engine.fast import Speedups, triton_build_hash
from normlab.engine.fast.kernel_warmup import KernelSpec, compile_side_by_side, write_mark
from normlab.engine.fast.kernel_warmup import spec as kernel_spec
from normlab.engine.train import Trainer, resolve_device
from normlab.errors import ConfigError

# Runs a GPU trains at once, each in a thread with its own CUDA stream: one run of this small
# model leaves most of the chip idle. On an H200 the 10-seed study (30 runs, warm) took 112.0 s
# three at once against 159.9 s one after another, 30 of 30 finished both ways
# (benchmarks/results/h200-2026-11-30-e2e-10seeds-x3-vs-x1.txt). Once its runs trained in an
# engine process, tracked in another, six at once took 60.8 and 63.2 s against 68.7 and 67.0 s
# for three (h200-2026-11-30g-e2e-10seeds-x3-vs-x6.txt, alternately; 30 of 30 each time).
# Earlier, 5 of 30 captures failed three at once: a new pooled stream per capture was, after
# 32 captures, another thread's (``stream`` and chunked_steps.capture_stream rule that out).
# A CPU run uses every core alone.
RUNS_PER_GPU = 6
POOLED_STREAMS = 32  # torch's pool of CUDA streams per device and priority (c10/cuda/CUDAStream.h)
HIGH_PRIORITY = -1  # the pool a worker's threads take their streams from

# A run that finishes leaves its trainer to the next run of the same steps_key (variant, L1,
# dropout, batch size), which takes over its model, compiled step and captured CUDA graphs
# with its own weights, optimizer and random streams instead of capturing, and compiling on a
# new model, again; NORMLAB_REUSE_STEPS=0 turns it off. Measured: docs/speed.md. Up to
# IDLE_TRAINERS_PER_RUN_AT_ONCE idle trainers per run trained at once are kept (their graphs
# hold GPU memory); the oldest go first.
IDLE_TRAINERS_PER_RUN_AT_ONCE = 4


def reuse_steps() -> bool:
    """Whether a pool's runs take over finished runs' trainers: NORMLAB_REUSE_STEPS, 1 (default) or 0."""
    value = os.environ.get("NORMLAB_REUSE_STEPS", "1")
    if value not in ("0", "1"):
        raise ConfigError(f"NORMLAB_REUSE_STEPS={value!r}; valid: 1 (reuse, the default) or 0")
    return value == "1"


def runs_per_gpu() -> int:
    """How many runs a GPU trains at once: NORMLAB_RUNS_PER_GPU, else RUNS_PER_GPU."""
    value = os.environ.get("NORMLAB_RUNS_PER_GPU", str(RUNS_PER_GPU))
    if not value.isdigit() or not 1 <= int(value) <= POOLED_STREAMS:
        raise ConfigError(f"NORMLAB_RUNS_PER_GPU={value!r}; valid: a whole number from 1 to {POOLED_STREAMS}")
    return int(value)


class TrainerPool:
    """Trainers on one device for run after run, keeping data and compiled steps warm."""

    def __init__(self, device: str | torch.device, data_dir: str, concurrent: int | None = None,
                 name: str | None = None):
        """``concurrent``: runs trained at once (default: runs_per_gpu() on a GPU, else 1);
        ``name`` tells this pool from others on the same device (CPU workers sharing the cores)."""
        self.device = resolve_device(str(device))
        self.data_dir = data_dir
        self.name = name
        self.concurrent = concurrent or (runs_per_gpu() if self.device.type == "cuda" else 1)
        self.datasets: dict[str, DeviceData] = {}
        self.compiled: set[tuple] = set()  # steps_keys compiled in this process: later runs reuse them
        self.reuse_steps = reuse_steps()
        self.idle: collections.OrderedDict[tuple, list[Trainer]] = collections.OrderedDict()  # steps_key -> finished
        self.preparing: collections.Counter[tuple] = collections.Counter()  # steps_key -> warm-ups not yet ready
        self.warm_ups: weakref.WeakSet[Trainer] = weakref.WeakSet()  # prepared ahead, trained nothing
        self.active: list[Trainer] = []
        self.stop_reason: str | None = None
        self.lock = threading.Lock()
        self.kept = threading.Condition(self.lock)  # notified when a trainer becomes idle, or a warm-up fails
        self.streams: list[torch.cuda.Stream] = []  # on a GPU: every stream this pool took
        self.idle_streams: list[torch.cuda.Stream] = []  # ...and those no thread holds now
        if self.device.type == "cuda":  # its kernels are Triton's, compiled or not
            triton_build_hash.start()

    @property
    def device_name(self) -> str:
        """The device as the machine numbers it (a pool pinned with CUDA_VISIBLE_DEVICES=3
        sees its GPU as cuda:0, and calls it cuda:3), and the pool's name if it has one."""
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            visible = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
            number = visible[index] if index < len(visible) else index
            where = f"cuda:{number} ({torch.cuda.get_device_name(index)})"
        else:
            where = self.device.type
        return f"{where} {self.name}" if self.name else where

    def data(self, dataset: str) -> DeviceData:
        """The dataset on this pool's device, loaded on first use (one thread at a time)."""
        with self.lock:
            if dataset not in self.datasets:
                self.datasets[dataset] = DeviceData(load_raw(dataset, self.data_dir), self.device)
                if self.device.type == "cuda":  # copied on this thread's stream; others read it next
                    torch.cuda.synchronize(self.device)
                    threading.Thread(target=self._warm_up_first_epoch, args=(self.datasets[dataset],),
                                     name="normlab-first-epoch-warm-up", daemon=True).start()
            return self.datasets[dataset]

    def _warm_up_first_epoch(self, data: DeviceData) -> None:
        """Shuffle and augment one epoch of ``data`` on a stream of this pool's and a generator
        of its own (on a thread, once the data is on the GPU): what those launches first set up
        (cuBLAS, for affine_grid's batched product; randperm's and grid_sample's kernels, which
        CUDA loads at their first launch) is then ready for a run's first epoch, which took 0.40 s
        instead of 0.19 s on an H200. The 0.2 s pass beside the trainer's build and prepare,
        which took as long as before (h200-2026-12-02b-first-epoch.txt): torch's calls let go of
        the interpreter's lock. No run's generator is touched."""
        with self.stream():
            data.training_epoch(torch.Generator(data.device).manual_seed(0))
            if data.device.type == "cuda":
                torch.cuda.current_stream().synchronize()

    def trainer(self, config: TrainConfig, epochs_ahead: int = 0, state: dict | None = None) -> Trainer:
        """A trainer for ``config``, taking over an idle one of its steps_key where there is
        one (its ``took_over`` names that run), and continuing from ``state`` (a checkpoint)
        if given. Compiles when ``epochs_ahead`` of this steps_key pay for it, or when an
        earlier run here compiled it. A stop request reaches it until ``release``."""
        data = self.data(config.dataset)
        key = steps_key(config)
        ahead = float("inf") if key in self.compiled else max(epochs_ahead, config.epochs)
        # The warm-ups on their way first, rather than each run as soon as its own is ready: a run
        # training in this process takes the interpreter's lock from the warm-ups still compiling
        # and capturing beside it (a second seed's capture took 1.1-1.6 s beside training runs,
        # 0.2 s alone), so six runs trained at once only from 17.3 s of the ten-seed sweep
        # (h200-2026-12-01c-sweep10-stamped.txt).
        with self.lock:
            self.kept.wait_for(lambda: not sum(self.preparing.values()))
            idle = self.idle.get(key)
            warm = idle.pop() if idle else None
        trainer = self._built(config, data, ahead, warm)
        if warm in self.warm_ups:
            trainer.took_over = f"the warm-up of {warm.config.run_name}"
        if state is not None:
            trainer.load_state_dict(state)
        with self.lock:
            self.active.append(trainer)
            if self.stop_reason is not None:
                trainer.request_stop(self.stop_reason)
        return trainer

    def prepare_ahead(self, configs: list[TrainConfig], epochs_ahead: dict[tuple, int]) -> threading.Thread:
        """Build and prepare (compile, capture) a trainer for each of the first ``concurrent``
        ``configs`` (the runs to come, in their order) in a thread, returned started, and keep
        each for a run of its steps_key to take over: an engine process does this while its
        command starts the runs' tracking. ``epochs_ahead``: per steps_key, as ``trainer``
        takes it. From this call on, a run waits until every warm-up is ready (``trainer``
        says why); a warm-up that fails leaves its run to prepare its own."""
        firsts = configs[:self.concurrent]
        with self.lock:
            self.preparing.update(steps_key(c) for c in firsts)
        thread = threading.Thread(target=self._prepare, args=(firsts, epochs_ahead), name="normlab-prepare-ahead",
                                  daemon=True)
        thread.start()
        return thread

    def _prepare(self, configs: list[TrainConfig], epochs_ahead: dict[tuple, int]) -> None:
        planned = [(config, max(epochs_ahead.get(steps_key(config), 0), config.epochs)) for config in configs]
        try:  # on a fresh machine, their Triton kernels compiled side by side first
            kernels = self._kernel_specs(planned)
            if kernels:
                compile_side_by_side(kernels, self.device)
        except Exception:  # the warm-ups compile what they need themselves
            kernels = []
        ready = 0
        with self.stream():
            for config, ahead in planned:
                key = steps_key(config)
                try:
                    trainer = self._built(config, self.data(config.dataset), ahead)
                    trainer.prepare()
                    self.warm_ups.add(trainer)
                    self.release(trainer, finished=True)
                    ready += 1
                except Exception:  # met again, and reported, by the run that needs it
                    pass
                finally:
                    with self.lock:
                        self.preparing[key] -= 1
                        self.kept.notify_all()
        if kernels and ready == len(configs):
            write_mark(kernels, self.device)

    def _kernel_specs(self, planned: list[tuple[TrainConfig, float]]) -> list[KernelSpec]:
        """What the Triton kernels of these runs (each with its epochs ahead) depend on, where
        they launch any (a GPU)."""
        specs = []
        for config, ahead in planned:
            speedups = Speedups.default(self.device, ahead, config)
            if speedups.triton_convs:
                data = self.data(config.dataset)
                specs.append(kernel_spec(config, data.train_size, data.test_size, speedups.eval_batch_size,
                                         speedups.triton_norms))
        return specs

    def _built(self, config: TrainConfig, data: DeviceData, epochs_ahead: float,
               warm: Trainer | None = None) -> Trainer:
        """A new Trainer; a compiled one's steps_key is noted, so later runs of it compile too."""
        if self.device.type == "cuda":
            triton_build_hash.wait()  # before its first kernel
        trainer = Trainer(config, data, epochs_ahead=epochs_ahead, warm=warm)
        if trainer.speedups.compile:
            self.compiled.add(steps_key(config))
        return trainer

    def release(self, trainer: Trainer, finished: bool) -> None:
        """The run of ``trainer`` has ended; a finished one's trainer is kept for a later run of
        its steps_key, the oldest kept going when there are more than
        IDLE_TRAINERS_PER_RUN_AT_ONCE per run trained at once."""
        with self.lock:
            if trainer in self.active:
                self.active.remove(trainer)
            if not (finished and self.reuse_steps):
                return
            self.idle.setdefault(steps_key(trainer.config), []).append(trainer)
            self.idle.move_to_end(steps_key(trainer.config))
            self.kept.notify_all()
            while sum(map(len, self.idle.values())) > IDLE_TRAINERS_PER_RUN_AT_ONCE * self.concurrent:
                oldest = next(iter(self.idle))
                self.idle[oldest].pop(0)
                if not self.idle[oldest]:
                    del self.idle[oldest]

    def request_stop(self, reason: str) -> None:
        """Stop every active run at the end of its current step, and every later one at once."""
        with self.lock:
            self.stop_reason = reason
            for trainer in self.active:
                trainer.request_stop(reason)

    @contextmanager
    def stream(self) -> Iterator[None]:
        """A context for one thread of runs: on a GPU, a CUDA stream that no other thread holds
        meanwhile, on which its runs train and capture their graphs.

        torch.cuda.Stream() hands out 32 pooled streams round robin, so a stream taken anew per
        thread or per run is sooner or later one that another thread still trains on. The
        pool keeps the streams it took (from the high-priority pool, which nothing else in
        normlab draws from) and lends each to one thread at a time."""
        if self.device.type != "cuda":
            yield
            return
        with self.lock:
            stream = self.idle_streams.pop() if self.idle_streams else self._new_stream()
        try:
            with torch.cuda.stream(stream):
                yield
        finally:
            with self.lock:
                self.idle_streams.append(stream)

    def _new_stream(self) -> torch.cuda.Stream:
        """A pooled stream that none of this pool's streams already is."""
        held = {s.cuda_stream for s in self.streams}
        for _ in range(POOLED_STREAMS):
            stream = torch.cuda.Stream(self.device, priority=HIGH_PRIORITY)
            if stream.cuda_stream not in held:
                self.streams.append(stream)
                return stream
        raise RuntimeError(f"a pool cannot hold more than {POOLED_STREAMS} CUDA streams "
                           f"({len(self.streams)} held)")
