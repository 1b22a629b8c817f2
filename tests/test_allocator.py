"""leukotype.allocator: freed activation-sized blocks stay in the process (fewer page faults)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = r"""
import resource, sys
import numpy as np
from leukotype.allocator import keep_freed_memory

def faults_of_batches():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):  # like a forward pass: activations of mixed sizes live, then freed
        live = [np.ones(mib * 2**17) for mib in (20, 4, 12, 2, 30, 150)]
        del live
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_batches()
default = faults_of_batches()
applied = keep_freed_memory()
faults_of_batches()
print(default, faults_of_batches(), applied)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_keep_freed_memory_stops_the_page_faults_of_repeated_large_allocations():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         check=True)
    default, kept, applied = out.stdout.split()
    if applied != "True":
        pytest.skip("not glibc")
    # glibc's default: the large blocks are mapped afresh each time (zero-filled 4 KiB pages;
    # 218 MiB a round would be ~56,000 faults), kept: they are reused. The 150 MiB block is
    # above any mmap threshold glibc accepts (like EfficientNet-Lite0's 147 MiB activation at
    # batch 32): only a heap top pad larger than it keeps it (with a 64 MiB pad it was mapped
    # afresh every round: ~38,000 faults a round)
    assert int(default) > 20 * 1000
    assert int(kept) < int(default) / 20
