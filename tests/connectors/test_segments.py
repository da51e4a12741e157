"""The warehouse log, on a local directory and on the S3 test server (`warehouse_location`
is parametrized: every test here runs on both)."""

from __future__ import annotations

import re
import threading
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from connectors.avro import fingerprint_hex
from connectors.deadletters import read_dead_letters, write_dead_letters
from connectors.envelope import DEAD_LETTER_SCHEMA, DeadLetter, dead_letter_table
from connectors.errors import SegmentError
from connectors.manifest import MANIFEST_VERSIONS
from connectors.segment_writer import LogTransaction
from connectors.segments import Warehouse

TS0 = 1_700_000_000_000_000
US = pa.timestamp("us", tz="UTC")


@pytest.fixture
def warehouse(warehouse_location: str) -> Warehouse:
    return Warehouse(warehouse_location)


def manifest_rel(warehouse: Warehouse, source: str = "tx") -> str:
    """The object holding the source's current manifest (the file, or its newest version)."""
    if warehouse.store.local:
        return f"{source}/_manifest.json"
    return (
        f"{source}/{MANIFEST_VERSIONS}/" + warehouse.store.list(f"{source}/{MANIFEST_VERSIONS}")[-1]
    )


def segment_rel(info: Any, source: str = "tx") -> str:
    return f"{source}/{info.file}"


def append(warehouse: Warehouse, table: pa.Table, partition: int = 0) -> Any:
    return warehouse.append("tx", partition, table, fingerprint="ab12", ts_column="ts")


def offsets_of(batches: Any) -> list[int]:
    return [o for b in batches for o in b.column("_offset").to_pylist()]


def test_append_then_read_round_trips_in_offset_order(
    warehouse: Warehouse,
    log_rows: Any,
) -> None:
    first, second = log_rows(0, 1000), log_rows(1000, 500)
    info = append(warehouse, first)
    assert (info.first_offset, info.last_offset, info.rows) == (0, 999, 1000)
    assert (info.min_ts, info.max_ts) == (TS0, TS0 + 999_000)
    assert re.fullmatch(
        r"p0000/00000000000000000000-00000000000000000999(\.[0-9a-f]{12})?\.parquet", info.file
    )
    append(warehouse, second)
    assert warehouse.next_offset("tx", 0) == 1500
    assert warehouse.next_offset("tx", 1) == 0
    assert warehouse.partitions("tx") == [0]
    table = pa.Table.from_batches(list(warehouse.read("tx", 0)))
    assert table.equals(pa.concat_tables([first, second]))


def test_manifest_and_file_metadata_follow_the_format(
    warehouse: Warehouse, log_rows: Any, transaction_schema: dict[str, Any]
) -> None:
    fp = fingerprint_hex(transaction_schema)
    info = warehouse.append("tx", 3, log_rows(0, 10, partition=3), fingerprint=fp, ts_column="ts")
    manifest = orjson.loads(warehouse.store.read_bytes(manifest_rel(warehouse)))
    assert (manifest["format"], manifest["source"]) == (1, "tx")
    entry = manifest["partitions"]["3"][0]
    assert entry == {
        "file": info.file,
        "first_offset": 0,
        "last_offset": 9,
        "rows": 10,
        "min_ts": TS0,
        "max_ts": TS0 + 9000,
        "schema_fingerprint": fp,
        "bytes": warehouse.store.size(segment_rel(info)),
    }
    meta = warehouse.store.parquet_file(segment_rel(info)).metadata
    assert meta.metadata[b"featureflow.segment_format"] == b"1"
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert meta.schema.to_arrow_schema().field("ts").type == US


@pytest.mark.parametrize(("first", "message"), [(5, "from 0 .*got 5"), (-1, "got -1")])
def test_an_append_must_start_at_the_next_offset(
    warehouse: Warehouse, log_rows: Any, first: int, message: str
) -> None:
    with pytest.raises(SegmentError, match=message):
        append(warehouse, log_rows(first, 10))
    append(warehouse, log_rows(0, 10))
    with pytest.raises(SegmentError, match="contiguous from 10"):
        append(warehouse, log_rows(11, 10))


