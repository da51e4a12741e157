"""No record that reaches the dataflow can stop it or poison its partition: an event 50 years
ahead (issue 14 item 3), text that is not UTF-8 in a segment, a record the view's transform
fails on (issue 8 item 3). Each becomes a dead letter with its reason; everything else is
applied, and the accounting holds: records in the log = applied + late + dead letters."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from connectors.avro import fingerprint_hex
from connectors.deadletters import read_dead_letters
from connectors.envelope import OFFSET
from connectors.log import LogBatch
from connectors.segments import Warehouse
from flows.aggregate import prepare
from flows.errors import DefinitionError
from flows.ingest import ingest_table
from flows.snapshot import read_log
from flows.spec import load_definitions
from flows.validate import EventRules, validate
from state.client import FeatureClient
from tests.helpers import DAY, MINUTE, make_events, run_command, write_definitions
from tests.oracle import mismatches, oracle_values

FIFTY_YEARS = 50 * 365 * DAY


def _run(features: Path, tmp: Path, *extra: str) -> str:
    result = run_command(
        "flows.run",
        *("--features", str(features), "--warehouse", str(tmp / "wh")),
        *("--state", str(tmp / "state"), "--until-caught-up", *extra),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _check_views(features: Path, tmp: Path, events: pa.Table) -> None:
    """Every view equals the oracle over `events`, which must be what the log holds once its
    dead letters are taken out."""
    defs = load_definitions(features)
    log = pa.concat_tables(read_log(defs.sources["txns"], Warehouse(tmp / "wh"), None))
    assert log.num_rows == events.num_rows
    keys = sorted(set(events.column("user_id").to_pylist()))
    t = int(events.column("ts").cast(pa.int64()).to_numpy().max()) + 5 * MINUTE
    spine = pa.table({"row": range(len(keys)), "k": keys, "t": [t] * len(keys)})
    with FeatureClient(tmp / "state") as client:
        for name in ("spend", "channels"):
            expected = oracle_values(defs.layouts[name], log, spine)
            assert (
                mismatches(defs.layouts[name], expected, client.get_many(name, keys, t / 1e6)) == []
            )


@pytest.mark.parametrize("workers", [1, 2])
def test_an_event_from_the_far_future_is_a_dead_letter_not_a_watermark(
    tmp_path: Path, workers: int
) -> None:
    features = write_definitions(tmp_path / "defs", partitions=3)
    source = load_definitions(features).sources["txns"]
    events = make_events(3000, 30, seed=5)
    future = events.slice(0, 1).to_pylist()[0]
    future["ts"] = datetime.fromtimestamp(
        (events.column("ts")[0].value + FIFTY_YEARS) / 1e6, tz=UTC
    )
    # The future event comes first in its partition's log: every later event would look late.
    log = pa.concat_tables([pa.Table.from_pylist([future], schema=events.schema), events])
    ingest_table(source, log, Warehouse(tmp_path / "wh"), keep_order=True)

    out = _run(features, tmp_path, "--workers", str(workers))
    for part in ("applied 3,000 events", "late 0;", "dead letters 1"):
        assert part in out, out
    _check_views(features, tmp_path, events)
    letters = read_dead_letters(tmp_path / "wh", "txns")
    reasons = letters.column("reason").to_pylist()
    assert len(reasons) == 1, reasons
    assert "max_future" in reasons[0], reasons


def test_validate_applies_the_source_time_bounds() -> None:
    ts = pa.array([0, 1_700_000_000_000_000, 1_700_000_000_000_000 + 3_600_000_000], pa.int64())
    events = pa.table(
        {
            "user_id": ["a", "b", "c"],
            "ts": ts.cast(pa.timestamp("us", tz="UTC")),
            "_offset": pa.array([0, 1, 2], pa.int64()),
            "_arrival": pa.array([1_700_000_000_000_000] * 3, pa.int64()).cast(
                pa.timestamp("us", tz="UTC")
            ),
        }
    )
    rules = EventRules("s", "user_id", "ts", max_future_us=5 * MINUTE, min_time_us=1)
    checked = validate(LogBatch("s", 0, events, (), 3), rules)
    assert checked.events.column("user_id").to_pylist() == ["b"]
    reasons = {d.offset: d.reason for d in checked.dead_letters}
    assert "min_time" in reasons[0]
    assert "max_future" in reasons[2]


def test_text_that_is_not_utf8_in_a_segment_is_a_dead_letter(tmp_path: Path) -> None:
    features = write_definitions(tmp_path / "defs", partitions=1)
    source = load_definitions(features).sources["txns"]
    events = make_events(500, 10, seed=9)
    wh = Warehouse(tmp_path / "wh")
    ingest_table(source, events, wh)
    # A segment written by another tool: one channel holds bytes that are not UTF-8.
    bad = events.slice(events.num_rows - 3)
    raw = pa.array([b"web", b"p\xffs", b"app"], pa.binary()).view(pa.string())
    bad = bad.set_column(bad.column_names.index("channel"), "channel", raw)
    n = wh.next_offset("txns", 0)
    bad = bad.append_column("_offset", pa.array(np.arange(n, n + 3), pa.int64()))
    bad = bad.append_column("_partition", pa.array([0, 0, 0], pa.int32()))
    bad = bad.append_column("_arrival", bad.column("ts").cast(pa.timestamp("us", tz="UTC")))
    wh.append("txns", 0, bad, fingerprint=fingerprint_hex(source.avro_schema()), ts_column="ts")
    out = _run(features, tmp_path)
    assert "applied 502 events" in out, out
    assert "dead letters 1" in out, out
    letters = read_dead_letters(tmp_path / "wh", "txns")
    assert letters.num_rows == 1
    assert "UTF-8" in letters.column("reason")[0].as_py()
    record = orjson.loads(letters.column("payload")[0].as_py())
    assert record["channel"] == "p\\xffs"  # the original bytes, escaped


TRANSFORM = """

