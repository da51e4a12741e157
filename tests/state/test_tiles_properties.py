"""Property tests of the tile core (Hypothesis): merge is associative and commutative, the
codec round-trips, and the online read equals the general merge + finalize used offline."""

from __future__ import annotations

import builtins
from typing import Any

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.aggregate import column_values
from flows.spec import FeatureView, Source, count, first, last, max, mean, min, std, sum
from state.codec import encode_entity
from state.layout import HopGroup, ViewLayout
from state.read import evaluate_blob
from state.tiles import (
    I64,
    TileBlock,
    combine,
    concat_blocks,
    finalize_array,
    reduce_ranges,
    run_starts,
    unit_block,
)
from tests.helpers import decode_entity
from tests.oracle import same


def window_bounds(tiles: I64, hop_us: int, window_us: int, t: I64) -> tuple[I64, I64]:
    """Row ranges [lo, hi) of sorted `tiles` covering each sawtooth window as of t (the head
    tile included): the test's own statement of which tiles a window covers."""
    if hop_us == 0:
        n = len(tiles)
        return np.zeros(len(t), dtype=np.int64), np.full(len(t), n, dtype=np.int64)
    head = t // hop_us
    lo = np.searchsorted(tiles, head - window_us // hop_us, side="left")
    hi = np.searchsorted(tiles, head, side="right")
    return lo.astype(np.int64, copy=False), hi.astype(np.int64, copy=False)


SCHEMA = {
    "type": "record",
    "name": "E",
    "fields": [
        {"name": "k", "type": "string"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "x", "type": ["null", "double"], "default": None},
        {"name": "n", "type": ["null", "long"], "default": None},
        {"name": "s", "type": ["null", "string"], "default": None},
    ],
}
LAYOUT: ViewLayout = FeatureView(
    name="p",
    source=Source("e", SCHEMA, "k", "ts"),
    features=[
        count(window="10m"),
        sum("x", window="10m"),
        mean("x", window="1h", hop="5m"),
        std("x", window="1h", hop="5m"),
        min("n", window="10m"),
        max("x"),
        first("s", window="1h"),
        last("s", window="10m"),
        last("n"),
        count("x"),
    ],
).layout()
MINUTE = 60_000_000

events = st.lists(
    st.tuples(
        st.integers(0, 90 * MINUTE),  # event time
        st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False).map(lambda v: round(v, 3))),
        st.one_of(st.none(), st.integers(-1000, 1000)),
        st.one_of(st.none(), st.sampled_from(["a", "b", "c"])),
    ),
    min_size=1,
    max_size=60,
)


def units(
    group: HopGroup,
    rows: list[tuple[int, Any, Any, Any]],
    first_offset: int = 0,
) -> TileBlock:
    table = pa.table(
        {
            "k": ["k"] * len(rows),
            "ts": pa.array([r[0] for r in rows], pa.int64()),
            "x": pa.array([r[1] for r in rows], pa.float64()),
            "n": pa.array([r[2] for r in rows], pa.int64()),
            "s": pa.array([r[3] for r in rows], pa.string()),
        }
    )
    ts = np.array([r[0] for r in rows], dtype=np.int64)
    offsets = np.arange(first_offset, first_offset + len(rows), dtype=np.int64)
    values = column_values(table, LAYOUT)
    return unit_block(group, ts, offsets, {c.column: values[c.column] for c in group.columns})


def tiles_of(group: HopGroup, block: TileBlock) -> TileBlock:
    order = np.argsort(block.rows["tile"], kind="stable")
    block = block.take(order)
    return combine(group, block, run_starts(block.rows["tile"]))


def feature_values(group: HopGroup, tiles: TileBlock, t: int) -> dict[str, Any]:
    out = {}
    for f in group.features:
        lo, hi = window_bounds(
            tiles.rows["tile"], group.hop_us, f.window_us, np.array([t], dtype=np.int64)
        )
        merged = reduce_ranges(group, tiles, lo, hi)
        out[f.name] = finalize_array(f, group.column_stats(f), merged).to_pylist()[0]
    return out


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert same(a[name], b[name], rel=1e-9), (name, a[name], b[name])


@settings(max_examples=150, deadline=None)
@given(events, st.data())
def test_merge_is_associative_and_commutative(rows: list[Any], data: st.DataObject) -> None:
    """Tiles built from any split and any order of the same events give the same features."""
    t = 100 * MINUTE
    cut = data.draw(st.integers(0, len(rows)))
    perm = data.draw(st.permutations(range(len(rows))))
    for group in LAYOUT.groups:
        whole = tiles_of(group, units(group, rows))
        parts = concat_blocks(
            group,
            [
                tiles_of(group, units(group, rows[:cut])),
                tiles_of(group, units(group, rows[cut:], cut)),
            ],
        )
        shuffled_units = units(group, rows).take(np.array(perm, dtype=np.int64))
        assert_same(
            feature_values(group, whole, t), feature_values(group, tiles_of(group, parts), t)
        )
        assert_same(
            feature_values(group, whole, t),
            feature_values(group, tiles_of(group, shuffled_units), t),
        )


@settings(max_examples=150, deadline=None)
@given(events)
def test_codec_round_trip_and_online_read_equals_offline_merge(rows: list[Any]) -> None:
    t = 95 * MINUTE + 17
    blocks = [tiles_of(g, units(g, rows)) for g in LAYOUT.groups]
    newest = builtins.max(r[0] for r in rows)
    blob = encode_entity(LAYOUT, blocks, newest)
    decoded, got_newest = decode_entity(LAYOUT, blob)
    assert got_newest == newest
    for a, b in zip(blocks, decoded, strict=True):
        assert a.rows.tobytes() == b.rows.tobytes()
        assert {k: v.tolist() for k, v in a.objs.items()} == {
            k: v.tolist() for k, v in b.objs.items()
        }
    assert encode_entity(LAYOUT, decoded, newest) == blob
    offline: dict[str, Any] = {}
    for group, block in zip(LAYOUT.groups, blocks, strict=True):
        offline.update(feature_values(group, block, t))
    assert_same(evaluate_blob(LAYOUT, blob, t), offline)