def test_an_append_must_have_contiguous_offsets_and_one_partition(
    warehouse: Warehouse, log_rows: Any
) -> None:
    gap = pa.concat_tables([log_rows(0, 5), log_rows(6, 5)])
    with pytest.raises(SegmentError, match="contiguous"):
        append(warehouse, gap)
    with pytest.raises(SegmentError, match="holds other partitions"):
        append(warehouse, log_rows(0, 5, partition=1))
    with pytest.raises(SegmentError, match="'_arrival' is missing"):
        append(warehouse, log_rows(0, 5).drop_columns(["_arrival"]))
    assert warehouse.segments("tx", 0) == []


def test_files_the_manifest_does_not_list_are_ignored_and_overwritten(
    warehouse: Warehouse, log_rows: Any
) -> None:
    append(warehouse, log_rows(0, 10))
    # A crash after writing the next file but before the manifest: the file is an orphan.
    orphan = f"tx/p0000/{10:020d}-{19:020d}.parquet"
    warehouse.store.write_parquet(orphan, log_rows(10, 10).drop_columns(["amount"]))
    assert offsets_of(warehouse.read("tx", 0)) == list(range(10))
    assert warehouse.next_offset("tx", 0) == 10
    info = append(warehouse, log_rows(10, 10))
    if warehouse.store.local:  # overwritten; an object store names files per writer instead
        assert segment_rel(info) == orphan
        assert "amount" in warehouse.store.parquet_file(orphan).schema_arrow.names
    assert offsets_of(warehouse.read("tx", 0)) == list(range(20))


def test_a_corrupt_or_missing_file_is_a_segment_error(
    warehouse: Warehouse,
    log_rows: Any,
) -> None:
    info = append(warehouse, log_rows(0, 100))
    rel = segment_rel(info)
    warehouse.store.write_bytes(rel, warehouse.store.read_bytes(rel)[:200])
    with pytest.raises(SegmentError, match=f"{rel.rsplit('/', 1)[1]}.*re-ingest"):
        list(warehouse.read("tx", 0))
    warehouse.store.delete(rel)
    with pytest.raises(SegmentError, match="is missing; restore it"):
        list(warehouse.read("tx", 0))


def test_a_corrupt_manifest_is_a_segment_error(warehouse: Warehouse, log_rows: Any) -> None:
    append(warehouse, log_rows(0, 10))
    warehouse.store.write_bytes(manifest_rel(warehouse), b"{")
    with pytest.raises(SegmentError, match=r"_manifest.*\.json cannot be read"):
        warehouse.next_offset("tx", 0)


@pytest.mark.parametrize(
    ("lo", "hi"),
    [
        (0, None),
        (0, 0),
        (299, 300),
        (250, 1234),
        (17, 899),
        (900, 5000),
        (1200, 1199),
        (2000, None),
    ],
)
def test_reading_an_offset_range_gives_exactly_that_range(
    warehouse: Warehouse, log_rows: Any, lo: int, hi: int | None
) -> None:
    for first, n in ((0, 300), (300, 600), (900, 300)):  # three segments
        append(warehouse, log_rows(first, n))
    got = offsets_of(warehouse.read("tx", 0, lo, hi, batch_rows=64))
    assert got == list(range(lo, min(1199, 10**9 if hi is None else hi) + 1))


def test_reading_prunes_files_outside_the_range(warehouse: Warehouse, log_rows: Any) -> None:
    infos = [append(warehouse, log_rows(first, 100)) for first in (0, 100, 200)]
    warehouse.store.delete(segment_rel(infos[0]))  # would fail if opened
    warehouse.store.delete(segment_rel(infos[2]))
    assert offsets_of(warehouse.read("tx", 0, 120, 180)) == list(range(120, 181))
    rows = list(
        warehouse.read_time_range("tx", 0, TS0 + 150_000, TS0 + 160_000, columns=["user_id"])
    )
    assert [b.column_names for b in rows] == [["user_id"]]
    assert sum(b.num_rows for b in rows) == 11


