"""`python -m flows.archive`: move closed Kafka offset ranges into warehouse log segments.

Per partition, records from the log's next offset (the last archived offset + 1) up to the
topic's end as of the start are decoded into the source's typed columns and appended as
segments of at most --segment-rows records. A trailing range smaller than that is archived only
once its oldest record is older than --max-age (so segments roll by size and by age).

Every offset is accounted for, so archive never stops at a bad record:
- a data record is a row of a segment;
- an undecodable record, a tombstone (no value) and a record without an event time are dead
  letters: archive writes them, with the reason and the original bytes (the Kafka value; a
  record without an event time re-encoded as the source's single-object Avro), to the warehouse
  dead-letter files `<warehouse>/<source>/_deadletter/` (whether or not the flow already sent
  them to `<source>.dlq`), and their offsets are holes of the segment that covers them;
- offsets Kafka never hands to a reader (transaction markers, records of aborted transactions:
  not data) are holes too; a range with no data record at all is a gap entry of the manifest.
A segment is durable (file fsync'd, then the manifest replaced atomically) before the manifest
records it, so after a crash a rerun leaves every offset covered exactly once. The topic must
have the source's partition count.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from connectors.avro import SingleObjectWriter, arrow_schema, fingerprint_hex
from connectors.deadletters import FileDeadLetterSink
from connectors.envelope import ARRIVAL, OFFSET, DeadLetter, log_schema
from connectors.errors import ConnectorError
from connectors.kafka_admin import list_partitions
from connectors.kafka_reader import KafkaBatch, KafkaLogReader
from connectors.log import shift_letter, shift_offsets
from connectors.segments import Warehouse
from flows.cli import command_main
from flows.errors import ConfigError
from flows.schemas import register_current
from flows.settings import (
    FEATURES,
    KAFKA,
    WAREHOUSE,
    WAREHOUSE_ENDPOINT,
    CommandSettings,
    option,
)
from flows.spec import Source, load_definitions

NO_RECORDS = "archived: no data record (dead letters, transaction markers or aborted transactions)"


@dataclass(frozen=True, slots=True)
class ArchiveSettings(CommandSettings):
    features: str = FEATURES.field()
    warehouse: str = WAREHOUSE.field()
    kafka: str | None = KAFKA.field()
    warehouse_endpoint: str | None = WAREHOUSE_ENDPOINT.field()
    source: str | None = option(
        None, "source to archive (default: every source in the definitions)"
    )
    segment_rows: int = option(1_000_000, "records per segment (roll by size)")
    max_age: float = option(
        3600.0,
        "archive a smaller trailing range once its oldest record is this "
        "many seconds old (roll by age)",
    )
    follow: bool = option(False, "keep archiving every --interval seconds until Ctrl-C")
    interval: float = option(60.0, "seconds between archiving rounds with --follow")


@dataclass(frozen=True, slots=True)
class ArchiveReport:
    segments: int
    records: int


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("flows.archive", __doc__, ArchiveSettings, _archive, argv)


def _archive(settings: ArchiveSettings) -> int:
    if not settings.kafka:
        raise ConfigError("--kafka HOST:PORT is required: archive moves records from Kafka")
    defs = load_definitions(settings.features)
    sources = [defs.sources[settings.source]] if settings.source else list(defs.sources.values())
    warehouse = Warehouse(settings.warehouse)
    while True:
        for source in sources:
            report = archive_source(
                source, warehouse, settings.kafka, settings.segment_rows, settings.max_age
            )
            print(
                f"archived {report.records:,} records of {source.name!r} into "
                f"{report.segments} segment(s)",
                flush=True,
            )
        if not settings.follow:
            return 0
        time.sleep(settings.interval)


def archive_source(
    source: Source, warehouse: Warehouse, bootstrap: str, segment_rows: int, max_age_s: float
) -> ArchiveReport:
    """Archive every partition of a source up to the topic's current end.

    Raises:
        ConnectorError: the topic's partition count is not the source's (nothing archived).
    """
    schema = source.avro_schema()
    store = register_current(source, warehouse)
    check_partition_count(bootstrap, source)
    segments = records = 0
    for p in range(source.partitions):
        start = warehouse.next_offset(source.name, p)
        base = warehouse.fix_kafka_base(source.name, p)  # log offset of Kafka offset 0
        reader = KafkaLogReader(
            bootstrap,
            source.kafka_topic,
            p,
            start - base,
            store,
            arrow_schema(schema),
            key_field=source.key,
        )
        encoder = SingleObjectWriter(schema)
        target = _Target(source, warehouse, p, base, fingerprint_hex(schema), encoder)
        try:
            s, r = _archive_partition(target, reader, start, segment_rows, max_age_s)
        finally:
            reader.close()
        segments, records = segments + s, records + r
    return ArchiveReport(segments, records)


def check_partition_count(bootstrap: str, source: Source) -> None:
    """Refuse a topic whose partition count differs from the source's.

    Raises:
        ConnectorError: naming both counts and what to do.
    """
    found = list_partitions(bootstrap, source.kafka_topic)
    if found != source.partitions:
        raise ConnectorError(
            f"topic {source.kafka_topic!r} has {found} partitions but source {source.name!r} "
            f"declares {source.partitions}; archiving would "
            + ("leave partitions unread" if found > source.partitions else "fail on a missing one")
            + " and keys are placed by murmur2 modulo the count: fix Source(partitions=...) or "
            "--features, or archive the topic the source was written to"
        )


@dataclass(frozen=True, slots=True)
class _Target:
    """Where one partition's archive goes: its source, warehouse, the base of its log offsets
    (log offset = Kafka offset + base), schema fingerprint, and the encoder of records that
    become dead letters at archive (their original format)."""

    source: Source
    warehouse: Warehouse
    partition: int
    base: int
    fingerprint: str
    encoder: SingleObjectWriter


@dataclass
class _Pending:
    """Records read but not yet archived: tables of data records, the dead letters among their
    offsets, and the first offset they cover (holes included)."""

    first: int
    tables: list[pa.Table] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(t.num_rows for t in self.tables)


def _archive_partition(
    target: _Target,
    reader: KafkaLogReader,
    start: int,
    segment_rows: int,
    max_age_s: float,
) -> tuple[int, int]:
    """Archive one partition from log offset `start`; offsets here are log offsets."""
    base = target.base
    end = reader.high_watermark() + base
    pending = _Pending(start)
    covered, segments, records = start, 0, 0
    while covered < end:
        batch = reader.read_batch(max_records=min(5000, end - covered))
        if batch.next_offset + base <= covered:
            if batch.at_end:
                break
            continue
        upto = min(batch.next_offset + base, end)
        _take(target, pending, batch, (covered, upto))
        covered = upto
        while pending.rows >= segment_rows:
            pending = _commit(target, pending, segment_rows)
            segments, records = segments + 1, records + segment_rows
    tail_rows = pending.rows
    if covered > pending.first and (tail_rows == 0 or _old_enough(pending, max_age_s)):
        _commit(target, pending, tail_rows, through=covered - 1)
        segments, records = segments + (1 if tail_rows else 0), records + tail_rows
    return segments, records


def _take(target: _Target, pending: _Pending, batch: KafkaBatch, span: tuple[int, int]) -> None:
    """Add a read batch's records in [span) to `pending`: data records, and as dead letters
    the undecodable ones, tombstones, and records without an event time (segments hold none)."""
    first, upto = span
    table = shift_offsets(batch.events, target.base).cast(log_schema(reader_schema(target.source)))
    offsets = table.column(OFFSET)
    table = table.filter(pc.and_(pc.greater_equal(offsets, first), pc.less(offsets, upto)))
    no_time = pc.is_null(table.column(target.source.timestamp))
    if pc.any(no_time).as_py():
        pending.letters += _timeless(target, table.filter(no_time))
        table = table.filter(pc.invert(no_time))
    pending.tables.append(table)
    for d in batch.failures:
        letter = shift_letter(d, target.base)
        if letter.offset is not None and first <= letter.offset < upto:
            pending.letters.append(letter)


def _timeless(target: _Target, rows: pa.Table) -> list[DeadLetter]:
    """Records without an event time as dead letters, re-encoded as the source's Avro."""
    fields = [f["name"] for f in target.encoder.schema["fields"]]
    return [
        DeadLetter(
            f"source {target.source.name!r}: record at offset {row[OFFSET]} has no event time "
            f"({target.source.timestamp!r} is null); events need one",
            target.partition,
            int(row[OFFSET]),
            target.encoder.encode({k: row[k] for k in fields}),
        )
        for row in rows.to_pylist()
    ]


