"""Benchmark: storage and read cost of one vector feature (64-dim embeddings, 30d window, default
hop 1h), next to a scalar feature over the same events.

E entities each get events at random times over 31 days (default 12 a day) carrying a 64-dim
float32 embedding. Three one-feature views over that source: `mean("emb", window="30d")`
(element-wise), `last("emb")` (lifetime) and, for reference, `mean("amount", window="30d")`.
The events are ingested into a warehouse and applied by `flows.run --until-caught-up` (the real
path); then the stored blob of every entity is measured (bytes per entity), and
`FeatureClient.get` of random entities is timed in this process (p50/p99, after a warm-up).

    python scripts/bench_vectors.py [--entities 500] [--per-day 12] [--dim 64] [--gets 5000]
                                    [--refresh 0.05]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rocksdict import AccessType, Options, Rdict

from state.client import FeatureClient
from state.codec import ENTITY_PREFIX
from state.store import ViewStore

DAY = 86_400_000_000
T0 = 1_780_000_000_000_000
VIEWS = {
    "emb_mean": 'mean("emb", window="30d")',
    "emb_last": 'last("emb")',
    "amount_mean": 'mean("amount", window="30d")',
}
SCHEMA = """{"type": "record", "name": "Doc", "fields": [
  {"name": "user_id", "type": "string"},
  {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
  {"name": "amount", "type": "double"},
  {"name": "emb", "type": {"type": "array", "items": "float"}}]}"""


def definitions(directory: Path) -> Path:
    (directory / "doc.avsc").write_text(SCHEMA)
    lines = [
        "from flows.spec import FeatureView, Source, last, mean",
        'docs = Source(name="docs", schema="doc.avsc", key="user_id", timestamp="ts")',
        *(f'{name} = FeatureView(name="{name}", source=docs, features=[{feature}])'
          for name, feature in VIEWS.items()),
    ]  # fmt: skip
    path = directory / "features.py"
    path.write_text("\n".join(lines) + "\n")
    return path


def events(entities: int, per_day: int, dim: int) -> pa.Table:
    rng = np.random.default_rng(0)
    n = entities * per_day * 31
    ts = np.sort(T0 + rng.integers(0, 31 * DAY, n))
    emb = rng.normal(0, 1, (n, dim)).astype(np.float32)
    return pa.table(
        {
            "user_id": [f"u{k}" for k in rng.integers(0, entities, n)],
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "amount": rng.lognormal(3, 1, n),
            "emb": pa.FixedSizeListArray.from_arrays(emb.ravel(), dim).cast(pa.list_(pa.float32())),
        }
    )


def run(module: str, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{module} failed:\n{done.stderr}")


def blob_sizes(state: Path, view: str) -> np.ndarray:
    store = ViewStore(state)
    version = store.current_version(view)
    assert version is not None
    sizes = []
    for db_dir in sorted(store.version_dir(view, version).iterdir()):
        if not (db_dir / "CURRENT").is_file():
            continue
        with tempfile.TemporaryDirectory() as sec:
            db = Rdict(str(db_dir), Options(raw_mode=True), access_type=AccessType.secondary(sec))
            sizes += [
                len(v)
                for k, v in db.items()
                if isinstance(k, bytes) and isinstance(v, bytes) and k.startswith(ENTITY_PREFIX)
            ]
            db.close()
    return np.array(sizes)


def time_gets(client: FeatureClient, view: str, keys: list[str], at: float) -> np.ndarray:
    for key in keys[:500]:
        client.get(view, key, at=at)
    samples = []
    for key in keys:
        started = time.perf_counter_ns()
        client.get(view, key, at=at)
        samples.append(time.perf_counter_ns() - started)
    return np.array(samples) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=500)
    parser.add_argument("--per-day", type=int, default=12)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--gets", type=int, default=5000)
    parser.add_argument(
        "--refresh", type=float, default=0.05, help="the client's refresh_s (0: no refresher)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        features = definitions(root)
        table = events(args.entities, args.per_day, args.dim)
        pq.write_table(table, root / "docs.parquet")
        common = ["--features", str(features), "--warehouse", str(root / "wh")]
        run("flows.ingest", *common, str(root / "docs.parquet"))
        started = time.perf_counter()
        run("flows.run", *common, "--state", str(root / "state"), "--until-caught-up")
        applied = time.perf_counter() - started
        print(
            f"{args.entities:,} entities, {table.num_rows:,} events over 31 days "
            f"({args.per_day}/day each), {args.dim}-dim float32 vectors; flows.run applied the "
            f"three views in {applied:.1f}s"
        )
        at = int(table.column("ts").cast(pa.int64()).to_numpy().max()) / 1e6 + 1
        rng = np.random.default_rng(1)
        keys = [f"u{k}" for k in rng.integers(0, args.entities, args.gets)]
        with FeatureClient(root / "state", refresh_s=args.refresh) as client:
            for view, feature in VIEWS.items():
                sizes = blob_sizes(root / "state", view)
                lat = time_gets(client, view, keys, at)
                print(
                    f"{feature:28s}: blob {sizes.mean() / 1024:7.1f} KiB/entity (max "
                    f"{sizes.max() / 1024:6.1f}) | get p50 {np.percentile(lat, 50):6.1f} us "
                    f"p99 {np.percentile(lat, 99):6.1f} us"
                )


if __name__ == "__main__":
    main()
