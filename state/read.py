"""The online read: an entity's feature values straight from its stored tile blob.

A read is one RocksDB get and this function. The blob stores each hop group's tiles column-major
(`state.codec`), so every window is a binary search on the tile column plus a few C-level
reductions (`sum`, `min`, `max` over memoryview slices) of the columns its features need; no
structured array is built and no NumPy call is made for the common aggregations (but one sum
for a count over more than 128 tiles). The merge it
performs is `state.tiles.combine` specialised to one contiguous range; the oracle tests hold the
online read, the offline snapshot and the SQL oracle equal (separate code, equal by test).
Vector features (`list[float]`) read the group's vector section as (tiles, length) matrices
without copying: a window's element-wise mean is one NumPy sum over a slice of rows, its last
value one row. `state.batch_read` is this merge for many entities at once (NumPy across
entities), equal to it bit for bit.

`only` restricts a read to some features: the groups and windows of the others are skipped
(a feature service reads only the features it serves).
"""

from __future__ import annotations

import functools
import math
import operator
import struct
import sys
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from state import sketches
from state.codec import BLOB_HEADER_SIZE, blob_header, decode_objects, decode_vectors
from state.errors import CorruptStateError, InexactReadError
from state.layout import SUMMARY_KIND, FeatureDef, HopGroup, ViewLayout

_U32 = struct.Struct("<I")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PLAIN = frozenset({"events", "count", "sum", "mean"})


@dataclass(frozen=True, slots=True)
class CompiledFeature:
    """A feature compiled against its group's columns (indices into the dtype's fields)."""

    name: str
    agg: str
    column: str | None
    integral: bool
    cnt: int  # the column's non-null count (or the event count for count())
    value: int = -1  # sum / min / max / first / last value column
    m2: int = -1
    ts: int = -1  # first/last: event-time column
    off: int = -1  # first/last: offset column
    param: float | int | None = None
    vector: str = ""  # a vector feature: its vector field (`<column>.vsum` / `.vfirst` / `.vlast`)


@dataclass(frozen=True, slots=True)
class GroupPlan:
    hop: int
    width: int
    has_objects: bool
    windows: tuple[int, ...]
    features: tuple[tuple[CompiledFeature, ...], ...]  # per window
    names: frozenset[str]  # the group's feature names


_PLANS: dict[int, tuple[HopGroup, GroupPlan]] = {}


def group_plan(group: HopGroup) -> GroupPlan:
    cached = _PLANS.get(id(group))
    if cached is not None and cached[0] is group:
        return cached[1]
    pos = {name: i for i, name in enumerate(group.dtype.names or ())}
    integral = {c.column: c.integral for c in group.columns}
    windows = tuple(sorted({f.window_us for f in group.features}))
    compiled = tuple(
        tuple(_compile(f, pos, integral) for f in group.features if f.window_us == w)
        for w in windows
    )
    names = frozenset(f.name for f in group.features)
    plan = GroupPlan(group.hop_us, len(pos), bool(group.object_fields), windows, compiled, names)
    _PLANS[id(group)] = (group, plan)
    return plan


def _compile(f: FeatureDef, pos: dict[str, int], integral: dict[str, bool]) -> CompiledFeature:
    if f.column is None:
        return CompiledFeature(f.name, "events", None, False, pos["n"])
    c = f.column
    base = CompiledFeature(f.name, f.agg, c, integral[c], pos[f"{c}.cnt"], param=f.param)
    edge = f.agg in ("first", "last")
    if f"{c}.dim" in pos and f.agg != "count":  # a vector column
        if not edge:
            return replace(base, integral=False, vector=f"{c}.vsum")
        ts, off = pos[f"{c}.{f.agg}_ts"], pos[f"{c}.{f.agg}_off"]
        return replace(base, integral=False, ts=ts, off=off, vector=f"{c}.v{f.agg}")
    if edge:
        value = pos.get(f"{c}.{f.agg}", -1)  # -1: a string's first/last is an object stat
        return replace(base, value=value, ts=pos[f"{c}.{f.agg}_ts"], off=pos[f"{c}.{f.agg}_off"])
    stat = _VALUE_STAT.get(f.agg)
    if stat is not None:
        return replace(base, value=pos[f"{c}.{stat}"], m2=pos.get(f"{c}.m2", -1))
    return base


# The tile column a value aggregation reads.
_VALUE_STAT = {"sum": "sum", "mean": "sum", "var": "sum", "std": "sum", "min": "min", "max": "max"}


_SHORT = 128  # rows up to which Python's int sums and loops beat NumPy's call overhead


def _sequential_sum(values: Iterable[float]) -> float:
    return functools.reduce(operator.add, values, 0.0)


