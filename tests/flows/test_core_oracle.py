"""The aggregation core against the DuckDB oracle: online reads and point-in-time snapshots."""

from __future__ import annotations

import builtins
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from flows.aggregate import apply_batch
from flows.pointintime import point_in_time
from flows.spec import (
    FeatureView,
    Source,
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
from state.codec import encode_key
from state.layout import ViewLayout
from state.read import evaluate_blob
from state.sketches import HLL_RSE, KLL_RANK_ERROR
from state.store import PartitionProgress
from state.tiles import empty_block
from tests.helpers import EV_SCHEMA, decode_entity, evaluate
from tests.oracle import oracle_values, same

SCHEMA = EV_SCHEMA
SOURCE = Source(name="ev", schema=SCHEMA, key="user_id", timestamp="ts")
MINUTE = 60_000_000
VIEW = FeatureView(
    name="v",
    source=SOURCE,
    features=[
        count(window="30m"),
        count(window="2h", hop="10m"),
        count(),
        sum("amount", window="1h"),
        sum("qty", window="1d"),
        mean("amount", window="2h", hop="30m"),
        min("amount", window="45m", hop="15m"),
        max("qty", window="3h"),
        var("amount", window="1d"),
        std("amount", window="6h", hop="2h"),
        first("channel", window="1h"),
        last("channel"),
        last("amount", window="30m"),
        count("amount", window="1d"),
        mean("amount"),
    ],
)


def make_events(n: int, n_keys: int, seed: int) -> pa.Table:
    """Events in log order: mostly time-ordered, 10% out of order, duplicate timestamps, nulls."""
    rng = np.random.default_rng(seed)
    base = 1_700_000_000_000_000
    ts = base + np.sort(rng.integers(0, 2 * 86_400_000_000, n))
    ts = ts - np.where(rng.random(n) < 0.1, rng.integers(0, 90 * MINUTE, n), 0)
    ts[rng.random(n) < 0.05] = base + 3 * MINUTE * 40  # a burst of equal timestamps
    ts = ts - ts % np.where(rng.random(n) < 0.3, MINUTE, 1)  # many on tile boundaries
    amount = np.round(rng.normal(50, 20, n), 2)
    return pa.table(
        {
            "user_id": pa.array([f"u{k}" for k in rng.integers(0, n_keys, n)]),
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "amount": pa.array(amount, mask=rng.random(n) < 0.07),
            "qty": pa.array(rng.integers(1, 5, n), mask=rng.random(n) < 0.05),
            "channel": pa.array(
                rng.choice(["web", "pos", "app"], n).tolist(), mask=rng.random(n) < 0.1
            ),
            "_offset": pa.array(np.arange(n, dtype=np.int64)),
        }
    )


def apply_all(layout: ViewLayout, events: pa.Table, batch: int) -> dict[bytes, bytes]:
    store: dict[bytes, bytes] = {}
    progress = PartitionProgress(-1, None, 0, 0)
    for start in range(0, events.num_rows, batch):
        result = apply_batch(
            layout, events.slice(start, batch), progress, lambda keys: [store.get(k) for k in keys]
        )
        store.update(result.puts)
        progress = result.progress
    return store


def assert_rows_equal(layout: ViewLayout, expected: pa.Table, got: list[dict[str, Any]]) -> None:
    exp_rows = expected.to_pylist()
    assert len(exp_rows) == len(got)
    for exp, row in zip(exp_rows, got, strict=True):
        for f in layout.features:
            assert same(exp[f.name], row[f.name]), (f.name, exp, row)


@pytest.mark.parametrize("seed", [1, 2])
def test_online_read_equals_oracle(seed: int) -> None:
    layout = VIEW.layout()
    events = make_events(6000, 40, seed)
    store = apply_all(layout, events, batch=500)
    keys = [*sorted(set(events.column("user_id").to_pylist())), "never-seen"]
    ts_max = int(events.column("ts").cast(pa.int64()).to_numpy().max())
    for t in (ts_max, ts_max + 1, ts_max + 7 * MINUTE + 3, ts_max + 86_400_000_000):
        spine = pa.table({"row": list(range(len(keys))), "k": keys, "t": [t] * len(keys)})
        expected = oracle_values(layout, events, spine)
        got = []
        for k in keys:
            blob = store.get(encode_key(k))
            if blob is None:
                from state.tiles import empty_block

                got.append(evaluate(layout, [empty_block(g) for g in layout.groups], t))
            else:
                got.append(evaluate_blob(layout, blob, t))
        assert_rows_equal(layout, expected, got)


@pytest.mark.parametrize("seed", [3, 4])
def test_point_in_time_equals_oracle(seed: int) -> None:
    layout = VIEW.layout()
    events = make_events(5000, 25, seed)
    rng = np.random.default_rng(seed)
    ts = events.column("ts").cast(pa.int64()).to_numpy()
    n = 1500
    times = np.concatenate(
        [
            rng.integers(int(ts.min()) - MINUTE, int(ts.max()) + 3 * MINUTE, n // 3),
            rng.choice(ts, n // 3),  # exactly at an event: that event must not count
            rng.choice(ts, n - 2 * (n // 3)) // MINUTE * MINUTE,  # on tile boundaries
        ]
    ).astype(np.int64)
    keys = [f"u{k}" for k in rng.integers(0, 27, n)]  # includes keys without events
    values = {
        k: v.to_pylist() for k, v in point_in_time(layout, events, pa.array(keys), times).items()
    }
    spine = pa.table({"row": list(range(n)), "k": keys, "t": times})
    expected = oracle_values(layout, events, spine)
    got = [{f.name: values[f.name][i] for f in layout.features} for i in range(n)]
    assert_rows_equal(layout, expected, got)


def test_batch_size_does_not_change_state() -> None:
    layout = VIEW.layout()
    events = make_events(3000, 30, 9)
    one = apply_all(layout, events.slice(0, 600), batch=1)
    seven = apply_all(layout, events.slice(0, 600), batch=7)
    big = apply_all(layout, events.slice(0, 600), batch=10_000)
    assert one.keys() == seven.keys() == big.keys()
    watermark = int(events.slice(0, 600).column("ts").cast(pa.int64()).to_numpy().max())
    for key in one:
        assert_same_tiles(layout, one[key], seven[key], watermark)
        assert_same_tiles(layout, one[key], big[key], watermark)


def assert_same_tiles(layout: ViewLayout, a: bytes, b: bytes, watermark: int) -> None:
    """Same live tiles: integer fields (tiles, counts, times, offsets) exactly, floating sums to
    1e-12 (a sum of the same numbers grouped differently may differ in its last bit). Tiles that
    no window can reach any more are pruned lazily, when their key is next touched, so only the
    reachable ones are compared."""
    blocks_a, newest_a = decode_entity(layout, a)
    blocks_b, newest_b = decode_entity(layout, b)
    assert newest_a == newest_b
    for group, x, y in zip(layout.groups, blocks_a, blocks_b, strict=True):
        if group.hop_us:
            oldest = watermark // group.hop_us - group.max_window_us // group.hop_us
            x = x.take(np.flatnonzero(x.rows["tile"] >= oldest))
            y = y.take(np.flatnonzero(y.rows["tile"] >= oldest))
        assert x.rows.dtype == y.rows.dtype
        assert len(x.rows) == len(y.rows)
        for name in x.rows.dtype.names or ():
            if x.rows.dtype[name].kind == "f":
                np.testing.assert_allclose(x.rows[name], y.rows[name], rtol=1e-12, atol=1e-12)
            else:
                np.testing.assert_array_equal(x.rows[name], y.rows[name])
        for name, values in x.objs.items():
            assert values.tolist() == y.objs[name].tolist()


def test_late_events_are_rejected_and_counted() -> None:
    view = FeatureView(name="w", source=SOURCE, features=[count(window="30m")])
    layout = view.layout()
    hour = 60 * MINUTE
    events = pa.table(
        {
            "user_id": ["a", "a", "a", "a"],
            "ts": pa.array(
                [10 * hour, 12 * hour, 12 * hour - 20 * MINUTE, 10 * hour],
                pa.timestamp("us", tz="UTC"),
            ),
            "amount": [1.0, 2.0, 3.0, 4.0],
            "qty": [1, 1, 1, 1],
            "channel": ["x"] * 4,
            "_offset": [0, 1, 2, 3],
        }
    )
    result = apply_batch(layout, events, PartitionProgress(-1, None, 0, 0), lambda k: [None])
    # retention = 30m window + 1m hop: the 10:00 event after 12:00 is late, 11:40 is not
    assert result.late.column("_offset").to_pylist() == [3]
    assert result.progress.late_events == 1
    assert result.progress.applied_offset == 3
    blocks, newest = decode_entity(layout, result.puts[encode_key("a")])
    assert newest == 12 * hour
    assert evaluate(layout, blocks, 12 * hour + 1)["count_30m"] == 2


SKETCH_VIEW = FeatureView(
    name="s",
    source=SOURCE,
    features=[
        last_k("channel", 3, window="1h"),
        last_k("amount", 5),
        distinct_count("channel", window="2h"),
        distinct_count("qty"),
        percentile("amount", 0.95, window="1h"),
        percentile("amount", 0.5, window="1d"),
    ],
)


def rank_ok(values: list[float] | None, q: float, got: float | None) -> bool:
    """KLL's rank guarantee: got's rank among the exact values is within 2 * 1.33% of q."""
    if not values:
        return got is None
    assert got is not None
    below = builtins.sum(v < got for v in values) / len(values)
    upto = builtins.sum(v <= got for v in values) / len(values)
    slack = 2 * KLL_RANK_ERROR + 1 / len(values)
    return below - slack <= q <= upto + slack


def check_sketch_rows(layout: ViewLayout, expected: pa.Table, got: list[dict[str, Any]]) -> None:
    for exp, row in zip(expected.to_pylist(), got, strict=True):
        for f in layout.features:
            if f.agg == "percentile":
                assert rank_ok(exp[f.name], float(f.param or 0), row[f.name]), (f.name, row)
            elif f.agg == "distinct_count" and exp[f.name] == 0:
                assert row[f.name] is None  # empty window: null, as every non-count/sum agg
            elif f.agg == "distinct_count":
                assert abs(row[f.name] - exp[f.name]) <= builtins.max(1, 3 * HLL_RSE * exp[f.name])
            else:
                assert exp[f.name] == row[f.name] or (not exp[f.name] and row[f.name] is None), (
                    f.name,
                    exp[f.name],
                    row[f.name],
                )


def test_sketches_and_last_k_online_and_offline() -> None:
    layout = SKETCH_VIEW.layout()
    events = make_events(4000, 12, 5)
    store = apply_all(layout, events, batch=333)
    keys = sorted(set(events.column("user_id").to_pylist()))
    t = int(events.column("ts").cast(pa.int64()).to_numpy().max()) + 1
    spine = pa.table({"row": list(range(len(keys))), "k": keys, "t": [t] * len(keys)})
    expected = oracle_values(layout, events, spine)
    online = [evaluate(layout, decode_entity(layout, store[encode_key(k)])[0], t) for k in keys]
    check_sketch_rows(layout, expected, online)
    rng = np.random.default_rng(0)
    ts = events.column("ts").cast(pa.int64()).to_numpy()
    times = rng.integers(int(ts.min()), int(ts.max()), 300)
    qkeys = [keys[i] for i in rng.integers(0, len(keys), 300)]
    values = {
        k: v.to_pylist() for k, v in point_in_time(layout, events, pa.array(qkeys), times).items()
    }
    spine = pa.table({"row": list(range(300)), "k": qkeys, "t": times})
    expected = oracle_values(layout, events, spine)
    offline = [{f.name: values[f.name][i] for f in layout.features} for i in range(300)]
    check_sketch_rows(layout, expected, offline)


def test_sketch_error_within_bound_on_1m_values() -> None:
    from state.sketches import merge_objects, result

    rng = np.random.default_rng(11)
    values = rng.lognormal(3.0, 1.0, 1_000_000)
    tiles = [
        merge_objects("kll", values[i : i + 10_000].tolist()) for i in range(0, 1_000_000, 10_000)
    ]
    merged = merge_objects("kll", tiles)
    exact = np.sort(values)
    for q in (0.5, 0.9, 0.95, 0.99):
        got = result("kll", merged, q)
        rank = np.searchsorted(exact, got) / len(exact)
        assert abs(rank - q) <= 2 * KLL_RANK_ERROR
    ids = rng.integers(0, 300_000, 1_000_000)
    hll_tiles = [
        merge_objects("hll", [f"m{v}" for v in ids[i : i + 50_000]])
        for i in range(0, 1_000_000, 50_000)
    ]
    estimate = result("hll", merge_objects("hll", hll_tiles), None)
    true = len(np.unique(ids))
    assert abs(estimate - true) / true <= 3 * HLL_RSE


@pytest.mark.slow
def test_one_million_events_online_and_offline_equal_oracle() -> None:
    """Seeded large case: 1M events over 10k keys, every key read online against DuckDB, and a
    20k-row point-in-time snapshot against DuckDB."""
    layout = VIEW.layout()
    events = make_events(1_000_000, 10_000, seed=99)
    store: dict[bytes, bytes] = {}
    progress = PartitionProgress(-1, None, 0, 0)
    for start in range(0, events.num_rows, 250_000):  # replay-sized batches
        result = apply_batch(
            layout,
            events.slice(start, 250_000),
            progress,
            lambda keys: [store.get(k) for k in keys],
        )
        store.update(result.puts)
        progress = result.progress
    ts_max = int(events.column("ts").cast(pa.int64()).to_numpy().max())
    keys = sorted(set(events.column("user_id").to_pylist()))
    t = ts_max + 3 * MINUTE
    spine = pa.table({"row": list(range(len(keys))), "k": keys, "t": [t] * len(keys)})
    expected = oracle_values(layout, events, spine)
    got = [evaluate_blob(layout, store[encode_key(k)], t) for k in keys]
    assert_rows_equal(layout, expected, got)
    rng = np.random.default_rng(7)
    ts = events.column("ts").cast(pa.int64()).to_numpy()
    times = rng.choice(ts, 20_000) + rng.integers(-MINUTE, MINUTE, 20_000)
    qkeys = [f"u{k}" for k in rng.integers(0, 10_000, 20_000)]
    values = {
        k: v.to_pylist() for k, v in point_in_time(layout, events, pa.array(qkeys), times).items()
    }
    spine = pa.table({"row": list(range(20_000)), "k": qkeys, "t": times})
    expected = oracle_values(layout, events, spine)
    assert_rows_equal(
        layout,
        expected,
        [{f.name: values[f.name][i] for f in layout.features} for i in range(20_000)],
    )


def drop_small_and_double(table: pa.Table) -> pa.Table:
    """A view transform: keep amounts over 40 (or null), doubled."""
    amount = table.column("amount")
    keep = pa.compute.or_kleene(pa.compute.greater(amount, 40.0), pa.compute.is_null(amount))
    table = table.filter(keep)
    i = table.column_names.index("amount")
    return table.set_column(i, "amount", pa.compute.multiply(table.column("amount"), 2.0))


def test_transform_applies_online_and_offline() -> None:
    view = FeatureView(
        name="t",
        source=SOURCE,
        transform=drop_small_and_double,
        features=[count(window="1h"), sum("amount", window="1d"), max("amount"), last("channel")],
    )
    layout = view.layout()
    events = make_events(4000, 15, seed=31)
    store: dict[bytes, bytes] = {}
    progress = PartitionProgress(-1, None, 0, 0)
    for start in range(0, events.num_rows, 700):
        result = apply_batch(
            layout,
            events.slice(start, 700),
            progress,
            lambda keys: [store.get(k) for k in keys],
            drop_small_and_double,
        )
        store.update(result.puts)
        progress = result.progress
    transformed = drop_small_and_double(events)
    keys = sorted(set(events.column("user_id").to_pylist()))
    t = int(events.column("ts").cast(pa.int64()).to_numpy().max()) + MINUTE
    spine = pa.table({"row": list(range(len(keys))), "k": keys, "t": [t] * len(keys)})
    expected = oracle_values(layout, transformed, spine)
    got = [
        evaluate_blob(layout, store[encode_key(k)], t)
        if encode_key(k) in store
        else evaluate(layout, [empty_block(g) for g in layout.groups], t)
        for k in keys
    ]
    assert_rows_equal(layout, expected, got)
    from flows.pointintime import kept_events

    offline = point_in_time(
        layout,
        kept_events(layout, [events], drop_small_and_double),
        pa.array(keys),
        np.full(len(keys), t, dtype=np.int64),
    )
    assert_rows_equal(
        layout,
        expected,
        [{f.name: offline[f.name][i].as_py() for f in layout.features} for i in range(len(keys))],
    )
