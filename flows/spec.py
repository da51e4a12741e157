"""Feature definitions: the Python API a data scientist writes (Source, FeatureView, aggs).

A definitions module declares sources and feature views; `load_definitions` imports it and
validates every view against its source's Avro schema. Everything downstream (the dataflow, replay,
snapshots, the read client) is derived from these objects through `FeatureView.layout()`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict, Unpack

import orjson

from flows.errors import DefinitionError
from state.layout import (
    AGGREGATIONS,
    VECTOR_AGGREGATIONS,
    VECTOR_TYPES,
    FeatureDef,
    ViewLayout,
)
from state.services import FIELD_TYPES, OnDemandStep, ServicePlan, ViewRead

__all__ = [
    "FeatureService",
    "FeatureView",
    "OnDemand",
    "RequestSource",
    "Source",
    "count",
    "distinct_count",
    "first",
    "last",
    "last_k",
    "load_definitions",
    "max",
    "mean",
    "min",
    "on_demand",
    "parse_duration",
    "percentile",
    "std",
    "sum",
    "var",
]

_UNITS_US = {"s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_SIX_HOURS = 6 * _UNITS_US["h"]
_MAX_DURATION_US = 36_525 * _UNITS_US["d"]  # 100 years: beyond it int64 µs arithmetic overflows
_THIRTY_DAYS = 30 * _UNITS_US["d"]
_NUMERIC = {"int", "long", "float", "double"}
_STRINGY = {"string", "enum", "boolean"}


def parse_duration(text: str | int, what: str = "duration") -> int:
    """Parse "30m", "14d", "1h", "45s" into microseconds (an int is taken as seconds)."""
    if isinstance(text, bool):
        raise DefinitionError(f"{what} {text!r} is not a duration; write e.g. '30m', '14d'")
    if isinstance(text, int):
        if text <= 0:
            raise DefinitionError(f"{what} {text!r} must be positive; write e.g. '30m', '14d'")
        text = f"{text}s"
    match = _DURATION.match(str(text))
    if not match or int(match.group(1)) == 0:
        raise DefinitionError(
            f"{what} {text!r} is not a duration; write a positive number and a unit s, m, h or d,"
            " e.g. '30m', '14d'"
        )
    us = int(match.group(1)) * _UNITS_US[match.group(2)]
    if us > _MAX_DURATION_US:
        raise DefinitionError(
            f"{what} {text!r} is longer than 100 years; for all of history leave the window "
            "out (a lifetime feature)"
        )
    return us


def format_duration(us: int) -> str:
    """The shortest exact spelling of a duration: 1209600000000 -> "14d"."""
    for unit in ("d", "h", "m", "s"):
        if us % _UNITS_US[unit] == 0:
            return f"{us // _UNITS_US[unit]}{unit}"
    raise DefinitionError(f"duration of {us} microseconds is not a whole number of seconds")


def default_hop(window_us: int) -> int:
    """1 minute for windows up to 6 h, 1 hour up to 30 d, 1 day beyond (ARCHITECTURE.md)."""
    if window_us <= _SIX_HOURS:
        return _UNITS_US["m"]
    if window_us <= _THIRTY_DAYS:
        return _UNITS_US["h"]
    return _UNITS_US["d"]


@dataclass(frozen=True, slots=True)
class Aggregation:
    """One feature of a view: an aggregation of a column over a window (None = lifetime)."""

    agg: str
    column: str | None
    window: str | int | None = None
    hop: str | int | None = None
    name: str | None = None
    param: float | int | None = None
    description: str = ""
    owner: str = ""
    tags: Tags = ()

    def resolve(self, view: str) -> FeatureDef:
        where = f"view {view!r}, feature {self.name or self.agg!r}"
        window_us = (
            parse_duration(self.window, f"{where}: window") if self.window is not None else 0
        )
        if window_us == 0 and self.hop is not None:
            raise DefinitionError(
                f"{where}: hop={self.hop!r} given for a lifetime feature; "
                "give a window too, or drop the hop"
            )
        hop_us = 0
        if window_us:
            hop_us = (
                parse_duration(self.hop, f"{where}: hop") if self.hop else default_hop(window_us)
            )
            if window_us % hop_us:
                raise DefinitionError(
                    f"{where}: hop {self.hop!r} does not divide window {self.window!r}; "
                    "choose a hop that divides the window (e.g. window='14d', hop='1h')"
                )
        return FeatureDef(
            name=self.name or self._default_name(window_us),
            agg=self.agg,
            column=self.column,
            window_us=window_us,
            hop_us=hop_us,
            param=self.param,
        )

    def _default_name(self, window_us: int) -> str:
        suffix = f"_{format_duration(window_us)}" if window_us else ""
        if self.agg == "count" and self.column is None:
            return f"count{suffix}"
        if self.agg == "percentile":
            assert self.param is not None
            pct = round(float(self.param) * 100, 6)
            label = f"{pct:g}".replace(".", "_")
            return f"{self.column}_p{label}{suffix}"
        if self.agg == "last_k":
            return f"{self.column}_last{self.param}{suffix}"
        return f"{self.column}_{self.agg}{suffix}"


Window = str | int | None
Tags = Mapping[str, str] | Sequence[str]  # {"team": "risk"} or ["pii", "fraud"]


class FeatureMeta(TypedDict, total=False):
    """Catalog metadata any feature takes: `mean("amount", window="14d", owner="risk")`."""

    description: str
    owner: str
    tags: Tags


def count(
    column: str | None = None,
    *,
    window: Window = None,
    hop: Window = None,
    name: str | None = None,
    **meta: Unpack[FeatureMeta],
) -> Aggregation:
    """Number of events (or of non-null values of `column`) in the window; 0 when empty."""
    return Aggregation("count", column, window, hop, name, **meta)


def sum(
    column: str,
    *,
    window: Window = None,
    hop: Window = None,
    name: str | None = None,
    **meta: Unpack[FeatureMeta],
) -> Aggregation:
    """Sum of non-null values; 0 when empty."""
    return Aggregation("sum", column, window, hop, name, **meta)


def mean(
    column: str,
    *,
    window: Window = None,
    hop: Window = None,
    name: str | None = None,
    **meta: Unpack[FeatureMeta],
) -> Aggregation:
    """Arithmetic mean of non-null values; null when empty."""
    return Aggregation("mean", column, window, hop, name, **meta)


def min(
    column: str,
    *,
    window: Window = None,
    hop: Window = None,
    name: str | None = None,
    **meta: Unpack[FeatureMeta],
) -> Aggregation:
    """Smallest non-null value; null when empty."""
    return Aggregation("min", column, window, hop, name, **meta)


def max(
    column: str,
    *,
    window: Window = None,
    hop: Window = None,
    name: str | None = None,
    **meta: Unpack[FeatureMeta],
) -> Aggregation:
    """Largest non-null value; null when empty."""
    return Aggregation("max", column, window, hop, name, **meta)


def var(
    column: str,
    *,
    window: Window = None,
    hop: Window = None,
    name: str | None = None,
    **meta: Unpack[FeatureMeta],
) -> Aggregation:
    """Population variance of non-null values; null when empty."""
    return Aggregation("var", column, window, hop, name, **meta)


def std(
    column: str,
    *,
    window: Window = None,
    hop: Window = None,
    name: str | None = None,
    **meta: Unpack[FeatureMeta],
) -> Aggregation:
    """Population standard deviation of non-null values; null when empty."""
    return Aggregation("std", column, window, hop, name, **meta)


def first(
    column: str,
    *,
    window: Window = None,
    hop: Window = None,
    name: str | None = None,
    **meta: Unpack[FeatureMeta],
) -> Aggregation:
    """Value of the earliest event by event time (ties: lowest log offset); null when empty."""
    return Aggregation("first", column, window, hop, name, **meta)


def last(
    column: str,
    *,
    window: Window = None,
    hop: Window = None,
    name: str | None = None,
    **meta: Unpack[FeatureMeta],
) -> Aggregation:
    """Value of the latest event by event time (ties: highest log offset); null when empty."""
    return Aggregation("last", column, window, hop, name, **meta)


def last_k(
    column: str,
    k: int,
    *,
    window: Window = None,
    hop: Window = None,
    name: str | None = None,
    **meta: Unpack[FeatureMeta],
) -> Aggregation:
    """The k latest non-null values, newest first; null when empty."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 1000:
        raise DefinitionError(f"last_k({column!r}, {k!r}): k must be an int in 1..1000")
    return Aggregation("last_k", column, window, hop, name, k, **meta)


