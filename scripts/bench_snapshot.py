"""Benchmark: point-in-time training snapshot against DuckDB, in one run, on the same events.

A spine of S rows (default 1M: random keys, random times) against N events (default 10M,
100k keys, 180 days), features count, sum and mean of amount over 30m, 14d and 180d, each row
seeing only events strictly before its time. Ours: `flows.pointintime.point_in_time` (the core
of `flows.snapshot`, without file I/O). DuckDB: the point-in-time join a user would write, a
range join of spine and events on key and time grouped by spine row.

    python scripts/bench_snapshot.py [--events 10000000] [--keys 100000] [--spine 1000000]
"""

from __future__ import annotations

import argparse
import time

import duckdb
import numpy as np
import pyarrow as pa
from workload import DAY_US, spend_view, transactions

from flows.pointintime import point_in_time

DAY = DAY_US
WINDOWS = {"30m": 30 * 60_000_000, "14d": 14 * DAY, "180d": 180 * DAY}
HOPS = {"30m": 60_000_000, "14d": 3_600_000_000, "180d": DAY}


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
    print(
        f"snapshot: {s:,} spine rows x 9 features against {n:,} events "
        f"({args.keys:,} keys, 180 days)"
    )
    print(f"ours   (flows.pointintime): {ours:7.2f} s")
    print(f"duckdb (range join + group by): {theirs:7.2f} s")
    print(f"ratio ours/duckdb: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
