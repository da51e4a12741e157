"""`python -m flows.ingest`: load history files of a source into warehouse log segments.

Files (Parquet, CSV, JSON lines, compressed or not; a directory means every such file in it) are
read with the source's schema (connectors/files.py states the one rule for every format), so
each row either becomes an event or a dead letter that keeps the original record. Events are
partitioned by entity key with Kafka's default partitioner (murmur2) and appended to each
partition's log with the next offsets.

One ingest is one warehouse transaction: under the source's manifest lock, every segment file is
written first and the manifest once, so an ingest commits all of its rows or none (a kill or a
full disk leaves the log as it was), and concurrent ingests serialize (on an object store the
loser of a commit race runs again on the new manifest). The manifest records the
sha256 of every ingested file: ingesting the same content again is refused unless `--force`.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from connectors.avro import arrow_schema, fingerprint_hex
from connectors.deadletters import write_dead_letters
from connectors.envelope import (
    ARRIVAL,
    OFFSET,
    PARTITION,
    TIMESTAMP_US,
    DeadLetter,
    dead_letter_table,
)
from connectors.errors import InputFileError
from connectors.files import (
    TIME_UNITS,
    HistoryFile,
    file_sha256,
    history_files,
    non_finite_as_null,
    read_history,
)
from connectors.manifest import IngestedFile
from connectors.partitioner import partitions_for
from connectors.segment_writer import LogTransaction
from connectors.segments import Warehouse
from flows.cli import command_main
from flows.errors import DefinitionError
from flows.schemas import register_current
from flows.settings import (
    FEATURES,
    WAREHOUSE,
    WAREHOUSE_ENDPOINT,
    CommandSettings,
    arguments,
    option,
)
from flows.spec import Source, load_definitions

SEGMENT_ROWS = 1_000_000


@dataclass(frozen=True, slots=True)
class IngestReport:
    """What an ingest read and wrote: rows_read = rows + dead_letters."""

    rows: int  # events written to the log
    dead_letters: int
    per_partition: dict[int, int]
    seconds: float
    rows_read: int = 0
    non_finite: dict[str, int] = field(default_factory=dict)  # column -> values read as null

    def summary(self) -> str:
        nulls = "".join(
            f"; {n:,} non-finite value{'s' if n != 1 else ''} read as null in column {c!r}"
            for c, n in self.non_finite.items()
        )
        return (
            f"{self.rows_read:,} rows read, {self.rows:,} written, {self.dead_letters:,} dead "
            f"letters{nulls}; per partition: {self.per_partition}"
        )


@dataclass(frozen=True, slots=True)
class _Batch:
    """Rows to commit in one transaction, the rows refused, and the files they came from."""

    table: pa.Table
    letters: tuple[DeadLetter, ...]
    non_finite: dict[str, int]
    files: tuple[HistoryFile, ...] = ()

    @property
    def rows_read(self) -> int:
        return int(self.table.num_rows) + len(self.letters)


def ingest_table(
    source: Source,
    table: pa.Table,
    warehouse: Warehouse,
    arrival: datetime | None = None,
    *,
    keep_order: bool = False,
) -> IngestReport:
    """Append the rows of `table` (the source's columns) to the source's log, in one commit.

    Rows without a key or event time become dead letters (a JSON rendering of the row);
    non-finite floats are read as null. History has no arrival order of its own, so by default
    the rows enter the log in event-time order (stable): a file sorted by key would otherwise
    make most of its events look late to the views. `keep_order=True` keeps the table's order
    (for a table that is an arrival log).

    Raises:
        InputFileError: a partition of the rows already continues in Kafka.
        SegmentError: the warehouse cannot be written (a full disk names the path); nothing of
            the table is then committed.
    """
    return _ingest(source, _table_batch(source, table), warehouse, arrival, keep_order)


def ingest_table_into_empty_log(
    source: Source, table: pa.Table, warehouse: Warehouse, *, keep_order: bool = False
) -> IngestReport | None:
    """`ingest_table` only if the source's log holds nothing yet, checked in the commit
    itself (an object store has no lock to hold around a look and an append): None, with
    nothing committed, when another writer filled it first."""
    batch = _table_batch(source, table)
    try:
        return _ingest(source, batch, warehouse, None, keep_order, only_into_empty=True)
    except _LogNotEmptyError:
        return None


def _table_batch(source: Source, table: pa.Table) -> _Batch:
    table = table.select(arrow_schema(source.avro_schema()).names)
    bad = pc.or_(pc.is_null(table.column(source.key)), pc.is_null(table.column(source.timestamp)))
    letters = tuple(_null_key_letters(source, table.filter(bad)))
    table, non_finite = non_finite_as_null(table.filter(pc.invert(bad)))
    return _Batch(table, letters, non_finite)


class _LogNotEmptyError(Exception):
    """An `only_into_empty` ingest found records in the log (nothing was committed)."""


def ingest_files(
    source: Source,
    files: Sequence[HistoryFile],
    warehouse: Warehouse,
    arrival: datetime | None = None,
    *,
    keep_order: bool = False,
    force: bool = False,
) -> IngestReport:
    """Append the rows of history files read by `read_history` to the source's log in one
    commit, with their dead letters, recording each file's content hash.

    Raises:
        InputFileError: a file's content was already ingested (unless `force`) or is given
            twice; a partition already continues in Kafka.
        SegmentError: as `ingest_table`.
    """
    _refuse_repeats(files)
    tables = [f.table for f in files]
    non_finite: dict[str, int] = {}
    for f in files:
        for column, n in f.non_finite.items():
            non_finite[column] = non_finite.get(column, 0) + n
    batch = _Batch(
        pa.concat_tables(tables) if len(tables) != 1 else tables[0],
        tuple(d for f in files for d in f.rejected),
        non_finite,
        tuple(files),
    )
    return _ingest(source, batch, warehouse, arrival, keep_order, force)


def _ingest(
    source: Source,
    batch: _Batch,
    warehouse: Warehouse,
    arrival: datetime | None,
    keep_order: bool,
    force: bool = False,
    *,
    only_into_empty: bool = False,
) -> IngestReport:
    started = time.perf_counter()
    register_current(source, warehouse)  # refuses a schema the log's records cannot be read as
    table = batch.table
    if not keep_order and table.num_rows:
        table = table.take(pc.sort_indices(table, [(source.timestamp, "ascending")]))
    keys = table.column(source.key)
    parts = partitions_for(
        keys if pa.types.is_string(keys.type) else keys.cast(pa.string()), source.partitions
    )
    by_partition = {p: table.filter(pa.array(parts == p)) for p in np.unique(parts).tolist()}
    at = arrival or datetime.now(UTC)

    def change(tx: LogTransaction) -> None:
        if only_into_empty and any(tx.next_offset(p) for p in range(source.partitions)):
            raise _LogNotEmptyError
        _refuse_continued(tx, source, sorted(by_partition))
        _refuse_ingested(tx, batch.files, force)
        for p, rows in by_partition.items():
            _append_partition(tx, source, p, rows, at)
        _write_letters(warehouse, source, batch)
        for f in batch.files:
            tx.record_ingested(IngestedFile(f.sha256, str(f.path), f.rows_read, at.isoformat()))

    # On an object store a concurrent writer may commit first: run again on its manifest
    # (offsets renumbered after its records; a file it ingested meanwhile is refused).
    warehouse.retrying(source.name, change)
    written = {
        p: by_partition[p].num_rows if p in by_partition else 0 for p in range(source.partitions)
    }
    return IngestReport(
        table.num_rows,
        len(batch.letters),
        written,
        time.perf_counter() - started,
        batch.rows_read,
        batch.non_finite,
    )


def _append_partition(
    tx: LogTransaction, source: Source, p: int, rows: pa.Table, at: datetime
) -> None:
    fp = fingerprint_hex(source.avro_schema())
    at_us = pa.scalar(at, TIMESTAMP_US).value
    for start in range(0, rows.num_rows, SEGMENT_ROWS):
        chunk = rows.slice(start, SEGMENT_ROWS)
        first, n = tx.next_offset(p), chunk.num_rows
        chunk = chunk.append_column(OFFSET, pa.array(np.arange(first, first + n)))
        chunk = chunk.append_column(PARTITION, pa.array(np.full(n, p, dtype=np.int32)))
        chunk = chunk.append_column(
            ARRIVAL, pa.array(np.full(n, at_us), pa.int64()).cast(TIMESTAMP_US)
        )
        tx.append(p, chunk, fingerprint=fp, ts_column=source.timestamp)


def _write_letters(warehouse: Warehouse, source: Source, batch: _Batch) -> None:
    """The batch's dead letters as one file, named after the files' content when there are
    files: a rerun after a crash before the commit replaces it instead of doubling it."""
    if not batch.letters:
        return
    name = None
    if batch.files:
        digest = hashlib.sha256("".join(sorted(f.sha256 for f in batch.files)).encode())
        name = f"ingest-{digest.hexdigest()[:32]}"
    now_us = int(datetime.now(UTC).timestamp() * 1_000_000)
    table = dead_letter_table(list(batch.letters), now_us)
    write_dead_letters(warehouse, source.name, table, name=name)


def _null_key_letters(source: Source, rows: pa.Table) -> list[DeadLetter]:
    reason = (
        f"source {source.name!r}: null {source.key!r} or {source.timestamp!r}; "
        "events need an entity key and an event time"
    )
    return [DeadLetter(reason, None, None, orjson.dumps(r, default=str)) for r in rows.to_pylist()]


def _refuse_continued(tx: LogTransaction, source: Source, partitions: Sequence[int]) -> None:
    continued = [p for p in partitions if tx.kafka_base(p) is not None]
    if continued:
        raise InputFileError(
            f"source {source.name!r}: partitions {continued} already continue in Kafka topic "
            f"{source.kafka_topic!r}; history files can only be ingested before the topic is "
            "first read (the log is history, then the topic). Produce these events to the topic "
            "instead"
        )


def _refuse_ingested(tx: LogTransaction, files: Sequence[HistoryFile], force: bool) -> None:
    for f in files:
        done = tx.ingested(f.sha256)
        if done is not None and not force:
            raise InputFileError(_already_ingested(f.path, done.file, done.at, done.rows))


def _already_ingested(path: Path, first: str, at: str, rows: int) -> str:
    same = "" if Path(first) == path else f" (as {first})"
    return (
        f"history file {path} was already ingested{same} at {at}: its {rows:,} rows are in "
        "the log, and ingesting it again would double them. Nothing was ingested; pass "
        "--force to ingest this content again anyway"
    )


def _refuse_repeats(files: Sequence[HistoryFile]) -> None:
    seen: dict[str, Path] = {}
    for f in files:
        if f.sha256 in seen:
            raise InputFileError(
                f"history file {f.path} has the same content as {seen[f.sha256]}; give each "
                "file once (nothing was ingested)"
            )
        seen[f.sha256] = f.path


@dataclass(frozen=True, slots=True)
class IngestSettings(CommandSettings):
    features: str = FEATURES.field()
    warehouse: str = WAREHOUSE.field()
    warehouse_endpoint: str | None = WAREHOUSE_ENDPOINT.field()
    source: str | None = option(None, "source name (default: the only source in the definitions)")
    keep_order: bool = option(
        False,
        "keep the files' row order in the log (default: event-time "
        "order, so that history sorted by key does not look late)",
    )
    force: bool = option(
        False,
        "ingest files whose content was already ingested (by sha256; default: refuse them, "
        "since their rows would be in the log twice)",
    )
    time_unit: str | None = option(
        None,
        f"unit of integer epoch times in the files: {'|'.join(TIME_UNITS)} (default: the "
        "event-time field's Avro unit, millis or micros)",
    )
    files: tuple[str, ...] = arguments(
        "FILE", "Parquet, CSV or JSON-lines files (gzip/zstd/bzip2 data too), or directories"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("flows.ingest", __doc__, IngestSettings, _ingest_command, argv)


def _ingest_command(settings: IngestSettings) -> int:
    defs = load_definitions(settings.features)
    source = _pick_source(defs.sources, settings.source)
    warehouse = Warehouse(settings.warehouse)
    paths = [p for f in settings.files for p in history_files(f)]
    if not settings.force:
        _refuse_known(warehouse, source, paths)
    schema = arrow_schema(source.avro_schema())
    required = (source.key, source.timestamp)
    files = [
        f
        for p in paths
        for f in read_history(p, schema, required=required, time_unit=settings.time_unit)
    ]
    report = ingest_files(
        source, files, warehouse, keep_order=settings.keep_order, force=settings.force
    )
    print(
        f"ingested {report.rows:,} events of source {source.name!r} into "
        f"{settings.warehouse} in {report.seconds:.1f}s: {report.summary()}"
    )
    return 0


def _refuse_known(warehouse: Warehouse, source: Source, paths: Sequence[Path]) -> None:
    """Refuse early (before reading) files already ingested; the commit checks again."""
    for path in paths:
        done = warehouse.ingested(source.name, file_sha256(path))
        if done is not None:
            raise InputFileError(_already_ingested(path, done.file, done.at, done.rows))


def _pick_source(sources: Mapping[str, Source], name: str | None) -> Source:
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
