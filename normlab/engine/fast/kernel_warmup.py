"""On a fresh machine, the Triton kernels of a GPU engine's first runs compiled side by side in
helper processes, each for a share of the model's layers.

Triton compiles a kernel for each new specialization at its first launch, on the launching
thread, one after another, and much of it holds the interpreter's lock (eight compiles in
eight threads took 3.9 s against 4.6 s in one). On empty caches that is most of what
separates the classic sweep's 37-44 s from its 15 s on warm ones. Here, when the Triton
cache holds no mark of these runs' kernels, the engine starts helper processes
(NORMLAB_KERNEL_HELPERS) before its first warm-up: of H helpers, helper k builds each
variant's model with the Triton kernels on only for layers k, k + H, ... (torch's own for
the rest), and runs a training forward and backward and an evaluation at the runs' batch
shapes on random images. That compiles exactly the kernels the runs launch into Triton's
cache, side by side; the engine's warm-ups load them, then write the mark. The classic
sweep on empty caches took 25.4 and 26.2 s instead of 40.4 and 43.8 s, alternately on one
H200 (1.63x; h200-2026-12-01g-e2e-sweep1-cold-kernels-side-by-side.txt), where a process
started after the helpers added no kernel to Triton's cache (tests/test_kernel_warmup.py).

    python -m normlab.engine.fast.kernel_warmup SPECS_JSON SHARE HELPERS   # one helper
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from normlab.engine.config import TrainConfig
from normlab.engine.data import batch_slices
from normlab.engine.fast import kernel_helpers
from normlab.engine.registry import ARCHITECTURES

HELPER_TIMEOUT_S = 300


@dataclass(frozen=True)
class KernelSpec:
    """What a run's Triton kernels depend on: its model and the shapes of its batches."""
    dataset: str
    norm: str
    groups: int
    dropout: float
    batch_sizes: tuple[int, ...]  # training: the full batch and the last one
    eval_batch_sizes: tuple[int, ...]
    triton_norms: bool


def spec(config: TrainConfig, train_size: int, test_size: int, eval_batch_size: int,
         triton_norms: bool) -> KernelSpec:
    def sizes(total: int, batch: int) -> tuple[int, ...]:  # as training and evaluation slice their data
        return tuple(sorted({s.stop - s.start for s in batch_slices(total, batch)}))
    return KernelSpec(config.dataset, config.norm, config.groups, config.dropout,
                      sizes(train_size, config.batch_size), sizes(test_size, eval_batch_size), triton_norms)


def _triton_cache() -> Path | None:
    """Triton's cache folder (TRITON_CACHE_DIR or its default), as Triton 3.4 and later say it."""
    try:
        from triton import knobs
        return Path(knobs.cache.dir)
    except ImportError:
        return None


def mark(specs: list[KernelSpec], device: torch.device) -> Path | None:
    """The file in Triton's cache that says these runs' kernels are in it (None without Triton)."""
    from normlab.engine.fast.precompiled import source_hash

    cache = _triton_cache()
    if cache is None:
        return None
    import triton
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    described = (sorted(map(repr, set(specs))), torch.__version__, triton.__version__, where, source_hash())
    return cache / f"normlab-kernels-{hashlib.sha256(repr(described).encode()).hexdigest()[:24]}"


def compile_side_by_side(specs: list[KernelSpec], device: torch.device) -> bool:
    """Where the Triton cache has no mark of ``specs``' kernels, compile them in helper
    processes side by side, and wait for them; returns whether it did. A helper that fails
    leaves its kernels to the runs, which compile what they do not find."""
    helpers = kernel_helpers()
    marked = mark(specs, device)
    if not helpers or marked is None or marked.exists():
        return False
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[3]),
                                                                    os.environ.get("PYTHONPATH")])))
    if device.index is not None:
        env["NORMLAB_KERNEL_WARMUP_DEVICE"] = str(device.index)
    payload = json.dumps([asdict(s) for s in specs])
    started = [subprocess.Popen([sys.executable, "-m", __name__, payload, str(k), str(helpers)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for k in range(helpers)]
    for helper in started:
        try:
            helper.wait(timeout=HELPER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            helper.kill()
    return True


def write_mark(specs: list[KernelSpec], device: torch.device) -> None:
    marked = mark(specs, device)
    if marked is not None:
        marked.parent.mkdir(parents=True, exist_ok=True)
        marked.touch()


def share_of_layers(model: torch.nn.Module, share: int, helpers: int) -> list[torch.nn.Module]:
    """Turn the Triton kernels on only for this helper's share of the model's layers; returns it."""
    layers = [m for m in model.modules() if hasattr(m, "triton_kernels")]
    for i, layer in enumerate(layers):
        layer.triton_kernels = i % helpers == share
    return [layer for layer in layers if layer.triton_kernels]


def run_share(specs: list[KernelSpec], share: int, helpers: int, device: torch.device) -> None:
    """Launch this helper's share of each spec's kernels: a training forward and backward at
    each batch size and an evaluation forward at each evaluation batch size."""
    from normlab.engine.fast.deferred_dynamo import defer_dynamo_imports
    from normlab.engine.fast.triton_norms import use_triton_norms
    from normlab.engine.models import Net

    defer_dynamo_imports()  # the helper compiles Triton's kernels, never the step
    for s in specs:
        arch = ARCHITECTURES[s.dataset]
        model = Net(s.dataset, s.norm, s.groups, s.dropout).to(device)
        use_triton_norms(model, s.triton_norms)
        share_of_layers(model, share, helpers)
        model.train()
        for batch in s.batch_sizes:
            x = torch.randn(batch, arch.in_channels, arch.image_size, arch.image_size, device=device)
            model(x).sum().backward()
        model.eval()
        with torch.no_grad():
            for batch in s.eval_batch_sizes:
                model(torch.randn(batch, arch.in_channels, arch.image_size, arch.image_size, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    specs_json, share_arg, helpers_arg = sys.argv[1:4]
    index = os.environ.get("NORMLAB_KERNEL_WARMUP_DEVICE")
    where = torch.device("cuda", int(index)) if index else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run_share([KernelSpec(**{**s, "batch_sizes": tuple(s["batch_sizes"]),
                             "eval_batch_sizes": tuple(s["eval_batch_sizes"])}) for s in json.loads(specs_json)],
              int(share_arg), int(helpers_arg), where)
