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


JOB_CPU_CHILD = r"""
import logging, subprocess, sys
from leukotype.allocator import job_cpu, keep_freed_memory, log_job_cpu

logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(levelname)s %(message)s")
before = job_cpu(40)
print("before", before.keep_freed_memory)  # nothing asked for the settings yet: not applied
keep_freed_memory()
# a child (like the DataLoader's decoding worker, once joined): ~0.3 s of CPU and 64 MiB of
# freshly touched pages (16,384 faults at 4 KiB)
subprocess.run([sys.executable, "-c",
                "import time\nb = bytearray(64 * 2**20)\nt = time.process_time()\n"
                "while time.process_time() - t < 0.3: pass"], check=True)
after = log_job_cpu(40)
cpu = lambda usage: usage.user_s + usage.sys_s
print("delta", cpu(after) - cpu(before), after.minor_faults - before.minor_faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc, getrusage")
@pytest.mark.parametrize("env_value, applied", [(None, True), ("0", False)])
def test_job_cpu_line_says_whether_applied_and_counts_the_waited_for_children(env_value, applied):
    import os

    from leukotype.allocator import DISABLE_ENV, read_job_cpu

    env = {k: v for k, v in os.environ.items() if k != DISABLE_ENV}
    if env_value is not None:
        env[DISABLE_ENV] = env_value
    out = subprocess.run([sys.executable, "-c", JOB_CPU_CHILD], capture_output=True, text=True,
                         check=True, env=env).stdout
    usage = read_job_cpu(out)
    assert usage is not None, out
    assert "before False" in out
    assert usage.keep_freed_memory is applied
    assert usage.samples == 40
    assert usage.faults_per_sample == pytest.approx(usage.minor_faults / 40)
    assert usage.sys_share == pytest.approx(usage.sys_s / (usage.user_s + usage.sys_s), abs=1e-2)
    # the child's CPU and page faults are in the job's numbers
    _, cpu_delta, fault_delta = next(line for line in out.splitlines() if line.startswith("delta")).split()
    assert float(cpu_delta) >= 0.25
    assert int(fault_delta) >= 16_384
    # the line round-trips (the values read back are the ones logged, to the line's precision)
    assert read_job_cpu(f"noise\n{usage.line()}\nmore noise") == usage


def test_read_job_cpu_without_the_line_is_none():
    from leukotype.allocator import read_job_cpu

    assert read_job_cpu("2026-12-01 INFO extracting ...\n") is None
