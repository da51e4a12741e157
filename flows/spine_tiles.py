"""The per-row tile merge of point-in-time windows: the exact path for what the compiled
windows do not answer (aggregations out of `flows.pointintime.COMPILED_KINDS`, and the windows
a sketch cannot answer from the events alone).

A hop group's tiles are built once from its sorted events, as the online write path builds
them (`unit_block` + `combine`, `state.tiles`): whole tiles, one row per (key, tile), and
one-event units. A spine row's window at t is the whole tiles before t's tile plus the units
of t's own tile before t (lifetime features: one-day tiles plus the partial day), merged per
row (`merged_rows`), or, for counts, sums, means, mins and maxes, reduced in place over the
contiguous ranges (`reduced_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from flows.aggregate import SortedEvents
from state.layout import HopGroup
from state.tiles import (
    I64,
    TileBlock,
    combine,
    empty_block,
    finalize_array,
    merge_pairwise,
    reduce_ranges,
    run_starts,
    unit_block,
)

LIFETIME_TILE_US = 86_400_000_000
ROW_BUDGET = 4_000_000  # tile rows gathered per chunk of spine rows (bounds memory)


def tile_merged_values(
    group: HopGroup, ev: SortedEvents, q_kid: I64, q_t: I64, types: dict[str, pa.DataType]
) -> dict[str, list[pa.Array]]:
    """The group's feature values for the (key, time) rows, sorted by (key, time), in chunks
    (a chunk's merged window rows stay within ROW_BUDGET words)."""
    tiles = _GroupTiles.of(group, ev)
    out: dict[str, list[pa.Array]] = {f.name: [] for f in group.features}
    for window_us in sorted({f.window_us for f in group.features}):
        feats = [f for f in group.features if f.window_us == window_us]
        reducible = all(f.agg in REDUCIBLE for f in feats)
        window_rows = tiles.reduced_rows if reducible else tiles.merged_rows
        span = window_us // tiles.hop + 1 if window_us else _max_tiles_per_key(tiles.tile_kid)
        width = 1 + sum(tiles.whole.objs[v].shape[1] for v in group.vector_fields)  # 8B words
        chunk = max(1, len(q_t) if reducible else ROW_BUDGET // max(span * width, 1))
        for a in range(0, len(q_t), chunk):
            merged = window_rows(window_us, q_kid[a : a + chunk], q_t[a : a + chunk])
            for f in feats:
                part = finalize_array(f, group.column_stats(f), merged)
                out[f.name].append(part.cast(types[f.name]))
    return out


def _max_tiles_per_key(tile_kid: I64) -> int:
    if len(tile_kid) == 0:
        return 1
    return int(np.bincount(tile_kid).max())


# Aggregations whose window merge is a per-field ufunc reduction over contiguous tile rows
# (sums and counts add, min and max take the extreme), so `_GroupTiles.reduced_rows` can merge
# them in place with `reduceat`; the others (first/last, var/std, sketches, lists) need
# `merged_rows`.
REDUCIBLE = frozenset({"count", "sum", "mean", "min", "max"})
_REDUCE = {
    "n": np.add,
    "cnt": np.add,
    "sum": np.add,
    "min": np.minimum,
    "max": np.maximum,
    "dim": np.maximum,
}
_IDENTITY = {"n": 0, "cnt": 0, "sum": 0.0, "min": np.inf, "max": -np.inf, "dim": 0}


@dataclass(frozen=True, slots=True)
class _GroupTiles:
    """One hop group's tiles of every key of the events: whole tiles (`whole`, one row per
    (key, tile), sorted so) and one-event tiles (`units`, in the events' (key, time) order).
    A window at t is the whole tiles before t's tile plus the units of t's own tile before t."""

    group: HopGroup
    hop: int
    whole: TileBlock
    tile_kid: I64  # the key id of each whole tile
    units: TileBlock
    ev: SortedEvents

    @classmethod
    def of(cls, group: HopGroup, ev: SortedEvents) -> _GroupTiles:
        hop = group.hop_us or LIFETIME_TILE_US
        tile_group = HopGroup(hop, group.features, group.columns, group.last_k)
        columns = {c.column: ev.columns[c.column] for c in group.columns}
        units = unit_block(tile_group, ev.ts, ev.off, columns)
        starts = run_starts(ev.kid, units.rows["tile"])
        return cls(group, hop, combine(group, units, starts), ev.kid[starts], units, ev)

    def ranges(self, window_us: int, q_kid: I64, q_t: I64) -> tuple[tuple[I64, I64], ...]:
        """Per row: the range of whole tiles and the range of units its window covers."""
        head = q_t // self.hop
        tile_idx = self.whole.rows["tile"]
        if window_us:
            first_tile = head - window_us // self.hop
        else:  # lifetime: from the first tile of any key
            first = min(int(tile_idx.min()), int(head.min())) if len(tile_idx) else int(head.min())
            first_tile = np.full_like(head, first)
        whole = _search_both(self.tile_kid, tile_idx, q_kid, first_tile, head)
        partial = _search_both(self.ev.kid, self.ev.ts, q_kid, head * self.hop, q_t)
        return whole, partial

    def merged_rows(self, window_us: int, q_kid: I64, q_t: I64) -> TileBlock:
        """Each row's window as one merged tile row (every field, any aggregation)."""
        (lo, hi), (elo, ehi) = self.ranges(window_us, q_kid, q_t)
        full = reduce_ranges(self.group, self.whole, lo, hi)
        partial = reduce_ranges(self.group, self.units, elo, ehi)
        return merge_pairwise(self.group, full, partial)

    def reduced_rows(self, window_us: int, q_kid: I64, q_t: I64) -> TileBlock:
        """`merged_rows` for REDUCIBLE features only: each field reduced over its contiguous
        ranges in place (`reduceat`), with no gathered copy of the tile rows. Same values;
        fields other aggregations need stay empty."""
        whole, partial = self.ranges(window_us, q_kid, q_t)
        out = empty_block(self.group, len(q_kid))
        for name in self.group.dtype.names or ():
            stat = name.rpartition(".")[2] if "." in name else name
            if stat not in _REDUCE:
                continue
            ufunc, identity = _REDUCE[stat], _IDENTITY[stat]
            a = _range_reduce(ufunc, self.whole.rows[name], *whole, identity)
            b = _range_reduce(ufunc, self.units.rows[name], *partial, identity)
            out.rows[name] = ufunc(a, b)
        for name in self.group.vector_fields:  # only `.vsum` (mean): first/last need merging
            a = _range_reduce(np.add, self.whole.objs[name], *whole, 0.0)
            b = _range_reduce(np.add, self.units.objs[name], *partial, 0.0)
            out.objs[name] = a + b
        return out


def _range_reduce(
    ufunc: np.ufunc, values: npt.NDArray[Any], lo: I64, hi: I64, identity: float
) -> npt.NDArray[Any]:
    """ufunc over values[lo[i]:hi[i]] for every i (identity where the range is empty); over
    the rows of a 2-D `values` (vectors) element-wise. Integer sums (counts) come from one
    prefix sum: exact, and one subtraction per range."""
    if ufunc is np.add and values.ndim == 1 and values.dtype.kind in "iu":
        prefix = np.zeros(len(values) + 1, dtype=np.int64)
        np.cumsum(values, out=prefix[1:])
        return np.where(hi > lo, prefix[np.maximum(hi, lo)] - prefix[lo], 0)
    extra = np.full((1, *values.shape[1:]), identity, dtype=values.dtype)
    extended = np.concatenate([values, extra])
    bounds = np.empty(2 * len(lo), dtype=np.int64)
    bounds[0::2], bounds[1::2] = lo, hi
    out = ufunc.reduceat(extended, bounds, axis=0)[0::2]
    out[hi <= lo] = identity
    return out


def _search_both(kid: I64, val: I64, q_kid: I64, a: I64, b: I64) -> tuple[I64, I64]:
    """`_search` of (q_kid, a) and of (q_kid, b): one composite of the sorted rows for both."""
    both = _search(kid, val, np.concatenate([q_kid, q_kid]), np.concatenate([a, b]))
    return both[: len(q_kid)], both[len(q_kid) :]


def _search(kid: I64, val: I64, q_kid: I64, q_val: I64) -> I64:
    """searchsorted(side=left) of (q_kid, q_val) pairs in rows sorted by (kid, val)."""
    if len(kid) == 0:
        return np.zeros(len(q_kid), dtype=np.int64)
    lo_v = min(int(val.min()), int(q_val.min()))
    hi_v = max(int(val.max()), int(q_val.max()))
    span = hi_v - lo_v + 2
    n_keys = int(max(kid.max(), q_kid.max())) + 1
    if n_keys * span < 2**62:
        data = kid * span + (val - lo_v)
        query = q_kid * span + (q_val - lo_v)
    else:  # rank-compress the values so the composite key fits in 64 bits
        uniq = np.unique(np.concatenate([val, q_val]))
        span = len(uniq) + 1
        data = kid * span + np.searchsorted(uniq, val)
        query = q_kid * span + np.searchsorted(uniq, q_val)
    return np.searchsorted(data, query, side="left").astype(np.int64, copy=False)
