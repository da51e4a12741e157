"""Benchmark: point-in-time training snapshot against DuckDB, in one run, on the same events.

A spine of S rows (default 1M: random keys, random times) against N events (default 10M,
100k keys, 180 days), features count, sum and mean of amount over 30m, 14d and 180d, each row
seeing only events strictly before its time. Ours: `flows.pointintime.point_in_time` (the core
of `flows.snapshot`, without file I/O). Peers, in the same run: DuckDB's range join of spine and
events on key and time grouped by spine row; DuckDB with per-key prefix sums (running count and
sum per event) and ASOF joins (each window's value = prefix before t - prefix before the window's
start); Polars `join_asof` on the same prefix sums.

    python scripts/bench_snapshot.py [--events 10000000] [--keys 100000] [--spine 1000000]
"""

from __future__ import annotations

import argparse
import time

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
from workload import DAY_US, spend_view, transactions

from flows.pointintime import point_in_time

DAY = DAY_US
WINDOWS = {"30m": 30 * 60_000_000, "14d": 14 * DAY, "180d": 180 * DAY}
HOPS = {"30m": 60_000_000, "14d": 3_600_000_000, "180d": DAY}


def starts(times: np.ndarray) -> dict[str, np.ndarray]:
    """Each window's first event time per spine row (events in [start, t) count)."""
    return {w: (times // HOPS[w]) * HOPS[w] - length for w, length in WINDOWS.items()}


def prefix_sums(events: pa.Table) -> pa.Table:
    """Per event, the running count and amount sum of its key (key, time order)."""
    frame = pl.from_arrow(events.select(["user_id", "ts", "amount"]))
    assert isinstance(frame, pl.DataFrame)
    frame = frame.with_columns(t_us=pl.col("ts").cast(pl.Int64)).sort("user_id", "t_us")
    frame = frame.with_columns(
        c=pl.int_range(1, pl.len() + 1).over("user_id"),
        s=pl.col("amount").cum_sum().over("user_id"),
    )
    return frame.select("user_id", "t_us", "c", "s").sort("t_us").to_arrow()


def run_polars_asof(events: pa.Table, keys: np.ndarray, times: np.ndarray) -> float:
    started = time.perf_counter()
    pre = pl.from_arrow(prefix_sums(events))
    assert isinstance(pre, pl.DataFrame)
    probes = {"t": times - 1, **{w: v - 1 for w, v in starts(times).items()}}
    spine = pl.DataFrame({"row": np.arange(len(times)), "k": keys, **probes})
    got = {}
    for name in probes:
        joined = (
            spine.select("row", "k", name)
            .sort(name)
            .join_asof(
                pre,
                left_on=name,
                right_on="t_us",
                by_left="k",
                by_right="user_id",
                check_sortedness=False,
            )
        )
        got[name] = joined.sort("row").select(pl.col("c").fill_null(0), pl.col("s").fill_null(0.0))
    out = {}
    for w in WINDOWS:
        count = got["t"]["c"] - got[w]["c"]
        total = got["t"]["s"] - got[w]["s"]
        out[w] = (count, total, total / count)
    elapsed = time.perf_counter() - started
    return elapsed


def run_duckdb_asof(con: duckdb.DuckDBPyConnection, events: pa.Table) -> float:
    started = time.perf_counter()
    con.register("pre", prefix_sums(events))
    probes = {
        "t": "s.t - 1",
        **{w: f"(s.t // {HOPS[w]}) * {HOPS[w]} - {n} - 1" for w, n in WINDOWS.items()},
    }
    joins, cols = [], []
    for i, probe in enumerate(probes.values()):
        joins.append(f"ASOF LEFT JOIN pre p{i} ON p{i}.user_id = s.k AND {probe} >= p{i}.t_us")
    for i in range(1, len(WINDOWS) + 1):
        count = f"(coalesce(p0.c, 0) - coalesce(p{i}.c, 0))"
        total = f"(coalesce(p0.s, 0) - coalesce(p{i}.s, 0))"
        cols += [count, total, f"{total} / nullif({count}, 0)"]
    con.sql(
        f"CREATE TABLE snap_asof AS SELECT s.row, {', '.join(cols)} FROM spine s {' '.join(joins)}"
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--spine", type=int, default=1_000_000)
    args = parser.parse_args()
    rng = np.random.default_rng(3)
    n, s = args.events, args.spine
    events = transactions(n, args.keys)
    events = events.append_column("_offset", pa.array(np.arange(n, dtype=np.int64)))
    end = int(events.column("ts").cast(pa.int64()).to_numpy().max())
    keys = np.char.add("u", rng.integers(0, args.keys, s).astype(str))
    times = rng.integers(end - 180 * DAY, end, s)
    layout = spend_view().layout()

    started = time.perf_counter()  # compiles the kernels once per install (cached on disk)
    point_in_time(layout, events.slice(0, 100_000), pa.array(keys), times)
    warm = time.perf_counter() - started
    started = time.perf_counter()
    point_in_time(layout, events, pa.array(keys), times)
    ours = time.perf_counter() - started

    con = duckdb.connect()
    con.register("ev", events.append_column("t_us", events.column("ts").cast(pa.int64())))
    con.register("spine", pa.table({"row": np.arange(s), "k": keys, "t": times}))
    cols = []
    for w, length in WINDOWS.items():
        start = f"(s.t // {HOPS[w]}) * {HOPS[w]} - {length}"
        cond = f"FILTER (WHERE e.t_us >= {start})"
        cols += [
            f"count(e.t_us) {cond}",
            f"coalesce(sum(e.amount) {cond}, 0)",
            f"avg(e.amount) {cond}",
        ]
    widest = f"(s.t // {DAY}) * {DAY} - {180 * DAY}"
    started = time.perf_counter()
    con.sql(f"""CREATE TABLE snap AS SELECT s.row, {", ".join(cols)}
        FROM spine s LEFT JOIN ev e ON e.user_id = s.k AND e.t_us < s.t AND e.t_us >= {widest}
        GROUP BY s.row""")
    theirs = time.perf_counter() - started
    asof = run_duckdb_asof(con, events)
    polars = run_polars_asof(events, keys, times)
    print(
        f"snapshot: {s:,} spine rows x 9 features against {n:,} events "
        f"({args.keys:,} keys, 180 days)"
    )
    print(f"ours   (flows.pointintime):              {ours:7.2f} s")
    print(f"  (before it, a warm-up on 100k events loads or compiles the kernels: {warm:.2f} s)")
    print(f"duckdb (range join + group by):          {theirs:7.2f} s")
    print(f"duckdb (prefix sums + ASOF joins):       {asof:7.2f} s")
    print(f"polars (prefix sums + join_asof):        {polars:7.2f} s")
    best = min(theirs, asof)
    print(f"ratio ours/best duckdb: {ours / best:.2f} (target <= 0.5)")
    print(f"ratio ours/polars: {ours / polars:.2f}")


if __name__ == "__main__":
    main()
