"""The flat record model of a source's Avro schema: one `FieldSpec` per field, each a primitive,
an enum, a timestamp, a vector (an array of float or double), or a union of one of those with
null, and its Arrow column type.

Sources are flat records so that every field is one typed Arrow column; nested records, arrays
of anything but float/double, maps, fixed and unions of several non-null types are refused
here, naming the field. A vector is an Arrow `list<float32>` (items "float") or
`list<float64>` (items "double") column: the element type the producer wrote, kept as is in
the log; the aggregation core reads both as float64.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from connectors.errors import SchemaError

KINDS = ("boolean", "int", "long", "float", "double", "string", "bytes", "enum", "array")
VECTOR_ITEMS = ("float", "double")
TIMESTAMP_UNITS = {"timestamp-millis": "ms", "timestamp-micros": "us"}

_ARROW_TYPES: dict[str, pa.DataType] = {
    "boolean": pa.bool_(),
    "int": pa.int32(),
    "long": pa.int64(),
    "float": pa.float32(),
    "double": pa.float64(),
    "string": pa.string(),
    "bytes": pa.binary(),
    "enum": pa.string(),
}


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of a flat Avro record, as the binary decoder and the Arrow mapping need it.

    `branches` is the size of the field's union (0 when the type is not a union) and
    `null_branch` the index of "null" in it (-1 when there is none). `unit` is "ms" or "us"
    for longs with a timestamp logical type. `default` is meaningful only if `has_default`.
    """

    name: str
    kind: str
    branches: int = 0
    null_branch: int = -1
    unit: str | None = None
    symbols: tuple[str, ...] = ()
    enum_default: str | None = None
    has_default: bool = False
    default: Any = None
    aliases: tuple[str, ...] = ()
    items: str | None = None  # a vector's element type: "float" or "double"

    @property
    def nullable(self) -> bool:
        return self.null_branch >= 0

    @property
    def arrow_type(self) -> pa.DataType:
        if self.unit is not None:
            return pa.timestamp(self.unit, tz="UTC")
        if self.kind == "array":
            return pa.list_(_ARROW_TYPES[self.items or "double"])
        return _ARROW_TYPES[self.kind]


def record_fields(schema: Mapping[str, Any]) -> tuple[FieldSpec, ...]:
    """The fields of a flat Avro record schema.

    Raises:
        SchemaError: the schema is not a record, or a field has a type a source cannot hold.
    """
    if not isinstance(schema, Mapping) or schema.get("type") != "record":
        raise SchemaError(
            f"schema {_short(schema)} is not an Avro record; a source's schema is "
            'a record: {"type": "record", "name": ..., "fields": [...]}'
        )
    record = schema.get("name", "?")
    check_field_names(schema)
    return tuple(_field_spec(record, field) for field in schema.get("fields", []))


def check_field_names(schema: Mapping[str, Any]) -> None:
    """Refuse a record whose fields do not each have a distinct name.

    Raises:
        SchemaError: naming the first field name that occurs twice (or a field with no name).
    """
    record = schema.get("name", "?")
    seen: set[str] = set()
    for field in schema.get("fields", []):
        name = field.get("name") if isinstance(field, Mapping) else None
        if not isinstance(name, str):
            raise SchemaError(
                f"record {record!r}: field {_short(field)} has no name; every field of a "
                'record needs "name" and "type"'
            )
        if name in seen:
            raise SchemaError(
                f"record {record!r}: field name {name!r} occurs twice; Avro field names are "
                "unique within a record: rename or remove one of them"
            )
        seen.add(name)


def _field_spec(record: str, field: Mapping[str, Any]) -> FieldSpec:
    name = field["name"]
    branches, null_branch, value_type = _split_union(record, name, field["type"])
    kind, unit, symbols, enum_default = _value_kind(record, name, value_type)
    return FieldSpec(
        items=_vector_items(record, name, value_type) if kind == "array" else None,
        name=name,
        kind=kind,
        branches=branches,
        null_branch=null_branch,
        unit=unit,
        symbols=symbols,
        enum_default=enum_default,
        has_default="default" in field,
        default=field.get("default"),
        aliases=tuple(field.get("aliases", ())),
    )


def _split_union(record: str, name: str, avro_type: Any) -> tuple[int, int, Any]:
    if not isinstance(avro_type, list):
        return 0, -1, avro_type
    values = [t for t in avro_type if t != "null" and t != {"type": "null"}]
    if len(values) != 1 or len(avro_type) > 2:
        raise _unsupported(record, name, avro_type, 'a union must be ["null", T] or [T]')
    nulls = [i for i, t in enumerate(avro_type) if t not in values]
    return len(avro_type), nulls[0] if nulls else -1, values[0]


def _value_kind(
    record: str,
    name: str,
    avro_type: Any,
) -> tuple[str, str | None, tuple[str, ...], str | None]:
    spec = avro_type if isinstance(avro_type, Mapping) else {"type": avro_type}
    kind = spec.get("type")
    if kind == "enum":
        return "enum", None, tuple(spec["symbols"]), spec.get("default")
    if kind not in KINDS:
        raise _unsupported(record, name, avro_type, "sources hold flat records of primitives")
    # Other logical types (date, decimal, ...) fall back to their underlying type, as the
    # Avro specification asks of readers that do not know them.
    unit = TIMESTAMP_UNITS.get(spec.get("logicalType", "")) if kind == "long" else None
    return kind, unit, (), None


def _vector_items(record: str, name: str, avro_type: Any) -> str:
    items = avro_type.get("items") if isinstance(avro_type, Mapping) else None
    if isinstance(items, Mapping) and not items.get("logicalType"):
        items = items.get("type")
    if items not in VECTOR_ITEMS:
        raise _unsupported(
            record, name, avro_type, 'an array must hold "float" or "double" (a vector)'
        )
    return str(items)


def arrow_schema_of(fields: tuple[FieldSpec, ...]) -> pa.Schema:
    """The Arrow schema of a source's columns: one nullable column per field, in order."""
    return pa.schema([pa.field(f.name, f.arrow_type) for f in fields])


def _unsupported(record: str, name: str, avro_type: Any, rule: str) -> SchemaError:
    return SchemaError(
        f"record {record!r}: field {name!r} has type {_short(avro_type)}, which a source cannot "
        f"hold ({rule}); use boolean, int, long, float, double, string, bytes, enum, a long "
        "with logicalType timestamp-millis/timestamp-micros, an array of float or double, "
        'or ["null", one of those]'
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
