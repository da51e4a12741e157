"""The benchmarks' shared workload: card transactions keyed by user over 180 days, and the
view of count, sum and mean of amount over 30m, 14d and 180d (9 features)."""

from __future__ import annotations

import socket
from typing import Any

import numpy as np
import pyarrow as pa

from flows.spec import FeatureView, Source, count, mean, sum

SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Txn",
    "fields": [
        {"name": "user_id", "type": "string"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "amount", "type": ["null", "double"], "default": None},
        {"name": "merchant_id", "type": ["null", "string"], "default": None},
    ],
}
MERCHANTS = 10_000
DAY_US = 86_400_000_000
END_US = 1_790_000_000_000_000
WINDOWS = ("30m", "14d", "180d")


def spend_view(partitions: int = 1) -> FeatureView:
    source = Source(name="txn", schema=SCHEMA, key="user_id", timestamp="ts", partitions=partitions)
    features = []
    for w in WINDOWS:
        features += [count(window=w), sum("amount", window=w), mean("amount", window=w)]
    return FeatureView(name="spend", source=source, features=features)


def transactions(n: int, keys: int, seed: int = 42, days: int = 180) -> pa.Table:
    """n events in time order over `days` days ending at END_US, uniform over `keys` users."""
    rng = np.random.default_rng(seed)
    ts = np.sort(rng.integers(END_US - days * DAY_US, END_US, n))
    return pa.table(
        {
            "user_id": np.char.add("u", rng.integers(0, keys, n).astype(str)),
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "amount": np.round(rng.lognormal(3.5, 1.0, n), 2),
            "merchant_id": np.char.add("m", rng.integers(0, MERCHANTS, n).astype(str)),
        }
    )


def cluster_addresses(processes: int) -> str:
    """`--addresses` for a bytewax cluster of `processes` on this host: free loopback ports."""
    ports = []
    for _ in range(processes):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    return ";".join(f"127.0.0.1:{p}" for p in ports)


def polars_windows(frame: Any) -> Any:
    """The spend view's 9 windows per event with Polars `rolling_*_by` over the key: the peer
    the benchmarks time (`frame`: user_id, ts, amount, sorted by user_id then ts)."""
    import polars as pl  # the bench extra's; only the benchmarks that time Polars need it

    one = pl.col("amount").is_not_null().cast(pl.Int64)  # amount is never null: one per event
    columns = []
    for w in WINDOWS:
        columns += [
            one.rolling_sum_by("ts", window_size=w).over("user_id").alias(f"count_{w}"),
            pl.col("amount").rolling_sum_by("ts", window_size=w).over("user_id").alias(f"s_{w}"),
            pl.col("amount").rolling_mean_by("ts", window_size=w).over("user_id").alias(f"m_{w}"),
        ]
    return frame.with_columns(columns)
