"""Keep glibc from returning large CPU tensors' memory to the OS on every free.

PyTorch allocates CPU tensors with ``malloc``. glibc serves blocks of 128 KiB and more
(a batch of 20 000 2-D samples in float32 is 160 KiB; an MLP activation at batch 4096
is 2 MiB) with a fresh ``mmap`` and gives them back on ``free``, and trims the heap's
top when it grows past a threshold, so a sampling loop page-faults its working memory
back in on every step. Measured here (1000 PC steps, batch 4096, a 3-layer MLP): 3
million page faults, about 40 % of the CPU time, and in amounts that depend on the heap's
layout, so two identical loops in one process differed by 30 %.

:func:`keep_freed_memory` raises glibc's mmap threshold to its maximum (32 MiB) and the
trim threshold to 1 GiB with ``mallopt``, so freed blocks are reused instead (the
process keeps its peak memory, as PyTorch's CUDA caching allocator does on the GPU).
It is process-wide, so only the ``diffuse`` command line (and its benchmarks) call it,
never the library; it does nothing off glibc, or when the user sets
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` themselves or
``DIFFUSE_KEEP_MALLOC=1``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: mallopt parameter numbers of glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds high (see the module docstring); returns
    whether it did."""
    if not sys.platform.startswith("linux") or os.environ.get("DIFFUSE_KEEP_MALLOC") == "1":
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
