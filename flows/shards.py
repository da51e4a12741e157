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

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from connectors.envelope import DeadLetter
from connectors.log import LogBatch
from connectors.partitioner import partitions_for
from flows.aggregate import LogSlice, event_times, key_strings, running_watermarks
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


@dataclass(slots=True)
class PartitionMark:
    """The running state of one source partition between batches (per log partition): where it
    is, its watermark, and the end of the last slice sent to each shard."""

    next_offset: int
    watermark: int | None
    last_broadcast: float = float("-inf")
    sent: dict[int, int] = field(default_factory=dict)
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

    def route(self, marked: MarkedBatch, key: str, shards: int) -> list[tuple[int, Routed]]:
        """The parts of a marked batch per view shard (`split`), each knowing where the previous
        part sent to its shard ended."""
        out = []
        for shard, part in split(marked, key, shards):
            after = self.sent.get(shard, self.started)
            self.sent[shard] = part.through_offset
            out.append((shard, Routed(marked.batch.source, part, after, _letters(marked, shard))))
        return out


def _letters(marked: MarkedBatch, shard: int) -> tuple[DeadLetter, ...]:
    return marked.batch.dead_letters if shard == marked.batch.partition else ()


def split(marked: MarkedBatch, key: str, shards: int) -> list[tuple[int, LogSlice]]:
    """The parts of a marked batch per view shard, each in offset order.

    The partition's own shard (shard == partition) always gets its part; other shards get
    theirs when they have events, or an empty one on broadcast.
    """
    batch = marked.batch
    events = batch.events
    own = batch.partition
    if events.num_rows:
        homes = partitions_for(key_strings(events, key), shards)
    else:
        homes = np.zeros(0, dtype=np.int64)
    out: list[tuple[int, LogSlice]] = []
    for shard in range(shards):
        rows = _rows_of(homes, shard)
        empty = rows is not None and len(rows) == 0
        if shard != own and not marked.broadcast and (empty or not events.num_rows):
            continue
        part = events if rows is None else events.take(pa.array(rows))
        marks = marked.watermarks if rows is None else marked.watermarks[rows]
        piece = LogSlice(
            batch.partition, shard, part, marks, batch.next_offset - 1, marked.end_watermark
        )
        out.append((shard, piece))
    return out


def _rows_of(homes: I64, shard: int) -> I64 | None:
    """The rows whose key hashes to `shard`; None when that is every row (no copy needed)."""
    hit = homes == shard
    if hit.all():
        return None
    return np.flatnonzero(hit)
