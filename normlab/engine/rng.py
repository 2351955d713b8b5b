"""Each run's own random streams, so runs trained side by side draw what they would alone.

A run has two streams, both from its seed: weight initialisation and dropout (``RunRNG``,
seeded with the seed itself), and shuffling and augmentation (seeded with ``data_seed``).

Weight initialisation and dropout draw from torch's default generators, which a process
shares. A run therefore keeps its own states of them (CPU, and CUDA on a GPU) and swaps
them in, under one process-wide lock, whenever it draws: ``with run_rng.active(): ...``.
On CUDA the swap is ``graphsafe_set_state``, so a CUDA graph captured inside ``active()``
is bound to the run's state and advances it on every replay, whatever another run's
thread has swapped in meanwhile. Alone in a process this draws exactly the numbers that
``torch.manual_seed(seed)`` followed by the same calls would.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

_LOCK = threading.RLock()


class RunRNG:
    """The default generators' states of one run, seeded with its seed."""

    def __init__(self, seed: int, device: torch.device):
        self.device = device
        self.cpu = torch.Generator().manual_seed(seed).get_state()
        self.cuda = torch.Generator(device=device).manual_seed(seed) if device.type == "cuda" else None
        self._depth = 0  # active() nests: only the outermost level swaps

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within: torch's default generators are this run's; other runs' threads wait."""
        with _LOCK:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            cpu_before = torch.get_rng_state()
            torch.set_rng_state(self.cpu)
            default_cuda = torch.cuda.default_generators[self._cuda_index()] if self.cuda is not None else None
            cuda_before = default_cuda.graphsafe_get_state() if default_cuda is not None else None
            if default_cuda is not None:
                default_cuda.graphsafe_set_state(self.cuda.graphsafe_get_state())
            self._depth = 1
            try:
                yield
            finally:
                self._depth = 0
                self.cpu = torch.get_rng_state()
                torch.set_rng_state(cpu_before)
                if default_cuda is not None:
                    default_cuda.graphsafe_set_state(cuda_before)

    def reseed(self, seed: int) -> "RunRNG":
        """Start this run's streams again from ``seed``, drawing what RunRNG(seed) would. The
        CUDA generator stays the same object, since CUDA graphs captured inside ``active()`` are
        bound to it: a worker's next run replays them with its own seed (Trainer's ``warm``)."""
        with _LOCK:
            self.cpu = torch.Generator().manual_seed(seed).get_state()
            if self.cuda is not None:
                self.cuda.manual_seed(seed)
        return self

    def _cuda_index(self) -> int:
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def state_dict(self) -> dict:
        state = {"torch": self.cpu.clone()}
        if self.cuda is not None:
            state["cuda"] = self.cuda.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        with _LOCK:
            self.cpu = state["torch"].clone()
            if self.cuda is not None:
                self.cuda.set_state(state["cuda"])


def data_seed(seed: int) -> int:
    """The seed of a run's data stream (shuffling, augmentation): a child of ``seed`` by
    numpy's SeedSequence, independent of the stream ``seed`` itself starts. Seeded alike, one
    generator algorithm draws the same numbers: on the CPU, epoch 1's rotation angles were
    the weights' kaiming-uniform draws, and on a GPU the data's and dropout's generators
    drew one Philox stream."""
    return int(np.random.SeedSequence(seed).spawn(1)[0].generate_state(1, np.uint64)[0])
