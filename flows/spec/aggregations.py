"""Aggregations a feature view declares: `count`, `sum`, `mean`, ... `percentile`, each resolved
to a storage-level `FeatureDef` (name, column, window, hop).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict, Unpack

from flows.errors import DefinitionError
from flows.spec.durations import default_hop, format_duration, parse_duration
from state.layout import (
    FeatureDef,
)


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
