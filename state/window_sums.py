"""The read path's compiled window sums: counts, sums and means of tile blobs (Numba, `nogil`).

`blob_totals` walks one entity's whole blob (`state.compiled_read`, behind `get`) and
`batch_blob_totals` every blob of a batch (`state.batch_read`, behind `get_many`), each in one
call: per hop group whose features read are all counts, sums and means, it finds the rows the
single read's `_group_values` finds (a binary search on the tile numbers, the newest-event
rule, the tile at a hop boundary left out) and adds their columns up in row order from 0
(floats from 0.0, one by one, as Python's `sum` and `np.bincount` add them), so the values are
bit for bit the single read's (tests/state/test_reads_batch.py); the other groups' sections are
skipped. With NumPy the same took ~25 array operations per hop group.

`compile_all` compiles them together (`state.kernels`); Numba caches the machine code on disk.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from connectors.jit import jit

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


@jit
def first_at_least(a: I64, lo: int, hi: int, value: int) -> int:
    """The first i in [lo, hi) with a[i] >= value (a sorted there), else hi."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


@jit
def _window_end(i64: I64, base: int, rows: int, newest: int, t: int, hop: int) -> int:
    """The end (exclusive) of an entity's rows a read as of t covers: the newest event time's
    row is left out when t is not after it, and so is a tile that starts at or after t."""
    hi = rows - 1 if t <= newest and rows > 0 else rows
    if hop > 0:
        hi = first_at_least(i64, base, base + hi, -((-t) // hop)) - base
    return hi


@jit
def _window_start(i64: I64, base: int, hi: int, t: int, hop: int, window: int) -> int:
    """The first of an entity's rows inside a window of `window` us ending at t."""
    if hop <= 0:
        return 0
    return first_at_least(i64, base, base + hi, t // hop - window // hop) - base


@jit
def _total(values: Any, at: int, lo: int, hi: int, zero: Any) -> Any:
    """values[at + lo : at + hi] added one by one in order from `zero` (0 or 0.0)."""
    total = zero
    for r in range(lo, hi):
        total += values[at + r]
    return total


@jit
def _u32(buf: npt.NDArray[np.uint8], at: int) -> int:
    # int64 throughout: Numba types uint64 | int64 as float64
    b0, b1, b2, b3 = (
        np.int64(buf[at]),
        np.int64(buf[at + 1]),
        np.int64(buf[at + 2]),
        np.int64(buf[at + 3]),
    )
    return int(b0 | (b1 << 8) | (b2 << 16) | (b3 << 24))


@jit
def _outputs(groups: I64) -> tuple[int, int]:
    """How many int and float sums a blob plan (`blob_totals`' `groups`) yields."""
    n_ints, n_floats = 0, 0
    w_lo, i_lo, f_lo = 0, 0, 0
    for g in range(len(groups) // 8):
        w_hi, i_hi, f_hi = groups[8 * g + 5], groups[8 * g + 6], groups[8 * g + 7]
        n_ints += (w_hi - w_lo) * (i_hi - i_lo)
        n_floats += (w_hi - w_lo) * (f_hi - f_lo)
        w_lo, i_lo, f_lo = w_hi, i_hi, f_hi
    return n_ints, n_floats


@jit
def _walk(
    buf: npt.NDArray[np.uint8],
    start: int,
    end: int,
    t: int,
    groups: I64,
    windows: I64,
    int_cols: I64,
    float_cols: I64,
    ints: I64,
    floats: F64,
) -> int:
    """The window sums of the blob `buf[start:end]` into `ints` and `floats`; where its last
    section ends (-1 when a section runs past `end`)."""
    newest = buf[start + 1 : start + 9].view(np.int64)[0]
    pos = start + 9
    out_i, out_f = 0, 0
    w_lo, i_lo, f_lo = 0, 0, 0
    for g in range(len(groups) // 8):
        hop, width = groups[8 * g], groups[8 * g + 1]
        w_hi, i_hi, f_hi = groups[8 * g + 5], groups[8 * g + 6], groups[8 * g + 7]
        if pos + 4 > end:
            return -1
        rows = _u32(buf, pos)
        block = pos + 4
        pos = block + 8 * rows * width
        if groups[8 * g + 2]:  # the object section: its length, then the document
            if pos + 4 > end:
                return -1
            pos += 4 + _u32(buf, pos)
        for _ in range(groups[8 * g + 3]):  # each vector field: its length, then the matrix
            if pos + 4 > end:
                return -1
            pos += 4 + 8 * rows * _u32(buf, pos)
        if pos > end:
            return -1
        if groups[8 * g + 4]:
            words = buf[block : block + 8 * rows * width]
            i64 = words.view(np.int64)
            f64 = words.view(np.float64)
            hi = _window_end(i64, 0, rows, newest, t, hop)
            for w in range(w_lo, w_hi):
                lo = _window_start(i64, 0, hi, t, hop, windows[w])
                for k in range(i_lo, i_hi):
                    ints[out_i] = _total(i64, rows * int_cols[k], lo, hi, 0)
                    out_i += 1
                for k in range(f_lo, f_hi):
                    floats[out_f] = _total(f64, rows * float_cols[k], lo, hi, 0.0)
                    out_f += 1
        w_lo, i_lo, f_lo = w_hi, i_hi, f_hi
    return pos


@jit
def blob_totals(
    buf: npt.NDArray[np.uint8],
    t: int,
    groups: I64,
    windows: I64,
    int_cols: I64,
    float_cols: I64,
) -> tuple[I64, F64, int]:
    """One entity's window sums from its whole blob (the single read's `_group_values` for
    counts, sums and means), and where the blob's last section ends (-1: past its end).

    `groups` holds 8 int64 per hop group: hop, width (columns), has an object section, vector
    fields, wanted, and the ends (exclusive) of the group's windows, int columns and float
    columns in the flat `windows`, `int_cols` and `float_cols`. Outputs are flat: per wanted
    group, per window, its int columns' sums then (in `floats`) its float columns' sums.
    """
    n_ints, n_floats = _outputs(groups)
    ints = np.zeros(n_ints, np.int64)
    floats = np.zeros(n_floats, np.float64)
    end = _walk(buf, 0, len(buf), t, groups, windows, int_cols, float_cols, ints, floats)
    return ints, floats, end


@jit
def batch_blob_totals(
    buf: npt.NDArray[np.uint8],
    starts: I64,
    ends: I64,
    t: int,
    groups: I64,
    windows: I64,
    int_cols: I64,
    float_cols: I64,
) -> tuple[I64, F64, bool]:
    """`blob_totals` of every blob `buf[starts[e]:ends[e]]` of a batch: (entities, outputs)
    sums, and whether every blob's sections ended where the blob ends."""
    n_ints, n_floats = _outputs(groups)
    ints = np.zeros((len(starts), n_ints), np.int64)
    floats = np.zeros((len(starts), n_floats), np.float64)
    whole = True
    for e in range(len(starts)):
        end = _walk(
            buf, starts[e], ends[e], t, groups, windows, int_cols, float_cols, ints[e], floats[e]
        )
        whole = whole and end == ends[e]
    return ints, floats, whole


def compile_all() -> None:
    """Compile (or load from Numba's cache) every kernel of the read path, for the argument
    types reads pass (read-only views of blobs, int64 arrays), so that no read compiles one
    later: a compile holds the interpreter for seconds when the cache is cold, and a kernel
    first needed in the middle of a busy client (a batch with a stored tile the single read
    could not answer, say) stalled its catch-up thread that long."""
    from connectors.murmur2_compiled import partitions_of

    raw = np.frombuffer(bytes(16), np.uint8)
    none = np.zeros(0, np.int64)
    blob_totals(raw, 0, none, none, none, none)
    batch_blob_totals(raw, none, none, 0, none, none, none, none)
    partitions_of(raw, np.zeros(1, np.int64), 1)
