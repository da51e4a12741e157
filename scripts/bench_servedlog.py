"""Benchmark: the served-feature log's cost on `FeatureClient.get` (p50, p99) at 100% logging.

Deploys the shipped example over demo data (--events transactions; `flows.run
--until-caught-up`), then times single-key `get("user_spend", key)` calls on random known
users through two clients on the same state: one without a served log and one logging every
read (`ServedLog(rate=1.0)`, its writer thread encoding and writing Parquet meanwhile). The two
alternate in rounds of --calls reads, so drift of the machine hits both alike. Target: the
logging client's p50 at most 10% above the plain one's.

    python scripts/bench_servedlog.py [--events 200000] [--calls 5000] [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from connectors.segments import Warehouse  # noqa: E402
from flows.demo import demo_table, merchant_table  # noqa: E402
from flows.ingest import ingest_table  # noqa: E402
from flows.settings import EXAMPLE_FEATURES  # noqa: E402
from flows.spec import load_definitions  # noqa: E402
from state.client import FeatureClient  # noqa: E402
from state.servedlog import ServedLog, read_served  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-servedlog-"))
    try:
        deploy(work, args.events, args.users)
        measure(work, args.users, args.calls, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def deploy(work: Path, n_events: int, n_users: int) -> None:
    defs = load_definitions(EXAMPLE_FEATURES)
    wh = Warehouse(work / "warehouse")
    ingest_table(defs.sources["transactions"], demo_table(n_events, n_users=n_users), wh)
    ingest_table(defs.sources["merchant_events"], merchant_table(n_events // 10), wh)
    run = subprocess.run(
        [sys.executable, "-m", "flows.run", "--warehouse", str(work / "warehouse"),
         "--state", str(work / "state"), "--until-caught-up", "--status-interval", "60"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    if run.returncode:
        sys.exit(run.stdout + run.stderr)


def measure(work: Path, n_users: int, calls: int, rounds: int) -> None:
    rng = np.random.default_rng(1)
    keys = [f"u{k:05d}" for k in rng.integers(0, n_users, calls)]
    log = ServedLog(work / "warehouse", rate=1.0)
    plain = FeatureClient(work / "state")
    logged = FeatureClient(work / "state", served_log=log)
    times: dict[str, list[float]] = {"plain": [], "logged": []}
    try:
        for client in (plain, logged):  # open the view, warm the caches
            for key in keys[:500]:
                client.get("user_spend", key)
        for _ in range(rounds):
            for name, client in (("plain", plain), ("logged", logged)):
                times[name] += timed_gets(client, keys)
    finally:
        plain.close()
        logged.close()
    p50 = {k: float(np.percentile(v, 50)) for k, v in times.items()}
    p99 = {k: float(np.percentile(v, 99)) for k, v in times.items()}
    for name in times:
        print(f"get p50 {name:6s}: {p50[name]:7.1f} us   p99 {p99[name]:7.1f} us")
    stats = log.stats()
    print(
        f"logged {stats.logged:,} reads, wrote {stats.rows_written:,} rows in {stats.files} "
        f"files, dropped {stats.dropped}; rows on disk {read_served(work / 'warehouse').num_rows:,}"
    )
    print(f"overhead on p50: {100 * (p50['logged'] / p50['plain'] - 1):+.1f}% (target <= +10%)")


def timed_gets(client: FeatureClient, keys: list[str]) -> list[float]:
    out = []
    clock = time.perf_counter_ns
    for key in keys:
        start = clock()
        client.get("user_spend", key)
        out.append((clock() - start) / 1000)
    return out


if __name__ == "__main__":
    main()
