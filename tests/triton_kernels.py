"""Testing normlab's Triton kernels. On CI's CPU, Triton's interpreter (TRITON_INTERPRET=1,
numpy on the CPU) runs the same kernel code, indexing and masking as a GPU; Triton reads the
switch when the kernels are defined, so that code runs in a process of its own. The
interpreter runs a kernel as Python, which lets through code that Triton's compiler refuses
(a helper whose two returns had different shapes landed so, in 3472648, and every GPU run
failed), so each kernel the interpreter ran is also compiled by Triton's front end, as for
an H100/H200, to Triton's IR: that needs no GPU. On a GPU, the profiler counts which kernels
a model launches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


# Run before a test's code in the interpreter: notes each kernel launch's kernel, argument
# types and compile-time constants (what Triton compiles a kernel for), in the file LAUNCHES names.
RECORD_LAUNCHES = """
import atexit, inspect, json, os, torch
from triton.runtime.interpreter import InterpretedFunction
launches = set()
run = InterpretedFunction.run

def recorded(self, *args, grid, warmup, **kwargs):
    params = inspect.signature(self.fn).parameters
    bound = dict(zip(params, args), **kwargs)
    constants, types = {}, {}
    for name, param in params.items():
        value = bound.get(name, param.default)
        if "constexpr" in str(param.annotation):
            constants[name] = value
        elif isinstance(value, torch.Tensor):
            pointee = {torch.float32: "fp32", torch.float64: "fp64", torch.int64: "i64", torch.uint8: "u8"}
            types[name] = "*" + pointee[value.dtype]
        else:
            types[name] = "fp32" if isinstance(value, float) else "i32"
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    launches.add(json.dumps([self.fn.__module__, self.fn.__name__, types, constants, options], sort_keys=True))
    return run(self, *args, grid=grid, warmup=warmup, **kwargs)

InterpretedFunction.run = recorded
atexit.register(lambda: open(os.environ["LAUNCHES"], "w").write(json.dumps(sorted(launches))))
"""

# Two costs of Triton's interpreter that check nothing, taken off in the interpreted
# process (3/4 of its time here): each call of a @triton.jit helper patches triton.language
# again (inspect.getmembers over its modules), though the launch it runs in has patched the
# same modules already; and each int32 add or multiply is redone in int64 for an overflow
# check whose device_assert does nothing outside Triton's debug mode, which the interpreter
# does not run in. The kernels run as before: the same interpreted operations, results and
# launches.
FASTER_INTERPRETER = """
import dataclasses
from triton.runtime import interpreter
if hasattr(interpreter, "_patch_lang") and hasattr(interpreter, "GridExecutor"):
    patch_lang, launch, patched = interpreter._patch_lang, interpreter.GridExecutor.__call__, set()

    def patch_lang_once_a_launch(fn):
        if id(fn.__globals__) in patched:
            return None  # a helper's call, which drops what this returns: its modules are patched
        scope = patch_lang(fn)
        patched.add(id(fn.__globals__))
        return scope

    def launch_patching_once(self, *args, **kwargs):
        patched.clear()
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.clear()
    interpreter._patch_lang, interpreter.GridExecutor.__call__ = patch_lang_once_a_launch, launch_patching_once
builder = getattr(interpreter, "interpreter_builder", None)
if builder is not None and not builder.options.debug:
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)
"""

# Compiles each noted launch with Triton's front end (Python to Triton IR) for an sm_90 GPU.
COMPILE_FOR_THE_GPU = """
import importlib, json, sys
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

target = GPUTarget("cuda", 90, 32)
backend = CUDABackend(target)
failures = []
for module, name, types, constants, options in map(json.loads, json.loads(open(sys.argv[1]).read())):
    fn = getattr(importlib.import_module(module), name)
    signature = {arg: "constexpr" if arg in constants else types[arg] for arg in fn.arg_names}
    source = ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in constants.items()})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    opts = backend.parse_options(options)
    try:
        source.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), context)
    except Exception as exc:
        failures.append(f"{name} {constants}: {exc}")
print(json.dumps(failures))
"""


def _python(code: str, *args: str, **env: str) -> str:
    """What ``code`` prints, run with normlab importable and ``env`` set; it must succeed."""
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def interpreted(code: str, cases: list, launches: Path) -> list:
    """The last line ``code`` prints, read as JSON: one result per case. The code runs in
    Triton's interpreter with the cases, as JSON, in sys.argv[1]; every kernel it launched
    must then also compile for the GPU (``launches``: a file for the list of them)."""
    out = _python(FASTER_INTERPRETER + RECORD_LAUNCHES + code, json.dumps(cases), TRITON_INTERPRET="1", LAUNCHES=str(launches))
    results = json.loads(out.strip().splitlines()[-1])
    assert len(results) == len(cases)
    assert len(json.loads(launches.read_text())) > 0
    failures = json.loads(_python(COMPILE_FOR_THE_GPU, str(launches)).strip().splitlines()[-1])
    assert not failures, failures
    return results


def kernel_launches(model: torch.nn.Module, x: torch.Tensor, kernels: tuple[str, ...]) -> dict[str, int]:
    """How many times a forward and backward of the model (as it is: train or eval mode)
    launched each of these kernels on the GPU."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model(x).sum().backward()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    return {kernel: names.count(kernel) for kernel in kernels}
