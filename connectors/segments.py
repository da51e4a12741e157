"""The warehouse log: the cold history of each source partition as Parquet segment files, each
covering an offset range, listed in a per-source manifest, read back in offset order.

    <root>/<source>/_manifest.json
    <root>/<source>/_manifest.lock      flock(2) lock serializing every manifest change
    <root>/<source>/p<partition:04d>/<first offset:020d>-<last offset:020d>.parquet
    <root>/<source>/_deadletter/<UTC time>-<uuid>.parquet

On an object store (`s3://bucket/prefix`, see connectors.objectstore) there is no rename and no
flock, so the manifest is a series of immutable numbered objects and segment names carry the
writer's tag (two writers racing for the same offsets never overwrite each other's file):

    <root>/<source>/_manifest/<version:020d>.json     the newest version is the manifest
    <root>/<source>/p<partition:04d>/<first:020d>-<last:020d>.<writer tag>.parquet

Manifest (JSON, `format` 1; every key but `format`, `source` and `partitions` is optional, so
manifests written before a key existed still read):

    {"format": 1, "source": "tx", "ts_column": "ts",
     "partitions": {"0": [entry, ...]},          entries in offset order, no overlap, no hole
     "kafka_base": {"0": 1200},                 log offset of Kafka offset 0, per partition
     "ingested": {"<sha256 of an input file>": {"file": "...", "rows": 10, "at": "<ISO UTC>"}}}

    segment entry: {"file": "p0000/...parquet", "first_offset": 0, "last_offset": 9, "rows": 10,
                    "min_ts": µs, "max_ts": µs, "schema_fingerprint": "...", "bytes": 1234}
    gap entry:     {"file": null, "first_offset": 0, "last_offset": 2074, "rows": 0,
                    "gap": "<reason>"}

Entries cover the partition's offsets from 0 without a hole between them. A segment entry covers
[first_offset, last_offset]; its file holds `rows` records with strictly increasing `_offset`
inside that span. `rows` may be fewer than the span: offsets that hold no data record (Kafka
control records, aborted transactions, records that became dead letters) are covered but absent.
A gap entry covers offsets with no records at all (a log that starts past Kafka retention).
Readers and `next_offset` treat both as covered; only files are read.

Offsets: one offset space per partition. When a partition's log continues in Kafka, the manifest
records `kafka_base`, the log offset of Kafka offset 0: 0 when the segments were archived from
the topic itself, or the number of records ingested from history files before the topic was
first read (history first, then the topic, with no overlap).

Commits: every change of a source's manifest (append, append_many, append_gap, fix_kafka_base)
is one transaction under an exclusive lock on `_manifest.lock`, held across "read manifest ->
write segment files -> write manifest", so concurrent writers (two ingests, ingest and archive)
serialize instead of losing each other's entries. A transaction writes all its segment files
first, then the manifest once: the manifest is the truth, and a file it does not list (left by a
crash before the manifest write) is ignored by readers and removed by the next transaction.
Files and manifest are written to temporary names, fsynced and renamed into place, so a reader
never sees half a file. A full disk is a SegmentError naming the path, with nothing committed.

Commits on an object store are optimistic: a transaction reads manifest version n, writes its
segment objects, then creates version n+1 with a conditional put (`If-None-Match: *`). Of two
writers that read the same n, exactly one creates n+1; the other gets ManifestConflictError,
its objects are deleted and nothing of it is visible. `append`, `append_many`, `append_gap` and
`fix_kafka_base` retry on the new manifest (an append whose offsets were taken meanwhile then
fails with the usual "must start at the next offset" error: nothing is lost or doubled); callers
of `transaction` retry it themselves (flows.ingest does). Old versions are pruned, keeping
MANIFEST_VERSIONS_KEPT; a writer whose version number was pruned meanwhile sees a newer version
after its put and withdraws, so a commit is never hidden behind a newer one. Readers take the
newest version. Objects of a writer killed before its commit are not listed and never read;
they are not swept on object stores (a sweep cannot tell them from a live writer's).
"""

