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
  (`hll_estimates`, read from DataSketches itself). An event's coupon is the sketch's own: its
  hash, MurmurHash3_x64_128 of the value's bytes, compiled here (`float_coupons`,
  `string_coupons`; equal to DataSketches' by test), or a one-value sketch per distinct value
  for other types (`coupon_of`).

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


def event_coupons(column: pa.ChunkedArray, numeric: bool) -> I64:
    """Each event's HLL coupon (NO_COUPON where the sketch does not count the value, or it is
    null), the value as the write path passes it: float64 for numeric columns. One coupon per
    distinct value: compiled for floats and strings (`float_coupons`, `string_coupons`),
    through a one-value sketch for other types (`coupon_of`)."""
    if numeric:
        column = column.cast(pa.float64())
    encoded = column.combine_chunks().dictionary_encode()
    values = encoded.dictionary
    if numeric:
        table = float_coupons(np.asarray(values.to_numpy(), dtype=np.float64))
    elif pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        table = string_coupons(*_utf8(values))
    else:
        table = np.array([coupon_of(v) for v in values.to_pylist()], dtype=np.int64)
    table = np.append(table, NO_COUPON)  # the nulls' index
    idx = encoded.indices.fill_null(len(values))
    return table[np.asarray(idx.to_numpy(zero_copy_only=False), dtype=np.int64)]


def _utf8(chunk: pa.Array) -> tuple[I64, npt.NDArray[np.uint8]]:
    """A string array's n + 1 offsets into its UTF-8 bytes, and the bytes (no copy of them)."""
    _, offsets, data = chunk.buffers()
    kind = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
    bounds = np.frombuffer(offsets, kind)[chunk.offset : chunk.offset + len(chunk) + 1]
    raw = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    return bounds.astype(np.int64), raw


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


# DataSketches' HLL hash: MurmurHash3_x64_128 (seed 9001) of the value's bytes: a float64's 8
# bytes (-0.0 made 0.0, NaN Java's canonical NaN), a string's UTF-8 bytes. All uint64: Numba
# makes a float of a signed and an unsigned integer mixed.
_U = np.uint64
_SEED, _C1, _C2 = _U(9001), _U(0x87C37B91114253D5), _U(0x4CF5AD432745937F)


@jit
def _rotl64(x: np.uint64, r: int) -> np.uint64:
    return (x << _U(r)) | (x >> _U(64 - r))


@jit
def _fmix64(k: np.uint64) -> np.uint64:
    k ^= k >> _U(33)
    k *= _U(0xFF51AFD7ED558CCD)
    k ^= k >> _U(33)
    k *= _U(0xC4CEB9FE1A85EC53)
    k ^= k >> _U(33)
    return k


@jit
def _word(data: npt.NDArray[np.uint8], at: int, n: int) -> np.uint64:
    """The little-endian word of the n <= 8 bytes data[at:at + n]."""
    k = _U(0)
    for j in range(n):
        k |= _U(data[at + j]) << _U(8 * j)
    return k


@jit
def bytes_coupon(data: npt.NDArray[np.uint8], start: int, n: int) -> int:
    """The HLL coupon of the n bytes data[start:start + n]: the low 26 bits of the hash's first
    half, and above them 1 + the leading zeros of its second half (at most 62 + 1)."""
    h1, h2 = _SEED, _SEED
    blocks = n // 16
    for b in range(blocks):
        k1 = _word(data, start + 16 * b, 8)
        k2 = _word(data, start + 16 * b + 8, 8)
        h1 ^= _rotl64(k1 * _C1, 31) * _C2
        h1 = (_rotl64(h1, 27) + h2) * _U(5) + _U(0x52DCE729)
        h2 ^= _rotl64(k2 * _C2, 33) * _C1
        h2 = (_rotl64(h2, 31) + h1) * _U(5) + _U(0x38495AB5)
    tail, rest = start + 16 * blocks, n % 16
    if rest > 8:
        h2 ^= _rotl64(_word(data, tail + 8, rest - 8) * _C2, 33) * _C1
    if rest > 0:
        h1 ^= _rotl64(_word(data, tail, min(rest, 8)) * _C1, 31) * _C2
    h1 ^= _U(n)
    h2 ^= _U(n)
    h1 += h2
    h2 += h1
    h1, h2 = _fmix64(h1), _fmix64(h2)
    h1 += h2
    h2 += h1
    leading = 0
    while leading < 62 and not (h2 >> _U(63 - leading)) & _U(1):
        leading += 1
    return ((leading + 1) << 26) | int(h1 & _U(0x3FFFFFF))


@jit
def float_coupons(values: F64) -> I64:
    """Each float64's HLL coupon, as `hll_sketch.update(float)` hashes it."""
    out = np.empty(len(values), np.int64)
    word = np.empty(1, np.float64)
    raw = word.view(np.uint8)
    bits = word.view(np.int64)
    for i in range(len(values)):
        word[0] = values[i]
        if values[i] == 0.0:
            word[0] = 0.0
        elif values[i] != values[i]:
            bits[0] = 0x7FF8000000000000
        out[i] = bytes_coupon(raw, 0, 8)
    return out


@jit
def string_coupons(offsets: I64, data: npt.NDArray[np.uint8]) -> I64:
    """Each string's HLL coupon (`offsets`: n + 1 bounds into the UTF-8 `data`); NO_COUPON
    for the empty string, which the sketch does not count."""
    n = len(offsets) - 1
    out = np.empty(n, np.int64)
    for i in range(n):
        size = offsets[i + 1] - offsets[i]
        out[i] = bytes_coupon(data, offsets[i], size) if size else NO_COUPON
    return out
