"""connectors.jit: compiled, and cached on disk when Numba finds a place for its cache."""

from __future__ import annotations

from typing import Any

from connectors.jit import jit


def test_a_function_numba_cannot_cache_is_still_compiled() -> None:
    """A function without a source file (here: from exec) has no cache location; Numba's
    `cache=True` refuses it with RuntimeError, and `jit` compiles it uncached instead."""
    scope: dict[str, Any] = {}
    exec("def triple(x):\n    return 3 * x\n", scope)  # a function with no source file
    triple = jit(scope["triple"])
    assert triple(14) == 42
    assert triple.signatures  # compiled by Numba, not run as Python


def test_a_module_function_is_compiled_and_cached() -> None:
    from connectors.murmur2_compiled import partitions_of

    assert partitions_of._cache.cache_path  # a writable cache location was found