from __future__ import annotations

import fcntl
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from connectors.avro import fingerprint_hex
from connectors.envelope import ARRIVAL, DEAD_LETTER_SCHEMA, OFFSET, PARTITION, TIMESTAMP_US
from connectors.errors import ManifestConflictError, SegmentError
from connectors.objectstore import (
    LocalStore,
    Store,
    VersionedDocument,
    open_store,
    replace_atomically,
)

MANIFEST = "_manifest.json"
MANIFEST_LOCK = "_manifest.lock"
MANIFEST_VERSIONS = "_manifest"  # object stores: <source>/_manifest/<version:020d>.json
MANIFEST_VERSIONS_KEPT = 20
COMMIT_ATTEMPTS = 16  # tries of a self-contained change (append, gap) against concurrent writers
MANIFEST_FORMAT = 1
SEGMENT_FORMAT = "1"  # Parquet key-value metadata `featureflow.segment_format`
DEAD_LETTER_DIR = "_deadletter"
SCHEMA_DIR = "_schemas"
ROW_GROUP_ROWS = 128 * 1024
_LOG_TYPES = {OFFSET: pa.int64(), PARTITION: pa.int32(), ARRIVAL: TIMESTAMP_US}
# Crash tests kill a writer at a named step of a transaction (segment:<n> after its n-th file,
# commit before the manifest write, committed after it); see _crash_point.
CRASH_AT_ENV = "FEATUREFLOW_TEST_CRASH_AT"


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """One segment file as the manifest lists it; offsets inclusive, times in µs (UTC).

    `rows` may be fewer than the offset span: offsets without a data record are holes."""

    partition: int
    file: str  # relative to the source's directory
    first_offset: int
    last_offset: int
    rows: int
    min_ts: int
    max_ts: int
    schema_fingerprint: str
    bytes: int

    @property
    def has_holes(self) -> bool:
        return self.rows != self.last_offset - self.first_offset + 1

    def to_json(self) -> dict[str, Any]:
        entry = asdict(self)
        del entry["partition"]
        return entry

    @classmethod
    def from_json(cls, partition: int, entry: dict[str, Any]) -> SegmentInfo:
        return cls(partition=partition, **entry)


@dataclass(frozen=True, slots=True)
class Gap:
    """Offsets of a partition covered by the log that hold no record (no file)."""

    partition: int
    first_offset: int
    last_offset: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "file": None,
            "first_offset": self.first_offset,
            "last_offset": self.last_offset,
            "rows": 0,
            "gap": self.reason,
        }


@dataclass(frozen=True, slots=True)
class IngestedFile:
    """An input file whose rows are in the log, known by the sha256 of its content."""

    sha256: str
    file: str
    rows: int
    at: str  # ISO-8601, UTC: when its rows were committed

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "rows": self.rows, "at": self.at}


