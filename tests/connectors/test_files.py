from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.avro import arrow_schema
from connectors.errors import InputFileError
from connectors.files import read_history as read_files


def read_history(path: Path, schema: pa.Schema) -> pa.Table:
    """The rows of every file read, all of which must be good."""
    files = read_files(path, schema, required=("user_id", "ts"))
    assert [f.rejected for f in files] == [()] * len(files)
    tables = [f.table for f in files]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


TS0 = 1_700_000_000_000_000  # 2023-11-14T22:13:20Z


@pytest.fixture
def schema(transaction_schema: dict[str, Any]) -> pa.Schema:
    return arrow_schema(transaction_schema)


def expected(schema: pa.Schema) -> pa.Table:
    return pa.table(
        {
            "user_id": ["u1", "u2", "u3"],
            "ts": pa.array([TS0, TS0 + 1_000, TS0 + 2_500_000])
            .cast(pa.timestamp("us", tz="UTC"))
            .cast(schema.field("ts").type),
            "amount": [10.5, None, 3.0],
            "merchant": ["m1", "m2", None],
            "channel": ["web", "pos", "app"],
            "is_fraud": [False, True, None],
        },
        schema=schema,
    )


def test_csv_with_iso_times_and_extra_columns(tmp_path: Path, schema: pa.Schema) -> None:
    path = tmp_path / "tx.csv"
    path.write_text(
        "extra,user_id,ts,amount,merchant,channel,is_fraud\n"
        "x,u1,2023-11-14T22:13:20Z,10.5,m1,web,false\n"
        "y,u2,2023-11-14 23:13:20.001+01:00,,m2,pos,true\n"
        "z,u3,2023-11-14T22:13:22.5,3.0,,app,\n"
    )
    assert read_history(path, schema).equals(expected(schema))


def test_csv_with_integer_epoch_times_in_the_schema_unit(
    tmp_path: Path,
    transaction_schema: dict[str, Any],
) -> None:
    millis = json.loads(json.dumps(transaction_schema).replace("micros", "millis"))
    schema = arrow_schema(millis)
    path = tmp_path / "tx.csv"
    path.write_text(
        "user_id,ts,amount,merchant,channel,is_fraud\n"
        f"u1,{TS0 // 1000},10.5,m1,web,false\n"
        f"u2,{TS0 // 1000 + 1},,m2,pos,true\n"
        f"u3,{TS0 // 1000 + 2500},3.0,,app,\n"
    )
    table = read_history(path, schema)
    assert table.schema.field("ts").type == pa.timestamp("ms", tz="UTC")
    assert table.equals(expected(schema))


def test_json_lines_with_integer_and_text_times(tmp_path: Path, schema: pa.Schema) -> None:
    rows = [
        {
            "user_id": "u1",
            "ts": TS0,
            "amount": 10.5,
            "merchant": "m1",
            "channel": "web",
            "is_fraud": False,
            "extra": {"nested": 1},
        },
        {"user_id": "u2", "ts": TS0 + 1000, "merchant": "m2", "channel": "pos", "is_fraud": True},
        {"user_id": "u3", "ts": TS0 + 2_500_000, "amount": 3, "channel": "app"},
    ]
    path = tmp_path / "tx.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert read_history(path, schema).equals(expected(schema))
    text = tmp_path / "tx_text.ndjson"
    rows[0]["ts"], rows[1]["ts"] = "2023-11-14T22:13:20Z", "2023-11-14T22:13:20.001Z"
    rows[2]["ts"] = "2023-11-14T22:13:22.500000+00:00"
    text.write_text("\n".join(json.dumps(r) for r in rows))
    assert read_history(text, schema).equals(expected(schema))


def test_parquet_with_naive_times_and_other_types(tmp_path: Path, schema: pa.Schema) -> None:
    source = expected(schema)
    table = source.set_column(1, "ts", source.column("ts").cast(pa.timestamp("ns")))
    table = table.set_column(2, "amount", pa.array([10.5, None, 3.0], pa.float32()))
    pq.write_table(table.append_column("extra", pa.array([1, 2, 3])), tmp_path / "tx.parquet")
    assert read_history(tmp_path / "tx.parquet", schema).equals(source)


