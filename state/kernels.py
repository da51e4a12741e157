"""The read path's compiled kernels (`state.window_sums`), loaded together on first need.

Numba is imported, and every kernel compiled or loaded from its disk cache, the first time a
read needs any of them (or `warm_up` asks): once per process, under a lock, so that threads
that read at once wait for one compile instead of starting their own, and no kernel is
compiled later in the middle of serving.
"""

from __future__ import annotations

import threading
from types import ModuleType

_lock = threading.Lock()
_loaded: list[ModuleType] = []


def kernels() -> ModuleType:
    """`state.window_sums`, with every kernel compiled."""
    if _loaded:
        return _loaded[0]
    with _lock:
        if not _loaded:
            from state import window_sums

            window_sums.compile_all()
            _loaded.append(window_sums)
    return _loaded[0]


def warm_up() -> None:
    """Compile the read kernels now (4 s the first time on this machine, then 0.3-0.5 s from
    Numba's cache) rather than in the first read that needs them."""
    kernels()