class Warehouse:
    """The warehouse log under `root`: segments of every source, by partition.

    `root` is a local directory or an object-store URI (`s3://bucket/prefix`, see
    connectors.objectstore); `root` keeps the local Path, or the URI as given."""

    def __init__(self, root: str | Path | Store) -> None:
        self.store: Store = root if not isinstance(root, str | Path) else open_store(root)
        local = self.store if isinstance(self.store, LocalStore) else None
        self.root: Path | str = local.root if local is not None else self.store.url

    def source_dir(self, source: str) -> Path:
        """The source's directory (local warehouses only)."""
        return self._local().path(source)

    @contextmanager
    def lock(self, source: str) -> Iterator[None]:
        """Hold the source's exclusive manifest lock (blocking; re-entrant in a thread).

        Every manifest read-modify-write takes it; hold it yourself around a read of
        `next_offset` and the appends that depend on it. On an object store there is no lock:
        commits are conditional puts, and a writer that lost a race gets
        ManifestConflictError at commit (see the module docstring)."""
        if not self.store.local:
            yield
            return
        path = self.source_dir(source) / MANIFEST_LOCK
        path.parent.mkdir(parents=True, exist_ok=True)
        with _held(os.path.abspath(path)):
            yield

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
            version, manifest = self._versioned_manifest(source)
            if self.store.local:
                _sweep_unlisted(self.source_dir(source), manifest)
            tx = LogTransaction(self, source, manifest, version)
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
        base = self._manifest(source).get("kafka_base", {}).get(str(partition))
        return None if base is None else int(base)

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
        return _ingested(self._manifest(source), sha256)

    def register_schema(self, source: str, schema: Mapping[str, Any]) -> str:
        """Keep a writer schema of the source's log (by fingerprint); returns its hex id.

        Every schema that records of the log were written with is kept under
        `<root>/<source>/_schemas/`, so readers can resolve old segments and Kafka records to
        the source's current schema.
        """
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
        return [_gap(partition, e) for e in entries if not e.get("file")]

    def partitions(self, source: str) -> list[int]:
        """The partitions that hold at least one segment file, ascending (gaps do not count)."""
        listed = self._manifest(source)["partitions"].items()
        return sorted(int(p) for p, es in listed if any(e.get("file") for e in es))

    def next_offset(self, source: str, partition: int) -> int:
        """The offset the next appended record of the partition must have: right after the
        last segment or gap."""
        return _next_offset(self._manifest(source), partition)

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
        last = to_offset if to_offset is not None else np.iinfo(np.int64).max
        for seg in self.segments(source, partition):
            if seg.last_offset >= from_offset and seg.first_offset <= last:
                file = _SegmentFile(self.store, f"{source}/{seg.file}", seg)
                lo, hi = _row_range(file, from_offset, last)
                if lo <= hi:
                    yield from _read_rows(file, lo, hi, columns, batch_rows)

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
        ts_column = self._manifest(source).get("ts_column")
        for seg in self.segments(source, partition):
            if seg.max_ts >= min_ts and seg.min_ts <= max_ts:
                wanted = None if columns is None else [*dict.fromkeys([*columns, str(ts_column)])]
                file = _SegmentFile(self.store, f"{source}/{seg.file}", seg)
                for batch in _read_rows(file, 0, seg.rows - 1, wanted, batch_rows):
                    yield _in_time_range(batch, str(ts_column), min_ts, max_ts, columns)

    def manifest_location(self, source: str) -> str:
        """Where the source's manifest is: the file, or the folder of its versions."""
        if self.store.local:
            return self.store.describe(f"{source}/{MANIFEST}")
        return self.store.describe(f"{source}/{MANIFEST_VERSIONS}/")

    def _manifest(self, source: str) -> dict[str, Any]:
        return self._versioned_manifest(source)[1]

    def _versioned_manifest(self, source: str) -> tuple[int, dict[str, Any]]:
        """The manifest and its version (0 for a local manifest or none yet)."""
        if self.store.local:
            return 0, self._parse(source, f"{source}/{MANIFEST}")
        doc = self._versions(source)
        version, data = doc.read()
        if data is None:
            return 0, _empty_manifest(source)
        return version, self._parse(source, doc.rel(version), data)

    def _versions(self, source: str) -> VersionedDocument:
        return VersionedDocument(
            self.store, f"{source}/{MANIFEST_VERSIONS}", keep=MANIFEST_VERSIONS_KEPT
        )

    def _parse(self, source: str, rel: str, data: bytes | None = None) -> dict[str, Any]:
        where = self.store.describe(rel)
        try:
            manifest: dict[str, Any] = orjson.loads(
                self.store.read_bytes(rel) if data is None else data
            )
        except FileNotFoundError:
            return _empty_manifest(source)
        except (OSError, orjson.JSONDecodeError) as exc:
            raise SegmentError(
                f"manifest {where} cannot be read: {exc}; restore it from a backup "
                "or rebuild the warehouse by re-ingesting the source"
            ) from exc
        if manifest.get("format") != MANIFEST_FORMAT:
            raise SegmentError(
                f"manifest {where} has format {manifest.get('format')!r}; this "
                f"version reads format {MANIFEST_FORMAT}: upgrade featureflow"
            )
        return manifest

    def _commit_manifest(
        self, source: str, version: int, data: bytes, committed: Callable[[], None]
    ) -> None:
        """Make `data` the source's manifest: replace the file (local, under the lock), or
        create version `version + 1` (object store), refusing when another writer did first.

        Raises:
            ManifestConflictError: another writer committed first (object stores).
        """
        if self.store.local:  # the rename is the commit point: `committed` right after it
            path = self.source_dir(source) / MANIFEST
            replace_atomically(path, lambda tmp: tmp.write_bytes(data), committed)
            return
        mine = version + 1
        if not self._versions(source).commit(version, data):
            raise ManifestConflictError(
                f"source {source!r}: another writer committed manifest version {mine} at "
                f"{self.manifest_location(source)} first (this one read version {version}); "
                "nothing of this transaction was committed: run it again on the new manifest"
            )
        committed()

    def _local(self) -> LocalStore:
        if not isinstance(self.store, LocalStore):
            raise SegmentError(
                f"warehouse {self.store.url} is an object store: it has no local paths; use "
                "Warehouse.location() and the store's methods"
            )
        return self.store


