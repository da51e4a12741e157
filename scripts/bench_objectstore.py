"""Warehouse on S3 vs local disk, in one run: append (ingest path) and full segment-read rate.

    eval "$(scripts/s3 env)"; python scripts/bench_objectstore.py [--rows 2000000]

Needs the S3 server of scripts/s3 (or any S3 endpoint in AWS_ENDPOINT_URL). Prints rows/s per
warehouse and the S3/local ratio. The bootstrap of a new host (restore from a checkpoint then
catch up, vs replay) is scripts/bench_bootstrap.py.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid

import numpy as np
import pyarrow as pa

from connectors.segments import Warehouse

US = pa.timestamp("us", tz="UTC")
SEGMENT_ROWS = 500_000


def table(first: int, n: int) -> pa.Table:
    rng = np.random.default_rng(first)
    offsets = np.arange(first, first + n, dtype=np.int64)
    return pa.table(
        {
            "user_id": pa.array(rng.integers(0, 100_000, n)).cast(pa.string()),
            "ts": pa.array(1_700_000_000_000_000 + offsets * 1000).cast(US),
            "amount": rng.lognormal(3, 1, n),
            "_offset": offsets,
            "_partition": pa.array(np.zeros(n, dtype=np.int32)),
            "_arrival": pa.array(np.zeros(n, dtype=np.int64)).cast(US),
        }
    )


def measure(location: str, rows: int) -> tuple[float, float]:
    wh = Warehouse(location)
    chunks = [table(f, min(SEGMENT_ROWS, rows - f)) for f in range(0, rows, SEGMENT_ROWS)]
    start = time.perf_counter()
    for chunk in chunks:
        wh.append("bench", 0, chunk, fingerprint="bench", ts_column="ts")
    append_s = time.perf_counter() - start
    start = time.perf_counter()
    read = sum(b.num_rows for b in wh.read("bench", 0))
    read_s = time.perf_counter() - start
    assert read == rows
    return rows / append_s, rows / read_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--bucket", default="featureflow-bench")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        local = measure(f"{tmp}/wh", args.rows)
    s3 = measure(f"s3://{args.bucket}/{uuid.uuid4().hex[:8]}", args.rows)
    for name, (append, read) in (("local", local), ("s3", s3)):
        print(f"{name:6} append {append:>12,.0f} rows/s   read {read:>12,.0f} rows/s")
    print(f"s3/local read time ratio: {local[1] / s3[1]:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
