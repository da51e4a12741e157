"""Point-in-time values of the kinds that are not plain sums (var/std, first/last, last_k,
percentile, distinct_count, vector mean/first/last; `flows.spine_merges`) equal the online read
of a view that applied the key's events before t, and the per-row tile merge where it is exact:
nulls, empty windows, unknown keys, out-of-order events, spine rows before a key's first event,
string first/last, vectors, windows past a sketch's exact bounds."""

from __future__ import annotations

import os
from typing import Any

import datasketches as ds
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flows import pointintime, spine_merges, spine_sketches
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
    percentile,
    std,
    sum,
    var,
)
from state.batch_read import evaluate_blobs
from state.codec import encode_key
from state.read import evaluate_blob
from state.sketches import HLL_LG_K, KLL_K
from state.store import PartitionProgress
from tests.flows.test_pointintime_exact import BASE, DAY, MINUTE, identical, online
from tests.helpers import EV_SCHEMA

SCHEMA: dict[str, Any] = {
    **EV_SCHEMA,
    "fields": [
        *EV_SCHEMA["fields"],
        {"name": "emb", "type": ["null", {"type": "array", "items": "double"}], "default": None},
    ],
}
SOURCE = Source(name="ev", schema=SCHEMA, key="user_id", timestamp="ts")
VIEW = FeatureView(
    name="merges",
    source=SOURCE,
    features=[
        var("amount", window="2h", hop="10m"),
        std("amount", window="14d"),
        count("amount", window="14d"),
        sum("amount", window="14d"),  # plain features beside the others in one group
        max("qty", window="14d"),
        count(window="14d"),
        first("channel", window="14d"),
        last("channel", window="2h", hop="10m"),
        first("amount", window="14d"),
        last("qty", window="14d"),
        last_k("amount", 3, window="14d"),
        last_k("channel", 2, window="2h", hop="10m"),
        percentile("amount", 0.5, window="2h", hop="10m"),
        percentile("qty", 0.95, window="14d"),
        distinct_count("channel", window="14d"),
        distinct_count("qty", window="2h", hop="10m"),
        mean("emb", window="2h", hop="10m"),
        mean("emb", window="14d"),
        last("emb", window="14d"),
        first("emb", window="2h", hop="10m"),
        count("emb", window="14d"),
        count("qty", window="14d"),
        count("amount", window="2h", hop="10m"),
        var("qty"),
        last("channel"),
        percentile("amount", 0.25),
        count("amount"),
        distinct_count("channel"),
        mean("emb"),
    ],
)


def make_events(n: int, keys: int, seed: int, shuffled: bool = False) -> pa.Table:
    """Events over 30 days, many per key and hour (rows of several events), ties on time,
    nulls in every column, repeated values (duplicates for the sketches), signed zeros, one
    vector length per key; with `shuffled`, the log is not in time order."""
    rng = np.random.default_rng(seed)
    ts = np.sort(BASE + rng.integers(0, 30 * DAY, n))
    ts = ts - ts % np.where(rng.random(n) < 0.2, MINUTE, 1)
    amount = np.round(rng.lognormal(3.0, 2.0, n), 1) * rng.choice([-1.0, 1.0], n)
    zeros = rng.random(n) < 0.02
    amount[zeros] = rng.choice([0.0, -0.0], int(zeros.sum()))
    kid = rng.integers(0, keys, n)
    dims = 1 + kid % 3  # length 1 too: NumPy sums a column pairwise
    emb = [list(rng.standard_normal(d) * 100) for d in dims]
    emb_mask = rng.random(n) < 0.1
    channels = [f"c{i}" if i else "" for i in rng.integers(0, 40, n)]  # "" is not counted
    order = rng.permutation(n) if shuffled else np.arange(n)
    table = pa.table(
        {
            "user_id": pa.array([f"u{k}" for k in kid]),
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "amount": pa.array(amount, mask=rng.random(n) < 0.05),
            "qty": pa.array(rng.integers(-3, 60, n), mask=rng.random(n) < 0.05),
            "channel": pa.array(channels, mask=rng.random(n) < 0.1),
            "emb": pa.array(emb, pa.list_(pa.float64()), mask=emb_mask),
        }
    ).take(pa.array(order))
    return table.append_column("_offset", pa.array(np.arange(n, dtype=np.int64)))


