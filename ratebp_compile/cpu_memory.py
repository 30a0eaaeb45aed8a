"""The memory a CPU training step frees, kept in the process for the next step instead of returned to the
system.

glibc's ``malloc`` gives the top of its heap back to the system once more than ``M_TRIM_THRESHOLD`` bytes
of it are free, and serves an allocation over ``M_MMAP_THRESHOLD`` bytes from a mapping of its own that
is unmapped when it is freed; by default both thresholds follow the largest block freed so far, up to 64
and 32 MiB. A training step frees nearly everything it allocated when it ends, so each step gets fresh
pages from the system, and the first write to each page is a fault the kernel serves by zeroing it. For
the anchor bench's ResNet-18 (width 16, batch 16, T = 16, one thread) that is about 88,000 faults and
230 ms of system time in an eager step of 800 ms. PyTorch's CUDA caching allocator keeps freed GPU memory
for this reason; on CPU the equivalent is two ``mallopt`` settings, which :func:`keep_freed` makes.

The settings belong to the whole process and stay after the step: up to the number of bytes given, freed
memory stays resident (the process's RSS does not fall back between steps) and is reused by the next
allocations, the step's or anyone's. ``compile_program`` applies them when it builds a step whose tensors
are on the CPU, keeping as much as the step's memory budget (``StepOptions.memory_budget``). Set
``RATEBP_KEEP_CPU_MEMORY=0`` to leave ``malloc`` as it is. Other C libraries than glibc are left alone.
"""
from __future__ import annotations

import ctypes
import os
import platform
from typing import Optional

from .memory import format_bytes

__all__ = ["keep_freed", "kept_bytes", "ENV", "MAX_BYTES"]

ENV = "RATEBP_KEEP_CPU_MEMORY"
#: ``mallopt`` takes an ``int``: the most it can keep.
MAX_BYTES = 2 ** 31 - 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: glibc's own ceiling for its dynamic trim threshold: keeping less than this would make things worse.
_GLIBC_DEFAULT_MAX = 64 * 2 ** 20

_kept = 0


def kept_bytes() -> int:
    """What :func:`keep_freed` set so far in this process (0: malloc as it was)."""
    return _kept


def keep_freed(nbytes: Optional[int]) -> str:
    """Keep up to ``nbytes`` of freed memory in the process (None: as much as ``mallopt`` allows), and serve
    allocations up to that size from the heap; never lowers what an earlier call kept. Returns what was
    done, in words (for ``show``)."""
    global _kept
    if os.environ.get(ENV, "1").strip() == "0":
        return f"malloc left as it is ({ENV}=0)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "malloc left as it is (not glibc)"
    target = max(min(MAX_BYTES if nbytes is None else nbytes, MAX_BYTES), _GLIBC_DEFAULT_MAX)
    if target > _kept:
        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        # the mmap threshold first: setting either freezes both, and a frozen 128 KiB mmap threshold would
        # map and unmap every large tensor
        if not (mallopt(_M_MMAP_THRESHOLD, target) and mallopt(_M_TRIM_THRESHOLD, target)):
            return "malloc left as it is (mallopt refused the thresholds)"
        _kept = target
    return f"freed memory kept for the next step, up to {format_bytes(_kept)} (malloc's trim and mmap thresholds)"
