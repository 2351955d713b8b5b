"""normlab.host_memory: malloc keeps freed activations, so steps stop faulting in fresh pages."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, cli_env

# Five 6 MB activations allocated and freed per "step", as in a CPU training step; minor page
# faults counted over 20 steps after one warm-up step, in a fresh process each time.
STEPS = """
import resource, sys, torch
from normlab.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    activations = [torch.ones(1_500_000) for _ in range(5)]
    del activations
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], cwd=ROOT, env=cli_env(), capture_output=True,
                         text=True, timeout=120, check=True)
    return int(out.stdout.split()[-1])


def test_kept_memory_is_reused_instead_of_faulted_in_again():
    default, kept = page_faults("default"), page_faults("keep")
    # glibc's defaults map 30 MB afresh every step (7,300 pages); kept, the heap is reused
    assert default > 20 * 5_000
    assert kept < default / 4