_T = TypeVar("_T")


def _empty_manifest(source: str) -> dict[str, Any]:
    return {"format": MANIFEST_FORMAT, "source": source, "partitions": {}}


class LogTransaction:
    """A pending change of one source's manifest, made by `Warehouse.transaction`: segment
    files are written as they are added; the manifest lists them only at commit."""

    def __init__(
        self, warehouse: Warehouse, source: str, manifest: dict[str, Any], version: int = 0
    ) -> None:
        self._warehouse, self._source, self._manifest = warehouse, source, manifest
        self._version = version
        self._tag = uuid.uuid4().hex[:12]  # object stores: this writer's segment names
        self._written: list[str] = []
        self._changed = self._committed = False

    def next_offset(self, partition: int) -> int:
        """The next offset of the partition, counting what this transaction added."""
        return _next_offset(self._manifest, partition)

    def kafka_base(self, partition: int) -> int | None:
        base = self._manifest.get("kafka_base", {}).get(str(partition))
        return None if base is None else int(base)

    def ingested(self, sha256: str) -> IngestedFile | None:
        return _ingested(self._manifest, sha256)

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
        if not self._warehouse.store.local:
            name = f"p{partition:04d}/{first:020d}-{last:020d}.{self._tag}.parquet"
        rel = f"{self._source}/{name}"
        self._written.append(rel)
        size = self._warehouse.store.write_parquet(rel, _with_metadata(table, fingerprint))
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
        self._warehouse._commit_manifest(self._source, self._version, data, self._mark_committed)
        _crash_point("committed")

    def discard_uncommitted(self) -> None:
        """Remove the files written by a transaction that did not commit."""
        if not self._committed:
            for rel in self._written:
                self._warehouse.store.delete(rel)

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


_LOCKS_GUARD = threading.Lock()
_THREAD_LOCKS: dict[str, threading.RLock] = {}
_FLOCKS: dict[str, tuple[int, int]] = {}  # lock path -> (fd, depth)


@contextmanager
def _held(path: str) -> Iterator[None]:
    """An exclusive flock on `path`, re-entrant in the thread that holds it; threads of one
    process serialize on a thread lock first (flock does not exclude them from each other)."""
    with _LOCKS_GUARD:
        thread_lock = _THREAD_LOCKS.setdefault(path, threading.RLock())
    with thread_lock:
        fd, depth = _FLOCKS.get(path, (-1, 0))
        if depth == 0:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        _FLOCKS[path] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _FLOCKS.pop(path)
            if depth > 1:
                _FLOCKS[path] = (fd, depth - 1)
            else:
                os.close(fd)  # releases the flock


