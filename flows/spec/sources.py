"""A `Source`: a named event stream with an Avro record schema, an entity key and an event-time
field, and the bounds its event times must keep.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from flows.errors import DefinitionError
from flows.spec.durations import parse_duration


@dataclass(frozen=True, slots=True)
class Source:
    """A named event stream: Avro record schema, entity key field, event-time field, partitions.

    `max_future` bounds how far an event time may lie ahead of its record's arrival time (the
    Kafka message time, or the ingest time): beyond it the record is a dead letter, so one wrong
    clock cannot move the partition's watermark and make every later event look late.
    `min_time` (optional) refuses event times before it, e.g. zeros written for a missing time.
    """

    name: str
    schema: str | Path | Mapping[str, Any]
    key: str
    timestamp: str
    partitions: int = 1
    topic: str | None = None
    previous_schemas: Sequence[str | Path | Mapping[str, Any]] = ()
    max_future: str | int | None = "5m"
    min_time: str | datetime | None = None
    base_dir: Path | None = field(default=None, compare=False)

    def max_future_us(self) -> int | None:
        """How far an event time may lie ahead of its record's arrival time (None: any)."""
        if self.max_future is None:
            return None
        return parse_duration(self.max_future, f"source {self.name!r}: max_future")

    def min_time_us(self) -> int | None:
        """The earliest event time accepted (µs since the epoch; None: any)."""
        if self.min_time is None:
            return None
        when = self.min_time
        if isinstance(when, str):
            try:
                when = datetime.fromisoformat(when)
            except ValueError as exc:
                raise DefinitionError(
                    f"source {self.name!r}: min_time {self.min_time!r} is not an ISO-8601 "
                    "time; write e.g. '2000-01-01T00:00:00Z'"
                ) from exc
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return int(when.timestamp()) * 1_000_000 + when.microsecond

    @property
    def kafka_topic(self) -> str:
        return self.topic or self.name

    def avro_schema(self) -> dict[str, Any]:
        """The parsed Avro record schema (loaded from the .avsc path, or given inline)."""
        return self._load(self.schema)

    def older_schemas(self) -> list[dict[str, Any]]:
        """Earlier versions of the schema that records in the log may still carry."""
        return [self._load(s) for s in self.previous_schemas]

    def _load(self, schema: str | Path | Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(schema, Mapping):
            return dict(schema)
        path = _find_schema(Path(schema), self.base_dir)
        try:
            loaded = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise DefinitionError(
                f"source {self.name!r}: schema file {path} is not valid JSON "
                f"({exc}); fix the .avsc file"
            ) from exc
        if not isinstance(loaded, dict):
            raise DefinitionError(
                f"source {self.name!r}: schema file {path} must hold one "
                "Avro record schema (a JSON object)"
            )
        return loaded

    def field_types(self) -> dict[str, str]:
        """Field name -> simplified Avro type: "long", "double", "string", "timestamp-micros"..."""
        schema = self.avro_schema()
        if schema.get("type") != "record" or not isinstance(schema.get("fields"), list):
            raise DefinitionError(
                f"source {self.name!r}: schema must be an Avro record with fields"
            )
        return {f["name"]: _simple_type(f["type"]) for f in schema["fields"]}

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", self.name):
            raise DefinitionError(f"source name {self.name!r} must be letters, digits, _ . -")
        if not isinstance(self.partitions, int) or self.partitions < 1:
            raise DefinitionError(
                f"source {self.name!r}: partitions={self.partitions!r} must be a positive int"
            )
        types = self.field_types()
        for role, fname in (("key", self.key), ("timestamp", self.timestamp)):
            if fname not in types:
                raise DefinitionError(
                    f"source {self.name!r}: {role} field {fname!r} is not in the "
                    f"schema (fields: {', '.join(types)})"
                )
        if types[self.timestamp] not in ("timestamp-millis", "timestamp-micros"):
            raise DefinitionError(
                f"source {self.name!r}: timestamp field {self.timestamp!r} has type "
                f"{types[self.timestamp]!r}; declare it as Avro long with logicalType "
                "timestamp-millis or timestamp-micros"
            )
        self.max_future_us()
        self.min_time_us()
        if types[self.key] not in ("string", "long", "int"):
            raise DefinitionError(
                f"source {self.name!r}: key field {self.key!r} has type "
                f"{types[self.key]!r}; use a string (or int/long) field"
            )


def _simple_type(avro: Any) -> str:
    """Reduce an Avro field type to one word; nullable unions ["null", T] become T."""
    if isinstance(avro, list):
        branches = [b for b in avro if b != "null"]
        if len(branches) != 1:
            return "union"
        avro = branches[0]
    if isinstance(avro, dict):
        logical = avro.get("logicalType")
        if logical in ("timestamp-millis", "timestamp-micros"):
            return str(logical)
        inner = avro.get("type")
        if inner == "array":  # a vector: "array<float>", "array<double>"
            return f"array<{_simple_type(avro.get('items'))}>"
        return inner if isinstance(inner, str) else "complex"
    return str(avro)


def _find_schema(path: Path, base_dir: Path | None) -> Path:
    candidates = [path] if path.is_absolute() else []
    if not path.is_absolute():
        if base_dir is not None:
            candidates += [base_dir / path, *(parent / path for parent in base_dir.parents)]
        candidates.append(Path.cwd() / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DefinitionError(
        f"Avro schema file {str(path)!r} not found (looked in "
        f"{', '.join(str(c.parent) for c in candidates)}); give a path relative "
        "to the definitions module or the working directory"
    )
