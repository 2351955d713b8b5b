"""Keep freed host memory in the process, so CPU steps stop faulting in fresh pages.

A CPU training step allocates and frees dozens of activation tensors of 0.2-6 MB. With
glibc's defaults many of them come from fresh ``mmap`` calls or from heap that the last
``free`` gave back to the kernel, so each step zero-fills and maps the same pages again:
on the 2-core machine that was up to a fifth of the step (docs/speed.md). Raising malloc's mmap
and trim thresholds keeps those blocks in the heap for the next step; peak memory stays
what the step needs. Process-wide, like ``torch.set_num_threads``; glibc only.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit; above it, blocks are mmap()ed
TRIM_THRESHOLD = 2**30  # free heap kept before glibc returns the top to the kernel


def keep_freed_memory() -> bool:
    """Set glibc's thresholds; False (and nothing changed) where malloc is not glibc's."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
