"""Between the log and the views: mark each source partition's events with the partition's
watermark, then split the batch by view shard (the partition of the key space a key hashes to).

    LogBatch of partition p --mark--> MarkedBatch (watermark at each event, in offset order)
                            --split--> one Routed LogSlice per view shard that gets events

A producer that partitions by the entity key with murmur2 (Kafka's Java default, and
`flows.ingest`) puts every key in its own shard's partition: a batch then goes whole to one shard,
as before there were shards. A producer with another partitioner (librdkafka's
`consistent_random`, null or foreign Kafka keys) is merely correct: its batches are split, and
each part travels to the worker that owns the shard. Each shard keeps its position per source
partition, so the exactly-once effect holds for every part.

Shards that get no events from a batch still learn how far the partition has been read
(`broadcast`), at most every BROADCAST_S seconds and whenever the batch reaches the end of the log
as it stood at start, so a restart never re-reads the whole partition for them and new versions
know when they have caught up. Pure: no bytewax, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from connectors.envelope import OFFSET, DeadLetter
from connectors.log import LogBatch
from connectors.partitioner import partitions_and_codes, partitions_for
from flows.aggregate import (
    KEY,
    LogSlice,
    Transform,
    event_times,
    key_column,
    key_strings,
    late_mask,
    running_watermarks,
)
from flows.quarantine import transform_guarded
from flows.validate import record_payload
from state.layout import ViewLayout
from state.tiles import I64

BROADCAST_S = 0.5


@dataclass(frozen=True, slots=True)
class MarkedBatch:
    """A validated batch of one source partition with its watermark at every event."""

    batch: LogBatch
    first_offset: int  # the first log offset the batch covers
    watermarks: I64
    end_watermark: int | None
    broadcast: bool  # tell every shard how far the partition has been read


@dataclass(frozen=True, slots=True)
class Routed:
    """What one view shard receives from one batch: its slice, the dead letters of the batch
    (sent with the partition's own shard only), and the end of the previous slice sent to the
    shard from the same partition (the shard must have applied that far: nothing lost between)."""

    source: str
    slice: LogSlice
    after: int
    dead_letters: tuple[DeadLetter, ...] = ()
    view: str | None = None  # the re-keyed view the slice is for; None = views of the source key
    held: int = 0  # rows of this process's flows.inflight.RowBudget, released once applied


@dataclass(slots=True)
class PartitionMark:
    """The running state of one source partition between batches (per log partition): where it
    is, its watermark, and the end of the last slice sent to each shard."""

    next_offset: int
    watermark: int | None
    last_broadcast: float = float("-inf")
    sent: dict[tuple[str | None, int], int] = field(default_factory=dict)
    started: int = -1

    def __post_init__(self) -> None:
        self.started = self.next_offset - 1

    def mark(self, batch: LogBatch, timestamp: str, catch_up: int, now: float) -> MarkedBatch:
        """Watermarks of `batch` (validated, next in offset order) and whether to broadcast."""
        ts = event_times(batch.events, timestamp)
        marks, end = running_watermarks(ts, self.watermark)
        first = self.next_offset
        reaches_end = first < catch_up <= batch.next_offset
        broadcast = reaches_end or now - self.last_broadcast >= BROADCAST_S
        if broadcast:
            self.last_broadcast = now
        self.next_offset, self.watermark = batch.next_offset, end
        return MarkedBatch(batch, first, marks, end, broadcast)

    def route(
        self,
        marked: MarkedBatch,
        key: str,
        shards: int,
        rekeyed: Sequence[Rekeyed] = (),
        *,
        plain: bool = True,
    ) -> list[tuple[int, Routed]]:
        """The parts of a marked batch per view shard: one set for the views keyed by the
        source key (`split`, when there are such views: `plain`), one per view with its own key
        (`split_rekeyed`); each part knows where the previous part sent to its shard ended.
        The batch's dead letters travel with the first group's part for the own shard."""
        own = marked.batch.partition
        source_letters = marked.batch.dead_letters
        groups: list[tuple[str | None, list[tuple[int, LogSlice]], tuple[DeadLetter, ...]]] = []
        if plain:
            groups.append((None, split(marked, key, shards), source_letters))
            source_letters = ()
        for view in rekeyed:
            parts, letters = split_rekeyed(marked, view, shards)
            groups.append((view.view, parts, (*source_letters, *letters)))
            source_letters = ()
        out = []
        for group, parts, letters in groups:
            for shard, part in parts:
                after = self.sent.get((group, shard), self.started)
                self.sent[(group, shard)] = part.through_offset
                mine = letters if shard == own else ()
                out.append((shard, Routed(marked.batch.source, part, after, mine, group)))
        return out


@dataclass(frozen=True, slots=True)
class Rekeyed:
    """A view keyed otherwise than its source: its events are late-checked and transformed
    before the split, because its key may be a column the transform adds."""

    view: str
    layout: ViewLayout
    transform: Transform | None


def split(marked: MarkedBatch, key: str, shards: int) -> list[tuple[int, LogSlice]]:
    """The parts of a marked batch per view shard of the source key, each in offset order.

    The partition's own shard (shard == partition) always gets its part; other shards get
    theirs when they have events, or an empty one on broadcast.
    """
    events = marked.batch.events
    if not events.num_rows:
        return _slices(marked, events, marked.watermarks, _homes(None, shards), shards, None)
    homes, codes = partitions_and_codes(key_strings(events, key), shards)
    return _slices(marked, events, marked.watermarks, homes, shards, None, codes)


def split_rekeyed(
    marked: MarkedBatch, view: Rekeyed, shards: int
) -> tuple[list[tuple[int, LogSlice]], tuple[DeadLetter, ...]]:
    """The parts of a marked batch per shard of a re-keyed view: late events (by the source
    partition's watermark, as for every view) go with the partition's own shard, the others
    are transformed, keyed (`_key`) and split by the view's key; events with a null key part
    become dead letters naming the view."""
    events, layout = marked.batch.events, view.layout
    late = late_mask(event_times(events, layout.timestamp), marked.watermarks, layout.retention_us)
    late_rows = events.filter(pa.array(late)) if late.any() else events.slice(0, 0)
    kept = events.filter(pa.array(~late)) if late.any() else events
    kept, poison = transform_guarded(
        view.view, layout, kept, view.transform, marked.batch.partition
    )
    keys = key_column(kept, layout.key_columns)
    letters = (*poison, *_null_keys(view.view, layout, kept, keys, marked.batch.partition))
    if keys.null_count:
        valid = keys.is_valid()
        kept, keys = kept.filter(valid), keys.filter(valid)
    kept = kept.append_column(KEY, keys)
    homes = _homes(keys if kept.num_rows else None, shards)
    marks = np.zeros(kept.num_rows, dtype=np.int64)  # lateness is decided: not needed any more
    return _slices(marked, kept, marks, homes, shards, late_rows), tuple(letters)


def _homes(keys: pa.ChunkedArray | None, shards: int) -> I64:
    return np.zeros(0, dtype=np.int64) if keys is None else partitions_for(keys, shards)


def _slices(
    marked: MarkedBatch,
    events: pa.Table,
    marks: I64,
    homes: I64,
    shards: int,
    late: pa.Table | None,
    codes: pa.DictionaryArray | None = None,
) -> list[tuple[int, LogSlice]]:
    batch = marked.batch
    own = batch.partition
    out: list[tuple[int, LogSlice]] = []
    for shard in range(shards):
        rows = _rows_of(homes, shard)
        empty = rows is not None and len(rows) == 0
        if shard != own and not marked.broadcast and (empty or not events.num_rows):
            continue
        if rows is None:
            part = events
        elif len(rows):
            part = events.take(pa.array(rows))
        else:  # nothing for this shard (a broadcast): no buffer of the batch kept, no take
            part = events.schema.empty_table()
        piece = LogSlice(
            batch.partition,
            shard,
            part,
            marks if rows is None else marks[rows],
            batch.next_offset - 1,
            marked.end_watermark,
            prepared=late is not None,
            late=late if shard == own else None,
            key_codes=codes if rows is None else None,  # they number every row of `events`
        )
        out.append((shard, piece))
    return out


def _null_keys(
    view: str, layout: ViewLayout, events: pa.Table, keys: pa.ChunkedArray, partition: int
) -> list[DeadLetter]:
    if not keys.null_count:
        return []
    rows = np.flatnonzero(np.asarray(keys.is_null().to_numpy(zero_copy_only=False), dtype=bool))

    def nulls(row: int) -> str:
        return ", ".join(repr(c) for c in layout.key_columns if not events.column(c)[row].is_valid)

    return [
        DeadLetter(
            reason=f"view {view!r}: key column(s) {nulls(int(r))} null in record at offset "
            f"{events.column(OFFSET)[r].as_py()}; the view needs every part of its key "
            f"{layout.key_columns}",
            partition=partition,
            offset=int(events.column(OFFSET)[r].as_py()),
            payload=record_payload(events, int(r)),
        )
        for r in rows
    ]


def _rows_of(homes: I64, shard: int) -> I64 | None:
    """The rows whose key hashes to `shard`; None when that is every row (no copy needed)."""
    hit = homes == shard
    if hit.all():
        return None
    return np.flatnonzero(hit)
