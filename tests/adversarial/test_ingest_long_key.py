"""A 5 MB entity key: ingest hashes it in a fraction of a second (it took 18 s when the
vectorized murmur2 looped once per word of the longest key), to the partition Kafka gives it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from connectors.partitioner import LONG_KEY_BYTES, murmur2, murmur2_many, partition_for
from connectors.segments import Warehouse
from tests.adversarial.ingest_helpers import PARTITIONS, TS0, project
from tests.helpers import run_command


def test_long_keys_hash_as_kafka_does() -> None:
    rng = np.random.default_rng(5)
    sizes = [0, 1, 3, LONG_KEY_BYTES - 1, LONG_KEY_BYTES, LONG_KEY_BYTES + 1, 5000, 77_777]
    keys = ["".join(rng.choice(list("aé€𝄞"), size=n)) for n in sizes]
    want = [murmur2(k.encode("utf-8")) & 0xFFFFFFFF for k in keys]
    assert murmur2_many(pa.array(keys)).tolist() == want


def test_a_5mb_key_is_ingested_quickly_into_its_kafka_partition(tmp_path: Path) -> None:
    warehouse, common = project(tmp_path)
    key = "k" * 5_000_000
    table = pa.table(
        {
            "user_id": [key, "u1"],
            "ts": pa.array([TS0, TS0 + 1], pa.timestamp("us", tz="UTC")),
            "amount": [1.0, 2.0],
            "channel": ["web", "web"],
        }
    )
    pq.write_table(table, tmp_path / "long.parquet")
    started = time.perf_counter()
    done = run_command("flows.ingest", *common, str(tmp_path / "long.parquet"))
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert elapsed < 10, f"ingest of 2 rows took {elapsed:.1f}s"
    wh = Warehouse(warehouse)
    expected = partition_for(key, PARTITIONS)
    batches = wh.read("txns", expected, columns=["user_id"])
    held = [k for b in batches for k in b.column("user_id").to_pylist()]
    assert key in held
