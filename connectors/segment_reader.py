"""The read side of the warehouse log: the records of one partition in offset order, from the
segment files its manifest lists, opening only the files, and reading only the row groups,
that the asked range needs.

    segments (manifest) --overlap [from_offset, to_offset]--> rows of each file --> row groups
                        --overlap [min_ts, max_ts] (min_ts/max_ts of each file)--> whole files,
                                                                   rows filtered by event time

A file's rows for an offset range are found by row index when the segment has no holes (`rows`
equals its offset span), else by searching its `_offset` column. Gaps and holes yield nothing;
a file the manifest does not list is never read. A file that is missing, unreadable, or holds
another number of rows than the manifest says is a SegmentError naming it and the offsets to
restore.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from connectors.envelope import OFFSET, TIMESTAMP_US
from connectors.errors import SegmentError
from connectors.manifest import SegmentInfo
from connectors.objectstore import Store

__all__ = ["read_offset_range", "read_time_range"]


def read_offset_range(
    store: Store,
    source: str,
    segments: Sequence[SegmentInfo],
    from_offset: int,
    to_offset: int | None,
    columns: Sequence[str] | None,
    batch_rows: int,
) -> Iterator[pa.RecordBatch]:
    """The records of `segments` (one partition's, in offset order) with `from_offset <=
    _offset <= to_offset`, in offset order (see `Warehouse.read`).

    Raises:
        SegmentError: a segment file is missing, corrupt, or disagrees with the manifest.
    """
    last = to_offset if to_offset is not None else np.iinfo(np.int64).max
    for seg in segments:
        if seg.last_offset >= from_offset and seg.first_offset <= last:
            file = _SegmentFile(store, f"{source}/{seg.file}", seg)
            lo, hi = _row_range(file, from_offset, last)
            if lo <= hi:
                yield from _read_rows(file, lo, hi, columns, batch_rows)


def read_time_range(
    store: Store,
    source: str,
    segments: Sequence[SegmentInfo],
    ts_column: str,
    min_ts: int,
    max_ts: int,
    columns: Sequence[str] | None,
    batch_rows: int,
) -> Iterator[pa.RecordBatch]:
    """The records of `segments` with `min_ts <= ts_column <= max_ts` (µs, UTC), in offset
    order (see `Warehouse.read_time_range`); files whose event times lie outside the range
    are not opened."""
    for seg in segments:
        if seg.max_ts >= min_ts and seg.min_ts <= max_ts:
            wanted = None if columns is None else [*dict.fromkeys([*columns, ts_column])]
            file = _SegmentFile(store, f"{source}/{seg.file}", seg)
            for batch in _read_rows(file, 0, seg.rows - 1, wanted, batch_rows):
                yield _in_time_range(batch, ts_column, min_ts, max_ts, columns)


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
        # At most a row group per batch: a suspended reader (a replay batch ends mid-file) holds
        # on to the last batch it yielded; callers coalesce batches up to the size they want.
        largest = max((parquet.metadata.row_group(g).num_rows for g in groups), default=1)
        for batch in parquet.iter_batches(
            batch_size=min(batch_rows, largest),
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
