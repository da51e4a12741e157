"""One reading rule for every input format, and every input row accounted for: rows in = rows
in the log + dead letters (each with a reason naming the file and line or row, and the original
record). Real files through the real `flows.ingest` command."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.deadletters import read_dead_letters
from connectors.segments import Warehouse
from flows.ingest import ingest_table
from flows.spec import load_definitions
from tests.adversarial.ingest_helpers import TS0, log_amounts, log_table, project
from tests.helpers import run_command

ISO = "2026-05-28T20:26:40Z"

# Rows of every kind, as (JSON line, CSV line); None where a format cannot express the row.
GOOD = [
    (b'{"user_id": "00123", "ts": "%s", "amount": 1.5, "channel": "web"}', b"00123,%s,1.5,web"),
    (b'{"user_id": "u2", "ts": "%s", "amount": null, "channel": null}', b"u2,%s,,"),
    (b'{"user_id": "u3", "ts": "%s", "amount": "2.5", "channel": "NA"}', b"u3,%s,2.5,NA"),
    (b'{"user_id": "u4", "ts": "%s", "amount": NaN, "channel": "app"}', b"u4,%s,nan,app"),
    (b'{"user_id": "u5", "ts": "%s", "amount": Infinity, "channel": "x"}', b"u5,%s,inf,x"),
    (b'{"user_id": "u6", "ts": "%s", "amount": -Infinity, "channel": "y"}', b"u6,%s,-inf,y"),
    (b'{"user_id": "u7", "ts": "%s", "amount": 3, "channel": "NULL"}', b"u7,%s,N/A,NULL"),
]
BAD = [
    (b'{"user_id": "u8", "ts": "%s", "amount": 1, "channel": "m\xff"}', b"u8,%s,1,m\xff"),
    (b'{"user_id": null, "ts": "%s", "amount": 1, "channel": "web"}', b",%s,1,web"),
    (b'{"user_id": "u9", "ts": "yesterday", "amount": 1, "channel": "web"}', None),
    (b'{"user_id": "u10", "ts": "%s", "amount": "abc", "channel": "web"}', b"u10,%s,abc,web"),
    (b"[1, 2, 3]", b"u11,%s"),
    (b'{"user_id": "u12", "ts": "%s", "amount": {"a": 1}}', b"u12,yesterday,1,web"),
]


def lines(column: int) -> tuple[list[bytes], list[bytes]]:
    good = [row[column].replace(b"%s", ISO.encode()) for row in GOOD]
    given = [row[column] for row in BAD]
    bad = [line.replace(b"%s", ISO.encode()) for line in given if line is not None]
    return good, bad


def parquet_rows() -> tuple[pa.Table, int]:
    """Good and bad rows as Parquet (bad: null key, invalid UTF-8 text); the bad count."""
    amounts = [1.5, None, 2.5, math.nan, math.inf, -math.inf, 3.0, 1.0, 1.0]
    texts = [b"web", None, b"NA", b"app", b"x", b"y", b"NULL", b"m\xff", b"web"]
    users = ["00123", "u2", "u3", "u4", "u5", "u6", "u7", "u8", None]
    table = pa.table(
        {
            "user_id": pa.array(users),
            "ts": pa.array([TS0] * 9, pa.timestamp("us", tz="UTC")),
            "amount": pa.array(amounts),
            "channel": pa.array(texts, pa.binary()).cast(pa.string(), safe=False),
        }
    )
    return table, 2


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "csv.gz-named-csv"])
def test_every_row_is_in_the_log_or_a_dead_letter_with_its_original_record(
    tmp_path: Path, fmt: str
) -> None:
    warehouse, common = project(tmp_path)
    if fmt == "parquet":
        table, n_bad = parquet_rows()
        path = tmp_path / "in.parquet"
        pq.write_table(table, path)
        n_in = table.num_rows
    else:
        good, bad = lines(1 if fmt.startswith("csv") else 0)
        body = [b"user_id,ts,amount,channel"] if fmt.startswith("csv") else []
        data = b"\n".join([*body, *good, b"", *bad]) + b"\n"
        path = tmp_path / ("in.csv" if fmt.startswith("csv") else "in.jsonl")
        path.write_bytes(gzip.compress(data) if fmt.endswith("named-csv") else data)
        n_in, n_bad = len(good) + len(bad), len(bad)
    done = run_command("flows.ingest", *common, str(path))
    assert done.returncode == 0, done.stderr
    n_out = len(log_amounts(warehouse))
    letters = read_dead_letters(warehouse, "txns").to_pylist()
    assert (n_out, len(letters), n_out + len(letters)) == (n_in - n_bad, n_bad, n_in)
    assert f"{n_in:,} rows read, {n_in - n_bad:,} written, {n_bad} dead letters" in done.stdout
    assert "3 non-finite values read as null in column 'amount'" in done.stdout
    for letter in letters:
        assert f"history file {path}" in letter["reason"]
        assert (" line " if fmt != "parquet" else " row ") in letter["reason"]
    if fmt != "parquet":
        assert sorted(d["payload"] for d in letters) == sorted(bad)
    check_log(log_table(warehouse))


def check_log(log: pa.Table) -> None:
    """The rule: keys keep their text, non-finite numbers are null, only empty CSV cells or
    JSON nulls are null strings, and every string is valid UTF-8."""
    log.validate(full=True)
    by_key = {r["user_id"]: r for r in log.to_pylist()}
    assert "00123" in by_key
    assert by_key["u3"]["channel"] == "NA"
    assert by_key["u7"]["channel"] == "NULL"
    for key in ("u2", "u4", "u5", "u6"):
        assert by_key[key]["amount"] is None
    assert by_key["u7"]["amount"] in (3.0, None)  # CSV N/A is a null spelling for numbers


def test_json_dead_letter_for_a_null_key_keeps_the_original_line(tmp_path: Path) -> None:
    warehouse, common = project(tmp_path)
    line = b'{"user_id": null, "ts": 1780000000000000, "amount": 1, "channel": "NA"}'
    (tmp_path / "in.jsonl").write_bytes(line + b"\n")
    done = run_command("flows.ingest", *common, str(tmp_path / "in.jsonl"))
    assert done.returncode == 0, done.stderr
    [letter] = read_dead_letters(warehouse, "txns").to_pylist()
    assert letter["payload"] == line
    assert "line 1: column 'user_id' is null" in letter["reason"]


def test_parquet_dead_letter_renders_the_row_with_its_original_key(tmp_path: Path) -> None:
    warehouse, common = project(tmp_path)
    table = pa.table(
        {
            "user_id": pa.array([b"00\xff7"], pa.binary()).cast(pa.string(), safe=False),
            "ts": pa.array([TS0], pa.timestamp("us", tz="UTC")),
            "amount": [1.0],
            "channel": ["web"],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    done = run_command("flows.ingest", *common, str(tmp_path / "in.parquet"))
    assert done.returncode == 0, done.stderr
    [letter] = read_dead_letters(warehouse, "txns").to_pylist()
    assert orjson.loads(letter["payload"])["user_id"] == "00\\xff7"
    assert "row 1: column 'user_id' holds text that is not valid UTF-8" in letter["reason"]


def test_epoch_seconds_for_a_micros_field_are_refused_unless_the_unit_is_given(
    tmp_path: Path,
) -> None:
    warehouse, common = project(tmp_path)
    seconds = TS0 // 1_000_000
    (tmp_path / "in.csv").write_text(f"user_id,ts,amount,channel\nu1,{seconds},1.0,web\n")
    refused = run_command("flows.ingest", *common, str(tmp_path / "in.csv"))
    assert refused.returncode == 2
    assert f"column 'ts' holds integer times like {seconds}" in refused.stderr
    assert "read in us are outside the years 1980-2300" in refused.stderr
    assert "--time-unit s" in refused.stderr
    assert log_amounts(warehouse) == []
    given = run_command("flows.ingest", *common, "--time-unit", "s", str(tmp_path / "in.csv"))
    assert given.returncode == 0, given.stderr
    assert log_table(warehouse).column("ts").cast(pa.int64()).to_pylist() == [TS0]


def test_iso_times_with_nanoseconds_are_truncated_to_the_field_unit(tmp_path: Path) -> None:
    warehouse, common = project(tmp_path)
    rows = [
        {"user_id": "u1", "ts": "2024-01-01T00:00:00.123456789Z", "amount": 1, "channel": None},
        {
            "user_id": "u2",
            "ts": "2024-01-01T01:00:00.987654321+01:00",
            "amount": 2,
            "channel": None,
        },
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    done = run_command("flows.ingest", *common, str(tmp_path / "in.jsonl"))
    assert done.returncode == 0, done.stderr
    times = log_table(warehouse).sort_by("user_id").column("ts").cast(pa.int64()).to_pylist()
    assert times == [1_704_067_200_123_456, 1_704_067_200_987_654]


def test_ingest_table_from_python_applies_the_same_rule(tmp_path: Path) -> None:
    features = project(tmp_path)[1][1]
    source = load_definitions(features).sources["txns"]
    table = pa.table(
        {
            "user_id": ["u1", None, "u3", "u4"],
            "ts": pa.array([TS0] * 4, pa.timestamp("us", tz="UTC")),
            "amount": [math.nan, 1.0, math.inf, 2.0],
            "channel": ["web"] * 4,
        }
    )
    report = ingest_table(source, table, Warehouse(tmp_path / "wh"))
    assert (report.rows_read, report.rows, report.dead_letters) == (4, 3, 1)
    assert report.non_finite == {"amount": 2}
    assert log_amounts(tmp_path / "wh") == [2.0, None, None]
    [letter] = read_dead_letters(tmp_path / "wh", "txns").to_pylist()
    assert orjson.loads(letter["payload"])["amount"] == 1.0