def _next_offset(manifest: dict[str, Any], partition: int) -> int:
    listed = manifest["partitions"].get(str(partition), [])
    return int(listed[-1]["last_offset"]) + 1 if listed else 0


def _ingested(manifest: dict[str, Any], sha256: str) -> IngestedFile | None:
    entry = manifest.get("ingested", {}).get(sha256)
    return None if entry is None else IngestedFile(sha256=sha256, **entry)


def _gap(partition: int, entry: dict[str, Any]) -> Gap:
    return Gap(partition, entry["first_offset"], entry["last_offset"], str(entry.get("gap", "")))


def _sweep_unlisted(source_dir: Path, manifest: dict[str, Any]) -> None:
    """Remove segment files and temporary files the manifest does not list: leftovers of a
    writer killed before its commit (only called under the lock, so no writer is running)."""
    listed = {e["file"] for es in manifest["partitions"].values() for e in es if e.get("file")}
    for folder in source_dir.glob("p[0-9][0-9][0-9][0-9]"):
        for path in folder.iterdir():
            if f"{folder.name}/{path.name}" not in listed:
                path.unlink(missing_ok=True)
    for tmp in source_dir.glob(f".{MANIFEST}.*.tmp"):
        tmp.unlink(missing_ok=True)


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


def _with_metadata(table: pa.Table, fingerprint: str) -> pa.Table:
    metadata = dict(table.schema.metadata or {})
    metadata[b"featureflow.segment_format"] = SEGMENT_FORMAT.encode()
    metadata[b"featureflow.schema_fingerprint"] = fingerprint.encode()
    return table.replace_schema_metadata(metadata)


@dataclass(frozen=True, slots=True)
class _SegmentFile:
    """A segment file to read: where it is and what the manifest says of it."""

    store: Store
    rel: str
    seg: SegmentInfo

    def open(self) -> pq.ParquetFile:
        return self.store.parquet_file(self.rel)

    @property
    def where(self) -> str:
        return self.store.describe(self.rel)


def _row_range(file: _SegmentFile, from_offset: int, last: int) -> tuple[int, int]:
    """Rows (0-based, inclusive) of a segment file holding offsets from_offset..last: by row
    index when the segment has no holes, else by searching its `_offset` column."""
    seg = file.seg
    if not seg.has_holes:
        lo = max(from_offset, seg.first_offset) - seg.first_offset
        return lo, min(last, seg.last_offset) - seg.first_offset
    try:
        offsets = file.open().read(columns=[OFFSET]).column(OFFSET).to_numpy()
    except (OSError, pa.ArrowException) as exc:
        raise _unreadable(file, exc) from exc
    lo = int(np.searchsorted(offsets, from_offset, side="left"))
    return lo, int(np.searchsorted(offsets, last, side="right")) - 1


