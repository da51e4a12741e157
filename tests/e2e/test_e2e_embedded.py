"""End to end without Kafka: ingest files -> flows.run -> FeatureClient and flows.snapshot,
each checked against the DuckDB oracle, with 1 and 2 workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from connectors.segments import Warehouse
from flows.spec import load_definitions
from state.client import FeatureClient
from tests.helpers import MINUTE, make_events, run_command, wait_until, write_definitions
from tests.oracle import mismatches, oracle_values, same


def write_inputs(events: pa.Table, directory: Path) -> list[Path]:
    """The events split over a Parquet, a CSV (ISO-8601 times) and a JSON-lines file."""
    directory.mkdir(parents=True, exist_ok=True)
    n = events.num_rows
    a, b = events.slice(0, n // 3), events.slice(n // 3, n // 3)
    c = events.slice(2 * (n // 3))
    pq.write_table(a, directory / "part1.parquet")
    iso = b.set_column(1, "ts", pa.array([t.isoformat() for t in b.column("ts").to_pylist()]))
    pacsv.write_csv(iso, directory / "part2.csv")
    with open(directory / "part3.jsonl", "w") as fh:
        for row in c.to_pylist():
            ts = row["ts"].isoformat()
            amount = "null" if row["amount"] is None else repr(row["amount"])
            channel = "null" if row["channel"] is None else f'"{row["channel"]}"'
            fh.write(
                f'{{"user_id": "{row["user_id"]}", "ts": "{ts}", "amount": {amount}, '
                f'"channel": {channel}}}\n'
            )
    return [directory / "part1.parquet", directory / "part2.csv", directory / "part3.jsonl"]


def log_events(warehouse: Path, source: str, partitions: int) -> pa.Table:
    """The whole log as the warehouse holds it (the oracle's input, offsets included)."""
    wh = Warehouse(warehouse)
    tables = [
        pa.Table.from_batches(list(wh.read(source, p)))
        for p in range(partitions)
        if wh.segments(source, p)
    ]
    return pa.concat_tables(tables)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, pa.Table]:
    root = tmp_path_factory.mktemp("e2e")
    features = write_definitions(root / "defs")
    events = make_events(12_000, 50, seed=21)
    files = write_inputs(events, root / "inputs")
    result = run_command(
        "flows.ingest",
        "--features",
        str(features),
        "--warehouse",
        str(root / "wh"),
        *map(str, files),
    )
    assert result.returncode == 0, result.stderr
    assert "ingested 12,000 events" in result.stdout
    return root, features, events


@pytest.mark.parametrize("workers", [1, 2])
def test_run_then_client_equals_oracle(ingested: tuple[Path, Path, pa.Table], workers: int) -> None:
    root, features, events = ingested
    state = root / f"state-w{workers}"
    result = run_command(
        "flows.run",
        "--features",
        str(features),
        "--warehouse",
        str(root / "wh"),
        "--state",
        str(state),
        "--until-caught-up",
        "--workers",
        str(workers),
    )
    assert result.returncode == 0, result.stderr
    assert "applied 12,000 events" in result.stdout
    log = log_events(root / "wh", "txns", 3)
    assert log.num_rows == events.num_rows
    defs = load_definitions(features)
    newest = int(log.column("ts").cast(pa.int64()).to_numpy().max())
    keys = [*sorted(set(log.column("user_id").to_pylist())), "nobody"]
    with FeatureClient(state) as client:  # this test process is not the writer
        for t in (newest, newest + 1, newest + 17 * MINUTE):
            for name in ("spend", "channels"):
                layout = defs.layouts[name]
                spine = pa.table({"row": range(len(keys)), "k": keys, "t": [t] * len(keys)})
                got = client.get_many(name, keys, at=t / 1e6)
                assert mismatches(layout, oracle_values(layout, log, spine), got) == []


