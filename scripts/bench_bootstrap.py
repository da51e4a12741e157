"""Benchmark: bootstrap of a new host, restore from a checkpoint then catch up vs replay from the
start, in one run, on the same log.

A deployment has applied the history (N events minus the tail, K keys, 180 days, the 9-feature
spend view of scripts/workload.py) and written a checkpoint (`flows.checkpoint`); then the tail
arrives (the events since the checkpoint). A new host then fills its views either with
`flows.run --restore --until-caught-up` on an empty state directory (download and verify the
checkpoint, ingest its SST files, apply the tail) or with `flows.run --until-caught-up` (replay
every event). Both are timed as whole commands (process start included); their reads of a
sample of keys must be equal. Also reported: the checkpoint's size and write time, the restore
alone (bytes/s and entities/s), and the view store's bytes per entity.

    eval "$(scripts/s3 env)"
    python scripts/bench_bootstrap.py --warehouse s3://featureflow-bench/bootstrap-$RANDOM \\
        [--events 10000000] [--keys 100000] [--tail 0.001] [--partitions 4]

Without --warehouse the warehouse is a local temporary directory.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from workload import SCHEMA, transactions

from connectors.segments import Warehouse
from flows.checkpoints import restore_views
from flows.ingest import ingest_table
from flows.spec import load_definitions
from state.client import FeatureClient

REPO = Path(__file__).resolve().parent.parent
DEFINITIONS = """
from flows.spec import FeatureView, Source, count, mean, sum
txn = Source(name="txn", schema={schema!r}, key="user_id", timestamp="ts", partitions={parts})
spend = FeatureView(name="spend", source=txn, features=[
    f(window=w) if f is count else f("amount", window=w)
    for w in ("30m", "14d", "180d") for f in (count, sum, mean)])
"""
SAMPLE_KEYS = 2000


def command(*args: str) -> tuple[float, str]:
    """Run `python -m <args>`; (wall seconds, stdout)."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return elapsed, proc.stdout


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def reads(state: Path, keys: list[str], at_us: int) -> list[dict[str, Any]]:
    with FeatureClient(state) as client:
        return client.get_many("spend", keys, at=at_us / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument(
        "--tail",
        type=float,
        default=0.001,
        help="share of the events that arrive after the checkpoint (0.001 of 10M events over "
        "180 days: about 4 hours of traffic)",
    )
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--warehouse", default=None, help="default: a local temporary directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-bootstrap-") as tmp_name:
        run(Path(tmp_name), args)


def run(tmp: Path, args: argparse.Namespace) -> None:
    warehouse = args.warehouse or str(tmp / "wh")
    defs = tmp / "defs.py"
    defs.write_text(DEFINITIONS.format(schema=SCHEMA, parts=args.partitions))
    source = load_definitions(defs).sources["txn"]
    table = transactions(args.events, args.keys)
    split = args.events - int(args.events * args.tail)
    started = time.perf_counter()
    ingest_table(source, table.slice(0, split), Warehouse(warehouse))
    took = time.perf_counter() - started
    print(f"history: {split:,} events ingested into {warehouse} in {took:.1f}s", flush=True)
    common = ["--features", str(defs), "--warehouse", warehouse, "--status-interval", "60"]
    live = tmp / "live"
    build_s, _ = command("flows.run", *common, "--state", str(live), "--until-caught-up")
    print(f"live host: applied the history in {build_s:.1f}s", flush=True)
    checkpoint_s, out = command("flows.checkpoint", "--warehouse", warehouse, "--state", str(live))
    checkpoint_bytes = int(re.search(r"shards, ([\d,]+) B", out).group(1).replace(",", ""))  # type: ignore[union-attr]
    state_bytes = disk_bytes(live)
    ingest_table(source, table.slice(split), Warehouse(warehouse))
    print(f"tail: {args.events - split:,} events after the checkpoint")

    restore_only = tmp / "restore-only"
    started = time.perf_counter()
    restore_views(restore_only, warehouse, {"spend": range(args.partitions)})
    restore_s = time.perf_counter() - started
    shutil.rmtree(restore_only)

    restored, replayed = tmp / "restored", tmp / "replayed"
    restored_s, _ = command(
        "flows.run", *common, "--state", str(restored), "--until-caught-up", "--restore"
    )
    replayed_s, _ = command("flows.run", *common, "--state", str(replayed), "--until-caught-up")
    noop_s, _ = command("flows.run", *common, "--state", str(replayed), "--until-caught-up")
    imports_s, _ = command("flows.run", "--help")  # process start, imports, argument parsing
    touched = len(pc.unique(table.column("user_id").slice(split)))

    newest = int(table.column("ts").cast(pa.int64()).to_numpy().max())
    keys = sorted(set(table.column("user_id").slice(0, SAMPLE_KEYS * 10).to_pylist()))[:SAMPLE_KEYS]
    equal = reads(restored, keys, newest + 1) == reads(replayed, keys, newest + 1)
    report(args, locals())
    if not equal:
        raise SystemExit("restored and replayed hosts read differently")


def report(args: argparse.Namespace, m: dict[str, Any]) -> None:
    mb, keys = 1 << 20, args.keys
    state, ckpt, restore_s = m["state_bytes"], m["checkpoint_bytes"], m["restore_s"]
    net = (m["replayed_s"] - m["noop_s"]) / (m["restored_s"] - m["noop_s"])
    catch_up_s = m["restored_s"] - restore_s - m["noop_s"]
    rows = [
        ("events / keys / partitions", f"{args.events:,} / {keys:,} / {args.partitions}"),
        ("tail after the checkpoint", f"{args.events - m['split']:,} events"),
        ("live host: apply the history", f"{m['build_s']:.1f} s"),
        ("view store on disk", f"{state / mb:.1f} MB ({state / keys:,.0f} B/entity)"),
        ("checkpoint: size", f"{ckpt / mb:.1f} MB ({ckpt / keys:,.0f} B/entity)"),
        ("checkpoint: write (command)", f"{m['checkpoint_s']:.1f} s"),
        (
            "restore alone (download, sha256, SST ingest)",
            f"{restore_s:.2f} s ({ckpt / mb / restore_s:.0f} MB/s, {keys / restore_s:,.0f} "
            "entities/s)",
        ),
        ("new host: restore + catch up the tail", f"{m['restored_s']:.1f} s"),
        ("new host: replay from the start", f"{m['replayed_s']:.1f} s"),
        ("speed-up", f"{m['replayed_s'] / m['restored_s']:.1f}x (target >= 10x)"),
        ("a run with nothing to apply (start, plan, stop)", f"{m['noop_s']:.2f} s"),
        ("  of which process start and imports (--help)", f"{m['imports_s']:.2f} s"),
        ("speed-up net of that fixed cost", f"{net:.1f}x"),
        (
            "catch-up alone (restore + catch up - restore alone - nothing to apply)",
            f"{catch_up_s:.2f} s for {m['touched']:,} touched keys "
            f"({catch_up_s / max(m['touched'], 1) * 1e6:.0f} us/key)",
        ),
        ("reads equal (sample of keys)", str(m["equal"])),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}", flush=True)


if __name__ == "__main__":
    main()