def assert_online(layout: Any, events: pa.Table, keys: list[str], times: list[int]) -> int:
    """Every spine row (key x time) equals the online read at its time; how many were
    non-empty values."""
    spine_k = [k for _ in times for k in keys]
    spine_t = np.array([t for t in times for _ in keys], dtype=np.int64)
    got = point_in_time(layout, events, pa.array(spine_k), spine_t)
    checked = 0
    for j, t in enumerate(times):
        want = online(layout, events, keys, t)
        for i, row in enumerate(want):
            for f in layout.features:
                value = got[f.name][j * len(keys) + i].as_py()
                if f.agg == "percentile" and row[_count_of(layout, f)] > KLL_K:
                    continue  # a KLL sketch past k compacts at random: online reads differ too
                if f.agg == "percentile":  # of tied -0.0 and 0.0 either sign may come
                    assert value == row[f.name], (f.name, keys[i], t, row[f.name], value)
                else:
                    assert same(row[f.name], value), (f.name, keys[i], t, row[f.name], value)
                checked += value is not None
    return checked


def _count_of(layout: Any, f: Any) -> str:
    """The view's count of f's column over f's window (the values a sketch holds)."""
    found = [
        g.name
        for g in layout.features
        if g.agg == "count"
        and (g.column, g.window_us, g.hop_us) == (f.column, f.window_us, f.hop_us)
    ]
    return found[0]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int) and isinstance(b, float):  # an int column's value in a float feature
        return float(a) == b
    if isinstance(a, float) and a != a:  # a NaN first/last: the snapshot's value is null
        return b is None or b != b
    return identical(a, b)


TIMES = (
    BASE + 10 * DAY + 7 * MINUTE + 3,
    BASE + 20 * DAY + 10 * MINUTE,  # on every hop's boundary
    BASE + 30 * DAY + 1,
    BASE - 1,  # before every key's first event
)


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("shuffled", [False, True], ids=["log-in-order", "out-of-order"])
@pytest.mark.parametrize("parts", [1, 3], ids=["one-part", "in-parts"])
def test_merged_kinds_equal_the_online_read(
    seed: int, shuffled: bool, parts: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spine_merges, "PARTS", parts)  # the spine rows cut in parts or not
    monkeypatch.setattr(spine_merges, "SPLIT_ROWS", 1)
    events = make_events(20_000, 10, seed, shuffled)
    at_event = int(np.sort(events.column("ts").cast(pa.int64()).to_numpy())[12_345])
    keys = [*(f"u{k}" for k in range(10)), "never-seen"]
    checked = assert_online(VIEW.layout(), events, keys, [*TIMES, at_event])
    assert checked > 500  # the windows hold events: not a comparison of empty values


def test_vectors_of_one_length_without_nulls_equal_the_online_read() -> None:
    """Every event with a vector of one length: the case read without a gather of lengths."""
    events = make_events(6000, 5, 9)
    emb = np.random.default_rng(9).standard_normal((6000, 3)) * 100
    events = events.set_column(5, "emb", pa.array(list(emb), pa.list_(pa.float64())))
    view = FeatureView(
        name="vec",
        source=SOURCE,
        features=[mean("emb", window="14d"), last("emb", window="2h", hop="10m"), mean("emb")],
    )
    keys = [*(f"u{k}" for k in range(5)), "never-seen"]
    assert assert_online(view.layout(), events, keys, list(TIMES)) > 30


