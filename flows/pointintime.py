"""Point-in-time feature values for many (key, t) rows: the offline half of the core.

Every row's value covers exactly the events with start(t) <= ts < t. The events are sorted once
by (key, time, offset), the write path's order (`_OrderedEvents`: a counting sort on key ids).

A hop group of only counts, sums, means, mins and maxes (the common view) goes through
`flows.spine_windows` in one compiled pass: each window's rows are those the online read adds
for a view that applied the key's events before t (whole tiles, the newest event time's events
in a row of their own), summed in the same order, so the values are the online read's bit for
bit (tests/flows/test_pointintime_exact.py). Groups run side by side, one thread per core.

Other groups (first/last, var/std, sketches, lists, vectors) go through `flows.spine_merges`:
each window is a range of the sorted events, its value the online read's of that range (by
test, tests/flows/test_pointintime_merges.py); their plain features take the compiled pass as
a group of their own. Windows a sketch cannot answer exactly from the events alone (a
percentile over more than 200 values, a distinct count past 384 coupons) and aggregations out of
COMPILED_KINDS merge the online write path's tiles per row (`flows.spine_tiles`):
the full tiles of the window plus the partial head tile merged from the events in
[floor(t/H)*H, t); lifetime features use one-day tiles plus the partial day.

Vector features come out as Arrow `list<float64>` columns (null for an empty window). The events
a live view dead-letters for a vector of the wrong length (`state.vectors`: a key's vectors keep
the length of its first one, by offset) are left out here too (`without_bad_vectors`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from connectors.envelope import OFFSET
from flows.aggregate import (
    KEY,
    SortedEvents,
    column_values,
    entity_keys,
    event_times,
    key_column,
    late_mask,
    prepare,
    running_watermarks,
    sort_events,
)
from flows.spine_merges import merged_feature, spine_spans, valid_before
from flows.spine_tiles import LIFETIME_TILE_US, tile_merged_values
from flows.spine_windows import (
    group_tiles,
    in_time_order,
    key_order,
    spine_windows,
    spine_windows_direct,
    window_events,
)
from state.layout import ColumnStats, FeatureDef, HopGroup, ViewLayout
from state.services import feature_type
from state.tiles import (
    F64,
    I64,
    ColumnValues,
    empty_block,
    finalize_array,
)
from state.vectors import first_lengths, mismatched, padded


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
    times = np.asarray(times, dtype=np.int64)
    ev_kid, q_kid, n_keys = _key_ids(layout, events, keys)
    by_time = np.argsort(times, kind="stable").astype(np.int64, copy=False)
    q_order = key_order(q_kid, by_time, n_keys)[0]  # lexsort((times, q_kid)), stable
    q_kid, q_t = q_kid[q_order], times[q_order]
    ordered = _OrderedEvents(layout, events, ev_kid, n_keys)
    types = {f.name: feature_type(layout, f) for f in layout.features}
    values: dict[str, pa.Array] = {}
    chunks: dict[str, list[pa.Array]] = {}
    plain = [g for g in layout.groups if events.num_rows and _plain(g)]
    for group in plain:
        ordered.plain_columns(group)  # gathered once, before the groups run side by side
    with ThreadPoolExecutor(max_workers=min(len(plain), os.cpu_count() or 1) or 1) as pool:
        # the kernels run without the GIL: one hop group per core
        runs = [pool.submit(_plain_values, g, ordered, q_kid, q_t, q_order, types) for g in plain]
        for group in layout.groups:
            if group in plain:
                continue
            if events.num_rows and any(f.agg in COMPILED_KINDS for f in group.features):
                values.update(_merged_values(group, ordered, q_kid, q_t, q_order, types))
            else:
                chunks.update(tile_merged_values(group, ordered.sorted_events(), q_kid, q_t, types))
        for run in runs:
            values.update(run.result())
    if chunks:
        back = np.empty(n, dtype=np.int64)
        back[q_order] = np.arange(n)  # sorted position of each original row
        for name, parts in chunks.items():
            values[name] = pa.concat_arrays(parts).take(pa.array(back))
    return {f.name: values[f.name] for f in layout.features}


def _key_ids(
    layout: ViewLayout, events: pa.Table, keys: pa.Array | pa.ChunkedArray
) -> tuple[I64, I64, int]:
    """Dense key ids of the events and of the spine rows (one dictionary), and how many."""
    spine_keys = keys.cast(pa.string()) if not pa.types.is_string(keys.type) else keys
    ev_keys = (
        entity_keys(events, layout)
        if events.num_rows
        else pa.chunked_array([pa.array([], pa.string())])
    )
    both = pa.chunked_array([*_chunks(ev_keys), *_chunks(spine_keys)]).combine_chunks()
    encoded = both.dictionary_encode()
    ids = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    return ids[: events.num_rows], ids[events.num_rows :], len(encoded.dictionary)


def _chunks(arr: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return list(arr.chunks) if isinstance(arr, pa.ChunkedArray) else [arr]


class _OrderedEvents:
    """The events in (key, event time, offset) order, `sort_events`' order: a stable counting
    sort by key id of the rows in (time, offset) order (the rows as they stand when they are
    in that order already, as a replay's log mostly is). Columns are gathered on demand."""

    def __init__(self, layout: ViewLayout, events: pa.Table, kid: I64, n_keys: int) -> None:
        self.layout, self.events, self.kid = layout, events, kid
        self.ts = event_times(events, layout.timestamp) if events.num_rows else kid
        self.off = np.asarray(events.column(OFFSET).to_numpy(), dtype=np.int64) if len(kid) else kid
        if in_time_order(self.ts, self.off):
            base = np.zeros(0, dtype=np.int64)
        elif bool((self.off[1:] > self.off[:-1]).all()):
            base = np.argsort(self.ts, kind="stable").astype(np.int64, copy=False)
        else:
            base = np.lexsort((self.off, self.ts)).astype(np.int64, copy=False)
        self.order, self.key_starts = key_order(kid, base, n_keys)
        self.sorted_ts = self.ts[self.order]
        self._sorted: SortedEvents | None = None
        self._plain: dict[tuple[str, bool], tuple[npt.NDArray[np.bool_], I64, F64]] = {}
        self._vectors: dict[str, tuple[npt.NDArray[np.floating[Any]], I64]] = {}

    def plain_columns(self, group: HopGroup) -> tuple[npt.NDArray[np.bool_], I64, F64]:
        """Per column (a row each) and sorted event: whether its value is valid, how many of
        the events before it have one, and its value (0.0 where not valid)."""
        columns = [self.column(col.column, col.numeric) for col in group.columns]
        if not columns:  # counts of events only
            n = len(self.order)
            return np.ones((0, n), bool), np.zeros((0, n + 1), np.int64), np.zeros((0, n))
        if len(columns) == 1:  # the common case: views, no copy
            return tuple(part[np.newaxis] for part in columns[0])  # type: ignore[return-value]
        return tuple(np.stack(parts) for parts in zip(*columns, strict=True))  # type: ignore[return-value]

    def column(self, name: str, numeric: bool) -> tuple[npt.NDArray[np.bool_], I64, F64]:
        """Per sorted event: whether column `name` is valid, how many events before it have a
        valid value, its value as float64 (0.0 where not valid or not numeric)."""
        found = self._plain.get((name, numeric))
        if found is None:
            column, n = self.events.column(name), len(self.order)
            valid = np.ones(n, dtype=bool)
            if column.null_count:
                is_valid = column.is_valid().to_numpy(zero_copy_only=False)
                valid = np.asarray(is_valid, dtype=bool)[self.order]
            seen = valid_before(valid)
            vals = np.zeros(n, dtype=np.float64)
            if numeric:
                raw = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
                vals = np.asarray(raw, dtype=np.float64)[self.order]
                if column.null_count:
                    vals[~valid] = 0.0
            found = self._plain[(name, numeric)] = (valid, seen, vals)
        return found

    def vectors(self, name: str) -> tuple[npt.NDArray[np.floating[Any]], I64]:
        """The vector column `name` as a zero-padded matrix and its lengths, in log order."""
        found = self._vectors.get(name)
        if found is None:
            found = self._vectors[name] = _vector_matrix(self.events.column(name))
        return found

    def sorted_events(self) -> SortedEvents:
        if self._sorted is None:
            if self.events.num_rows == 0:
                self._sorted = _sorted_events(self.layout, self.events, self.kid)
            else:
                o = self.order
                columns = column_values(self.events, self.layout)
                self._sorted = SortedEvents(
                    self.kid[o],
                    self.sorted_ts,
                    self.off[o],
                    {name: cv.take(o) for name, cv in columns.items()},
                )
        return self._sorted


def _vector_matrix(column: pa.ChunkedArray) -> tuple[npt.NDArray[np.floating[Any]], I64]:
    """`state.vectors.padded`'s zero-padded matrix (its rows' values as float64 exactly) and
    lengths; when every vector has one length (or none), the flat values reshaped in their
    own float type (a float32 column without a copy)."""
    lengths = np.asarray(
        pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False),
        dtype=np.int64,
    )
    width = int(lengths.max()) if len(lengths) else 0
    full = lengths == width
    if not width or not (full | (lengths == 0)).all():
        return padded(column)
    chunks = [chunk.flatten() for chunk in column.chunks]
    flat = chunks[0] if len(chunks) == 1 else pa.concat_arrays(chunks)
    values = flat.to_numpy(zero_copy_only=False).reshape(-1, width)
    if full.all():
        return values, lengths
    matrix = np.zeros((len(lengths), width), dtype=values.dtype)
    matrix[full] = values
    return matrix, lengths


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


