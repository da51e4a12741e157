"""The windowed-aggregation core on the write path: apply a batch of log records to a view.

Pure and batch-shaped (no bytewax): the same `apply_batch` serves live micro-batches and replay's
whole-partition batches. Per batch it drops records already applied (exactly-once effect after a
restart), runs the view's transform, tracks the partition watermark in offset order to reject
events too late for the view, turns events into one-event tiles, merges them with the stored
tiles of the touched keys in one vectorized pass, prunes tiles no window can reach again, and
returns the new entity blobs plus the partition's progress, ready for one atomic commit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from state.codec import decode_words, encode_key, encode_words
from state.layout import HopGroup, ViewLayout
from state.store import PartitionProgress
from state.tiles import (
    I64,
    ColumnValues,
    TileBlock,
    combine,
    concat_blocks,
    run_starts,
    unit_block,
)

OFFSET = "_offset"
Transform = Callable[[pa.Table], pa.Table]
BlobGetter = Callable[[Sequence[bytes]], list[bytes | None]]


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one batch did to one view partition."""

    puts: dict[bytes, bytes]
    progress: PartitionProgress
    late: pa.Table  # rows rejected as too late (for the dead-letter output)
    applied: int


def event_times(table: pa.Table, column: str) -> I64:
    """Event times as int64 microseconds (timestamp[ms|us] or integer micros)."""
    col = table.column(column)
    if pa.types.is_timestamp(col.type):
        col = col.cast(pa.timestamp("us", tz=col.type.tz))
    return np.asarray(col.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)


def key_strings(table: pa.Table, column: str) -> pa.ChunkedArray:
    col = table.column(column)
    return col if pa.types.is_string(col.type) else col.cast(pa.string())


def column_values(table: pa.Table, layout: ViewLayout) -> dict[str, ColumnValues]:
    out: dict[str, ColumnValues] = {}
    for name, avro_type in layout.column_types.items():
        col = table.column(name)
        valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        if avro_type in ("int", "long", "float", "double"):
            values: npt.NDArray[Any] = np.asarray(
                col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64
            )
        else:
            values = np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)
        out[name] = ColumnValues(values, valid)
    return out


@dataclass(frozen=True, slots=True)
class SortedEvents:
    """A batch's events sorted by (key id, event time, offset), with their aggregated columns."""

    kid: I64
    ts: I64
    off: I64
    columns: dict[str, ColumnValues]


def sort_events(table: pa.Table, layout: ViewLayout, key_ids: I64, ts: I64) -> SortedEvents:
    """The events of `table` in (key, event time, offset) order: the order tiles are built in."""
    offsets = np.asarray(table.column(OFFSET).to_numpy(), dtype=np.int64)
    order = np.lexsort((offsets, ts, key_ids))
    columns = {
        name: ColumnValues(cv.values[order], cv.valid[order])
        for name, cv in column_values(table, layout).items()
    }
    return SortedEvents(key_ids[order], ts[order], offsets[order], columns)


def late_mask(
    ts: I64, watermark: int | None, retention_us: int | None
) -> tuple[npt.NDArray[np.bool_], int | None]:
    """Which events (in offset order) are too late, and the watermark after the batch.

    The watermark is the newest event time seen on the partition so far; an event is late when
    it is older than watermark - retention. A pure function of the log order, so replays and
    snapshots reject exactly the same events as the live run.
    """
    if len(ts) == 0:
        return np.zeros(0, dtype=bool), watermark
    running = np.maximum.accumulate(ts)
    if watermark is not None:
        running = np.maximum(running, watermark)
    new_watermark = int(running[-1])
    if retention_us is None:
        return np.zeros(len(ts), dtype=bool), new_watermark
    return ts < running - retention_us, new_watermark


def prepare(
    table: pa.Table, layout: ViewLayout, applied_offset: int, transform: Transform | None
) -> pa.Table:
    """Drop records at or below the applied offset, then run the view's transform."""
    if applied_offset >= 0 and table.num_rows:
        table = table.filter(pc.greater(table.column(OFFSET), applied_offset))
    if transform is not None and table.num_rows:
        table = _transformed(table, layout, transform)
    return table


