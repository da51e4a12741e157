"""Deterministic demo data for the embedded default: card transactions into the warehouse log.

1M events from 10k users over 180 days ending 2026-11-01 UTC, with per-user spending habits, a
Zipf-like merchant popularity, a few null amounts and about 2% of events arriving out of order
(event time up to two hours behind the log order), so every part of the window semantics is used.
Merchant events (300k settled payments, each charged back or not, at a merchant-specific rate)
feed the `merchant_risk` view. Fraud labels depend on what the `fraud_model` service sees (an
amount far above the user's habit, a risky merchant, an unusual channel), and a labelled spine
of the last 30 days' transactions is written beside the warehouse (`data/spine.parquet`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from connectors.objectstore import owned_temp, replace_file
from connectors.segments import Warehouse
from flows.ingest import IngestReport, ingest_table_into_empty_log
from flows.spec import Source

DEMO_END = datetime(2026, 11, 1, tzinfo=UTC)
CHANNELS = np.array(["pos", "web", "app", "atm"], dtype=object)
N_MERCHANTS = 5000
SPINE_DAYS = 30
SPINE_ROWS = 50_000
EMBEDDING_DIM = 16


def merchant_rates(seed: int = 7) -> npt.NDArray[np.float64]:
    """Each merchant's chargeback rate (index 1..N_MERCHANTS): mostly ~1%, a few risky ones."""
    rng = np.random.default_rng(seed + 1)
    rates = rng.beta(0.4, 30.0, N_MERCHANTS + 1)
    risky = rng.random(N_MERCHANTS + 1) < 0.03
    return np.where(risky, rng.uniform(0.2, 0.6, N_MERCHANTS + 1), rates)


def demo_table(
    n_events: int = 1_000_000,
    n_users: int = 10_000,
    days: int = 180,
    seed: int = 7,
    end: datetime = DEMO_END,
) -> pa.Table:
    """The demo events in log (arrival) order, as an Arrow table of the transaction schema:
    `days` of history up to `end` (a benchmark passes the current time, so that reads "now"
    see full windows)."""
    rng = np.random.default_rng(seed)
    end_us = int(end.timestamp()) * 1_000_000
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
    merchant = np.minimum(rng.zipf(1.3, n_events), N_MERCHANTS)
    unusual = amount > 3 * user_scale[users]
    odd_channel = channel != favourite[users]
    fraud_p = 0.001 + 0.04 * unusual + 0.3 * merchant_rates(seed)[merchant] + 0.004 * odd_channel
    is_fraud = rng.random(n_events) < fraud_p
    return pa.table(
        {
            "user_id": pa.array(np.char.add("u", np.char.zfill(users.astype(str), 5))),
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "amount": pa.array(amount, mask=~amount_valid),
            "merchant": pa.array(np.char.add("m", np.char.zfill(merchant.astype(str), 4))),
            "channel": pa.array(CHANNELS[channel].tolist(), pa.string()),
            "is_fraud": pa.array(is_fraud),
            "text_embedding": text_embeddings(users, is_fraud, n_users, rng),
        }
    )


def text_embeddings(
    users: npt.NDArray[np.int64],
    is_fraud: npt.NDArray[np.bool_],
    n_users: int,
    rng: np.random.Generator,
) -> pa.Array:
    """Deterministic 16-dimensional unit embeddings of each payment's description text (no
    model weights): near the user's own topic for their usual payments, unrelated for fraud."""
    topics = rng.normal(size=(n_users, EMBEDDING_DIM))
    noise = rng.normal(size=(len(users), EMBEDDING_DIM))
    vectors = np.where(is_fraud[:, None], noise, topics[users] + 0.6 * noise)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    flat = pa.array(vectors.astype(np.float32).reshape(-1))
    offsets = pa.array(np.arange(0, len(flat) + 1, EMBEDDING_DIM, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


def merchant_table(
    n_events: int = 300_000, days: int = 180, seed: int = 7, end: datetime = DEMO_END
) -> pa.Table:
    """Merchant events in log order: settled payments, each charged back (1.0) or not (0.0)."""
    rng = np.random.default_rng(seed + 2)
    end_us = int(end.timestamp()) * 1_000_000
    ts = np.sort(rng.integers(end_us - days * 86_400_000_000, end_us, n_events))
    merchant = np.minimum(rng.zipf(1.3, n_events), N_MERCHANTS)
    chargeback = (rng.random(n_events) < merchant_rates(seed)[merchant]).astype(np.float64)
    return pa.table(
        {
            "merchant_id": pa.array(np.char.add("m", np.char.zfill(merchant.astype(str), 4))),
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "chargeback": pa.array(chargeback),
        }
    )


def demo_spine(
    events: pa.Table, rows: int = SPINE_ROWS, seed: int = 7, end: datetime = DEMO_END
) -> pa.Table:
    """A labelled spine for the `fraud_model` service: transactions of the 30 days before
    `end`, each with its user, merchant, request fields, time and `is_fraud` label (features
    come from events strictly before it)."""
    end_us = int(end.timestamp()) * 1_000_000
    recent = events.filter(
        pc.greater_equal(
            events.column("ts"),
            pa.scalar(end_us - SPINE_DAYS * 86_400_000_000, pa.timestamp("us", tz="UTC")),
        )
    )
    rng = np.random.default_rng(seed + 3)
    picked = np.sort(rng.choice(recent.num_rows, size=min(rows, recent.num_rows), replace=False))
    sample = recent.take(pa.array(picked))
    return pa.table(
        {
            "user_id": sample.column("user_id"),
            "merchant_id": sample.column("merchant"),
            "ts": sample.column("ts"),
            "amount": sample.column("amount"),
            "channel": sample.column("channel"),
            "text_embedding": sample.column("text_embedding"),
            "is_fraud": sample.column("is_fraud"),
        }
    )


def ensure_demo_data(
    source: Source,
    warehouse: Warehouse,
    n_events: int = 1_000_000,
    spine: Path | None = None,
) -> IngestReport | None:
    """Generate the demo log if the warehouse holds nothing for `source` (the transactions,
    with the labelled spine written to `spine` when given; or the merchant events).

    Two runs started at once generate it once: the look and the ingest hold the source's
    manifest lock on a local warehouse, and the commit itself refuses a log that is no longer
    empty (an object store has no lock). The spine is the same file whoever writes it."""
    if any(warehouse.next_offset(source.name, p) for p in range(source.partitions)):
        return None
    with warehouse.lock(source.name):
        if source.name == "merchant_events":
            table = merchant_table()
        else:
            table = demo_table(n_events)
            if spine is not None:
                spine_table = demo_spine(table)
                replace_file(spine, lambda t: pq.write_table(spine_table, t), tmp=owned_temp(spine))
        # The demo's log order is its arrival order: some events arrive late on purpose.
        return ingest_table_into_empty_log(source, table, warehouse, keep_order=True)