# The float64 sum of values added one by one in order from 0.0, as the batch read adds them
# (`np.bincount`): Python's `sum` up to 3.11 (the fastest); from 3.12 `sum` compensates
# rounding, so a plain left fold there.
ordered_sum: Callable[[Iterable[float]], float] = (
    sum if sys.version_info < (3, 12) else _sequential_sum
)


class Columns:
    """One hop group's section of one entity's blob: lazy typed views of its column-major tile
    block, its vector matrices, and its object stats (decoded on first use)."""

    __slots__ = (
        "_base",
        "_blob",
        "_mv",
        "_n",
        "_objects",
        "_objects_at",
        "_totals",
        "group",
        "vectors",
    )

    def __init__(
        self, blob: bytes, base: int, n: int, group: HopGroup, objects_at: int = -1
    ) -> None:
        self._blob, self._mv, self._base, self._n = blob, memoryview(blob), base, n
        self.group = group
        self._objects_at = objects_at  # where the object stats start (-1: the group has none)
        self._objects: dict[str, Any] | None = None
        self._totals: dict[tuple[int, int, int], float] = {}
        self.vectors: dict[str, Any] = {}  # vector field -> (n, length) float64 matrix

    @property
    def n(self) -> int:
        """The entity's tile rows in this group."""
        return self._n

    def objects(self) -> dict[str, Any]:
        """The group's object stats (strings, sketches, lists) as arrays per field."""
        if self._objects is None:
            fields = self.group.object_fields
            self._objects = decode_objects(fields, self._blob, self._objects_at, self._n)[0]
        return self._objects

    def total(self, j: int, lo: int, hi: int) -> float:
        """Sum of float column j over rows [lo, hi) added in row order from 0.0 (as the batch
        read adds them, whatever Python's `sum` does), computed once per read."""
        key = (j, lo, hi)
        found = self._totals.get(key)
        if found is None:
            found = self._totals[key] = ordered_sum(self.d(j)[lo:hi])
        return found

    def count(self, j: int, lo: int, hi: int) -> int:
        """Sum of int column j over rows [lo, hi) (exact in any order)."""
        if hi - lo <= _SHORT:
            return sum(self.q(j)[lo:hi])
        return int(self.array(j, lo, hi, np.int64).sum())

    def array(self, j: int, lo: int, hi: int, kind: type[np.generic]) -> Any:
        """Rows [lo, hi) of column j as a NumPy view of `kind` (np.int64 or np.float64)."""
        return np.frombuffer(self._mv, kind, hi - lo, self._at(j, lo))

    def _at(self, j: int, row: int) -> int:
        return self._base + 8 * (self._n * j + row)

    def q(self, j: int) -> memoryview:
        start = self._base + 8 * self._n * j
        return self._mv[start : start + 8 * self._n].cast("q")

    def d(self, j: int) -> memoryview[float]:
        start = self._base + 8 * self._n * j
        view: memoryview[float] = self._mv[start : start + 8 * self._n].cast("d")
        return view


@dataclass(frozen=True, slots=True)
class AsOf:
    """A read as of a time the caller chose: check that the stored tiles answer it exactly.

    `watermark` is the partition's newest event time (µs), which bounds how far back the
    writer has pruned tiles; None when nothing is recorded."""

    key: str
    watermark: int | None


def evaluate_blob(
    layout: ViewLayout,
    blob: bytes,
    t: int,
    as_of: AsOf | None = None,
    only: frozenset[str] | None = None,
) -> dict[str, Any]:
    """Every feature of one entity as of t, from its stored blob (with `only`, those features,
    in the layout's order: the groups and windows of the others are not read).

    With `as_of`, values are exact or refused: a window at t is exact when its tiles hold no
    event at or after t (t on the group's hop boundary, no stored row in the tile around t, or
    t after the entity's newest event) and the writer has not pruned any tile it covers.

    Raises:
        InexactReadError: with `as_of`, a window at t cannot be answered exactly.
    """
    newest = blob_header(layout, blob)
    try:
        values = _blob_values(layout, blob, t, newest, as_of, only)
    except (struct.error, TypeError, ValueError, IndexError) as exc:  # sections past its end
        raise corrupt_blob(layout, f"{type(exc).__name__}: {exc}") from exc
    if only is None:
        return {f.name: values[f.name] for f in layout.features}
    return {f.name: values[f.name] for f in layout.features if f.name in only}


def corrupt_blob(layout: ViewLayout, cause: str) -> CorruptStateError:
    """The error of a blob whose sections do not fit it (every read raises this one)."""
    return CorruptStateError(
        f"view {layout.view!r}: damaged tile blob ({cause}); rebuild the view with flows.replay"
    )