def _transformed(table: pa.Table, layout: ViewLayout, transform: Transform) -> pa.Table:
    result = transform(table)
    if isinstance(result, pa.RecordBatch):
        result = pa.Table.from_batches([result])
    if not isinstance(result, pa.Table):
        raise TypeError(
            f"view {layout.view!r}: transform returned {type(result).__name__}; "
            "it must return a pyarrow.Table"
        )
    needed = {OFFSET, layout.key, layout.timestamp, *layout.columns}
    missing = sorted(needed - set(result.column_names))
    if missing:
        raise TypeError(
            f"view {layout.view!r}: transform dropped column(s) {missing}; keep the "
            "key, timestamp, _offset and every aggregated column"
        )
    return result


def apply_batch(
    layout: ViewLayout,
    table: pa.Table,
    progress: PartitionProgress,
    get_blobs: BlobGetter,
    transform: Transform | None = None,
    through_offset: int | None = None,
) -> ApplyResult:
    """Apply one offset-ordered batch of a partition's records to a view.

    Args:
        layout: the view.
        table: records of one source partition in offset order: source columns plus `_offset`.
        progress: the partition's progress before the batch (from the view store).
        get_blobs: reads the stored blobs of entity keys (one multi-get).
        transform: the view's optional row filter/transform.
        through_offset: the last log offset the batch covers (records that became dead letters
            included); defaults to the highest `_offset` in the table.
    """
    table = prepare(table, layout, progress.applied_offset, transform)
    last_offset = max(progress.applied_offset, through_offset if through_offset is not None else -1)
    if table.num_rows:
        last_offset = max(last_offset, int(pc.max(table.column(OFFSET)).as_py()))
    ts = event_times(table, layout.timestamp)
    late, watermark = late_mask(ts, progress.watermark, layout.retention_us)
    rejected = table.slice(0, 0)
    if late.any():
        rejected = table.filter(pa.array(late))
        table, ts = table.filter(pa.array(~late)), ts[~late]
    puts = _merge_into_tiles(layout, table, ts, watermark, get_blobs) if table.num_rows else {}
    new_progress = PartitionProgress(
        applied_offset=last_offset,
        watermark=watermark,
        events_applied=progress.events_applied + table.num_rows,
        late_events=progress.late_events + rejected.num_rows,
    )
    return ApplyResult(puts, new_progress, rejected, table.num_rows)


def _merge_into_tiles(
    layout: ViewLayout, table: pa.Table, ts: I64, watermark: int | None, get_blobs: BlobGetter
) -> dict[bytes, bytes]:
    encoded = key_strings(table, layout.key).combine_chunks().dictionary_encode()
    key_ids = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    keys: list[str] = encoded.dictionary.to_pylist()
    ev = sort_events(table, layout, key_ids, ts)
    raw_keys = [encode_key(k) for k in keys]
    old = _load_old(layout, get_blobs(raw_keys))
    newest = _newest_per_key(ev.kid, ev.ts, old.newest)
    merged = [_merge_group(g, gi, old, newest, ev, watermark) for gi, g in enumerate(layout.groups)]
    return _encode_keys(layout, raw_keys, merged, newest)


@dataclass(slots=True)
class _OldState:
    blocks: list[TileBlock | None]  # per group: the stored rows of every touched key, or None
    key_of_row: list[I64]  # per group: key id of every stored row
    newest: I64
    last_of_key: list[npt.NDArray[np.bool_]]  # per group: the row is its key's boundary row


