"""connectors.jit: compiled, and cached on disk when Numba finds a place for its cache."""

from __future__ import annotations

import errno
import logging
from typing import Any

import pytest
from numba.core.caching import IndexDataCacheFile

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


def _halve(x: float) -> float:
    return x / 2


def test_a_cache_that_cannot_be_written_leaves_the_function_compiled(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk under Numba's cache: the compile still succeeds, and the failure is logged."""

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(IndexDataCacheFile, "save", full)
    halve = jit(_halve)
    with caplog.at_level(logging.WARNING, logger="connectors.jit"):
        assert halve(5.0) == 2.5
    assert halve.signatures
    assert "could not cache" in caplog.text
    assert "No space left" in caplog.text