def explode_on_1337(table):
    import pyarrow.compute as pc
    if pc.any(pc.equal(table.column("amount"), -13.37)).as_py():
        raise ValueError("a negative amount is cursed")
    return table

cursed = FeatureView(name="cursed", source=txns, transform=explode_on_1337,
                     features=[count(), sum("amount", window="1d")])
"""


# 12k events: batches of more than BULK_COMMIT_KEYS events, whose blobs stream into an SST
# file; the failed first attempt's file is dropped and the bisection's blobs are committed
@pytest.mark.parametrize("n", [4000, 12_000])
def test_a_record_the_transform_fails_on_is_a_dead_letter(tmp_path: Path, n: int) -> None:
    features = write_definitions(tmp_path / "defs", partitions=2)
    features.write_text(features.read_text() + TRANSFORM)
    source = load_definitions(features).sources["txns"]
    events = make_events(n, 40, seed=12)
    cursed = np.zeros(events.num_rows, dtype=bool)
    cursed[[10, n // 2 - 1, n - 2]] = True
    amount = pc.if_else(pa.array(cursed), -13.37, events.column("amount"))
    events = events.set_column(events.column_names.index("amount"), "amount", amount)
    ingest_table(source, events, Warehouse(tmp_path / "wh"))

    out = _run(features, tmp_path, "--views", "cursed,spend")
    for part in (f"cursed {n - 3:,}", f"spend {n:,}", "dead letters 3"):
        assert part in out, out
    letters = read_dead_letters(tmp_path / "wh", "txns")
    assert letters.num_rows == 3
    assert all("cursed" in r for r in letters.column("reason").to_pylist())
    keys = sorted(set(events.column("user_id").to_pylist()))
    t = int(events.column("ts").cast(pa.int64()).to_numpy().max()) + MINUTE
    with FeatureClient(tmp_path / "state") as client:
        rows = client.get_many("cursed", keys, at=t / 1e6)
    assert sum(r["count"] for r in rows) == n - 3
    assert not list((tmp_path / "state").rglob("*.ingest-*.sst"))


def test_a_transform_that_fails_on_everything_stops_the_flow_clearly(tmp_path: Path) -> None:
    features = write_definitions(tmp_path / "defs", partitions=1)
    features.write_text(
        features.read_text() + TRANSFORM.replace("-13.37)", "table.column('amount'))")
    )
    source = load_definitions(features).sources["txns"]
    ingest_table(source, make_events(1000, 10, seed=1), Warehouse(tmp_path / "wh"))
    result = run_command(
        "flows.run",
        *("--features", str(features), "--warehouse", str(tmp_path / "wh")),
        *("--state", str(tmp_path / "state"), "--until-caught-up", "--views", "cursed"),
    )
    assert result.returncode != 0
    assert "bug in the view's transform" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_every_record_of_the_log_is_applied_late_or_a_dead_letter(tmp_path: Path) -> None:
    """Accounting over a log that mixes good records, late ones and bad ones: records read =
    records in the log = applied + late + dead letters, per view."""
    features = write_definitions(tmp_path / "defs", partitions=2)
    source = load_definitions(features).sources["txns"]
    events = make_events(4000, 30, seed=17)
    newest = int(events.column("ts").cast(pa.int64()).to_numpy().max())
    rows = events.to_pylist()
    for i, row in enumerate(rows[-300:]):
        if i % 3 == 0:  # far behind the watermark: late for the "channels" view (1d + 1h)
            row["ts"] = datetime.fromtimestamp((newest - 5 * DAY) / 1e6, tz=UTC)
        elif i % 3 == 1:  # far ahead of its arrival: a dead letter
            row["ts"] = datetime.fromtimestamp((newest + FIFTY_YEARS) / 1e6, tz=UTC)
    log = pa.Table.from_pylist(rows, schema=events.schema)
    ingest_table(source, log, Warehouse(tmp_path / "wh"), keep_order=True)

    out = _run(features, tmp_path, "--views", "channels")
    summary = next(line for line in out.splitlines() if line.startswith("done: "))
    numbers = {
        name: int(value.replace(",", ""))
        for name, value in re.findall(r"(applied|read|late|dead letters) ([\d,]+)", summary)
    }
    read = int(re.search(r"from ([\d,]+) records read", summary)[1].replace(",", ""))  # type: ignore[index]
    assert read == log.num_rows, summary
    assert numbers["applied"] + numbers["late"] + numbers["dead letters"] == read, summary
    assert numbers["late"] == 100
    assert numbers["dead letters"] == 100


BROKEN_TRANSFORM = """

