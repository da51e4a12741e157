"""Schema evolution rules: whether a reader with a source's new Avro schema can read records
written with an older one (Avro schema resolution), checked before a schema version is used,
so that an incompatible change is refused up front instead of failing record by record."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from connectors.errors import SchemaError

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
PROMOTIONS = frozenset(
    {
        ("int", "long"),
        ("int", "float"),
        ("int", "double"),
        ("long", "float"),
        ("long", "double"),
        ("float", "double"),
        ("string", "bytes"),
        ("bytes", "string"),
    }
)
_RULE = "allowed promotions: int->long->float->double, string<->bytes"


def check_compatible(old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Check that a reader using `new` can read every record written with `old`.

    Removing a field is allowed (the reader ignores it); a source's key and event-time fields
    are the caller's to protect.

    Raises:
        SchemaError: naming the field and the rule it breaks (a field added without a default,
            a type change that is not an Avro promotion, a renamed record or enum, an enum
            symbol the new schema lacks, a union branch the new schema cannot read).
    """
    from fastavro.schema import expand_schema  # loaded on first use

    try:
        writer, reader = expand_schema(dict(old)), expand_schema(dict(new))
    except Exception as exc:  # fastavro raises several types for a malformed schema
        raise SchemaError(f"cannot compare schemas: {exc}; fix the schema JSON") from exc
    _check(writer, reader, "")


def _check(writer: Any, reader: Any, path: str) -> None:
    w_kind, r_kind = _kind(writer), _kind(reader)
    if r_kind == "union" or w_kind == "union":
        _check_union(writer, reader, path)
    elif w_kind != r_kind:
        if (w_kind, r_kind) not in PROMOTIONS:
            raise SchemaError(
                f"{_where(path)}type changed from {w_kind!r} to {r_kind!r}, which "
                f"is not an Avro promotion ({_RULE}); keep the old type, or add a "
                "new field with a default and stop writing the old one"
            )
    elif w_kind in ("record", "enum", "fixed"):
        _check_name(writer, reader, path)
        _NAMED_CHECKS[w_kind](writer, reader, path)
    elif w_kind == "array":
        _check(writer["items"], reader["items"], f"{path}[]")
    elif w_kind == "map":
        _check(writer["values"], reader["values"], f"{path}{{}}")


def _check_union(writer: Any, reader: Any, path: str) -> None:
    readers = reader if isinstance(reader, list) else [reader]
    for branch in writer if isinstance(writer, list) else [writer]:
        if not any(_readable(branch, r, path) for r in readers):
            raise SchemaError(
                f"{_where(path)}values of type {_kind(branch)!r} written with the old schema "
                f"cannot be read as {_describe(reader)}; keep {_kind(branch)!r} in the new type "
                '(for a nullable field: ["null", T] with "default": null)'
            )


def _readable(writer: Any, reader: Any, path: str) -> bool:
    try:
        _check(writer, reader, path)
    except SchemaError:
        return False
    return True


def _check_record(writer: Mapping[str, Any], reader: Mapping[str, Any], path: str) -> None:
    written = {f["name"]: f for f in writer.get("fields", [])}
    for field in reader.get("fields", []):
        name = f"{path}.{field['name']}" if path else field["name"]
        match = next(
            (written[a] for a in (field["name"], *field.get("aliases", ())) if a in written), None
        )
        if match is not None:
            _check(match["type"], field["type"], name)
        elif "default" not in field:
            raise SchemaError(
                f"field {name!r} was added without a default, so records written with the old "
                'schema cannot be read; give it a default (for ["null", T]: "default": null)'
            )


def _check_enum(writer: Mapping[str, Any], reader: Mapping[str, Any], path: str) -> None:
    missing = [s for s in writer["symbols"] if s not in reader["symbols"]]
    if missing and "default" not in reader:
        raise SchemaError(
            f"{_where(path)}enum symbols {missing} were removed and the new enum "
            "has no default; keep the symbols or give the enum a default"
        )


def _check_fixed(writer: Mapping[str, Any], reader: Mapping[str, Any], path: str) -> None:
    if writer["size"] != reader["size"]:
        raise SchemaError(
            f"{_where(path)}fixed size changed from {writer['size']} to "
            f"{reader['size']}; a fixed type cannot change size"
        )


_NAMED_CHECKS = {"record": _check_record, "enum": _check_enum, "fixed": _check_fixed}


def _check_name(writer: Mapping[str, Any], reader: Mapping[str, Any], path: str) -> None:
    w_name, r_name = _short_name(writer["name"]), _short_name(reader["name"])
    aliases = {_short_name(a) for a in reader.get("aliases", ())}
    if w_name != r_name and w_name not in aliases:
        raise SchemaError(
            f"{_where(path)}{_kind(reader)} renamed from {w_name!r} to {r_name!r}; "
            f"keep the name or list {w_name!r} in the new schema's aliases"
        )


def _kind(schema: Any) -> str:
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, Mapping):
        return (
            _kind(schema["type"])
            if isinstance(schema["type"], (list, Mapping))
            else str(schema["type"])
        )
    return str(schema)


def _describe(schema: Any) -> str:
    if isinstance(schema, list):
        return "[" + ", ".join(repr(_kind(s)) for s in schema) + "]"
    return repr(_kind(schema))


def _short_name(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _where(path: str) -> str:
    return f"field {path!r}: " if path else "schema: "
