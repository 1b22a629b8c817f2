"""Keep freed memory in the process instead of handing it back to the kernel (glibc).

A CNN forward pass allocates activations of several MiB to hundreds of MiB per layer and frees
them at the end of the batch (EfficientNet-Lite0 at batch 32: 49, 55, 147 and 149 MiB blocks;
VGG16: 392 MiB). glibc serves a request from the heap's free chunks or its top chunk when one
is large enough; otherwise it asks the kernel for more, and a request above its mmap threshold
(dynamic, at most 32 MiB on 64-bit glibc) gets a mapping of its own that ``free`` unmaps. The
next batch maps the same amount again and the kernel zero-fills every 4 KiB page on first
touch: on a 2-core AMD EPYC VM ~10,000 minor page faults per sample and 20-57 % of an
extraction's CPU time in ``sys`` (``bench/extraction_systime.py``).

The settings below keep those blocks for reuse: a fixed mmap threshold at its ceiling, no trim
of the heap top, and a TOP_PAD (what the heap grows by beyond a request) larger than the
largest activation, so that blocks above the threshold are carved from the heap's top instead
of being mapped afresh. The pad is what matters for the largest blocks: no mmap threshold
covers a 147 MiB block, and with a 64 MiB pad they were still mapped and unmapped every batch
(6,457 faults per sample against 1,020 with the ``MALLOC_*`` environment variables, whose
``MALLOC_TOP_PAD_`` was 1 GiB; ``bench/results/extraction_systime_after_fix.csv``). The pad is
address space, not memory: pages count only once touched.

Applied at run time with ``mallopt`` (the equivalent of ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_TOP_PAD_``), so it holds wherever extraction or
fine-tuning runs -- a Snakemake job local or on SLURM, the CLI, the Python API -- without
depending on the environment a job starts from; DataLoader workers are forked and inherit it.
The price is that the process keeps its peak heap (it would reach it again at the next batch).

:func:`log_job_cpu` ends an extraction or fine-tuning job with one log line saying whether the
settings were applied in that process and what it cost (user and sys CPU, minor page faults
per sample); :func:`read_job_cpu` reads it back from the job's log. That is how a job run
elsewhere (an ``sbatch`` job, with no accounting database to ask) tells its own numbers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import re
from dataclasses import dataclass

LOGGER = logging.getLogger(__name__)

# mallopt parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

#: Largest mmap threshold glibc accepts on 64-bit (HEAP_MAX / DEFAULT_MMAP_THRESHOLD_MAX).
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**31 - 1  # an int: never trim the heap top in practice
#: Larger than the largest single activation block of the networks extracted (VGG16 at batch
#: 32: 392 MiB), so such blocks come from the heap's top rather than a fresh mmap.
TOP_PAD = 2**30

#: Set to 0 to leave glibc's defaults (benchmarks compare both).
DISABLE_ENV = "LEUKOTYPE_KEEP_FREED_MEMORY"


@functools.cache
def keep_freed_memory() -> bool:
    """Apply the settings above once per process; True if they were applied (glibc only)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl/macOS lack it)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
        )
    )
    LOGGER.debug("glibc keeps freed memory: %s", applied)
    return applied


#: Start of the line :func:`log_job_cpu` writes and :func:`read_job_cpu` looks for.
JOB_CPU_TAG = "job cpu:"
_JOB_CPU_FIELD = re.compile(r"(\w+)=(\S+)")


@dataclass(frozen=True)
class JobCpu:
    """A job process's CPU and page faults so far, its own and its waited-for children's
    (``RUSAGE_SELF`` + ``RUSAGE_CHILDREN``: a DataLoader worker counts once it has been joined)."""

    keep_freed_memory: bool  # applied in this process (False: glibc's defaults)
    user_s: float
    sys_s: float
    minor_faults: int
    samples: int

    @property
    def sys_share(self) -> float:
        """sys as a fraction of user + sys (0 when no CPU was used)."""
        total = self.user_s + self.sys_s
        return self.sys_s / total if total > 0 else 0.0

    @property
    def faults_per_sample(self) -> float:
        return self.minor_faults / self.samples if self.samples else float("nan")

    def line(self) -> str:
        """The log line (``key=value`` fields after :data:`JOB_CPU_TAG`)."""
        return (
            f"{JOB_CPU_TAG} keep_freed_memory={self.keep_freed_memory} user_s={self.user_s:.2f} "
            f"sys_s={self.sys_s:.2f} sys_share={self.sys_share:.4f} minor_faults={self.minor_faults} "
            f"samples={self.samples} faults_per_sample={self.faults_per_sample:.1f}"
        )


def job_cpu(samples: int) -> JobCpu:
    """This process's :class:`JobCpu` now, for a job over ``samples`` samples (two syscalls)."""
    import resource  # POSIX only; imported where used so the module loads anywhere

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    # Applied here only if something in this process asked for it: never apply it now.
    applied = keep_freed_memory.cache_info().currsize > 0 and keep_freed_memory()
    return JobCpu(
        keep_freed_memory=applied,
        user_s=own.ru_utime + children.ru_utime,
        sys_s=own.ru_stime + children.ru_stime,
        minor_faults=own.ru_minflt + children.ru_minflt,
        samples=int(samples),
    )


def log_job_cpu(samples: int) -> JobCpu:
    """Log :func:`job_cpu`'s line (INFO: into a Snakemake job's log) and return it."""
    usage = job_cpu(samples)
    LOGGER.info(usage.line())
    return usage


def read_job_cpu(text: str) -> JobCpu | None:
    """The last :func:`log_job_cpu` line in a log's ``text`` (None if it has none)."""
    lines = [line for line in text.splitlines() if JOB_CPU_TAG in line]
    if not lines:
        return None
    fields = dict(_JOB_CPU_FIELD.findall(lines[-1].split(JOB_CPU_TAG, 1)[1]))
    return JobCpu(
        keep_freed_memory=fields["keep_freed_memory"] == "True",
        user_s=float(fields["user_s"]),
        sys_s=float(fields["sys_s"]),
        minor_faults=int(fields["minor_faults"]),
        samples=int(fields["samples"]),
    )
