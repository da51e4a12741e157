"""The write side of the warehouse log (flows.ingest, flows.archive): a `LogTransaction` checks
each table against the log, writes it at once as a segment file, and lists the files in the
source's manifest when it commits (connectors.manifest draws the manifest and the commit
protocol; a transaction that does not commit deletes its files).

    table --checked: columns, types, offsets from next_offset--> segment file (written now)
          --commit--> manifest lists it, once for the whole transaction

A segment file is Parquet: the source's columns plus `_offset` (int64, strictly increasing),
`_partition` (int32, all the segment's partition) and `_arrival` (timestamp[us, UTC]), with the
key-value metadata `featureflow.segment_format` (SEGMENT_FORMAT) and
`featureflow.schema_fingerprint` (the Avro schema its columns follow; empty in dead-letter
files, which carry the same metadata).
"""

from __future__ import annotations

import os
import signal
import uuid
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from connectors.envelope import ARRIVAL, OFFSET, PARTITION, TIMESTAMP_US
from connectors.errors import SegmentError
from connectors.manifest import (
    Gap,
    IngestedFile,
    Manifests,
    SegmentInfo,
    ingested_in,
    kafka_base_in,
    next_offset_in,
)
from connectors.objectstore import Store

__all__ = ["CRASH_AT_ENV", "SEGMENT_FORMAT", "LogTransaction", "with_segment_metadata"]

SEGMENT_FORMAT = "1"  # Parquet key-value metadata `featureflow.segment_format`
_LOG_TYPES = {OFFSET: pa.int64(), PARTITION: pa.int32(), ARRIVAL: TIMESTAMP_US}
# Crash tests kill a writer at a named step of a transaction (segment:<n> after its n-th file,
# commit before the manifest write, committed after it); see _crash_point.
CRASH_AT_ENV = "FEATUREFLOW_TEST_CRASH_AT"


class LogTransaction:
    """A pending change of one source's manifest, made by `Warehouse.transaction`: segment
    files are written as they are added; the manifest lists them only at commit."""

    def __init__(
        self,
        store: Store,
        manifests: Manifests,
        source: str,
        manifest: dict[str, Any],
        version: int = 0,
    ) -> None:
        self._store, self._manifests = store, manifests
        self._source, self._manifest = source, manifest
        self._version = version
        self._tag = uuid.uuid4().hex[:12]  # object stores: this writer's segment names
        self._written: list[str] = []
        self._changed = self._committed = False

    def next_offset(self, partition: int) -> int:
        """The next offset of the partition, counting what this transaction added."""
        return next_offset_in(self._manifest, partition)

    def kafka_base(self, partition: int) -> int | None:
        return kafka_base_in(self._manifest, partition)

    def ingested(self, sha256: str) -> IngestedFile | None:
        return ingested_in(self._manifest, sha256)

    def append(
        self,
        partition: int,
        table: pa.Table,
        *,
        fingerprint: str,
        ts_column: str,
        first_offset: int | None = None,
        last_offset: int | None = None,
    ) -> SegmentInfo:
        """Write a segment file now and list it at commit (see `Warehouse.append`)."""
        expected = self.next_offset(partition)
        span = _check_table(table, partition, expected, ts_column, (first_offset, last_offset))
        first, last, min_ts, max_ts = span
        name = f"p{partition:04d}/{first:020d}-{last:020d}.parquet"
        if not self._store.local:
            name = f"p{partition:04d}/{first:020d}-{last:020d}.{self._tag}.parquet"
        rel = f"{self._source}/{name}"
        self._written.append(rel)
        size = self._store.write_parquet(rel, with_segment_metadata(table, fingerprint))
        _crash_point(f"segment:{len(self._written)}")
        info = SegmentInfo(
            partition, name, first, last, table.num_rows, min_ts, max_ts, fingerprint, size
        )
        self._manifest["ts_column"] = ts_column
        self._entries(partition).append(info.to_json())
        return info

    def append_gap(self, partition: int, first_offset: int, last_offset: int, reason: str) -> Gap:
        """List a range without records at commit (see `Warehouse.append_gap`)."""
        expected = self.next_offset(partition)
        if first_offset != expected or last_offset < first_offset:
            raise SegmentError(
                f"source {self._source!r} partition {partition}: a gap must start at the next "
                f"offset of the log, {expected}, and end at or after it; got "
                f"[{first_offset}, {last_offset}]"
            )
        gap = Gap(partition, first_offset, last_offset, reason)
        self._entries(partition).append(gap.to_json())
        return gap

    def fix_kafka_base(self, partition: int) -> int:
        bases = self._manifest.setdefault("kafka_base", {})
        if str(partition) not in bases:
            bases[str(partition)] = self.next_offset(partition)
            self._changed = True
        return int(bases[str(partition)])

    def record_ingested(self, file: IngestedFile) -> None:
        """Record an input file (by content hash) as part of the log, at commit."""
        self._manifest.setdefault("ingested", {})[file.sha256] = file.to_json()
        self._changed = True

    def commit(self) -> None:
        """Write the manifest once (nothing to do if nothing changed)."""
        if not self._changed:
            return
        data = orjson.dumps(self._manifest, option=orjson.OPT_INDENT_2)
        _crash_point("commit")
        self._manifests.commit(self._source, self._version, data, self._mark_committed)
        _crash_point("committed")

    def discard_uncommitted(self) -> None:
        """Remove the files written by a transaction that did not commit."""
        if not self._committed:
            for rel in self._written:
                self._store.delete(rel)

    def _mark_committed(self) -> None:
        self._committed = True

    def _entries(self, partition: int) -> list[dict[str, Any]]:
        self._changed = True
        entries: list[dict[str, Any]] = self._manifest["partitions"].setdefault(str(partition), [])
        return entries


