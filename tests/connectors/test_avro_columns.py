"""The vectorized batch decoder against fastavro (the oracle) over generated flat schemas."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.avro import SchemaStore, arrow_schema, decode_batch, encode_single_object
from tests.connectors.avro_oracle import decode_one

SYMBOLS = ["RED", "GREEN", "BLUE"]
VALUES: dict[str, st.SearchStrategy[Any]] = {
    "boolean": st.booleans(),
    "int": st.integers(-(2**31), 2**31 - 1),
    "long": st.integers(-(2**63), 2**63 - 1),
    "float": st.floats(width=32, allow_nan=False),
    "double": st.floats(allow_nan=False),
    "string": st.text(max_size=20),
    "bytes": st.binary(max_size=20),
    "enum": st.sampled_from(SYMBOLS),
    "timestamp-millis": st.integers(-(2**43), 2**43).map(lambda ms: ms * 1000),
    "timestamp-micros": st.integers(-(2**62), 2**62),
}


# Checks the batch decoder makes and fastavro does not: a payload fastavro accepts may fail
# only on these. fastavro reads union branch index -1 (zigzag byte 0x01) as the last branch
# (Python negative indexing); the batch decoder refuses it.
STRICTER_CHECKS = ("varint longer", "boolean byte", "union branch index out of range")


def avro_type(kind: str, index: int) -> Any:
    if kind == "enum":
        return {"type": "enum", "name": f"E{index}", "symbols": SYMBOLS}
    if kind.startswith("timestamp-"):
        return {"type": "long", "logicalType": kind}
    return kind


@st.composite
def schemas_and_records(draw: st.DrawFn) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    kinds = draw(st.lists(st.sampled_from(sorted(VALUES)), min_size=1, max_size=8))
    shapes = draw(
        st.lists(
            st.sampled_from(["plain", "null-first", "null-last", "single"]),
            min_size=len(kinds),
            max_size=len(kinds),
        )
    )
    fields = []
    for i, (kind, shape) in enumerate(zip(kinds, shapes, strict=True)):
        base = avro_type(kind, i)
        union = {
            "plain": base,
            "null-first": ["null", base],
            "null-last": [base, "null"],
            "single": [base],
        }[shape]
        fields.append({"name": f"f{i}", "type": union})
    schema = {"type": "record", "name": "Generated", "fields": fields}

    def value(kind: str, shape: str) -> st.SearchStrategy[Any]:
        return st.one_of(st.none(), VALUES[kind]) if "null" in shape else VALUES[kind]

    record = st.fixed_dictionaries(
        {f"f{i}": value(k, s) for i, (k, s) in enumerate(zip(kinds, shapes, strict=True))}
    )
    return schema, draw(st.lists(record, max_size=20))


def rows_with_int_times(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    columns = {}
    for field, column in zip(batch.schema, batch.columns, strict=True):
        if pa.types.is_timestamp(field.type):
            column = column.cast(pa.int64())
            if field.type.unit == "ms":
                column = pa.compute.multiply(column, 1000)
        columns[field.name] = column
    rows: list[dict[str, Any]] = pa.table(columns).to_pylist()
    return rows


@settings(max_examples=300, deadline=None)
@given(schemas_and_records())
def test_batch_decoder_equals_fastavro(
    case: tuple[dict[str, Any], list[dict[str, Any]]],
) -> None:
    schema, records = case
    store = SchemaStore(schema)
    payloads = [encode_single_object(r, schema) for r in records]
    expected = [decode_one(store, p) for p in payloads]
    assert expected == records
    batch, failures = decode_batch(store, payloads, arrow_schema(schema))
    assert failures == []
    assert batch.schema == arrow_schema(schema)
    assert rows_with_int_times(batch) == expected


@settings(max_examples=300, deadline=None)
@given(schemas_and_records(), st.data())
def test_batch_decoder_never_accepts_what_fastavro_refuses(
    case: tuple[dict[str, Any], list[dict[str, Any]]], data: st.DataObject
) -> None:
    schema, records = case
    store = SchemaStore(schema)
    payloads = [encode_single_object(r, schema) for r in records]
    payloads = [
        p[:10] + data.draw(st.binary(max_size=len(p) + 2)) if data.draw(st.booleans()) else p
        for p in payloads
    ]
    batch, failures = decode_batch(store, payloads, arrow_schema(schema))
    failed = {i for i, _ in failures}
    decoded = []
    for i, payload in enumerate(payloads):
        try:
            decoded.append(decode_one(store, payload))
        except Exception:
            assert i in failed, f"payload {i} refused by fastavro but accepted by the batch"
        else:
            if i in failed:  # stricter than fastavro: only on checks fastavro does not make
                reason = dict(failures)[i]
                assert any(check in reason for check in STRICTER_CHECKS), reason
    accepted = [decode_one(store, p) for i, p in enumerate(payloads) if i not in failed]
    assert rows_with_int_times(batch) == accepted


def test_negative_union_branch_is_a_stricter_check_than_fastavro() -> None:
    """The CI failure of issue 8: b"\\x01\\x00" for ["null", "boolean"] is branch -1, which
    fastavro reads as the last branch; the batch decoder refuses it, an allowed stricter check."""
    schema = {
        "type": "record",
        "name": "R",
        "fields": [{"name": "f0", "type": ["null", "boolean"]}],
    }
    store = SchemaStore(schema)
    payload = encode_single_object({"f0": None}, schema)[:10] + b"\x01\x00"
    assert decode_one(store, payload) == {"f0": False}  # fastavro: index -1 -> "boolean"
    batch, failures = decode_batch(store, [payload], arrow_schema(schema))
    assert batch.num_rows == 0
    [(index, reason)] = failures
    assert index == 0
    assert "union branch index out of range" in reason
    assert any(check in reason for check in STRICTER_CHECKS)
