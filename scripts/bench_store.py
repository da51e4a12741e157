"""Benchmark: the view store's RocksDB options, measured as a read client sees them.

Writes N entity blobs of a realistic size into one RocksDB per option set (in batches, as the
flow commits), flushes and compacts, then opens it as a secondary (as FeatureClient does) and
times random point gets of existing keys and of missing keys (unknown entities). Compares
RocksDB's defaults with the store's options (`state.store.rocks_options`: bloom filters, LZ4,
a shared block cache). Misses are keys between existing ones (unknown entities).

    python scripts/bench_store.py [--entities 300000] [--value-bytes 1500]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from rocksdict import AccessType, Options, Rdict, WriteBatch

from state.store import rocks_options


def default_options() -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.set_max_open_files(-1)
    return opts


def fill(path: Path, opts: Options, n: int, size: int) -> None:
    db = Rdict(str(path), opts)
    rng = np.random.default_rng(0)
    payload = rng.integers(0, 255, size * 4, dtype=np.uint8).tobytes()
    for start in range(0, n, 10_000):
        batch = WriteBatch(raw_mode=True)
        for i in range(start, min(n, start + 10_000)):
            off = i % (size * 3)
            batch.put(b"ku%08d" % i, payload[off : off + size])
        db.write(batch)
    db.flush()
    db.compact_range(None, None)
    db.close()


def time_gets(path: Path, opts: Options, keys: list[bytes]) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as sec:
        db = Rdict(str(path), opts, access_type=AccessType.secondary(sec))
        for k in keys[:2000]:  # warm the cache the way a serving process would
            db.get(k)
        samples = []
        for k in keys:
            t0 = time.perf_counter_ns()
            db.get(k)
            samples.append(time.perf_counter_ns() - t0)
        db.close()
    arr = np.array(samples) / 1000
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=300_000)
    parser.add_argument("--value-bytes", type=int, default=1500)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    hits = [b"ku%08d" % i for i in rng.integers(0, args.entities, 20_000)]
    misses = [b"ku%08d-" % i for i in rng.integers(0, args.entities, 20_000)]
    print(f"{args.entities:,} entities x {args.value_bytes} B; 20k random gets each")
    for name, make in (("rocksdb defaults", default_options), ("store options", rocks_options)):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "db"
            fill(path, make(), args.entities, args.value_bytes)
            size_mb = sum(f.stat().st_size for f in path.iterdir()) / 2**20
            hit = time_gets(path, make(), hits)
            miss = time_gets(path, make(), misses)
        print(
            f"{name:17s}: hit p50 {hit[0]:5.1f} us p99 {hit[1]:6.1f} us | miss p50 "
            f"{miss[0]:5.1f} us p99 {miss[1]:6.1f} us | {size_mb:,.0f} MB on disk"
        )


if __name__ == "__main__":
    main()
