"""Benchmark: the whole deployment path against DuckDB, in one run, on the same log.

`python -m flows.run --until-caught-up` over N events (default 10M, 100k keys, 180 days) held in
warehouse segments, with features count, sum and mean of amount over 30m, 14d and 180d: reading
segments, the bytewax dataflow, the aggregation core, RocksDB commits. Against DuckDB computing
the same windows per event with window SQL over the same Parquet segment files. Runs the flow
with 1 and with 2 workers (threads of one process) and as a cluster of 2 processes, reports
events/s, wall time, peak memory (the largest VmHWM of the flow processes), and the RocksDB
get + read of one entity (p50/p99) through FeatureClient (`scripts/bench_reads.py` measures
the read path in detail, beside a raw RocksDB get and multi-get of the same keys).

    python scripts/bench_flow.py [--events 10000000] [--keys 100000] [--partitions 4]
    python scripts/bench_flow.py --events 30000000 --replay-only   # peak RSS against log size
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
from workload import SCHEMA, cluster_addresses, polars_windows, transactions

from connectors.segments import Warehouse
from flows.ingest import ingest_table
from flows.spec import load_definitions
from state.client import FeatureClient

REPO = Path(__file__).resolve().parent.parent
DAY_US = 86_400_000_000
DEFINITIONS = """
from flows.spec import FeatureView, Source, count, mean, sum
txn = Source(name="txn", schema={schema!r}, key="user_id", timestamp="ts", partitions={parts})
spend = FeatureView(name="spend", source=txn, features=[
    f(window=w) if f is count else f("amount", window=w)
    for w in ("30m", "14d", "180d") for f in (count, sum, mean)])
merchant = FeatureView(name="merchant", source=txn, key="merchant_id", features=[
    f(window=w) if f is count else f("amount", window=w)
    for w in ("30m", "14d", "180d") for f in (count, sum, mean)])
"""


def make_log(tmp: Path, n: int, keys: int, parts: int) -> tuple[Path, int]:
    defs = tmp / "defs.py"
    defs.write_text(DEFINITIONS.format(schema=SCHEMA, parts=parts))
    table = transactions(n, keys)
    ts = table.column("ts").cast(pa.int64()).to_numpy()
    source = load_definitions(defs).sources["txn"]
    ingest_table(source, table, Warehouse(tmp / "wh"))
    return defs, int(ts.max())


def run_flow(
    tmp: Path,
    defs: Path,
    workers: int,
    views: str = "spend",
    name: str = "",
    processes: int = 1,
    batch_rows: int | None = None,
) -> tuple[float, float]:
    """Wall time of `flows.run --until-caught-up` (with `processes` > 1: a bytewax cluster of
    that many processes on this host, each with its own state directory as on its own host),
    and the peak RSS in MB of its largest process."""
    state = tmp / f"state-w{workers}{name}"
    common = [
        *("--features", str(defs), "--warehouse", str(tmp / "wh"), "--until-caught-up"),
        *("--views", views, "--workers", str(workers), "--status-interval", "30"),
        *(("--batch-rows", str(batch_rows)) if batch_rows else ()),
    ]
    runs = [[*common, "--state", str(state)]]
    if processes > 1:  # --process-id appended below
        addresses = cluster_addresses(processes)
        runs = [
            [*common, "--state", f"{state}-p{i}", "--separate-state", *("--addresses", addresses)]
            for i in range(processes)
        ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    procs = []
    for i, args in enumerate(runs):
        args += ["--process-id", str(i)] if processes > 1 else []
        log = open(tmp / f"flow{name}-w{workers}-p{i}.log", "wb")  # noqa: SIM115 (closed below)
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, "-m", "flows.run", *args],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    peak_kb = watch_peak_rss([proc for proc, _ in procs])
    failed = []
    for proc, log in procs:
        proc.wait()
        log.close()
        if proc.returncode:
            failed.append(Path(log.name).read_text()[-3000:])
    elapsed = time.perf_counter() - started
    if failed:
        raise SystemExit("\n".join(failed))
    return elapsed, peak_kb / 1024


def children_cpu() -> float:
    """CPU seconds (user + system) of the child processes waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def watch_peak_rss(procs: list[subprocess.Popen[bytes]]) -> int:
    """The largest peak RSS (kB) of `procs` until they all exit, from /proc/<pid>/status
    VmHWM sampled every 50 ms (a fork's wait4 `ru_maxrss` would count the pages it shared
    with this big bench process before its exec)."""
    peak, alive = 0, list(procs)
    while alive:
        for proc in list(alive):
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                hwm = int(status.split("VmHWM:")[1].split()[0])
            except (OSError, IndexError, ValueError):
                hwm = 0
            peak = max(peak, hwm)
            if proc.poll() is not None:
                alive.remove(proc)
        time.sleep(0.05)
    return peak


