"""Fixtures of the connector tests: the example transaction schema and records of it."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# The connectors' own copy of a card-transaction schema (not the shipped example's, which grows
# with the example).
SCHEMA_FILE = Path(__file__).resolve().parent / "transaction.avsc"
TS0 = 1_700_000_000_000_000  # µs, 2023-11-14T22:13:20Z


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