def test_reading_a_column_subset(warehouse: Warehouse, log_rows: Any) -> None:
    append(warehouse, log_rows(0, 50))
    batches = list(warehouse.read("tx", 0, 10, 19, columns=["user_id", "ts"]))
    table = pa.Table.from_batches(batches)
    assert table.column_names == ["user_id", "ts"]
    assert table.column("ts").type == US
    assert table.column("user_id").to_pylist() == [f"u{o % 13}" for o in range(10, 20)]
    with pytest.raises(SegmentError, match="no column"):
        list(warehouse.read("tx", 0, columns=["nope"]))


def test_dead_letters_are_appended_as_files(warehouse_location: str) -> None:
    root = warehouse_location
    letters = [
        DeadLetter("bad marker", 2, 41, b"\x00\x01"),
        DeadLetter("null key", None, None, b'{"a": 1}'),
    ]
    first = write_dead_letters(root, "tx", dead_letter_table(letters, TS0))
    second = write_dead_letters(root, "tx", dead_letter_table(letters[:1], TS0 + 1))
    assert write_dead_letters(root, "tx", DEAD_LETTER_SCHEMA.empty_table()) is None
    assert first is not None
    assert second is not None
    assert first != second
    assert first.rsplit("/", 1)[0].endswith("tx/_deadletter")
    table = read_dead_letters(root, "tx")
    assert table.schema == DEAD_LETTER_SCHEMA
    assert table.column("reason").to_pylist() == ["bad marker", "null key", "bad marker"]
    assert table.column("offset").to_pylist() == [41, None, 41]
    assert table.column("payload").to_pylist()[1] == b'{"a": 1}'
    with pytest.raises(SegmentError, match="dead-letter schema"):
        write_dead_letters(root, "tx", pa.table({"reason": ["x"]}))


def _at(log_rows: Any, offsets: list[int]) -> pa.Table:
    """Log rows at exactly these offsets (the others are holes)."""
    full = log_rows(min(offsets), max(offsets) - min(offsets) + 1)
    return full.filter(pc.is_in(full.column("_offset"), pa.array(offsets, pa.int64())))


def _holes_and_gaps(warehouse: Warehouse, log_rows: Any) -> list[int]:
    """A partition of: a gap [0, 99], a segment [100, 119] with holes inside and at its end,
    a contiguous segment [120, 129], a gap [130, 139], a segment [140, 149] with holes at
    both ends; the offsets it holds."""
    holed = [100, 101, 104, 105, 106, 109]
    warehouse.append_gap("tx", 0, 0, 99, "before retention at onboarding")
    append_span(warehouse, _at(log_rows, holed), 100, 119)
    append(warehouse, log_rows(120, 10))
    warehouse.append_gap("tx", 0, 130, 139, "aborted transaction")
    append_span(warehouse, _at(log_rows, [141, 145]), 140, 149)
    return [*holed, *range(120, 130), 141, 145]


def append_span(warehouse: Warehouse, table: pa.Table, first: int, last: int) -> Any:
    return warehouse.append(
        "tx", 0, table, fingerprint="ab12", ts_column="ts", first_offset=first, last_offset=last
    )


def test_segments_with_holes_and_gaps_read_from_any_offset(
    warehouse: Warehouse, log_rows: Any
) -> None:
    held = _holes_and_gaps(warehouse, log_rows)
    assert warehouse.next_offset("tx", 0) == 150
    warehouse.append_gap("tx", 1, 0, 9, "only a gap")
    assert warehouse.partitions("tx") == [0]
    assert [(g.first_offset, g.last_offset, g.reason) for g in warehouse.gaps("tx", 0)] == [
        (0, 99, "before retention at onboarding"),
        (130, 139, "aborted transaction"),
    ]
    segs = warehouse.segments("tx", 0)
    assert [(s.first_offset, s.last_offset, s.rows) for s in segs] == [
        (100, 119, 6),
        (120, 129, 10),
        (140, 149, 2),
    ]
    for lo in range(0, 152):
        for hi in (lo, lo + 3, 125, 149, None):
            top = 10**9 if hi is None else hi
            want = [o for o in held if lo <= o <= top]
            assert offsets_of(warehouse.read("tx", 0, lo, hi, batch_rows=4)) == want, (lo, hi)
    rows = pa.Table.from_batches(list(warehouse.read("tx", 0, 104, 106)))
    assert rows.column("user_id").to_pylist() == [f"u{o % 13}" for o in (104, 105, 106)]


