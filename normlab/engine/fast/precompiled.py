"""The compiled step's functions kept on disk whole, so a later process loads them instead of
compiling them again.

On warm caches ``torch.compile`` still traces the step with Dynamo, builds its guards and
loads Inductor's cached kernels in every process: the ten-seed sweep's engine prepared its
first three variants and a second seed in 6.9-7.2 s (warm caches), and its GPU idled
meanwhile. ``aot_compile`` (fullgraph) keeps all of that in one file per function and
argument shape, which a new process loads: a loaded step trains the same numbers as a
compiled one, and the same four were prepared in 4.0-4.1 s (on empty caches, compiling and
saving took 55.5 s against 54.9 s for compiling). Ten seeds 1.07x end to end: 56.6 and
57.7 s against 60.3 and 61.8 s, alternately (h200-2026-12-01g-first-compile-precompiled.txt,
h200-2026-12-01g-e2e-10seeds-precompiled.txt).

A file is keyed by everything its compiled code depends on: the function, what its arguments
are (shapes, strides, dtypes, the model's layers), torch's and Triton's versions, the
device (on a CPU, the thread count), Inductor's options (and its settings in the environment) and the engine's source.
It lives in Inductor's cache folder (``TORCHINDUCTOR_CACHE_DIR``), so emptying the compile
caches empties it too. Where Dynamo cannot compile a function whole (a graph break: the CPU's
own dropout draws with ``random_``), the function is compiled by ``torch.compile`` as before.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import threading
from pathlib import Path
from typing import Any, Callable

import torch

from normlab.engine.fast import deferred_dynamo

_LOCK = threading.Lock()  # one process loads or compiles one file at a time
_LOADED: dict[str, Callable] = {}  # file key -> its compiled function, for every TrainStep of the process
ENGINE_SOURCE = Path(__file__).resolve().parents[1]  # normlab/engine: the code a compiled step is traced from


def _describe(value: Any) -> Any:
    """What a compiled function's code depends on in one argument."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), str(value.dtype), value.device.type,
                value.requires_grad)
    if isinstance(value, torch.nn.Module):  # its layers, their switches (triton_kernels), its state's shapes
        switches = tuple((name, sorted((k, v) for k, v in vars(layer).items()
                                       if isinstance(v, (bool, int, float, str, type(None)))))
                         for name, layer in value.named_modules())
        return ("module", repr(value), switches,
                tuple((name, tuple(t.shape), str(t.dtype)) for name, t in value.state_dict().items()))
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value)
    return repr(value)


@functools.cache
def source_hash() -> str:
    """The engine's source (normlab/engine), which compiled steps and kernels are built from."""
    digest = hashlib.sha256()
    for path in sorted(ENGINE_SOURCE.rglob("*.py")):
        digest.update(str(path.relative_to(ENGINE_SOURCE)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _environment(device: torch.device, options: dict) -> tuple:
    """The process's side of the key: versions, device, precision switches, Inductor's options
    (ours, and those set in the environment), source."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        where = (torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))
    else:  # Inductor's CPU code is built for the process's thread count, which Dynamo guards
        where = (platform.machine(), torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())
    settings = sorted((k, v) for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"
                      and k.startswith(("TORCHINDUCTOR_", "TORCHDYNAMO_", "TORCH_COMPILE_")))
    return (torch.__version__, triton_version, where, torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32, sorted(options.items()), settings, source_hash())


def folder() -> Path:
    """Where the files live: beside Inductor's own cache."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    return Path(cache_dir()) / "normlab-precompiled"


class Precompiled:
    """``function`` compiled whole for each new shape of its arguments: loaded from its file
    when one was saved, else compiled with ``aot_compile`` and saved; where that cannot
    compile it whole, ``torch.compile`` (which Dynamo may split at graph breaks) instead.
    ``loads`` and ``saves`` count this object's files read and written."""

    def __init__(self, function: Callable, options: dict):
        deferred_dynamo.restore()  # torch's own Dynamo markers, as Dynamo compiles in this process
        self.function = function
        self.options = options
        self.by_shape: dict[str, Callable] = {}
        self.fallback: Callable | None = None  # torch.compile's, once aot_compile could not
        self.loads = self.saves = 0

    def __call__(self, *args):
        if self.fallback is not None:
            return self.fallback(*args)
        key = self._key(args)
        compiled = self.by_shape.get(key)
        if compiled is None:
            with _LOCK:
                compiled = _LOADED.get(key) or self._load(key, args) or self._compile(key, args)
            self.by_shape[key] = compiled
        return compiled(*args)

    def _key(self, args: tuple) -> str:
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        described = (self.function.__module__, self.function.__qualname__, _describe(args),
                     _environment(device, self.options))
        return hashlib.sha256(repr(described).encode()).hexdigest()[:32]

    def _load(self, key: str, args: tuple) -> Callable | None:
        path = folder() / f"{key}.bin"
        if not path.exists():
            return None
        try:
            with open(path, "rb") as file:
                compiled = torch.compiler.load_compiled_function(file)
            if not compiled.guard_check(*args):  # something the key missed: compiled anew
                return None
        except Exception:  # written by another version, or damaged: compiled and written anew
            return None
        self.loads += 1
        _LOADED[key] = compiled
        return compiled

    def _compile(self, key: str, args: tuple) -> Callable:
        import torch._dynamo

        try:
            with torch._dynamo.config.patch(enable_aot_compile=True):
                compiled = torch.compile(self.function, fullgraph=True, dynamic=False,
                                         options=self.options).aot_compile((args, {}))
        except torch._dynamo.exc.BackendCompilerFailed:
            raise  # Inductor cannot build kernels here: TrainStep trains uncompiled
        except (torch._dynamo.exc.TorchDynamoException, AttributeError):  # a graph break; a torch without it
            # every run, variant and batch shape is then a recompile of the same function: allow them all
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
            self.fallback = torch.compile(self.function, dynamic=False, options=self.options)
            return self.fallback
        path = folder() / f"{key}.bin"
        temporary = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            compiled.save_compiled_function(str(temporary))
            os.replace(temporary, path)  # whole or not at all, for processes loading it meanwhile
            self.saves += 1
        except Exception:  # not kept (a read-only cache, something it cannot serialize): compiled again next time
            temporary.unlink(missing_ok=True)
        _LOADED[key] = compiled
        return compiled
