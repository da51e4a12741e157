"""The view store: materialized feature views in RocksDB, one writer, versioned.

Directory layout (STORE_FORMAT 1):

    <state>/FORMAT                          "featureflow-state <n>"
    <state>/views/<view>/CURRENT            the live version number (replaced atomically)
    <state>/views/<view>/v<N>/layout.json   the view's ViewLayout (features, hops, types)
    <state>/views/<view>/v<N>/CREATOR       pid of the process that created the version
    <state>/views/<view>/v<N>/WAS_LIVE      present once the version has been live
    <state>/views/<view>/v<N>/*.lock        who uses and who writes the version (state.lock)
    <state>/views/<view>/v<N>/p<PPPP>/      one RocksDB per source partition

A source partition is the unit of sharding: the key space is already hashed into partitions by
the Kafka partitioner, every event of a key lives in one partition, and one worker applies a
partition in offset order. Each commit writes the changed entity blobs and the partition's applied
offset and watermark in one WriteBatch, so a crash never separates tiles from their offsets.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from rocksdict import (
    AccessType,
    BlockBasedOptions,
    Cache,
    DBCompressionType,
    IngestExternalFileOptions,
    Options,
    Rdict,
    ReadOptions,
    WriteBatch,
)

from connectors.objectstore import owned_temp, replace_file
from state.codec import (
    APPLIED_OFFSET,
    ENTITY_PREFIX,
    EVENTS_APPLIED,
    FOREIGN_OFFSET,
    FOREIGN_WATERMARK,
    LATE_EVENTS,
    WATERMARK,
    decode_int,
    encode_int,
    foreign_key,
    foreign_partition,
)
from state.errors import (
    FormatVersionError,
    NotAViewStoreError,
    StaleVersionError,
    StateDiskFullError,
    StateError,
    UnknownViewError,
)
from state.layout import ViewLayout
from state.lock import USE_LOCK, VersionLease, claim_unused, claim_writer, use_version

STORE_FORMAT = 1
_FORMAT_FILE = "FORMAT"
_FORMAT_TEXT = f"featureflow-state {STORE_FORMAT}\n"
_VERSION_DIR = re.compile(r"^v(\d+)$")
_CREATOR = "CREATOR"  # pid of the process that created a version
_WAS_LIVE = "WAS_LIVE"  # marker: the version has been live (a complete build)
_SWITCH_LOCK = "SWITCH.lock"  # serializes switches of one view


def rocks_options(*, read_only: bool = False) -> Options:
    """Options for point reads of entity blobs, chosen by measurement (scripts/bench_store.py):
    10-bit bloom filters, LZ4, and one block cache shared by every store a process opens
    (FEATUREFLOW_BLOCK_CACHE_MB, default 256; open stores with `open_rocks`). Index and filter
    blocks stay pinned in the table readers: putting them in the block cache measured 15x
    worse at p99."""
    opts = Options(raw_mode=True)
    opts.create_if_missing(not read_only)
    table = BlockBasedOptions()
    table.set_bloom_filter(10, False)
    table.set_block_cache(_shared_cache())
    opts.set_block_based_table_factory(table)
    opts.set_compression_type(DBCompressionType.lz4())
    opts.set_max_open_files(-1)
    if read_only:
        # With every table file kept open, each catch-up of a secondary loads table handlers on
        # `max_file_opening_threads` new threads (16 by default), even when nothing changed:
        # ~450-570 us per idle partition, all of it holding the GIL. One thread loads them
        # inline: 16-23 us (scripts/bench_reads.py prints the catch-up cost).
        opts.set_max_file_opening_threads(1)
    return opts


_CACHE: list[Cache] = []
_READ_ONCE = ReadOptions()  # blocks read are not put in the block cache
_READ_ONCE.fill_cache(False)  # type: ignore[call-arg]  # the stub lacks the argument
_READ_CACHED = ReadOptions()  # RocksDB's defaults


def _shared_cache() -> Cache:
    if not _CACHE:
        mb = int(os.environ.get("FEATUREFLOW_BLOCK_CACHE_MB", "256"))
        _CACHE.append(Cache(mb * 1024 * 1024))
    return _CACHE[0]


def _write_atomic(path: Path, data: bytes) -> None:
    """`data` as the file `path`, atomically and durably (`owned_temp(path)` meanwhile)."""
    tmp = owned_temp(path)
    with disk_full_named(path, f"writing {path.name}"):
        replace_file(path, lambda t: t.write_bytes(data), tmp=tmp)


@dataclass(frozen=True, slots=True)
class LogPosition:
    """How far a view shard has applied one source partition's log."""

    offset: int  # highest applied log offset; -1 = nothing applied
    watermark: int | None  # the source partition's newest event time through `offset` (µs)


