"""`python -m flows.ingest`: load history files of a source into warehouse log segments.

Files (Parquet, CSV, JSON lines; a directory means every such file in it) are read with the
source's Arrow schema, checked completely before anything is written, partitioned by entity key
with Kafka's default partitioner (murmur2), and appended to each partition's log with the next
offsets, in file order. Records without a key or event time go to the dead-letter output.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from connectors.avro import arrow_schema, fingerprint_hex
from connectors.envelope import TIMESTAMP_US, DeadLetter
from connectors.errors import InputFileError
from connectors.files import read_history
from connectors.partitioner import partitions_for
from connectors.segments import Warehouse
from flows.cli import command_main
from flows.deadletters import DeadLetterWriter
from flows.errors import DefinitionError
from flows.schemas import register_current
from flows.settings import COMMON, Option, Settings, build_parser
from flows.spec import Source, load_definitions

SEGMENT_ROWS = 1_000_000


@dataclass(frozen=True, slots=True)
class IngestReport:
    """What an ingest wrote."""

    rows: int
    dead_letters: int
    per_partition: dict[int, int]
    seconds: float


def ingest_table(
    source: Source,
    table: pa.Table,
    warehouse: Warehouse,
    arrival: datetime | None = None,
    *,
    keep_order: bool = False,
) -> IngestReport:
    """Append the rows of `table` (the source's columns) to the source's log.

    History has no arrival order of its own, so by default the rows enter the log in event-time
    order (stable): a file sorted by key would otherwise make most of its events look late to
    the views. `keep_order=True` keeps the file's order (for a file that is an arrival log).
    """
    started = time.perf_counter()
    register_current(source, warehouse)  # refuses a schema the log's records cannot be read as
    table = table.select(arrow_schema(source.avro_schema()).names)
    bad = pc.or_(pc.is_null(table.column(source.key)), pc.is_null(table.column(source.timestamp)))
    n_bad = int(pc.sum(bad.cast(pa.int64())).as_py() or 0)
    if n_bad:
        _dead_letter_rows(source, table.filter(bad), warehouse)
        table = table.filter(pc.invert(bad))
    if not keep_order and table.num_rows:
        table = table.take(pc.sort_indices(table, [(source.timestamp, "ascending")]))
    keys = table.column(source.key)
    if not pa.types.is_string(keys.type):
        keys = keys.cast(pa.string())
    parts = partitions_for(keys, source.partitions)
    at = pa.scalar(arrival or datetime.now(UTC), pa.timestamp("us", tz="UTC"))
    fp = fingerprint_hex(source.avro_schema())
    written: dict[int, int] = {}
    continued = [
        p
        for p in range(source.partitions)
        if warehouse.kafka_base(source.name, p) is not None and (parts == p).any()
    ]
    if continued:
        raise InputFileError(
            f"source {source.name!r}: partitions {continued} already continue in Kafka topic "
            f"{source.kafka_topic!r}; history files can only be ingested before the topic is "
            "first read (the log is history, then the topic). Produce these events to the topic "
            "instead"
        )
    for p in range(source.partitions):
        rows = table.filter(pa.array(parts == p))
        for start in range(0, rows.num_rows, SEGMENT_ROWS):
            chunk = rows.slice(start, SEGMENT_ROWS)
            first = warehouse.next_offset(source.name, p)
            chunk = chunk.append_column(
                "_offset", pa.array(np.arange(first, first + chunk.num_rows, dtype=np.int64))
            )
            chunk = chunk.append_column(
                "_partition", pa.array(np.full(chunk.num_rows, p, dtype=np.int32))
            )
            chunk = chunk.append_column(
                "_arrival",
                pa.array(np.full(chunk.num_rows, at.value), pa.int64()).cast(TIMESTAMP_US),
            )
            warehouse.append(source.name, p, chunk, fingerprint=fp, ts_column=source.timestamp)
        written[p] = rows.num_rows
    return IngestReport(table.num_rows, n_bad, written, time.perf_counter() - started)


def _dead_letter_rows(source: Source, rows: pa.Table, warehouse: Warehouse) -> None:
    reason = (
        f"source {source.name!r}: null {source.key!r} or {source.timestamp!r}; "
        "events need an entity key and an event time"
    )
    letters = [
        DeadLetter(reason, None, None, orjson.dumps(r, default=str)) for r in rows.to_pylist()
    ]
    DeadLetterWriter(warehouse.root, source.name, None).write(letters)


OPTIONS = (
    *COMMON[:2],
    Option("source", None, "source name (default: the only source in the definitions)"),
    Option(
        "keep-order",
        False,
        "keep the files' row order in the log (default: event-time "
        "order, so that history sorted by key does not look late)",
        bool,
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser("python -m flows.ingest", __doc__.splitlines()[0], OPTIONS)
    parser.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="Parquet, CSV or JSON-lines files, or directories of them",
    )
    return command_main(parser, OPTIONS, argv, _ingest)


def _ingest(settings: Settings, args: object) -> int:
    defs = load_definitions(settings.features)
    source = _pick_source(defs.sources, settings.source)
    schema = arrow_schema(source.avro_schema())
    tables = [read_history(Path(f), schema) for f in args.files]  # type: ignore[attr-defined]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    report = ingest_table(
        source, table, Warehouse(settings.warehouse), keep_order=settings.keep_order
    )
    print(
        f"ingested {report.rows:,} events of source {source.name!r} into "
        f"{settings.warehouse} ({report.dead_letters:,} dead letters) in "
        f"{report.seconds:.1f}s; per partition: {report.per_partition}"
    )
    return 0


def _pick_source(sources: dict[str, Source], name: str | None) -> Source:
    if name is None:
        if len(sources) != 1:
            raise DefinitionError(
                f"the definitions declare sources {sorted(sources)}; choose one with --source"
            )
        return next(iter(sources.values()))
    if name not in sources:
        raise DefinitionError(
            f"unknown source {name!r}; the definitions declare {', '.join(sorted(sources))}"
        )
    return sources[name]


if __name__ == "__main__":
    sys.exit(main())
