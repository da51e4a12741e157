"""Benchmark: the read path (`FeatureClient.get` / `get_many`) beside a raw RocksDB get of the
same keys, in one run, on the bench_flow workload.

The view store comes from `flows.run --until-caught-up` over the bench_flow log (default 10M
events, 100k users, 180 days; the `spend` view: count, sum and mean of amount over 30m, 14d and
180d, 9 features), plus a small `mixed` view over the same source with the other kinds of
aggregation (percentile, distinct count, last_k, min/max, var/std, first/last of a string) to
show what the reads of sketch features cost. Measured, interleaved round by round (best round
of --rounds kept: the machine is shared):

- raw get: `Rdict.get(key)` of one entity on the client's own secondary handle (the floor);
- `FeatureClient.get` (as of the newest event + 1 µs, as bench_flow measures, and as of now);
- raw multi-get: `Rdict.get([keys])` of 100 entities, one call per partition (keys grouped and
  encoded beforehand: the floor);
- `FeatureClient.get_many` of the same 100 keys;
- a catch-up of one idle partition (`try_catch_up_with_primary`, what the client's catch-up
  thread does to every open partition each round, holding the GIL).

    python scripts/bench_reads.py [--events 10000000] [--keys 100000] [--work DIR]

With --work the log and the view store are kept in DIR and reused by the next run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from bench_flow import make_log, run_flow

from connectors.partitioner import partition_for
from state.client import FeatureClient
from state.codec import encode_key

MIXED = """
mixed = FeatureView(name="mixed", source=txn, features=[
    percentile("amount", 0.9, window="14d"), distinct_count("merchant_id", window="14d"),
    last_k("amount", 3, window="14d"), min("amount", window="14d"), max("amount", window="14d"),
    std("amount", window="14d"), last("merchant_id"), count(window="14d"),
    mean("amount", window="180d")])
"""
IMPORTS = (
    "from flows.spec import distinct_count, last, last_k, max, min, percentile, std\n"
    "from flows.spec import FeatureView, Source, count, mean, sum\n"
)


def build(work: Path, events: int, keys: int, parts: int) -> tuple[Path, int, str]:
    """The log and the view store in `work` (reused when `work/state-w1` is there), its
    newest event time and what it holds."""
    marker = work / "workload.txt"
    if marker.is_file() and (work / "state-w1").is_dir():
        stored, what = marker.read_text().split("\n", 1)
        return work / "state-w1", int(stored), what
    work.mkdir(parents=True, exist_ok=True)
    defs, newest = make_log(work, events, keys, parts)
    defs.write_text(IMPORTS + defs.read_text() + MIXED)
    started = time.perf_counter()
    run_flow(work, defs, 1, "spend,mixed")
    print(f"built the view store in {time.perf_counter() - started:.0f}s")
    what = f"{events:,} events, {keys:,} keys, {parts} partitions"
    marker.write_text(f"{newest}\n{what}")
    return work / "state-w1", newest, what


def percentiles(samples: list[int]) -> tuple[float, float]:
    arr = np.array(samples) / 1000
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def timed(calls: list[Callable[[], Any]]) -> list[int]:
    out = []
    for call in calls:
        t0 = time.perf_counter_ns()
        call()
        out.append(time.perf_counter_ns() - t0)
    return out


class Round:
    """One round of every measurement over the same keys."""

    def __init__(self, client: FeatureClient, view: str, keys: list[str], at: float) -> None:
        self.client, self.view, self.keys, self.at = client, view, keys, at
        versions = client._versions  # the client's own handles: the same RocksDB secondaries
        opened = versions.pin(view)
        versions.unpin(opened)
        self.dbs = opened.dbs
        self.parts = opened.layout.partitions

    def raw_get(self) -> list[int]:
        dbs, parts = self.dbs, self.parts
        return timed([partial(dbs[partition_for(k, parts)].get, encode_key(k)) for k in self.keys])

    def get(self, at: float | None) -> list[int]:
        return timed([partial(self.client.get, self.view, k, at=at) for k in self.keys])

    def batches(self, size: int) -> list[list[str]]:
        return [self.keys[i : i + size] for i in range(0, len(self.keys) - size + 1, size)]

    def raw_many(self, size: int) -> list[int]:
        calls: list[Callable[[], Any]] = []
        for batch in self.batches(size):
            grouped: dict[int, list[Any]] = {}
            for k in batch:
                grouped.setdefault(partition_for(k, self.parts), []).append(encode_key(k))
            calls.append(partial(_multi_get, self.dbs, grouped))
        return timed(calls)

    def get_many(self, size: int, at: float | None) -> list[int]:
        c, v = self.client, self.view
        return timed([partial(c.get_many, v, b, at=at) for b in self.batches(size)])

    def catch_up(self) -> list[int]:
        return timed([db.try_catch_up_with_primary for db in self.dbs.values()] * 25)


def _multi_get(dbs: dict[int, Any], grouped: dict[int, list[Any]]) -> list[Any]:
    return [dbs[p].get(keys) for p, keys in grouped.items()]


def measure(client: FeatureClient, view: str, keys: int, newest: int, args: Any) -> None:
    at = (newest + 1) / 1e6
    rng = np.random.default_rng(7)
    results: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        picked = [f"u{i}" for i in rng.integers(0, keys, args.calls)]
        r = Round(client, view, picked, at)
        r.get(at)  # warm the block cache for these keys
        runs = {
            "raw get": r.raw_get(),
            "get (at newest+1us)": r.get(at),
            "get (now)": r.get(None),
            "raw multi-get of 100": r.raw_many(100),
            "get_many of 100 (at newest+1us)": r.get_many(100, at),
            "get_many of 100 (now)": r.get_many(100, None),
            "catch-up of an idle partition": r.catch_up(),
        }
        for name, samples in runs.items():
            p50, p99 = percentiles(samples)
            best = results.get(name)
            if best is None or p50 < best[0]:
                results[name] = [p50, p99]
    for name, (p50, p99) in results.items():
        print(f"  {name:34s} p50 {p50:8.1f} us   p99 {p99:8.1f} us")
    raw = results["raw multi-get of 100"][0]
    ours = results["get_many of 100 (at newest+1us)"][0]
    print(f"  get_many / raw multi-get at p50: {ours / raw:.2f}x (target <= 2.5)")


def check_equal(client: FeatureClient, view: str, keys: int, newest: int) -> None:
    """get_many must equal get key by key, exactly (the bench stops otherwise)."""
    at = (newest + 1) / 1e6
    picked = [f"u{i}" for i in range(0, keys, max(1, keys // 300))] + ["no-such-user"]
    many = client.get_many(view, picked, at=at)
    for key, got in zip(picked, many, strict=True):
        one = client.get(view, key, at=at)
        if one != got:
            sys.exit(f"{view}: get_many != get for {key!r}: {got} vs {one}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", default=None, help="keep the log and views here (reused)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        work = Path(args.work or tmp_dir)
        state, newest, what = build(work, args.events, args.keys, args.partitions)
        print(
            f"workload: {what}; of {args.rounds} rounds, the one with the lowest p50 is shown "
            f"per line ({args.calls} keys per round, the machine is shared)"
        )
        with FeatureClient(state) as client:
            for view in ("spend", "mixed"):
                check_equal(client, view, args.keys, newest)
                names = ", ".join(f.name for f in client.layout(view).features)
                print(f"view {view!r} ({names}):")
                measure(client, view, args.keys, newest, args)


if __name__ == "__main__":
    main()
