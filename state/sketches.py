"""Mergeable per-tile summaries that are not fixed-width numbers: quantile and distinct-count
sketches (Apache DataSketches) and the newest-k list.

- percentile: KLL (k=200): normalized rank error 1.33% for a single quantile query (99%
  confidence, DataSketches' published bound); exact while a window holds <= 200 values.
- distinct_count: HLL (lg_k=12, HLL_8): relative standard error 1.04/sqrt(4096) = 1.6%
  (about 3.2% at 95% confidence); exact counts are not promised even for small sets.
- last_k: the k newest values by (event time, offset), exact.

In a tile row a summary is held as a Python object: a raw value for a one-event tile, a sketch
object or list after a merge, or (on the write path) its stored bytes, decoded only when a
merge needs it (raw values are never bytes: flows.spec refuses to aggregate a bytes column).
`merge_objects` folds a run of them; `encode`/`decode` give bytes for the view store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasketches as ds
import orjson

KLL_K = 200
HLL_LG_K = 12
KLL_RANK_ERROR = ds.kll_doubles_sketch.get_normalized_rank_error(KLL_K, False)
HLL_RSE = 1.04 / (2**HLL_LG_K) ** 0.5

LastK = list[tuple[int, int, Any]]  # (event time, offset, value), oldest first


def merge_objects(kind: str, items: Sequence[Any], k: int = 0) -> Any:
    """Merge a run of summaries (or raw values) of one kind into one summary (None if empty)."""
    if kind not in ("kll", "hll", "lastk"):
        raise ValueError(f"unknown summary kind {kind!r}")
    items = [decode(kind, x) if isinstance(x, bytes) else x for x in items]
    if kind == "kll":
        return _merge_kll(items)
    if kind == "hll":
        return _merge_hll(items)
    return _merge_lastk(items, k)


def _merge_kll(items: Sequence[Any]) -> Any:
    sketch = None
    for item in items:
        if item is None:
            continue
        if sketch is None:
            sketch = ds.kll_doubles_sketch(KLL_K)
        if isinstance(item, ds.kll_doubles_sketch):
            sketch.merge(item)
        else:
            sketch.update(float(item))
    return sketch


def _merge_hll(items: Sequence[Any]) -> Any:
    union = None
    for item in items:
        if item is None:
            continue
        if union is None:
            union = ds.hll_union(HLL_LG_K)
        if isinstance(item, ds.hll_sketch):
            union.update(item)
        else:
            single = ds.hll_sketch(HLL_LG_K)
            single.update(item)
            union.update(single)
    return None if union is None else union.get_result(ds.tgt_hll_type.HLL_8)


def _merge_lastk(items: Sequence[Any], k: int) -> LastK | None:
    merged: LastK = []
    for item in items:
        if item:
            merged.extend(tuple(x) for x in item)
    if not merged:
        return None
    merged.sort(key=lambda x: (x[0], x[1]))
    return merged[-k:]


def result(kind: str, summary: Any, param: float | int | None) -> Any:
    """The feature value of a merged summary."""
    if summary is None:
        return None
    if kind == "kll":  # empty when the window's values are all NaN (the sketch skips NaN)
        return None if summary.is_empty() else float(summary.get_quantile(float(param or 0.5)))
    if kind == "hll":
        return round(summary.get_estimate())
    values = [x[2] for x in reversed(summary)]
    return values[: int(param or len(values))]


def encode(kind: str, summary: Any) -> bytes:
    if summary is None:
        return b""
    if isinstance(summary, bytes):  # stored bytes, untouched since they were read
        return summary
    if kind in ("kll", "hll"):
        if not isinstance(summary, ds.kll_doubles_sketch | ds.hll_sketch):
            summary = merge_objects(kind, [summary])
        return bytes(summary.serialize() if kind == "kll" else summary.serialize_compact())
    if not isinstance(summary, list):
        raise TypeError(f"last_k summary must be a list, got {type(summary).__name__}")
    return orjson.dumps(summary)


def decode(kind: str, raw: bytes) -> Any:
    if not raw:
        return None
    if kind == "kll":
        return ds.kll_doubles_sketch.deserialize(raw)
    if kind == "hll":
        return ds.hll_sketch.deserialize(raw)
    return [tuple(x) for x in orjson.loads(raw)]
