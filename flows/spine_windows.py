"""Point-in-time windows of plain features (count, sum, mean, min, max), compiled: the events in
(key, time, offset) order, each key's tiles of one hop group, and every spine row's window
totals in one pass (Numba, `nogil`).

`flows.pointintime` hands a hop group here when all its features are plain. Per spine row
(key k, time t) and window W, the value covers the events of k with start(t) <= ts < t (the
tiles of k from t//hop - W//hop on), as the NumPy path (`_GroupTiles.reduced_rows`) bounds them.

Float sums are bit for bit those of the online read of a view that applied the key's events
before t in one batch (tests/flows/test_pointintime_exact.py):

- a stored row's sum is `state.tiles.combine`'s (`np.add.reduceat` over its events in (time,
  offset) order: the first value plus NumPy's pairwise sum of the others, `_pairwise`, which
  repeats NumPy's blocking by 8 and 128 exactly);
- the write path keeps a key's events at its newest event time in a row of their own (the
  boundary row, `flows.aggregate._merge_group`), so the newest event's tile is two rows here too;
- a window adds its rows' sums in row order from 0.0, as the online read does (`state.read`,
  `state.window_sums`).

Counts are exact integers; min and max keep the first of equal values and let NaN win (as
`np.minimum` does). Compiled on first use (a few seconds) and cached on disk by Numba.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from connectors.jit import jit
from state.window_sums import first_at_least

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
B8 = npt.NDArray[np.bool_]
Tiles = tuple[I64, I64, I64, F64, F64, F64]

# Which stats a column's tiles keep, as `stats` rows of the kernels: sum, min, max (0 or 1).
SUM, MIN, MAX = 0, 1, 2


@jit
def in_time_order(ts: I64, off: I64) -> bool:
    """Whether the rows are in (event time, offset) order already (ties kept as they stand)."""
    for i in range(1, len(ts)):
        if ts[i] < ts[i - 1] or (ts[i] == ts[i - 1] and off[i] < off[i - 1]):
            return False
    return True


@jit
def key_order(kid: I64, base: I64, n_keys: int) -> tuple[I64, I64]:
    """The rows stably sorted by key id (a counting sort), taken in `base` order (all rows in
    row order when `base` is empty), and where each key's rows start (n_keys + 1 bounds)."""
    n = len(kid)
    starts = np.zeros(n_keys + 1, np.int64)
    for i in range(n):
        starts[kid[i] + 1] += 1
    for k in range(n_keys):
        starts[k + 1] += starts[k]
    at = starts[:-1].copy()
    order = np.empty(n, np.int64)
    for j in range(n):
        i = base[j] if len(base) else j
        k = kid[i]
        order[at[k]] = i
        at[k] += 1
    return order, starts


@jit
def _pairwise(a: F64, c: int, lo: int, n: int) -> float:
    """NumPy's pairwise sum of a[c, lo:lo + n] (`pairwise_sum_DOUBLE`), operation for operation."""
    if n < 8:
        res = -0.0
        for i in range(lo, lo + n):
            res += a[c, i]
        return res
    if n <= 128:
        r0, r1, r2, r3 = a[c, lo], a[c, lo + 1], a[c, lo + 2], a[c, lo + 3]
        r4, r5, r6, r7 = a[c, lo + 4], a[c, lo + 5], a[c, lo + 6], a[c, lo + 7]
        i = lo + 8
        end = lo + n - n % 8
        while i < end:
            r0 += a[c, i]
            r1 += a[c, i + 1]
            r2 += a[c, i + 2]
            r3 += a[c, i + 3]
            r4 += a[c, i + 4]
            r5 += a[c, i + 5]
            r6 += a[c, i + 6]
            r7 += a[c, i + 7]
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < lo + n:
            res += a[c, i]
            i += 1
        return float(res)
    half = n // 2
    half -= half % 8
    return _pairwise(a, c, lo, half) + _pairwise(a, c, lo + half, n - half)


@jit
def _run_sum(a: F64, c: int, lo: int, hi: int) -> float:
    """`np.add.reduceat`'s sum of the run a[c, lo:hi] (hi > lo): its first value plus the
    pairwise sum of the others."""
    if hi - lo == 1:
        return float(a[c, lo])
    return float(a[c, lo] + _pairwise(a, c, lo + 1, hi - lo - 1))


@jit
def _lower(acc: float, x: float) -> float:
    if acc != acc or not (x < acc or x != x):
        return acc
    return x


@jit
def _higher(acc: float, x: float) -> float:
    if acc != acc or not (x > acc or x != x):
        return acc
    return x


@jit
def _lowest(valid: B8, vals: F64, c: int, lo: int, hi: int) -> float:
    """np.minimum over the valid events [lo, hi) of column c (inf when none)."""
    low = np.inf
    for i in range(lo, hi):
        if valid[c, i]:
            low = _lower(low, vals[c, i])
    return low


@jit
def _highest(valid: B8, vals: F64, c: int, lo: int, hi: int) -> float:
    high = -np.inf
    for i in range(lo, hi):
        if valid[c, i]:
            high = _higher(high, vals[c, i])
    return high


