"""A source's manifest: the list of segment files and gaps that is its warehouse log (a file
the manifest does not list is not part of the log), and how writers change it. Where it is
stored is drawn in connectors.segments; LogTransaction (connectors.segment_writer) is the
writer that changes it.

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
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from connectors.errors import ManifestConflictError, SegmentError
from connectors.objectstore import LocalStore, Store, VersionedDocument, replace_atomically

__all__ = [
    "MANIFEST",
    "MANIFEST_FORMAT",
    "MANIFEST_LOCK",
    "MANIFEST_VERSIONS",
    "MANIFEST_VERSIONS_KEPT",
    "Gap",
    "IngestedFile",
    "Manifests",
    "SegmentInfo",
    "ingested_in",
    "kafka_base_in",
    "next_offset_in",
]

MANIFEST = "_manifest.json"
MANIFEST_LOCK = "_manifest.lock"
MANIFEST_VERSIONS = "_manifest"  # object stores: <source>/_manifest/<version:020d>.json
MANIFEST_VERSIONS_KEPT = 20
MANIFEST_FORMAT = 1


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

    @classmethod
    def from_json(cls, partition: int, entry: dict[str, Any]) -> Gap:
        return cls(
            partition, entry["first_offset"], entry["last_offset"], str(entry.get("gap", ""))
        )

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


class Manifests:
    """The manifests of the sources in one warehouse store: read (the newest version), locked
    and committed as the module docstring says."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def source_dir(self, source: str) -> Path:
        """The source's directory (local warehouses only).

        Raises:
            SegmentError: the warehouse is an object store.
        """
        if not isinstance(self.store, LocalStore):
            raise SegmentError(
                f"warehouse {self.store.url} is an object store: it has no local paths; use "
                "Warehouse.location() and the store's methods"
            )
        return self.store.path(source)

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

    def read(self, source: str) -> tuple[int, dict[str, Any]]:
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

    def commit(self, source: str, version: int, data: bytes, committed: Callable[[], None]) -> None:
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
                f"{self.location(source)} first (this one read version {version}); "
                "nothing of this transaction was committed: run it again on the new manifest"
            )
        committed()

    def location(self, source: str) -> str:
        """Where the source's manifest is: the file, or the folder of its versions."""
        if self.store.local:
            return self.store.describe(f"{source}/{MANIFEST}")
        return self.store.describe(f"{source}/{MANIFEST_VERSIONS}/")

    def sweep_unlisted(self, source: str, manifest: dict[str, Any]) -> None:
        """Remove segment files and temporary files the manifest does not list: leftovers of a
        writer killed before its commit (local warehouses; only called under the lock, so no
        writer is running)."""
        source_dir = self.source_dir(source)
        listed = {e["file"] for es in manifest["partitions"].values() for e in es if e.get("file")}
        for folder in source_dir.glob("p[0-9][0-9][0-9][0-9]"):
            for path in folder.iterdir():
                if f"{folder.name}/{path.name}" not in listed:
                    path.unlink(missing_ok=True)
        for tmp in source_dir.glob(f".{MANIFEST}.*.tmp"):
            tmp.unlink(missing_ok=True)


def next_offset_in(manifest: dict[str, Any], partition: int) -> int:
    """The offset right after the partition's last entry (segment or gap); 0 if it has none."""
    listed = manifest["partitions"].get(str(partition), [])
    return int(listed[-1]["last_offset"]) + 1 if listed else 0


def kafka_base_in(manifest: dict[str, Any], partition: int) -> int | None:
    """The log offset of Kafka offset 0 in the partition, once it is fixed."""
    base = manifest.get("kafka_base", {}).get(str(partition))
    return None if base is None else int(base)


def ingested_in(manifest: dict[str, Any], sha256: str) -> IngestedFile | None:
    """The record of an input file in the log, by the sha256 of its content."""
    entry = manifest.get("ingested", {}).get(sha256)
    return None if entry is None else IngestedFile(sha256=sha256, **entry)


def _empty_manifest(source: str) -> dict[str, Any]:
    return {"format": MANIFEST_FORMAT, "source": source, "partitions": {}}


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
