"""normlab.engine.fast.host_memory: malloc keeps freed activations, so steps stop faulting in fresh pages."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, cli_env

# Five 6 MB activations allocated and freed per "step", as in a CPU training step; minor page
# faults counted over 20 steps after one warm-up step, in a fresh process each time. The
# baseline is glibc's initial settings (mmap above 128 KiB, trim above 128 KiB), fixed with
# mallopt: glibc's dynamic defaults then move with the process's history, which would make
# this test depend on what torch's import happened to free (benchmarks/cpu_step.py times
# the defaults as they come, in fresh processes).
STEPS = """
import ctypes, resource, sys, torch
from normlab.engine.fast import host_memory
if sys.argv[1] == "keep":
    assert host_memory.keep_freed_memory()
else:
    mallopt = ctypes.CDLL(None).mallopt
    assert mallopt(host_memory.M_MMAP_THRESHOLD, 128 * 1024) and mallopt(host_memory.M_TRIM_THRESHOLD, 128 * 1024)
def step():
    activations = [torch.ones(1_500_000) for _ in range(5)]
    del activations
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_TOUCHED = 20 * 5 * 1_500_000 * 4 // 4096  # 146,484 pages of 4 KiB


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], cwd=ROOT, env=cli_env(), capture_output=True,
                         text=True, timeout=120, check=True)
    return int(out.stdout.split()[-1])


def test_kept_memory_is_reused_instead_of_faulted_in_again():
    # mapped afresh for every tensor of every step: about one fault per page
    assert page_faults("initial") > 0.7 * PAGES_TOUCHED
    # kept: the heap is reused (6,000-16,000 faults seen, where blocks land on new pages)
    assert page_faults("keep") < 0.25 * PAGES_TOUCHED
