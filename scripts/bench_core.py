"""Benchmark: the windowed-aggregation core against DuckDB window SQL, in one run, on one file.

Workload (issue 3): N events (default 10M), K keys (100k), 180 days; features count, sum and
mean of amount over 30m, 14d and 180d. Measures
  - ours: read the Parquet file, apply every event into tiles (flows.aggregate.apply_batch, one
    batch per log partition as replay does) and finalize every key's 9 values as of the end of
    data (state.batch_read.evaluate_blobs: all keys of a partition at once, as `get_many`);
  - DuckDB: the same 9 windows per event with window SQL (RANGE frames), the backfill a user
    would otherwise run in the warehouse;
  - Polars: the same 9 windows per event (`rolling_sum_by`/`rolling_mean_by` over the key);
  - the read path: one entity's 9 features from its stored blob, compiled as `get` reads them
    (state.compiled_read) and in Python (state.read.evaluate_blob), p50/p99 (the RocksDB get is
    measured by bench_reads.py).

    python scripts/bench_core.py [--events 10000000] [--keys 100000] [--partitions 4]

With --live-batch, instead: the live write path of the shipped example's `user_spend` view (10
features incl. a KLL p95): 10k keys that already hold --history-minutes of tiles (default 60),
then 5,000-event batches (one per 250 ms at 20k events/s) applied with flows.aggregate.apply_batch
against an in-memory store; prints the best of 15 batches.

    python scripts/bench_core.py --live-batch [--history-minutes 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from workload import polars_windows, spend_view, transactions

from connectors.partitioner import partitions_for
from flows.aggregate import apply_batch
from state.batch_read import evaluate_blobs
from state.compiled_read import compiled_values
from state.kernels import kernels
from state.read import evaluate_blob
from state.store import PartitionProgress


def make_file(path: Path, n: int, keys: int, partitions: int) -> None:
    table = transactions(n, keys)
    parts = partitions_for(table.column("user_id"), partitions)
    pq.write_table(table.append_column("_partition", pa.array(parts)), path)


def run_ours(path: Path, partitions: int) -> tuple[float, list[bytes], int]:
    layout = spend_view().layout()
    kernels()  # load the compiled kernels (Numba) first, as Polars and DuckDB load at import
    started = time.perf_counter()
    # only the columns the view reads, as Polars reads only its three
    wanted = [*layout.key_columns, layout.timestamp, *layout.column_types, "_partition"]
    table = pq.read_table(path, columns=list(dict.fromkeys(wanted)))
    end = int(table.column("ts").cast(pa.int64()).to_numpy().max()) + 1
    blobs: list[bytes] = []
    parts = table.column("_partition").to_numpy()
    for p in range(partitions):
        part = table.filter(pa.array(parts == p))
        part = part.append_column("_offset", pa.array(np.arange(part.num_rows, dtype=np.int64)))
        result = apply_batch(
            layout, part, PartitionProgress(-1, None, 0, 0), lambda keys: [None] * len(keys)
        )
        part_blobs = list(result.puts.values())
        evaluate_blobs(layout, part_blobs, end)
        blobs += part_blobs
    return time.perf_counter() - started, blobs, end


def run_duckdb(path: Path) -> float:
    frames = {"30m": "INTERVAL 30 MINUTE", "14d": "INTERVAL 14 DAY", "180d": "INTERVAL 180 DAY"}
    cols = []
    for w, iv in frames.items():
        frame = (
            f"OVER (PARTITION BY user_id ORDER BY ts RANGE BETWEEN {iv} PRECEDING AND CURRENT ROW)"
        )
        cols += [
            f"count(*) {frame} AS count_{w}",
            f"sum(amount) {frame} AS amount_sum_{w}",
            f"avg(amount) {frame} AS amount_mean_{w}",
        ]
    con = duckdb.connect()
    started = time.perf_counter()
    con.sql(
        f"CREATE TABLE out AS SELECT user_id, ts, {', '.join(cols)} FROM read_parquet('{path}')"
    )
    return time.perf_counter() - started


def run_polars(path: Path) -> float:
    started = time.perf_counter()
    frame = pl.read_parquet(path, columns=["user_id", "ts", "amount"]).sort("user_id", "ts")
    polars_windows(frame)
    return time.perf_counter() - started


def read_latency(blobs: list[bytes], end: int, read: Any) -> tuple[float, float]:
    layout = spend_view().layout()
    read(layout, blobs[0], end, None)  # compiles (or loads) the compiled read
    samples = []
    for blob in blobs[:20_000]:
        t0 = time.perf_counter_ns()
        read(layout, blob, end, None)
        samples.append(time.perf_counter_ns() - t0)
    arr = np.array(samples) / 1000
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def live_batches(history_minutes: int) -> None:
    from flows.spec import load_definitions

    examples = Path(__file__).resolve().parent.parent / "flows" / "examples"
    layout = load_definitions(examples / "card_transactions.py").layouts["user_spend"]
    rng = np.random.default_rng(1)
    store: dict[bytes, bytes] = {}
    progress = PartitionProgress(-1, None, 0, 0)
    t0, step, offset = 1_790_000_000_000_000, history_minutes * 600_000, 0
    best, touched = float("inf"), 0
    for i in range(115):  # 100 batches of history, then 15 measured
        users = np.char.add("u", rng.integers(0, 10_000, 5000).astype(str))
        batch = pa.table(
            {
                "user_id": users,
                "ts": pa.array(np.full(5000, t0 + i * step), pa.timestamp("us", tz="UTC")),
                "amount": np.round(rng.lognormal(3, 1, 5000), 2),
                "merchant": ["m1"] * 5000,
                "channel": ["web"] * 5000,
                "is_fraud": [False] * 5000,
                "text_embedding": pa.nulls(5000, pa.list_(pa.float32())),  # not measured here
                "_offset": pa.array(np.arange(offset, offset + 5000), pa.int64()),
            }
        )
        offset += 5000
        started = time.process_time()
        result = apply_batch(layout, batch, progress, lambda keys: [store.get(k) for k in keys])
        if i >= 100:
            best, touched = min(best, time.process_time() - started), len(result.puts)
        store.update(result.puts)
        progress = result.progress
    print(
        f"live write path (user_spend, 10k keys, {history_minutes} min of tiles): best "
        f"5,000-event batch {best * 1000:.1f} ms CPU, {touched:,} keys touched"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--live-batch", action="store_true", help="the live write path instead")
    parser.add_argument("--history-minutes", type=int, default=60)
    args = parser.parse_args()
    if args.live_batch:
        live_batches(args.history_minutes)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.parquet"
        make_file(path, args.events, args.keys, args.partitions)
        ours, blobs, end = run_ours(path, args.partitions)
        theirs = run_duckdb(path)
        polars = run_polars(path)
    p50, p99 = read_latency(blobs, end, compiled_values)
    py50, py99 = read_latency(blobs, end, evaluate_blob)
    print(f"workload: {args.events:,} events, {args.keys:,} keys, 180 days, 9 features")
    print(
        f"ours   (apply into tiles + finalize every key): {ours:7.2f} s "
        f"({args.events / ours:,.0f} events/s)"
    )
    print(f"duckdb (window SQL per event):                  {theirs:7.2f} s")
    print(f"polars (rolling_*_by over the key, per event):  {polars:7.2f} s")
    print(f"ratio ours/duckdb: {ours / theirs:.2f} (target <= 0.25)")
    print(f"ratio ours/polars: {ours / polars:.2f} (target <= 0.5)")
    print(
        f"read path, one entity, 9 features (compiled, as `get`): p50 {p50:.1f} us, "
        f"p99 {p99:.1f} us; in Python (state.read.evaluate_blob): p50 {py50:.1f} us, "
        f"p99 {py99:.1f} us"
    )


if __name__ == "__main__":
    main()