def _crash_point(step: str) -> None:
    """Fault injection for crash tests: SIGKILL this process at `step` when the environment
    variable FEATUREFLOW_TEST_CRASH_AT names it (never set in production)."""
    if os.environ.get(CRASH_AT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _check_table(
    table: pa.Table,
    partition: int,
    expected: int,
    ts_column: str,
    span: tuple[int | None, int | None],
) -> tuple[int, int, int, int]:
    """The first and last offsets covered and the event-time range of a table to append."""
    if table.num_rows == 0:
        raise SegmentError(
            f"partition {partition}: no rows to append; skip empty tables, or list offsets "
            "without records with append_gap"
        )
    for name, arrow_type in (*_LOG_TYPES.items(), (ts_column, None)):
        _check_column(table, name, arrow_type, partition)
    offsets = table.column(OFFSET).to_numpy()
    first, last = _check_offsets(offsets, partition, expected, span)
    if pc.any(pc.not_equal(table.column(PARTITION), partition)).as_py():
        raise SegmentError(
            f"partition {partition}: column {PARTITION} holds other partitions; "
            "split the records by partition before appending"
        )
    ts = table.column(ts_column).cast(TIMESTAMP_US).cast(pa.int64())
    extremes = pc.min_max(ts)
    return first, last, extremes["min"].as_py(), extremes["max"].as_py()


def _check_offsets(
    offsets: np.ndarray, partition: int, expected: int, span: tuple[int | None, int | None]
) -> tuple[int, int]:
    if span == (None, None):
        if offsets[0] != expected or (len(offsets) > 1 and np.any(np.diff(offsets) != 1)):
            raise SegmentError(
                f"partition {partition}: offsets must be contiguous from {expected} (the next "
                f"offset of the log), got {offsets[0]}..{offsets[-1]} over {len(offsets)} rows; "
                "number the records from Warehouse.next_offset(), or give first_offset/"
                "last_offset to cover offsets without records"
            )
        return int(offsets[0]), int(offsets[-1])
    first = int(offsets[0]) if span[0] is None else span[0]
    last = int(offsets[-1]) if span[1] is None else span[1]
    if first != expected or offsets[0] < first or offsets[-1] > last:
        raise SegmentError(
            f"partition {partition}: a segment covering [{first}, {last}] must start at "
            f"{expected} (the next offset of the log) and hold offsets inside it, got "
            f"{offsets[0]}..{offsets[-1]}; cover the offsets from Warehouse.next_offset()"
        )
    if len(offsets) > 1 and np.any(np.diff(offsets) <= 0):
        raise SegmentError(
            f"partition {partition}: offsets must be strictly increasing inside a segment; "
            "sort the records by offset and drop duplicates before appending"
        )
    return first, last


def _check_column(
    table: pa.Table, name: str, arrow_type: pa.DataType | None, partition: int
) -> None:
    if name not in table.column_names:
        raise SegmentError(
            f"partition {partition}: column {name!r} is missing (columns: "
            f"{table.column_names}); segments hold the source's columns plus "
            f"{list(_LOG_TYPES)}"
        )
    column = table.column(name)
    if arrow_type is None and not pa.types.is_timestamp(column.type):
        raise SegmentError(
            f"partition {partition}: event-time column {name!r} has type "
            f"{column.type}; build the table with arrow_schema(avro schema)"
        )
    if arrow_type is not None and column.type != arrow_type:
        raise SegmentError(
            f"partition {partition}: column {name!r} has type {column.type}, "
            f"expected {arrow_type}; cast it before appending"
        )
    if column.null_count:
        raise SegmentError(
            f"partition {partition}: column {name!r} holds {column.null_count} "
            "nulls; records without an offset or event time are dead letters"
        )


def with_segment_metadata(table: pa.Table, fingerprint: str) -> pa.Table:
    metadata = dict(table.schema.metadata or {})
    metadata[b"featureflow.segment_format"] = SEGMENT_FORMAT.encode()
    metadata[b"featureflow.schema_fingerprint"] = fingerprint.encode()
    return table.replace_schema_metadata(metadata)
