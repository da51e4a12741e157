"""Point-in-time percentiles and distinct counts, compiled: the value the online read's sketch
merge gives, from the window's values, while that sketch keeps them exactly.

`flows.spine_merges` hands each window here as a range [lo, end) of the events in (key, time,
offset) order. The online read (`state.read.summary_value`) merges the window's tiles'
sketches (`state.sketches`, Apache DataSketches); this module gives the same value without a
sketch (tests/flows/test_pointintime_merges.py):

- percentile: a KLL sketch (k=200) that has seen at most 200 values keeps them all at weight
  1 (it compacts, at random, only past k), so its quantile is a rank in the sorted values
  (`kll_quantile`: DataSketches' exclusive rule; a tied -0.0 and 0.0 may come out with either
  sign, as the sketch's own order of ties decides);
- distinct_count: an HLL union (lg_k 12) that has seen at most HLL_SET_MAX distinct coupons
  stays a coupon set, and a coupon set's estimate is a function of their number alone
  (`hll_estimates`, read from DataSketches itself). An event's coupon is the sketch's own
  (`coupon_of`: one one-value sketch per distinct value of the column).

A window past those bounds, or a percentile over a NaN, is flagged (`needs_merge`) and left to
the per-row tile merge, the online read's own sketch merge (past k a KLL sketch compacts at
random, so two online reads of such a window may differ too). The values of a window are kept
sorted from one spine row to the next, which covers the same events or later ones.
"""

from __future__ import annotations

import struct
from typing import Any

import datasketches as ds
import numpy as np
import numpy.typing as npt
import pyarrow as pa

from connectors.jit import jit
from state.sketches import HLL_LG_K, KLL_K

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
B8 = npt.NDArray[np.bool_]

# An HLL union stays a coupon set (its estimate a function of the coupon count) up to this many
# distinct coupons (lg_k 12: 3/4 of the 512-slot set); the next one makes it an HLL array.
HLL_SET_MAX = 384
NO_COUPON = -1  # a value DataSketches does not count (the empty string)


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
def _widest(lo: I64, end: I64) -> int:
    widest = 1
    for i in range(len(lo)):
        widest = max(widest, end[i] - lo[i])
    return widest


@jit
def _insert(buf: npt.NDArray[Any], m: int, value: Any) -> None:
    """value into the sorted buf[:m] (room for it at buf[m])."""
    at = np.searchsorted(buf[:m], value)
    for x in range(m, at, -1):
        buf[x] = buf[x - 1]
    buf[at] = value


@jit
def _remove(buf: npt.NDArray[Any], m: int, value: Any) -> None:
    """One copy of value out of the sorted buf[:m] (a tied -0.0 and 0.0 are one value)."""
    at = np.searchsorted(buf[:m], value)
    for x in range(at, m - 1):
        buf[x] = buf[x + 1]


@jit
def window_quantiles(
    valid: B8, vals: F64, q: float, lo: I64, end: I64
) -> tuple[F64, npt.NDArray[np.bool_]]:
    """Per window: the percentile of its valid values when a KLL sketch keeps them all (at most
    KLL_K values, none NaN), else `needs_merge` is set. The values are kept sorted from one
    window to the next, which covers the same events or later ones (a sliding window)."""
    n = len(lo)
    out, needs_merge = np.full(n, np.nan), np.zeros(n, np.bool_)
    buf = np.empty(_widest(lo, end), np.float64)  # the window's values but NaN, sorted
    m, nans, at_lo, at_end = 0, 0, 0, -1  # buf holds the events [at_lo, at_end)
    for i in range(n):
        if lo[i] == end[i]:
            continue
        if not (at_lo <= lo[i] <= at_end <= end[i]):
            m, nans, at_lo, at_end = 0, 0, lo[i], lo[i]
        for e in range(at_lo, lo[i]):  # the events the window no longer holds
            if valid[e]:
                if vals[e] != vals[e]:
                    nans -= 1
                else:
                    _remove(buf, m, vals[e])
                    m -= 1
        for e in range(at_end, end[i]):  # and those it holds now
            if valid[e]:
                if vals[e] != vals[e]:
                    nans += 1
                else:
                    _insert(buf, m, vals[e])
                    m += 1
        at_lo, at_end = lo[i], end[i]
        if nans or m > KLL_K:
            needs_merge[i] = True
        elif m:
            out[i] = kll_quantile(buf[:m], q)
    return out, needs_merge


@jit
def window_distinct(
    valid: B8, coupons: I64, estimates: I64, lo: I64, end: I64
) -> tuple[I64, npt.NDArray[np.bool_]]:
    """Per window: the HLL estimate of its valid values' distinct coupons while they are at most
    HLL_SET_MAX, else `needs_merge` is set. The coupons are kept sorted (with repeats) from one
    window to the next, as `window_quantiles` keeps its values."""
    n = len(lo)
    out, needs_merge = np.zeros(n, np.int64), np.zeros(n, np.bool_)
    buf = np.empty(_widest(lo, end), np.int64)
    m, distinct, at_lo, at_end = 0, 0, 0, -1  # buf holds the coupons of [at_lo, at_end)
    for i in range(n):
        if lo[i] == end[i]:
            continue
        if not (at_lo <= lo[i] <= at_end <= end[i]):
            m, distinct, at_lo, at_end = 0, 0, lo[i], lo[i]
        for e in range(at_lo, lo[i]):
            c = coupons[e]
            if valid[e] and c != NO_COUPON:
                _remove(buf, m, c)
                m -= 1
                at = np.searchsorted(buf[:m], c)
                distinct -= not (at < m and buf[at] == c)
        for e in range(at_end, end[i]):
            c = coupons[e]
            if valid[e] and c != NO_COUPON:
                at = np.searchsorted(buf[:m], c)
                distinct += not (at < m and buf[at] == c)
                _insert(buf, m, c)
                m += 1
        at_lo, at_end = lo[i], end[i]
        if distinct > HLL_SET_MAX:
            needs_merge[i] = True
        else:
            out[i] = estimates[distinct]
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
