"""What GPUs this machine has, known without importing torch (1.4-2.7 s): CUDA's driver
library and the installed torch's build. The engine process decides from it where the
engine runs, and the commands refuse a `--device` that names no GPU here before anything
starts (resolve_device, in engine/train.py, is the same check after torch's import)."""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

from normlab.errors import NoGpuHere


def refuse_a_missing_gpu(device: str) -> None:
    """NoGpuHere at once where ``--device cuda`` (or cuda:N) names a GPU this machine lacks: a
    torch without CUDA, or too few GPUs for CUDA's driver. resolve_device says the same after
    torch's import, but by then the engine and results processes had started: 5.5-7.7 s of a
    refusal on the 2-core CPU instead of 0.1 s (0.3 s on an H200 host). A ROCm torch, whose
    GPUs CUDA's driver does not see, is left to resolve_device."""
    index = cuda_index(device)
    if index is None or _torch_library("libtorch_hip*"):
        return
    gpus = cuda_devices() if torch_has_cuda() else 0
    if index >= gpus:
        raise NoGpuHere(device, gpus)


def cuda_index(device: str) -> int | None:
    """The GPU a ``--device`` names: N for cuda:N, torch's 0 for cuda; None for auto, cpu or
    anything else (resolve_device judges those)."""
    if device == "cuda":
        return 0
    return int(device[5:]) if device.startswith("cuda:") and device[5:].isdigit() else None


def torch_has_cuda() -> bool:
    """Whether the installed torch is a CUDA build (a CPU-only wheel on a GPU machine would
    train on the CPU)."""
    return _torch_library("libtorch_cuda*")


def _torch_library(pattern: str) -> bool:
    """Whether the installed torch ships a library matching ``pattern``, from its files:
    finding a package does not import it."""
    spec = importlib.util.find_spec("torch")
    return bool(spec and spec.origin and any((Path(spec.origin).parent / "lib").glob(pattern)))


def cuda_driver() -> ctypes.CDLL | None:
    """CUDA's driver library, initialized; None where there is none (no driver, or no GPU it
    can start). Imports no torch."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        return driver if driver.cuInit(0) == 0 else None
    except (OSError, AttributeError):
        return None


def cuda_devices() -> int:
    """How many GPUs CUDA's driver sees (0 without one), through the driver library itself:
    about a millisecond, where `torch.cuda.is_available()` first needs torch's 1.4 s import."""
    driver, count = cuda_driver(), ctypes.c_int(0)
    if driver is None or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value