def test_a_span_must_start_at_the_next_offset_and_hold_increasing_offsets(
    warehouse: Warehouse, log_rows: Any
) -> None:
    with pytest.raises(SegmentError, match="must start at 0"):
        append_span(warehouse, log_rows(1, 3), 1, 5)
    with pytest.raises(SegmentError, match="hold offsets inside it"):
        append_span(warehouse, log_rows(0, 6), 0, 4)
    backwards = log_rows(0, 3).take([0, 2, 1])
    with pytest.raises(SegmentError, match="strictly increasing"):
        append_span(warehouse, backwards, 0, 5)
    with pytest.raises(SegmentError, match="gap must start at the next offset of the log, 0"):
        warehouse.append_gap("tx", 0, 3, 9, "x")
    assert warehouse.next_offset("tx", 0) == 0
    assert warehouse.store.list("tx/p0000") == []


def test_a_manifest_without_gaps_or_ingest_records_still_reads(
    warehouse: Warehouse, log_rows: Any
) -> None:
    append(warehouse, log_rows(0, 10))
    manifest = orjson.loads(warehouse.store.read_bytes(manifest_rel(warehouse)))
    assert set(manifest) == {"format", "source", "partitions", "ts_column"}
    assert warehouse.gaps("tx", 0) == []
    assert warehouse.ingested("tx", "0" * 64) is None
    assert warehouse.fix_kafka_base("tx", 0) == 10
    warehouse.append_gap("tx", 0, 10, 19, "control records")
    assert warehouse.kafka_base("tx", 0) == 10  # fixed once, a later gap does not move it
    assert warehouse.next_offset("tx", 0) == 20


def test_append_many_commits_every_partition_or_none(warehouse: Warehouse, log_rows: Any) -> None:
    good = {0: [log_rows(0, 10), log_rows(10, 5)], 1: [log_rows(0, 7, partition=1)]}
    bad = {**good, 2: [log_rows(3, 4, partition=2)]}  # partition 2 must start at 0
    with pytest.raises(SegmentError, match="contiguous from 0"):
        warehouse.append_many("tx", bad, fingerprint="ab12", ts_column="ts")
    assert [warehouse.next_offset("tx", p) for p in range(3)] == [0, 0, 0]
    assert [warehouse.store.list(f"tx/p{p:04d}") for p in range(3)] == [[]] * 3  # removed
    infos = warehouse.append_many("tx", good, fingerprint="ab12", ts_column="ts")
    assert [(i.partition, i.first_offset, i.last_offset) for i in infos] == [
        (0, 0, 9),
        (0, 10, 14),
        (1, 0, 6),
    ]
    assert offsets_of(warehouse.read("tx", 0)) == list(range(15))


def test_threads_appending_through_transactions_never_lose_an_entry(
    warehouse: Warehouse, log_rows: Any
) -> None:
    # Local: the lock serializes them. S3: each commit is a conditional put, a loser retries.
    def add(tx: LogTransaction) -> None:
        first = tx.next_offset(0)
        tx.append(0, log_rows(first, 3), fingerprint="ab12", ts_column="ts")

    def writer() -> None:
        for _ in range(10):
            Warehouse(warehouse.root).retrying("tx", add)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert offsets_of(warehouse.read("tx", 0)) == list(range(4 * 10 * 3))
    assert len(warehouse.segments("tx", 0)) == 40