def test_a_directory_is_its_files_in_name_order(tmp_path: Path, schema: pa.Schema) -> None:
    source = expected(schema)
    pq.write_table(source.slice(1), tmp_path / "b.parquet")
    pq.write_table(source.slice(0, 1), tmp_path / "a.parquet")
    (tmp_path / "notes.txt").write_text("ignored")
    assert read_history(tmp_path, schema).equals(source)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="holds no history file"):
        read_history(tmp_path / "empty", schema)


def test_a_missing_column_names_file_column_and_columns_found(
    tmp_path: Path, schema: pa.Schema
) -> None:
    path = tmp_path / "tx.csv"
    path.write_text("user_id,when,amount\nu1,2023-11-14T22:13:20Z,1.0\n")
    with pytest.raises(
        InputFileError,
        match=r"tx\.csv has no column 'ts' \(columns found: "
        r"\['user_id', 'when', 'amount'\]\)",
    ):
        read_history(path, schema)


def test_a_corrupt_parquet_file_names_the_file_and_the_cause(
    tmp_path: Path, schema: pa.Schema
) -> None:
    path = tmp_path / "tx.parquet"
    pq.write_table(expected(schema), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputFileError, match=r"tx\.parquet cannot be read: .*") as info:
        read_history(path, schema)
    assert isinstance(info.value.__cause__, pa.ArrowException)


def test_a_bad_value_is_a_dead_letter_naming_line_column_and_value(
    tmp_path: Path, schema: pa.Schema
) -> None:
    path = tmp_path / "tx.jsonl"
    bad = (
        b'{"user_id": "u1", "ts": "yesterday", "amount": 1, "merchant": null, '
        b'"channel": null, "is_fraud": null}'
    )
    good = b'{"user_id": "u2", "ts": "2023-11-14T22:13:20Z", "amount": 2}'
    path.write_bytes(good + b"\n" + bad + b"\n")
    [read] = read_files(path, schema, required=("user_id", "ts"))
    assert read.table.column("user_id").to_pylist() == ["u2"]
    [letter] = read.rejected
    assert letter.payload == bad
    assert "tx.jsonl line 2: column 'ts': value 'yesterday' cannot be read" in letter.reason


def test_unknown_extension_and_missing_file(tmp_path: Path, schema: pa.Schema) -> None:
    (tmp_path / "tx.xlsx").write_text("")
    with pytest.raises(InputFileError, match="unknown extension"):
        read_history(tmp_path / "tx.xlsx", schema)
    with pytest.raises(InputFileError, match="does not exist"):
        read_history(tmp_path / "nope.csv", schema)


def test_dead_letters_name_the_physical_line_past_blank_lines(
    tmp_path: Path, schema: pa.Schema
) -> None:
    good = b'{"user_id": "u1", "ts": "2023-11-14T22:13:20Z"}'
    bad = b'{"user_id": "u2", "ts": "never"}'
    (tmp_path / "tx.jsonl").write_bytes(b"\n".join([good, b"", b"   ", good, b"\r", bad]))
    csv_good, csv_bad = b"u1,2023-11-14T22:13:20Z", b"u2,never"
    header = b"user_id,ts,amount,merchant,channel,is_fraud"
    (tmp_path / "tx.csv").write_bytes(
        b"\n".join([header.replace(b",amount,merchant,channel,is_fraud", b""), csv_good, b""])
        + b"\n"
        + b"\n".join([csv_good, b"u3", csv_bad])
    )
    for name, line, payload in (("tx.jsonl", 6, bad), ("tx.csv", 6, csv_bad)):
        [read] = read_files(tmp_path / name, schema.remove(5).remove(4).remove(3).remove(2))
        assert read.table.num_rows == 2
        assert read.rejected[-1].payload == payload
        assert f"{name} line {line}: column 'ts'" in read.rejected[-1].reason


@pytest.mark.parametrize("codec", ["gzip", "zstd", "bz2"])
def test_compressed_data_is_read_whatever_its_name(
    tmp_path: Path, schema: pa.Schema, codec: str
) -> None:
    text = "\n".join(
        json.dumps({**r, "ts": int(r["ts"].timestamp() * 1_000_000)})
        for r in expected(schema).to_pylist()
    ).encode()
    packed = pa.compress(text, codec, asbytes=True) if codec == "zstd" else None
    if codec == "gzip":
        packed = gzip.compress(text)
    if codec == "bz2":
        packed = bz2.compress(text)
    assert packed is not None
    (tmp_path / "tx.jsonl").write_bytes(packed)
    assert read_history(tmp_path / "tx.jsonl", schema).equals(expected(schema))