def distinct_count(
    column: str,
    *,
    window: Window = None,
    hop: Window = None,
    name: str | None = None,
    **meta: Unpack[FeatureMeta],
) -> Aggregation:
    """Approximate number of distinct non-null values (HLL, ~1.6% relative standard error)."""
    return Aggregation("distinct_count", column, window, hop, name, **meta)


def percentile(
    column: str,
    q: float,
    *,
    window: Window = None,
    hop: Window = None,
    name: str | None = None,
    **meta: Unpack[FeatureMeta],
) -> Aggregation:
    """Approximate q-quantile (0 < q < 1) of non-null values (KLL sketch); null when empty."""
    if isinstance(q, bool) or not isinstance(q, int | float) or not 0.0 < float(q) < 1.0:
        raise DefinitionError(
            f"percentile({column!r}, {q!r}): q must be a fraction in (0, 1),"
            " e.g. 0.95 for the 95th percentile"
        )
    return Aggregation("percentile", column, window, hop, name, float(q), **meta)


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


@dataclass(frozen=True, slots=True)
class FeatureView:
    """Features over one source, grouped by its entity key.

    Args:
        name: view name (the read client's first argument).
        source: the `Source` the events come from.
        features: aggregations, e.g. `[count(window="30m"), mean("amount", window="14d")]`.
        transform: optional plain function applied to each batch before aggregation: it gets a
            `pyarrow.Table` of the source's columns and returns a table with the same key and
            timestamp columns (filter rows, derive columns).
        allowed_lateness: how far behind retention an event may still arrive and count.
        key: the view's entity: a column of the source (or of the transform's output), or a
            tuple of columns for a composite key; default the source's key. A view keyed
            otherwise than its source is re-partitioned by its own key in the dataflow.
        columns: typed columns the transform adds (`{"liked": "boolean"}`); they can be
            aggregated and used as keys. Types: int, long, float, double, string, boolean.
        description, owner, tags: catalog metadata (`python -m flows.catalog`); features take
            the same keywords. They never change the stored layout (no replay).
        freshness: expected freshness, e.g. "5m": the metrics say when the newest applied
            event is older than this (`featureflow_view_stale`).
    """

    name: str
    source: Source
    features: Sequence[Aggregation]
    transform: Callable[[Any], Any] | None = None
    allowed_lateness: str | int = "0s"
    key: str | tuple[str, ...] | None = None
    columns: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    owner: str = ""
    tags: Tags = ()
    freshness: str | int | None = None

    def freshness_us(self) -> int | None:
        """The expected freshness (µs): how far behind now the newest applied event may be
        before the view counts as stale (metrics, alerts, catalog); None: no expectation."""
        if self.freshness is None:
            return None
        return parse_duration(self.freshness, f"view {self.name!r}: freshness")

    def key_columns(self) -> tuple[str, ...]:
        """The view's key columns: the source key unless `key=` says otherwise."""
        if self.key is None:
            return (self.source.key,)
        return (self.key,) if isinstance(self.key, str) else tuple(self.key)

    def feature_names(self) -> tuple[str, ...]:
        """The names of the view's features, in order (no schema needed)."""
        return tuple(agg.resolve(self.name).name for agg in self.features)

    def __getitem__(self, names: str | Sequence[str]) -> FeatureSelection:
        """Some features of the view, for a FeatureService or an on-demand function:
        `user_spend[["amount_mean_14d", "count_30m"]]`."""
        chosen = (names,) if isinstance(names, str) else tuple(names)
        return FeatureSelection(self, chosen)

    def layout(self) -> ViewLayout:
        """Validate against the source schema and return the storage-level description."""
        self.source.validate()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise DefinitionError(f"view name {self.name!r} must be a Python-style identifier")
        if not self.features:
            raise DefinitionError(f"view {self.name!r} has no features; give at least one")
        types = {**self.source.field_types(), **self._derived_types()}
        keys = self._checked_keys(types)
        defs = [agg.resolve(self.name) for agg in self.features]
        names = [d.name for d in defs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DefinitionError(
                f"view {self.name!r}: feature names {dupes} are repeated; give one of them name="
            )
        for d in defs:
            _check_column(self.name, d, types)
        lateness = _lateness_us(self.allowed_lateness, self.name)
        self.freshness_us()
        column_types = {d.column: types[d.column] for d in defs if d.column is not None}
        return ViewLayout(
            view=self.name,
            source=self.source.name,
            key=self.source.key,
            timestamp=self.source.timestamp,
            partitions=self.source.partitions,
            features=tuple(defs),
            column_types=column_types,
            allowed_lateness_us=lateness,
            keys=() if keys == (self.source.key,) else keys,
        )

    def _derived_types(self) -> dict[str, str]:
        fields = self.source.field_types()
        if self.columns and self.transform is None:
            raise DefinitionError(
                f"view {self.name!r}: columns={dict(self.columns)} needs a transform= that "
                "adds them"
            )
        for name, kind in self.columns.items():
            if name in fields:
                raise DefinitionError(
                    f"view {self.name!r}: derived column {name!r} is already a field of source "
                    f"{self.source.name!r}; give the derived column another name"
                )
            if kind not in DERIVED_TYPES:
                raise DefinitionError(
                    f"view {self.name!r}: derived column {name!r} has type {kind!r}; use one "
                    f"of {', '.join(DERIVED_TYPES)}"
                )
        return dict(self.columns)

    def _checked_keys(self, types: dict[str, str]) -> tuple[str, ...]:
        keys = self.key_columns()
        if not keys or len(set(keys)) != len(keys):
            raise DefinitionError(
                f"view {self.name!r}: key={self.key!r} must name one column or a tuple of "
                "distinct columns"
            )
        for part in keys:
            if part not in types:
                raise DefinitionError(
                    f"view {self.name!r}: key column {part!r} is not a field of source "
                    f"{self.source.name!r} nor a derived column (fields: {', '.join(types)})"
                )
            if types[part] not in _KEY_TYPES:
                raise DefinitionError(
                    f"view {self.name!r}: key column {part!r} has type {types[part]!r}; keys "
                    "are string, int, long or boolean columns"
                )
        return keys


DERIVED_TYPES = ("int", "long", "float", "double", "string", "boolean")
_KEY_TYPES = {"string", "int", "long", "boolean", "enum"}


def _lateness_us(value: str | int, view: str) -> int:
    if value in ("0s", 0, "0"):
        return 0
    return parse_duration(value, f"view {view!r}: allowed_lateness")


def _check_column(view: str, d: FeatureDef, types: dict[str, str]) -> None:
    if d.agg not in AGGREGATIONS:
        raise DefinitionError(
            f"view {view!r}, feature {d.name!r}: unknown aggregation {d.agg!r}; "
            f"use one of {', '.join(AGGREGATIONS)}"
        )
    if d.column is None:
        if d.agg != "count":
            raise DefinitionError(f"view {view!r}, feature {d.name!r}: {d.agg} needs a column")
        return
    if d.column not in types:
        raise DefinitionError(
            f"view {view!r}, feature {d.name!r}: unknown field {d.column!r}; "
            f"the source has fields {', '.join(types)}"
        )
    numeric_only = {"sum", "mean", "var", "std", "percentile", "min", "max"}
    kind = types[d.column]
    if kind in VECTOR_TYPES:
        if d.agg not in VECTOR_AGGREGATIONS:
            raise DefinitionError(
                f"view {view!r}, feature {d.name!r}: {d.agg} cannot aggregate the vector "
                f"column {d.column!r} ({kind}); vectors accept only "
                f"{', '.join(VECTOR_AGGREGATIONS)} (mean is element-wise)"
            )
        return
    if d.agg in numeric_only and kind not in _NUMERIC:
        raise DefinitionError(
            f"view {view!r}, feature {d.name!r}: {d.agg} needs a numeric "
            f"column, but {d.column!r} is {kind!r}"
        )
    if kind not in _NUMERIC | _STRINGY:
        raise DefinitionError(
            f"view {view!r}, feature {d.name!r}: column {d.column!r} has type "
            f"{kind!r}, which features cannot aggregate"
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


# --- feature services: what a model consumes (ARCHITECTURE.md "Model-facing contracts") ------

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
REQUEST_TYPES = tuple(FIELD_TYPES)


@dataclass(frozen=True, slots=True)
class FeatureSelection:
    """Chosen features of one view (`view[["a", "b"]]`)."""

    view: FeatureView
    features: tuple[str, ...]

    def feature_names(self) -> tuple[str, ...]:
        """The chosen names, each checked to be a feature of the view."""
        known = self.view.feature_names()
        if not self.features or not all(isinstance(f, str) for f in self.features):
            raise DefinitionError(
                f"view {self.view.name!r}[{list(self.features)!r}]: choose features by name, "
                f"e.g. {self.view.name}[[{known[0]!r}]]"
            )
        for name in self.features:
            if name not in known:
                raise DefinitionError(
                    f"view {self.view.name!r} has no feature {name!r} (features: "
                    f"{', '.join(known)}); choose one of them or add it to the view"
                )
        return tuple(dict.fromkeys(self.features))


@dataclass(frozen=True, slots=True)
class RequestSource:
    """The named fields a caller sends with each request, e.g. `{"amount": "double"}`.

    Types: int, long, float, double, string, boolean, array<float>, array<double>."""

    name: str
    schema: Mapping[str, str]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _IDENT.fullmatch(self.name):
            raise DefinitionError(
                f"request source name {self.name!r} must be a Python-style identifier"
            )
        if not isinstance(self.schema, Mapping) or not self.schema:
            raise DefinitionError(
                f"request source {self.name!r}: schema must be a dict of field -> type, "
                "e.g. {'amount': 'double'}"
            )
        for name, kind in self.schema.items():
            if not isinstance(name, str) or not _IDENT.fullmatch(name):
                raise DefinitionError(
                    f"request source {self.name!r}: field name {name!r} must be an identifier"
                )
            if kind not in FIELD_TYPES:
                raise DefinitionError(
                    f"request source {self.name!r}: field {name!r} has type {kind!r}, which "
                    f"requests do not support; use one of {', '.join(REQUEST_TYPES)}"
                )


OnDemandSource = RequestSource | FeatureView | FeatureSelection


@dataclass(frozen=True, slots=True)
class OnDemand:
    """A vectorized function computed at request time (online) and per spine batch (offline).

    It gets a `pyarrow.Table` with one row per request: each request field by its name, each
    view feature as `<view>__<feature>`; it returns {output name: array of the same length}."""

    name: str
    function: Callable[[Any], Any]
    sources: tuple[OnDemandSource, ...]
    outputs: Mapping[str, str]

    def __call__(self, rows: Any) -> Any:
        return self.function(rows)

    def views(self) -> list[tuple[FeatureView, tuple[str, ...]]]:
        """(view, features) of each view source."""
        return [_view_part(s) for s in self.sources if not isinstance(s, RequestSource)]

    def request_fields(self) -> dict[str, str]:
        """The request fields the function gets, with their declared types."""
        fields: dict[str, str] = {}
        for source in self.sources:
            if isinstance(source, RequestSource):
                fields.update(source.schema)
        return fields

    def inputs(self) -> tuple[str, ...]:
        """The columns of the function's table, in the order of its sources."""
        columns: list[str] = []
        for source in self.sources:
            if isinstance(source, RequestSource):
                columns += list(source.schema)
            else:
                view, names = _view_part(source)
                columns += [f"{view.name}__{n}" for n in names]
        return tuple(columns)

    def validate(self) -> None:
        where = f"on-demand function {self.name!r}"
        if not _IDENT.fullmatch(self.name):
            raise DefinitionError(f"{where}: the name must be a Python-style identifier")
        if not callable(self.function):
            raise DefinitionError(f"{where}: {self.function!r} is not a function")
        if not self.sources:
            raise DefinitionError(
                f"{where} has no sources; give sources=[a RequestSource, views...]"
            )
        for i, source in enumerate(self.sources):
            if not isinstance(source, RequestSource | FeatureView | FeatureSelection):
                raise DefinitionError(
                    f"{where}: source {i} is {type(source).__name__} {source!r}, neither a "
                    "RequestSource nor a view; pass RequestSource, FeatureView or "
                    "view[['feature', ...]] objects"
                )
        self._check_inputs(where)
        self._check_outputs(where)

    def _check_inputs(self, where: str) -> None:
        types: dict[str, str] = {}
        for source in self.sources:
            if isinstance(source, RequestSource):
                for name, kind in source.schema.items():
                    if types.setdefault(name, kind) != kind:
                        raise DefinitionError(
                            f"{where}: request field {name!r} is declared {types[name]!r} and "
                            f"{kind!r} by two sources; declare it once"
                        )
            else:
                _view_part(source)
        columns = self.inputs()
        dupes = sorted({c for c in columns if columns.count(c) > 1 and "__" in c})
        if dupes:
            raise DefinitionError(f"{where}: input columns {dupes} are listed twice; list once")

    def _check_outputs(self, where: str) -> None:
        if not isinstance(self.outputs, Mapping) or not self.outputs:
            raise DefinitionError(
                f"{where}: outputs must be a dict of name -> type, e.g. {{'ratio': 'double'}}"
            )
        for name, kind in self.outputs.items():
            if not isinstance(name, str) or not _IDENT.fullmatch(name) or "__" in name:
                raise DefinitionError(
                    f"{where}: output name {name!r} must be an identifier without '__'"
                )
            if kind not in FIELD_TYPES:
                raise DefinitionError(
                    f"{where}: output {name!r} has type {kind!r}; use one of "
                    f"{', '.join(REQUEST_TYPES)}"
                )


def _view_part(source: FeatureView | FeatureSelection) -> tuple[FeatureView, tuple[str, ...]]:
    if isinstance(source, FeatureView):
        return source, source.feature_names()
    return source.view, source.feature_names()


def on_demand(
    *, sources: Sequence[OnDemandSource], outputs: Mapping[str, str], name: str | None = None
) -> Callable[[Callable[[Any], Any]], OnDemand]:
    """Declare a vectorized request-time function (see `OnDemand`).

    Raises:
        DefinitionError: a source is neither a RequestSource nor a view, a selected feature
            does not exist, an output name or type is invalid.
    """

    def wrap(function: Callable[[Any], Any]) -> OnDemand:
        label = name or str(getattr(function, "__name__", "on_demand"))
        made = OnDemand(label, function, tuple(sources), dict(outputs))
        made.validate()
        return made

    return wrap


@dataclass(frozen=True, slots=True)
class FeatureService:
    """What a model consumes: whole views, chosen features (`view[["a"]]`), on-demand functions.

    Args:
        name: the service's name (`get_service(name, row)`, `flows.snapshot --service`).
        features: views, selections and on-demand functions, in output order; the columns are
            `<view>__<feature>` and `<on_demand>__<output>`.
        keys: the request column of a view's key when it is not named as the view's key
            columns (`{"merchant_risk": "payee_id"}`; a tuple for a composite key).
    """

    name: str
    features: Sequence[FeatureView | FeatureSelection | OnDemand]
    keys: Mapping[str, str | tuple[str, ...]] = field(default_factory=dict)
    description: str = ""
    owner: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)

    def service_plan(self) -> ServicePlan:
        """Validate the service and reduce it to the plain plan the serving core runs.

        Raises:
            DefinitionError: naming the value and the fix.
        """
        if not isinstance(self.name, str) or not _IDENT.fullmatch(self.name):
            raise DefinitionError(f"feature service name {self.name!r} must be an identifier")
        if isinstance(self.features, str | bytes) or not self.features:
            raise DefinitionError(
                f"feature service {self.name!r} has no features; list views, view[[...]] "
                "selections and on-demand functions"
            )
        views, columns, steps = self._parts()
        reads = tuple(self._read(view, names) for view, names in views.values())
        self._check_keys(views)
        request: dict[str, str] = {}
        for od in steps:
            for fname, kind in od.request_fields().items():
                if request.setdefault(fname, kind) != kind:
                    raise DefinitionError(
                        f"feature service {self.name!r}: request field {fname!r} is "
                        f"{request[fname]!r} in one on-demand function and {kind!r} in "
                        f"{od.name!r}; use one type"
                    )
        plan_steps = tuple(
            OnDemandStep(od.name, od.function, od.inputs(), tuple(od.outputs.items()))
            for od in steps
        )
        return ServicePlan(self.name, reads, tuple(request.items()), plan_steps, columns)

    def _parts(
        self,
    ) -> tuple[dict[str, tuple[FeatureView, tuple[str, ...]]], tuple[str, ...], list[OnDemand]]:
        views: dict[str, tuple[FeatureView, tuple[str, ...]]] = {}
        columns: list[str] = []
        steps: list[OnDemand] = []
        for item in self.features:
            if isinstance(item, OnDemand):
                item.validate()
                steps.append(item)
                columns += [f"{item.name}__{out}" for out in item.outputs]
                for view, names in item.views():
                    self._add_view(views, view, names)
            elif isinstance(item, FeatureView | FeatureSelection):
                view, names = _view_part(item)
                self._add_view(views, view, names)
                columns += [f"{view.name}__{n}" for n in names]
            else:
                raise DefinitionError(
                    f"feature service {self.name!r}: {type(item).__name__} {item!r} is not a "
                    "feature; list FeatureViews, view[['feature', ...]] selections and "
                    "@on_demand functions"
                )
        self._check_names(columns, steps, views)
        return views, tuple(columns), steps

    def _add_view(
        self,
        views: dict[str, tuple[FeatureView, tuple[str, ...]]],
        view: FeatureView,
        names: tuple[str, ...],
    ) -> None:
        known = views.get(view.name)
        if known is not None and known[0] != view:
            raise DefinitionError(
                f"feature service {self.name!r}: two different views are named {view.name!r}; "
                "give each view its own name"
            )
        have = known[1] if known else ()
        views[view.name] = (view, tuple(dict.fromkeys((*have, *names))))

    def _check_names(
        self,
        columns: list[str],
        steps: list[OnDemand],
        views: dict[str, tuple[FeatureView, tuple[str, ...]]],
    ) -> None:
        dupes = sorted({c for c in columns if columns.count(c) > 1})
        if dupes:
            raise DefinitionError(
                f"feature service {self.name!r}: output column(s) {dupes} are listed twice; "
                "list each view, feature and on-demand function once"
            )
        clash = sorted({od.name for od in steps} & set(views))
        if clash:
            raise DefinitionError(
                f"feature service {self.name!r}: on-demand function {clash[0]!r} has the name "
                "of a view, so their output columns could clash; rename the function"
            )

    def _read(self, view: FeatureView, names: tuple[str, ...]) -> ViewRead:
        keys = view.key_columns()
        mapped = self.keys.get(view.name, keys) if isinstance(self.keys, Mapping) else keys
        entity = (mapped,) if isinstance(mapped, str) else tuple(mapped)
        if len(entity) != len(keys) or not all(isinstance(c, str) and c for c in entity):
            raise DefinitionError(
                f"feature service {self.name!r}: keys[{view.name!r}]={mapped!r} must name "
                f"{len(keys)} request column(s), one per key column {keys} of the view"
            )
        return ViewRead(view.name, keys, entity, names)

    def _check_keys(self, views: Mapping[str, object]) -> None:
        if not isinstance(self.keys, Mapping):
            raise DefinitionError(
                f"feature service {self.name!r}: keys={self.keys!r} must be a dict of view "
                "name -> request column"
            )
        unknown = [v for v in self.keys if v not in views]
        if unknown:
            raise DefinitionError(
                f"feature service {self.name!r}: keys names view {unknown[0]!r}, which the "
                f"service does not read (views: {', '.join(views)}); fix the name"
            )


@dataclass(frozen=True, slots=True)
class Definitions:
    """Everything a definitions module declares."""

    path: Path
    sources: dict[str, Source]
    views: dict[str, FeatureView]
    layouts: dict[str, ViewLayout]
    services: dict[str, FeatureService] = field(default_factory=dict)
    plans: dict[str, ServicePlan] = field(default_factory=dict)

    def service(self, name: str) -> tuple[FeatureService, ServicePlan]:
        """A service and its plan.

        Raises:
            DefinitionError: no service of that name in the module.
        """
        if name not in self.services:
            raise DefinitionError(
                f"unknown feature service {name!r} in {self.path}; defined services: "
                f"{', '.join(self.services) or '(none)'}"
            )
        return self.services[name], self.plans[name]

    def schema_files(self) -> dict[str, Path]:
        """The schema files the module names by relative path (as named -> file), which a
        copy of the module beside them needs."""
        files: dict[str, Path] = {}
        for source in self.sources.values():
            for schema in (source.schema, *source.previous_schemas):
                if isinstance(schema, Mapping) or Path(schema).is_absolute():
                    continue
                files[Path(schema).as_posix()] = _find_schema(Path(schema), source.base_dir)
        return files

    def select(self, names: Sequence[str] | None) -> list[FeatureView]:
        if not names:
            return list(self.views.values())
        unknown = [n for n in names if n not in self.views]
        if unknown:
            raise DefinitionError(
                f"unknown view(s) {', '.join(map(repr, unknown))} in {self.path};"
                f" defined views: {', '.join(self.views) or '(none)'}"
            )
        return [self.views[n] for n in names]


def load_definitions(path: str | Path) -> Definitions:
    """Import a definitions module and validate every source and view in it.

    Raises:
        DefinitionError: the file is missing, fails to import, or a definition is invalid.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise DefinitionError(
            f"definitions module {str(path)!r} not found; pass --features "
            "with the path of a Python file that declares FeatureViews"
        )
    module_name = f"_featureflow_defs_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise DefinitionError(f"definitions module {str(path)!r} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except DefinitionError as exc:
        raise DefinitionError(f"definitions module {path}: {exc}") from exc
    except Exception as exc:
        raise DefinitionError(
            f"definitions module {path} failed to import: "
            f"{type(exc).__name__}: {exc}; fix the module"
        ) from exc
    finally:
        sys.modules.pop(module_name, None)
    views: dict[str, FeatureView] = {}
    sources: dict[str, Source] = {}
    services: dict[str, FeatureService] = {}
    for value in vars(module).values():
        if isinstance(value, FeatureView):
            value = _with_base(value, path.parent)
            views[value.name] = value
            sources[value.source.name] = value.source
        elif isinstance(value, Source):
            sources.setdefault(value.name, _source_with_base(value, path.parent))
        elif (
            isinstance(value, FeatureService)
            and services.setdefault(value.name, value) is not value
        ):
            raise DefinitionError(
                f"definitions module {path}: two feature services are named "
                f"{value.name!r}; give each its own name"
            )
    plans = {name: _checked_plan(path, service) for name, service in services.items()}
    for service in services.values():
        for view in _service_views(service):
            if view.name not in views:
                views[view.name] = _with_base(view, path.parent)
                sources.setdefault(view.source.name, views[view.name].source)
    if not views:
        raise DefinitionError(f"definitions module {path} declares no FeatureView")
    layouts = {name: view.layout() for name, view in views.items()}
    return Definitions(
        path=path,
        sources=sources,
        views=views,
        layouts=layouts,
        services=services,
        plans=plans,
    )


def _checked_plan(path: Path, service: FeatureService) -> ServicePlan:
    try:
        return service.service_plan()
    except DefinitionError as exc:
        raise DefinitionError(f"definitions module {path}: {exc}") from exc


def _service_views(service: FeatureService) -> list[FeatureView]:
    found: list[FeatureView] = []
    for item in service.features:
        if isinstance(item, OnDemand):
            found += [view for view, _ in item.views()]
        elif isinstance(item, FeatureView | FeatureSelection):
            found.append(_view_part(item)[0])
    return found


def _source_with_base(source: Source, base: Path) -> Source:
    if source.base_dir is not None:
        return source
    return dataclasses.replace(source, base_dir=base)


def _with_base(view: FeatureView, base: Path) -> FeatureView:
    return dataclasses.replace(view, source=_source_with_base(view.source, base))