# Aggregations `flows.spine_windows` computes: counts, float sums (in the online read's order),
# mins and maxes of numeric or counted columns; a group of only these skips the tile blocks.
PLAIN = frozenset({"count", "sum", "mean", "min", "max"})
_PLAIN_STATS = frozenset({"cnt", "sum", "min", "max"})
# The spine rows' windows are read from the events directly when they hold at most this many
# events per event in all; past it, building the group's tiles once is cheaper.
DIRECT_EVENTS = 1
SAMPLE_ROWS = 20_000


def _plain(group: HopGroup) -> bool:
    return all(f.agg in PLAIN for f in group.features) and all(
        not col.vector and col.stats <= _PLAIN_STATS and (col.numeric or col.stats <= {"cnt"})
        for col in group.columns
    )


def _plain_values(
    group: HopGroup,
    ordered: _OrderedEvents,
    q_kid: I64,
    q_t: I64,
    q_pos: I64,
    types: dict[str, pa.DataType],
) -> dict[str, pa.Array]:
    """The group's feature values for the spine rows sorted by (key, time), in row order
    (`q_pos`: each sorted row's position), from one compiled pass per group."""
    hop = group.hop_us or LIFETIME_TILE_US
    valid, seen, vals = ordered.plain_columns(group)
    stats = np.array(
        [[s in col.stats for s in ("sum", "min", "max")] for col in group.columns], dtype=np.int64
    ).reshape(len(group.columns), 3)
    ts, starts = ordered.sorted_ts, ordered.key_starts
    windows = np.array(sorted({f.window_us for f in group.features}), dtype=np.int64)
    widest = 0 if windows[0] == 0 else int(windows[-1])
    step = max(1, len(q_kid) // SAMPLE_ROWS)  # the windows' events, estimated from a sample
    held = window_events(ts, starts, hop, widest, q_kid[::step], q_t[::step]) * step
    if held <= DIRECT_EVENTS * len(ts):
        n_out, cnt, sums, mins, maxes = spine_windows_direct(
            ts, starts, valid, seen, vals, stats, hop, windows, q_kid, q_t, q_pos
        )
    else:
        tiles = group_tiles(ts, starts, hop, valid, vals, stats)
        n_out, cnt, sums, mins, maxes = spine_windows(
            ts, starts, valid, seen, vals, stats, tiles, hop, windows, q_kid, q_t, q_pos
        )
    out: dict[str, pa.Array] = {}
    for w, window_us in enumerate(windows.tolist()):
        merged = empty_block(group, len(q_kid))
        merged.rows["n"] = n_out[w]
        for c, col in enumerate(group.columns):
            name = col.column
            merged.rows[f"{name}.cnt"] = cnt[c, w]
            for stat, values in (("sum", sums), ("min", mins), ("max", maxes)):
                if stat in col.stats:
                    merged.rows[f"{name}.{stat}"] = values[c, w]
        for f in group.features:
            if f.window_us == window_us:
                part = finalize_array(f, group.column_stats(f), merged)
                out[f.name] = part.cast(types[f.name])
    return out


# Aggregations `flows.spine_merges` computes for groups that are not plain (their plain
# features take the compiled pass as a group of their own); the others, and windows a sketch
# cannot answer from the events alone, merge the tiles per row (`flows.spine_tiles`).
COMPILED_KINDS = frozenset(
    {"count", "sum", "mean", "min", "max", "var", "std", "first", "last", "last_k"}
    | {"percentile", "distinct_count"}
)


def _merged_values(
    group: HopGroup,
    ordered: _OrderedEvents,
    q_kid: I64,
    q_t: I64,
    q_pos: I64,
    types: dict[str, pa.DataType],
) -> dict[str, pa.Array]:
    """The feature values of a group that is not plain for the spine rows sorted by (key,
    time), in row order (`q_pos`: each sorted row's position)."""
    compiled = [f for f in group.features if f.agg in COMPILED_KINDS]
    plain = _plain_part(group, compiled)
    out = _plain_values(plain, ordered, q_kid, q_t, q_pos, types) if plain else {}
    hop = group.hop_us or LIFETIME_TILE_US
    back = np.empty(len(q_pos), dtype=np.int64)
    back[q_pos] = np.arange(len(q_pos))  # sorted position of each original row
    retry: dict[str, npt.NDArray[np.bool_]] = {}
    rest = [f for f in compiled if f.name not in out]
    for window_us in sorted({f.window_us for f in rest}):
        spans = spine_spans(ordered.sorted_ts, ordered.key_starts, hop, window_us, q_kid, q_t)
        for f in (f for f in rest if f.window_us == window_us):
            col = group.column_stats(f)
            assert col is not None  # a plain count of events took the compiled pass
            out[f.name], needs = merged_feature(f, col, hop, q_kid, spans, ordered, back)
            if needs is not None and needs.any():
                retry[f.name] = needs
    if len(out) < len(group.features) or retry:
        out.update(_merged_per_row(group, ordered, q_kid, q_t, q_pos, types, out, retry))
    return {name: values.cast(types[name]) for name, values in out.items()}


def _plain_part(group: HopGroup, features: list[FeatureDef]) -> HopGroup | None:
    """The group's plain features of scalar columns (and counts of events) as a plain group
    of their own (only the stats they need), or None when it has none."""
    vectors = {c.column for c in group.columns if c.vector}
    plain = [f for f in features if f.agg in PLAIN and f.column not in vectors]
    if not plain:
        return None
    needs: dict[str, set[str]] = {}
    for f in plain:
        if f.column is not None:
            needs.setdefault(f.column, {"cnt"}).update(_PLAIN_NEEDS[f.agg])
    columns = tuple(
        ColumnStats(c.column, c.avro_type, frozenset(needs[c.column]))
        for c in group.columns
        if c.column in needs
    )
    return HopGroup(group.hop_us, tuple(plain), columns)


_PLAIN_NEEDS = {"count": (), "sum": ("sum",), "mean": ("sum",), "min": ("min",), "max": ("max",)}


def _merged_per_row(
    group: HopGroup,
    ordered: _OrderedEvents,
    q_kid: I64,
    q_t: I64,
    q_pos: I64,
    types: dict[str, pa.DataType],
    done: dict[str, pa.Array],
    retry: dict[str, npt.NDArray[np.bool_]],
) -> dict[str, pa.Array]:
    """The per-row tile merge's values (in row order) of the features out of COMPILED_KINDS,
    and of the sorted rows `retry` flags in place of the compiled values `done` holds."""
    rows = np.zeros(len(q_t), dtype=bool)
    for needs in retry.values():
        rows |= needs
    others = any(f.agg not in COMPILED_KINDS for f in group.features)
    at = np.arange(len(q_t)) if others else np.flatnonzero(rows)
    merged = tile_merged_values(group, ordered.sorted_events(), q_kid[at], q_t[at], types)
    out: dict[str, pa.Array] = {}
    for f in group.features:
        values = pa.concat_arrays(merged[f.name])
        if f.agg not in COMPILED_KINDS:  # every row, sorted: put back in row order
            out[f.name] = values.take(pa.array(np.argsort(q_pos)))
        elif f.name in retry:  # the flagged rows from the merge, the others as computed
            pick = np.arange(len(q_t))
            flagged = np.flatnonzero(retry[f.name])
            pick[q_pos[flagged]] = len(q_t) + np.searchsorted(at, flagged)
            both = pa.concat_arrays([done[f.name].cast(values.type), values])
            out[f.name] = both.take(pa.array(pick))
    return out