@jit
def _tile_of(ts: int, hop: int, inverse: float) -> int:
    """ts // hop (floor) without an integer division: a multiply, then exact corrections."""
    q = np.int64(np.floor(ts * inverse))
    while q * hop > ts:
        q -= 1
    while (q + 1) * hop <= ts:
        q += 1
    return int(q)


@jit
def group_tiles(ts: I64, key_ev: I64, hop: int, valid: B8, vals: F64, stats: I64) -> Tiles:
    """One hop group's tiles of every key, from the events sorted by (key, time, offset).

    `valid` and `vals` hold each column's validity and value per event (0.0 where not valid),
    row c for column c; `stats[c]` says which of sum, min, max column c keeps. Returns the tile
    numbers, where each key's tiles start (keys + 1 bounds), where each tile's events start
    (tiles + 1 bounds), and the tiles' sums, mins and maxes (columns x tiles, only for the
    stats some column keeps; inf, -inf where a tile has no valid value).
    """
    n_keys, n_cols, inverse = len(key_ev) - 1, len(stats), 1.0 / hop
    key_tiles = np.zeros(n_keys + 1, np.int64)
    for k in range(n_keys):  # one tile number per tile: a key's events are in time order
        count, i = 0, key_ev[k]
        while i < key_ev[k + 1]:
            after = (_tile_of(ts[i], hop, inverse) + 1) * hop
            count += 1
            while i < key_ev[k + 1] and ts[i] < after:
                i += 1
        key_tiles[k + 1] = key_tiles[k] + count
    n_tiles = key_tiles[n_keys]
    tile = np.empty(n_tiles, np.int64)
    first = np.empty(n_tiles + 1, np.int64)
    first[n_tiles] = len(ts)
    kept = stats.sum(axis=0)  # only the stats some column keeps take memory
    sums = np.zeros((n_cols, n_tiles if kept[SUM] else 0), np.float64)
    mins = np.full((n_cols, n_tiles if kept[MIN] else 0), np.inf)
    maxes = np.full((n_cols, n_tiles if kept[MAX] else 0), -np.inf)
    r = 0
    for k in range(n_keys):
        lo, end = key_ev[k], key_ev[k + 1]
        while lo < end:
            q = _tile_of(ts[lo], hop, inverse)
            after = (q + 1) * hop
            hi = lo + 1
            while hi < end and ts[hi] < after:
                hi += 1
            tile[r], first[r] = q, lo
            for c in range(n_cols):
                if stats[c, SUM]:
                    sums[c, r] = vals[c, lo] if hi - lo == 1 else _run_sum(vals, c, lo, hi)
                if stats[c, MIN]:
                    mins[c, r] = _lowest(valid, vals, c, lo, hi)
                if stats[c, MAX]:
                    maxes[c, r] = _highest(valid, vals, c, lo, hi)
            r += 1
            lo = hi
    return tile, key_tiles, first, sums, mins, maxes


@jit
def spine_windows(
    ts: I64,
    key_ev: I64,
    valid: B8,
    seen: I64,
    vals: F64,
    stats: I64,
    tiles: Tiles,
    hop: int,
    windows: I64,
    q_kid: I64,
    q_t: I64,
    q_pos: I64,
) -> tuple[I64, I64, F64, F64, F64]:
    """Per window w and spine row (q_kid[i], q_t[i]), written at position q_pos[i]: the event
    count, and per column c the valid count, sum, min and max of the window before q_t[i]
    (`seen[c, i]`: how many of the first i events have a valid value in column c).

    The rows a window adds are those the online read adds after the key's events before t
    were applied: its whole tiles, then the newest event's tile split in two, its events
    before the newest event time and those at it (the write path keeps the latter apart).
    `tiles` is `group_tiles`' result for the same events; a window of 0 is the lifetime,
    whose sums add the key's events before its newest time as one run (the lifetime keeps
    one tile), then those at it.
    """
    tile, key_tiles, first, sums, mins, maxes = tiles
    n_rows, n_windows, n_cols = len(q_kid), len(windows), len(stats)
    n_out = np.zeros((n_windows, n_rows), np.int64)
    cnt_out = np.zeros((n_cols, n_windows, n_rows), np.int64)
    sum_out = np.zeros((n_cols, n_windows, n_rows), np.float64)
    min_out = np.full((n_cols, n_windows, n_rows), np.inf)
    max_out = np.full((n_cols, n_windows, n_rows), -np.inf)
    rest_sum = np.zeros(n_cols, np.float64)
    newest_sum = np.zeros(n_cols, np.float64)
    part_min = np.full(n_cols, np.inf)
    part_max = np.full(n_cols, -np.inf)
    for i in range(n_rows):
        k, t, p = q_kid[i], q_t[i], q_pos[i]
        first_ev = key_ev[k]
        end = first_at_least(ts, first_ev, key_ev[k + 1], t)
        if end == first_ev:
            continue  # no event before t: empty windows
        newest = ts[end - 1]
        at_newest = first_at_least(ts, first_ev, end, newest)
        last_tile = newest // hop
        part = first_at_least(ts, first_ev, at_newest, last_tile * hop)
        a = key_tiles[k]
        hi = first_at_least(tile, a, key_tiles[k + 1], last_tile)
        for c in range(n_cols):  # the newest event's tile, as its two rows
            if stats[c, SUM]:
                if at_newest > part:
                    rest_sum[c] = _run_sum(vals, c, part, at_newest)
                newest_sum[c] = _run_sum(vals, c, at_newest, end)
            if stats[c, MIN]:
                part_min[c] = _lowest(valid, vals, c, part, end)
            if stats[c, MAX]:
                part_max[c] = _highest(valid, vals, c, part, end)
        head = t // hop
        for w in range(n_windows):
            lifetime = windows[w] == 0
            first_tile = head - windows[w] // hop
            lo = a if lifetime else first_at_least(tile, a, hi, first_tile)
            if not (lifetime or last_tile >= first_tile):
                continue  # every event before t is older than the window
            n_out[w, p] = end - first[lo]
            for c in range(n_cols):
                cnt_out[c, w, p] = seen[c, end] - seen[c, first[lo]]
                if stats[c, SUM]:
                    acc = 0.0
                    if lifetime:
                        if at_newest > first_ev:
                            acc += _run_sum(vals, c, first_ev, at_newest)
                    else:
                        for r in range(lo, hi):
                            acc += sums[c, r]
                        if at_newest > part:
                            acc += rest_sum[c]
                    sum_out[c, w, p] = acc + newest_sum[c]
                if stats[c, MIN]:
                    low = np.inf
                    for r in range(lo, hi):
                        low = _lower(low, mins[c, r])
                    min_out[c, w, p] = _lower(low, part_min[c])
                if stats[c, MAX]:
                    high = -np.inf
                    for r in range(lo, hi):
                        high = _higher(high, maxes[c, r])
                    max_out[c, w, p] = _higher(high, part_max[c])
    return n_out, cnt_out, sum_out, min_out, max_out