def test_snapshot_equals_oracle(ingested: tuple[Path, Path, pa.Table], tmp_path: Path) -> None:
    root, features, _ = ingested
    log = log_events(root / "wh", "txns", 3)
    ts = log.column("ts").cast(pa.int64()).to_numpy()
    rng = np.random.default_rng(5)
    n = 2000
    times = np.concatenate(
        [
            rng.integers(int(ts.min()) - MINUTE, int(ts.max()) + MINUTE, n // 2),
            rng.choice(ts, n - n // 2),
        ]
    )  # exactly at events: must not count
    keys = [f"user{k}" for k in rng.integers(0, 55, n)]
    spine = pa.table(
        {
            "user_id": keys,
            "ts": pa.array(times, pa.timestamp("us", tz="UTC")),
            "label": rng.random(n) < 0.5,
        }
    )
    pq.write_table(spine, tmp_path / "spine.parquet")
    out = tmp_path / "out" / "snap.parquet"
    result = run_command(
        "flows.snapshot",
        "--features",
        str(features),
        "--warehouse",
        str(root / "wh"),
        "--spine",
        str(tmp_path / "spine.parquet"),
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    snap = pq.read_table(out)
    assert snap.column_names[:3] == ["user_id", "ts", "label"]
    assert snap.column("user_id").to_pylist() == keys  # spine order kept
    defs = load_definitions(features)
    rows = snap.to_pylist()
    for name in ("spend", "channels"):
        layout = defs.layouts[name]
        oracle_spine = pa.table({"row": range(n), "k": keys, "t": times})
        expected = oracle_values(layout, log, oracle_spine)
        assert mismatches(layout, expected, rows, prefix=f"{name}__") == []


def test_online_read_equals_snapshot_at_now(
    ingested: tuple[Path, Path, pa.Table], tmp_path: Path
) -> None:
    """The consistency the design exists for: online at t == offline at t."""
    root, features, _ = ingested
    state = tmp_path / "state"
    result = run_command(
        "flows.run",
        "--features",
        str(features),
        "--warehouse",
        str(root / "wh"),
        "--state",
        str(state),
        "--until-caught-up",
    )
    assert result.returncode == 0, result.stderr
    log = log_events(root / "wh", "txns", 3)
    t = int(log.column("ts").cast(pa.int64()).to_numpy().max()) + 5 * MINUTE
    keys = sorted(set(log.column("user_id").to_pylist()))
    spine = pa.table(
        {"user_id": keys, "ts": pa.array([t] * len(keys), pa.timestamp("us", tz="UTC"))}
    )
    pq.write_table(spine, tmp_path / "spine.parquet")
    out = tmp_path / "snap.parquet"
    result = run_command(
        "flows.snapshot",
        "--features",
        str(features),
        "--warehouse",
        str(root / "wh"),
        "--spine",
        str(tmp_path / "spine.parquet"),
        "--out",
        str(out),
        "--views",
        "spend",
    )
    assert result.returncode == 0, result.stderr
    offline = pq.read_table(out).to_pylist()
    with FeatureClient(state) as client:
        online = client.get_many("spend", keys, at=t / 1e6)
    layout = load_definitions(features).layouts["spend"]
    for off, on in zip(offline, online, strict=True):
        for f in layout.features:
            if f.agg == "percentile":
                continue  # each side is its own sketch; both within the stated bound
            assert same(off[f"spend__{f.name}"], on[f.name]), f.name


def test_two_process_cluster_equals_oracle(
    ingested: tuple[Path, Path, pa.Table], tmp_path: Path
) -> None:
    """Two bytewax processes (cluster addresses on loopback) build the same views."""
    import subprocess
    import sys

    from tests.helpers import REPO, cluster_addresses

    root, features, _ = ingested
    addresses = cluster_addresses(2)
    args = [
        sys.executable,
        "-m",
        "flows.run",
        "--features",
        str(features),
        "--warehouse",
        str(root / "wh"),
        "--state",
        str(tmp_path / "state"),
        "--until-caught-up",
        "--addresses",
        addresses,
    ]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    procs = [
        subprocess.Popen(
            [*args, "--process-id", str(i)],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    applied = sum(
        int(out.split("applied ")[1].split(" events")[0].replace(",", "")) for out, _ in outputs
    )
    assert applied == 12_000  # each partition applied by exactly one process
    log = log_events(root / "wh", "txns", 3)
    t = int(log.column("ts").cast(pa.int64()).to_numpy().max()) + MINUTE
    keys = sorted(set(log.column("user_id").to_pylist()))
    defs = load_definitions(features)
    with FeatureClient(tmp_path / "state") as client:
        for name in ("spend", "channels"):
            layout = defs.layouts[name]
            spine = pa.table({"row": range(len(keys)), "k": keys, "t": [t] * len(keys)})
            got = client.get_many(name, keys, at=t / 1e6)
            assert mismatches(layout, oracle_values(layout, log, spine), got) == []


def test_follow_mode_metrics_and_ctrl_c(tmp_path: Path) -> None:
    """Without --until-caught-up the flow keeps following the log: a later ingest becomes
    readable, /metrics reports it, and SIGINT ends the flow cleanly with its summary."""
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    from tests.helpers import REPO

    features = write_definitions(tmp_path / "defs")
    first = make_events(3000, 20, seed=1)
    later = make_events(500, 5, seed=2, start_us=1_780_000_000_000_000 + 4 * 86_400_000_000)
    later = later.set_column(0, "user_id", pa.array([f"late{i % 5}" for i in range(500)]))
    pq.write_table(first, tmp_path / "first.parquet")
    pq.write_table(later, tmp_path / "later.parquet")
    common = ["--features", str(features), "--warehouse", str(tmp_path / "wh")]
    assert run_command("flows.ingest", *common, str(tmp_path / "first.parquet")).returncode == 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    flow = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.run",
            *common,
            "--state",
            str(tmp_path / "state"),
            "--metrics-port",
            str(port),
            "--status-interval",
            "0.5",
        ],
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: _count(tmp_path / "state", "user1") > 0, "user1's first events")
        assert run_command("flows.ingest", *common, str(tmp_path / "later.parquet")).returncode == 0
        wait_until(lambda: _count(tmp_path / "state", "late0") == 100, "late0's 100 events")

        def applied_total() -> float:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            return sum(
                float(line.split()[-1])
                for line in text.decode().splitlines()
                if line.startswith("featureflow_events_applied_total{")
            )

        # 2 views, every event once
        wait_until(lambda: applied_total() == 2 * 3500, "7000 events applied")
    finally:
        flow.send_signal(signal.SIGINT)
        out, err = flow.communicate(timeout=60)
    assert flow.returncode == 0, err
    assert "stopped by Ctrl-C (SIGINT): applied 3,500 events" in out
    assert "catching up" in out or "live" in out  # the status line
    assert "Traceback" not in err
    assert "panicked" not in err


def _count(state: Path, key: str) -> int:
    if not (state / "views" / "spend" / "CURRENT").exists():
        return 0
    with FeatureClient(state) as client:
        value: int = client.get("spend", key, at=2_000_000_000)["count"]
        return value


def test_history_sorted_by_key_is_not_late(tmp_path: Path) -> None:
    """Ingest puts history in event-time order: a file sorted by key (months of one user, then
    the next) does not make the next users' events look late; --keep-order keeps file order,
    and then the lateness rule rejects (and counts) them."""
    events = make_events(4000, 20, seed=12)
    by_key = events.take(
        pa.compute.sort_indices(events, [("user_id", "ascending"), ("ts", "ascending")])
    )
    pq.write_table(by_key, tmp_path / "by_key.parquet")
    for flag, expect_late in (([], False), (["--keep-order"], True)):
        root = tmp_path / ("kept" if flag else "sorted")
        features = write_definitions(root / "defs")
        common = ["--features", str(features), "--warehouse", str(root / "wh")]
        result = run_command("flows.ingest", *common, *flag, str(tmp_path / "by_key.parquet"))
        assert result.returncode == 0, result.stderr
        result = run_command("flows.run", *common, "--state", str(root / "st"), "--until-caught-up")
        assert result.returncode == 0, result.stderr
        late = int(result.stdout.split("late ")[1].split(";")[0].replace(",", ""))
        assert (late > 0) == expect_late, result.stdout
