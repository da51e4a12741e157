from __future__ import annotations

import io
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from fastavro import parse_schema, schemaless_writer
from fastavro.schema import fingerprint as fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.avro import (
    MARKER,
    SchemaStore,
    arrow_schema,
    decode_batch,
    encode_single_object,
    fingerprint,
    fingerprint_bytes,
    fingerprint_hex,
    load_schema,
    read_schema,
)
from connectors.errors import DecodeError, SchemaError
from tests.connectors.avro_oracle import decode_one

# The connectors' own copy of a card-transaction schema (not the shipped example's, which grows
# with the example).
SCHEMA_FILE = Path(__file__).resolve().parent / "transaction.avsc"
TS0 = 1_700_000_000_000_000
Records = Callable[[int], list[dict[str, Any]]]

# From the Avro specification's share/test/data/schema-tests.txt (fingerprints are Java longs;
# test 026's default "true" is made a JSON true, which fastavro requires: defaults are not part
# of the canonical form, so the fingerprint is the same).
AVRO_SPEC_FINGERPRINTS = [
    ('"null"', 7195948357588979594),
    ('"int"', 8247732601305521295),
    ('"string"', -8142146995180207161),
    ('[ "int" , {"type":"boolean"} ]', 5392556393470105090),
    ('{"fields":[], "type":"record", "name":"foo", "namespace":"x.y"}', 5916914534497305771),
    (
        '{ "fields":[{"type":"boolean", "aliases":[], "name":"f1", "default":true},'
        '{"order":"descending","name":"f2","doc":"Hello","type":"int"}],'
        '"type":"record", "name":"foo"}',
        -4860222112080293046,
    ),
    (
        '{"namespace":"x.y.z", "type":"enum", "name":"foo", "doc":"foo bar", '
        '"symbols":["A1", "A2"]}',
        -4448647247586288245,
    ),
]


def record(fields: list[dict[str, Any]], name: str = "R") -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": fields}


