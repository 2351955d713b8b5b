"""What GPUs this machine has, known without importing torch (1.4-2.7 s): CUDA's driver
library, NVML (which also counts the GPUs CUDA_VISIBLE_DEVICES hides) and the installed
torch's build. The engine process decides from it where the engine runs, and the commands
refuse a `--device` that names no GPU here before anything starts (resolve_device, in
engine/train.py, is the same check after torch's import)."""

from __future__ import annotations

import ctypes
import importlib.util
import os
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
        raise NoGpuHere(device, gpus, hidden_gpus_note(gpus))


def hidden_gpus_note(cuda_gpus: int) -> str:
    """Where CUDA_VISIBLE_DEVICES shows CUDA fewer GPUs than the machine has, a sentence
    saying so ('' otherwise): a value naming a GPU twice (0,0) or one that is not there
    leaves CUDA none, and `auto` would quietly train on the CPU."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    machine = machine_gpus() if value is not None else 0
    if machine <= cuda_gpus:
        return ""
    return (f"CUDA_VISIBLE_DEVICES={value!r} shows CUDA {cuda_gpus} of this machine's {machine} "
            f"GPU{'s' if machine > 1 else ''}: name each of 0 to {machine - 1} at most once, or unset it for all")


def auto_on_the_cpu_note(device: str) -> str:
    """For ``--device auto`` where CUDA_VISIBLE_DEVICES hides every GPU of a machine that has
    some, a sentence saying that this trains on the CPU, and why ('' otherwise)."""
    if device != "auto" or "CUDA_VISIBLE_DEVICES" not in os.environ or not torch_has_cuda() or cuda_devices():
        return ""
    hidden = hidden_gpus_note(0)
    return f"--device auto trains on the CPU: {hidden}" if hidden else ""


def machine_gpus() -> int:
    """How many NVIDIA GPUs the machine has, from NVML (the library nvidia-smi reads), which
    ignores CUDA_VISIBLE_DEVICES; 0 without the NVIDIA driver."""
    count = ctypes.c_uint(0)
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return 0
    except (OSError, AttributeError):
        return 0
    try:
        return count.value if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0 else 0
    finally:
        nvml.nvmlShutdown()


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
