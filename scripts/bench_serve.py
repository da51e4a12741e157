"""Benchmark: the HTTP feature server (`flows.serve`) against Feast's Python feature server
(`feast serve`, SQLite online store), in one run, on the same entities and features.

The bench_flow workload (count, sum and mean of amount over 30m, 14d, 180d: 9 features; 100k
users) is built with `flows.run`; Feast gets the same 9 values per user, materialized into its
SQLite online store. Load comes from oha (a Rust HTTP load generator, `cargo install oha`; the
script installs it if it is missing), over loopback, one random key per request: at 1,000 and
5,000 requests/s (open loop, latency-corrected) and at saturation (closed loop, --connections),
then batches of 100 keys per request (at 100 requests/s, and at saturation). The saturation
rate is the better of 4 and --connections connections; Feast runs without worker recycling.
Feast is installed into its own virtualenv under /tmp (`pip install feast`), never into the
project's environment.

    python scripts/bench_serve.py [--events 2000000] [--keys 100000] [--duration 10]
                                  [--workers 1] [--connections 32] [--no-feast] [--uvicorn]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from bench_flow import make_log, run_flow
from workload import WINDOWS

from flows.serving.config import CONFIG_ENV, ServeConfig
from state.client import FeatureClient

REPO = Path(__file__).resolve().parent.parent
FEAST_VENV = Path(tempfile.gettempdir()) / "featureflow-bench-feast"
FEATURES = [name for w in WINDOWS for name in (f"count_{w}", f"amount_sum_{w}", f"amount_mean_{w}")]
FEAST_REPO_YAML = """project: bench
registry: {root}/registry.db
provider: local
online_store:
  type: sqlite
  path: {root}/online.db
offline_store:
  type: file
entity_key_serialization_version: 3
"""
FEAST_DEFINITIONS = """
from datetime import timedelta
from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Float64, Int64

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING)
source = FileSource(path={path!r}, timestamp_field="event_timestamp")
spend = FeatureView(
    name="spend", entities=[user], ttl=timedelta(days=3650), online=True, source=source,
    schema=[Field(name=n, dtype=Int64 if n.startswith("count") else Float64) for n in {names!r}],
)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer in {timeout_s:.0f} s")


@contextmanager
def running(command: list[str], health: str, log: Path, env: dict[str, str]) -> Iterator[None]:
    """Run a server in its own process group (its workers included) until the block ends."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        wait_http(health, proc)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # workers that outlived their parent
        proc.wait()


# --- the load generator -------------------------------------------------------------------------


def find_oha() -> str:
    found = shutil.which("oha") or shutil.which(str(Path.home() / ".cargo" / "bin" / "oha"))
    if found:
        return found
    print("oha not found: cargo install oha --locked (a few minutes) ...", flush=True)
    subprocess.run(["cargo", "install", "oha", "--locked"], check=True)
    return str(Path.home() / ".cargo" / "bin" / "oha")


def oha_run(
    oha: str, url: str, bodies: Path, duration: int, connections: int, rate: int | None
) -> dict[str, float]:
    """One oha run: POST a random line of `bodies` per request; p50/p99 (ms), rate, success."""
    command = [oha, "--no-tui", "--output-format", "json", "-z", f"{duration}s"]
    command += ["-c", str(connections), "-m", "POST", "-T", "application/json"]
    command += ["-Z", str(bodies), url]
    if rate is not None:
        command[1:1] = ["-q", str(rate), "--latency-correction"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    report: dict[str, Any] = json.loads(result.stdout)
    summary, pct = report["summary"], report["latencyPercentiles"]
    codes = report.get("statusCodeDistribution", {})
    ok = int(codes.get("200", 0))
    return {
        "rate": float(summary["requestsPerSec"]),
        "p50_ms": float(pct["p50"]) * 1000,
        "p99_ms": float(pct["p99"]) * 1000,
        "ok": ok / max(1, sum(int(v) for v in codes.values())),
    }


def measure(
    oha: str, url: str, single: Path, batch: Path, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    oha_run(oha, url, single, 2, 4, None)  # warm up connections and caches
    out = {}
    for rate in (1000, 5000):
        out[f"{rate}/s"] = oha_run(oha, url, single, args.duration, 16, rate)
    closed = [oha_run(oha, url, single, args.duration, c, None) for c in (4, args.connections)]
    out["saturation"] = max(closed, key=lambda r: r["rate"])  # the better concurrency
    out["batch100 100/s"] = oha_run(oha, url, batch, args.duration, 8, 100)
    out["batch100 max"] = oha_run(oha, url, batch, args.duration, 4, None)
    return out


# --- the two servers ----------------------------------------------------------------------------


def feast_body(keys: list[str]) -> dict[str, Any]:
    return {"features": [f"spend:{f}" for f in FEATURES], "entities": {"user_id": keys}}


def bodies(tmp: Path, keys: int, shape: Any, name: str) -> tuple[Path, Path]:
    """Files of request bodies, one per line: one random key each, and 100 random keys each."""
    rng = np.random.default_rng(7)
    single, batch = tmp / f"{name}-1.jsonl", tmp / f"{name}-100.jsonl"
    single.write_text("\n".join(json.dumps(shape([f"u{k}"])) for k in rng.integers(0, keys, 5000)))
    rows = rng.integers(0, keys, (500, 100))
    batch.write_text("\n".join(json.dumps(shape([f"u{k}" for k in row])) for row in rows))
    return single, batch


@contextmanager
def featureflow_server(tmp: Path, state: Path, workers: int) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "flows.serve", "--state", str(state), "--port", str(port)]
    command += ["--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with running(command, f"http://127.0.0.1:{port}/healthz", tmp / "serve.log", env):
        yield f"http://127.0.0.1:{port}/v1/views/spend"


@contextmanager
def uvicorn_server(tmp: Path, state: Path) -> Iterator[str]:
    """The same app under uvicorn (httptools, uvloop): the measurement behind granian."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "--factory", "flows.serving.app:create_app"]
    command += ["--port", str(port), "--loop", "uvloop", "--http", "httptools"]
    command += ["--no-access-log", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(REPO), CONFIG_ENV: ServeConfig(str(state)).to_env()}
    with running(command, f"http://127.0.0.1:{port}/healthz", tmp / "uvicorn.log", env):
        yield f"http://127.0.0.1:{port}/v1/views/spend"