def as_us(value: datetime) -> int:
    return (value - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def batch_rows(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    """Rows of a decoded batch with timestamps as int µs, as `SchemaStore.decode` gives them."""
    columns = {}
    for field, column in zip(batch.schema, batch.columns, strict=True):
        if pa.types.is_timestamp(field.type):
            column = column.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        columns[field.name] = column
    rows: list[dict[str, Any]] = pa.table(columns).to_pylist()
    return rows


# --- schemas ------------------------------------------------------------------------------


def test_arrow_schema_maps_every_supported_type() -> None:
    schema = record(
        [
            {"name": "b", "type": "boolean"},
            {"name": "i", "type": "int"},
            {"name": "l", "type": "long"},
            {"name": "f", "type": "float"},
            {"name": "d", "type": "double"},
            {"name": "s", "type": "string"},
            {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B"]}},
            {"name": "y", "type": "bytes"},
            {"name": "ms", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
            {"name": "n", "type": ["null", "double"], "default": None},
            {"name": "m", "type": ["string", "null"]},
            {"name": "date", "type": {"type": "int", "logicalType": "date"}},
        ]
    )
    expected = pa.schema(
        [
            ("b", pa.bool_()),
            ("i", pa.int32()),
            ("l", pa.int64()),
            ("f", pa.float32()),
            ("d", pa.float64()),
            ("s", pa.string()),
            ("e", pa.string()),
            ("y", pa.binary()),
            ("ms", pa.timestamp("ms", tz="UTC")),
            ("us", pa.timestamp("us", tz="UTC")),
            ("n", pa.float64()),
            ("m", pa.string()),
            ("date", pa.int32()),
        ]
    )
    assert arrow_schema(schema) == expected


@pytest.mark.parametrize(
    "avro_type",
    [
        {"type": "array", "items": "int"},
        {"type": "map", "values": "int"},
        {"type": "fixed", "name": "F", "size": 4},
        {"type": "record", "name": "Inner", "fields": []},
        ["null", "int", "string"],
        ["int", "string"],
    ],
)
def test_arrow_schema_refuses_nested_types_naming_the_field(avro_type: Any) -> None:
    with pytest.raises(SchemaError, match="field 'nested'"):
        arrow_schema(record([{"name": "ok", "type": "int"}, {"name": "nested", "type": avro_type}]))


def test_load_schema_explains_invalid_schemas() -> None:
    with pytest.raises(SchemaError, match="not a valid Avro schema"):
        load_schema(record([{"name": "x", "type": "no-such-type"}]))
    with pytest.raises(SchemaError, match="not an Avro record"):
        load_schema({"type": "enum", "name": "E", "symbols": ["A"]})


def test_read_schema_reads_the_example_and_explains_bad_files(tmp_path: Path) -> None:
    assert read_schema(SCHEMA_FILE)["name"] == "Transaction"
    bad = tmp_path / "bad.avsc"
    bad.write_text("{not json")
    with pytest.raises(SchemaError, match=r"bad\.avsc"):
        read_schema(bad)


# --- fingerprints ----------------------------------------------------------------------------


@pytest.mark.parametrize(("schema_json", "java_fingerprint"), AVRO_SPEC_FINGERPRINTS)
def test_fingerprint_matches_the_avro_specification(
    schema_json: str, java_fingerprint: int
) -> None:
    schema = json.loads(schema_json)
    assert fingerprint(schema) == java_fingerprint % 2**64
    assert fingerprint_bytes(schema) == (java_fingerprint % 2**64).to_bytes(8, "little")


def test_fingerprint_agrees_with_fastavro_and_ignores_logical_types(
    transaction_schema: dict[str, Any],
) -> None:
    canonical = to_parsing_canonical_form(transaction_schema)
    assert fingerprint_hex(transaction_schema) == fastavro_fingerprint(canonical, "CRC-64-AVRO")
    plain = json.loads(
        json.dumps(transaction_schema).replace(
            '{"type": "long", "logicalType": "timestamp-micros"}', '"long"'
        )
    )
    assert plain != transaction_schema
    assert fingerprint(plain) == fingerprint(transaction_schema)


# --- single-object encoding --------------------------------------------------------------------


def test_payload_is_marker_fingerprint_then_the_binary_record(
    transaction_schema: dict[str, Any], transactions: Records
) -> None:
    rec = transactions(1)[0]
    payload = encode_single_object(rec, transaction_schema)
    body = io.BytesIO()
    schemaless_writer(body, parse_schema(transaction_schema), rec)
    assert payload == MARKER + fingerprint_bytes(transaction_schema) + body.getvalue()


_optional_text = st.one_of(st.none(), st.text(max_size=30))
_transaction = st.fixed_dictionaries(
    {
        "user_id": st.text(max_size=30),
        "ts": st.integers(-(2**62), 2**62),
        "amount": st.one_of(st.none(), st.floats(allow_nan=False)),
        "merchant": _optional_text,
        "channel": _optional_text,
        "is_fraud": st.one_of(st.none(), st.booleans()),
    }
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_transaction, max_size=30))
def test_records_round_trip_one_by_one_and_as_a_batch(
    transaction_schema: dict[str, Any], records: list[dict[str, Any]]
) -> None:
    store = SchemaStore(transaction_schema)
    payloads = [encode_single_object(r, transaction_schema) for r in records]
    assert [decode_one(store, p) for p in payloads] == records
    batch, failures = decode_batch(store, payloads, arrow_schema(transaction_schema))
    assert failures == []
    assert batch.schema == arrow_schema(transaction_schema)
    assert batch_rows(batch) == records


def test_millisecond_timestamps_are_microseconds_inside(
    transaction_schema: dict[str, Any],
) -> None:
    schema = json.loads(
        json.dumps(transaction_schema).replace("timestamp-micros", "timestamp-millis")
    )
    store = SchemaStore(schema)
    at = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)
    payloads = [encode_single_object({"user_id": "u", "ts": ts}, schema) for ts in (TS0 + 999, at)]
    assert [decode_one(store, p)["ts"] for p in payloads] == [TS0, as_us(at) // 1000 * 1000]
    batch, _ = decode_batch(store, payloads, arrow_schema(schema))
    assert batch.schema.field("ts").type == pa.timestamp("ms", tz="UTC")
    assert batch.column("ts").cast(pa.int64()).to_pylist() == [TS0 // 1000, as_us(at) // 1000]


def test_encoding_refuses_records_that_do_not_fit(transaction_schema: dict[str, Any]) -> None:
    with pytest.raises(SchemaError, match="naive datetime"):
        encode_single_object({"user_id": "u", "ts": datetime(2024, 1, 1)}, transaction_schema)
    with pytest.raises(SchemaError, match="does not match schema 'Transaction'"):
        encode_single_object({"user_id": "u", "ts": 1, "amount": "lots"}, transaction_schema)


# --- schema store and evolution -------------------------------------------------------------

V1 = record(
    [
        {"name": "user_id", "type": "string"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "amount", "type": ["null", "float"], "default": None},
        {"name": "count", "type": "int"},
        {"name": "legacy", "type": "string"},
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["A", "B", "C"]}},
    ],
    name="Transaction",
)
V2 = record(
    [
        {"name": "user_id", "type": "string"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "amount", "type": ["null", "double"], "default": None},
        {"name": "count", "type": "long"},
        {
            "name": "kind",
            "type": {"type": "enum", "name": "Kind", "symbols": ["A", "B"], "default": "A"},
        },
        {"name": "currency", "type": "string", "default": "EUR"},
        {"name": "note", "type": ["null", "string"], "default": None},
    ],
    name="Transaction",
)


def test_old_and_new_versions_decode_to_the_new_schema() -> None:
    store = SchemaStore(V2, [V1])
    old = encode_single_object(
        {
            "user_id": "u1",
            "ts": TS0 + 1234,
            "amount": 2.5,
            "count": 7,
            "legacy": "gone",
            "kind": "C",
        },
        V1,
    )
    new = encode_single_object(
        {
            "user_id": "u2",
            "ts": TS0 + 1234,
            "amount": 0.1,
            "count": 2**40,
            "kind": "B",
            "currency": "USD",
            "note": "hi",
        },
        V2,
    )
    expected_old = {
        "user_id": "u1",
        "ts": TS0 + 1000,
        "amount": 2.5,
        "count": 7,
        "kind": "A",
        "currency": "EUR",
        "note": None,
    }
    expected_new = {
        "user_id": "u2",
        "ts": TS0 + 1234,
        "amount": 0.1,
        "count": 2**40,
        "kind": "B",
        "currency": "USD",
        "note": "hi",
    }
    assert decode_one(store, old) == expected_old
    assert decode_one(store, new) == expected_new
    batch, failures = decode_batch(store, [new, old, new], arrow_schema(V2))
    assert failures == []
    assert batch_rows(batch) == [expected_new, expected_old, expected_new]


def test_store_refuses_a_writer_the_reader_cannot_read() -> None:
    bad = {**V2, "fields": [*V2["fields"], {"name": "region", "type": "string"}]}
    with pytest.raises(SchemaError, match="'region' was added without a default"):
        SchemaStore(bad, [V1])


def test_unknown_writer_schema_is_a_decode_error() -> None:
    store = SchemaStore(V2)  # V1 not registered
    payload = encode_single_object(
        {"user_id": "u", "ts": 1, "count": 1, "legacy": "", "kind": "A"}, V1
    )
    with pytest.raises(
        DecodeError, match=f"unknown writer schema fingerprint {fingerprint_hex(V1)}"
    ):
        decode_one(store, payload)


# --- batches with bad payloads ------------------------------------------------------------------


def test_bad_payloads_are_reported_not_raised(
    transaction_schema: dict[str, Any], transactions: Records
) -> None:
    store = SchemaStore(transaction_schema)
    records = transactions(8)
    payloads = [encode_single_object(r, transaction_schema) for r in records]
    good = payloads[0]
    payloads[1] = b'{"user_id": "u1"}'  # JSON, not Avro
    payloads[3] = good[:-2]  # truncated
    payloads[4] = good + b"\x00"  # trailing byte
    payloads[5] = MARKER + bytes(8) + good[10:]  # unknown fingerprint
    payloads[6] = good[:10] + b"\x06\xff\xfe\xfd" + good[14:]  # invalid UTF-8 in user_id
    payloads.append(b"")  # empty
    batch, failures = decode_batch(store, payloads, arrow_schema(transaction_schema))
    assert [i for i, _ in failures] == [1, 3, 4, 5, 6, 8]
    reasons = dict(failures)
    assert "not the Avro single-object marker" in reasons[1]
    assert "truncated" in reasons[3]
    assert "left over" in reasons[4]
    assert "unknown writer schema fingerprint" in reasons[5]
    assert "invalid UTF-8" in reasons[6]
    assert "shorter than the 10-byte" in reasons[8]
    assert batch_rows(batch) == [records[0], records[2], records[7]]
    for i in (1, 3, 4, 5, 6, 8):
        with pytest.raises(DecodeError):
            decode_one(store, payloads[i])


def test_an_empty_batch_has_the_source_columns(transaction_schema: dict[str, Any]) -> None:
    schema = arrow_schema(transaction_schema)
    batch, failures = decode_batch(SchemaStore(transaction_schema), [], schema)
    assert (batch.num_rows, batch.schema, failures) == (0, schema, [])


def test_decode_batch_refuses_columns_the_reader_lacks(
    transaction_schema: dict[str, Any],
) -> None:
    schema = arrow_schema(transaction_schema).append(pa.field("extra", pa.int64()))
    with pytest.raises(SchemaError, match="'extra'"):
        decode_batch(SchemaStore(transaction_schema), [], schema)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_corrupted_payloads_agree_with_fastavro(
    transaction_schema: dict[str, Any],
    transactions: Records,
    data: st.DataObject,
) -> None:
    """Whatever the batch decoder accepts, fastavro decodes to the same record; whatever
    fastavro refuses, the batch decoder refuses too."""
    store = SchemaStore(transaction_schema)
    payloads = [encode_single_object(r, transaction_schema) for r in transactions(6)]
    for i in range(len(payloads)):
        raw = bytearray(payloads[i])
        for _ in range(data.draw(st.integers(0, 3))):
            at = data.draw(st.integers(10, len(raw) - 1))
            raw[at] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(10, len(raw)))
        payloads[i] = bytes(raw[:cut]) + data.draw(st.binary(max_size=3))
    batch, failures = decode_batch(store, payloads, arrow_schema(transaction_schema))
    failed = {i for i, _ in failures}
    accepted = [i for i in range(len(payloads)) if i not in failed]
    assert batch_rows(batch) == [decode_one(store, payloads[i]) for i in accepted]
    for i in failed:
        try:
            decode_one(store, payloads[i])
        except DecodeError:
            continue
        # Stricter than fastavro is allowed only for overlong varints, non-0/1 booleans and
        # negative union branch indexes (fastavro reads -1 as the last branch).
        allowed = ("varint longer", "boolean byte", "union branch")
        assert any(why in dict(failures)[i] for why in allowed), dict(failures)[i]


def test_duplicated_field_name_is_refused_naming_it() -> None:
    """Issue 8 item 9: a duplicated field name raised KeyError deep in decoding."""
    schema = {
        "type": "record",
        "name": "Dup",
        "fields": [{"name": "a", "type": "long"}, {"name": "a", "type": "string"}],
    }
    for load in (load_schema, arrow_schema, SchemaStore):
        with pytest.raises(SchemaError, match="field name 'a' occurs twice"):
            load(schema)


def test_schemas_differing_only_in_a_logical_type_are_not_merged(
    transaction_schema: dict[str, Any],
) -> None:
    """They share the CRC-64-AVRO fingerprint (the canonical form drops logical types)."""
    millis = json.loads(json.dumps(transaction_schema))
    ts = next(f for f in millis["fields"] if f["name"] == "ts")
    ts["type"]["logicalType"] = "timestamp-millis"
    assert fingerprint(millis) == fingerprint(transaction_schema)
    with pytest.raises(SchemaError, match="'ts' is timestamp-micros in one schema"):
        SchemaStore(transaction_schema, [millis])
    SchemaStore(transaction_schema, [json.loads(json.dumps(transaction_schema))])  # same: fine