def _load_old(layout: ViewLayout, blobs: list[bytes | None]) -> _OldState:
    """The stored tiles of the touched keys, concatenated per group (one copy, no per-key
    structured arrays)."""
    words: list[list[npt.NDArray[np.int64]]] = [[] for _ in layout.groups]
    objs: list[dict[str, list[Any]]] = [{f: [] for f in g.object_fields} for g in layout.groups]
    kids: list[list[int]] = [[] for _ in layout.groups]
    counts: list[list[int]] = [[] for _ in layout.groups]
    newest = np.full(len(blobs), np.iinfo(np.int64).min, dtype=np.int64)
    for kid, blob in enumerate(blobs):
        if blob is None:
            continue
        groups, newest[kid] = decode_words(layout, blob)
        for gi, (w, o) in enumerate(groups):
            if len(w):
                words[gi].append(w)
                kids[gi].append(kid)
                counts[gi].append(len(w))
                for f, values in o.items():
                    objs[gi][f].append(values)
    blocks: list[TileBlock | None] = []
    key_of_row: list[I64] = []
    last_of_key: list[npt.NDArray[np.bool_]] = []
    for gi, group in enumerate(layout.groups):
        total = sum(counts[gi])
        last = np.zeros(total, dtype=bool)
        last[np.cumsum(counts[gi], dtype=np.int64) - 1] = True
        last_of_key.append(last)
        if not words[gi]:
            blocks.append(None)
            key_of_row.append(np.zeros(0, dtype=np.int64))
            continue
        rows = np.ascontiguousarray(np.concatenate(words[gi])).view(group.dtype).reshape(-1)
        group_objs = {f: np.concatenate(v) for f, v in objs[gi].items()}
        blocks.append(TileBlock(rows, group_objs))
        key_of_row.append(np.repeat(np.asarray(kids[gi], dtype=np.int64), counts[gi]))
    return _OldState(blocks, key_of_row, newest, last_of_key)


def _newest_per_key(key_ids: I64, ts: I64, old_newest: I64) -> I64:
    newest = old_newest.copy()
    starts = run_starts(key_ids)
    newest[key_ids[starts]] = np.maximum(newest[key_ids[starts]], np.maximum.reduceat(ts, starts))
    return newest


def _merge_group(
    group: HopGroup,
    gi: int,
    old: _OldState,
    newest: I64,
    ev: SortedEvents,
    watermark: int | None,
) -> tuple[TileBlock, I64]:
    """Merge a batch's events into the touched keys' stored tiles of one hop group.

    Every key's tiles end with a boundary row: the events at exactly its newest event time,
    kept apart from the rest of their tile, so that a read as of exactly that time can leave
    them out (the window is exclusive of t). Rows sort by (key, tile, boundary).
    """
    fresh = unit_block(
        group, ev.ts, ev.off, {c.column: ev.columns[c.column] for c in group.columns}
    )
    row_keys = ev.kid
    boundary = ev.ts == newest[ev.kid]
    stored = old.blocks[gi]
    if stored is not None:
        old_keys = old.key_of_row[gi]
        still = old.last_of_key[gi] & (old.newest[old_keys] == newest[old_keys])
        fresh = concat_blocks(group, [stored, fresh])
        row_keys = np.concatenate([old_keys, ev.kid])
        boundary = np.concatenate([still, boundary])
        order = np.lexsort((boundary, fresh.rows["tile"], row_keys))
        fresh, row_keys, boundary = fresh.take(order), row_keys[order], boundary[order]
    starts = run_starts(row_keys, fresh.rows["tile"], boundary)
    block = combine(group, fresh, starts)
    row_keys = row_keys[starts]
    if group.hop_us and watermark is not None:
        oldest = watermark // group.hop_us - group.max_window_us // group.hop_us
        keep = block.rows["tile"] >= oldest
        if not keep.all():
            block, row_keys = block.take(np.flatnonzero(keep)), row_keys[keep]
    return block, row_keys


def _encode_keys(
    layout: ViewLayout, raw_keys: list[bytes], merged: list[tuple[TileBlock, I64]], newest: I64
) -> dict[bytes, bytes]:
    n_keys = len(raw_keys)
    bounds = [np.searchsorted(row_keys, np.arange(n_keys + 1)).tolist() for _, row_keys in merged]
    words = []
    for group, (block, _) in zip(layout.groups, merged, strict=True):
        rows = np.ascontiguousarray(block.rows)
        words.append(rows.view(np.int64).reshape(len(rows), len(group.dtype.names or ())))
    newest_list = newest.tolist()
    puts: dict[bytes, bytes] = {}
    for kid in range(n_keys):
        groups = []
        for w, (block, _), b in zip(words, merged, bounds, strict=True):
            a, z = b[kid], b[kid + 1]
            groups.append((w[a:z], {f: v[a:z] for f, v in block.objs.items()}))
        puts[raw_keys[kid]] = encode_words(layout, groups, newest_list[kid])
    return puts
