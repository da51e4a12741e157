"""Sawtooth windows over tiles: which tiles a feature covers as of time t, and its value.

For window W and hop H, the value as of t covers events with start(t) <= ts < t, where
start(t) = floor(t / H) * H - W: the full tiles k in [floor(t/H) - W/H, floor(t/H) - 1] plus the
head tile floor(t/H). Lifetime features (hop 0) cover the single lifetime tile.

`evaluate` is the online read of one entity. It merges each window's tiles with a handful of
NumPy calls over a 2-D view of the tile rows (every tile field is 8 bytes wide), which is the
same merge as `state.tiles.combine` specialised to one range; tests hold the two equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from state import sketches
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
    return lo.astype(np.int64), hi.astype(np.int64)


def column_stats(group: HopGroup, feature: FeatureDef) -> ColumnStats | None:
    for col in group.columns:
        if col.column == feature.column:
            return col
    return None


@dataclass(frozen=True, slots=True)
class _Feature:
    name: str
    agg: str
    integral: bool
    column: str | None
    a: int = 0  # index of the primary field (meaning depends on agg)
    b: int = 0  # index of a second field
    c: int = 0  # index of a third field
    cnt: int = 0  # index of the column's non-null count
    param: float | int | None = None


@dataclass(frozen=True, slots=True)
class _Plan:
    """A hop group compiled for reads: field positions and the features of each window."""

    hop: int
    width: int
    n_count: int  # leading int columns to sum: tile, n, one cnt per column
    float_start: int
    n_sum: int  # leading float columns to sum: sums and m2s
    min_cols: slice | None
    max_cols: slice | None
    windows: tuple[int, ...]
    features: tuple[tuple[_Feature, ...], ...]  # per window


_PLANS: dict[int, tuple[HopGroup, _Plan]] = {}


def _plan(group: HopGroup) -> _Plan:
    cached = _PLANS.get(id(group))
    if cached is not None and cached[0] is group:
        return cached[1]
    names = list(group.dtype.names or ())
    pos = {n: i for i, n in enumerate(names)}
    float_start = next((i for i, n in enumerate(names) if group.dtype[n].kind == "f"), len(names))
    floats = names[float_start:]
    n_sum = sum(1 for n in floats if n.endswith((".sum", ".m2")))

    def span(kind: str) -> slice | None:
        idx = [pos[n] for n in floats if n.endswith(kind)]
        return slice(idx[0], idx[-1] + 1) if idx else None

    windows = tuple(sorted({f.window_us for f in group.features}))
    compiled = tuple(
        tuple(_compile(f, group, pos) for f in group.features if f.window_us == w) for w in windows
    )
    plan = _Plan(
        group.hop_us,
        len(names),
        2 + len(group.columns),
        float_start,
        n_sum,
        span(".min"),
        span(".max"),
        windows,
        compiled,
    )
    _PLANS[id(group)] = (group, plan)
    return plan


def _compile(f: FeatureDef, group: HopGroup, pos: dict[str, int]) -> _Feature:
    if f.column is None:
        return _Feature(f.name, "events", False, None, pos["n"])
    col = column_stats(group, f)
    assert col is not None
    c = f.column
    cnt = pos[f"{c}.cnt"]
    if f.agg in _SUMMARY_KIND:
        return _Feature(f.name, f.agg, False, c, 0, 0, 0, cnt, f.param)
    if f.agg in ("first", "last"):
        value = pos.get(f"{c}.{f.agg}", -1)
        return _Feature(
            f.name,
            f.agg,
            col.integral,
            c,
            pos[f"{c}.{f.agg}_ts"],
            pos[f"{c}.{f.agg}_off"],
            value,
            cnt,
        )
    field = {
        "sum": "sum",
        "mean": "sum",
        "var": "sum",
        "std": "sum",
        "min": "min",
        "max": "max",
    }.get(f.agg)
    m2 = pos.get(f"{c}.m2", 0)
    return _Feature(
        f.name, f.agg, col.integral, c, cnt, pos[f"{c}.{field}"] if field else 0, m2, cnt
    )


def evaluate(layout: ViewLayout, blocks: list[TileBlock], t: int) -> dict[str, Any]:
    """Every feature of one entity as of t (all of its applied events are assumed < t)."""
    values: dict[str, Any] = {}
    for group, block in zip(layout.groups, blocks, strict=True):
        rows = block.rows
        plan = _plan(group)
        raw = rows if rows.flags.c_contiguous else np.ascontiguousarray(rows)
        i8 = raw.view(np.int64).reshape(len(rows), plan.width)
        evaluate_rows(plan, i8, block.objs, t, values)
    return {f.name: values[f.name] for f in layout.features}


def evaluate_rows(
    plan: _Plan, i8: npt.NDArray[np.int64], objs: dict[str, Any], t: int, values: dict[str, Any]
) -> None:
    f8 = i8.view(np.float64)
    n = len(i8)
    if plan.hop:
        head = t // plan.hop
        tiles = i8[:, 0]
        bounds = np.searchsorted(tiles, [head - w // plan.hop for w in plan.windows]).tolist()
        hi = int(np.searchsorted(tiles, head, side="right"))
    else:
        bounds, hi = [0] * len(plan.windows), n
    for lo, feats in zip(bounds, plan.features, strict=True):
        _window_values(plan, i8[lo:hi], f8[lo:hi], objs, lo, feats, values)


def _window_values(
    plan: _Plan,
    i8: npt.NDArray[np.int64],
    f8: npt.NDArray[np.float64],
    objs: dict[str, Any],
    offset: int,
    feats: tuple[_Feature, ...],
    values: dict[str, Any],
) -> None:
    isum = i8[:, : plan.n_count].sum(axis=0).tolist()
    fs = plan.float_start
    fsum = [0.0] * fs + f8[:, fs : fs + plan.n_sum].sum(axis=0).tolist()
    fmin = fmax = None
    empty = len(i8) == 0
    for f in feats:
        agg = f.agg
        if agg == "events":
            values[f.name] = int(isum[f.a])
            continue
        cnt = int(isum[f.cnt])
        if agg == "count":
            values[f.name] = cnt
        elif agg == "sum":
            total = fsum[f.b]
            values[f.name] = round(total) if f.integral else float(total)
        elif empty or cnt == 0:
            values[f.name] = None
        elif agg in _SUMMARY_KIND:
            values[f.name] = _summary(objs, offset, len(i8), f)
        elif agg == "mean":
            values[f.name] = float(fsum[f.b] / cnt)
        elif agg in ("var", "std"):
            var = max(_m2(i8, f8, f, fsum, cnt) / cnt, 0.0)
            values[f.name] = var if agg == "var" else math.sqrt(var)
        elif agg in ("min", "max"):
            if agg == "min":
                fmin = fmin if fmin is not None else _reduce(f8, plan.min_cols, np.min)
                v = fmin[f.b]
            else:
                fmax = fmax if fmax is not None else _reduce(f8, plan.max_cols, np.max)
                v = fmax[f.b]
            values[f.name] = None if math.isinf(v) else (int(v) if f.integral else float(v))
        else:
            values[f.name] = _edge(i8, f8, objs, offset, f)


_SUMMARY_KIND = {"percentile": "kll", "distinct_count": "hll", "last_k": "lastk"}


def _summary(objs: dict[str, Any], offset: int, n: int, f: _Feature) -> Any:
    kind = _SUMMARY_KIND[f.agg]
    items = objs[f"{f.column}.{kind}"][offset : offset + n]
    k = int(f.param or 0) if kind == "lastk" else 0
    return sketches.result(kind, sketches.merge_objects(kind, items, k), f.param)


def _reduce(f8: npt.NDArray[np.float64], cols: slice | None, fn: Any) -> dict[int, float]:
    assert cols is not None
    found = fn(f8[:, cols], axis=0).tolist()
    return {cols.start + i: v for i, v in enumerate(found)}


def _m2(
    i8: npt.NDArray[np.int64], f8: npt.NDArray[np.float64], f: _Feature, fsum: list[float], cnt: int
) -> float:
    n_i = i8[:, f.a]
    s_i = f8[:, f.b]
    mean = fsum[f.b] / cnt
    with np.errstate(invalid="ignore", divide="ignore"):
        dev = np.where(n_i > 0, s_i / np.maximum(n_i, 1) - mean, 0.0)
    return float(fsum[f.c] + np.dot(n_i * dev, dev))


def _edge(
    i8: npt.NDArray[np.int64],
    f8: npt.NDArray[np.float64],
    objs: dict[str, Any],
    offset: int,
    f: _Feature,
) -> Any:
    ts, off = i8[:, f.a], i8[:, f.b]
    if f.agg == "last":
        best = ts == ts.max()
        pick = int(np.flatnonzero(best)[np.argmax(off[best])])
    else:
        best = ts == ts.min()
        pick = int(np.flatnonzero(best)[np.argmin(off[best])])
    if f.c >= 0:
        v = f8[pick, f.c]
        return int(v) if f.integral else float(v)
    return objs[f"{f.column}.{f.agg}"][offset + pick]


def empty_values(layout: ViewLayout) -> dict[str, Any]:
    """Feature values of an entity with no events (0 for count and sum, None otherwise)."""
    from state.tiles import empty_block

    return evaluate(layout, [empty_block(g) for g in layout.groups], 0)
