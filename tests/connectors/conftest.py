"""Fixtures of the connector tests: the example transaction schema and records of it."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from connectors.avro import arrow_schema

# The connectors' own copy of a card-transaction schema (not the shipped example's, which grows
# with the example).
SCHEMA_FILE = Path(__file__).resolve().parent / "transaction.avsc"
TS0 = 1_700_000_000_000_000  # µs, 2023-11-14T22:13:20Z
US = pa.timestamp("us", tz="UTC")


@pytest.fixture
def transaction_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_FILE.read_text())
    return schema


@pytest.fixture
def transactions() -> Callable[[int], list[dict[str, Any]]]:
    """Makes n transaction records (a fixed seed; some optional fields null)."""

    def make(n: int) -> list[dict[str, Any]]:
        rng = random.Random(n)
        return [
            {
                "user_id": f"u{rng.randrange(50)}",
                "ts": TS0 + i * 1_000,
                "amount": None if i % 7 == 0 else round(rng.uniform(1, 500), 2),
                "merchant": None if i % 5 == 0 else f"m{rng.randrange(20)}",
                "channel": rng.choice(["web", "pos", "app", None]),
                "is_fraud": None if i % 3 == 0 else rng.random() < 0.1,
            }
            for i in range(n)
        ]

    return make


@pytest.fixture
def log_rows(transaction_schema: dict[str, Any]) -> Any:
    """Makes a table of n log records of partition p from offset `first`, event times
    TS0 + offset ms."""
    schema = arrow_schema(transaction_schema)

    def make(first: int, n: int, partition: int = 0) -> pa.Table:
        offsets = np.arange(first, first + n, dtype=np.int64)
        return pa.table(
            {
                "user_id": [f"u{o % 13}" for o in offsets],
                "ts": pa.array(TS0 + offsets * 1000).cast(US),
                "amount": offsets * 0.5,
                "merchant": [None if o % 4 == 0 else f"m{o % 3}" for o in offsets],
                "channel": ["web"] * n,
                "is_fraud": offsets % 10 == 0,
                "_offset": offsets,
                "_partition": pa.array(np.full(n, partition, dtype=np.int32)),
                "_arrival": pa.array(np.full(n, TS0, dtype=np.int64)).cast(US),
            }
        ).cast(
            pa.schema(
                [*schema, ("_offset", pa.int64()), ("_partition", pa.int32()), ("_arrival", US)]
            )
        )

    return make
