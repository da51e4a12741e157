"""glibc's allocator, set up for a reader that allocates and frees the same large buffers on
every call.

A batch read joins its blobs into one buffer (100 entities of the bench_flow view: ~270 KB) and
makes aligned copies of it; NumPy's row tables are tens of KB each. With glibc's defaults, an
allocation above the mmap threshold (128 KiB, adjusted upward only as such blocks are freed) is
a fresh `mmap` and its `free` a `munmap`, and the heap's top is given back to the system past
the trim threshold, so every call faults the same pages in again: `get_many` of 100 measured 274
minor page faults per call, a third of its time (scripts/bench_reads.py). Fixed thresholds of
`_MMAP_THRESHOLD` and `_TRIM_THRESHOLD` keep those blocks in the heap for reuse: 0 faults.

`FeatureClient` calls `tune_allocator()` when it is made: once per process, only under glibc,
and not when the process set either threshold itself (`MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TRIM_THRESHOLD_`, or `FEATUREFLOW_MALLOC_TUNING=0` to leave the allocator alone). The
cost is memory that stays with the process instead of going back to the system: at most
`_TRIM_THRESHOLD` of free heap top per arena.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading

log = logging.getLogger("state.client")

_M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc's malloc.h)
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 16 << 20  # blocks below this come from the heap (a batch of ~6k entities)
_TRIM_THRESHOLD = 32 << 20  # free heap top kept for reuse

_done = threading.Lock()
_tuned: list[bool] = []


def tune_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds once per process; whether they are set now."""
    with _done:
        if not _tuned:
            _tuned.append(_tune())
        return _tuned[0]


def _tune() -> bool:
    if os.environ.get("FEATUREFLOW_MALLOC_TUNING", "1") == "0":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False  # the process chose its own
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
        )
    except (OSError, AttributeError) as exc:
        log.debug("glibc mallopt not available: %s", exc)
        return False
    log.debug(
        "glibc malloc: mmap threshold %d, trim threshold %d", _MMAP_THRESHOLD, _TRIM_THRESHOLD
    )
    return ok
