"""`flows.ondemand`'s compiled row loops (Numba, imported on first use: a flow that only
declares on-demand functions never loads Numba for them).

`cosine_rows` is the row-wise cosine of two vector columns given as Arrow's buffers (each
column's items, offsets, and row and item validity, empty when nothing is null), each row's
sums taken over its items in order in float64, as a Python loop over the row's items takes
them: equal bit for bit (tests/state/test_reads_services.py). A column whose usable vectors
have several lengths, or two columns whose lengths differ, come back as a code, and
`flows.ondemand` raises the error that names the dimensions."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from connectors.jit import jit

F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]

OK, RAGGED, DIMENSIONS = 0, 1, 2  # cosine_rows' outcomes


@jit
def _dim(offsets: Any, rows_ok: Mask, items_ok: Mask, keep: Mask) -> int:
    """The one length of a column's usable vectors (non-null, non-empty, no null item), marking
    them in `keep`; -1 when two usable vectors differ in length, 0 when there is none."""
    dim = 0
    for r in range(len(keep)):
        lo, hi = offsets[r], offsets[r + 1]
        usable = (len(rows_ok) == 0 or rows_ok[r]) and hi > lo
        if usable:
            for i in range(lo, hi):
                if len(items_ok) and not items_ok[i]:
                    usable = False
                    break
        keep[r] = usable
        if usable:
            if dim == 0:
                dim = hi - lo
            elif hi - lo != dim:
                return -1
    return dim


@jit
def cosine_rows(
    x: Any,
    x_offsets: Any,
    x_rows: Mask,
    x_items: Mask,
    y: Any,
    y_offsets: Any,
    y_rows: Mask,
    y_items: Mask,
) -> tuple[F64, Mask, int]:
    """Each row's cosine similarity (float64) and whether it has one (both vectors usable and
    not all zeros), and OK, RAGGED (a column's usable vectors differ in length) or DIMENSIONS
    (the two columns' lengths differ where a row has both)."""
    n = len(x_offsets) - 1
    out = np.zeros(n, np.float64)
    ok = np.zeros(n, np.bool_)
    x_keep = np.zeros(n, np.bool_)
    y_keep = np.zeros(n, np.bool_)
    x_dim = _dim(x_offsets, x_rows, x_items, x_keep)
    y_dim = _dim(y_offsets, y_rows, y_items, y_keep)
    if x_dim < 0 or y_dim < 0:
        return out, ok, RAGGED
    for r in range(n):
        if not (x_keep[r] and y_keep[r]):
            continue
        if x_dim != y_dim:
            return out, ok, DIMENSIONS
        a, b = x_offsets[r], y_offsets[r]
        dot = uu = vv = 0.0
        for i in range(x_dim):
            p, q = np.float64(x[a + i]), np.float64(y[b + i])
            dot += p * q
            uu += p * p
            vv += q * q
        norm = math.sqrt(uu) * math.sqrt(vv)
        if norm > 0:
            out[r] = dot / norm
            ok[r] = True
    return out, ok, OK
