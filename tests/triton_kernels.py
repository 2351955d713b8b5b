"""Testing normlab's Triton kernels. On CI's CPU, Triton's interpreter (TRITON_INTERPRET=1,
numpy on the CPU) runs the same kernel code, indexing and masking as a GPU; Triton reads the
switch when the kernels are defined, so that code runs in a process of its own. On a GPU,
the profiler counts which kernels a model launches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def interpreted(code: str, cases: list) -> list:
    """The last line ``code`` prints, read as JSON: one result per case. The code runs in
    Triton's interpreter with the cases, as JSON, in sys.argv[1]."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == len(cases)
    return results


def kernel_launches(model: torch.nn.Module, x: torch.Tensor, kernels: tuple[str, ...]) -> dict[str, int]:
    """How many times a forward and backward of the model (as it is: train or eval mode)
    launched each of these kernels on the GPU."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model(x).sum().backward()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    return {kernel: names.count(kernel) for kernel in kernels}
