"""Example feature definitions: card transactions, keyed by user.

This is the module `python -m flows.run` uses when no --features is given. Copy it to start your
own: a definitions module is plain Python that declares Sources and FeatureViews.
"""

from __future__ import annotations

from flows.spec import (
    FeatureView,
    Source,
    count,
    last,
    max,
    mean,
    min,
    percentile,
    std,
    sum,
)

transactions = Source(
    name="transactions",
    schema="schemas/transaction.avsc",  # relative to this file (or the working directory)
    key="user_id",
    timestamp="ts",
    partitions=4,
)

user_spend = FeatureView(
    name="user_spend",
    source=transactions,
    features=[
        count(window="30m"),  # count_30m
        mean("amount", window="14d"),  # amount_mean_14d
        sum("amount", window="180d"),  # amount_sum_180d
        std("amount", window="7d"),  # amount_std_7d
        min("amount", window="1h"),  # amount_min_1h
        max("amount", window="1h"),  # amount_max_1h
        percentile("amount", 0.95, window="1h"),  # amount_p95_1h (KLL sketch)
        count(window="1d"),  # count_1d
        last("channel"),  # channel_last (lifetime)
        last("merchant", window="1d"),  # merchant_last_1d
    ],
)
