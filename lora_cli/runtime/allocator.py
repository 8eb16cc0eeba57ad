"""glibc malloc settings for CPU training and inference: freed activation memory is kept for reuse.

glibc serves a block above its mmap threshold (128 KiB at start, raised on the fly) with a fresh
mapping and gives a freed heap top back to the kernel. A CPU step allocates and frees the same
megabyte-sized activations hundreds of times, so each step page-faults and zero-fills them again, most
of it in the kernel's `clear_page`. Fixed thresholds keep freed blocks in the heap, where the next step
reuses them. The process keeps the memory its largest step needed instead of returning it between steps.
Batches of varying lengths fragment that heap, so instruction training peaks higher than under glibc's
default (scripts/bench_allocator.py; docs/bench/); a user's MALLOC_*_ variable chooses glibc's default.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); larger values are refused
TRIM_THRESHOLD = 2**31 - 1
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_applied: bool | None = None


def keep_freed_memory(device_type: str = "cpu") -> bool:
    """Set glibc's mmap and trim thresholds once per process for work on `device_type`; True when they are set.

    Nothing happens for an accelerator (its activations are not host memory), off Linux, with
    another C library, or when the user tunes malloc already (`MALLOC_*_` variables or
    `glibc.malloc` tunables), so an explicit choice always wins.
    """
    global _applied
    if device_type != "cpu":
        return bool(_applied)
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    if any(name in os.environ for name in _USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only (musl has a mallopt that does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def return_freed_memory() -> bool:
    """Hand the heap's free memory back to the kernel now (glibc's malloc_trim); True when some was returned.

    For a long-lived process after a burst of allocations it will not repeat: a server that read and checked a
    thousand adapter files at start-up, or dropped an adapter from memory, should not keep that memory resident.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
