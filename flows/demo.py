"""Deterministic demo data for the embedded default: card transactions into the warehouse log.

1M events from 10k users over 180 days ending 2026-11-01 UTC, with per-user spending habits, a
Zipf-like merchant popularity, a few null amounts and about 2% of events arriving out of order
(event time up to two hours behind the log order), so every part of the window semantics is used.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from connectors.segments import Warehouse
from flows.ingest import IngestReport, ingest_table
from flows.spec import Source

DEMO_END = datetime(2026, 11, 1, tzinfo=UTC)
CHANNELS = np.array(["pos", "web", "app", "atm"], dtype=object)


def demo_table(
    n_events: int = 1_000_000, n_users: int = 10_000, days: int = 180, seed: int = 7
) -> pa.Table:
    """The demo events in log (arrival) order, as an Arrow table of the transaction schema."""
    rng = np.random.default_rng(seed)
    end_us = int(DEMO_END.timestamp()) * 1_000_000
    span_us = days * 86_400_000_000
    activity = rng.lognormal(0.0, 1.0, n_users)
    users = rng.choice(n_users, size=n_events, p=activity / activity.sum())
    ts = np.sort(rng.integers(end_us - span_us, end_us, n_events))
    late = rng.random(n_events) < 0.02
    ts = ts - np.where(late, rng.integers(1, 7_200_000_000, n_events), 0)
    user_scale = rng.lognormal(3.5, 0.6, n_users)
    amount = np.round(user_scale[users] * rng.lognormal(0.0, 0.8, n_events), 2)
    amount_valid = rng.random(n_events) > 0.005
    favourite = rng.integers(0, len(CHANNELS), n_users)
    channel = np.where(
        rng.random(n_events) < 0.7, favourite[users], rng.integers(0, len(CHANNELS), n_events)
    )
    merchant = np.minimum(rng.zipf(1.3, n_events), 5000)
    return pa.table(
        {
            "user_id": pa.array(np.char.add("u", np.char.zfill(users.astype(str), 5))),
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "amount": pa.array(amount, mask=~amount_valid),
            "merchant": pa.array(np.char.add("m", np.char.zfill(merchant.astype(str), 4))),
            "channel": pa.array(CHANNELS[channel].tolist(), pa.string()),
            "is_fraud": pa.array(rng.random(n_events) < 0.003),
        }
    )


def ensure_demo_data(
    source: Source,
    warehouse: Warehouse,
    n_events: int = 1_000_000,
) -> IngestReport | None:
    """Generate the demo log if the warehouse holds nothing for `source`.

    The check and the ingest hold the source's manifest lock, so two runs started at once
    generate the demo data once."""
    with warehouse.lock(source.name):
        if any(warehouse.next_offset(source.name, p) for p in range(source.partitions)):
            return None
        # The demo's log order is its arrival order: some events arrive late on purpose.
        return ingest_table(source, demo_table(n_events), warehouse, keep_order=True)