NOTHING_APPLIED = LogPosition(-1, None)


@dataclass(frozen=True, slots=True)
class PartitionProgress:
    """How far a view shard (the partition of the key space its keys hash to) has applied the
    log: its own source partition (`applied_offset`, `watermark`), and, in `others`, every
    other source partition that routed records to it."""

    applied_offset: int  # -1 = nothing applied
    watermark: int | None  # the own partition's newest event time through applied_offset (µs)
    events_applied: int
    late_events: int
    others: Mapping[int, LogPosition] = field(default_factory=dict)

    def position(self, partition: int, shard: int) -> LogPosition:
        """The shard's position in source partition `partition`."""
        if partition == shard:
            return LogPosition(self.applied_offset, self.watermark)
        return self.others.get(partition, NOTHING_APPLIED)

    def newest(self) -> int | None:
        """The newest event time over every source partition the shard has applied."""
        marks = [
            w
            for w in (self.watermark, *(o.watermark for o in self.others.values()))
            if w is not None
        ]
        return max(marks) if marks else None

    def advanced(
        self, partition: int, shard: int, position: LogPosition, applied: int, late: int
    ) -> PartitionProgress:
        """The progress after applying `applied` events (and rejecting `late` ones) of
        `partition` up to `position`."""
        events, late = self.events_applied + applied, self.late_events + late
        if partition == shard:
            return PartitionProgress(position.offset, position.watermark, events, late, self.others)
        others = {**self.others, partition: position}
        return PartitionProgress(self.applied_offset, self.watermark, events, late, others)


_DISK_FULL = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


@contextmanager
def disk_full_named(path: Path, doing: str) -> Iterator[None]:
    """Turn a full device under the view store (RocksDB reports it as a plain Exception, the OS
    as OSError ENOSPC) into a StateDiskFullError naming the path; anything else passes."""
    try:
        yield
    except StateError:
        raise
    except Exception as exc:
        if not any(text in str(exc) for text in _DISK_FULL):
            raise
        raise StateDiskFullError(
            f"no space left on the device holding {path} while {doing}; nothing of it was "
            "committed. Free space there, then run flows.run again: it resumes after the last "
            "commit"
        ) from exc