def test_windows_past_the_sketch_bounds_take_the_tile_merge() -> None:
    """A percentile over more than 200 values and a distinct count over more than 384
    coupons come from the per-row tile merge (as exact as the online read: a KLL sketch past
    k compacts at random, so only its bound is checked)."""
    rng = np.random.default_rng(7)
    n = 3000
    ts = np.sort(BASE + rng.integers(0, 2 * DAY, n))
    events = pa.table(
        {
            "user_id": pa.array(["u"] * n),
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "amount": pa.array(rng.standard_normal(n)),
            "qty": pa.array(rng.integers(0, 10_000, n)),
            "channel": pa.array([f"c{i}" for i in rng.integers(0, 2000, n)]),
            "emb": pa.array([None] * n, pa.list_(pa.float64())),
            "_offset": pa.array(np.arange(n, dtype=np.int64)),
        }
    )
    view = FeatureView(
        name="big",
        source=SOURCE,
        features=[percentile("amount", 0.9), distinct_count("channel"), last_k("qty", 500)],
    )
    layout = view.layout()
    times = [BASE + DAY // 100, BASE + 3 * DAY]  # a few events, then all of them
    spine = point_in_time(layout, events, pa.array(["u", "u"]), np.array(times))
    merged = {}
    for t in times:
        merged[t] = online(layout, events, ["u"], t)[0]
    p90, distinct = spine["amount_p90"], spine["channel_distinct_count"]
    assert p90[0].as_py() == merged[times[0]]["amount_p90"]
    assert distinct[0].as_py() == merged[times[0]]["channel_distinct_count"]
    exact = float(np.quantile(events.column("amount").to_numpy(), 0.9))
    assert abs(p90[1].as_py() - exact) < 0.1  # ~1.3% rank error of a N(0, 1) quantile
    assert distinct[1].as_py() > 1000
    assert distinct[1].as_py() == pytest.approx(
        merged[times[1]]["channel_distinct_count"], rel=0.05
    )
    assert spine["qty_last500"][1].as_py() == merged[times[1]]["qty_last500"]


def test_without_compiled_kinds_the_per_row_merge_gives_the_same_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The compiled windows equal the per-row tile merge: exactly, but for float sums (sum,
    mean, var, std, vector mean), which the per-row merge adds in another order."""
    monkeypatch.setattr(spine_merges, "PARTS", 2)
    monkeypatch.setattr(spine_merges, "SPLIT_ROWS", 1)
    events = make_events(8000, 6, 3)
    layout = VIEW.layout()
    rng = np.random.default_rng(4)
    keys = pa.array([f"u{k}" for k in rng.integers(0, 7, 3000)])
    times = BASE + rng.integers(-DAY, 31 * DAY, 3000)
    got = point_in_time(layout, events, keys, times)
    monkeypatch.setattr(pointintime, "COMPILED_KINDS", frozenset())
    want = point_in_time(layout, events, keys, times)
    for f in layout.features:
        a, b = got[f.name].to_pylist(), want[f.name].to_pylist()
        if f.agg in ("sum", "mean", "var", "std"):
            flat_a = np.array([x for v in a for x in (v if isinstance(v, list) else [v])], float)
            flat_b = np.array([x for v in b for x in (v if isinstance(v, list) else [v])], float)
            assert np.allclose(flat_a, flat_b, rtol=1e-12, atol=1e-9, equal_nan=True), f.name
            assert [v is None for v in a] == [v is None for v in b], f.name
        else:
            held = got[_count_of(layout, f)].to_pylist() if f.agg == "percentile" else a
            pairs = [
                (x, y)
                for x, y, c in zip(a, b, held, strict=True)
                if f.agg != "percentile" or c <= KLL_K
            ]
            assert pairs, f.name
            assert all(same(x, y) for x, y in pairs), f.name


def test_a_nan_in_a_percentile_window_takes_the_tile_merge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A KLL sketch skips NaN; whatever the tile merge then gives, the snapshot gives the same
    (and a window without a NaN beside it still its exact quantile)."""
    events = make_events(3000, 3, 5)
    amount = events.column("amount").to_numpy(zero_copy_only=False).copy()
    amount[::97] = np.nan
    events = events.set_column(2, "amount", pa.array(amount))
    layout = FeatureView(
        name="nan", source=SOURCE, features=[percentile("amount", 0.5, window="1d")]
    ).layout()
    rng = np.random.default_rng(6)
    keys = pa.array([f"u{k}" for k in rng.integers(0, 3, 2000)])
    times = BASE + rng.integers(2 * DAY, 31 * DAY, 2000)  # ~30 values a window
    got = point_in_time(layout, events, keys, times)["amount_p50_1d"].to_pylist()
    monkeypatch.setattr(pointintime, "COMPILED_KINDS", frozenset())
    want = point_in_time(layout, events, keys, times)["amount_p50_1d"].to_pylist()
    assert len([v for v in got if v is not None]) > 500
    assert all(same(a, b) or a == b for a, b in zip(got, want, strict=True))


def test_a_percentile_window_of_only_nan_reads_null_everywhere() -> None:
    """The sketch skips NaN, so a window whose values are all NaN has an empty sketch: its
    percentile is null in the single read, the batch read and the snapshot (the single and
    batch reads raised RuntimeError: operation is undefined for an empty sketch)."""
    n = 40
    events = make_events(n, 1, 5)
    events = events.set_column(2, "amount", pa.array([float("nan")] * n))
    layout = FeatureView(
        name="nan", source=SOURCE, features=[percentile("amount", 0.5, window="1d")]
    ).layout()
    store: dict[bytes, bytes] = {}
    applied = apply_batch(
        layout, events, PartitionProgress(-1, None, 0, 0), lambda ks: [store.get(k) for k in ks]
    )
    key = events.column("user_id")[0].as_py()
    t = int(events.column("ts").cast(pa.int64()).to_numpy().max()) + 1
    blob = applied.puts[encode_key(key)]
    assert evaluate_blob(layout, blob, t)["amount_p50_1d"] is None
    assert evaluate_blobs(layout, [blob, blob], t)["amount_p50_1d"] == [None, None]
    got = point_in_time(layout, events, pa.array([key]), np.array([t]))
    assert got["amount_p50_1d"].to_pylist() == [None]


DERANDOMIZE = bool(os.environ.get("CI"))


@settings(max_examples=300, deadline=None, derandomize=DERANDOMIZE)
@given(
    st.lists(st.sampled_from([-2.5, -0.0, 0.0, 1.0, 1.5, 3.0, 1e300]), min_size=1, max_size=KLL_K)
    | st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=KLL_K),
    st.floats(0.001, 0.999),
)
def test_kll_quantile_is_the_sketch_s_while_it_keeps_every_value(
    values: list[float], q: float
) -> None:
    sketch = ds.kll_doubles_sketch(KLL_K)
    for v in values:
        sketch.update(v)
    got = spine_sketches.kll_quantile(np.sort(np.array(values)), q)
    assert got == float(sketch.get_quantile(q))  # -0.0 and 0.0 tie: either sign may come


