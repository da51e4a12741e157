"""connectors.log: a partition's segments read as replay batches bounded in rows and bytes,
every record once, in offset order, however the bounds cut the row groups and segment files."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from connectors import log as log_module
from connectors.avro import arrow_schema
from connectors.log import PartitionLog, coalesce
from connectors.segments import Warehouse
from tests.connectors.test_segments import _holes_and_gaps, append


def _numbers(sizes: list[int]) -> list[pa.RecordBatch]:
    """Record batches of consecutive int64s (8 bytes a row), `sizes` rows each."""
    starts = np.cumsum([0, *sizes]).tolist()
    return [
        pa.record_batch({"x": np.arange(starts[i], starts[i] + n)}) for i, n in enumerate(sizes)
    ]


@pytest.mark.parametrize(
    ("sizes", "rows", "nbytes", "taken", "rest", "ran_out"),
    [
        ([5, 5, 5], 100, 1 << 20, [5, 5, 5], 0, True),  # the whole input fits
        ([5, 5, 5], 7, 1 << 20, [5, 2], 3, False),  # the row bound cuts the second batch
        ([5, 5, 5], 10, 1 << 20, [5, 5], 0, False),  # the bound met exactly at a batch's end
        ([5, 5, 5], 100, 8 * 7, [5, 2], 3, False),  # the byte bound: 7 rows of 8 bytes
        ([5, 5, 5], 100, 8 * 7 + 5, [5, 2], 3, False),  # a partial row does not fit
        ([5, 5], 100, 3, [1], 4, False),  # a bound below one row still takes one
        ([0, 4, 0, 4], 6, 1 << 20, [4, 2], 2, False),  # empty batches are skipped
        ([], 6, 1 << 20, [], 0, True),
    ],
)
def test_coalesce_takes_at_most_the_bounds_and_at_least_one_record(
    sizes: list[int], rows: int, nbytes: int, taken: list[int], rest: int, ran_out: bool
) -> None:
    """What it takes is a prefix of the input, in order; the rest of a batch it cut is carried,
    and the next call starts with it: every record once, whatever the bounds."""
    batches = iter(_numbers(sizes))
    got, carry, exhausted = coalesce(batches, None, rows, nbytes)
    assert [b.num_rows for b in got] == taken
    assert (0 if carry is None else carry.num_rows) == rest
    assert exhausted is ran_out
    values = [v for b in got for v in b.column(0).to_pylist()]
    assert values == list(range(sum(taken)))
    while not exhausted:
        more, carry, exhausted = coalesce(batches, carry, rows, nbytes)
        values += [v for b in more for v in b.column(0).to_pylist()]
    assert values == list(range(sum(sizes)))


def _log(warehouse: Warehouse, schema: pa.Schema, start: int, **bounds: int) -> PartitionLog:
    return PartitionLog(warehouse, "tx", 0, start, schema, stop_at=None, **bounds)


def _read_all(log: PartitionLog) -> tuple[list[pa.Table], int]:
    batches, end = [], log.start_offset
    while (batch := log.read()) is not None:
        batches.append(batch.events)
        assert batch.next_offset > end or not batch.events.num_rows  # always moves on
        end = batch.next_offset
    return batches, end


@pytest.mark.parametrize("bound", ["rows", "bytes"])
def test_replay_batches_read_every_record_once_across_files_holes_and_gaps(
    warehouse_location: str, log_rows: Any, transaction_schema: dict[str, Any], bound: str
) -> None:
    """Segments with holes and gaps, then 3 more files of 40 records: read from every start
    offset in batches of at most 3 records (or 3 records' bytes); the batches are consecutive,
    within the bound, and hold every record at or after the start exactly once."""
    warehouse = Warehouse(warehouse_location)
    held = _holes_and_gaps(warehouse, log_rows)
    for first in (150, 190, 230):
        append(warehouse, log_rows(first, 40))
    held += list(range(150, 270))
    schema = arrow_schema(transaction_schema)
    limit = int(3.5 * log_rows(150, 40).nbytes / 40)  # about 3 records' bytes
    bounds = {"batch_rows": 3} if bound == "rows" else {"batch_bytes": limit}
    for start in (0, 100, 104, 119, 125, 135, 149, 150, 187, 229, 269):
        batches, end = _read_all(_log(warehouse, schema, start, **bounds))
        offsets = [o for b in batches for o in b.column("_offset").to_pylist()]
        assert offsets == [o for o in held if o >= start], start
        assert end == 270
        if bound == "rows":
            assert all(b.num_rows <= 3 for b in batches)
            assert max(b.num_rows for b in batches) == min(3, len(offsets))
        else:
            assert all(b.nbytes <= limit or b.num_rows == 1 for b in batches)
            assert max(b.num_rows for b in batches) >= min(2, len(offsets))


def test_a_long_log_is_read_in_batches_of_the_byte_bound(
    warehouse_location: str, log_rows: Any, transaction_schema: dict[str, Any]
) -> None:
    """A replay batch ends at `batch_bytes` whatever the row bound: a log 10x as long is read
    in 10x the batches of the same size, not in larger ones."""
    warehouse = Warehouse(warehouse_location)
    for first in range(0, 2000, 200):
        append(warehouse, log_rows(first, 200))
    schema = arrow_schema(transaction_schema)
    limit = log_rows(0, 200).nbytes // 2  # about 100 records' bytes
    batches, end = _read_all(_log(warehouse, schema, 0, batch_rows=10**9, batch_bytes=limit))
    assert end == 2000
    assert sum(b.num_rows for b in batches) == 2000
    assert all(b.nbytes <= limit for b in batches)
    assert 18 <= len(batches) <= 22


@pytest.mark.parametrize("keep_rows", [10**9, 2])
def test_small_batches_keep_their_reader_and_large_ones_reopen_at_their_offset(
    warehouse_location: str,
    log_rows: Any,
    transaction_schema: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    keep_rows: int,
) -> None:
    """Batches smaller than KEEP_READER_ROWS read the log with one reader (a reopened one
    would decode the start of the row group again for every batch); larger ones close it and
    the next opens at its offset (nothing held between batches). Either way every record
    once, in order."""
    warehouse = Warehouse(warehouse_location)
    for first in range(0, 120, 40):
        append(warehouse, log_rows(first, 40))
    opened: list[int] = []
    read = Warehouse.read

    def counted(self: Warehouse, *args: Any, **kwargs: Any) -> Any:
        opened.append(kwargs.get("from_offset", args[2] if len(args) > 2 else 0))
        return read(self, *args, **kwargs)

    monkeypatch.setattr(Warehouse, "read", counted)
    monkeypatch.setattr(log_module, "KEEP_READER_ROWS", keep_rows)
    schema = arrow_schema(transaction_schema)
    batches, end = _read_all(_log(warehouse, schema, 0, batch_rows=7))
    assert [o for b in batches for o in b.column("_offset").to_pylist()] == list(range(120))
    assert end == 120
    if keep_rows > 7:
        assert opened == [0]
    else:
        assert opened == list(range(0, 120, 7))
