"""Dynamo imported by the first compile, not by the first optimizer or custom op.

torch marks some of its functions for Dynamo to skip (``torch._disable_dynamo``: the
optimizer's add_param_group, zero_grad, state_dict and load_state_dict; every custom op's
kernels), and that marker imports Dynamo at the function's first call to build the skipping
version: 1.1 s on an H200 and 1.3-1.4 s on the 2-core CPU, in every run's process, where an
uncompiled run never uses Dynamo. Until Dynamo is imported nothing can be compiling, so the
skipping version is the function itself: ``defer`` gives each marked function that answer
while Dynamo is not imported, and torch's own once it is. Behaviour is unchanged; a process
that compiles imports Dynamo there instead. On an H200, alternately against the code before:
`normlab train --norm ln` 7.65 s against 8.04 s (1.05x; the first capture now imports part of
what Dynamo did), the classic sweep 1.00x (h200-2026-12-01h-e2e-dynamo-deferred.txt).
"""

from __future__ import annotations

import sys

import torch

_MARKER_CODE = torch._disable_dynamo(lambda: None).__code__  # the wrapper torch's marker puts around a function
_deferred: list[tuple[object, object]] = []  # (function inside a marker, what it calls until Dynamo is imported)
_compiling = False  # set by restore(): this process compiles, so nothing is deferred any more


def _inside_marker(function: object) -> object | None:
    """The function inside, if ``function`` is torch's Dynamo-skipping marker around one."""
    if getattr(function, "__code__", None) is not _MARKER_CODE:
        return None
    cells = dict(zip(_MARKER_CODE.co_freevars, function.__closure__))
    return cells["fn"].cell_contents if "fn" in cells else None


def defer(function: object) -> bool:
    """Make torch's marker around ``function`` call it as it is until Dynamo is imported.
    Returns whether it did: not when ``function`` has no marker, nor once Dynamo is imported,
    the process compiles or the marker has its skipping version."""
    inner = _inside_marker(function)
    if (inner is None or _compiling or "torch._dynamo" in sys.modules
            or getattr(inner, "__dynamo_disable", None) is not None):
        return False

    def inner_until_dynamo_is_imported(*args, **kwargs):
        if "torch._dynamo" in sys.modules:  # perhaps compiling from now on: torch's own marker
            restore()
            return function(*args, **kwargs)
        return inner(*args, **kwargs)

    inner.__dynamo_disable = inner_until_dynamo_is_imported
    _deferred.append((inner, inner_until_dynamo_is_imported))
    return True


def restore() -> None:
    """Give every deferred marker back to torch, which builds its skipping version at the next
    call, and defer none from now on: done before normlab compiles (precompiled.py), so that
    Dynamo never meets ``defer``'s, even from a trainer built while another one compiles."""
    global _compiling
    _compiling = True
    while _deferred:
        inner, deferred = _deferred.pop()
        if getattr(inner, "__dynamo_disable", None) is deferred:
            del inner.__dynamo_disable


def defer_dynamo_imports() -> list[str]:
    """``defer`` the markers of torch.optim.Optimizer's methods and of normlab's custom ops'
    kernels (the Triton convolutions); returns the names of those it deferred now (a process's
    first call on a torch that marks other things defers fewer: a test checks it defers all)."""
    from normlab.engine.fast import triton_conv

    deferred = [f"Optimizer.{name}" for name, method in vars(torch.optim.Optimizer).items() if defer(method)]
    for op in (triton_conv.conv2d, triton_conv.conv2d_input_grad, triton_conv.conv2d_weight_grad_parts):
        kernels = getattr(op, "_backend_fns", {})  # the kernel per device type, each marked
        deferred += [op._qualname for kernel in kernels.values() if defer(kernel)]
    return deferred
