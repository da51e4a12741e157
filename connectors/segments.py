"""The warehouse log: the cold history of each source partition as Parquet segment files, each
covering an offset range, listed in a per-source manifest, read back in offset order.

    <root>/<source>/_manifest.json
    <root>/<source>/_manifest.lock      flock(2) lock serializing every manifest change
    <root>/<source>/p<partition:04d>/<first offset:020d>-<last offset:020d>.parquet
    <root>/<source>/_schemas/<fingerprint>.avsc      every writer schema of the log
    <root>/<source>/_deadletter/<UTC time>-<uuid>.parquet

On an object store (`s3://bucket/prefix`, see connectors.objectstore) there is no rename and no
flock, so the manifest is a series of immutable numbered objects and segment names carry the
writer's tag (two writers racing for the same offsets never overwrite each other's file):

    <root>/<source>/_manifest/<version:020d>.json     the newest version is the manifest
    <root>/<source>/p<partition:04d>/<first:020d>-<last:020d>.<writer tag>.parquet

`Warehouse` is the log's face; behind it:

    append, append_many,    --> LogTransaction (connectors.segment_writer): checks each table,
    append_gap, transaction     writes its segment file now, lists it in the manifest at commit
    segments, gaps,         --> the manifest (connectors.manifest: its format, what an entry
    next_offset, kafka_base     covers, and the commit protocol of both kinds of store)
    read, read_time_range   --> connectors.segment_reader: the listed files, pruned by offset
                                or event time
    dead-letter files       --> connectors.deadletters
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pyarrow as pa

from connectors import segment_reader
from connectors.errors import ManifestConflictError
from connectors.manifest import (
    Gap,
    IngestedFile,
    Manifests,
    SegmentInfo,
    ingested_in,
    kafka_base_in,
    next_offset_in,
)
from connectors.objectstore import LocalStore, Store, open_store
from connectors.segment_writer import LogTransaction

__all__ = ["COMMIT_ATTEMPTS", "SCHEMA_DIR", "Warehouse"]

COMMIT_ATTEMPTS = 16  # tries of a self-contained change (append, gap) against concurrent writers
SCHEMA_DIR = "_schemas"


class Warehouse:
    """The warehouse log under `root`: segments of every source, by partition.

    `root` is a local directory or an object-store URI (`s3://bucket/prefix`, see
    connectors.objectstore); `root` keeps the local Path, or the URI as given."""

    def __init__(self, root: str | Path | Store) -> None:
        self.store: Store = root if not isinstance(root, str | Path) else open_store(root)
        local = self.store if isinstance(self.store, LocalStore) else None
        self.root: Path | str = local.root if local is not None else self.store.url
        self.manifests = Manifests(self.store)

    def source_dir(self, source: str) -> Path:
        """The source's directory (local warehouses only)."""
        return self.manifests.source_dir(source)

    def lock(self, source: str) -> AbstractContextManager[None]:
        """Hold the source's exclusive manifest lock (blocking; re-entrant in a thread; see
        `Manifests.lock`)."""
        return self.manifests.lock(source)

    @contextmanager
    def transaction(self, source: str) -> Iterator[LogTransaction]:
        """One atomic change of the source's log: segment files are written as they are added,
        and the manifest once, when the block ends without an exception (under the lock on a
        local warehouse; a conditional put of the next manifest version on an object store).

        Raises:
            SegmentError: the manifest cannot be read or written, or the disk is full (nothing
                of the transaction is then committed).
            ManifestConflictError: (object stores) another writer committed first; nothing of
                this transaction is visible: run it again.
        """
        with self.lock(source):
            version, manifest = self.manifests.read(source)
            if self.store.local:
                self.manifests.sweep_unlisted(source, manifest)
            tx = LogTransaction(self.store, self.manifests, source, manifest, version)
            try:
                yield tx
                tx.commit()
            finally:
                tx.discard_uncommitted()

    def retrying(self, source: str, change: Callable[[LogTransaction], _T]) -> _T:
        """Run `change` in a transaction, again on the new manifest when another writer
        committed first (object stores), up to COMMIT_ATTEMPTS times.

        Raises:
            ManifestConflictError: every attempt lost the race (the message says so).
        """
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            try:
                with self.transaction(source) as tx:
                    return change(tx)
            except ManifestConflictError:
                if attempt == COMMIT_ATTEMPTS:
                    raise
                # Jittered backoff: writers that collided do not collide again in lockstep.
                time.sleep(random.uniform(0, min(1.0, 0.01 * 2**attempt)))
        raise AssertionError("unreachable")

    def kafka_base(self, source: str, partition: int) -> int | None:
        """The log offset of Kafka offset 0 in this partition, once Kafka has been read."""
        return kafka_base_in(self._manifest(source), partition)

    def fix_kafka_base(self, source: str, partition: int) -> int:
        """Fix (once) where Kafka's offsets start in the partition's log, and return it: right
        after the entries (segments and gaps) that exist when the topic is first read (0 if
        there are none)."""
        base = self.kafka_base(source, partition)
        if base is not None:
            return base
        return self.retrying(source, lambda tx: tx.fix_kafka_base(partition))

    def ingested(self, source: str, sha256: str) -> IngestedFile | None:
        """The record of an input file already ingested into the source's log, by content."""
        return ingested_in(self._manifest(source), sha256)

    def register_schema(self, source: str, schema: Mapping[str, Any]) -> str:
        """Keep a writer schema of the source's log (by fingerprint); returns its hex id.

        Every schema that records of the log were written with is kept under
        `<root>/<source>/_schemas/`, so readers can resolve old segments and Kafka records to
        the source's current schema.
        """
        from connectors.avro import fingerprint_hex  # fastavro: loaded by the writers only

        fp = fingerprint_hex(schema)
        rel = f"{source}/{SCHEMA_DIR}/{fp}.avsc"
        if not self.store.exists(rel):  # content-addressed: a racing writer writes the same
            self.store.write_bytes(rel, orjson.dumps(dict(schema), option=orjson.OPT_INDENT_2))
        return fp

    def schemas(self, source: str) -> list[dict[str, Any]]:
        """Every writer schema registered for the source's log."""
        folder = f"{source}/{SCHEMA_DIR}"
        names = [n for n in self.store.list(folder) if n.endswith(".avsc")]
        return [orjson.loads(self.store.read_bytes(f"{folder}/{n}")) for n in names]

    def path(self, source: str, segment: SegmentInfo) -> Path:
        """The absolute path of a segment file (local warehouses; see `location`)."""
        return self.source_dir(source) / segment.file

    def location(self, source: str, segment: SegmentInfo) -> str:
        """Where a segment file is: its path, or its object URI."""
        return self.store.describe(f"{source}/{segment.file}")

    def segments(self, source: str, partition: int) -> list[SegmentInfo]:
        """The segment files of a partition in offset order (empty if it has none); gaps are
        not listed (see `gaps`)."""
        entries = self._manifest(source)["partitions"].get(str(partition), [])
        return [SegmentInfo.from_json(partition, e) for e in entries if e.get("file")]

    def gaps(self, source: str, partition: int) -> list[Gap]:
        """The partition's offset ranges covered without records, in offset order."""
        entries = self._manifest(source)["partitions"].get(str(partition), [])
        return [Gap.from_json(partition, e) for e in entries if not e.get("file")]

    def partitions(self, source: str) -> list[int]:
        """The partitions that hold at least one segment file, ascending (gaps do not count)."""
        listed = self._manifest(source)["partitions"].items()
        return sorted(int(p) for p, es in listed if any(e.get("file") for e in es))

    def next_offset(self, source: str, partition: int) -> int:
        """The offset the next appended record of the partition must have: right after the
        last segment or gap."""
        return next_offset_in(self._manifest(source), partition)

    def append(
        self,
        source: str,
        partition: int,
        table: pa.Table,
        *,
        fingerprint: str,
        ts_column: str,
        first_offset: int | None = None,
        last_offset: int | None = None,
    ) -> SegmentInfo:
        """Write `table` as the partition's next segment and list it in the manifest.

        `table` holds the source's columns plus `_offset` (int64, strictly increasing),
        `_partition` (int32, all `partition`) and `_arrival` (timestamp[us, UTC]); `ts_column`
        is its event-time column, `fingerprint` the hex fingerprint of the Avro schema its
        columns follow. The segment covers [first_offset, last_offset] (default: the first and
        last `_offset`), and must start at `next_offset`. Without an explicit span, offsets
        must be contiguous; with one, offsets missing inside it are holes (records that are
        not data: Kafka control records, aborted transactions, dead letters).

        Raises:
            SegmentError: the table breaks one of those rules (the message says which), or the
                disk is full (nothing is then committed).
        """
        return self.retrying(
            source,
            lambda tx: tx.append(
                partition,
                table,
                fingerprint=fingerprint,
                ts_column=ts_column,
                first_offset=first_offset,
                last_offset=last_offset,
            ),
        )

    def append_many(
        self,
        source: str,
        tables: Mapping[int, Sequence[pa.Table]],
        *,
        fingerprint: str,
        ts_column: str,
        ingested: Sequence[IngestedFile] = (),
    ) -> list[SegmentInfo]:
        """Append contiguous tables to several partitions in ONE manifest commit: all of them
        become visible at once, or none (a crash or full disk leaves the log as it was).

        `tables` maps a partition to its tables in offset order, each following `append`'s
        rules; `ingested` records input files by content hash in the same commit.
        """

        def change(tx: LogTransaction) -> list[SegmentInfo]:
            infos = [
                tx.append(p, t, fingerprint=fingerprint, ts_column=ts_column)
                for p, ts in tables.items()
                for t in ts
            ]
            for f in ingested:
                tx.record_ingested(f)
            return infos

        return self.retrying(source, change)

    def append_gap(
        self, source: str, partition: int, first_offset: int, last_offset: int, reason: str
    ) -> Gap:
        """List [first_offset, last_offset] as covered without records (no file, 0 rows); it
        must start at `next_offset`. Readers skip it; `next_offset` moves past it.

        Raises:
            SegmentError: the range does not start at `next_offset` or is empty.
        """
        return self.retrying(
            source, lambda tx: tx.append_gap(partition, first_offset, last_offset, reason)
        )

    def read(
        self,
        source: str,
        partition: int,
        from_offset: int = 0,
        to_offset: int | None = None,
        columns: Sequence[str] | None = None,
        batch_rows: int = 1_000_000,
    ) -> Iterator[pa.RecordBatch]:
        """The records with `from_offset <= _offset <= to_offset`, in offset order.

        Only the files (and row groups) overlapping the range are read; holes and gaps yield
        nothing.

        Raises:
            SegmentError: a segment file is missing, corrupt, or disagrees with the manifest.
        """
        segments = self.segments(source, partition)
        yield from segment_reader.read_offset_range(
            self.store, source, segments, from_offset, to_offset, columns, batch_rows
        )

    def read_time_range(
        self,
        source: str,
        partition: int,
        min_ts: int,
        max_ts: int,
        columns: Sequence[str] | None = None,
        batch_rows: int = 1_000_000,
    ) -> Iterator[pa.RecordBatch]:
        """The records with `min_ts <= event time <= max_ts` (µs, UTC), in offset order.

        Files whose event times lie outside the range are not opened.
        """
        ts_column = str(self._manifest(source).get("ts_column"))
        segments = self.segments(source, partition)
        yield from segment_reader.read_time_range(
            self.store, source, segments, ts_column, min_ts, max_ts, columns, batch_rows
        )

    def manifest_location(self, source: str) -> str:
        """Where the source's manifest is: the file, or the folder of its versions."""
        return self.manifests.location(source)

    def _manifest(self, source: str) -> dict[str, Any]:
        return self.manifests.read(source)[1]


_T = TypeVar("_T")
