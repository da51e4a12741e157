"""The per-record oracle of the Avro batch decoder: one single-object payload read by fastavro
(`schemaless_reader`, with the writer schema its fingerprint names in the store and the store's
reader schema), timestamps as int µs since the epoch, UTC, whatever the schema's unit.

The flow decodes only in batches (`connectors.avro.decode_batch`); this record-at-a-time reader
is what the tests hold the batch decoder to, so it lives with them.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from fastavro import parse_schema, schemaless_reader

from connectors.avro import HEADER_SIZE, MARKER, SchemaStore
from connectors.avro_fields import record_fields
from connectors.errors import DecodeError

_UNIT_US = {"ms": 1000, "us": 1}


def decode_one(store: SchemaStore, payload: bytes) -> dict[str, Any]:
    """The record in a single-object payload, resolved to the store's reader schema.

    Raises:
        DecodeError: bad marker, unknown fingerprint, truncated or malformed bytes.
    """
    problem = _header_problem(payload)
    fp = int.from_bytes(payload[2:HEADER_SIZE], "little")
    writer = None if problem else store.writer(fp)
    if writer is None:
        raise DecodeError(problem or _unknown_fingerprint(payload))
    body = io.BytesIO(payload)
    body.seek(HEADER_SIZE)
    reader = None if fp == store.fingerprint else _parsed(store.reader)
    try:
        record = schemaless_reader(body, _parsed(writer), reader)
    except Exception as exc:  # fastavro raises EOFError, IndexError, UnicodeError, ...
        raise DecodeError(f"malformed record: {type(exc).__name__}: {exc}") from exc
    if body.tell() != len(payload):
        raise DecodeError(
            f"{len(payload) - body.tell()} bytes left over after the last "
            "field (not a record of this schema)"
        )
    if not isinstance(record, dict):
        raise DecodeError(f"payload decodes to {type(record).__name__}, not a record")
    return _timestamps_to_us(record, writer, store.reader)


def _header_problem(payload: bytes) -> str | None:
    if len(payload) < HEADER_SIZE:
        return (
            f"payload of {len(payload)} bytes is shorter than the {HEADER_SIZE}-byte Avro "
            "single-object header"
        )
    if payload[:2] != MARKER:
        return (
            f"payload starts with {payload[:2].hex(' ')}, not the Avro single-object marker "
            "c3 01; producers must write single-object encoded Avro"
        )
    return None


def _unknown_fingerprint(payload: bytes) -> str:
    return (
        f"unknown writer schema fingerprint {payload[2:HEADER_SIZE].hex()}; add that schema "
        "version to the source's schema store"
    )


def _parsed(schema: Mapping[str, Any]) -> Any:
    """`schema` parsed by fastavro without its logical types: timestamps are read as the raw
    longs they are on the wire, converted to µs below."""
    return parse_schema(_without_logical_types(dict(schema)))


def _without_logical_types(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_without_logical_types(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    return {
        k: _without_logical_types(v) if k in ("type", "fields", "items", "values") else v
        for k, v in schema.items()
        if k != "logicalType"
    }


def _timestamps_to_us(
    record: dict[str, Any], writer: Mapping[str, Any], reader: Mapping[str, Any]
) -> dict[str, Any]:
    written = {f.name: f for f in record_fields(writer)}
    for spec in record_fields(reader):
        if spec.unit and record.get(spec.name) is not None:
            source = next((written[a] for a in (spec.name, *spec.aliases) if a in written), spec)
            unit = source.unit or spec.unit
            us = record[spec.name] * _UNIT_US[unit]
            # A reader in ms truncates, as the batch decoder does.
            record[spec.name] = us // 1000 * 1000 if spec.unit == "ms" else us
    return record
