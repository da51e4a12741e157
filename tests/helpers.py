"""Shared test helpers: the shared schema and definitions modules on disk, generated events, a
project (definitions, warehouse, state) and the commands run on it, waiting for a condition."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

T = TypeVar("T")

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
TXN_SCHEMA: dict[str, Any] = json.loads(SCHEMA_JSON)
"""SCHEMA_JSON parsed (shared: copy it before changing it)."""

EV_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Ev",
    "fields": [
        {"name": "user_id", "type": "string"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "amount", "type": ["null", "double"], "default": None},
        {"name": "qty", "type": ["null", "long"], "default": None},
        {"name": "channel", "type": ["null", "string"], "default": None},
    ],
}
"""The core tests' events: a float and an int column beside the key, time and a string
(shared: copy it before changing it)."""

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


DEPLOYMENT_DEFS = """
from flows.spec import FeatureService, FeatureView, Source, count, last, mean, sum

txns = Source(name="txns", schema="txn.avsc", key="user_id", timestamp="ts", partitions=2)
spend = FeatureView(name="spend", source=txns, owner="risk-team", description="card spending",
                    tags=["fraud"], freshness="5m", features=[
    count(window="30m"),
    mean("amount", window="1d", description="mean amount", owner="ds"),
    last("channel"),
])
channels = FeatureView(name="channels", source=txns, features=[sum("amount", window="6h")])
fraud = FeatureService(name="fraud", features=[spend[["count_30m", "amount_mean_1d"]], channels])
"""
"""The `deployment` fixture's definitions: catalog metadata, a freshness expectation, a service."""
DEPLOYMENT_EVENTS = 3000
"""How many events the `deployment` fixture's log holds."""


def write_module(directory: Path, text: str = DEPLOYMENT_DEFS, schema: str = SCHEMA_JSON) -> Path:
    """A definitions module `text` and the txn.avsc it names in `directory`; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "txn.avsc").write_text(schema)
    path = directory / "features.py"
    path.write_text(text)
    return path


def write_definitions(directory: Path, partitions: int = 3, topic: str | None = None) -> Path:
    """The shared definitions module (and its .avsc) in `directory`; returns the module path."""
    return write_module(directory, DEFINITIONS.format(partitions=partitions, topic=topic))


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


@dataclass(frozen=True)
class Project:
    """A definitions module with its warehouse and state directory under one root, and the
    commands run on them, each in a fresh process (`project_factory` in conftest.py makes them).
    """

    root: Path
    features: Path

    @property
    def warehouse(self) -> Path:
        return self.root / "wh"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def command(self, module: str, *args: str) -> subprocess.CompletedProcess[str]:
        """`python -m <module> --features <module> --warehouse <warehouse> args`."""
        common = ["--features", str(self.features), "--warehouse", str(self.warehouse)]
        return run_command(module, *common, *args)

    def ingest(
        self, events: pa.Table, name: str = "events.parquet"
    ) -> subprocess.CompletedProcess[str]:
        """`flows.ingest` of `events`, written as the Parquet file `name` under the root."""
        pq.write_table(events, self.root / name)
        return self.command("flows.ingest", str(self.root / name))

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`flows.run --state <state> --until-caught-up args`."""
        return self.command("flows.run", "--state", str(self.state), "--until-caught-up", *args)


def wait_until(
    condition: Callable[[], T],
    what: str,
    *,
    timeout: float = 60,
    interval: float = 0.1,
    process: subprocess.Popen[Any] | None = None,
    log: Path | None = None,
) -> T:
    """Poll `condition()` until it gives something truthy, and return that. Fails naming `what`
    when `timeout` seconds pass or `process` exits first, with the text of `log` if given."""
    deadline = time.monotonic() + timeout
    while not (got := condition()):
        exited = process is not None and process.poll() is not None
        if exited or time.monotonic() >= deadline:
            tail = f":\n{log.read_text()}" if log is not None and log.exists() else ""
            if process is not None and exited:
                pytest.fail(f"the process exited ({process.returncode}) before {what}{tail}")
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(interval)
    return got


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