def _blob_values(
    layout: ViewLayout,
    blob: bytes,
    t: int,
    newest: int,
    as_of: AsOf | None,
    only: frozenset[str] | None,
) -> dict[str, Any]:
    pos = BLOB_HEADER_SIZE
    values: dict[str, Any] = {}
    for group in layout.groups:
        plan = group_plan(group)
        (n,) = _U32.unpack_from(blob, pos)
        block_at = pos + 4
        pos += 4 + 8 * n * plan.width
        objects_at = -1
        if plan.has_objects:
            (size,) = _U32.unpack_from(blob, pos)
            objects_at, pos = pos + 4, pos + 4 + size
        cols = Columns(blob, block_at, n, group, objects_at)
        wanted = only is None or not only.isdisjoint(plan.names)
        for name in group.vector_fields:
            if wanted:
                cols.vectors[name], pos = decode_vectors(blob, pos, n)
            else:
                pos += 4 + 8 * n * _U32.unpack_from(blob, pos)[0]
        if pos > len(blob):
            raise corrupt_blob(layout, "a section runs past the blob's end")
        if not wanted:
            continue
        # The last row of a group holds the events at exactly the newest event time; a read
        # as of that very time leaves them out (windows end before t).
        hi_limit = n - 1 if t <= newest and n else n
        if as_of is not None:
            _check_exact(layout, plan, cols, t, newest, as_of)
        values.update(_group_values(plan, cols, hi_limit, t, only))
    if pos != len(blob):
        raise corrupt_blob(layout, "its sections do not end where the blob ends")
    return values


def _check_exact(
    layout: ViewLayout, plan: GroupPlan, cols: Columns, t: int, newest: int, as_of: AsOf
) -> None:
    group, n = cols.group, cols.n
    # Rows before the last are the entity's events before its newest event time (the last
    # row is its boundary row: the events at exactly that time, which every read leaves out).
    mixed = False
    if t < newest and n > 1:
        if not plan.hop:
            mixed = True  # one lifetime row holds every earlier event
        elif t % plan.hop:
            head = t // plan.hop
            mixed = bisect_left(cols.q(0), head, 0, n - 1) < bisect_right(cols.q(0), head, 0, n - 1)
    pruned = pruned_features(group, plan, t, as_of.watermark)
    if mixed or pruned:
        raise InexactReadError(inexact_message(layout, group, t, newest, as_of, mixed, pruned))


def pruned_features(group: HopGroup, plan: GroupPlan, t: int, wm: int | None) -> list[str]:
    """The group's features whose window at t reaches behind the tiles kept at watermark wm
    (the partition's newest event time: the writer prunes tiles older than the longest
    window behind it)."""
    if not plan.hop or wm is None or t >= wm:
        return []
    oldest_kept = wm // plan.hop - group.max_window_us // plan.hop
    return [
        f.name
        for w, feats in zip(plan.windows, plan.features, strict=True)
        if t // plan.hop - w // plan.hop < oldest_kept
        for f in feats
    ]


def inexact_message(
    layout: ViewLayout,
    group: HopGroup,
    t: int,
    newest: int,
    as_of: AsOf,
    mixed: bool,
    pruned: list[str],
) -> str:
    if mixed:
        names = ", ".join(f.name for f in group.features)
        hop = f"{group.hop_us // 1_000_000}s hop" if group.hop_us else "lifetime"
        cause = f"the stored tiles of {names} ({hop}) hold events before and after it together"
    else:
        cause = (
            f"the tiles of {', '.join(pruned)} that far back were pruned (retention ends "
            f"behind the partition's newest event, {_iso(as_of.watermark or 0)})"
        )
    return (
        f"view {layout.view!r}, key {as_of.key!r}: no exact value as of {_iso(t)}: {cause}; "
        f"the key's newest event is at {_iso(newest)}. An online read is exact after the "
        "key's newest event, or on a hop boundary within retention; for past points in time "
        "use flows.snapshot"
    )


def _iso(us: int) -> str:
    return (_EPOCH + timedelta(microseconds=us)).isoformat().replace("+00:00", "Z")


