"""Keep freed memory in the process instead of handing it back to the kernel (glibc).

A CNN forward pass allocates activations of several MiB to tens of MiB per layer and frees
them at the end of the batch. glibc serves such blocks with ``mmap`` above its (dynamic) mmap
threshold and returns them with ``munmap`` on ``free``, and trims the heap top beyond its trim
threshold; the next batch then maps the same amount again, and the kernel zero-fills every
4 KiB page on first touch. On a 2-core AMD EPYC VM that was ~12,000 minor page faults per
sample and 20-57 % of an extraction's CPU time in ``sys`` (``bench/extraction_systime.py``).
Fixing the mmap threshold at its ceiling (32 MiB on 64-bit glibc) and not trimming keeps those
blocks for reuse: the same settings as the environment variables ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_TOP_PAD_``, applied at run time with ``mallopt``
because a Snakemake ``script:`` job cannot set them before Python starts. The price is that
the process keeps its peak heap (it would reach it again at the next batch anyway).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

LOGGER = logging.getLogger(__name__)

# mallopt parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

#: Largest mmap threshold glibc accepts on 64-bit (HEAP_MAX / DEFAULT_MMAP_THRESHOLD_MAX).
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**31 - 1  # an int: never trim the heap top in practice
TOP_PAD = 64 * 2**20

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
