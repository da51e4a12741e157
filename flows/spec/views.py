"""A `FeatureView`: features over one source, keyed by its key or any column(s), with an optional
transform; `layout()` validates it and gives the `ViewLayout` the store and the core use.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flows.errors import DefinitionError
from flows.spec.aggregations import Aggregation, Tags
from flows.spec.durations import parse_duration
from flows.spec.sources import Source
from state.layout import (
    AGGREGATIONS,
    VECTOR_AGGREGATIONS,
    VECTOR_TYPES,
    FeatureDef,
    ViewLayout,
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


_NUMERIC = {"int", "long", "float", "double"}
_STRINGY = {"string", "enum", "boolean"}
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