def _read_rows(
    file: _SegmentFile, lo: int, hi: int, columns: Sequence[str] | None, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """Rows lo..hi (inclusive, 0-based) of a segment file, reading only the row groups needed."""
    try:
        parquet = file.open()
        groups, first_row = _row_groups(parquet, file.seg, lo, hi)
        _check_columns(parquet, file.where, columns)
        row = first_row
        for batch in parquet.iter_batches(
            batch_size=batch_rows,
            row_groups=groups,
            columns=None if columns is None else list(columns),
        ):
            start, stop = max(lo - row, 0), min(hi - row + 1, batch.num_rows)
            row += batch.num_rows
            if stop > start:
                yield batch.slice(start, stop - start)
    except (OSError, pa.ArrowException) as exc:
        raise _unreadable(file, exc) from exc


def _row_groups(
    file: pq.ParquetFile,
    seg: SegmentInfo,
    lo: int,
    hi: int,
) -> tuple[list[int], int]:
    """The row groups holding rows lo..hi, and the index of the first row they hold."""
    sizes = [file.metadata.row_group(i).num_rows for i in range(file.metadata.num_row_groups)]
    if sum(sizes) != seg.rows:
        raise SegmentError(
            f"segment {seg.file} holds {sum(sizes)} rows but the manifest lists "
            f"{seg.rows}; restore the file from a backup or re-ingest offsets "
            f"{seg.first_offset}-{seg.last_offset}"
        )
    ends = np.cumsum(sizes)
    starts = ends - np.array(sizes, dtype=np.int64)
    groups = [i for i in range(len(sizes)) if starts[i] <= hi and ends[i] > lo]
    return groups, int(starts[groups[0]]) if groups else 0


def _check_columns(file: pq.ParquetFile, path: str, columns: Sequence[str] | None) -> None:
    names = file.schema_arrow.names
    missing = [c for c in columns or () if c not in names]
    if missing:
        raise SegmentError(
            f"segment {path} has no column(s) {missing} (it has {names}); ask "
            "for columns of the source's schema"
        )


def _unreadable(file: _SegmentFile, exc: Exception) -> SegmentError:
    state = "is missing" if isinstance(exc, FileNotFoundError) else f"cannot be read ({exc})"
    seg = file.seg
    return SegmentError(
        f"segment file {file.where} (partition {seg.partition}, offsets "
        f"{seg.first_offset}-{seg.last_offset}) {state}; restore it from a "
        "backup or re-ingest that offset range"
    )


def _in_time_range(
    batch: pa.RecordBatch, ts_column: str, min_ts: int, max_ts: int, columns: Sequence[str] | None
) -> pa.RecordBatch:
    ts = batch.column(ts_column).cast(TIMESTAMP_US).cast(pa.int64())
    keep = pc.and_(pc.greater_equal(ts, min_ts), pc.less_equal(ts, max_ts))
    batch = batch.filter(keep)
    return batch if columns is None else batch.select(list(columns))


def write_dead_letters(
    root: str | Path | Warehouse, source: str, table: pa.Table, name: str | None = None
) -> str | None:
    """Append dead letters (columns reason, partition, offset, payload, at) as a new file
    under `<root>/<source>/_deadletter/`; its location, or None if `table` is empty. `name` (a
    file name without extension) replaces the file of that name, so that a retried writer
    (an ingest rerun after a crash) does not write its dead letters twice.

    Raises:
        SegmentError: a column is missing or cannot be cast to the dead-letter schema.
    """
    if table.num_rows == 0:
        return None
    try:
        table = table.select(DEAD_LETTER_SCHEMA.names).cast(DEAD_LETTER_SCHEMA)
    except (KeyError, pa.ArrowException) as exc:
        raise SegmentError(
            f"dead letters of source {source!r} do not fit the dead-letter schema "
            f"({exc}); give columns {DEAD_LETTER_SCHEMA}"
        ) from exc
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    name = name or f"{stamp}-{uuid.uuid4().hex}"
    store = _store_of(root)
    rel = f"{source}/{DEAD_LETTER_DIR}/{name}.parquet"
    store.write_parquet(rel, _with_metadata(table, ""))
    return store.describe(rel)


def read_dead_letters(root: str | Path | Warehouse, source: str) -> pa.Table:
    """All dead letters of a source, in file-name order (time-stamped files, then the
    `ingest-<hash>` files of ingests)."""
    store, folder = _store_of(root), f"{source}/{DEAD_LETTER_DIR}"
    names = [n for n in store.list(folder) if n.endswith(".parquet")]
    tables = [store.parquet_file(f"{folder}/{n}").read().cast(DEAD_LETTER_SCHEMA) for n in names]
    return pa.concat_tables(tables) if tables else DEAD_LETTER_SCHEMA.empty_table()


def _store_of(root: str | Path | Warehouse) -> Store:
    return root.store if isinstance(root, Warehouse) else open_store(root)