def _commit(target: _Target, pending: _Pending, rows: int, through: int | None = None) -> _Pending:
    """Archive the first `rows` pending records, covering offsets from `pending.first` up to
    the last of them (or `through`); the rest stays pending.

    Dead letters of the covered offsets are written to the warehouse dead-letter files first,
    then the segment (or, without records, a gap) is listed: a crash between the two may
    repeat a dead letter on the rerun, never lose one."""
    table = pa.concat_tables(pending.tables) if pending.tables else None
    head = table.slice(0, rows) if table is not None else None
    last = through if through is not None else int(head.column(OFFSET)[-1].as_py())  # type: ignore[union-attr]
    letters = [d for d in pending.letters if d.offset is not None and d.offset <= last]
    name, p, wh = target.source.name, target.partition, target.warehouse
    FileDeadLetterSink(wh, name).write(letters)
    if head is not None and head.num_rows:
        wh.append(
            name,
            p,
            head,
            fingerprint=target.fingerprint,
            ts_column=target.source.timestamp,
            first_offset=pending.first,
            last_offset=last,
        )
    else:
        wh.append_gap(name, p, pending.first, last, NO_RECORDS)
    rest = [table.slice(rows)] if table is not None and table.num_rows > rows else []
    kept = [d for d in pending.letters if d.offset is not None and d.offset > last]
    return _Pending(last + 1, rest, kept)


def reader_schema(source: Source) -> pa.Schema:
    return arrow_schema(source.avro_schema())


def _old_enough(pending: _Pending, max_age_s: float) -> bool:
    table = pa.concat_tables(pending.tables)
    oldest = pc.min(table.column(ARRIVAL).cast(pa.int64())).as_py()
    return oldest is None or time.time() - oldest / 1e6 >= max_age_s


if __name__ == "__main__":
    sys.exit(main())
