"""The batch read: many entities' feature values from their tile blobs at once, vectorized
across entities with NumPy.

`FeatureClient.get_many` (and the feature services on top of it) fetch a batch's blobs with one
RocksDB multi-get per partition and hand them here. The blobs are joined into one buffer that
strided NumPy views read at any byte address (as u32, int64 or float64), so for the whole batch
each hop group's section is parsed, each window's rows are found and each numeric feature
(count, sum, mean, min, max, var/std, numeric first/last) is merged with a few NumPy calls per
group and window, not per entity:

    blobs --join--> one buffer --per group: n, column addresses--> one row table (entity, row)
          --per window: rows inside [start(t), t)--> bincount / reduceat per entity --> values

Equal to the single read (`state.read.evaluate_blob`) bit for bit, by construction of the
arithmetic and by test (tests/state/test_reads_batch.py): sums add the window's tiles in row order
from 0.0, as Python's `sum` does (`np.bincount` with weights accumulates sequentially;
`np.add.reduce` would sum pairwise and differ in the last bits), and var/std take the same
Chan merge term by term.

Per entity, through the single read's own functions: features whose tile state is a Python
object or a vector (percentile, distinct_count, last_k, first/last of a string, vector
mean/first/last), for the entities whose window holds a value. Those reads cost what the single
read costs (sketch deserialization dominates); everything else in the batch stays vectorized.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from state.codec import VALUE_FORMAT, decode_vectors, encode_entity
from state.compiled_read import blob_plan
from state.errors import FormatVersionError, InexactReadError
from state.kernels import kernels
from state.layout import SUMMARY_KIND, HopGroup, ViewLayout
from state.read import (
    AsOf,
    Columns,
    CompiledFeature,
    GroupPlan,
    corrupt_blob,
    feature_value,
    group_plan,
    inexact_message,
    pruned_features,
    summary_value,
)
from state.tiles import empty_block

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]
_HEAD_SIZE = 9  # u8 format version + i64 newest event time
_VECTORIZED = frozenset({"events", "count", "sum", "mean", "min", "max", "var", "std"})


def evaluate_blobs(
    layout: ViewLayout,
    blobs: Sequence[bytes | None],
    t: int,
    checks: Checks | None = None,
    only: frozenset[str] | None = None,
    *,
    compiled: bool = True,
) -> dict[str, list[Any]]:
    """Every feature of every entity as of t: {feature: one value per blob, in order} (with
    `only`, those features, in the layout's order; `compiled`: counts, sums and means by the
    compiled kernels, else all in NumPy).

    A None blob is an unknown key: the empty-window values (0 for count and sum, None else).
    With `checks`, values of known keys are exact or refused, as `evaluate_blob` decides for
    one entity.

    Raises:
        InexactReadError: with `checks`, a window at t cannot be answered exactly (naming the
            first such key in the batch's order).
        CorruptStateError, FormatVersionError: a damaged blob, or one of another format.
    """
    names = [f.name for f in layout.features if only is None or f.name in only]
    if not blobs:
        return {name: [] for name in names}
    present = [b if b is not None else empty_blob(layout) for b in blobs]
    values: dict[str, list[Any]] = {}
    rest = only  # the features left to the NumPy path
    found = _compiled_batch(layout, present, t, checks, blobs, only) if compiled else None
    if found is not None:
        values, rest = found
        if not rest:
            return {name: values[name] for name in names}
    batch = _Batch.of(layout, present)
    pos = batch.starts + _HEAD_SIZE
    for group in layout.groups:
        plan = group_plan(group)
        wanted = rest is None or not rest.isdisjoint(plan.names)
        parts, pos = _parts(layout, group, batch, pos)
        if not wanted:
            continue
        section = _section(parts, batch)
        tiles = section.i64[section.index] if plan.hop else np.zeros(len(section.eid), np.int64)
        if checks is not None:
            _check_exact(layout, group, plan, section, batch, tiles, t, checks, blobs)
        _group_values(group, plan, section, batch, tiles, t, values, rest)
    if (pos != batch.ends).any():
        raise corrupt_blob(layout, "its sections do not end where the blob ends")
    return {name: values[name] for name in names}


_EMPTY: dict[int, tuple[ViewLayout, bytes]] = {}


def empty_blob(layout: ViewLayout) -> bytes:
    """The blob of an entity without tiles (what an unknown key reads), built once per layout."""
    cached = _EMPTY.get(id(layout))
    if cached is None or cached[0] is not layout:
        blob = encode_entity(layout, [empty_block(g) for g in layout.groups], 0)
        cached = _EMPTY[id(layout)] = (layout, blob)
    return cached[1]


def _strided(buf: bytes, dtype: str) -> npt.NDArray[Any]:
    """`buf` read as `dtype` at every byte address (element i starts at byte i)."""
    size = np.dtype(dtype).itemsize
    return np.ndarray(shape=(len(buf) - size + 1,), dtype=dtype, buffer=buf, strides=(1,))


_PADS = [bytes(p) for p in range(8)]


@dataclass(frozen=True, slots=True)
class _Batch:
    """The batch's blobs joined into one buffer (each starting at a multiple of 8 bytes), with
    typed views at every byte address, and 8-byte-aligned views at each of the 8 offsets."""

    blobs: list[bytes]
    buf: bytes
    starts: I64
    ends: I64
    newest: I64
    u32: npt.NDArray[np.uint32]
    i64: I64
    f64: F64
    _aligned: dict[int, tuple[I64, F64]] = field(default_factory=dict)

    @classmethod
    def of(cls, layout: ViewLayout, blobs: list[bytes]) -> _Batch:
        lengths = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
        if (lengths < _HEAD_SIZE).any():
            raise corrupt_blob(layout, "it is too short to be a tile blob")
        pads = -lengths % 8
        starts = np.cumsum(lengths + pads) - lengths - pads
        pieces = [
            x for blob, pad in zip(blobs, pads.tolist(), strict=True) for x in (blob, _PADS[pad])
        ]
        # 8 more bytes keep every 8-byte view in range; joined in, not added after (a second
        # copy of the batch, measured at 150-200 us for 100 blobs)
        pieces.append(_PADS[0] * 8)
        buf = b"".join(pieces)
        raw = np.frombuffer(buf, dtype=np.uint8)
        bad = np.flatnonzero(raw[starts] != VALUE_FORMAT)
        if len(bad):
            raise FormatVersionError(
                f"view {layout.view!r}: tile blob format {int(raw[starts[bad[0]]])}, this code "
                f"reads format {VALUE_FORMAT}; rebuild the view with flows.replay"
            )
        i64 = _strided(buf, "<i8")
        newest = i64[starts + 1]
        return cls(
            blobs,
            buf,
            starts,
            starts + lengths,
            newest,
            _strided(buf, "<u4"),
            i64,
            _strided(buf, "<f8"),
        )

    def aligned(self, shift: int) -> tuple[I64, F64]:
        """The buffer as int64 and float64 words starting at byte `shift` (word i at byte
        shift + 8i): gathers from these are several times faster than from the strided views."""
        found = self._aligned.get(shift)
        if found is None:
            words = self.buf[shift:]  # a copy: a new bytes object's data is 8-byte aligned
            count = len(words) // 8
            i64 = np.frombuffer(words, dtype="<i8", count=count)
            f64 = np.frombuffer(words, dtype="<f8", count=count)
            found = self._aligned[shift] = (i64, f64)
        return found


@dataclass(frozen=True, slots=True)
class _Section:
    """One hop group's section of every blob, and its row table (rows of all entities, entity
    by entity, each entity's rows in tile order). Column j of a row is element
    `index + step * j` of the `i64` / `f64` views."""

    n: I64  # rows per entity
    cols: I64  # address of each entity's first column
    objects: I64 | None  # address of each entity's object stats (its orjson document length)
    vectors: dict[str, I64]  # vector field -> address of each entity's vector length (u32)
    eid: I64  # per row: its entity
    at: I64  # per row: its index among all rows
    first: I64  # per entity: the index of its first row among all rows
    index: I64  # per row: its first column (the tile number) in the views
    step: I64  # per row: elements from one column to the next
    i64: I64
    f64: F64


@dataclass(frozen=True, slots=True)
class _Parts:
    """Where one hop group's section of every blob keeps its parts."""

    n: I64  # rows per entity
    cols: I64  # address of each entity's first column
    objects: I64 | None  # address of each entity's object stats (its orjson document length)
    vectors: dict[str, I64]  # vector field -> address of each entity's vector length (u32)


def _parts(layout: ViewLayout, group: HopGroup, batch: _Batch, pos: I64) -> tuple[_Parts, I64]:
    """The group's section of every blob, and where the next starts."""
    width = len(group.dtype.names or ())
    _within(layout, batch, pos + 4)
    n = batch.u32[pos].astype(np.int64)
    cols = pos + 4
    pos = cols + 8 * n * width
    _within(layout, batch, pos)
    objects = None
    if group.object_fields:
        _within(layout, batch, pos + 4)
        objects = pos + 4
        pos = objects + batch.u32[pos]
        _within(layout, batch, pos)
    vectors = {}
    for name in group.vector_fields:
        _within(layout, batch, pos + 4)
        vectors[name] = pos
        pos = pos + 4 + 8 * n * batch.u32[pos]
        _within(layout, batch, pos)
    return _Parts(n, cols, objects, vectors), pos


def _section(parts: _Parts, batch: _Batch) -> _Section:
    """The group's row table over every blob's section."""
    n, cols = parts.n, parts.cols
    eid = np.repeat(np.arange(len(n)), n)
    at, first = np.arange(len(eid)), np.cumsum(n) - n
    shifts = cols % 8
    if (shifts == shifts[0]).all():  # no object or vector section before: one alignment
        i64, f64 = batch.aligned(int(shifts[0]))
        index, unit = (cols - shifts) // 8, 1
    else:
        i64, f64, index, unit = batch.i64, batch.f64, cols, 8
    rows = (index - unit * first)[eid] + (unit * at if unit != 1 else at)
    step = (unit * n)[eid]
    return _Section(n, cols, parts.objects, parts.vectors, eid, at, first, rows, step, i64, f64)


def _compiled_batch(
    layout: ViewLayout,
    present: list[bytes],
    t: int,
    checks: Checks | None,
    blobs: Sequence[bytes | None],
    only: frozenset[str] | None,
) -> tuple[dict[str, list[Any]], frozenset[str]] | None:
    """The wanted features of every entity in the hop groups whose features read are all
    counts, sums and means, in one compiled pass over the batch
    (`state.window_sums.batch_blob_totals`), and the features it leaves to the NumPy path;
    None to take that path for all (no such group, a checked read as of before an entity's
    newest event, or a damaged or foreign blob, which that path names).

    The kernel reads the blobs where they lie in one joined buffer, unpadded (the group by
    group path pads each blob to 8 bytes for NumPy's aligned views)."""
    plan = blob_plan(layout, only)
    if plan is None:
        return None
    lengths = np.fromiter(map(len, present), dtype=np.int64, count=len(present))
    if (lengths < _HEAD_SIZE).any():
        return None  # too short to be a blob: the other path names it
    ends = np.cumsum(lengths)
    starts = ends - lengths
    buf = b"".join(present)
    raw = np.frombuffer(buf, dtype=np.uint8)
    if (raw[starts] != VALUE_FORMAT).any():
        return None  # another format: the other path names it
    newest: I64 = np.ndarray((len(buf) - 7,), "<i8", buf, strides=(1,))[starts + 1]
    if checks is not None:
        if (t < newest).any():  # (an unknown key's empty blob has newest 0)
            return None  # tiles around t may mix events before and after it
        for group, gplan in plan.wanted:
            _refuse(layout, group, gplan, t, checks, blobs, newest, np.zeros(len(blobs), bool))
    ints, floats, whole = kernels().batch_blob_totals(
        raw, starts, ends, t, plan.groups, plan.windows, plan.int_cols, plan.float_cols
    )
    if not whole:
        return None
    values = {
        f.name: _plain(f, ints[:, i], floats[:, j] if j >= 0 else None) for f, i, j in plan.outputs
    }
    return values, plan.rest


def _within(layout: ViewLayout, batch: _Batch, pos: I64) -> None:
    if (pos > batch.ends).any():
        raise corrupt_blob(layout, "a section runs past the blob's end")


@dataclass(frozen=True, slots=True)
class Checks:
    """What a checked batch read holds each known key's values to (`state.read.AsOf` for a
    batch): its key, named when refused, and its partition's newest event time (None when
    nothing is recorded)."""

    keys: Sequence[str]
    watermarks: Sequence[int | None]


def _check_exact(
    layout: ViewLayout,
    group: HopGroup,
    plan: GroupPlan,
    sec: _Section,
    batch: _Batch,
    tiles: I64,
    t: int,
    checks: Checks,
    blobs: Sequence[bytes | None],
) -> None:
    """`state.read._check_exact` for every known key of the batch at once."""
    entities = len(sec.n)
    early = (t < batch.newest) & (sec.n > 1)
    if not plan.hop or not early.any():  # (the common read: after every newest event)
        mixed = early
    elif t % plan.hop:
        hit = (tiles == t // plan.hop) & (sec.at < (sec.first + sec.n - 1)[sec.eid])
        mixed = early & (np.bincount(sec.eid[hit], minlength=entities) > 0)
    else:
        mixed = np.zeros(entities, dtype=bool)
    _refuse(layout, group, plan, t, checks, blobs, batch.newest, mixed)


def _refuse(
    layout: ViewLayout,
    group: HopGroup,
    plan: GroupPlan,
    t: int,
    checks: Checks,
    blobs: Sequence[bytes | None],
    newest: I64,
    mixed: Bools,
) -> None:
    """Raise for the first known key whose window at t mixes events around t (`mixed`) or
    reaches behind the tiles its partition kept."""
    # the few partitions' watermarks, each looked at once
    pruned_at = {wm: pruned_features(group, plan, t, wm) for wm in set(checks.watermarks)}
    if not mixed.any() and not any(pruned_at.values()):
        return
    for e, (key, wm) in enumerate(zip(checks.keys, checks.watermarks, strict=True)):
        if blobs[e] is not None and (mixed[e] or pruned_at[wm]):
            check, pruned = AsOf(key, wm), pruned_at[wm]
            newest_e = int(newest[e])
            raise InexactReadError(
                inexact_message(layout, group, t, newest_e, check, bool(mixed[e]), pruned)
            )


@dataclass(slots=True)
class _Window:
    """The rows of one window of every entity, and their column values, gathered once."""

    sec: _Section
    batch: _Batch
    inside: Bools | None  # None: every row of the section
    lo: I64  # per entity: first row of the window
    hi: I64  # per entity: end of the window's rows
    ids: I64 = field(init=False)
    index: I64 = field(init=False)
    step: I64 = field(init=False)
    _sums: dict[int, F64] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sec, inside = self.sec, self.inside
        if inside is None:
            self.ids, self.index, self.step = sec.eid, sec.index, sec.step
        else:
            self.ids, self.index, self.step = sec.eid[inside], sec.index[inside], sec.step[inside]

    @property
    def entities(self) -> int:
        return len(self.lo)

    def ints(self, j: int) -> I64:
        column: I64 = self.sec.i64[self.index + self.step * j]
        return column

    def floats(self, j: int) -> F64:
        column: F64 = self.sec.f64[self.index + self.step * j]
        return column

    def total(self, j: int, integral: bool = False) -> F64:
        """Per entity, the sum of column j over its window's rows, added in row order from 0."""
        found = self._sums.get(j)
        if found is None:
            column = self.ints(j) if integral else self.floats(j)
            found = np.asarray(np.bincount(self.ids, column, self.entities), dtype=np.float64)
            self._sums[j] = found
        return found

    def entity_row(self) -> I64:
        """Per window row: its index among its entity's rows."""
        at = self.sec.at if self.inside is None else self.sec.at[self.inside]
        found: I64 = at - self.sec.first[self.ids]
        return found

    def count(self, j: int) -> I64:
        return self.total(j, integral=True).astype(np.int64)

    def segments(self) -> tuple[I64, I64]:
        """Non-empty entities and where each one's rows start among the window's rows."""
        sizes = self.hi - self.lo
        starts = np.cumsum(sizes) - sizes
        nonempty = np.flatnonzero(sizes > 0)
        return nonempty, starts[nonempty]


def _group_values(
    group: HopGroup,
    plan: GroupPlan,
    sec: _Section,
    batch: _Batch,
    tiles: I64,
    t: int,
    values: dict[str, list[Any]],
    only: frozenset[str] | None,
) -> None:
    entities = len(sec.n)
    keep: Bools | None = None  # None: every row (the common read, as of after every event)
    hi = sec.n
    if not (t > batch.newest).all():
        # The last row of an entity holds the events at exactly its newest event time; a
        # read as of that very time leaves them out (windows end before t).
        limit = np.where((t <= batch.newest) & (sec.n > 0), sec.n - 1, sec.n)
        keep = sec.at < (sec.first + limit)[sec.eid]
        if plan.hop:  # at a hop boundary the tile at t holds only later events
            keep &= tiles < -(-t // plan.hop)
        hi = np.bincount(sec.eid[keep], minlength=entities)  # a prefix of each entity's rows
    entity_rows = _EntityRows(group, sec, batch)
    for w, feats in zip(plan.windows, plan.features, strict=True):
        feats = tuple(f for f in feats if only is None or f.name in only)
        if not feats:
            continue
        inside = keep
        if plan.hop:
            inside = tiles >= t // plan.hop - w // plan.hop
            inside = inside if keep is None else inside & keep
        if inside is not None and inside.all():
            inside = None
        lo = hi - np.bincount(sec.eid[inside], minlength=entities) if inside is not None else 0 * hi
        window = _Window(sec, batch, inside, lo, hi)
        for f in feats:
            values[f.name] = _feature(f, window, entity_rows)


def _feature(f: CompiledFeature, w: _Window, entity_rows: _EntityRows) -> list[Any]:
    cnt = w.count(f.cnt)
    if f.agg in ("events", "count"):
        return list(cnt.tolist())
    if f.vector:
        return _vector_values(f, w, cnt, entity_rows)
    if not _vectorized(f):
        return _per_entity(f, w, cnt, entity_rows)
    if f.agg in ("sum", "mean"):
        return _plain(f, cnt, w.total(f.value))
    empty = cnt == 0
    found: npt.NDArray[Any]
    if f.agg in ("var", "std"):
        found = _variance(f, w, cnt)
        found = np.sqrt(found) if f.agg == "std" else found
    elif f.agg in ("min", "max"):
        found = _extreme(f, w)
    else:
        found = w.floats(f.value)[_edge_rows(f, w)] if len(w.ids) else np.zeros(0)
        found = _scatter(w, found)
    return _nullable(f, found, empty)


def _plain(f: CompiledFeature, cnt: I64, total: F64 | None) -> list[Any]:
    """A count, sum or mean of every entity from its window's event count and column total
    (both paths: `_feature` and `_compiled_batch`)."""
    if f.agg in ("events", "count") or total is None:
        return list(cnt.tolist())
    if f.agg == "sum":
        totals = total.tolist()
        return [round(x) for x in totals] if f.integral else list(totals)
    return _nullable(f, total / np.maximum(cnt, 1), cnt == 0)


# Aggregations whose value over an integer column is an int (a mean, var or std is a float).
_INT_VALUED = frozenset({"min", "max", "first", "last"})


def _nullable(f: CompiledFeature, found: npt.NDArray[Any], empty: Bools) -> list[Any]:
    """`found` as values, None where the window is `empty`."""
    if f.integral and f.agg in _INT_VALUED:
        return [None if e else int(v) for v, e in zip(found.tolist(), empty.tolist(), strict=True)]
    out: list[Any] = found.tolist()
    for e in np.flatnonzero(empty).tolist():
        out[e] = None
    return out


def _vectorized(f: CompiledFeature) -> bool:
    """Merged across entities with NumPy (else per entity): plain numeric features."""
    numeric_edge = f.value >= 0 and f.agg in ("first", "last")
    return not f.vector and (f.agg in _VECTORIZED or numeric_edge)


def _variance(f: CompiledFeature, w: _Window, cnt: I64) -> F64:
    """Chan's merge per entity, term by term as `state.read._m2` adds it."""
    safe = np.maximum(cnt, 1)
    mean = w.total(f.value) / safe
    n_i, s_i = w.ints(f.cnt), w.floats(f.value)
    some = n_i != 0
    dev = s_i[some] / n_i[some] - mean[w.ids[some]]
    spread = np.bincount(w.ids[some], (n_i[some] * dev) * dev, minlength=w.entities)
    var: F64 = np.maximum((w.total(f.m2) + spread) / safe, 0.0)
    return var


def _extreme(f: CompiledFeature, w: _Window) -> F64:
    out = np.zeros(w.entities)
    nonempty, starts = w.segments()
    if len(nonempty):
        reduce = np.minimum if f.agg == "min" else np.maximum
        out[nonempty] = reduce.reduceat(w.floats(f.value), starts)
    return out


def _edge_rows(f: CompiledFeature, w: _Window) -> I64:
    """Per non-empty entity, the window row (among the window's rows) of its last (first)
    value by (event time, offset)."""
    order = np.lexsort((w.ints(f.off), w.ints(f.ts), w.ids))
    nonempty, starts = w.segments()
    sizes = (w.hi - w.lo)[nonempty]
    picked: I64 = order[starts + sizes - 1] if f.agg == "last" else order[starts]
    return picked


def _scatter(w: _Window, per_nonempty: F64) -> F64:
    out = np.zeros(w.entities)
    out[w.segments()[0]] = per_nonempty
    return out


def _vector_values(f: CompiledFeature, w: _Window, cnt: I64, entity_rows: _EntityRows) -> list[Any]:
    """Vector mean / first / last of the entities whose vectors have the batch's most common
    length, merged together (per element, the window's rows added in row order from 0.0, as
    `matrix[lo:hi].sum(axis=0)` adds them); any other length through the single read."""
    where = w.sec.vectors[f.vector] + 4  # each entity's (rows, length) float64 matrix
    dims = w.batch.u32[where - 4].astype(np.int64)
    have = cnt > 0
    if not have.any():
        return [None] * w.entities
    d = int(np.bincount(dims[have]).argmax())
    same = have & (dims == d)
    out = _per_entity(f, w, np.where(same, 0, cnt), entity_rows)  # the other lengths
    lanes = 8 * np.arange(d)
    if f.agg == "mean":
        chosen = same[w.ids]
        ids = w.ids[chosen]
        starts = where[ids] + 8 * d * w.entity_row()[chosen]
        values = w.batch.f64[starts[None, :] + lanes[:, None]]  # (d, rows)
        sums = np.stack([np.bincount(ids, v, w.entities) for v in values], axis=1)
        found = sums / np.maximum(cnt, 1)[:, None]
        picked = np.flatnonzero(same)
    else:
        nonempty = w.segments()[0]
        rows = _edge_rows(f, w)
        keep = same[nonempty]
        picked = nonempty[keep]
        starts = where[picked] + 8 * d * w.entity_row()[rows[keep]]
        found = w.batch.f64[starts[:, None] + lanes[None, :]]
        found = _scatter_rows(w.entities, picked, found)
    for e, vector in zip(picked.tolist(), found[picked].tolist(), strict=True):
        out[e] = vector
    return out


def _scatter_rows(entities: int, picked: I64, rows: F64) -> F64:
    out = np.zeros((entities, rows.shape[1]))
    out[picked] = rows
    return out


def _per_entity(f: CompiledFeature, w: _Window, cnt: I64, entity_rows: _EntityRows) -> list[Any]:
    """Object and vector features: the single read's code, for entities with a value."""
    out: list[Any] = [None] * w.entities
    lo, hi = w.lo.tolist(), w.hi.tolist()
    for e, c in enumerate(cnt.tolist()):
        if not c:
            continue
        cols = entity_rows.columns(e)
        if f.agg in SUMMARY_KIND and cols.group.object_fields:
            out[e] = summary_value(cols.objects(), lo[e], hi[e], f)
        else:
            out[e] = feature_value(f, cols, lo[e], hi[e], c)
    return out


class _EntityRows:
    """One group's section of single entities, as the single read sees it (built on demand)."""

    __slots__ = ("_cols", "batch", "group", "sec")

    def __init__(self, group: HopGroup, sec: _Section, batch: _Batch) -> None:
        self.group, self.sec, self.batch = group, sec, batch
        self._cols: dict[int, Columns] = {}

    def columns(self, e: int) -> Columns:
        found = self._cols.get(e)
        if found is None:
            blob, n, start = self.batch.blobs[e], int(self.sec.n[e]), int(self.batch.starts[e])
            objects_at = -1 if self.sec.objects is None else int(self.sec.objects[e]) - start
            base = int(self.sec.cols[e]) - start
            found = self._cols[e] = Columns(blob, base, n, self.group, objects_at)
            for name, where in self.sec.vectors.items():
                found.vectors[name] = decode_vectors(blob, int(where[e]) - start, n)[0]
        return found
