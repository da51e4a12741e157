"""What GET /v1/views and GET /healthz answer: the live views, their features with types and
windows, the live version, the newest applied event time, and whether the client is caught up.

The newest applied event time is read from each partition's progress record through a
short-lived RocksDB secondary (`state.store.read_partition_progress`), so it is cached for
`CATALOG_TTL_S`; names come from the store's own listing, never from a request.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from flows.spec import format_duration
from state.client import FeatureClient
from state.layout import FeatureDef, ViewLayout
from state.store import ViewStore, read_partition_progress

CATALOG_TTL_S = 1.0
CAUGHT_UP_WITHIN_S = 5.0  # healthy while the last full catch-up round is at most this old
_DOUBLE_AGGS = frozenset({"mean", "var", "std", "percentile"})
_COLUMN_AGGS = frozenset({"min", "max", "first", "last"})


def view_catalog(client: FeatureClient) -> dict[str, Any]:
    """Every live view: key columns, features (name, aggregation, column, type, window, hop),
    the version read, the newest applied event time, and the client's catch-up age."""
    views = [_view_entry(client, name) for name in client.views()]
    health = client.health()
    caught_up = health.last_catch_up
    return {
        "views": views,
        "freshness_s": None if caught_up is None else round(time.time() - caught_up, 3),
    }


def health_report(client: FeatureClient) -> tuple[bool, dict[str, Any]]:
    """(ready, details): ready once every live view is open and the client caught up lately."""
    names = client.views()
    for name in names:
        if name not in client.health().versions:
            client.layout(name)  # opens it; the catch-up thread follows it from then on
    health = client.health()
    age = None if health.last_catch_up is None else time.time() - health.last_catch_up
    missing = [n for n in names if n not in health.versions]
    ready = bool(names) and not missing and age is not None and age <= CAUGHT_UP_WITHIN_S
    return ready, {
        "status": "ready" if ready else "starting",
        "views": names,
        "not_open": missing,
        "last_catch_up_age_s": None if age is None else round(age, 3),
        "catch_up_errors": health.errors,
        "last_error": health.last_error,
    }


def _view_entry(client: FeatureClient, name: str) -> dict[str, Any]:
    layout = client.layout(name)
    version = client.health().versions.get(name)
    newest = _newest_event_us(client, name, version, layout)
    return {
        "name": name,
        "source": layout.source,
        "key": list(layout.key_columns),
        "version": version,
        "partitions": layout.partitions,
        "features": [_feature_entry(f, layout) for f in layout.features],
        "newest_event_time": None if newest is None else _iso(newest),
        "newest_event_age_s": None if newest is None else round(time.time() - newest / 1e6, 3),
    }


def _feature_entry(f: FeatureDef, layout: ViewLayout) -> dict[str, Any]:
    return {
        "name": f.name,
        "agg": f.agg,
        "column": f.column,
        "type": feature_type(f, layout.column_types),
        "window": format_duration(f.window_us) if f.window_us else "lifetime",
        "hop": format_duration(f.hop_us) if f.hop_us else None,
    }


def feature_type(f: FeatureDef, column_types: dict[str, str]) -> str:
    """The type of the values a read gives for the feature (Avro type names)."""
    column = column_types.get(f.column or "", "double")
    if f.agg in ("count", "distinct_count"):
        return "long"
    if f.agg == "sum":
        return "long" if column in ("int", "long") else "double"
    if f.agg in _DOUBLE_AGGS:
        return "array<double>" if column.startswith("array<") else "double"
    if f.agg == "last_k":
        return f"array<{column}>"
    return column if f.agg in _COLUMN_AGGS else "double"


def _newest_event_us(
    client: FeatureClient, name: str, version: int | None, layout: ViewLayout
) -> int | None:
    if version is None:
        return None
    store = ViewStore(client.root, create=False)  # `name` comes from the store's listing
    marks = [
        read_partition_progress(store.partition_dir(name, version, p)).newest()
        for p in range(layout.partitions)
    ]
    present = [m for m in marks if m is not None]
    return max(present) if present else None


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, tz=UTC).isoformat().replace("+00:00", "Z")
