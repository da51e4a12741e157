"""Issue 9: feature services online (`FeatureClient.get_service_many`) equal the service snapshot
(`build_service_snapshot`) exactly, for a service over two views of different keys and three
on-demand outputs, on data with nulls, unknown entities, empty windows and out-of-order events;
the deployment records its definitions so a client without features= finds the services."""

from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.segments import Warehouse
from flows.ingest import ingest_table
from flows.snapshot import build_service_snapshot
from flows.spec import Definitions, load_definitions
from state.client import FeatureClient
from tests.helpers import DAY, HOUR, MINUTE, make_events, run_command, write_definitions

START_US = 1_780_000_000_000_000

MERCHANT_SCHEMA = """{
  "type": "record", "name": "MerchantEvent", "namespace": "test",
  "fields": [
    {"name": "merchant_id", "type": "string"},
    {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
    {"name": "chargeback", "type": ["null", "double"], "default": null},
    {"name": "profile", "type": ["null", {"type": "array", "items": "float"}], "default": null}
  ]
}"""

SERVICE = """
import pyarrow.compute as pc
from flows.ondemand import category_index, cosine_similarity
from flows.spec import FeatureService, RequestSource, on_demand

merchants = Source(name="merchant_events", schema="merchant.avsc", key="merchant_id",
                   timestamp="ts", partitions=2)
risk = FeatureView(name="risk", source=merchants, features=[
    mean("chargeback", window="3d"), count(window="1d"), mean("profile", window="3d"),
])
payment = RequestSource(name="payment", schema={"amount": "double", "channel": "string",
                                               "text": "array<float>"})


@on_demand(sources=[payment, spend[["mean_amount_1d"]], risk],
           outputs={"amount_vs_mean": "double", "channel_code": "int", "risky": "boolean",
                    "similarity": "double"})
def signals(rows):
    mean = rows["spend__mean_amount_1d"]
    usable = pc.and_(pc.is_valid(mean), pc.not_equal(pc.fill_null(mean, 0.0), 0.0))
    ratio = pc.if_else(usable, pc.divide(rows["amount"], mean), None)
    return {
        "amount_vs_mean": ratio,
        "channel_code": category_index(rows["channel"], ["web", "pos", "app"]),
        "risky": pc.greater(pc.fill_null(rows["risk__chargeback_mean_3d"], 0.0), 0.25),
        "similarity": cosine_similarity(rows["text"], rows["risk__profile_mean_3d"]),
    }


fraud = FeatureService(name="fraud", features=[
    spend[["mean_amount_1d", "count_30m", "last_channel"]], risk, signals,
])
"""

SPEND = """
spend = FeatureView(name="spend", source=txns, features=[
    mean("amount", window="1d", name="mean_amount_1d"), count(window="30m"),
    sum("amount", window="2h", hop="10m"), last("channel", name="last_channel"),
])
"""


def write_service_definitions(directory: Path) -> Path:
    """The txns definitions of tests.helpers plus a merchant source, a `risk` view and the
    `fraud` service."""
    features = write_definitions(directory, partitions=3)
    (directory / "merchant.avsc").write_text(MERCHANT_SCHEMA)
    features.write_text(features.read_text() + SPEND + SERVICE)
    return features


