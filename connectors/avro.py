"""Avro at the log's edge: source schemas and their Arrow columns, schema fingerprints, and the
single-object encoding of Kafka values (marker C3 01, the writer schema's 8-byte little-endian
CRC-64-AVRO fingerprint, then the binary record), decoded a batch at a time (`decode_batch`).

Timestamps inside the platform are int64 microseconds since the epoch, UTC:
`encode_single_object` takes them so (or aware datetimes), whatever the schema's unit.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa

from connectors.avro_columns import PADDING, DecodedRecords, decode_records, resolve
from connectors.avro_fields import (
    TIMESTAMP_UNITS,
    FieldSpec,
    arrow_schema_of,
    check_field_names,
    record_fields,
)
from connectors.errors import SchemaError
from connectors.evolution import check_compatible

__all__ = [
    "HEADER_SIZE",
    "MARKER",
    "AvroSchema",
    "ParsedSchema",
    "SchemaStore",
    "SingleObjectWriter",
    "arrow_schema",
    "check_compatible",
    "check_same_logical_types",
    "decode_batch",
    "encode_single_object",
    "fingerprint",
    "fingerprint_bytes",
    "fingerprint_hex",
    "load_schema",
    "logical_types",
    "read_schema",
]

AvroSchema = Mapping[str, Any] | list[Any] | str
"""An Avro schema in its JSON form: a record (or other complex type), a union, or a name."""
ParsedSchema = dict[str, Any]
"""A schema parsed by fastavro (`fastavro.parse_schema`), ready for its readers and writers."""

MARKER = b"\xc3\x01"
HEADER_SIZE = 10  # marker + 8-byte fingerprint
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UNIT_US = {"ms": 1000, "us": 1}


def read_schema(path: str | Path) -> dict[str, Any]:
    """The Avro schema in a `.avsc` file, checked to be a valid record.

    Raises:
        SchemaError: the file cannot be read, is not JSON, or is not a valid Avro record.
    """
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SchemaError(
            f"schema file {str(path)!r} cannot be read as JSON: {exc}; "
            "give the path of an Avro schema (.avsc)"
        ) from exc
    load_schema(schema)
    return dict(schema)


def load_schema(schema: Mapping[str, Any]) -> ParsedSchema:
    """`schema` parsed by fastavro.

    Raises:
        SchemaError: fastavro refuses it (the message says why), or it is not a record.
    """
    if not isinstance(schema, Mapping) or schema.get("type") != "record":
        raise SchemaError(
            f"schema of type {_type_of(schema)!r} is not an Avro record; a "
            'source schema is {"type": "record", "name": ..., "fields": [...]}'
        )
    check_field_names(schema)
    from fastavro import parse_schema  # loaded on first use: a segment replay never needs it

    try:
        parsed = cast(ParsedSchema, parse_schema(dict(schema)))
    except Exception as exc:  # fastavro raises SchemaParseException, UnknownType, KeyError, ...
        raise SchemaError(
            f"record {schema.get('name', '?')!r} is not a valid Avro schema: "
            f"{type(exc).__name__}: {exc}; fix the schema JSON"
        ) from exc
    return parsed


def arrow_schema(avro_schema: Mapping[str, Any]) -> pa.Schema:
    """The Arrow schema of a source's columns: one nullable column per Avro field.

    boolean->bool, int->int32, long->int64, float->float32, double->float64, string and
    enum->string, bytes->binary, long timestamp-millis/-micros->timestamp(ms/us, UTC),
    ["null", T]->T.

    Raises:
        SchemaError: naming the field whose type has no column type (records, arrays, maps,
            fixed, unions of several types).
    """
    return arrow_schema_of(record_fields(avro_schema))


def fingerprint(schema: AvroSchema) -> int:
    """The CRC-64-AVRO (Rabin) fingerprint of the schema's Parsing Canonical Form, as an
    unsigned 64-bit int (Java's `SchemaNormalization.parsingFingerprint64` modulo 2**64)."""
    return int.from_bytes(fingerprint_bytes(schema), "little")


def fingerprint_bytes(schema: AvroSchema) -> bytes:
    """The fingerprint's 8 bytes as single-object encoding writes them (little-endian)."""
    from fastavro.schema import fingerprint as fastavro_fingerprint
    from fastavro.schema import to_parsing_canonical_form

    try:
        canonical = to_parsing_canonical_form(_plain(schema))
    except Exception as exc:  # fastavro raises several types for a malformed schema
        raise SchemaError(
            f"cannot fingerprint schema {_type_of(schema)!r}: {exc}; fix the schema JSON"
        ) from exc
    return bytes.fromhex(fastavro_fingerprint(canonical, "CRC-64-AVRO"))


def logical_types(schema: AvroSchema, path: str = "") -> dict[str, str]:
    """Every logical type in `schema`, by the path of the type that carries it (`field`,
    `field[]` for array items, `field{}` for map values, `field|2` for union branch 2)."""
    found: dict[str, str] = {}
    if isinstance(schema, list):
        for i, branch in enumerate(schema):
            found.update(logical_types(branch, f"{path}|{i}"))
    elif isinstance(schema, Mapping):
        if isinstance(schema.get("logicalType"), str):
            found[path or "<schema>"] = schema["logicalType"]
        for field in schema.get("fields", ()) if schema.get("type") == "record" else ():
            found.update(logical_types(field["type"], f"{path}.{field['name']}".lstrip(".")))
        for key, mark in (("type", ""), ("items", "[]"), ("values", "{}")):
            if isinstance(schema.get(key), (list, Mapping)):
                found.update(logical_types(schema[key], path + mark))
    return found


def check_same_logical_types(known: AvroSchema, other: AvroSchema) -> None:
    """Refuse two schemas with one fingerprint whose logical types differ.

    The CRC-64-AVRO fingerprint is taken over the Parsing Canonical Form, which drops logical
    types: a writer that changed `timestamp-micros` to `timestamp-millis` keeps its
    fingerprint, so records of the two are indistinguishable on the wire and one would be read
    with the other's unit.

    Raises:
        SchemaError: naming the first field whose logical type differs and both types.
    """
    mine, theirs = logical_types(known), logical_types(other)
    for path in sorted(set(mine) | set(theirs)):
        if mine.get(path) != theirs.get(path):
            raise SchemaError(
                f"field {path.split('|')[0]!r} is {mine.get(path) or 'without logical type'} in "
                f"one schema and {theirs.get(path) or 'without logical type'} in another, and "
                f"the two schemas share fingerprint {fingerprint_hex(known)}: the single-object "
                "fingerprint ignores logical types, so their records cannot be told apart and "
                "one unit would be read as the other; keep the field's logical type, or write "
                "the new unit into a new field with another name"
            )


def fingerprint_hex(schema: AvroSchema) -> str:
    """The fingerprint's 8 bytes in hex, in wire order (as a hex dump of a payload shows them)."""
    return fingerprint_bytes(schema).hex()


class SingleObjectWriter:
    """Encodes records of one record schema as Avro single-object payloads."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        load_schema(schema)
        self.schema = dict(schema)
        self.fingerprint = fingerprint(schema)
        self._header = MARKER + fingerprint_bytes(schema)
        from fastavro import parse_schema

        self._parsed = parse_schema(_without_logical_types(self.schema))
        self._units = _timestamp_units(self.schema)

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """The payload of `record`; timestamps as int µs since the epoch or aware datetimes.

        Raises:
            SchemaError: the record does not match the schema (the message names the cause).
        """
        values = dict(record)
        for name, unit in self._units.items():
            if values.get(name) is not None:
                values[name] = _to_unit(values[name], unit, name)
        out = io.BytesIO()
        out.write(self._header)
        from fastavro import schemaless_writer

        try:
            schemaless_writer(out, self._parsed, values)
        except Exception as exc:  # fastavro raises TypeError, ValueError, KeyError, ...
            raise SchemaError(
                f"record does not match schema {self.schema.get('name')!r}: "
                f"{type(exc).__name__}: {exc}; fix the record"
            ) from exc
        return out.getvalue()


def encode_single_object(record: Mapping[str, Any], schema: Mapping[str, Any]) -> bytes:
    """`record` as an Avro single-object payload (see `SingleObjectWriter` to encode many)."""
    return SingleObjectWriter(schema).encode(record)


@dataclass(frozen=True, slots=True)
class _Writer:
    schema: dict[str, Any]
    fields: tuple[FieldSpec, ...]


class SchemaStore:
    """The writer schemas a source's payloads may carry, by fingerprint, and its reader schema.

    Holds the reader schema (the source's current one, itself a writer schema) and older
    versions; each must be readable by the reader schema (`check_compatible`). All are flat
    records, as sources are (see `arrow_schema`).
    """

    def __init__(
        self, reader: Mapping[str, Any], writers: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        """Raises SchemaError if a schema is invalid or a writer cannot be read as `reader`."""
        self.reader = dict(reader)
        self.fingerprint = fingerprint(reader)
        self._reader = self._add(reader)
        self._writers = {self.fingerprint: self._reader}
        for writer in writers:
            fp = fingerprint(writer)
            known = self._writers.get(fp)
            if known is not None:  # the same wire identity: it must be the same schema
                check_same_logical_types(known.schema, writer)
                continue
            check_compatible(writer, reader)
            self._writers[fp] = self._add(writer)

    @staticmethod
    def _add(schema: Mapping[str, Any]) -> _Writer:
        load_schema(schema)
        return _Writer(dict(schema), record_fields(schema))

    @property
    def reader_fields(self) -> tuple[FieldSpec, ...]:
        return self._reader.fields

    def fingerprints(self) -> list[int]:
        """The fingerprints of all known writer schemas, the reader's first."""
        return list(self._writers)

    def writer(self, fp: int) -> dict[str, Any] | None:
        """The writer schema with fingerprint `fp`, or None if it is unknown."""
        known = self._writers.get(fp)
        return None if known is None else known.schema

    def writer_fields(self, fp: int) -> tuple[FieldSpec, ...] | None:
        known = self._writers.get(fp)
        return None if known is None else known.fields


def decode_batch(
    store: SchemaStore,
    payloads: Sequence[bytes],
    arrow_schema: pa.Schema,
) -> tuple[pa.RecordBatch, list[tuple[int, str]]]:
    """Decode many single-object payloads into one record batch of the source's columns.

    Payloads that cannot be decoded are left out of the batch and reported as
    (index in `payloads`, reason); the batch holds the others in input order. Timestamp
    columns have the Arrow timestamp types of `arrow_schema`.
    """
    n = len(payloads)
    lengths = np.fromiter(map(len, payloads), dtype=np.int64, count=n)
    data = np.frombuffer(b"".join([*payloads, bytes(PADDING)]), dtype=np.uint8)
    starts = np.cumsum(lengths) - lengths
    _check_columns(store, arrow_schema)
    fps, valid, failures = _check_headers(data, starts, lengths, store)
    parts: list[tuple[np.ndarray, pa.RecordBatch]] = []
    for fp in np.unique(fps[valid]):
        rows = np.nonzero(valid & (fps == fp))[0]
        decoded = _decode_group(
            store,
            int(fp),
            data,
            starts[rows] + HEADER_SIZE,
            starts[rows] + lengths[rows],
            arrow_schema,
        )
        failures.update((int(rows[i]), reason) for i, reason in decoded.failures.items())
        ok = np.ones(len(rows), dtype=bool)
        ok[list(decoded.failures)] = False
        batch = pa.RecordBatch.from_arrays(list(decoded.columns.values()), schema=arrow_schema)
        parts.append((rows[ok], batch.filter(pa.array(ok))))
    return _in_input_order(parts, arrow_schema), sorted(failures.items())


def _check_columns(store: SchemaStore, schema: pa.Schema) -> None:
    unknown = set(schema.names) - {f.name for f in store.reader_fields}
    if unknown:
        raise SchemaError(
            f"columns {sorted(unknown)} are not fields of the reader schema "
            f"{store.reader.get('name')!r}; build the Arrow schema with "
            "arrow_schema(reader schema)"
        )


def _check_headers(
    data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, store: SchemaStore
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Each payload's writer fingerprint, whether its header is good, and the failures."""
    failures: dict[int, str] = {}
    short = lengths < HEADER_SIZE
    at = np.where(short, 0, starts)
    header = data[at[:, None] + np.arange(HEADER_SIZE)]
    marked = ~short & (header[:, 0] == MARKER[0]) & (header[:, 1] == MARKER[1])
    fps = np.ascontiguousarray(header[:, 2:]).view("<u8").ravel().copy()
    valid = marked & np.isin(fps, np.array(store.fingerprints(), dtype=np.uint64))
    for row in np.nonzero(~valid)[0]:
        payload = data[starts[row] : starts[row] + lengths[row]].tobytes()
        failures[int(row)] = _unknown(payload)
    return fps, valid, failures


def _decode_group(
    store: SchemaStore,
    fp: int,
    data: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    schema: pa.Schema,
) -> DecodedRecords:
    writer = store.writer_fields(fp)
    assert writer is not None  # _check_headers kept known fingerprints only
    decoded = decode_records(writer, data, starts, ends)
    return resolve(decoded, writer, store.reader_fields, schema)


def _in_input_order(
    parts: list[tuple[np.ndarray, pa.RecordBatch]],
    schema: pa.Schema,
) -> pa.RecordBatch:
    if not parts:
        return pa.RecordBatch.from_pylist([], schema=schema)
    if len(parts) == 1:
        return parts[0][1]
    rows = np.concatenate([r for r, _ in parts])
    table = pa.Table.from_batches([b for _, b in parts], schema=schema)
    return table.take(pa.array(np.argsort(rows, kind="stable"))).combine_chunks().to_batches()[0]


def _unknown(payload: bytes) -> str:
    """Why a payload's header is refused."""
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
    return (
        f"unknown writer schema fingerprint {payload[2:HEADER_SIZE].hex()}; add that schema "
        "version to the source's schema store"
    )


def _timestamp_units(schema: Mapping[str, Any]) -> dict[str, str]:
    """The unit ("ms"/"us") of each top-level timestamp field (alone or in a union)."""
    units = {}
    for field in schema.get("fields", []):
        branches = field["type"] if isinstance(field["type"], list) else [field["type"]]
        for branch in branches:
            if isinstance(branch, Mapping) and branch.get("type") == "long":
                unit = TIMESTAMP_UNITS.get(branch.get("logicalType", ""))
                if unit is not None:
                    units[field["name"]] = unit
    return units


def _to_unit(value: Any, unit: str, name: str) -> int:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise SchemaError(
                f"field {name!r} holds a naive datetime {value}; give timestamps "
                "a timezone (UTC) or as int µs since the epoch"
            )
        value = (value - _EPOCH) // timedelta(microseconds=1)
    if not isinstance(value, int):
        raise SchemaError(
            f"field {name!r} holds {value!r}; a timestamp is an int (µs since "
            "the epoch) or an aware datetime"
        )
    return value // _UNIT_US[unit]


def _without_logical_types(schema: Any) -> Any:
    """`schema` without logical types: values pass as their underlying types (timestamps as
    raw longs, converted to and from µs here), as the Arrow columns hold them."""
    if isinstance(schema, list):
        return [_without_logical_types(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    return {
        k: _without_logical_types(v) if k in ("type", "fields", "items", "values") else v
        for k, v in schema.items()
        if k != "logicalType"
    }


def _plain(schema: AvroSchema) -> Any:
    return dict(schema) if isinstance(schema, Mapping) else schema


def _type_of(schema: Any) -> str:
    return str(schema.get("type")) if isinstance(schema, Mapping) else type(schema).__name__
