"""Shared test helpers: a definitions module on disk, generated events, running commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
MINUTE = 60_000_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR

SCHEMA_JSON = """{
  "type": "record", "name": "Txn", "namespace": "test",
  "fields": [
    {"name": "user_id", "type": "string"},
    {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
    {"name": "amount", "type": ["null", "double"], "default": null},
    {"name": "channel", "type": ["null", "string"], "default": null}
  ]
}"""

DEFINITIONS = """
from flows.spec import (FeatureView, Source, count, distinct_count, last, max, mean, min,
                        percentile, std, sum)

txns = Source(name="txns", schema="txn.avsc", key="user_id", timestamp="ts",
              partitions={partitions}, topic={topic!r})
spend = FeatureView(name="spend", source=txns, features=[
    count(window="30m"), sum("amount", window="2h", hop="10m"), mean("amount", window="1d"),
    min("amount", window="3h"), max("amount", window="3h"), std("amount", window="1d"),
    last("channel"), count(), percentile("amount", 0.9, window="1d"),
])
channels = FeatureView(name="channels", source=txns, features=[
    distinct_count("channel", window="1d"), last("channel", window="1h"),
    mean("amount", window="6h", name="avg_amount_6h"),
])
"""


def write_definitions(directory: Path, partitions: int = 3, topic: str | None = None) -> Path:
    """A definitions module (and its .avsc) in `directory`; returns the module path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "txn.avsc").write_text(SCHEMA_JSON)
    path = directory / "features.py"
    path.write_text(DEFINITIONS.format(partitions=partitions, topic=topic))
    return path


def make_events(
    n: int, n_keys: int, seed: int, start_us: int = 1_780_000_000_000_000, span_us: int = 3 * DAY
) -> pa.Table:
    """Events in log order with out-of-order arrivals, duplicate timestamps and nulls."""
    rng = np.random.default_rng(seed)
    ts = start_us + np.sort(rng.integers(0, span_us, n))
    ts = ts - np.where(rng.random(n) < 0.05, rng.integers(0, 2 * HOUR, n), 0)
    ts = ts - ts % np.where(rng.random(n) < 0.2, MINUTE, 1)
    return pa.table(
        {
            "user_id": pa.array([f"user{k}" for k in rng.integers(0, n_keys, n)]),
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "amount": pa.array(np.round(rng.lognormal(3, 1, n), 2), mask=rng.random(n) < 0.03),
            "channel": pa.array(
                rng.choice(["web", "pos", "app", "atm"], n).tolist(), mask=rng.random(n) < 0.05
            ),
        }
    )


def run_command(
    module: str,
    *args: str,
    cwd: Path | None = None,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m <module> args` in a fresh process; never raises on a non-zero exit."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cluster_addresses(processes: int) -> str:
    """`--addresses` for a bytewax cluster of `processes` on free loopback ports."""
    import socket

    ports = []
    for _ in range(processes):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    return ";".join(f"127.0.0.1:{p}" for p in ports)


def evaluate(layout: Any, blocks: list[Any], t: int) -> dict[str, Any]:
    """Every feature of one entity's tiles as of t, through the read client's own code (the
    tiles encoded as a stored blob, then `state.read.evaluate_blob`)."""
    from state.codec import encode_entity
    from state.read import evaluate_blob

    return evaluate_blob(layout, encode_entity(layout, blocks, 0), t)


def decode_entity(layout: Any, blob: bytes) -> tuple[list[Any], int]:
    """One entity's tiles per hop group (as `TileBlock`s) and its newest event time, from its
    stored blob (`state.codec.decode_words`, viewed as each group's row type)."""
    from state.codec import decode_words
    from state.tiles import TileBlock

    groups, newest = decode_words(layout, blob)
    blocks = [
        TileBlock(np.ascontiguousarray(words).view(group.dtype).reshape(len(words)), objs)
        for group, (words, objs) in zip(layout.groups, groups, strict=True)
    ]
    return blocks, newest
