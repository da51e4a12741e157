"""Request bodies turned into checked read arguments (pure; no I/O).

    POST /v1/views/{view}        {"keys": [key, ...], "at": optional}
    POST /v1/services/{service}  {"rows": [{column: value, ...}, ...], "at": optional}

A key is a string or an integer, or a JSON array of them for a view keyed by a tuple of columns
(the read client takes it as a tuple). `at` is ISO-8601 text with a zone or epoch seconds; absent
or null means now. Every failure is a BadRequestError (400) or, past the batch limit, a
PayloadTooLargeError (413), with a message that names the value and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeGuard

import orjson

from flows.serving.errors import BadRequestError, PayloadTooLargeError

Key = str | int | tuple[str | int, ...]
At = datetime | int | float | None

# epoch seconds of 0001-01-01 and 9999-12-31T23:59:59, the range a datetime can hold
_MIN_EPOCH_S, _MAX_EPOCH_S = -62_135_596_800, 253_402_300_799


@dataclass(frozen=True, slots=True)
class ViewRead:
    """The keys to read and the time to read them as of (None = now)."""

    keys: list[Key]
    at: At


@dataclass(frozen=True, slots=True)
class ServiceRead:
    """The service request rows and the time to read them as of (None = now)."""

    rows: list[dict[str, Any]]
    at: At


def parse_view_read(body: bytes, limit: int) -> ViewRead:
    """`{"keys": [...], "at": ...}` as a ViewRead."""
    fields = _object(body, "keys", '{"keys": ["u1", "u2"]}')
    keys = _batch(fields, "keys", limit, '["u1", "u2"], or [["u1", "web"]] for a composite key')
    return ViewRead([_key(k, i) for i, k in enumerate(keys)], parse_at(fields.get("at")))


def parse_service_read(body: bytes, limit: int) -> ServiceRead:
    """`{"rows": [{...}, ...], "at": ...}` as a ServiceRead."""
    fields = _object(body, "rows", '{"rows": [{"user_id": "u1", "amount": 12.5}]}')
    rows = _batch(fields, "rows", limit, '[{"user_id": "u1", "amount": 12.5}]')
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BadRequestError(
                f"rows[{i}] is {_json_type(row)} ({_show(row)}); each row is a JSON object of "
                "entity keys and request fields"
            )
    return ServiceRead(rows, parse_at(fields.get("at")))


def parse_at(value: object) -> At:
    """ISO-8601 text with a zone, or epoch seconds, as the read client takes it (None = now)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadRequestError(
            f'"at" is {_json_type(value)} ({_show(value)}); give ISO-8601 text with a zone '
            '("2026-01-31T12:00:00Z") or epoch seconds (1769860800)'
        )
    if isinstance(value, str):
        return _iso(value)
    if not _MIN_EPOCH_S <= value <= _MAX_EPOCH_S:
        raise BadRequestError(
            f'"at" {value!r} is out of range; epoch seconds lie between {_MIN_EPOCH_S} and '
            f"{_MAX_EPOCH_S}"
        )
    return value


def _iso(text: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise BadRequestError(
            f'"at" {_show(text)} is not ISO-8601 time; give e.g. "2026-01-31T12:00:00Z" or '
            "epoch seconds"
        ) from exc
    if parsed.tzinfo is None:
        raise BadRequestError(
            f'"at" {_show(text)} has no zone; add one, e.g. "{text[:19]}Z" for UTC'
        )
    return parsed


def _object(body: bytes, field: str, example: str) -> dict[str, Any]:
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(
            f"the request body is not valid JSON ({exc}); send a JSON object like {example}"
        ) from exc
    if not isinstance(fields, dict):
        raise BadRequestError(
            f"the request body is {_json_type(fields)}, not a JSON object; send {example}"
        )
    if len(fields) > 2 or any(name != field and name != "at" for name in fields):
        unknown = sorted(set(fields) - {field, "at"})
        raise BadRequestError(
            f"unknown field(s) {unknown} in the request body; the fields are {field!r} and "
            "'at' (optional)"
        )
    return fields


def _batch(fields: dict[str, Any], field: str, limit: int, example: str) -> list[Any]:
    if field not in fields:
        raise BadRequestError(f'the request body has no "{field}"; give "{field}": {example}')
    items = fields[field]
    if not isinstance(items, list):
        raise BadRequestError(
            f'"{field}" is {_json_type(items)} ({_show(items)}), not a JSON array; give '
            f'"{field}": {example}'
        )
    if len(items) > limit:
        raise PayloadTooLargeError(
            f"{len(items)} {field} in one request is past the batch limit of {limit}; split "
            "the request, or raise the server's --batch-limit"
        )
    return items


def _key(value: object, i: int) -> Key:
    if isinstance(value, list) and value and all(_scalar_key(p) for p in value):
        return tuple(value)
    if _scalar_key(value):
        return value
    raise BadRequestError(
        f"keys[{i}] is {_json_type(value)} ({_show(value)}); a key is a string or an integer, "
        'or an array of them for a view keyed by several columns (["u1", "web"])'
    )


def _scalar_key(value: object) -> TypeGuard[str | int]:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


def _show(value: object) -> str:
    text = orjson.dumps(value).decode() if _jsonable(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jsonable(value: object) -> bool:
    try:
        orjson.dumps(value)
    except TypeError:
        return False
    return True
