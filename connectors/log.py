"""The dual source: one partition of a source's log, read as a single offset-ordered sequence.

Warehouse segments hold offsets up to the last archived offset L; Kafka holds L+1 onwards. A
`PartitionLog` reads segments from its start offset, then hands over to Kafka at exactly the next
offset (no gap, no duplicate). If Kafka no longer holds that offset, it stops with a `LogGapError`
naming the missing range rather than skip data. Without Kafka (the embedded default) the segments
are the whole log, and new segments (from `flows.ingest`) are picked up as they appear.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from connectors.envelope import OFFSET, DeadLetter, log_schema
from connectors.errors import ConnectorError, LogGapError
from connectors.manifest import Gap
from connectors.segments import Warehouse

if TYPE_CHECKING:  # Kafka's modules load with the first Kafka read: a segment replay never does
    from connectors.avro import SchemaStore
    from connectors.kafka_reader import KafkaLogReader

TOPIC_CHECK_S = 2.0  # how often a following flow checks its topic's shape


@dataclass(frozen=True, slots=True)
class KafkaTail:
    """Where the hot tail of a source lives; `partitions` is the count the source declares
    (None: the count the topic has when first read)."""

    bootstrap: str
    topic: str
    store: SchemaStore
    key_field: str
    partitions: int | None = None


@dataclass(frozen=True, slots=True)
class LogBatch:
    """Consecutive records of one partition: decoded events plus undecodable ones."""

    source: str
    partition: int
    events: pa.Table  # source columns + _offset, _partition, _arrival
    dead_letters: tuple[DeadLetter, ...] = ()
    next_offset: int = 0  # the first offset after this batch


BATCH_ROWS = 4_000_000  # a replay batch's default bounds (flows.settings: --batch-rows,
BATCH_BYTES = 160 << 20  # --batch-mb): few large batches are the fast path


@dataclass
class PartitionLog:
    """Segments then Kafka, for one partition, from `start_offset` (inclusive).

    Args:
        stop_at: stop once this offset (exclusive) is reached; None = follow the log for ever.
    """

    warehouse: Warehouse
    source: str
    partition: int
    start_offset: int
    arrow_schema: pa.Schema
    kafka: KafkaTail | None = None
    stop_at: int | None = None
    batch_rows: int = BATCH_ROWS  # at most this many records per replay batch from segments
    batch_bytes: int = BATCH_BYTES  # and at most this many bytes of them (Arrow, as read)
    kafka_batch: int = 5_000
    poll_interval_s: float = 0.5
    defaults: dict[str, Any] = field(default_factory=dict)  # reader defaults of added fields
    _next: int = field(init=False)
    _reader: KafkaLogReader | None = field(init=False, default=None)
    _last_poll: float = field(init=False, default=0.0)
    _in_kafka: bool = field(init=False, default=False)
    _base: int = field(init=False, default=0)  # log offset of Kafka offset 0
    _segments_end: int = field(init=False, default=0)  # the offset after the segments read
    _next_topic_check: float = field(init=False, default=0.0)
    _partitions: int | None = field(init=False, default=None)  # the topic's, when first read
    _ahead: Future[LogBatch | None] | None = field(init=False, default=None)
    _segments: Iterator[pa.RecordBatch] | None = field(init=False, default=None)  # kept open
    _carry: pa.RecordBatch | None = field(init=False, default=None)  # read, not yet taken

    def __post_init__(self) -> None:
        self._next = self.start_offset

    @property
    def done(self) -> bool:
        return self.stop_at is not None and self._next >= self.stop_at

    def end_offset(self) -> int:
        """The offset after the newest record the log holds now (segments and Kafka)."""
        end = self.warehouse.next_offset(self.source, self.partition)
        if self.kafka is not None:
            from connectors.kafka_admin import partition_watermarks

            base = self.warehouse.kafka_base(self.source, self.partition)
            _, high = partition_watermarks(self.kafka.bootstrap, self.kafka.topic, self.partition)
            end = max(end, high + (end if base is None else base))
        return end

    def kafka_lag(self) -> int | None:
        """Records in Kafka not yet read (from the latest fetch; None before Kafka is read)."""
        if self._reader is None:
            return None
        high = self._reader.cached_high_watermark()
        return None if high is None else max(0, high + self._base - self._next)

    def read_ahead(self) -> None:
        """Start reading the segments of a log that ends within READ_AHEAD_ROWS (`stop_at`) on
        a background thread: the object store's requests release the interpreter, so the
        partitions of a short catch-up (a restored host's tail) download side by side while
        the flow applies the first, instead of one after another. `read` takes the result."""
        todo = None if self.stop_at is None else self.stop_at - self._next
        if self._ahead is None and todo is not None and 0 < todo <= READ_AHEAD_ROWS:
            self._ahead = _read_ahead_pool().submit(self._read_segments)

    def read(self) -> LogBatch | None:
        """The next batch, or None when nothing new is available right now."""
        if self.done:
            return None
        batch = None
        if not self._in_kafka:
            ahead, self._ahead = self._ahead, None
            batch = ahead.result() if ahead is not None else self._read_segments()
            # Segments exhausted: from here on Kafka holds the log (until a gap says otherwise).
            self._in_kafka = batch is None and self.kafka is not None
        if batch is None and self._in_kafka:
            batch = self._read_kafka()
        if batch is not None and self.stop_at is not None:
            batch = _clip(batch, self.stop_at)
        if batch is not None:
            self._next = batch.next_offset
        return batch

    def _read_segments(self) -> LogBatch | None:
        archived = self._segments_end
        if self._segments is None:
            archived = self.warehouse.next_offset(self.source, self.partition)
            if archived <= self._next:
                return None
            self._segments_end = archived  # covered up to here, holes and gaps included
        # Row groups (and segment files) coalesced into a batch of up to batch_rows and
        # batch_bytes: replay cost is per batch and per touched key, so few large batches are
        # the fast path. After a large batch the reader is closed and the next batch opens at
        # its offset (re-reading at most one row group): nothing read stays held between
        # batches, so a replay's memory is one batch's, however long the log and however many
        # partitions. A small batch keeps its reader and the rest of its last row group (at
        # most a row group held), which a reopened reader would decode again for every batch.
        if self._segments is None:
            self._segments = iter(
                self.warehouse.read(
                    self.source,
                    self.partition,
                    from_offset=self._next,
                    to_offset=archived - 1,
                    batch_rows=self.batch_rows,
                )
            )
        taken, self._carry, exhausted = coalesce(
            self._segments, self._carry, self.batch_rows, self.batch_bytes
        )
        if exhausted or sum(b.num_rows for b in taken) >= KEEP_READER_ROWS:
            self._segments, self._carry = None, None
        schema, defaults = self.arrow_schema, self.defaults
        tables = [conform(pa.Table.from_batches([b]), schema, defaults) for b in taken]
        del taken
        if tables:
            table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
            last = int(table.column(OFFSET)[-1].as_py())
            end = self._segments_end if exhausted else last + 1
            return LogBatch(self.source, self.partition, table, (), end)
        if self._segments_end > self._next:  # only holes or gaps were left: move past them
            empty = log_schema(self.arrow_schema).empty_table()
            return LogBatch(self.source, self.partition, empty, (), self._segments_end)
        if self.kafka is None:
            return self._poll_new_segments()
        return None

    def _poll_new_segments(self) -> LogBatch | None:
        now = time.monotonic()
        if now - self._last_poll < self.poll_interval_s:
            return None
        self._last_poll = now
        if self.warehouse.next_offset(self.source, self.partition) > self._next:
            return self._read_segments()
        return None

    def _kafka_reader(self) -> KafkaLogReader:
        if self._reader is None:
            from connectors.kafka_reader import KafkaLogReader

            assert self.kafka is not None
            self._base = self.warehouse.fix_kafka_base(self.source, self.partition)
            self._reader = KafkaLogReader(
                self.kafka.bootstrap,
                self.kafka.topic,
                self.partition,
                self._next - self._base,
                self.kafka.store,
                self.arrow_schema,
                key_field=self.kafka.key_field,
            )
        return self._reader

    def _read_kafka(self) -> LogBatch | None:
        try:
            reader = self._kafka_reader()
            # Never block the worker: librdkafka prefetches in the background; take what it has.
            got = reader.read_batch(max_records=self.kafka_batch, timeout_s=0)
        except LogGapError as exc:
            self.close()
            if self.warehouse.next_offset(self.source, self.partition) > self._next:
                self._in_kafka = False
                return self._read_segments()  # archived before Kafka dropped it: no gap
            self._check_end(_high_watermark(self.kafka, self.partition))  # or re-created?
            raise LogGapError(
                f"source {self.source!r} partition {self.partition}: offset {self._next} "
                "onwards is neither in warehouse segments nor in Kafka (retention removed it "
                f"before it was archived): {exc}. To go on without them, record the lost "
                "range as a gap with `flows.run --kafka-start earliest-available`; to keep "
                "this from happening, archive more often than the topic's retention"
            ) from exc
        self._check_topic(reader)
        base = self._base
        if got.next_offset + base <= self._next:
            return None
        return LogBatch(
            self.source,
            self.partition,
            shift_offsets(got.events, base),
            tuple(shift_letter(d, base) for d in got.failures),
            got.next_offset + base,
        )

    def _check_topic(self, reader: KafkaLogReader) -> None:
        """Every TOPIC_CHECK_S: partition 0 checks that the topic still exists with the same
        partition count; every partition, that its end did not move back (a topic deleted
        and created again restarts its offsets at 0).

        Raises:
            ConnectorError: the topic was deleted, re-created, or its partitions changed.
        """
        now = time.monotonic()
        if now < self._next_topic_check:
            return
        self._next_topic_check = now + TOPIC_CHECK_S
        assert self.kafka is not None
        if self.partition == 0:
            count = reader.partition_count()
            if count is not None:
                expected = self.kafka.partitions or self._partitions or count
                self._partitions = expected
                if count != expected:
                    raise ConnectorError(_topic_changed(self.kafka.topic, expected, count))
        self._check_end(reader.cached_high_watermark())

    def _check_end(self, high: int | None) -> None:
        if high is not None and self.kafka is not None and high + self._base < self._next:
            raise ConnectorError(
                f"topic {self.kafka.topic!r} partition {self.partition}: its end moved back "
                f"to Kafka offset {high} after the flow read up to {self._next - self._base - 1}"
                ": the topic was deleted and created again, so its offsets no longer continue "
                "the log; restore the old topic, or point the source at a new topic with a "
                "fresh --warehouse and --state (its offsets start again at 0)"
            )

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


READ_AHEAD_ROWS = 100_000  # the largest log end read ahead, per partition (live-batch sized)
_READ_AHEAD: list[ThreadPoolExecutor] = []


def _read_ahead_pool() -> ThreadPoolExecutor:
    if not _READ_AHEAD:
        _READ_AHEAD.append(ThreadPoolExecutor(4, thread_name_prefix="log-read-ahead"))
    return _READ_AHEAD[0]


@dataclass(frozen=True, slots=True)
class KafkaStart:
    """Where the log of a partition that Kafka no longer holds from offset 0 starts: at the
    earliest offset Kafka still holds (`at_ms` None), or at the first record at or after a
    time (ms since the epoch; only for partitions whose log has not started yet)."""

    label: str  # as the user gave it: "earliest-available" or an ISO time
    at_ms: int | None = None

    @classmethod
    def parse(cls, text: str | None) -> KafkaStart | None:
        """The `--kafka-start` setting: None (not given), earliest-available, or an ISO time
        with a timezone.

        Raises:
            ConnectorError: the text is neither.
        """
        if not text or text == "earliest-available":
            return cls(text) if text else None
        try:
            at = datetime.fromisoformat(text)
        except ValueError:
            at = None
        if at is None or at.tzinfo is None:
            raise ConnectorError(
                f"--kafka-start {text!r} is neither 'earliest-available' nor an ISO time with "
                "a timezone; give e.g. --kafka-start 2026-01-31T00:00:00Z"
            )
        return cls(text, int(at.timestamp() * 1000))


def start_kafka_logs(
    warehouse: Warehouse,
    bootstrap: str,
    logs: Sequence[tuple[str, str, int]],
    start: KafkaStart | None,
) -> list[str]:
    """`start_kafka_log` for each (source, topic, partitions); a line per gap written. A topic
    that does not exist yet, or has another partition count, is left to the caller.

    Raises:
        LogGapError: as `start_kafka_log`.
    """
    from connectors.kafka_admin import list_partitions

    lines = []
    for source, topic, partitions in logs:
        try:
            if list_partitions(bootstrap, topic) != partitions:
                continue
        except ConnectorError:
            continue  # no such topic yet: nothing held back
        for gap in start_kafka_log(warehouse, source, (bootstrap, topic), partitions, start):
            lines.append(
                f"source {source!r} partition {gap.partition}: the log starts at offset "
                f"{gap.last_offset + 1}; offsets [{gap.first_offset}, {gap.last_offset}] are "
                "recorded as a gap in the warehouse manifest"
            )
    return lines


def start_kafka_log(
    warehouse: Warehouse,
    source: str,
    kafka: tuple[str, str],
    partitions: int,
    start: KafkaStart | None,
) -> list[Gap]:
    """Record where each partition's log starts in Kafka, before a flow reads it.

    With `start`, the offsets of each partition that are no longer in Kafka (or are before
    the time) and not in the warehouse become a gap of the warehouse manifest, so reads,
    snapshots and replays know the log's true start. Without it, a partition whose log has not
    started (no segments, no Kafka base) on a topic past retention is refused, naming every such
    partition, before anything is applied.

    Args:
        kafka: (bootstrap, topic) of the source's log.

    Returns:
        The gaps written.

    Raises:
        LogGapError: without `start`, partitions whose first offsets Kafka no longer holds.
    """
    from connectors.kafka_admin import offset_at_time, partition_watermarks

    (bootstrap, topic), gaps, missing = kafka, [], []
    for p in range(partitions):
        low = partition_watermarks(bootstrap, topic, p)[0]
        fresh = warehouse.next_offset(source, p) == 0 and warehouse.kafka_base(source, p) is None
        if start is None:
            if fresh and low > 0:
                missing.append(f"partition {p} [0, {low - 1}]")
            continue
        first = low
        if start.at_ms is not None and fresh:
            first = max(low, offset_at_time(bootstrap, topic, p, start.at_ms))
        gap = _record_start(warehouse, source, p, first, start)
        gaps += [gap] if gap is not None else []
    if missing:
        raise LogGapError(_not_held(source, topic, missing))
    return gaps


def _record_start(
    warehouse: Warehouse, source: str, partition: int, first: int, start: KafkaStart
) -> Gap | None:
    """The gap before Kafka offset `first` of a partition, listed in the manifest (if any)."""
    with warehouse.transaction(source) as tx:
        if first == 0 and tx.kafka_base(partition) is None:
            return None  # Kafka holds the whole log: nothing to record
        base = tx.fix_kafka_base(partition)  # 0 for a log that has not started
        begin = tx.next_offset(partition)
        if begin >= first + base:
            return None
        if start.at_ms is not None:
            why = "before the start chosen at onboarding"
        elif begin == 0:
            why = "before retention at onboarding"
        else:
            why = "no longer in Kafka (retention passed) and never archived"
        now = datetime.now(UTC).isoformat(timespec="seconds")
        reason = f"{why}: --kafka-start {start.label} at {now}"
        return tx.append_gap(partition, begin, first + base - 1, reason)


def _not_held(source: str, topic: str, missing: list[str]) -> str:
    return (
        f"source {source!r}: Kafka topic {topic!r} no longer holds the start of the log of "
        f"{', '.join(missing)} (retention passed) and the warehouse has no segments for those "
        "offsets, so the log would have a gap; start the log at what Kafka still holds with "
        "`flows.run --kafka-start earliest-available`, or at a time with `--kafka-start "
        "2026-01-31T00:00:00Z` (either records the gap in the warehouse manifest), or first "
        "ingest the history that covers those offsets with flows.ingest"
    )


def _high_watermark(kafka: KafkaTail | None, partition: int) -> int | None:
    if kafka is None:
        return None
    from connectors.kafka_admin import partition_watermarks

    try:
        return partition_watermarks(kafka.bootstrap, kafka.topic, partition)[1]
    except ConnectorError:
        return None


def _topic_changed(topic: str, expected: int, count: int) -> str:
    if count == 0:
        return (
            f"topic {topic!r} was deleted while the flow was following it (the broker no "
            "longer knows it): nothing more can be read; if that was a mistake, restore the "
            f"topic with {expected} partitions and its records, else point the source at a new "
            "topic (and a fresh --warehouse and --state, as its offsets start again at 0)"
        )
    what = "added" if count > expected else "removed (the topic was re-created)"
    return (
        f"topic {topic!r} now has {count} partitions, not the {expected} the flow reads: "
        f"partitions were {what} while the flow was following it; keys are placed by murmur2 "
        "modulo the partition count, so events of one key now go to another partition and "
        f"partitions past {expected - 1} would never be read. Kafka cannot remove partitions: "
        f"recreate the topic with {expected} partitions (and re-produce), or declare "
        f"Source(partitions={count}) with a new topic and replay the views"
    )


def shift_offsets(events: pa.RecordBatch, base: int) -> pa.Table:
    """Kafka records as log records: Kafka offset + the partition's base."""
    table = pa.Table.from_batches([events])
    if base == 0:
        return table
    i = table.column_names.index(OFFSET)
    return table.set_column(i, OFFSET, pc.add(table.column(i), pa.scalar(base, pa.int64())))


def shift_letter(letter: DeadLetter, base: int) -> DeadLetter:
    if base == 0 or letter.offset is None:
        return letter
    return replace(letter, offset=letter.offset + base)


# A batch of this many records or more closes its segment reader (8 of the writer's row groups
# of 128k: re-reading one costs under 1/8 of the batch's decoding); a smaller one keeps it.
KEEP_READER_ROWS = 1 << 20


def coalesce(
    batches: Iterator[pa.RecordBatch], carry: pa.RecordBatch | None, rows: int, nbytes: int
) -> tuple[list[pa.RecordBatch], pa.RecordBatch | None, bool]:
    """The next record batches of `carry` (what the last call read and did not take) then
    `batches`, holding at most `rows` records and `nbytes` bytes (at least one record): the
    last one taken may be a slice of one, whose rest is returned to carry to the next call.
    Also whether `batches` ran out before a bound was reached (then nothing is carried)."""
    taken: list[pa.RecordBatch] = []
    have_rows = have_bytes = 0
    for batch in itertools.chain([carry] if carry is not None else [], batches):
        if not batch.num_rows:
            continue
        size = batch.nbytes
        fit = min(batch.num_rows, rows - have_rows)
        if have_bytes + size > nbytes:  # the rows that fit the bytes left, at their mean size
            fit = min(fit, (nbytes - have_bytes) * batch.num_rows // max(size, 1))
        fit = max(fit, 0 if taken else 1)
        if fit:
            taken.append(batch if fit == batch.num_rows else batch.slice(0, fit))
            have_rows, have_bytes = have_rows + fit, have_bytes + taken[-1].nbytes
        if fit < batch.num_rows:
            return taken, batch.slice(fit), False
        if have_rows >= rows or have_bytes >= nbytes:
            return taken, None, False
    return taken, None, True


def conform(table: pa.Table, schema: pa.Schema, defaults: dict[str, Any]) -> pa.Table:
    """A segment written with an older schema, read as the current one: added fields get their
    default (or null), removed fields are dropped, promoted types are cast. Log columns stay."""
    source_names = schema.names
    if table.schema.names[: len(source_names)] == source_names and all(
        table.schema.field(f.name).type == f.type for f in schema
    ):
        return table
    columns = []
    for f in schema:
        if f.name in table.column_names:
            columns.append(table.column(f.name).cast(f.type))
        else:
            columns.append(pa.array([defaults.get(f.name)] * table.num_rows, f.type))
    log = [n for n in table.column_names if n.startswith("_")]
    names = [*source_names, *log]
    return pa.Table.from_arrays([*columns, *(table.column(n) for n in log)], names=names)


def _clip(batch: LogBatch, stop_at: int) -> LogBatch:
    if batch.next_offset <= stop_at:
        return batch
    events = batch.events
    keep = pc.less(events.column(OFFSET), stop_at)
    dead = tuple(d for d in batch.dead_letters if d.offset is None or d.offset < stop_at)
    return LogBatch(batch.source, batch.partition, events.filter(keep), dead, stop_at)
