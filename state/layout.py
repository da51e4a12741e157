"""The storage-level description of a feature view: features, hop groups and the tile row layout.

`flows.spec.FeatureView.layout()` produces a `ViewLayout`; the view store persists it as JSON
beside the tiles, so the read client rebuilds the exact same layout without importing the
definitions module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

AGGREGATIONS = (
    "count",
    "sum",
    "mean",
    "min",
    "max",
    "var",
    "std",
    "first",
    "last",
    "last_k",
    "distinct_count",
    "percentile",
)
NUMERIC_TYPES = frozenset({"int", "long", "float", "double"})
INTEGRAL_TYPES = frozenset({"int", "long"})
# Avro `array` of float/double fields: embeddings. Only these aggregations accept them.
VECTOR_TYPES = frozenset({"array<float>", "array<double>"})
VECTOR_AGGREGATIONS = ("count", "first", "last", "mean")

# Which per-tile statistics each aggregation needs (besides the event count "n").
_STATS: dict[str, tuple[str, ...]] = {
    "count": ("cnt",),
    "sum": ("cnt", "sum"),
    "mean": ("cnt", "sum"),
    "var": ("cnt", "sum", "m2"),
    "std": ("cnt", "sum", "m2"),
    "min": ("cnt", "min"),
    "max": ("cnt", "max"),
    "first": ("cnt", "first"),
    "last": ("cnt", "last"),
    "last_k": ("cnt", "lastk"),
    "distinct_count": ("cnt", "hll"),
    "percentile": ("cnt", "kll"),
}
SKETCH_STATS = frozenset({"hll", "kll", "lastk"})
# Aggregation -> the summary kind its tiles keep (a sketch or a list): read from `_STATS`.
SUMMARY_KIND: dict[str, str] = {
    agg: stat for agg, stats in _STATS.items() for stat in stats if stat in SKETCH_STATS
}


@dataclass(frozen=True, slots=True)
class FeatureDef:
    """One resolved feature: name, aggregation, column (None = events), window and hop in µs."""

    name: str
    agg: str
    column: str | None
    window_us: int  # 0 = lifetime
    hop_us: int  # 0 = lifetime
    param: float | int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "agg": self.agg,
            "column": self.column,
            "window_us": self.window_us,
            "hop_us": self.hop_us,
            "param": self.param,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeatureDef:
        return cls(
            name=data["name"],
            agg=data["agg"],
            column=data["column"],
            window_us=int(data["window_us"]),
            hop_us=int(data["hop_us"]),
            param=data.get("param"),
        )


@dataclass(frozen=True, slots=True)
class ColumnStats:
    """The statistics one hop group keeps for one column."""

    column: str
    avro_type: str
    stats: frozenset[str]

    @property
    def numeric(self) -> bool:
        return self.avro_type in NUMERIC_TYPES

    @property
    def integral(self) -> bool:
        return self.avro_type in INTEGRAL_TYPES

    @property
    def vector(self) -> bool:
        return self.avro_type in VECTOR_TYPES

    @property
    def vector_stats(self) -> tuple[str, ...]:
        """The per-tile vectors a vector column keeps: element-wise sum, first and last value."""
        if not self.vector:
            return ()
        kept = (("sum", "vsum"), ("first", "vfirst"), ("last", "vlast"))
        return tuple(f"{self.column}.{v}" for stat, v in kept if stat in self.stats)


@dataclass(frozen=True)
class HopGroup:
    """Features sharing one hop share one tile sequence; hop 0 is the lifetime group (one tile)."""

    hop_us: int
    features: tuple[FeatureDef, ...]
    columns: tuple[ColumnStats, ...]
    last_k: int = 0

    @property
    def max_window_us(self) -> int:
        return max(f.window_us for f in self.features)

    def column_stats(self, feature: FeatureDef) -> ColumnStats | None:
        """The stats this group keeps for a feature's column (None for a count of events)."""
        for col in self.columns:
            if col.column == feature.column:
                return col
        return None

    @cached_property
    def dtype(self) -> np.dtype[Any]:
        """Fixed-width tile row; object-valued stats (strings, sketches) and vectors live beside it.

        Every field is 8 bytes; integer fields come first, then float fields grouped by kind
        (sum, m2, min, max, first, last), so a read can reduce each kind with one NumPy call
        over a 2-D view of the rows. A vector column keeps its count, the length of its
        vectors in the tile (`.dim`, 0 when it holds none) and the first/last event time and
        offset here; its vectors are in `vector_fields`.
        """
        ints: list[tuple[str, str]] = [("tile", "<i8"), ("n", "<i8")]
        ints += [(f"{col.column}.cnt", "<i8") for col in self.columns]
        ints += [(f"{col.column}.dim", "<i8") for col in self.columns if col.vector]
        floats: dict[str, list[tuple[str, str]]] = {
            k: [] for k in ("sum", "m2", "min", "max", "first", "last")
        }
        for col in self.columns:
            c = col.column
            for stat in ("sum", "m2", "min", "max"):
                if stat in col.stats and not col.vector:
                    floats[stat].append((f"{c}.{stat}", "<f8"))
            for edge in ("first", "last"):
                if edge in col.stats:
                    ints.append((f"{c}.{edge}_ts", "<i8"))
                    ints.append((f"{c}.{edge}_off", "<i8"))
                    if col.numeric:
                        floats[edge].append((f"{c}.{edge}", "<f8"))
        return np.dtype(ints + [f for kind in floats.values() for f in kind])

    @cached_property
    def vector_fields(self) -> tuple[str, ...]:
        """Per-row vectors (`<column>.vsum`, `.vfirst`, `.vlast`): a float64 (rows, dim) block
        each, beside the rows."""
        return tuple(name for col in self.columns for name in col.vector_stats)

    @cached_property
    def object_fields(self) -> tuple[str, ...]:
        """Per-row Python-object stats: non-numeric first/last values and sketches."""
        names: list[str] = []
        for col in self.columns:
            for edge in ("first", "last"):
                if edge in col.stats and not col.numeric and not col.vector:
                    names.append(f"{col.column}.{edge}")
            for sketch in ("lastk", "hll", "kll"):
                if sketch in col.stats:
                    names.append(f"{col.column}.{sketch}")
        return tuple(names)


