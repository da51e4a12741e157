"""The read path's compiled window sums: counts, sums and means of tile blobs (Numba, `nogil`).

`blob_totals` walks one entity's whole blob (`state.compiled_read`, behind `get`) and
`batch_blob_totals` every blob of a batch (`state.batch_read`, behind `get_many`), each in one
call: per hop group whose features read are all counts, sums and means (and, for the single
read, element-wise vector means), it finds the rows the single read's `_group_values` finds (a
binary search on the tile numbers, the newest-event rule, the tile at a hop boundary left out)
and adds their columns up in row order from 0 (floats from 0.0, one by one, as Python's `sum`
and `np.bincount` add them; a vector's elements each so), so the values are bit for bit the
single read's (tests/state/test_reads_batch.py); the other groups' sections are skipped. With
NumPy the same took ~25 array operations per hop group.

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


STRIDE = 9  # int64 per hop group in a plan's `groups`


@jit
def output_sizes(groups: I64) -> tuple[int, int, int]:
    """How many int sums, float sums and vector sums a blob plan (`blob_totals`' `groups`)
    yields: `ints` and `floats` take as many, `ends` one more than the vector sums, and
    `vectors` for a blob of n bytes `vector sums * (n // 8)` (a vector sum is as long as its
    field's vectors, whose matrix of one row at least fits the blob before `_walk` reads it,
    so a damaged blob cannot make `_walk` write past it)."""
    n_ints, n_floats, n_vectors = 0, 0, 0
    w_lo, i_lo, f_lo, v_lo = 0, 0, 0, 0
    for g in range(len(groups) // STRIDE):
        at = STRIDE * g
        w_hi, i_hi, f_hi, v_hi = groups[at + 5], groups[at + 6], groups[at + 7], groups[at + 8]
        n_ints += (w_hi - w_lo) * (i_hi - i_lo)
        n_floats += (w_hi - w_lo) * (f_hi - f_lo)
        n_vectors += (w_hi - w_lo) * (v_hi - v_lo)
        w_lo, i_lo, f_lo, v_lo = w_hi, i_hi, f_hi, v_hi
    return n_ints, n_floats, n_vectors


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
    vec_fields: I64,
    ints: I64,
    floats: F64,
    vectors: F64,
    ends: I64,
) -> int:
    """The window sums of the blob `buf[start:end]` into `ints` and `floats` (and the wanted
    vector fields' element-wise sums into `vectors`, the k-th at `vectors[ends[k]:ends[k+1]]`);
    where its last section ends (-1 when a section runs past `end`)."""
    newest = buf[start + 1 : start + 9].view(np.int64)[0]
    pos = start + 9
    out_i, out_f, out_v, at_v = 0, 0, 0, 0
    w_lo, i_lo, f_lo, v_lo = 0, 0, 0, 0
    for g in range(len(groups) // STRIDE):
        at = STRIDE * g
        hop, width = groups[at], groups[at + 1]
        w_hi, i_hi, f_hi, v_hi = groups[at + 5], groups[at + 6], groups[at + 7], groups[at + 8]
        if pos + 4 > end:
            return -1
        rows = _u32(buf, pos)
        block = pos + 4
        pos = block + 8 * rows * width
        if groups[at + 2]:  # the object section: its length, then the document
            if pos + 4 > end:
                return -1
            pos += 4 + _u32(buf, pos)
        fields = np.empty(groups[at + 3], np.int64)
        for v in range(groups[at + 3]):  # each vector field: its length, then the matrix
            if pos + 4 > end:
                return -1
            fields[v] = pos
            pos += 4 + 8 * rows * _u32(buf, pos)
        if pos > end:
            return -1
        if groups[at + 4]:
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
                for k in range(v_lo, v_hi):
                    where = fields[vec_fields[k]]
                    dim = _u32(buf, where) if rows > 0 else 0  # no rows: no sums (count 0)
                    matrix = buf[where + 4 : where + 4 + 8 * rows * dim].view(np.float64)
                    for j in range(dim):  # element j: rows lo..hi added in row order from 0.0
                        total = 0.0
                        for r in range(lo, hi):
                            total += matrix[r * dim + j]
                        vectors[at_v + j] = total
                    at_v += dim
                    out_v += 1
                    ends[out_v] = at_v
        w_lo, i_lo, f_lo, v_lo = w_hi, i_hi, f_hi, v_hi
    return pos


@jit
def blob_totals(
    buf: npt.NDArray[np.uint8],
    t: int,
    groups: I64,
    windows: I64,
    int_cols: I64,
    float_cols: I64,
    vec_fields: I64,
    ints: I64,
    floats: F64,
    vectors: F64,
    ends: I64,
) -> int:
    """One entity's window sums from its whole blob (the single read's `_group_values` for
    counts, sums and means, and element-wise vector means), into the caller's arrays (sized
    by `output_sizes`; they are cleared first); returns where the blob's last section ends
    (-1: past its end).

    `groups` holds STRIDE int64 per hop group: hop, width (columns), has an object section,
    vector fields, wanted, and the ends (exclusive) of the group's windows, int columns, float
    columns and vector fields in the flat `windows`, `int_cols`, `float_cols` and `vec_fields`
    (a vector field by its place among the group's). Outputs are flat: per wanted group, per
    window, its int columns' sums in `ints`, then its float columns' sums in `floats`, then
    its vector fields' element-wise sums, the k-th at `vectors[ends[k]:ends[k + 1]]`.
    """
    ints[:] = 0
    floats[:] = 0.0
    ends[:] = 0
    return _walk(
        buf,
        0,
        len(buf),
        t,
        groups,
        windows,
        int_cols,
        float_cols,
        vec_fields,
        ints,
        floats,
        vectors,
        ends,
    )


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
    sums, and whether every blob's sections ended where the blob ends. Its plans read no
    vector field (the batch read merges vectors itself)."""
    n_ints, n_floats, _ = output_sizes(groups)
    ints = np.zeros((len(starts), n_ints), np.int64)
    floats = np.zeros((len(starts), n_floats), np.float64)
    none = np.zeros(0, np.int64)
    no_vectors = np.zeros(0, np.float64)
    at_zero = np.zeros(1, np.int64)
    whole = True
    for e in range(len(starts)):
        end = _walk(
            buf,
            starts[e],
            ends[e],
            t,
            groups,
            windows,
            int_cols,
            float_cols,
            none,
            ints[e],
            floats[e],
            no_vectors,
            at_zero,
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
    blob_totals(raw, 0, none, none, none, none, none, none, np.zeros(0), np.zeros(0), none)
    batch_blob_totals(raw, none, none, 0, none, none, none, none)
    partitions_of(raw, np.zeros(1, np.int64), 1)