def feast_install() -> Path:
    feast = FEAST_VENV / "bin" / "feast"
    if not feast.exists():
        subprocess.run([sys.executable, "-m", "venv", str(FEAST_VENV)], check=True)
        pip = [str(FEAST_VENV / "bin" / "pip"), "install", "--quiet", "feast"]
        subprocess.run(pip, check=True)
    return feast


def feast_repo(tmp: Path, state: Path, keys: int, at_s: float) -> Path:
    """A Feast repo whose `spend` view holds the 9 values flows.serve gives for every user."""
    root = tmp / "feast"
    root.mkdir()
    names = [f"u{k}" for k in range(keys)]
    with FeatureClient(state) as client:
        rows = [
            r
            for i in range(0, keys, 2000)
            for r in client.get_many("spend", names[i : i + 2000], at=at_s)
        ]
    columns: dict[str, Any] = {"user_id": names}
    columns["event_timestamp"] = pa.array(
        [int(at_s * 1e6) - 1] * keys, pa.timestamp("us", tz="UTC")
    )
    for feature in FEATURES:
        columns[feature] = [r[feature] for r in rows]
    pq.write_table(pa.table(columns), root / "spend.parquet")
    (root / "feature_store.yaml").write_text(FEAST_REPO_YAML.format(root=root))
    (root / "features.py").write_text(
        FEAST_DEFINITIONS.format(path=str(root / "spend.parquet"), names=FEATURES)
    )
    return root


@contextmanager
def feast_server(tmp: Path, feast: Path, repo: Path, at_s: float, workers: int) -> Iterator[str]:
    env = {**os.environ, "PYTHONPATH": ""}
    subprocess.run([str(feast), "-c", str(repo), "apply"], check=True, env=env, capture_output=True)
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at_s - 86400))
    end = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at_s + 1))
    materialize = [str(feast), "-c", str(repo), "materialize", start, end]
    subprocess.run(materialize, check=True, env=env, capture_output=True)
    port = free_port()
    command = [str(feast), "-c", str(repo), "serve", "-h", "127.0.0.1", "-p", str(port)]
    # no worker recycling (its default restarts a worker every 1,000 requests)
    command += ["--no-access-log", "-w", str(workers), "--max-requests", "100000000"]
    with running(command, f"http://127.0.0.1:{port}/health", tmp / "feast.log", env):
        yield f"http://127.0.0.1:{port}/get-online-features"


# --- the run ------------------------------------------------------------------------------------


def report(results: dict[str, dict[str, dict[str, float]]]) -> None:
    print(f"\n{'server':<14}{'load':<12}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'ok':>7}")
    for server, runs in results.items():
        for load, r in runs.items():
            print(
                f"{server:<14}{load:<12}{r['rate']:>10,.0f}{r['p50_ms']:>9.2f}"
                f"{r['p99_ms']:>9.2f}{r['ok']:>7.1%}"
            )
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (2 cores)")
    if "feast" in results:
        ratio = (
            results["featureflow"]["saturation"]["rate"] / results["feast"]["saturation"]["rate"]
        )
        print(f"\nsaturation rate: flows.serve / feast serve = {ratio:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--duration", type=int, default=10, help="seconds per load level")
    parser.add_argument("--workers", type=int, default=1, help="server processes (both servers)")
    parser.add_argument("--connections", type=int, default=32, help="connections at saturation")
    parser.add_argument("--no-feast", action="store_true", help="skip Feast")
    parser.add_argument(
        "--uvicorn",
        action="store_true",
        help="also the same app under uvicorn (pip install uvicorn httptools uvloop)",
    )
    args = parser.parse_args()
    oha = find_oha()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as name:
        tmp = Path(name)
        defs, newest = make_log(tmp, args.events, args.keys, args.partitions)
        elapsed, _ = run_flow(tmp, defs, 1)
        print(f"flows.run: {args.events:,} events into {args.keys:,} keys in {elapsed:.1f} s")
        state, at_s = tmp / "state-w1", (newest + 1) / 1e6
        results: dict[str, dict[str, dict[str, float]]] = {}
        single, batch = bodies(tmp, args.keys, lambda keys: {"keys": keys}, "ff")
        with featureflow_server(tmp, state, args.workers) as url:
            results["featureflow"] = measure(oha, url, single, batch, args)
        if args.uvicorn:
            with uvicorn_server(tmp, state) as url:
                results["ff-uvicorn"] = measure(oha, url, single, batch, args)
        if not args.no_feast:
            try:
                feast = feast_install()
            except subprocess.CalledProcessError as exc:
                print(f"Feast could not be installed: {exc}", file=sys.stderr)
            else:
                repo = feast_repo(tmp, state, args.keys, at_s)
                shape = feast_body
                f_single, f_batch = bodies(tmp, args.keys, shape, "feast")
                with feast_server(tmp, feast, repo, at_s, args.workers) as url:
                    results["feast"] = measure(oha, url, f_single, f_batch, args)
        report(results)


if __name__ == "__main__":
    main()