class PartitionStore:
    """The RocksDB of one (view, version, source partition); exactly one writer opens it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.options = rocks_options()
        with disk_full_named(path, "opening the view store"):
            path.mkdir(parents=True, exist_ok=True)
            _remove_dead_ingest_files(path)
            self._db = open_rocks(path, self.options)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        result = self._db.get(list(keys))
        assert isinstance(result, list)
        return result

    def get_many_once(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """`get_many` for blobs read once and then rewritten (a replay building a version):
        their blocks are not put in the block cache, where they would never be read again
        and would only grow the process."""
        if not keys:
            return []
        # rocksdict's multi-get ignores a `read_opt` argument but honours preset options; the
        # store is used by its worker's thread alone, so preset them around this one read
        self._db.set_read_options(_READ_ONCE)
        try:
            result = self._db.get(list(keys))
        finally:
            self._db.set_read_options(_READ_CACHED)
        assert isinstance(result, list)
        return result

    def progress(self) -> PartitionProgress:
        return progress_of(self._db)

    def commit(self, puts: dict[bytes, bytes], progress: PartitionProgress) -> None:
        """Write changed entities and the new progress atomically (one WriteBatch). `puts` is
        emptied as its blobs are copied into the batch: they are held once, not twice. (A
        replay building a version commits SST files instead: `state.bulk`.)"""
        batch = WriteBatch(raw_mode=True)
        for key in list(puts):  # in the order given (the write path's: key order)
            batch.put(key, puts.pop(key))
        for key, value in progress_entries(progress).items():
            batch.put(key, value)
        with disk_full_named(self.path, "committing a batch"):
            self._db.write(batch)

    @property
    def ingest_path(self) -> Path:
        """Where this process writes an SST file to ingest: beside the store (a file of a
        process killed before ingesting it is removed when the store next opens)."""
        return self.path.with_name(f".{self.path.name}.ingest-{os.getpid()}.sst")

    def ingest(self, path: Path, applied_offset: bytes) -> None:
        """Ingest the SST file at `path` (one atomic change), then write the applied offset
        (its encoded value, the same as in the file) again through the log: a RocksDB
        secondary that replayed earlier WriteBatches from the log keeps them in its memtable
        and reads them over the newer file until a later record makes it drop them."""
        self._db.ingest_external_file([str(path)], _INGEST_OPTIONS)
        nudge = WriteBatch(raw_mode=True)
        nudge.put(APPLIED_OFFSET, applied_offset)
        self._db.write(nudge)

    def flush_soon(self) -> None:
        """Start writing the memtable out in RocksDB's background threads, without waiting: a
        store that will get no more writes then closes without doing it."""
        self._db.flush(wait=False)

    def close(self) -> None:
        """Close the store. A full disk may keep RocksDB from flushing: what was committed is
        in its write-ahead log and comes back on the next open, so that is not an error here."""
        try:
            self._db.close()
        except Exception as exc:
            if not any(text in str(exc) for text in _DISK_FULL):
                raise


_INGEST_OPTIONS = IngestExternalFileOptions()
_INGEST_OPTIONS.set_move_files(True)  # link the file in, no copy


def progress_entries(progress: PartitionProgress) -> dict[bytes, bytes]:
    """The metadata entries that record a shard's progress."""
    meta = {APPLIED_OFFSET: encode_int(progress.applied_offset)}
    if progress.watermark is not None:
        meta[WATERMARK] = encode_int(progress.watermark)
    meta[EVENTS_APPLIED] = encode_int(progress.events_applied)
    meta[LATE_EVENTS] = encode_int(progress.late_events)
    for partition, position in progress.others.items():
        meta[foreign_key(FOREIGN_OFFSET, partition)] = encode_int(position.offset)
        if position.watermark is not None:
            meta[foreign_key(FOREIGN_WATERMARK, partition)] = encode_int(position.watermark)
    return meta