def run_duckdb(tmp: Path) -> float:
    frames = ("INTERVAL 30 MINUTE", "INTERVAL 14 DAY", "INTERVAL 180 DAY")
    cols = []
    for iv in frames:
        frame = (
            f"OVER (PARTITION BY user_id ORDER BY ts RANGE BETWEEN {iv} PRECEDING AND CURRENT ROW)"
        )
        cols += [f"count(*) {frame}", f"sum(amount) {frame}", f"avg(amount) {frame}"]
    files = str(tmp / "wh" / "txn" / "p*" / "*.parquet")
    con = duckdb.connect()
    started = time.perf_counter()
    con.sql(
        f"CREATE TABLE out AS SELECT user_id, ts, {', '.join(cols)} FROM read_parquet('{files}')"
    )
    return time.perf_counter() - started


def run_polars(tmp: Path) -> float:
    """The same 9 windows per event with Polars over the same segments."""
    files = str(tmp / "wh" / "txn" / "p*" / "*.parquet")
    started = time.perf_counter()
    frame = pl.scan_parquet(files).select("user_id", "ts", "amount").collect()
    frame = frame.sort("user_id", "ts")
    polars_windows(frame)
    return time.perf_counter() - started


def read_latency(state: Path, keys: int, newest: int) -> tuple[float, float, float]:
    with FeatureClient(state) as client:
        client.get("spend", "u0", at=(newest + 1) / 1e6)  # open the partitions
        single = []
        for k in range(5000):
            t0 = time.perf_counter_ns()
            client.get("spend", f"u{k % keys}", at=(newest + 1) / 1e6)
            single.append(time.perf_counter_ns() - t0)
        t0 = time.perf_counter_ns()
        for b in range(50):
            client.get_many(
                "spend", [f"u{(b * 100 + i) % keys}" for i in range(100)], at=(newest + 1) / 1e6
            )
        batch_us = (time.perf_counter_ns() - t0) / 50 / 1000
    arr = np.array(single) / 1000
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99)), batch_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--rekeyed",
        action="store_true",
        help="also run the user view plus a 9-feature view keyed by merchant_id (10k values, "
        "re-partitioned in the dataflow), beside the user view alone",
    )
    parser.add_argument(
        "--replay-only",
        action="store_true",
        help="only the 1-worker flows.run (time and peak RSS): no peers, no 2-worker or cluster "
        "runs, no reads; e.g. with --events 30000000 to see the peak RSS against the log size",
    )
    parser.add_argument("--batch-rows", type=int, help="flows.run --batch-rows (default: its own)")
    args = parser.parse_args()
    if args.replay_only:
        replay_only(args)
        return
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        defs, newest = make_log(tmp, args.events, args.keys, args.partitions)
        duck = run_duckdb(tmp)
        polars = run_polars(tmp)
        cpu = children_cpu()
        one, peak1 = run_flow(tmp, defs, 1, batch_rows=args.batch_rows)
        cpu1, cpu = children_cpu() - cpu, children_cpu()
        two, peak2 = run_flow(tmp, defs, 2, batch_rows=args.batch_rows)
        cpu = children_cpu()
        procs, peak_p = run_flow(
            tmp, defs, 1, name="-cluster", processes=2, batch_rows=args.batch_rows
        )
        cpu_p = children_cpu() - cpu
        # the same runs again with nothing left to apply: what a run costs besides the work
        # (process start, imports, plan, cluster connection, stop)
        fixed1, _ = run_flow(tmp, defs, 1, batch_rows=args.batch_rows)
        fixed_p, _ = run_flow(
            tmp, defs, 1, name="-cluster", processes=2, batch_rows=args.batch_rows
        )
        p50, p99, batch = read_latency(tmp / "state-w1", args.keys, newest)
        both = None
        if args.rekeyed:
            both = run_flow(tmp, defs, 1, "spend,merchant", "-both", batch_rows=args.batch_rows)
        state_bytes = sum(f.stat().st_size for f in (tmp / "state-w1").rglob("*") if f.is_file())
    n = args.events
    print(
        f"workload: {n:,} events, {args.keys:,} keys, 180 days, 9 features, "
        f"{args.partitions} partitions, in warehouse segments"
    )
    print(
        f"flows.run --until-caught-up, 1 worker : {one:7.2f} s ({n / one:,.0f} events/s), "
        f"peak RSS {peak1:,.0f} MB, CPU {cpu1:.2f} s ({cpu1 / one:.2f} cores busy)"
    )
    print(
        f"flows.run --until-caught-up, 2 workers: {two:7.2f} s ({n / two:,.0f} events/s), "
        f"peak RSS {peak2:,.0f} MB"
    )
    print(
        f"flows.run --until-caught-up, 2 processes (--addresses, 1 worker each, own state): "
        f"{procs:7.2f} s ({n / procs:,.0f} events/s), peak RSS {peak_p:,.0f} MB per process: "
        f"{one / procs:.2f}x the 1-process rate (target >= 1.8); CPU {cpu_p:.2f} s in all "
        f"({cpu_p / procs:.2f} cores busy of {os.cpu_count()}): the 1-process run keeps "
        f"{cpu1 / one:.2f} cores busy, so {os.cpu_count()} cores bound 2 processes to "
        f"{(os.cpu_count() or 1) / (cpu1 / one):.2f}x"
    )
    ideal = fixed_p + (one - fixed1) / 2
    print(
        f"  a run with nothing to apply: 1 process {fixed1:.2f} s, 2 processes {fixed_p:.2f} s; "
        f"with the rest of the 1-process run split perfectly in two, 2 processes would take "
        f"{ideal:.2f} s: {one / ideal:.2f}x at best"
    )
    print(f"duckdb window SQL over the same segments: {duck:7.2f} s")
    print(f"polars rolling_*_by over the same segments: {polars:7.2f} s")
    print(
        f"ratio ours/duckdb: 1 worker {one / duck:.2f}, 2 workers {two / duck:.2f} (target <= 1.0)"
    )
    print(
        f"ratio ours/polars: 1 worker {one / polars:.2f} (target <= 0.7), 2 workers "
        f"{two / polars:.2f}; 2 workers reach {one / two:.2f}x the 1-worker rate"
    )
    print(
        f"view store on disk: {state_bytes / 2**20:,.0f} MB for {args.keys:,} entities "
        f"({state_bytes / args.keys:,.0f} bytes per entity, RocksDB with LZ4)"
    )
    print(
        f"FeatureClient.get (RocksDB get + 9 features): p50 {p50:.1f} us, p99 {p99:.1f} us; "
        f"get_many of 100: {batch:,.0f} us"
    )
    if both is not None:
        print(
            f"user view + merchant view (re-keyed), 1 worker: {both[0]:7.2f} s "
            f"({n / both[0]:,.0f} events/s), peak RSS {both[1]:,.0f} MB; "
            f"{both[0] / one:.2f}x the user view alone (target <= 1.6)"
        )


def replay_only(args: argparse.Namespace) -> None:
    """The 1-worker `flows.run --until-caught-up` alone: wall time and the flow's peak RSS."""
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        defs, _ = make_log(tmp, args.events, args.keys, args.partitions)
        one, peak = run_flow(tmp, defs, 1, batch_rows=args.batch_rows)
    n = args.events
    print(
        f"workload: {n:,} events, {args.keys:,} keys, 180 days, 9 features, "
        f"{args.partitions} partitions, in warehouse segments"
    )
    print(
        f"flows.run --until-caught-up, 1 worker : {one:7.2f} s ({n / one:,.0f} events/s), "
        f"peak RSS {peak:,.0f} MB (target <= 1,024 MB at 10M events, flat in the events)"
    )


if __name__ == "__main__":
    main()
