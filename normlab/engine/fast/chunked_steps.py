"""An epoch's steps launched a chunk at a time, on CUDA as captured CUDA graphs: the host
launches one graph replay per chunk (8 steps on a GPU) instead of ~60 kernels per step."""

from __future__ import annotations

import threading

import torch

from normlab.engine.step import TrainStep, run_and_undo

# One capture at a time in the process: capturing is rare and short, and another thread's
# capture or warm-up could otherwise be recorded into the wrong graph's memory pool.
_CAPTURE_LOCK = threading.Lock()
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}  # for captures asked for on a default stream


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream a capture runs on: the calling thread's own, or, where that is the default
    stream (which cannot be captured), one side stream per device, taken once.

    Never a new stream per capture: torch.cuda.Stream() hands out 32 pooled streams round
    robin, so the 33rd capture's "new" stream was another thread's, and that thread's work
    was captured into this graph or broke it (the failed runs of the 10-seed study,
    benchmarks/results/h200-2026-11-29-e2e.txt). normlab.sweep.worker gives each of its
    threads a stream no other thread holds."""
    current = torch.cuda.current_stream(device)
    if current != torch.cuda.default_stream(device):
        return current
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class EpochSteps:
    """An epoch's training steps, launched ``chunk`` consecutive steps at a time.

    Step i trains on rows ``slices[i]`` of the epoch's shuffled, augmented data at the rates
    the caller gives for it. A chunk's rows and rates are first copied into fixed buffers (one
    device copy per chunk), and its steps run over those. With ``graphed`` (CUDA) the steps
    of a chunk are one CUDA graph, captured once per chunk shape (an MNIST epoch at the GPU
    default has two: 8 full batches, and the last 5 with the short one) and replayed for every
    chunk of that shape: the host launches 59 replays an epoch instead of ~60 kernels a step,
    and waits for none of them. Without graphs the same steps run one by one over the same
    buffers.
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
        """Warm up each batch size on the capture stream (autograd and the compiled kernels set
        themselves up there; undone), then capture the chunk's steps inside the run's RNG
        scope, so replays advance the run's own generator. A run's graphs share a memory pool."""
        pool = next(iter(self.graphs.values())).pool() if self.graphs else None
        with _CAPTURE_LOCK, self.step.rng.active(), torch.cuda.device(self.x.device):
            caller = torch.cuda.current_stream()
            capturing = capture_stream(self.x.device)
            capturing.wait_stream(caller)
            with torch.cuda.stream(capturing):
                for size in set(sizes):
                    run_and_undo(self.step, self.x[:size], self.y[:size], self.rates[0], self.warmup_steps)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=capturing, capture_error_mode="thread_local"):
                self._steps(sizes)
            caller.wait_stream(capturing)
            capturing.synchronize()
        self.graphs[sizes] = graph
