"""The warehouse log: the cold history of each source partition as Parquet segment files, each
covering a contiguous offset range, listed in a per-source manifest, read back in offset order.

    <root>/<source>/_manifest.json
    <root>/<source>/p<partition:04d>/<first offset:020d>-<last offset:020d>.parquet
    <root>/<source>/_deadletter/<UTC time>-<uuid>.parquet

Offsets: one offset space per partition. When a partition's log continues in Kafka, the manifest
records `kafka_base`, the log offset of Kafka offset 0: 0 when the segments were archived from
the topic itself, or the number of records ingested from history files before the topic was
first read (history first, then the topic, with no overlap).

The manifest is the truth: a segment file it does not list (left by a crash between writing the
file and the manifest) is ignored by readers and overwritten by the next append of that range.
Files and manifest are written to temporary names, fsynced and renamed into place, so a reader
never sees half a file. One writer per source at a time (the ingest or archive run).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from connectors.avro import fingerprint_hex
from connectors.envelope import ARRIVAL, DEAD_LETTER_SCHEMA, OFFSET, PARTITION, TIMESTAMP_US
from connectors.errors import SegmentError

MANIFEST = "_manifest.json"
MANIFEST_FORMAT = 1
SEGMENT_FORMAT = "1"  # Parquet key-value metadata `featureflow.segment_format`
DEAD_LETTER_DIR = "_deadletter"
SCHEMA_DIR = "_schemas"
ROW_GROUP_ROWS = 128 * 1024
_LOG_TYPES = {OFFSET: pa.int64(), PARTITION: pa.int32(), ARRIVAL: TIMESTAMP_US}


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """One segment file as the manifest lists it; offsets inclusive, times in µs (UTC)."""

    partition: int
    file: str  # relative to the source's directory
    first_offset: int
    last_offset: int
    rows: int
    min_ts: int
    max_ts: int
    schema_fingerprint: str
    bytes: int

    def to_json(self) -> dict[str, Any]:
        entry = asdict(self)
        del entry["partition"]
        return entry

    @classmethod
    def from_json(cls, partition: int, entry: dict[str, Any]) -> SegmentInfo:
        return cls(partition=partition, **entry)


class Warehouse:
    """The warehouse log under `root`: segments of every source, by partition."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def source_dir(self, source: str) -> Path:
        return self.root / source

    def kafka_base(self, source: str, partition: int) -> int | None:
        """The log offset of Kafka offset 0 in this partition, once Kafka has been read."""
        base = self._manifest(source).get("kafka_base", {}).get(str(partition))
        return None if base is None else int(base)

    def fix_kafka_base(self, source: str, partition: int) -> int:
        """Fix (once) where Kafka's offsets start in the partition's log, and return it: right
        after the segments that exist when the topic is first read (0 if there are none)."""
        manifest = self._manifest(source)
        bases = manifest.setdefault("kafka_base", {})
        if str(partition) not in bases:
            listed = manifest["partitions"].get(str(partition), [])
            bases[str(partition)] = listed[-1]["last_offset"] + 1 if listed else 0
            self._write_manifest(source, manifest)
        return int(bases[str(partition)])

    def register_schema(self, source: str, schema: Mapping[str, Any]) -> str:
        """Keep a writer schema of the source's log (by fingerprint); returns its hex id.

        Every schema that records of the log were written with is kept under
        `<root>/<source>/_schemas/`, so readers can resolve old segments and Kafka records to
        the source's current schema.
        """
        fp = fingerprint_hex(schema)
        path = self.source_dir(source) / SCHEMA_DIR / f"{fp}.avsc"
        if not path.exists():
            data = orjson.dumps(dict(schema), option=orjson.OPT_INDENT_2)
            _replace_atomically(path, lambda tmp: tmp.write_bytes(data))
        return fp

    def schemas(self, source: str) -> list[dict[str, Any]]:
        """Every writer schema registered for the source's log."""
        folder = self.source_dir(source) / SCHEMA_DIR
        return [orjson.loads(p.read_bytes()) for p in sorted(folder.glob("*.avsc"))]

    def path(self, source: str, segment: SegmentInfo) -> Path:
        """The absolute path of a segment file."""
        return self.source_dir(source) / segment.file

    def segments(self, source: str, partition: int) -> list[SegmentInfo]:
        """The segments of a partition in offset order (empty if it has none)."""
        entries = self._manifest(source)["partitions"].get(str(partition), [])
        return [SegmentInfo.from_json(partition, e) for e in entries]

    def partitions(self, source: str) -> list[int]:
        """The partitions that hold at least one segment, ascending."""
        return sorted(int(p) for p, e in self._manifest(source)["partitions"].items() if e)

    def next_offset(self, source: str, partition: int) -> int:
        """The offset the next appended record of the partition must have."""
        segments = self.segments(source, partition)
        return segments[-1].last_offset + 1 if segments else 0

    def append(
        self, source: str, partition: int, table: pa.Table, *, fingerprint: str, ts_column: str
    ) -> SegmentInfo:
        """Write `table` as the partition's next segment and list it in the manifest.

        `table` holds the source's columns plus `_offset` (int64, contiguous, starting at
        `next_offset`), `_partition` (int32, all `partition`) and `_arrival` (timestamp[us,
        UTC]); `ts_column` is its event-time column, `fingerprint` the hex fingerprint of the
        Avro schema its columns follow.

        Raises:
            SegmentError: the table breaks one of those rules (the message says which).
        """
        manifest = self._manifest(source)
        listed = manifest["partitions"].get(str(partition), [])
        expected = listed[-1]["last_offset"] + 1 if listed else 0
        first, last, min_ts, max_ts = _check_table(table, partition, expected, ts_column)
        name = f"p{partition:04d}/{first:020d}-{last:020d}.parquet"
        size = _write_parquet(self.source_dir(source) / name, _with_metadata(table, fingerprint))
        info = SegmentInfo(
            partition, name, first, last, table.num_rows, min_ts, max_ts, fingerprint, size
        )
        manifest["ts_column"] = ts_column
        manifest["partitions"].setdefault(str(partition), []).append(info.to_json())
        self._write_manifest(source, manifest)
        return info

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

        Only the files (and row groups) overlapping the range are read.

        Raises:
            SegmentError: a segment file is missing, corrupt, or disagrees with the manifest.
        """
        last = to_offset if to_offset is not None else np.iinfo(np.int64).max
        for seg in self.segments(source, partition):
            if seg.last_offset >= from_offset and seg.first_offset <= last:
                lo = max(from_offset, seg.first_offset) - seg.first_offset
                hi = min(last, seg.last_offset) - seg.first_offset
                yield from _read_rows(self.path(source, seg), seg, lo, hi, columns, batch_rows)

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
                for batch in _read_rows(
                    self.path(source, seg), seg, 0, seg.rows - 1, wanted, batch_rows
                ):
                    yield _in_time_range(batch, str(ts_column), min_ts, max_ts, columns)

    def _manifest(self, source: str) -> dict[str, Any]:
        path = self.source_dir(source) / MANIFEST
        try:
            manifest: dict[str, Any] = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return {"format": MANIFEST_FORMAT, "source": source, "partitions": {}}
        except (OSError, orjson.JSONDecodeError) as exc:
            raise SegmentError(
                f"manifest {path} cannot be read: {exc}; restore it from a backup "
                "or rebuild the warehouse by re-ingesting the source"
            ) from exc
        if manifest.get("format") != MANIFEST_FORMAT:
            raise SegmentError(
                f"manifest {path} has format {manifest.get('format')!r}; this "
                f"version reads format {MANIFEST_FORMAT}: upgrade featureflow"
            )
        return manifest

    def _write_manifest(self, source: str, manifest: dict[str, Any]) -> None:
        data = orjson.dumps(manifest, option=orjson.OPT_INDENT_2)
        _replace_atomically(self.source_dir(source) / MANIFEST, lambda tmp: tmp.write_bytes(data))


def _check_table(
    table: pa.Table,
    partition: int,
    expected: int,
    ts_column: str,
) -> tuple[int, int, int, int]:
    """The first and last offsets and the event-time range of a table to append."""
    if table.num_rows == 0:
        raise SegmentError(f"partition {partition}: no rows to append; skip empty tables")
    for name, arrow_type in (*_LOG_TYPES.items(), (ts_column, None)):
        _check_column(table, name, arrow_type, partition)
    offsets = table.column(OFFSET).to_numpy()
    if offsets[0] != expected or (len(offsets) > 1 and np.any(np.diff(offsets) != 1)):
        raise SegmentError(
            f"partition {partition}: offsets must be contiguous from {expected} (the next offset "
            f"of the log), got {offsets[0]}..{offsets[-1]} over {len(offsets)} rows; number the "
            "records from Warehouse.next_offset()"
        )
    if pc.any(pc.not_equal(table.column(PARTITION), partition)).as_py():
        raise SegmentError(
            f"partition {partition}: column {PARTITION} holds other partitions; "
            "split the records by partition before appending"
        )
    ts = table.column(ts_column).cast(TIMESTAMP_US).cast(pa.int64())
    extremes = pc.min_max(ts)
    return int(offsets[0]), int(offsets[-1]), extremes["min"].as_py(), extremes["max"].as_py()


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


def _write_parquet(path: Path, table: pa.Table) -> int:
    """Write `table` to `path` atomically; its size in bytes."""
    _replace_atomically(
        path,
        lambda tmp: pq.write_table(
            table, tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS, store_schema=True
        ),
    )
    return path.stat().st_size


def _replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` for a temporary file beside `path`, fsync it, rename it onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_rows(
    path: Path, seg: SegmentInfo, lo: int, hi: int, columns: Sequence[str] | None, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """Rows lo..hi (inclusive, 0-based) of a segment file, reading only the row groups needed."""
    try:
        file = pq.ParquetFile(path, memory_map=True)
        groups, first_row = _row_groups(file, seg, lo, hi)
        _check_columns(file, path, columns)
        row = first_row
        for batch in file.iter_batches(
            batch_size=batch_rows,
            row_groups=groups,
            columns=None if columns is None else list(columns),
        ):
            start, stop = max(lo - row, 0), min(hi - row + 1, batch.num_rows)
            row += batch.num_rows
            if stop > start:
                yield batch.slice(start, stop - start)
    except (OSError, pa.ArrowException) as exc:
        raise _unreadable(path, seg, exc) from exc


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


def _check_columns(file: pq.ParquetFile, path: Path, columns: Sequence[str] | None) -> None:
    names = file.schema_arrow.names
    missing = [c for c in columns or () if c not in names]
    if missing:
        raise SegmentError(
            f"segment {path} has no column(s) {missing} (it has {names}); ask "
            "for columns of the source's schema"
        )


def _unreadable(path: Path, seg: SegmentInfo, exc: Exception) -> SegmentError:
    state = "is missing" if isinstance(exc, FileNotFoundError) else f"cannot be read ({exc})"
    return SegmentError(
        f"segment file {path} (partition {seg.partition}, offsets "
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


def write_dead_letters(root: str | Path, source: str, table: pa.Table) -> Path | None:
    """Append dead letters (columns reason, partition, offset, payload, at) as a new file
    under `<root>/<source>/_deadletter/`; its path, or None if `table` is empty.

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
    path = Path(root) / source / DEAD_LETTER_DIR / f"{stamp}-{uuid.uuid4().hex}.parquet"
    _write_parquet(path, _with_metadata(table, ""))
    return path


def read_dead_letters(root: str | Path, source: str) -> pa.Table:
    """All dead letters of a source, oldest file first."""
    files = sorted((Path(root) / source / DEAD_LETTER_DIR).glob("*.parquet"))
    tables = [pq.read_table(f).cast(DEAD_LETTER_SCHEMA) for f in files]
    return pa.concat_tables(tables) if tables else DEAD_LETTER_SCHEMA.empty_table()
