"""Sawtooth windows over tiles: which tiles a feature covers as of time t, and its value.

For window W and hop H, the value as of t covers events with start(t) <= ts < t, where
start(t) = floor(t / H) * H - W: the full tiles k in [floor(t/H) - W/H, floor(t/H) - 1] plus the
head tile floor(t/H). Lifetime features (hop 0) cover the single lifetime tile.

`window_bounds` serves the offline snapshot (many rows at once); `evaluate` is the online read
of one entity, through the same code as the read client (`state.read`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from state.layout import ColumnStats, FeatureDef, HopGroup, ViewLayout
from state.tiles import I64, TileBlock


def window_bounds(tiles: I64, hop_us: int, window_us: int, t: I64) -> tuple[I64, I64]:
    """Row ranges [lo, hi) of sorted `tiles` covering each window as of t (head tile included)."""
    if hop_us == 0:
        n = len(tiles)
        return np.zeros(len(t), dtype=np.int64), np.full(len(t), n, dtype=np.int64)
    head = t // hop_us
    lo = np.searchsorted(tiles, head - window_us // hop_us, side="left")
    hi = np.searchsorted(tiles, head, side="right")
    return lo.astype(np.int64, copy=False), hi.astype(np.int64, copy=False)


def column_stats(group: HopGroup, feature: FeatureDef) -> ColumnStats | None:
    for col in group.columns:
        if col.column == feature.column:
            return col
    return None


def evaluate(layout: ViewLayout, blocks: list[TileBlock], t: int) -> dict[str, Any]:
    """Every feature of one entity as of t (all of its applied events are assumed < t).

    The same function the read client runs on a stored blob (`state.read.evaluate_blob`).
    """
    from state.codec import encode_entity
    from state.read import evaluate_blob

    return evaluate_blob(layout, encode_entity(layout, blocks, 0), t)
