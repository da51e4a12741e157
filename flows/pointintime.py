"""Point-in-time feature values for many (key, t) rows: the offline half of the core.

Every row's value covers exactly the events with start(t) <= ts < t. The full tiles of the window
come from the same tiles the online path builds (`unit_block` + `combine`); the partial head tile
is merged from the events in [floor(t/H)*H, t), so a row never sees an event at or after its own
time. Lifetime features use one-day tiles plus the partial day. The tiles and the finalization
are the online write path's own functions (`state.tiles`); the window merges are equal to the
online read's (`state.read`) by test, not shared code.

Vector features come out as Arrow `list<float64>` columns (null for an empty window). The events
a live view dead-letters for a vector of the wrong length (`state.vectors`: a key's vectors keep
the length of its first one, by offset) are left out here too (`without_bad_vectors`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from connectors.envelope import OFFSET
from flows.aggregate import (
    KEY,
    SortedEvents,
    entity_keys,
    event_times,
    key_column,
    late_mask,
    prepare,
    running_watermarks,
    sort_events,
)
from state.layout import FeatureDef, HopGroup, ViewLayout
from state.tiles import (
    I64,
    ColumnValues,
    TileBlock,
    combine,
    empty_block,
    finalize_array,
    merge_pairwise,
    reduce_ranges,
    run_starts,
    unit_block,
)
from state.vectors import first_lengths, mismatched, padded

LIFETIME_TILE_US = 86_400_000_000
ROW_BUDGET = 4_000_000  # tile rows gathered per chunk of spine rows (bounds memory)


def kept_events(
    layout: ViewLayout, partitions: list[pa.Table], transform: Callable[[pa.Table], pa.Table] | None
) -> pa.Table:
    """The events the live flow applies: per partition in offset order, minus the ones too late
    for the view (the partition's watermark rule of `flows.aggregate.apply_batch`), transformed;
    for a view with its own key, keyed (`_key`) and without null key parts, as routed."""
    kept: list[pa.Table] = []
    for table in partitions:
        ts = event_times(table, layout.timestamp)
        late = late_mask(ts, running_watermarks(ts, None)[0], layout.retention_us)
        table = prepare(table.filter(pa.array(~late)) if late.any() else table, layout, transform)
        kept.append(_keyed(table, layout) if layout.rekeyed else table)
    return without_bad_vectors(layout, pa.concat_tables(kept)) if kept else pa.table({})


def without_bad_vectors(layout: ViewLayout, events: pa.Table) -> pa.Table:
    """`events` without the records the live view dead-letters for a vector whose length is
    not its key's (the first non-null vector of the key by offset fixes it, per column).

    A record is refused only against lengths fixed by records kept before it, so with several
    vector columns each pass drops each key's earliest refused record and looks again.
    """
    vectors = [c for c, t in layout.column_types.items() if t.startswith("array<")]
    if not vectors or not events.num_rows:
        return events
    encoded = entity_keys(events, layout).combine_chunks().dictionary_encode()
    kid = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    off = np.asarray(events.column(OFFSET).to_numpy(), dtype=np.int64)
    columns = [padded(events.column(c))[1] for c in vectors]
    kept = np.ones(events.num_rows, dtype=bool)
    while True:
        bad = np.zeros(events.num_rows, dtype=bool)
        for lengths in columns:
            valid = kept & (lengths > 0)
            fixed = first_lengths(kid, off, lengths, valid, len(encoded.dictionary))
            bad |= mismatched(kid, lengths, valid, fixed)
        if not bad.any():
            return events if kept.all() else events.filter(pa.array(kept))
        kept[_earliest_per_key(kid, off, bad) if len(vectors) > 1 else bad] = False


def _earliest_per_key(kid: I64, off: I64, rows: npt.NDArray[np.bool_]) -> I64:
    at = np.flatnonzero(rows)
    order = at[np.lexsort((off[at], kid[at]))]
    _, first = np.unique(kid[order], return_index=True)
    return order[first]


def _keyed(table: pa.Table, layout: ViewLayout) -> pa.Table:
    keys = key_column(table, layout.key_columns)
    if keys.null_count:
        valid = keys.is_valid()
        table, keys = table.filter(valid), keys.filter(valid)
    return table.append_column(KEY, keys)


def point_in_time(
    layout: ViewLayout, events: pa.Table, keys: pa.Array | pa.ChunkedArray, times: I64
) -> dict[str, pa.Array]:
    """Feature values of `layout` for each (keys[i], times[i]) row, in row order."""
    n = len(times)
    if n == 0:
        return {f.name: pa.array([]) for f in layout.features}
    spine_keys = keys.cast(pa.string()) if not pa.types.is_string(keys.type) else keys
    ev_keys = (
        entity_keys(events, layout)
        if events.num_rows
        else pa.chunked_array([pa.array([], pa.string())])
    )
    both = pa.chunked_array([*_chunks(ev_keys), *_chunks(spine_keys)]).combine_chunks()
    ids = np.asarray(
        both.dictionary_encode().indices.to_numpy(zero_copy_only=False), dtype=np.int64
    )
    ev_kid, q_kid = ids[: events.num_rows], ids[events.num_rows :]
    ev = _sorted_events(layout, events, ev_kid)
    q_order = np.lexsort((times, q_kid))
    chunks: dict[str, list[pa.Array]] = {f.name: [] for f in layout.features}
    types = {f.name: feature_type(f, layout) for f in layout.features}
    for group in layout.groups:
        _group_values(group, ev, q_kid[q_order], times[q_order], chunks, types)
    back = np.empty(n, dtype=np.int64)
    back[q_order] = np.arange(n)  # sorted position of each original row
    return {name: pa.concat_arrays(parts).take(pa.array(back)) for name, parts in chunks.items()}


def _chunks(arr: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return list(arr.chunks) if isinstance(arr, pa.ChunkedArray) else [arr]


def _sorted_events(layout: ViewLayout, events: pa.Table, kid: I64) -> SortedEvents:
    if events.num_rows == 0:
        empty = np.zeros(0, dtype=np.int64)
        cols = {
            c: ColumnValues(np.zeros((0, 0)), np.zeros(0, dtype=bool), empty)
            if layout.column_types[c].startswith("array<")
            else ColumnValues(np.zeros(0), np.zeros(0, dtype=bool))
            for c in layout.columns
        }
        return SortedEvents(empty, empty, empty, cols)
    return sort_events(events, layout, kid, event_times(events, layout.timestamp))


def _group_values(
    group: HopGroup,
    ev: SortedEvents,
    q_kid: I64,
    q_t: I64,
    chunks: dict[str, list[pa.Array]],
    types: dict[str, pa.DataType],
) -> None:
    hop = group.hop_us or LIFETIME_TILE_US
    tile_group = HopGroup(hop, group.features, group.columns, group.last_k)
    units = unit_block(
        tile_group, ev.ts, ev.off, {c.column: ev.columns[c.column] for c in group.columns}
    )
    starts = run_starts(ev.kid, units.rows["tile"])
    tiles = combine(group, units, starts)
    tile_kid = ev.kid[starts]
    for window_us in sorted({f.window_us for f in group.features}):
        feats = [f for f in group.features if f.window_us == window_us]
        additive = all(f.agg in ADDITIVE for f in feats)
        span = window_us // hop + 1 if window_us else _max_tiles_per_key(tile_kid)
        width = 1 + sum(tiles.objs[v].shape[1] for v in group.vector_fields)  # 8-byte words
        chunk = max(1, len(q_t) if additive else ROW_BUDGET // max(span * width, 1))
        for a in range(0, len(q_t), chunk):
            sl = slice(a, a + chunk)
            merged = _window_rows(
                group, tiles, tile_kid, units, ev, hop, window_us, q_kid[sl], q_t[sl], additive
            )
            for f in feats:
                part = finalize_array(f, group.column_stats(f), merged)
                chunks[f.name].append(part.cast(types[f.name]))


def _max_tiles_per_key(tile_kid: I64) -> int:
    if len(tile_kid) == 0:
        return 1
    return int(np.bincount(tile_kid).max())


def _window_rows(
    group: HopGroup,
    tiles: TileBlock,
    tile_kid: I64,
    units: TileBlock,
    ev: SortedEvents,
    hop: int,
    window_us: int,
    q_kid: I64,
    q_t: I64,
    additive: bool = False,
) -> TileBlock:
    head = q_t // hop
    tile_idx = tiles.rows["tile"]
    if window_us:
        first_tile = head - window_us // hop
    else:  # lifetime: from the first tile of any key
        first_tile = np.full_like(
            head, min(int(tile_idx.min()), int(head.min())) if len(tile_idx) else int(head.min())
        )
    lo, hi = _search_both(tile_kid, tile_idx, q_kid, first_tile, head)
    elo, ehi = _search_both(ev.kid, ev.ts, q_kid, head * hop, q_t)
    if additive:
        return _additive_rows(group, tiles, units, (lo, hi), (elo, ehi))
    full = reduce_ranges(group, tiles, lo, hi)
    partial = reduce_ranges(group, units, elo, ehi)
    return merge_pairwise(group, full, partial)


ADDITIVE = frozenset({"count", "sum", "mean", "min", "max"})
_REDUCE = {
    "n": np.add,
    "cnt": np.add,
    "sum": np.add,
    "min": np.minimum,
    "max": np.maximum,
    "dim": np.maximum,
}
_IDENTITY = {"n": 0, "cnt": 0, "sum": 0.0, "min": np.inf, "max": -np.inf, "dim": 0}


def _additive_rows(
    group: HopGroup,
    tiles: TileBlock,
    units: TileBlock,
    full: tuple[I64, I64],
    head: tuple[I64, I64],
) -> TileBlock:
    """The merged window rows for count/sum/mean/min/max features: each field reduced over its
    contiguous ranges in place (`reduceat`), with no gathered copy of the tile rows. Same
    values as `reduce_ranges` + `merge_pairwise`; fields other aggregations need stay empty."""
    out = empty_block(group, len(full[0]))
    for name in group.dtype.names or ():
        stat = name.rpartition(".")[2] if "." in name else name
        if stat not in _REDUCE:
            continue
        ufunc, identity = _REDUCE[stat], _IDENTITY[stat]
        a = _range_reduce(ufunc, tiles.rows[name], *full, identity)
        b = _range_reduce(ufunc, units.rows[name], *head, identity)
        out.rows[name] = ufunc(a, b)
    for name in group.vector_fields:  # only `.vsum` (mean): first/last are not additive
        a = _range_reduce(np.add, tiles.objs[name], *full, 0.0)
        b = _range_reduce(np.add, units.objs[name], *head, 0.0)
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


def feature_type(feature: FeatureDef, layout: ViewLayout) -> pa.DataType:
    """Arrow type of a feature's snapshot column."""
    if feature.agg == "count" or feature.agg == "distinct_count":
        return pa.int64()
    col_type = layout.column_types.get(feature.column or "", "double")
    if col_type.startswith("array<"):  # vectors: mean, first and last as list<float64>
        return pa.list_(pa.float64())
    integral = col_type in ("int", "long")
    if feature.agg == "sum":
        return pa.int64() if integral else pa.float64()
    if feature.agg in ("mean", "var", "std", "percentile"):
        return pa.float64()
    base: pa.DataType = {
        "int": pa.int64(),
        "long": pa.int64(),
        "float": pa.float64(),
        "double": pa.float64(),
        "boolean": pa.bool_(),
    }.get(col_type, pa.string())
    if feature.agg == "last_k":
        return pa.list_(base)
    return base
