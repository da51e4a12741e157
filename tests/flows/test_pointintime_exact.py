"""Point-in-time counts, sums, means, mins and maxes equal the online read bit for bit, and the
compiled path (`flows.spine_windows`) equals the NumPy tile path on the same rows."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from flows import pointintime
from flows.aggregate import apply_batch
from flows.pointintime import point_in_time
from flows.spec import FeatureView, Source, count, max, mean, min, sum
from state.codec import encode_key
from state.read import evaluate_blob
from state.store import PartitionProgress
from state.tiles import empty_block
from tests.helpers import EV_SCHEMA, evaluate

SCHEMA = EV_SCHEMA
MINUTE = 60_000_000
DAY = 1440 * MINUTE
BASE = 1_700_000_000_000_000
VIEW = FeatureView(
    name="exact",
    source=Source(name="ev", schema=SCHEMA, key="user_id", timestamp="ts"),
    features=[
        count(window="30m"),
        sum("amount", window="30m"),
        mean("amount", window="2h", hop="10m"),
        sum("amount", window="14d"),
        mean("amount", window="14d"),
        min("amount", window="14d"),
        max("qty", window="14d"),
        count("channel", window="14d"),
        sum("qty", window="60d"),
        sum("amount", window="60d"),
        mean("amount", window="60d"),
        count("amount", window="60d"),
        count(window="5h", hop="5m"),  # a group without columns
        count(),
        sum("amount"),
        mean("qty"),
        max("amount"),
    ],
)


def make_events(n: int, keys: int, seed: int) -> pa.Table:
    """Time-ordered events, many per key and day (long pairwise runs in a tile), unrounded
    amounts of both signs, signed zeros, ties on time, nulls."""
    rng = np.random.default_rng(seed)
    ts = np.sort(BASE + rng.integers(0, 70 * DAY, n))
    ts = ts - ts % np.where(rng.random(n) < 0.2, MINUTE, 1)  # ties and tile boundaries
    amount = rng.lognormal(3.0, 2.0, n) * rng.choice([-1.0, 1.0], n)
    zeros = rng.random(n) < 0.02
    amount[zeros] = rng.choice([0.0, -0.0], int(zeros.sum()))
    return pa.table(
        {
            "user_id": pa.array([f"u{k}" for k in rng.integers(0, keys, n)]),
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "amount": pa.array(amount, mask=rng.random(n) < 0.05),
            "qty": pa.array(rng.integers(-3, 50, n), mask=rng.random(n) < 0.05),
            "channel": pa.array(rng.choice(["web", "pos"], n).tolist(), mask=rng.random(n) < 0.1),
            "_offset": pa.array(np.arange(n, dtype=np.int64)),
        }
    )


def online(layout: Any, events: pa.Table, keys: list[str], t: int) -> list[dict[str, Any]]:
    """Every key's features read online at t from a view that applied the events before t in
    one batch (so each stored tile holds all its events)."""
    before = events.filter(pa.array(events.column("ts").cast(pa.int64()).to_numpy() < t))
    store: dict[bytes, bytes] = {}
    result = apply_batch(
        layout, before, PartitionProgress(-1, None, 0, 0), lambda ks: [store.get(k) for k in ks]
    )
    store.update(result.puts)
    empty = [empty_block(g) for g in layout.groups]
    return [
        evaluate_blob(layout, store[encode_key(k)], t)
        if encode_key(k) in store
        else evaluate(layout, empty, t)
        for k in keys
    ]


def identical(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("direct", [0, 10**9], ids=["from-tiles", "from-events"])
def test_point_in_time_equals_the_online_read_bit_for_bit(
    seed: int, direct: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pointintime, "DIRECT_EVENTS", direct)  # both ways of reading windows
    layout = VIEW.layout()
    events = make_events(60_000, 12, seed)
    keys = [*(f"u{k}" for k in range(12)), "never-seen"]
    at_event = int(events.column("ts").cast(pa.int64()).to_numpy()[30_000])  # its events left out
    checked = 0
    for t in (
        BASE + 20 * DAY + 7 * MINUTE + 3,
        BASE + 45 * DAY + 10 * MINUTE,  # on every hop's boundary
        at_event,
        BASE + 70 * DAY + 1,
    ):
        want = online(layout, events, keys, t)
        got = point_in_time(layout, events, pa.array(keys), np.full(len(keys), t, np.int64))
        for i, row in enumerate(want):
            for f in layout.features:
                value = got[f.name][i].as_py()
                assert identical(row[f.name], value), (f.name, keys[i], t, row[f.name], value)
                checked += value is not None and value != 0
    assert checked > 300  # the windows hold events: the comparison is not of empty values
