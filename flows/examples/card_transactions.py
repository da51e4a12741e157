"""Example feature definitions: card transactions by user, merchant risk, and a fraud model.

This is the module `python -m flows.run` uses when no --features is given. Copy it to start your
own: a definitions module is plain Python that declares Sources, FeatureViews, RequestSources,
on-demand functions and FeatureServices.

The `fraud_model` service is the vector a fraud model consumes per payment: the user's 14-day
mean amount (view `user_spend`), the merchant's 30-day chargeback rate (view `merchant_risk`,
another entity), and request-time signals computed from the payment itself (`payment_signals`):
the amount against the user's mean, the channel's code, and the similarity between the payment
text's embedding and the user's 30-day mean embedding (a vector feature of `user_spend`).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from flows.ondemand import category_index, cosine_similarity, ratio
from flows.spec import (
    FeatureService,
    FeatureView,
    RequestSource,
    Source,
    count,
    last,
    max,
    mean,
    min,
    on_demand,
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
        mean("text_embedding", window="30d"),  # text_embedding_mean_30d (element-wise)
    ],
)

merchant_events = Source(
    name="merchant_events",
    schema="schemas/merchant.avsc",
    key="merchant_id",
    timestamp="ts",
    partitions=2,
)

merchant_risk = FeatureView(
    name="merchant_risk",
    source=merchant_events,
    features=[mean("chargeback", window="30d")],  # chargeback_mean_30d: the chargeback rate
)

payment = RequestSource(
    name="payment",
    schema={"amount": "double", "channel": "string", "text_embedding": "array<float>"},
)

CHANNEL_CODES = ["pos", "web", "app", "atm"]


@on_demand(
    sources=[payment, user_spend[["amount_mean_14d", "text_embedding_mean_30d"]]],
    outputs={"amount_vs_mean_14d": "double", "channel_code": "int", "text_similarity": "double"},
)
def payment_signals(rows: pa.Table) -> dict[str, Any]:
    """Request-time features: the amount against the user's 14-day mean (null without a
    mean), the channel's code (-1 for an unknown channel), and the cosine similarity of the
    payment text's embedding with the user's 30-day mean embedding (null without either)."""
    return {
        "amount_vs_mean_14d": ratio(rows["amount"], rows["user_spend__amount_mean_14d"]),
        "channel_code": category_index(rows["channel"], CHANNEL_CODES),
        "text_similarity": cosine_similarity(
            rows["text_embedding"], rows["user_spend__text_embedding_mean_30d"]
        ),
    }


fraud_model = FeatureService(
    name="fraud_model",
    features=[user_spend[["amount_mean_14d"]], merchant_risk, payment_signals],
    description="per-payment fraud score inputs (the talk's example)",
    owner="risk-team",
)
