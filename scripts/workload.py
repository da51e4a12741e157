"""The benchmarks' shared workload: card transactions keyed by user over 180 days, and the
view of count, sum and mean of amount over 30m, 14d and 180d (9 features)."""

from __future__ import annotations

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
