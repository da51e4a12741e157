from __future__ import annotations

from typing import Any

import pytest

from connectors.errors import SchemaError
from connectors.evolution import check_compatible


def record(*fields: dict[str, Any], name: str = "Transaction") -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": list(fields)}


def field(name: str, avro_type: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": avro_type, **extra}


BASE = record(
    field("user_id", "string"),
    field("amount", "float"),
    field("ts", {"type": "long", "logicalType": "timestamp-millis"}),
)


@pytest.mark.parametrize(
    "new",
    [
        BASE,
        record(
            field("user_id", "string"),
            field("amount", "double"),
            field("ts", {"type": "long", "logicalType": "timestamp-micros"}),
        ),
        record(field("user_id", "bytes"), field("amount", ["null", "double"]), field("ts", "long")),
        record(
            field("user_id", "string"),
            field("amount", "float"),
            field("ts", "long"),
            field("channel", ["null", "string"], default=None),
            field("n", "int", default=0),
        ),
        record(field("user_id", "string"), field("ts", "long")),  # amount removed
        record(
            field("uid", "string", aliases=["user_id"]),
            field("amount", "float"),
            field("ts", "long"),
        ),
    ],
    ids=["same", "promoted", "bytes-and-nullable", "added-with-defaults", "removed", "alias"],
)
def test_compatible_changes_pass(new: dict[str, Any]) -> None:
    check_compatible(BASE, new)


@pytest.mark.parametrize(
    ("new", "message"),
    [
        (
            record(
                field("user_id", "string"),
                field("amount", "float"),
                field("ts", "long"),
                field("region", "string"),
            ),
            "field 'region' was added without a default",
        ),
        (
            record(field("user_id", "string"), field("amount", "int"), field("ts", "long")),
            "field 'amount': type changed from 'float' to 'int'",
        ),
        (
            record(field("user_id", "long"), field("amount", "float"), field("ts", "long")),
            "field 'user_id': type changed from 'string' to 'long'",
        ),
        (
            record(field("user_id", "string"), field("amount", "float"), field("ts", "int")),
            "field 'ts': type changed from 'long' to 'int'",
        ),
        (
            record(
                field("user_id", "string"),
                field("amount", "float"),
                field("ts", "long"),
                name="Payment",
            ),
            "renamed from 'Transaction' to 'Payment'",
        ),
    ],
)
def test_incompatible_changes_name_the_field_and_the_rule(
    new: dict[str, Any], message: str
) -> None:
    with pytest.raises(SchemaError, match=message):
        check_compatible(BASE, new)


def test_a_nullable_field_cannot_become_required() -> None:
    old = record(field("amount", ["null", "double"], default=None))
    with pytest.raises(SchemaError, match="field 'amount': values of type 'null'"):
        check_compatible(old, record(field("amount", "double")))


def test_enum_symbols_may_go_only_with_a_default() -> None:
    old = record(field("kind", {"type": "enum", "name": "Kind", "symbols": ["A", "B"]}))
    narrowed = {"type": "enum", "name": "Kind", "symbols": ["A"]}
    with pytest.raises(SchemaError, match=r"field 'kind': enum symbols \['B'\] were removed"):
        check_compatible(old, record(field("kind", narrowed)))
    check_compatible(old, record(field("kind", {**narrowed, "default": "A"})))


def test_nested_types_are_checked_with_their_path() -> None:
    inner = record(field("x", "int"), name="Inner")
    old = record(field("items", {"type": "array", "items": inner}))
    new = record(
        field("items", {"type": "array", "items": record(field("x", "string"), name="Inner")})
    )
    with pytest.raises(SchemaError, match=r"field 'items\[\]\.x'"):
        check_compatible(old, new)
