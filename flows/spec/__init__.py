"""Feature definitions: the Python API a data scientist writes.

A definitions module declares sources, feature views, request sources, on-demand functions and
feature services; `load_definitions` imports it and validates every view against its source's
Avro schema and every service against its views. Everything downstream (the dataflow, replay,
snapshots, the read client) is derived from these objects through `FeatureView.layout()` and
`FeatureService`'s plan.

    durations      "30m" -> microseconds, default hops
    aggregations   count, sum, mean, min, max, var, std, first, last, last_k,
                   distinct_count, percentile
    sources        Source
    views          FeatureView (key=, columns=, transform=), view[["a", "b"]]
    services       RequestSource, on_demand, FeatureService
    definitions    load_definitions, Definitions
"""

from __future__ import annotations

from flows.spec.aggregations import (
    Aggregation,
    Tags,
    count,
    distinct_count,
    first,
    last,
    last_k,
    max,
    mean,
    min,
    percentile,
    std,
    sum,
    var,
)
from flows.spec.definitions import Definitions, load_definitions
from flows.spec.durations import default_hop, format_duration, parse_duration
from flows.spec.services import FeatureService, OnDemand, RequestSource, on_demand
from flows.spec.sources import Source
from flows.spec.views import DERIVED_TYPES, FeatureSelection, FeatureView

__all__ = [
    "DERIVED_TYPES",
    "Aggregation",
    "Definitions",
    "FeatureSelection",
    "FeatureService",
    "FeatureView",
    "OnDemand",
    "RequestSource",
    "Source",
    "Tags",
    "count",
    "default_hop",
    "distinct_count",
    "first",
    "format_duration",
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