@jit
def window_events(ts: I64, key_ev: I64, hop: int, window: int, q_kid: I64, q_t: I64) -> int:
    """How many events the spine rows' windows of `window` (0: lifetime) hold in all."""
    total = 0
    for i in range(len(q_kid)):
        k, t = q_kid[i], q_t[i]
        end = first_at_least(ts, key_ev[k], key_ev[k + 1], t)
        lo = key_ev[k]
        if window:
            lo = first_at_least(ts, lo, end, (t // hop - window // hop) * hop)
        total += end - lo
    return total


@jit
def spine_windows_direct(
    ts: I64,
    key_ev: I64,
    valid: B8,
    seen: I64,
    vals: F64,
    stats: I64,
    hop: int,
    windows: I64,
    q_kid: I64,
    q_t: I64,
    q_pos: I64,
) -> tuple[I64, I64, F64, F64, F64]:
    """`spine_windows` from the events alone, for windows that hold few events: each row's
    window events, cut into the same rows (tile runs, the newest event time's events apart)
    and added in the same order, so the same values without building the tiles."""
    n_rows, n_windows, n_cols, inverse = len(q_kid), len(windows), len(stats), 1.0 / hop
    n_out = np.zeros((n_windows, n_rows), np.int64)
    cnt_out = np.zeros((n_cols, n_windows, n_rows), np.int64)
    sum_out = np.zeros((n_cols, n_windows, n_rows), np.float64)
    min_out = np.full((n_cols, n_windows, n_rows), np.inf)
    max_out = np.full((n_cols, n_windows, n_rows), -np.inf)
    for i in range(n_rows):
        k, t, p = q_kid[i], q_t[i], q_pos[i]
        first_ev = key_ev[k]
        end = first_at_least(ts, first_ev, key_ev[k + 1], t)
        if end == first_ev:
            continue  # no event before t: empty windows
        at_newest = first_at_least(ts, first_ev, end, ts[end - 1])
        head = t // hop
        for w in range(n_windows):
            lifetime = windows[w] == 0
            lo = first_ev
            if not lifetime:
                lo = first_at_least(ts, first_ev, end, (head - windows[w] // hop) * hop)
            if lo == end:
                continue
            n_out[w, p] = end - lo
            for c in range(n_cols):
                cnt_out[c, w, p] = seen[c, end] - seen[c, lo]
                if stats[c, SUM]:
                    acc, run = 0.0, lo
                    while run < at_newest:  # whole tiles, then the newest tile's older events
                        stop = at_newest
                        if not lifetime:
                            after = (_tile_of(ts[run], hop, inverse) + 1) * hop
                            stop = run + 1
                            while stop < at_newest and ts[stop] < after:
                                stop += 1
                        acc += _run_sum(vals, c, run, stop)
                        run = stop
                    sum_out[c, w, p] = acc + _run_sum(vals, c, at_newest, end)
                if stats[c, MIN]:
                    min_out[c, w, p] = _lowest(valid, vals, c, lo, end)
                if stats[c, MAX]:
                    max_out[c, w, p] = _highest(valid, vals, c, lo, end)
    return n_out, cnt_out, sum_out, min_out, max_out