def merchant_events(n: int, n_keys: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    ts = START_US + np.sort(rng.integers(0, 3 * DAY, n))
    ts = ts - np.where(rng.random(n) < 0.05, rng.integers(0, 3 * HOUR, n), 0)  # out of order
    chargeback = (rng.random(n) < 0.2).astype(float)
    profile = vectors(rng, n, 4)
    return pa.table(
        {
            "merchant_id": pa.array([f"m{k}" for k in rng.integers(0, n_keys, n)]),
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "chargeback": pa.array(chargeback, mask=rng.random(n) < 0.1),
            "profile": profile,
        }
    )


def vectors(rng: np.random.Generator, n: int, dim: int) -> pa.Array:
    """n float32 vectors, about 10% null and 2% all zeros."""
    values = rng.normal(0, 1, (n, dim)).astype(np.float32)
    values[rng.random(n) < 0.02] = 0.0
    rows = [
        v.tolist() if keep else None for v, keep in zip(values, rng.random(n) > 0.1, strict=True)
    ]
    return pa.array(rows, pa.list_(pa.float32()))


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Definitions]:
    tmp = tmp_path_factory.mktemp("services")
    features = write_service_definitions(tmp / "defs")
    defs = load_definitions(features)
    wh = Warehouse(tmp / "wh")
    ingest_table(defs.sources["txns"], make_events(6000, 60, seed=41), wh)
    ingest_table(defs.sources["merchant_events"], merchant_events(3000, 30, seed=42), wh)
    result = run_command(
        "flows.run",
        *("--features", str(features), "--warehouse", str(tmp / "wh")),
        *("--state", str(tmp / "state"), "--until-caught-up"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp, defs


def spine(n_times: int, per_time: int, seed: int) -> pa.Table:
    """Rows at `n_times` distinct times after every event (where an online read as of t is
    exact), over known and unknown users and merchants, with null request fields."""
    rng = np.random.default_rng(seed)
    end = START_US + 3 * DAY
    times = end + rng.integers(0, 2 * DAY, n_times)
    times[: n_times // 4] = end + rng.integers(0, 40 * MINUTE, n_times // 4)  # live windows
    n = n_times * per_time
    ts = np.repeat(times, per_time)
    users = [f"user{k}" for k in rng.integers(0, 70, n)]  # user60..69 are unknown
    merchants = [f"m{k}" for k in rng.integers(0, 36, n)]  # m30..35 are unknown
    amount = pa.array(np.round(rng.lognormal(3, 1, n), 2), mask=rng.random(n) < 0.05)
    channel = pa.array(rng.choice(["web", "pos", "app", "atm"], n).tolist())
    channel = pa.array(channel.to_pylist(), mask=rng.random(n) < 0.05)
    return pa.table(
        {
            "user_id": users,
            "merchant_id": merchants,
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "amount": amount,
            "channel": channel,
            "text": vectors(rng, n, 4),
            "label": pa.array(rng.random(n) < 0.1),
        }
    )


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b or abs(a - b) <= 1e-12 * max(abs(a), abs(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b) and type(a) is type(b)


def test_online_equals_offline(deployed: tuple[Path, Definitions]) -> None:
    tmp, defs = deployed
    _, plan = defs.service("fraud")
    rows = spine(n_times=60, per_time=50, seed=5)
    offline = build_service_snapshot(plan, defs.views, rows, Warehouse(tmp / "wh"))
    assert offline.column_names == [*rows.column_names, *plan.columns]
    assert offline.num_rows == 3000
    expected = offline.select(list(plan.columns)).to_pylist()
    ts = rows.column("ts").to_pylist()
    checked = 0
    with FeatureClient(tmp / "state", features=defs.path) as client:
        starts = [0, *[i for i in range(1, len(ts)) if ts[i] != ts[i - 1]], len(ts)]
        for a, b in itertools.pairwise(starts):
            online = client.get_service_many("fraud", rows.slice(a, b - a), at=ts[a])
            for i, got in enumerate(online):
                want = expected[a + i]
                assert list(got) == list(plan.columns)
                bad = {c: (got[c], want[c]) for c in plan.columns if not same(got[c], want[c])}
                assert not bad, f"row {a + i} at {ts[a]}: {bad}"
                checked += 1
        one = rows.slice(7, 1).to_pylist()[0]
        single = client.get_service("fraud", one, at=ts[7])
        assert all(same(single[c], expected[7][c]) for c in plan.columns)
    assert checked == 3000
    values = offline.to_pydict()
    # the data exercises what the test claims: empty windows, unknown keys, nulls, codes
    assert None in values["spend__mean_amount_1d"]
    assert None in values["risk__chargeback_mean_3d"]
    assert 0 in values["spend__count_30m"]
    assert max(values["spend__count_30m"]) > 0
    assert None in values["signals__amount_vs_mean"]
    assert set(values["signals__channel_code"]) == {0, 1, 2, -1, None}
    assert True in values["signals__risky"]
    similarity = values["signals__similarity"]
    assert None in similarity
    assert sum(v is not None for v in similarity) > 1000
    assert any(v is not None for v in values["risk__profile_mean_3d"])
    assert False in values["signals__risky"]


def test_one_row_reads_equal_the_batch_path(deployed: tuple[Path, Definitions]) -> None:
    """`get_service` reads a row of plain values on its own path (one point read per view):
    each row's vector equals the batch path's for that row, to the bit and in type, with
    unknown keys, null request fields, null vectors and empty windows. Any other row (an int
    or null key, an int for a double, a missing field) takes the batch path and gets its
    value or its error; a function that fails fails alike on both paths."""
    tmp, defs = deployed
    rows = spine(n_times=30, per_time=20, seed=8)
    ts = rows.column("ts").to_pylist()
    batch_calls = 0
    with FeatureClient(tmp / "state", features=defs.path) as client:
        batch = client.get_service_many

        def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal batch_calls
            batch_calls += 1
            return batch(*args, **kwargs)

        client.get_service_many = counted  # type: ignore[method-assign]
        requests = rows.drop_columns(["ts"]).to_pylist()
        for i, row in enumerate(requests):
            at = ts[i] if i % 3 else None  # as of a time, and now
            assert repr(client.get_service("fraud", row, at=at)) == repr(
                batch("fraud", [row], at=at)[0]
            )
        assert batch_calls == 0  # every row above took the one-row path
        base = requests[0]
        odd = [
            {**base, "user_id": 7},
            {**base, "merchant_id": None},
            {**base, "amount": 5},
            {**base, "channel": 3},
            {k: v for k, v in base.items() if k != "channel"},
        ]
        compared = next(
            r for r in requests if batch("fraud", [r], at=ts[0])[0]["signals__similarity"]
        )
        wrong_vector = {**compared, "text": [1.0, 2.0]}  # plain, but the cosine refuses it
        for row in [*odd, wrong_vector]:
            outcomes = []
            for read in (
                lambda r: client.get_service("fraud", r, at=ts[0]),
                lambda r: batch("fraud", [r], at=ts[0])[0],
            ):
                try:
                    outcomes.append(repr(read(row)))
                except Exception as exc:
                    outcomes.append(f"{type(exc).__name__}: {exc}")
            assert outcomes[0] == outcomes[1]
        assert batch_calls == len(odd)
        assert outcomes[0].startswith("OnDemandError: service 'fraud'")  # the wrong vector


def test_many_threads_share_one_client_for_service_reads(
    deployed: tuple[Path, Definitions],
) -> None:
    """8 threads call `get_service` and `get_service_many` on one client at once: every
    answer is the one the same call gives alone (no state of one call leaks into another)."""
    tmp, defs = deployed
    rows = spine(n_times=10, per_time=20, seed=12)
    ts = rows.column("ts").to_pylist()
    requests = rows.drop_columns(["ts"]).to_pylist()
    with FeatureClient(tmp / "state", features=defs.path) as client:
        alone = [repr(client.get_service("fraud", r, at=ts[i])) for i, r in enumerate(requests)]

        def worker(seed: int) -> int:
            order = np.random.default_rng(seed).permutation(len(requests))
            for i in order.tolist():
                if i % 2:
                    got = client.get_service("fraud", requests[i], at=ts[i])
                else:
                    got = client.get_service_many("fraud", [requests[i]], at=ts[i])[0]
                assert repr(got) == alone[i], f"row {i}"
            return len(order)

        with ThreadPoolExecutor(8) as pool:
            assert sum(pool.map(worker, range(8))) == 8 * len(requests)


def test_client_finds_the_recorded_definitions(deployed: tuple[Path, Definitions]) -> None:
    tmp, defs = deployed
    row = {
        "user_id": "user1",
        "merchant_id": "m1",
        "amount": 10.0,
        "channel": "web",
        "text": [0.5, 0.25, -1.0, 2.0],
    }
    at = START_US / 1e6 + 4 * 86400
    with (
        FeatureClient(tmp / "state") as recorded,
        FeatureClient(tmp / "state", features=defs.path) as given,
    ):
        assert recorded.get_service("fraud", row, at=at) == given.get_service("fraud", row, at=at)
    record = tmp / "state" / "definitions"
    sha = (record / "CURRENT").read_text().strip()
    assert (record / sha / "features.py").read_bytes() == defs.path.read_bytes()
    assert (record / sha / "merchant.avsc").is_file()
    assert (record / sha / "txn.avsc").is_file()


def test_snapshot_command_with_service(deployed: tuple[Path, Definitions]) -> None:
    tmp, defs = deployed
    rows = spine(n_times=5, per_time=4, seed=9)
    pq.write_table(rows, tmp / "spine.parquet")
    out = tmp / "out.parquet"
    result = run_command(
        "flows.snapshot",
        *("--features", str(defs.path), "--warehouse", str(tmp / "wh")),
        *("--service", "fraud", "--spine", str(tmp / "spine.parquet"), "--out", str(out)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = pq.read_table(out)
    _, plan = defs.service("fraud")
    assert table.column_names == [*rows.column_names, *plan.columns]
    expected = build_service_snapshot(plan, defs.views, rows, Warehouse(tmp / "wh"))
    assert table.select(list(plan.columns)).equals(expected.select(list(plan.columns)))