@dataclass(frozen=True)
class ViewLayout:
    """A feature view as the store and the aggregation core see it."""

    view: str
    source: str
    key: str
    timestamp: str
    partitions: int
    features: tuple[FeatureDef, ...]
    column_types: dict[str, str] = field(default_factory=dict)
    allowed_lateness_us: int = 0
    keys: tuple[str, ...] = ()  # the view's own key columns; () = the source key (`key`)

    @property
    def key_columns(self) -> tuple[str, ...]:
        """The columns whose values make an entity's key (one, or the parts of a tuple)."""
        return self.keys or (self.key,)

    @property
    def rekeyed(self) -> bool:
        """Keyed otherwise than its source: its events are re-partitioned by the view's key."""
        return bool(self.keys)

    @cached_property
    def groups(self) -> tuple[HopGroup, ...]:
        hops = sorted({f.hop_us for f in self.features})
        return tuple(self._group(h) for h in hops)

    def _group(self, hop_us: int) -> HopGroup:
        feats = tuple(f for f in self.features if f.hop_us == hop_us)
        stats: dict[str, set[str]] = {}
        for f in feats:
            if f.column is not None:
                stats.setdefault(f.column, set()).update(_STATS[f.agg])
        cols = tuple(
            ColumnStats(c, self.column_types[c], frozenset(s)) for c, s in sorted(stats.items())
        )
        k = max((int(f.param or 0) for f in feats if f.agg == "last_k"), default=0)
        return HopGroup(hop_us=hop_us, features=feats, columns=cols, last_k=k)

    @cached_property
    def retention_us(self) -> int | None:
        """How far behind a partition's newest event time an event may be and still count.

        None when the view has a lifetime feature (no event is ever too late).
        """
        if any(f.window_us == 0 for f in self.features):
            return None
        return max(f.window_us + f.hop_us for f in self.features) + self.allowed_lateness_us

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(sorted(self.column_types))

    def to_json(self) -> dict[str, Any]:
        return {
            "view": self.view,
            "source": self.source,
            "key": self.key,
            "timestamp": self.timestamp,
            "partitions": self.partitions,
            "features": [f.to_json() for f in self.features],
            "column_types": self.column_types,
            "allowed_lateness_us": self.allowed_lateness_us,
            **({"keys": list(self.keys)} if self.keys else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ViewLayout:
        return cls(
            view=data["view"],
            source=data["source"],
            key=data["key"],
            timestamp=data["timestamp"],
            partitions=int(data["partitions"]),
            features=tuple(FeatureDef.from_json(f) for f in data["features"]),
            column_types=dict(data["column_types"]),
            allowed_lateness_us=int(data.get("allowed_lateness_us", 0)),
            keys=tuple(data.get("keys", ())),
        )

    def same_semantics(self, other: ViewLayout) -> bool:
        """True when both layouts compute the same features from the same events."""
        return self.to_json() == other.to_json()
