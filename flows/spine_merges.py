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
- a vector mean adds the same rows' element-wise sums one row after the other, as NumPy's
  `sum(axis=0)` and `reduceat(axis=0)` do;
- percentile: a KLL sketch (k=200) that holds at most 200 values keeps them all, and its
  quantile is then a rank in the sorted values (`kll_quantile`); distinct_count: an HLL union of
  at most 384 distinct coupons stays a coupon set, whose estimate is a function of their number
  (`hll_estimates`, read from DataSketches itself). Each event's coupon is DataSketches' own,
  from a one-value sketch per distinct value. A window past those bounds (or a percentile over
  a NaN) is left to the per-row tile merge (`needs_merge`), the online read's sketch merge.

Consecutive spine rows of a key whose window covers the same events reuse the first one's value.
"""

from __future__ import annotations

import struct
from typing import Any, Protocol

import datasketches as ds
import numpy as np
import numpy.typing as npt
import pyarrow as pa

from connectors.jit import jit
from flows.spine_windows import _pairwise, _run_sum, _tile_of
from state.layout import ColumnStats, FeatureDef
from state.sketches import HLL_LG_K, KLL_K
from state.vectors import list_array
from state.window_sums import first_at_least

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
B8 = npt.NDArray[np.bool_]

# An HLL union stays a coupon set (its estimate a function of the coupon count) up to this many
# distinct coupons (lg_k 12: 3/4 of the 512-slot set); the next one makes it an HLL array.
HLL_SET_MAX = 384
NO_COUPON = -1  # a value DataSketches does not count (the empty string)


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
def _window_rows(
    ts: I64, hop: int, lifetime: bool, lo: int, part: int, at_newest: int, bounds: I64
) -> int:
    """Where the online read's rows of a window [lo, end) start (written to `bounds`), and how
    many there are: whole tiles before `part` (the lifetime's one row instead), then the newest
    tile's events before the newest time, then those at it (always a row)."""
    n = 1
    bounds[0] = lo
    if lifetime:
        if at_newest > lo:
            bounds[n] = at_newest
            n += 1
        return n
    inverse, i = 1.0 / hop, lo
    while i < part:
        after = (_tile_of(ts[i], hop, inverse) + 1) * hop
        while i < part and ts[i] < after:
            i += 1
        bounds[n] = i
        n += 1
    if at_newest > bounds[n - 1]:
        bounds[n] = at_newest
        n += 1
    return n


@jit
def window_moments(
    ts: I64, valid: B8, vals: F64, hop: int, lifetime: bool, spans: tuple[I64, I64, I64, I64]
) -> F64:
    """Per window (`window_spans`): the M2 the online read merges from the window's rows
    (`state.read._m2`: the rows' M2 in order from 0.0, plus each non-empty row's
    n_i * (mean_i - mean)^2 in order from 0.0)."""
    lo, end, part, at_newest = spans
    n = len(lo)
    m2_out = np.zeros(n, np.float64)
    widest = 1
    for i in range(n):
        widest = max(widest, end[i] - lo[i])
    x, bounds = np.empty((1, widest), np.float64), np.empty(widest + 2, np.int64)
    counts, sums = np.empty(widest + 2, np.int64), np.empty(widest + 2, np.float64)
    m2s = np.empty(widest + 2, np.float64)
    vals_row = vals.reshape(1, -1)
    for i in range(n):
        if end[i] == lo[i]:
            continue
        if i and lo[i] == lo[i - 1] and end[i] == end[i - 1]:
            m2_out[i] = m2_out[i - 1]
            continue
        rows = _window_rows(ts, hop, lifetime, lo[i], part[i], at_newest[i], bounds)
        cnt, total, m2 = 0, 0.0, 0.0
        for r in range(rows):
            b = bounds[r + 1] if r + 1 < rows else end[i]
            counts[r], sums[r], m2s[r] = _row_moments(valid, vals_row, bounds[r], b, x)
            cnt += counts[r]
            total += sums[r]
            m2 += m2s[r]
        if cnt == 0:
            continue
        mean, spread = total / cnt, 0.0
        for r in range(rows):
            if counts[r]:
                dev = sums[r] / counts[r] - mean
                spread += counts[r] * dev * dev
        m2_out[i] = m2 + spread
    return m2_out


@jit
def window_vector_sums(
    ts: I64,
    valid: B8,
    matrix: npt.NDArray[np.floating[Any]],
    lengths: I64,
    order: I64,
    hop: int,
    lifetime: bool,
    spans: tuple[I64, I64, I64, I64],
) -> tuple[F64, I64]:
    """Per window: the element-wise sum of the valid vectors (`matrix[order[i]]` for sorted
    event i, as float64; rows without one are zeros) as the online read adds them, and their
    length (`lengths[i]`: sorted event i's, 0 when it has none).

    A stored row's sum is `np.add.reduceat(axis=0)`'s (per element, the first value plus the
    pairwise sum of the others); the window's is `sum(axis=0)` over its rows' sums: one row
    after the other, or for vectors of length 1 (a contiguous column) NumPy's pairwise sum.
    """
    lo, end, part, at_newest = spans
    n, width = len(lo), matrix.shape[1]
    sums, dims = np.zeros((n, width), np.float64), np.zeros(n, np.int64)
    widest = 1
    for i in range(n):
        widest = max(widest, end[i] - lo[i])
    bounds = np.empty(widest + 2, np.int64)
    events = np.empty((width, widest), np.float64)  # one row's vectors, a column per event
    rows_sum = np.empty((width, widest + 2), np.float64)  # each row's sum, a column per row
    zero = int(np.int64(0))  # not a literal 0: `_pairwise` recurses, cached on int64
    for i in range(n):
        if end[i] == lo[i]:
            continue
        if i and lo[i] == lo[i - 1] and end[i] == end[i - 1]:
            sums[i, :], dims[i] = sums[i - 1, :], dims[i - 1]
            continue
        rows = _window_rows(ts, hop, lifetime, lo[i], part[i], at_newest[i], bounds)
        for r in range(rows):
            a, b = bounds[r], bounds[r + 1] if r + 1 < rows else end[i]
            for e in range(a, b):
                dims[i] = max(dims[i], lengths[e])
            if b - a == 1:  # a one-event row's sum is its vector
                for j in range(width):
                    rows_sum[j, r] = matrix[order[a], j]
                continue
            for e in range(a, b):
                for j in range(width):
                    events[j, e - a] = matrix[order[e], j]
            for j in range(width):
                rows_sum[j, r] = _run_sum(events, j, zero, b - a)
        for j in range(width):
            if dims[i] == 1:
                sums[i, j] = _pairwise(rows_sum, j, zero, rows)
            else:
                acc = rows_sum[j, 0]
                for r in range(1, rows):
                    acc += rows_sum[j, r]
                sums[i, j] = acc
    return sums, dims


@jit
def kll_quantile(values: F64, q: float) -> float:
    """The exclusive q-quantile of a KLL sketch that holds `values` (sorted) all at weight 1:
    the first value whose cumulative weight exceeds q * n (the last one when none does)."""
    n = len(values)
    target = q * n
    for i in range(n):
        if i + 1 > target:
            return float(values[i])
    return float(values[n - 1])


@jit
def window_quantiles(
    valid: B8, vals: F64, q: float, lo: I64, end: I64
) -> tuple[F64, npt.NDArray[np.bool_]]:
    """Per window: the percentile of its valid values when a KLL sketch keeps them all (at most
    KLL_K values, none NaN), else `needs_merge` is set."""
    n = len(lo)
    out, needs_merge = np.full(n, np.nan), np.zeros(n, np.bool_)
    buf = np.empty(KLL_K, np.float64)
    for i in range(n):
        if i and lo[i] == lo[i - 1] and end[i] == end[i - 1]:
            out[i], needs_merge[i] = out[i - 1], needs_merge[i - 1]
            continue
        m = 0
        for e in range(lo[i], end[i]):
            if valid[e]:
                if m == KLL_K or vals[e] != vals[e]:
                    needs_merge[i] = True
                    break
                buf[m] = vals[e]
                m += 1
        if m and not needs_merge[i]:
            out[i] = kll_quantile(np.sort(buf[:m]), q)
    return out, needs_merge


@jit
def window_distinct(
    valid: B8, coupons: I64, estimates: I64, lo: I64, end: I64
) -> tuple[I64, npt.NDArray[np.bool_]]:
    """Per window: the HLL estimate of its valid values' distinct coupons while they are at most
    HLL_SET_MAX, else `needs_merge` is set."""
    n = len(lo)
    out, needs_merge = np.zeros(n, np.int64), np.zeros(n, np.bool_)
    buf = np.empty(HLL_SET_MAX, np.int64)
    for i in range(n):
        if i and lo[i] == lo[i - 1] and end[i] == end[i - 1]:
            out[i], needs_merge[i] = out[i - 1], needs_merge[i - 1]
            continue
        m = 0  # buf[:m]: the distinct coupons so far, sorted
        for e in range(lo[i], end[i]):
            if valid[e] and coupons[e] != NO_COUPON:
                at = first_at_least(buf, 0, m, coupons[e])
                if at < m and buf[at] == coupons[e]:
                    continue
                if m == HLL_SET_MAX:
                    needs_merge[i] = True
                    break
                for x in range(m, at, -1):
                    buf[x] = buf[x - 1]
                buf[at] = coupons[e]
                m += 1
        if not needs_merge[i]:
            out[i] = estimates[m]
    return out, needs_merge


def coupon_of(value: object) -> int:
    """DataSketches' HLL coupon of one value (the sketch's own hash): NO_COUPON when the
    sketch does not count it."""
    sketch = ds.hll_sketch(HLL_LG_K)
    sketch.update(value)
    raw = sketch.serialize_compact()
    return int(struct.unpack_from("<I", raw, 8)[0]) if len(raw) > 8 else NO_COUPON


def event_coupons(column: pa.ChunkedArray | pa.Array, numeric: bool) -> I64:
    """Each event's HLL coupon (NO_COUPON where null or not counted), one sketch per distinct
    value: the value as the write path passes it (float64 for numeric columns)."""
    if numeric:
        column = column.cast(pa.float64())
    encoded = pa.chunked_array([column] if isinstance(column, pa.Array) else column.chunks)
    encoded = encoded.combine_chunks().dictionary_encode()
    table = np.array(
        [coupon_of(v) for v in encoded.dictionary.to_pylist()] + [NO_COUPON], dtype=np.int64
    )
    idx = encoded.indices.fill_null(len(encoded.dictionary))
    return table[np.asarray(idx.to_numpy(zero_copy_only=False), dtype=np.int64)]


_ESTIMATES: list[I64] = []


def hll_estimates() -> I64:
    """round(estimate) of an HLL union's result holding m distinct coupons, m = 0..HLL_SET_MAX
    (a coupon set's estimate depends on m alone), from DataSketches itself."""
    if not _ESTIMATES:
        union = ds.hll_union(HLL_LG_K)
        out = [round(union.get_result(ds.tgt_hll_type.HLL_8).get_estimate())]
        coupons: set[int] = set()
        value = 0
        while len(out) <= HLL_SET_MAX:
            value += 1
            coupon = coupon_of(value)
            if coupon in coupons:
                continue  # a collision adds no coupon: skip it
            coupons.add(coupon)
            union.update(_single(value))
            out.append(round(union.get_result(ds.tgt_hll_type.HLL_8).get_estimate()))
        _ESTIMATES.append(np.array(out, dtype=np.int64))
    return _ESTIMATES[0]


def _single(value: object) -> ds.hll_sketch:
    sketch = ds.hll_sketch(HLL_LG_K)
    sketch.update(value)
    return sketch


class SortedColumns(Protocol):
    """The events in (key, time, offset) order as the window kernels read them."""

    events: pa.Table  # in log order; `order[i]` is the row of sorted event i
    order: I64
    sorted_ts: I64

    def column(self, name: str, numeric: bool) -> tuple[B8, I64, F64]:
        """Per sorted event: whether `name` is valid there, how many events before it have a
        valid value, its value as float64 (0.0 where not valid, and for non-numeric columns)."""
        ...

    def vectors(self, name: str) -> tuple[npt.NDArray[np.floating[Any]], I64]:
        """The vector column `name` as a zero-padded matrix (float32 or float64) and its
        lengths, in log order."""
        ...


Spans = tuple[I64, I64, I64, I64]


def merged_feature(
    f: FeatureDef, col: ColumnStats, hop: int, spans: Spans, ev: SortedColumns, back: I64
) -> tuple[pa.Array, B8 | None]:
    """One feature's values for the windows `spans` (`window_spans`, spine rows sorted by key
    and time) in spine order (`back`: each spine row's place among the sorted ones), and which
    sorted windows the per-row tile merge must answer instead (None: none)."""
    lo, end = spans[0], spans[1]
    if col.vector:
        return _vector_feature(f, col, hop, spans, ev, back), None
    valid, seen, vals = ev.column(col.column, col.numeric)
    cnt = (seen[end] - seen[lo])[back]
    if f.agg == "count":
        return pa.array(cnt, pa.int64()), None
    if f.agg in ("var", "std"):
        m2 = window_moments(ev.sorted_ts, valid, vals, hop, f.window_us == 0, spans)[back]
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
        q, needs = window_quantiles(valid, vals, float(f.param or 0.5), lo, end)
        return pa.array(q[back], pa.float64(), mask=cnt == 0), needs
    if f.agg == "distinct_count":
        coupons = event_coupons(ev.events.column(col.column), col.numeric)[ev.order]
        est, needs = window_distinct(valid, coupons, hll_estimates(), lo, end)
        return pa.array(est[back], pa.int64(), mask=cnt == 0), needs
    raise NotImplementedError(f"aggregation {f.agg!r} in a point-in-time window")


def _vector_feature(
    f: FeatureDef, col: ColumnStats, hop: int, spans: Spans, ev: SortedColumns, back: I64
) -> pa.Array:
    matrix, lengths = ev.vectors(col.column)
    sorted_lengths = lengths[ev.order]
    valid = sorted_lengths > 0  # null and empty vectors alike hold no value
    lo, end = spans[0], spans[1]
    seen = valid_before(valid)
    cnt = (seen[end] - seen[lo])[back]
    if f.agg == "count":
        return pa.array(cnt, pa.int64())
    if f.agg == "mean":
        sums, dims = window_vector_sums(
            ev.sorted_ts, valid, matrix, sorted_lengths, ev.order, hop, f.window_us == 0, spans
        )
        means = sums[back] / np.maximum(cnt, 1).astype(np.float64)[:, None]
        return list_array(means, dims[back], cnt == 0)
    picked = edge_events(valid, lo, end, f.agg == "last")[back]
    rows = ev.order[np.maximum(picked, 0)]
    values = matrix[rows].astype(np.float64)
    return list_array(values, np.where(picked < 0, 0, lengths[rows]), picked < 0)


def _taken(column: pa.ChunkedArray, rows: pa.Array) -> pa.Array:
    taken = column.take(rows)
    return taken.combine_chunks() if isinstance(taken, pa.ChunkedArray) else taken
