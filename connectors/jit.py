"""Numba's compiler as the project uses it: `nogil` machine code, cached on disk when it can be.

Numba caches compiled functions next to their module (`__pycache__`) or in the user's cache
directory, and refuses to decorate a function when neither is writable (a read-only install
without a home directory). `jit` then compiles without a cache: each process pays the compile
(about a second) on first use instead of failing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from numba import njit

F = TypeVar("F", bound=Callable[..., Any])


def jit(fn: F) -> F:
    """`fn` compiled by Numba in nopython mode without the GIL, cached on disk if possible."""
    try:
        compiled = njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # no writable cache location for this module
        compiled = njit(nogil=True)(fn)
    return cast(F, compiled)  # a Dispatcher, called as the function