def _group_values(
    plan: GroupPlan, cols: Columns, hi_limit: int, t: int, only: frozenset[str] | None = None
) -> dict[str, Any]:
    """The features of one group (those in `only`, if given) from its tiles in [.., hi_limit)."""
    values: dict[str, Any] = {}
    n = cols.n
    if plan.hop and n:
        tiles = cols.q(0)
        head = t // plan.hop
        # tiles that start before t: at a hop boundary the tile at t holds only later events
        hi = min(bisect_left(tiles, -(-t // plan.hop)), hi_limit)
        bounds = [bisect_left(tiles, head - w // plan.hop, 0, hi) for w in plan.windows]
    else:
        hi, bounds = hi_limit, [0] * len(plan.windows)
    for lo, feats in zip(bounds, plan.features, strict=True):
        counts: dict[int, int] = {}
        for f in feats:
            if only is not None and f.name not in only:
                continue
            cnt = counts.get(f.cnt)
            if cnt is None:
                cnt = counts[f.cnt] = cols.count(f.cnt, lo, hi)
            agg = f.agg
            if agg in _PLAIN and not f.vector:  # inline: feature_value's arithmetic
                if agg == "sum":
                    total = cols.total(f.value, lo, hi)
                    values[f.name] = round(total) if f.integral else float(total)
                elif agg == "mean":
                    values[f.name] = cols.total(f.value, lo, hi) / cnt if cnt else None
                else:
                    values[f.name] = cnt
            elif agg in SUMMARY_KIND and cnt:
                values[f.name] = summary_value(cols.objects(), lo, hi, f)
            else:
                values[f.name] = feature_value(f, cols, lo, hi, cnt)
    return values


def feature_value(f: CompiledFeature, cols: Columns, lo: int, hi: int, cnt: int) -> Any:
    """One feature's value over tile rows [lo, hi), which hold `cnt` events."""
    agg = f.agg
    if agg in ("events", "count"):
        return cnt
    if agg == "sum":
        total = cols.total(f.value, lo, hi)
        return round(total) if f.integral else float(total)
    if cnt == 0:
        return None
    if f.vector:
        matrix = cols.vectors[f.vector]
        if agg == "mean":
            return (_vector_sum(matrix, lo, hi) / cnt).tolist()
        return matrix[_edge_row(cols, f, lo, hi)].tolist()
    if agg == "mean":
        return cols.total(f.value, lo, hi) / cnt
    if agg in ("min", "max"):
        found = (min if agg == "min" else max)(cols.d(f.value)[lo:hi])
        return int(found) if f.integral else found
    if agg in ("var", "std"):
        var = max(_m2(cols, f, lo, hi, cnt) / cnt, 0.0)
        return var if agg == "var" else math.sqrt(var)
    pick = _edge_row(cols, f, lo, hi)
    if f.value >= 0:
        v = cols.d(f.value)[pick]
        return int(v) if f.integral else v
    return cols.objects()[f"{f.column}.{agg}"][pick]


def _vector_sum(matrix: Any, lo: int, hi: int) -> Any:
    """Rows [lo, hi) of a vector matrix added element-wise in row order (what the batch read's
    `np.bincount` and the compiled read add). NumPy adds the rows of a (rows, d) matrix so for
    d > 1, but a one-column matrix pairwise, as a flat array: that one is added in order."""
    if matrix.shape[1] == 1 and hi - lo > 1:
        return np.cumsum(matrix[lo:hi, 0])[-1:]
    return matrix[lo:hi].sum(axis=0)


def _m2(cols: Columns, f: CompiledFeature, lo: int, hi: int, cnt: int) -> float:
    """Chan's merge of the window's tiles: sum(M2_i) + sum(n_i * (mean_i - mean)^2)."""
    mean = cols.total(f.value, lo, hi) / cnt
    if hi - lo <= _SHORT:
        spread = 0.0
        for n_i, s_i in zip(cols.q(f.cnt)[lo:hi], cols.d(f.value)[lo:hi], strict=True):
            if n_i:
                dev = s_i / n_i - mean
                spread += n_i * dev * dev
    else:  # the same terms, vectorized, added in the same order
        counts = cols.array(f.cnt, lo, hi, np.int64)
        used = counts != 0
        n_i = counts[used].astype(np.float64)
        dev = cols.array(f.value, lo, hi, np.float64)[used] / n_i - mean
        terms = n_i * dev * dev
        spread = float(np.cumsum(terms)[-1]) if len(terms) else 0.0
    return cols.total(f.m2, lo, hi) + spread


def _edge_row(cols: Columns, f: CompiledFeature, lo: int, hi: int) -> int:
    """Row of the window's latest (last) or earliest (first) value by (event time, offset)."""
    ts = cols.q(f.ts)[lo:hi].tolist()
    off = cols.q(f.off)[lo:hi]
    if f.agg == "last":
        best = max(ts)
        candidates = [i for i, v in enumerate(ts) if v == best]
        return lo + max(candidates, key=off.__getitem__)
    best = min(ts)
    candidates = [i for i, v in enumerate(ts) if v == best]
    return lo + min(candidates, key=off.__getitem__)


def summary_value(objs: dict[str, Any], lo: int, hi: int, f: CompiledFeature) -> Any:
    kind = SUMMARY_KIND[f.agg]
    items = objs[f"{f.column}.{kind}"][lo:hi].tolist()
    k = int(f.param or 0) if kind == "lastk" else 0
    return sketches.result(kind, sketches.merge_objects(kind, items, k), f.param)
