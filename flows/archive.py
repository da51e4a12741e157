"""`python -m flows.archive`: move closed Kafka offset ranges into warehouse log segments.

Per partition, records from the log's next offset (the last archived offset + 1) up to the
topic's end as of the start are decoded into the source's typed columns and appended as
segments of at most --segment-rows records. A trailing range smaller than that is archived only
once its oldest record is older than --max-age (so segments roll by size and by age). Records
that cannot be decoded, and offsets Kafka skips (transaction markers, compaction), are kept as
all-null rows at their offsets, so every offset lives in exactly one segment; they became dead
letters when the flow read them. A segment is durable (file fsync'd, then the manifest replaced
atomically) before the manifest records it, so after a crash a rerun leaves every offset in
exactly one segment.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from connectors.avro import arrow_schema, fingerprint_hex
from connectors.envelope import ARRIVAL, OFFSET, PARTITION, TIMESTAMP_US, log_schema
from connectors.kafka import KafkaLogReader
from connectors.log import shift_offsets
from connectors.segments import Warehouse
from flows.cli import command_main
from flows.errors import ConfigError
from flows.schemas import register_current
from flows.settings import COMMON, Option, Settings, build_parser
from flows.spec import Source, load_definitions

OPTIONS = (
    *COMMON[:2],
    COMMON[3],
    Option("source", None, "source to archive (default: every source in the definitions)"),
    Option("segment-rows", 1_000_000, "records per segment (roll by size)", int),
    Option(
        "max-age",
        3600.0,
        "archive a smaller trailing range once its oldest record is this "
        "many seconds old (roll by age)",
        float,
    ),
    Option("follow", False, "keep archiving every --interval seconds until Ctrl-C", bool),
    Option("interval", 60.0, "seconds between archiving rounds with --follow", float),
)


@dataclass(frozen=True, slots=True)
class ArchiveReport:
    segments: int
    records: int


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser("python -m flows.archive", __doc__.splitlines()[0], OPTIONS)
    return command_main(parser, OPTIONS, argv, _archive)


def _archive(settings: Settings, _args: argparse.Namespace) -> int:
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
    """Archive every partition of a source up to the topic's current end."""
    schema = source.avro_schema()
    store = register_current(source, warehouse)
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
        try:
            s, r = _archive_partition(
                source,
                warehouse,
                reader,
                p,
                (start, base),
                segment_rows,
                max_age_s,
                fingerprint_hex(schema),
            )
        finally:
            reader.close()
        segments, records = segments + s, records + r
    return ArchiveReport(segments, records)


def _archive_partition(
    source: Source,
    warehouse: Warehouse,
    reader: KafkaLogReader,
    p: int,
    start_and_base: tuple[int, int],
    segment_rows: int,
    max_age_s: float,
    fp: str,
) -> tuple[int, int]:
    """Archive one partition; offsets here are log offsets (Kafka offset + base)."""
    start, base = start_and_base
    end = reader.high_watermark() + base
    pending: list[pa.Table] = []
    covered, segments, records = start, 0, 0
    while covered < end:
        batch = reader.read_batch(max_records=min(5000, end - covered))
        if batch.next_offset + base <= covered:
            if batch.at_end:
                break
            continue
        table = shift_offsets(batch.events, base).cast(log_schema(reader_schema(source)))
        upto = min(batch.next_offset + base, end)
        pending.append(_fill_gaps(table, source, p, covered, upto))
        covered = upto
        if sum(t.num_rows for t in pending) >= segment_rows:
            full = pa.concat_tables(pending)
            for a in range(0, full.num_rows - segment_rows + 1, segment_rows):
                warehouse.append(
                    source.name,
                    p,
                    full.slice(a, segment_rows),
                    fingerprint=fp,
                    ts_column=source.timestamp,
                )
                segments, records = segments + 1, records + segment_rows
            rest = full.num_rows % segment_rows
            pending = [full.slice(full.num_rows - rest)] if rest else []
    if pending:
        tail = pa.concat_tables(pending)
        if tail.num_rows and _old_enough(tail, max_age_s):
            warehouse.append(source.name, p, tail, fingerprint=fp, ts_column=source.timestamp)
            segments, records = segments + 1, records + tail.num_rows
    return segments, records


def reader_schema(source: Source) -> pa.Schema:
    return arrow_schema(source.avro_schema())


def _fill_gaps(table: pa.Table, source: Source, p: int, first: int, upto: int) -> pa.Table:
    """Rows for every offset in [first, upto): decoded records, null rows for the others."""
    table = table.filter(
        pc.and_(pc.greater_equal(table.column(OFFSET), first), pc.less(table.column(OFFSET), upto))
    )
    have = np.asarray(table.column(OFFSET).to_numpy(), dtype=np.int64)
    missing = np.setdiff1d(np.arange(first, upto, dtype=np.int64), have)
    if len(missing):
        schema = log_schema(reader_schema(source))
        now = int(time.time() * 1_000_000)
        columns = {f.name: pa.nulls(len(missing), f.type) for f in reader_schema(source)}
        columns[OFFSET] = pa.array(missing)
        columns[PARTITION] = pa.array(np.full(len(missing), p, dtype=np.int32))
        columns[ARRIVAL] = pa.array(np.full(len(missing), now), pa.int64()).cast(TIMESTAMP_US)
        table = pa.concat_tables([table, pa.table(columns, schema=schema)])
        table = table.sort_by(OFFSET)
    return table


def _old_enough(table: pa.Table, max_age_s: float) -> bool:
    oldest = pc.min(table.column(ARRIVAL).cast(pa.int64())).as_py()
    return oldest is None or time.time() - oldest / 1e6 >= max_age_s


if __name__ == "__main__":
    sys.exit(main())