def forgets_to_return(table):
    import pyarrow.compute as pc
    table.filter(pc.greater(table.column("amount"), 0))

broken = FeatureView(name="broken", source=txns, transform=forgets_to_return,
                     features=[count(), sum("amount", window="1d")])
"""


def test_prepare_names_the_view_of_a_transform_that_breaks_its_contract(tmp_path: Path) -> None:
    features = write_definitions(tmp_path / "defs", partitions=1)
    features.write_text(features.read_text() + BROKEN_TRANSFORM)
    layout = load_definitions(features).layouts["broken"]
    events = make_events(20, 3, seed=4).append_column(OFFSET, pa.array(range(20), pa.int64()))
    with pytest.raises(DefinitionError, match=r"view 'broken': transform returned NoneType"):
        prepare(events, layout, lambda table: None)
    with pytest.raises(DefinitionError, match=r"view 'broken': transform output lacks .*'ts'"):
        prepare(events, layout, lambda table: table.drop_columns(["ts"]))


@pytest.mark.parametrize("command", ["flows.run", "flows.snapshot"])
def test_a_transform_that_returns_no_table_is_one_clear_line(tmp_path: Path, command: str) -> None:
    features = write_definitions(tmp_path / "defs", partitions=1)
    features.write_text(features.read_text() + BROKEN_TRANSFORM)
    source = load_definitions(features).sources["txns"]
    events = make_events(50, 5, seed=3)
    ingest_table(source, events, Warehouse(tmp_path / "wh"))
    common = ("--features", str(features), "--warehouse", str(tmp_path / "wh"), "--views", "broken")
    if command == "flows.run":
        extra: tuple[str, ...] = ("--state", str(tmp_path / "state"), "--until-caught-up")
    else:
        spine = events.select(["user_id", "ts"]).slice(0, 5)
        pq.write_table(spine, tmp_path / "spine.parquet")
        extra = ("--spine", str(tmp_path / "spine.parquet"), "--out", str(tmp_path / "o.parquet"))
    result = run_command(command, *common, *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: view 'broken': transform returned NoneType; it must return a pyarrow.Table"
    ], result.stderr
