"""Sawtooth windows over tiles: which tiles a feature covers as of time t, and its value.

For window W and hop H, the value as of t covers events with start(t) <= ts < t, where
start(t) = floor(t / H) * H - W: the full tiles k in [floor(t/H) - W/H, floor(t/H) - 1] plus the
head tile floor(t/H). Lifetime features (hop 0) cover the single lifetime tile.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from state.layout import ColumnStats, FeatureDef, HopGroup, ViewLayout
from state.tiles import I64, TileBlock, finalize, reduce_ranges


def window_bounds(tiles: I64, hop_us: int, window_us: int, t: I64) -> tuple[I64, I64]:
    """Row ranges [lo, hi) of sorted `tiles` covering each window as of t (head tile included)."""
    if hop_us == 0:
        n = len(tiles)
        return np.zeros(len(t), dtype=np.int64), np.full(len(t), n, dtype=np.int64)
    head = t // hop_us
    lo = np.searchsorted(tiles, head - window_us // hop_us, side="left")
    hi = np.searchsorted(tiles, head, side="right")
    return lo.astype(np.int64), hi.astype(np.int64)


def column_stats(group: HopGroup, feature: FeatureDef) -> ColumnStats | None:
    for col in group.columns:
        if col.column == feature.column:
            return col
    return None


def evaluate(layout: ViewLayout, blocks: list[TileBlock], t: int) -> dict[str, Any]:
    """Every feature of one entity as of t (all of its applied events are assumed < t)."""
    values: dict[str, Any] = {}
    at = np.array([t], dtype=np.int64)
    for group, block in zip(layout.groups, blocks, strict=True):
        by_window: dict[int, TileBlock] = {}
        for feature in group.features:
            merged = by_window.get(feature.window_us)
            if merged is None:
                lo, hi = window_bounds(block.rows["tile"], group.hop_us, feature.window_us, at)
                merged = by_window[feature.window_us] = reduce_ranges(group, block, lo, hi)
            values[feature.name] = finalize(feature, column_stats(group, feature), merged)[0]
    return {f.name: values[f.name] for f in layout.features}


def empty_values(layout: ViewLayout) -> dict[str, Any]:
    """Feature values of an entity with no events: 0 for count and sum, None otherwise."""
    return {f.name: 0 if f.agg in ("count", "sum") else None for f in layout.features}
