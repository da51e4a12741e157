"""Point-in-time windows of the kinds that are not plain sums (var/std, first/last, last_k,
percentile, distinct_count, vector mean/first/last), compiled: each spine row's window as a
range of the events in (key, time, offset) order, and its value from that range (Numba, `nogil`).

`flows.pointintime` hands a hop group's other features here. Per spine row (key k, time t) and
window W the events are those of k with start(t) <= ts < t, [lo, end) of the sorted events
(`window_spans`). The values are the online read's (`state.read`) of a view that applied the
key's events before t in one batch (tests/flows/test_pointintime_merges.py):

- first, last and last_k pick events by (time, offset): the range's first or last valid events;
- var and std merge the rows the online read merges (whole tiles, then the newest event's tile
  as its two rows: the events before the newest time, those at it), each row's moments as
  `state.tiles.combine` makes them (Chan's terms added by `np.add.reduceat`: the first plus
  NumPy's pairwise sum of the others), the window's as `state.read._m2` adds them, in row order;
- a vector mean adds the same rows' element-wise sums one row after the other, as
  `reduceat(axis=0)` makes a row's and `state.read._vector_sum` adds a window's;
- percentile and distinct_count: `flows.spine_sketches`, from the window's values, while the
  sketch the online read merges keeps them exactly (else the per-row tile merge answers).

A key's tiles are made once, when the first window that needs them comes; consecutive spine
rows of a key whose window covers the same events reuse the first one's value.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from connectors.jit import jit
from flows.spine_sketches import event_coupons, hll_estimates, window_distinct, window_quantiles
from flows.spine_windows import _run_sum, _tile_of
from state.layout import ColumnStats, FeatureDef
from state.vectors import list_array
from state.window_sums import first_at_least

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
B8 = npt.NDArray[np.bool_]
Spans = tuple[I64, I64, I64, I64]  # per spine row: lo, end, the newest tile's start, at_newest

# The sorted spine rows are cut in this many parts, a thread each (the kernels release the GIL),
# when there are at least SPLIT_ROWS of them.
PARTS = min(2, os.cpu_count() or 1)
SPLIT_ROWS = 50_000


def side_by_side(
    kernel: Callable[[slice], tuple[npt.NDArray[Any], ...]], n: int
) -> tuple[npt.NDArray[Any], ...]:
    """`kernel`'s outputs (one value per row each) for the n sorted spine rows, run on PARTS
    consecutive parts side by side and put together. A part's first row reuses nothing from
    the row before it, so the values are those of one run."""
    if PARTS == 1 or n < SPLIT_ROWS:
        return kernel(slice(0, n))
    cuts = [n * p // PARTS for p in range(PARTS + 1)]
    with ThreadPoolExecutor(max_workers=PARTS) as pool:
        parts = list(pool.map(kernel, [slice(a, b) for a, b in pairwise(cuts)]))
    return tuple(np.concatenate(outputs) for outputs in zip(*parts, strict=True))


def spine_spans(ts: I64, key_ev: I64, hop: int, window: int, q_kid: I64, q_t: I64) -> Spans:
    """`window_spans` of the sorted spine rows, computed side by side."""
    spans = side_by_side(
        lambda p: window_spans(ts, key_ev, hop, window, q_kid[p], q_t[p]), len(q_t)
    )
    return spans[0], spans[1], spans[2], spans[3]


@jit
def window_spans(
    ts: I64, key_ev: I64, hop: int, window: int, q_kid: I64, q_t: I64
) -> tuple[I64, I64, I64, I64]:
    """Per spine row (sorted by key, time): the window's events [lo, end) of the sorted events,
    where the newest event's tile starts (`part`) and where the events at the newest event
    time start (`at_newest`); lo == end for an empty window. A window of 0 is the lifetime."""
    n = len(q_kid)
    lo, end = np.empty(n, np.int64), np.empty(n, np.int64)
    part, at_newest = np.empty(n, np.int64), np.empty(n, np.int64)
    for i in range(n):
        k, t = q_kid[i], q_t[i]
        first = key_ev[k]
        e = first_at_least(ts, first, key_ev[k + 1], t)
        a = first
        if window and e > first:
            a = first_at_least(ts, first, e, (t // hop - window // hop) * hop)
        lo[i], end[i] = a, e
        if e > a:
            at_newest[i] = first_at_least(ts, a, e, ts[e - 1])
            part[i] = first_at_least(ts, a, at_newest[i], (ts[e - 1] // hop) * hop)
        else:
            at_newest[i], part[i] = e, e
    return lo, end, part, at_newest


@jit
def valid_before(valid: B8) -> I64:
    """How many of the first i values are valid, for i = 0..n (NumPy's cumsum of a bool array
    casts it in chunks, 10x slower)."""
    seen = np.empty(len(valid) + 1, np.int64)
    seen[0] = 0
    for i in range(len(valid)):
        seen[i + 1] = seen[i] + valid[i]
    return seen


@jit
def edge_events(valid: B8, lo: I64, end: I64, last: bool) -> I64:
    """Per range [lo, end): its first (or last) event with a valid value, -1 when none."""
    n = len(lo)
    out = np.full(n, -1, np.int64)
    for i in range(n):
        if last:
            j = end[i] - 1
            while j >= lo[i] and not valid[j]:
                j -= 1
            if j >= lo[i]:
                out[i] = j
        else:
            j = lo[i]
            while j < end[i] and not valid[j]:
                j += 1
            if j < end[i]:
                out[i] = j
    return out


@jit
def newest_events(valid: B8, lo: I64, end: I64, k: int) -> tuple[I64, I64]:
    """Per range [lo, end): its k newest events with a valid value, newest first, as list
    offsets (rows + 1) and the events (flat)."""
    n = len(lo)
    offsets = np.zeros(n + 1, np.int64)
    picked = np.empty(n * k, np.int64)
    m = 0
    for i in range(n):
        j = end[i] - 1
        while j >= lo[i] and m - offsets[i] < k:
            if valid[j]:
                picked[m] = j
                m += 1
            j -= 1
        offsets[i + 1] = m
    return offsets, picked[:m]


@jit
def _row_moments(valid: B8, vals: F64, a: int, b: int, x: F64) -> tuple[int, float, float]:
    """`state.tiles.combine`'s (count, sum, M2) of the events [a, b) as one stored row
    (`vals` and the scratch `x`: one row each, as `_run_sum` reads them)."""
    if b - a == 1:  # one event: its value, and M2 from the same terms
        cnt = int(valid[a])
        total = vals[0, a]
        dev = (total if cnt else 0.0) - (total / cnt if cnt else 0.0)
        return cnt, total, cnt * dev * dev
    cnt, row = 0, int(np.int64(0))  # not a literal 0: `_pairwise` recurses, cached on int64
    for i in range(a, b):
        cnt += valid[i]
    total = _run_sum(vals, row, a, b)
    mean = total / cnt if cnt > 0 else 0.0
    for i in range(a, b):
        dev = (vals[0, i] if valid[i] else 0.0) - mean
        x[0, i - a] = valid[i] * dev * dev
    m2 = _run_sum(x, row, row, b - a)  # x[0], then the others' pairwise sum
    return cnt, total, m2


@jit
def _key_tiles(ts: I64, hop: int, a: int, b: int, first: I64) -> int:
    """How many tiles a key's events [a, b) fill; `first[j]` gets where tile j starts (and
    `first[count]` = b)."""
    inverse, count, i = 1.0 / hop, 0, a
    while i < b:
        first[count] = i
        after = (_tile_of(ts[i], hop, inverse) + 1) * hop
        i += 1
        while i < b and ts[i] < after:
            i += 1
        count += 1
    first[count] = b
    return count


@jit
def _most_events(key_ev: I64, q_kid: I64) -> int:
    most = 1
    for k in q_kid:
        most = max(most, key_ev[k + 1] - key_ev[k])
    return most


@jit
def window_moments(
    ts: I64, valid: B8, vals: F64, hop: int, lifetime: bool, key_ev: I64, q_kid: I64, spans: Spans
) -> F64:
    """Per window (`window_spans`): the M2 the online read merges from the window's rows
    (`state.read._m2`: the rows' M2 in order from 0.0, plus each non-empty row's
    n_i * (mean_i - mean)^2 in order from 0.0). The rows are the key's whole tiles before the
    newest event's tile (each key's tiles made once, when its first spine row comes), then
    that tile's events before the newest time, then those at it; a lifetime's first row holds
    all its events before the newest time."""
    lo, end, part, at_newest = spans
    n, most = len(lo), _most_events(key_ev, q_kid)
    m2_out = np.zeros(n, np.float64)
    first = np.empty(most + 1, np.int64)  # the current key's tiles: where each starts
    tile_cnt, tile_sum = np.empty(most, np.int64), np.empty(most, np.float64)
    tile_m2 = np.empty(most, np.float64)
    cnts, sums, m2s = np.empty(most + 2, np.int64), np.empty(most + 2), np.empty(most + 2)
    x, vals_row = np.empty((1, most), np.float64), vals.reshape(1, -1)
    key, tiles, made_hi = -1, 0, 0  # the key's tiles before made_hi have their moments
    for i in range(n):
        if end[i] == lo[i]:
            continue
        if i and lo[i] == lo[i - 1] and end[i] == end[i - 1]:
            m2_out[i] = m2_out[i - 1]
            continue
        rows = 0
        if lifetime:
            if at_newest[i] > lo[i]:
                cnts[0], sums[0], m2s[0] = _row_moments(valid, vals_row, lo[i], at_newest[i], x)
                rows = 1
        else:
            if q_kid[i] != key:
                key, made_hi = q_kid[i], 0
                tiles = _key_tiles(ts, hop, key_ev[key], key_ev[key + 1], first)
            t_lo = first_at_least(first, 0, tiles, lo[i])
            t_hi = first_at_least(first, t_lo, tiles, part[i])
            for j in range(max(made_hi, t_lo), t_hi):  # made when a window first needs them
                tile_cnt[j], tile_sum[j], tile_m2[j] = _row_moments(
                    valid, vals_row, first[j], first[j + 1], x
                )
            made_hi = max(made_hi, t_hi)
            for j in range(t_lo, t_hi):
                cnts[rows], sums[rows], m2s[rows] = tile_cnt[j], tile_sum[j], tile_m2[j]
                rows += 1
            if at_newest[i] > part[i]:
                cnts[rows], sums[rows], m2s[rows] = _row_moments(
                    valid, vals_row, part[i], at_newest[i], x
                )
                rows += 1
        cnts[rows], sums[rows], m2s[rows] = _row_moments(valid, vals_row, at_newest[i], end[i], x)
        m2_out[i] = _merged_m2(cnts, sums, m2s, rows + 1)
    return m2_out


@jit
def _merged_m2(cnts: I64, sums: F64, m2s: F64, rows: int) -> float:
    """`state.read._m2` of rows [0, rows): their M2 and spread, each added in row order."""
    cnt, total, m2 = 0, 0.0, 0.0
    for r in range(rows):
        cnt += cnts[r]
        total += sums[r]
        m2 += m2s[r]
    if cnt == 0:
        return 0.0
    mean, spread = total / cnt, 0.0
    for r in range(rows):
        if cnts[r]:
            dev = sums[r] / cnts[r] - mean
            spread += cnts[r] * dev * dev
    return m2 + spread


@jit
def _row_vector_sum(
    matrix: npt.NDArray[Any], order: I64, a: int, b: int, events: F64, out: F64
) -> None:
    """out[:] = the stored row [a, b)'s element-wise sum, as `np.add.reduceat(axis=0)` makes
    it (per element, the first value plus the pairwise sum of the others)."""
    width = out.shape[0]
    if b - a == 1:  # one event: its vector
        for j in range(width):
            out[j] = matrix[order[a], j]
        return
    for e in range(a, b):
        for j in range(width):
            events[j, e - a] = matrix[order[e], j]
    zero = int(np.int64(0))  # not a literal 0: `_pairwise` recurses, cached on int64
    for j in range(width):
        out[j] = _run_sum(events, j, zero, b - a)


@jit
def _tile_vector_sums(
    matrix: npt.NDArray[Any], order: I64, first: I64, lo: int, hi: int, events: F64, out: F64
) -> None:
    """out[t] = `_row_vector_sum` of tile t (events [first[t], first[t + 1])), lo <= t < hi."""
    width = out.shape[1]
    zero = int(np.int64(0))  # not a literal 0: `_pairwise` recurses, cached on int64
    for t in range(lo, hi):
        a, b = first[t], first[t + 1]
        if b - a == 1:
            row = order[a]
            for j in range(width):
                out[t, j] = matrix[row, j]
            continue
        for e in range(a, b):
            row = order[e]
            for j in range(width):
                events[j, e - a] = matrix[row, j]
        for j in range(width):
            out[t, j] = _run_sum(events, j, zero, b - a)


@jit
def _gathered(matrix: npt.NDArray[Any], order: I64, a: int, b: int, out: F64) -> None:
    """out[:, e - a] = the vector of sorted event e, for e in [a, b)."""
    for e in range(a, b):
        row = order[e]
        for j in range(out.shape[0]):
            out[j, e - a] = matrix[row, j]


@jit
def _added(total: F64, i: int, rows_sum: F64, r: int, rows: int) -> int:
    """total[i] += rows_sum[r] (= for the first row): `sum(axis=0)`, one row after the other;
    how many rows total[i] then holds."""
    for j in range(total.shape[1]):
        if rows == 0:
            total[i, j] = rows_sum[r, j]
        else:
            total[i, j] += rows_sum[r, j]
    return rows + 1


@jit
def window_vector_sums(
    ts: I64,
    matrix: npt.NDArray[np.floating[Any]],
    lengths: I64,
    order: I64,
    hop: int,
    lifetime: bool,
    key_ev: I64,
    q_kid: I64,
    spans: Spans,
    pos: I64,
    sums: F64,
    dims: I64,
) -> tuple[()]:
    """Per window: the element-wise sum of the vectors (`matrix[order[i]]` for sorted event i,
    as float64; zeros where it has none) as the online read adds them, and their length
    (`lengths[i]`: sorted event i's, 0 when it has none; `lengths` empty: every event has one
    of the matrix's width), written to row pos[i] of `sums` and `dims`.

    The window's sum adds its rows' sums (`_row_vector_sum`) one row after the other, as the
    online read does (`state.read._vector_sum`): the key's whole tiles (their sums made once,
    when its first spine row comes), continued from the window before when it starts at the
    same tile, then the newest event's tile as its two rows. A lifetime's first row is all its
    events before the newest time, summed from the key's vectors gathered once.
    """
    lo, end, part, at_newest = spans
    n, width, most = len(lo), matrix.shape[1], _most_events(key_ev, q_kid)
    first = np.empty(most + 1, np.int64)  # the current key's tiles: where each starts
    tile_sums = np.empty((most, width), np.float64)
    events = np.empty((width, most), np.float64)  # one row's vectors, a column per event
    key_vectors = np.empty((width, most if lifetime else 0), np.float64)  # likewise, the key's
    row = np.empty((1, width), np.float64)
    whole = np.zeros((1, width), np.float64)  # the sum of the tiles [whole_lo, whole_hi)
    key, tiles, whole_lo, whole_hi, whole_rows, made_hi = -1, 0, -1, -1, 0, 0
    for i in range(n):
        p = pos[i]
        if end[i] == lo[i]:
            continue
        if i and lo[i] == lo[i - 1] and end[i] == end[i - 1]:
            sums[p, :], dims[p] = sums[pos[i - 1], :], dims[pos[i - 1]]
            continue
        dims[p] = width if len(lengths) == 0 else 0
        for e in range(lo[i], end[i] if len(lengths) else lo[i]):
            dims[p] = max(dims[p], lengths[e])
        added = 0
        if lifetime:  # one row before the newest time (summed from the key's vectors)
            if q_kid[i] != key:
                key = q_kid[i]
                _gathered(matrix, order, key_ev[key], key_ev[key + 1], key_vectors)
            if at_newest[i] > lo[i]:
                first_row, rows_end = lo[i] - key_ev[key], at_newest[i] - key_ev[key]
                for j in range(width):
                    row[0, j] = _run_sum(key_vectors, j, first_row, rows_end)
                added = _added(sums, p, row, 0, added)
        else:
            if q_kid[i] != key:
                key, whole_lo, made_hi = q_kid[i], -1, 0
                tiles = _key_tiles(ts, hop, key_ev[key], key_ev[key + 1], first)
            t_lo = first_at_least(first, 0, tiles, lo[i])
            t_hi = first_at_least(first, t_lo, tiles, part[i])
            if t_hi > max(made_hi, t_lo):  # a tile's sum is made when a window first needs it
                from_tile = max(made_hi, t_lo)  # (no later window reaches those before t_lo)
                _tile_vector_sums(matrix, order, first, from_tile, t_hi, events, tile_sums)
                made_hi = t_hi
            if not (t_lo == whole_lo and whole_hi <= t_hi):
                whole_lo, whole_hi, whole_rows = t_lo, t_lo, 0
            while whole_hi < t_hi:
                whole_rows = _added(whole, 0, tile_sums, whole_hi, whole_rows)
                whole_hi += 1
            if whole_rows:
                _added(sums, p, whole, 0, 0)
                added = whole_rows
            if at_newest[i] > part[i]:  # the newest tile's events before the newest time
                _row_vector_sum(matrix, order, part[i], at_newest[i], events, row[0])
                added = _added(sums, p, row, 0, added)
        _row_vector_sum(matrix, order, at_newest[i], end[i], events, row[0])
        _added(sums, p, row, 0, added)
    return ()


class SortedColumns(Protocol):
    """The events in (key, time, offset) order as the window kernels read them."""

    events: pa.Table  # in log order; `order[i]` is the row of sorted event i
    order: I64
    sorted_ts: I64
    key_starts: I64  # where each key id's sorted events start (keys + 1 bounds)

    def column(self, name: str, numeric: bool) -> tuple[B8, I64, F64]:
        """Per sorted event: whether `name` is valid there, how many events before it have a
        valid value, its value as float64 (0.0 where not valid, and for non-numeric columns)."""
        ...

    def vectors(self, name: str) -> tuple[npt.NDArray[np.floating[Any]], I64]:
        """The vector column `name` as a zero-padded matrix (float32 or float64) and its
        lengths, in log order."""
        ...


def merged_feature(
    f: FeatureDef,
    col: ColumnStats,
    hop: int,
    q_kid: I64,
    spans: Spans,
    ev: SortedColumns,
    back: I64,
) -> tuple[pa.Array, B8 | None]:
    """One feature's values for the windows `spans` (`window_spans`, spine rows sorted by key
    and time; `q_kid`: their key ids) in spine order (`back`: each spine row's place among the
    sorted ones), and which sorted windows the per-row tile merge must answer instead (None:
    none)."""
    lo, end = spans[0], spans[1]
    if col.vector:
        return _vector_feature(f, col, hop, q_kid, spans, ev, back), None
    valid, seen, vals = ev.column(col.column, col.numeric)
    cnt = (seen[end] - seen[lo])[back]
    if f.agg == "count":
        return pa.array(cnt, pa.int64()), None
    if f.agg in ("var", "std"):
        lifetime, keys = f.window_us == 0, ev.key_starts
        (m2,) = side_by_side(
            lambda p: (
                window_moments(
                    ev.sorted_ts, valid, vals, hop, lifetime, keys, q_kid[p], _at(spans, p)
                ),
            ),
            len(lo),
        )
        m2 = m2[back]
        with np.errstate(invalid="ignore"):
            var = np.maximum(m2 / np.maximum(cnt, 1), 0.0)
        values = np.sqrt(var) if f.agg == "std" else var
        return pa.array(values, pa.float64(), mask=(cnt == 0) | np.isnan(values)), None
    if f.agg in ("first", "last"):
        picked = edge_events(valid, lo, end, f.agg == "last")[back]
        none = picked < 0
        if not col.numeric:
            return _taken(ev.events.column(col.column), pa.array(ev.order[picked], mask=none)), None
        values = vals[picked]
        if col.integral:
            return pa.array(np.where(none, 0, values).astype(np.int64), mask=none), None
        return pa.array(values, pa.float64(), mask=none | np.isnan(values)), None
    if f.agg == "last_k":
        offsets, picked = newest_events(valid, lo, end, int(f.param or 0))
        if col.numeric:
            flat = pa.array(vals[picked], pa.float64())
        else:
            flat = _taken(ev.events.column(col.column), pa.array(ev.order[picked]))
        empty = pa.array(offsets[1:] == offsets[:-1])  # null where the window holds none
        lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat, mask=empty)
        return lists.take(pa.array(back)), None
    if f.agg == "percentile":
        q, needs = side_by_side(
            lambda p: window_quantiles(valid, vals, float(f.param or 0.5), lo[p], end[p]), len(lo)
        )
        return pa.array(q[back], pa.float64(), mask=cnt == 0), needs
    if f.agg == "distinct_count":
        coupons = event_coupons(ev.events.column(col.column), col.numeric)[ev.order]
        estimates = hll_estimates()
        est, needs = side_by_side(
            lambda p: window_distinct(valid, coupons, estimates, lo[p], end[p]), len(lo)
        )
        return pa.array(est[back], pa.int64(), mask=cnt == 0), needs
    raise NotImplementedError(f"aggregation {f.agg!r} in a point-in-time window")


def _vector_feature(
    f: FeatureDef,
    col: ColumnStats,
    hop: int,
    q_kid: I64,
    spans: Spans,
    ev: SortedColumns,
    back: I64,
) -> pa.Array:
    matrix, lengths = ev.vectors(col.column)
    n, width = len(lengths), matrix.shape[1]
    if n and bool((lengths == width).all()):  # every event has a vector of one length
        sorted_lengths, valid = np.zeros(0, np.int64), np.ones(n, np.bool_)
    else:
        sorted_lengths = lengths[ev.order]
        valid = sorted_lengths > 0  # null and empty vectors alike hold no value
    lo, end = spans[0], spans[1]
    seen = valid_before(valid)
    cnt = (seen[end] - seen[lo])[back]
    if f.agg == "count":
        return pa.array(cnt, pa.int64())
    if f.agg == "mean":
        sums, dims = np.zeros((len(lo), width)), np.zeros(len(lo), np.int64)
        pos = np.argsort(back)  # each sorted row's place in spine order
        side_by_side(
            lambda p: window_vector_sums(
                ev.sorted_ts, matrix, sorted_lengths, ev.order, hop, f.window_us == 0,
                ev.key_starts, q_kid[p], _at(spans, p), pos[p], sums, dims,
            ),
            len(lo),
        )  # fmt: skip
        sums /= np.maximum(cnt, 1).astype(np.float64)[:, None]
        return _lists(sums, dims, cnt == 0)
    picked = edge_events(valid, lo, end, f.agg == "last")[back]
    rows = ev.order[np.maximum(picked, 0)]
    values = matrix[rows].astype(np.float64)
    return list_array(values, np.where(picked < 0, 0, lengths[rows]), picked < 0)


def _lists(matrix: F64, lengths: I64, null: B8) -> pa.Array:
    """`state.vectors.list_array`: the rows cut to their lengths; when every row that is not
    null is the matrix's width, its values as they stand (a null row keeps its zeros)."""
    width = matrix.shape[1]
    if not bool((null | (lengths == width)).all()):
        return list_array(matrix, lengths, null)
    offsets = pa.array(np.arange(0, (len(matrix) + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.ravel()), mask=pa.array(null))


def _at(spans: Spans, part: slice) -> Spans:
    lo, end, newest_tile, at_newest = spans
    return lo[part], end[part], newest_tile[part], at_newest[part]


def _taken(column: pa.ChunkedArray, rows: pa.Array) -> pa.Array:
    taken = column.take(rows)
    return taken.combine_chunks() if isinstance(taken, pa.ChunkedArray) else taken