@settings(max_examples=100, deadline=None, derandomize=DERANDOMIZE)
@given(
    st.lists(st.text(max_size=4) | st.integers(-50, 50).map(float), max_size=500),
    st.lists(st.integers(0, 10), min_size=1, max_size=30),
)
def test_hll_estimate_is_the_union_s_while_it_keeps_a_coupon_set(
    values: list[Any], cuts: list[int]
) -> None:
    """Any values, merged as tiles of any sizes: the union's estimate is the table's entry for
    their distinct coupons (or the merge is left to the tiles past HLL_SET_MAX)."""
    union, at = ds.hll_union(HLL_LG_K), 0
    for size in cuts:
        tile = ds.hll_sketch(HLL_LG_K)
        for v in values[at : at + size]:
            tile.update(v)
        union.update(tile)
        at += size
    taken = values[:at]
    coupons = {spine_sketches.coupon_of(v) for v in taken} - {spine_sketches.NO_COUPON}
    if len(coupons) <= spine_sketches.HLL_SET_MAX:
        want = round(union.get_result(ds.tgt_hll_type.HLL_8).get_estimate())
        assert spine_sketches.hll_estimates()[len(coupons)] == want


@settings(max_examples=200, deadline=None, derandomize=DERANDOMIZE)
@given(
    st.lists(st.text(max_size=40), max_size=50),
    st.lists(
        st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0]), max_size=50
    ),
)
def test_compiled_coupons_are_datasketches_own(texts: list[str], floats: list[float]) -> None:
    """The compiled hash (MurmurHash3_x64_128, seed 9001) gives each value the coupon a
    one-value DataSketches sketch holds: strings of any length and script, empty ones not
    counted, signed zeros and NaNs as the sketch canonicalizes them; sliced arrays too."""
    assert spine_sketches.string_coupons(
        *spine_sketches._utf8(pa.array(texts, pa.string()))
    ).tolist() == [spine_sketches.coupon_of(t) for t in texts]
    column = pa.chunked_array([pa.array(["pad", *texts]).slice(1)], pa.string())
    got = spine_sketches.event_coupons(column, numeric=False)
    assert got.tolist() == [spine_sketches.coupon_of(t) for t in texts]
    large = spine_sketches.event_coupons(column.cast(pa.large_string()), numeric=False)
    assert large.tolist() == got.tolist()
    numbers = pa.chunked_array([pa.array(floats, pa.float64())])
    got = spine_sketches.event_coupons(numbers, numeric=True)
    assert got.tolist() == [spine_sketches.coupon_of(f) for f in floats]
