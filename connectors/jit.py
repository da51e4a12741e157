"""Numba's compiler as the project uses it: `nogil` machine code, cached on disk when it can be.

Numba caches compiled functions next to their module (`__pycache__`) or in the user's cache
directory, and refuses to decorate a function when neither is writable (a read-only install
without a home directory): `jit` then compiles without a cache, and each process pays the
compile (seconds) on first use instead of failing. A cache that cannot be written when a
function is compiled (a full disk) is logged and skipped: the function runs, uncached.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar, cast

from numba import njit
from numba.core.caching import FunctionCache

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("connectors.jit")


class _BestEffortCache(FunctionCache):
    """Numba's cache of a function, whose writes may fail without failing the compile."""

    def save_overload(self, sig: Any, data: Any) -> None:
        try:
            super().save_overload(sig, data)  # type: ignore[no-untyped-call]
        except OSError as exc:  # e.g. no space left on the cache's disk
            log.warning(
                "Numba could not cache %s (%s); it is compiled again by each process",
                self._name,
                exc,
            )


def jit(fn: F) -> F:
    """`fn` compiled by Numba in nopython mode without the GIL, cached on disk if possible."""
    try:
        compiled = njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # no writable cache location for this module
        return cast(F, njit(nogil=True)(fn))  # a Dispatcher, called as the function
    cache: Any = _BestEffortCache
    compiled._cache = cache(fn)  # type: ignore[attr-defined]  # Numba's own cache slot
    return cast(F, compiled)