def _remove_dead_ingest_files(store: Path) -> None:
    for path in left_by_dead(store.parent.glob(f".{store.name}.ingest-*.sst"), ".sst"):
        path.unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class VersionCleanup:
    """What `drop_versions_except` did: versions deleted and versions skipped as in use."""

    view: str
    dropped: tuple[int, ...]
    busy: tuple[int, ...]


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """A blocking exclusive flock on `path` for the duration of the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class ViewStore:
    """The state directory: views, their versions and partitions. Writer-side handle."""

    def __init__(self, root: str | Path, *, create: bool = True) -> None:
        self.root = Path(root)
        check_store(self.root, create=create)

    def view_dir(self, view: str) -> Path:
        return self.root / "views" / view

    def version_dir(self, view: str, version: int) -> Path:
        return self.view_dir(view) / f"v{version}"

    def partition_dir(self, view: str, version: int, partition: int) -> Path:
        return partition_dir(self.version_dir(view, version), partition)

    def views(self) -> list[str]:
        return list_views(self.root)

    def current_version(self, view: str) -> int | None:
        return read_current(self.view_dir(view))

    def layout(self, view: str, version: int) -> ViewLayout:
        return read_layout(self.version_dir(view, version))

    def versions(self, view: str) -> list[int]:
        base = self.view_dir(view)
        if not base.is_dir():
            return []
        found = (_VERSION_DIR.match(p.name) for p in base.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def create_version(self, layout: ViewLayout) -> int:
        """A new, empty version of the view beside the live one (not yet switched to).

        Built under a temporary name and renamed into place, so a crash never leaves a
        version directory without its layout. The creating process's pid is kept in CREATOR:
        an unfinished version is abandoned (and may be cleaned up) only once it is dead.
        """
        version = max(self.versions(layout.view), default=0) + 1
        vdir = self.version_dir(layout.view, version)
        tmp = vdir.with_name(f".{vdir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        payload = {"format": STORE_FORMAT, "layout": layout.to_json()}
        _write_atomic(tmp / "layout.json", orjson.dumps(payload, option=orjson.OPT_INDENT_2))
        (tmp / _CREATOR).write_text(f"{os.getpid()}\n")
        (tmp / USE_LOCK).touch()
        os.rename(tmp, vdir)
        return version

    def finish_catch_up(
        self, view: str, version: int, partition: int, partitions: Iterable[int]
    ) -> bool:
        """Record that a partition of a new version has caught up with the log as it stood
        when the flow started; once every one of `partitions` has, make the version live.

        Returns:
            True if this call made the version live.

        Raises:
            StaleVersionError: a newer version of the view is live already.
        """
        marks = self.version_dir(view, version) / "caught_up"
        marks.mkdir(exist_ok=True)
        (marks / f"p{partition:04d}").touch()
        done = {p.name for p in marks.iterdir()}
        if not all(f"p{p:04d}" in done for p in partitions):
            return False
        self.switch(view, version)
        return True

    def switch(self, view: str, version: int, *, rollback: bool = False) -> None:
        """Make `version` the live one, atomically; readers pick it up on their next refresh.

        Versions only move forward: a version older than the live one is refused unless
        `rollback` asks for it, so a flow still running an old definition can never undo a
        newer deployment.

        Raises:
            StateError: the version does not exist.
            StaleVersionError: `version` is older than the live one and `rollback` is False.
        """
        vdir = self.version_dir(view, version)
        if not (vdir / "layout.json").is_file():
            raise StateError(f"view {view!r} has no version {version} to switch to")
        with exclusive(self.view_dir(view) / _SWITCH_LOCK):
            live = self.current_version(view)
            if live is not None and version < live and not rollback:
                raise StaleVersionError(
                    f"view {view!r}: not making v{version} live: v{live}, a newer version, is "
                    "live already (a newer deployment or replay built it); a flow running an "
                    "older definition never goes back over it. Restart that flow with the new "
                    "definitions, or roll back on purpose with ViewStore.switch(..., "
                    "rollback=True)"
                )
            (vdir / _WAS_LIVE).touch()
            _write_atomic(self.view_dir(view) / "CURRENT", f"{version}\n".encode())

    def is_complete(self, view: str, version: int) -> bool:
        """True when the version is or was live, or every partition of it has caught up."""
        vdir = self.version_dir(view, version)
        if (vdir / _WAS_LIVE).is_file() or self.current_version(view) == version:
            return True
        try:
            partitions = read_layout(vdir).partitions
            done = {p.name for p in (vdir / "caught_up").iterdir()}
        except (OSError, StateError):
            return False
        return all(f"p{p:04d}" in done for p in range(partitions))

    def is_abandoned(self, view: str, version: int) -> bool:
        """An unfinished version whose creating process is gone (a killed replay's leftover)."""
        if self.is_complete(view, version):
            return False
        try:
            pid = int((self.version_dir(view, version) / _CREATOR).read_text())
        except (OSError, ValueError):
            return True  # made before creators were recorded: nobody will finish it
        return pid != os.getpid() and not pid_alive(pid)

    def keep_versions(self, view: str, count: int) -> VersionCleanup:
        """Keep the live version and the newest complete ones, `count` in all; delete the
        rest that no process uses, and every abandoned unfinished version (never counted)."""
        live = self.current_version(view)
        done = [v for v in self.versions(view) if v != live and self.is_complete(view, v)]
        keep = {*([live] if live is not None else []), *done[::-1][: max(count - 1, 0)]}
        keep |= {v for v in self.versions(view) if v not in done and not self.is_abandoned(view, v)}
        return self.drop_versions_except(view, sorted(keep))

    def drop_versions_except(self, view: str, keep: Sequence[int]) -> VersionCleanup:
        """Delete every version but `keep` and the live one, skipping versions in use.

        A version is deleted only under an exclusive lock on its USE.lock, which every writer
        and reader of it holds shared: a version in use is skipped and reported, never deleted.
        """
        live = self.current_version(view)
        dropped, busy = [], []
        for version in self.versions(view):
            if version in keep or version == live:
                continue
            if self._delete_version(view, version):
                dropped.append(version)
            else:
                busy.append(version)
        return VersionCleanup(view, tuple(dropped), tuple(busy))

    def claim(self, view: str, version: int, process_id: int) -> list[VersionLease]:
        """Hold `version` as its writer for cluster process `process_id`: in use (never
        deleted) and written by this process alone. Release the leases when done.

        Raises:
            StateLockedError: another live process writes it as the same process id.
            StateError: the version was deleted before it could be held.
        """
        vdir = self.version_dir(view, version)
        use = use_version(vdir)
        if use is None:
            raise StateError(
                f"view {view!r} v{version} was removed (a flows.replay cleanup) before this "
                "flow could hold it; run the command again"
            )
        try:
            return [use, claim_writer(self.root, view, version, vdir, process_id)]
        except BaseException:
            use.release()
            raise

    def _delete_version(self, view: str, version: int) -> bool:
        vdir = self.version_dir(view, version)
        lease = claim_unused(vdir)
        if lease is None:
            return not vdir.exists()
        with lease:
            doomed = vdir.with_name(f".{vdir.name}.deleting-{os.getpid()}")
            os.rename(vdir, doomed)  # readers see it gone at once; the files go next
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def open_partition(self, view: str, version: int, partition: int) -> PartitionStore:
        return PartitionStore(self.partition_dir(view, version, partition))


def partition_dir(version_dir: Path, partition: int) -> Path:
    return version_dir / f"p{partition:04d}"


def check_store(root: Path, *, create: bool) -> None:
    """Verify (or create) the store's format marker.

    Raises:
        NotAViewStoreError: the directory exists but holds something else (or nothing).
        FormatVersionError: the store was written by an incompatible format version.
    """
    marker = root / _FORMAT_FILE
    if not marker.is_file():
        in_progress = _clear_marker_leftovers(root)
        if in_progress and _wait_for(marker):  # another process of a cluster is creating it
            return check_store(root, create=create)
        if create and _holds_only_markers(root):
            root.mkdir(parents=True, exist_ok=True)
            _write_atomic(marker, _FORMAT_TEXT.encode())  # the same bytes whoever writes last
            return
        if marker.is_file():  # another thread or process finished writing it meanwhile
            return check_store(root, create=create)
        raise NotAViewStoreError(
            f"{str(root)!r} is not a view store (no {_FORMAT_FILE} file); pass the --state "
            "directory that flows.run writes (default data/state)"
        )
    text = marker.read_text().strip()
    match = re.fullmatch(r"featureflow-state (\d+)", text)
    if not match:
        raise NotAViewStoreError(f"{str(root)!r} is not a view store: {_FORMAT_FILE} says {text!r}")
    if int(match.group(1)) != STORE_FORMAT:
        raise FormatVersionError(
            f"view store {str(root)!r} has on-disk format {match.group(1)}, this code reads "
            f"format {STORE_FORMAT}; rebuild it with flows.replay into a new --state directory"
        )


def _holds_only_markers(root: Path) -> bool:
    """True if `root` is missing, empty, or holds nothing but a FORMAT marker being written
    (by another thread or process creating the store at the same moment)."""
    if not root.exists():
        return True
    temporary = f".{_FORMAT_FILE}.tmp-"
    return all(p.name == _FORMAT_FILE or p.name.startswith(temporary) for p in root.iterdir())


def _clear_marker_leftovers(root: Path) -> bool:
    """Remove temporary FORMAT files of processes that died writing them; True if a live
    process is writing one now."""
    in_progress = False
    for tmp in root.glob(f".{_FORMAT_FILE}.tmp-*") if root.exists() else []:
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and pid_alive(int(pid)):
            in_progress = True
        else:
            tmp.unlink(missing_ok=True)
    return in_progress


def left_by_dead(paths: Iterable[Path], suffix: str = "") -> list[Path]:
    """Those of `paths` (temporary files named `...-<pid><suffix>`, as `owned_temp` names them)
    whose owning process is gone: leftovers of a killed writer, safe to remove."""
    dead = []
    for path in paths:
        pid = path.name.removesuffix(suffix).rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            dead.append(path)
    return dead


def pid_alive(pid: int) -> bool:
    """Whether a process of that pid runs (the owner of a temporary file or marker)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_for(path: Path, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file():
            return True
        time.sleep(0.05)
    return False


def read_current(view_dir: Path) -> int | None:
    try:
        return int((view_dir / "CURRENT").read_text().strip())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise StateError(
            f"{view_dir / 'CURRENT'} is damaged; it must hold a version number"
        ) from exc


def read_layout(version_dir: Path) -> ViewLayout:
    try:
        payload = orjson.loads((version_dir / "layout.json").read_bytes())
    except FileNotFoundError as exc:
        raise UnknownViewError(f"no view layout in {version_dir}") from exc
    if payload.get("format") != STORE_FORMAT:
        raise FormatVersionError(
            f"{version_dir}/layout.json has format {payload.get('format')},"
            f" this code reads format {STORE_FORMAT}; rebuild the view"
        )
    return ViewLayout.from_json(payload["layout"])


def list_views(root: Path) -> list[str]:
    """The views of a store that have a live version."""
    base = root / "views"
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if (p / "CURRENT").is_file())


def progress_of(db: Rdict) -> PartitionProgress:
    """The progress a partition's RocksDB records (nothing applied if it records none)."""
    raw = db.get([APPLIED_OFFSET, WATERMARK, EVENTS_APPLIED, LATE_EVENTS])
    assert isinstance(raw, list)
    return PartitionProgress(
        applied_offset=decode_int(raw[0]) if raw[0] is not None else -1,
        watermark=decode_int(raw[1]) if raw[1] is not None else None,
        events_applied=decode_int(raw[2]) if raw[2] is not None else 0,
        late_events=decode_int(raw[3]) if raw[3] is not None else 0,
        others=_foreign_positions(db),
    )


def _foreign_positions(db: Rdict) -> dict[int, LogPosition]:
    offsets = dict(_scan(db, FOREIGN_OFFSET))
    marks = dict(_scan(db, FOREIGN_WATERMARK))
    return {p: LogPosition(off, marks.get(p)) for p, off in offsets.items()}


def _scan(db: Rdict, prefix: bytes) -> Iterator[tuple[int, int]]:
    it = db.iter()
    it.seek(prefix)
    while it.valid() and it.key().startswith(prefix):
        yield foreign_partition(it.key(), prefix), decode_int(it.value())
        it.next()


@contextmanager
def peek(primary: Path) -> Iterator[Rdict | None]:
    """A short-lived secondary of a partition's RocksDB (None if it does not exist yet), for
    reading beside a running writer; its scratch directory is removed afterwards."""
    if not (primary / "CURRENT").is_file():
        yield None
        return
    scratch = scratch_dir("peek")
    db = open_secondary(primary, scratch)
    try:
        yield db
    finally:
        db.close()
        shutil.rmtree(scratch, ignore_errors=True)


def read_partition_progress(primary: Path) -> PartitionProgress:
    """A partition's progress, read without disturbing its writer."""
    with peek(primary) as db:
        return progress_of(db) if db is not None else PartitionProgress(-1, None, 0, 0)


_SCRATCH = re.compile(r"^featureflow-(?:client|peek)-(\d+)-")
_SCRATCH_SWEPT: list[bool] = []


def scratch_dir(kind: str) -> Path:
    """A new temporary directory for secondaries, named `featureflow-<kind>-<pid>-*`.

    The first call of a process removes the ones that dead processes left behind (a kill -9
    skips every cleanup), found by the pid in their names."""
    if not _SCRATCH_SWEPT:
        _SCRATCH_SWEPT.append(True)
        sweep_scratch(Path(tempfile.gettempdir()))
    return Path(tempfile.mkdtemp(prefix=f"featureflow-{kind}-{os.getpid()}-"))


def sweep_scratch(tmp: Path) -> list[Path]:
    """Remove secondary scratch directories of dead processes under `tmp`; returns them."""
    removed = []
    for entry in tmp.iterdir():
        match = _SCRATCH.match(entry.name)
        if match and not pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def open_secondary(primary: Path, secondary: Path) -> Rdict:
    """A read-only follower of a writer's RocksDB (safe while the writer runs)."""
    secondary.mkdir(parents=True, exist_ok=True)
    return open_rocks(primary, rocks_options(read_only=True), AccessType.secondary(str(secondary)))


def open_rocks(path: Path, options: Options, access: AccessType | None = None) -> Rdict:
    """A RocksDB at `path` with `options` for its (only) column family too: opening a database
    that exists, rocksdict otherwise gives the column family the options recorded in the
    database's OPTIONS file, whose table factory has a private 8 MB block cache in place of
    the process's shared one (so every reopened shard and every reader's follower had 8 MB)."""
    families = {"default": options}
    if access is None:
        return Rdict(str(path), options, column_families=families)
    return Rdict(str(path), options, column_families=families, access_type=access)


def iter_entities(db: Rdict) -> Iterator[tuple[bytes, bytes]]:
    it = db.iter()
    it.seek(ENTITY_PREFIX)
    while it.valid():
        key = it.key()
        if not key.startswith(ENTITY_PREFIX):
            break
        yield key, it.value()
        it.next()
