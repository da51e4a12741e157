"""Routing between the log and the views (flows.shards): every record reaches exactly the shard
its key hashes to, with the partition's watermark, and shards learn how far a partition has been
read even when they get no records from it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from connectors.envelope import DeadLetter
from connectors.log import LogBatch
from connectors.partitioner import partition_for
from flows.shards import PartitionMark, split

SHARDS = 4


def _batch(keys: list[str], ts: list[int], first: int, partition: int = 1) -> LogBatch:
    n = len(keys)
    events = pa.table(
        {
            "user_id": keys,
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "_offset": pa.array(range(first, first + n), pa.int64()),
        }
    )
    letter = DeadLetter("bad", partition, first + n, b"x")
    return LogBatch("txns", partition, events, (letter,), first + n + 1)


def test_every_record_reaches_the_shard_of_its_key_once() -> None:
    keys = [f"user{i}" for i in range(200)]
    ts = [int(t) for t in np.random.default_rng(3).integers(0, 10_000, len(keys))]
    mark = PartitionMark(0, None)
    marked = mark.mark(_batch(keys, ts, 0), "ts", catch_up=10_000, now=0.0)
    parts = split(marked, "user_id", SHARDS)
    seen: list[str] = []
    for shard, part in parts:
        got = part.events.column("user_id").to_pylist()
        assert all(partition_for(k, SHARDS) == shard for k in got)
        offsets = part.events.column("_offset").to_pylist()
        assert offsets == sorted(offsets)  # offset order within the slice
        assert part.through_offset == 200  # the dead letter's offset is covered too
        seen += got
    assert sorted(seen) == sorted(keys)
    # Each slice carries the partition's watermark at each of its records (a running max over
    # the whole batch, not over the slice).
    running = np.maximum.accumulate(np.asarray(ts))
    for _, part in parts:
        rows = part.events.column("_offset").to_numpy()
        assert part.watermarks.tolist() == running[rows].tolist()
        assert part.end_watermark == int(running[-1])


def test_a_partitioned_log_goes_whole_to_its_own_shard() -> None:
    keys = [k for k in (f"user{i}" for i in range(500)) if partition_for(k, SHARDS) == 2][:50]
    mark = PartitionMark(100, 5)
    marked = mark.mark(_batch(keys, list(range(50)), 100, partition=2), "ts", 10_000, now=0.0)
    assert marked.broadcast  # first batch: every shard learns where the partition is
    routed = mark.route(marked, "user_id", SHARDS)
    assert [s for s, _ in routed] == [0, 1, 2, 3]
    own = dict(routed)[2]
    assert own.slice.events.num_rows == 50
    assert len(own.dead_letters) == 1
    assert all(r.slice.events.num_rows == 0 and not r.dead_letters for s, r in routed if s != 2)
    assert all(r.after == 99 for _, r in routed)  # nothing was sent before: resume point - 1
    assert dict(routed)[2].slice.watermarks[0] == 5  # the watermark carried over from before

    later = mark.mark(_batch(keys, list(range(50)), 151, partition=2), "ts", 10_000, now=0.1)
    assert not later.broadcast
    again = mark.route(later, "user_id", SHARDS)
    assert [s for s, _ in again] == [2]  # no empty slices between broadcasts
    assert again[0][1].after == 150

    final = mark.mark(_batch(keys, list(range(50)), 202, partition=2), "ts", 240, now=0.2)
    assert final.broadcast  # reaches the end of the log as of the start
    shards = mark.route(final, "user_id", SHARDS)
    assert {s: r.after for s, r in shards} == {0: 150, 1: 150, 2: 201, 3: 150}
