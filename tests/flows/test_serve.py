"""The HTTP feature server over real HTTP on loopback (`python -m flows.serve` as a subprocess):
every endpoint, equality with the embedded FeatureClient for the same keys and `at`, every error
status with its message, the bearer token, and reads while a replay switches versions."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from state.client import FeatureClient
from state.store import ViewStore
from tests.conftest import ProjectFactory
from tests.helpers import MINUTE, REPO, make_events, run_command, wait_until
from tests.serve_helpers import Http, Server, free_port, serving

KEYS = [f"user{i}" for i in range(12)] + ["nobody"]
COMPOSITE = """
user_channel = FeatureView(name="user_channel", source=txns, key=("user_id", "channel"),
                           features=[count(window="1d"), sum("amount", window="1d")])
"""


@pytest.fixture(scope="module")
def store(project_factory: ProjectFactory) -> tuple[Path, Path, int]:
    """(state dir, definitions, newest event time in µs) after flows.run over 2,000 events."""
    project = project_factory("serve")
    project.features.write_text(project.features.read_text() + COMPOSITE)
    events = make_events(2000, 10, seed=5)
    assert project.ingest(events).returncode == 0
    result = project.run()
    assert result.returncode == 0, result.stderr
    newest = int(events.column("ts").cast(pa.int64()).to_numpy().max())
    return project.state, project.features, newest


@pytest.fixture(scope="module")
def server(store: tuple[Path, Path, int]) -> Iterator[Server]:
    with serving(store[0], "--batch-limit", "20") as running:
        yield running


@pytest.fixture
def http(server: Server) -> Iterator[Http]:
    conn = server.http()
    yield conn
    conn.close()


def test_view_reads_equal_the_client(store: tuple[Path, Path, int], http: Http) -> None:
    state, _, newest = store
    at_us = newest + 3 * MINUTE
    iso = datetime.fromtimestamp(at_us / 1e6, tz=UTC).isoformat()
    with FeatureClient(state) as client:
        for view in ("spend", "channels"):
            expected = client.get_many(view, KEYS, at=at_us / 1e6)
            for at in (at_us / 1e6, iso, iso.replace("+00:00", "Z")):
                answer = http.post(f"/v1/views/{view}", {"keys": KEYS, "at": at})
                assert answer.status == 200, answer.body
                assert answer.json() == {"rows": expected}
        now = client.get_many("spend", KEYS)  # 'now' is months after the data: stable values
    assert http.post("/v1/views/spend", {"keys": KEYS}).json()["rows"] == now
    assert http.post("/v1/views/spend", {"keys": KEYS, "at": None}).json()["rows"] == now
    assert http.post("/v1/views/spend", {"keys": []}).json() == {"rows": []}


def test_composite_keys_are_json_arrays(store: tuple[Path, Path, int], http: Http) -> None:
    state, _, newest = store
    # a tuple per key (the client's annotation names str and int only)
    keys: list[Any] = [("user1", "web"), ("user2", "pos"), ("user3", "atm"), ("nobody", "web")]
    at = (newest + MINUTE) / 1e6
    with FeatureClient(state) as client:
        expected = client.get_many("user_channel", keys, at=at)
    assert sum(row["count_1d"] for row in expected) > 0
    answer = http.post("/v1/views/user_channel", {"keys": [list(k) for k in keys], "at": at})
    assert answer.status == 200, answer.body
    assert answer.json() == {"rows": expected}
    scalar = http.post("/v1/views/user_channel", {"keys": ["user1"]})
    assert scalar.status == 400
    assert "is not a composite key" in scalar.error
    short = http.post("/v1/views/user_channel", {"keys": [["user1"]]})
    assert short.status == 400
    assert "('user_id', 'channel')" in short.error


def test_an_integer_key_reads_as_its_text(http: Http) -> None:
    by_int = http.post("/v1/views/spend", {"keys": [7]}).json()
    assert by_int == http.post("/v1/views/spend", {"keys": ["7"]}).json()


def test_catalog_health_and_metrics(store: tuple[Path, Path, int], http: Http) -> None:
    newest = store[2]
    catalog = http.get("/v1/views").json()
    views = {v["name"]: v for v in catalog["views"]}
    assert set(views) == {"spend", "channels", "user_channel"}
    assert views["user_channel"]["key"] == ["user_id", "channel"]
    spend = views["spend"]
    assert spend["version"] == 1
    assert spend["key"] == ["user_id"]
    features = {f["name"]: f for f in spend["features"]}
    assert features["count_30m"] == {
        "name": "count_30m",
        "agg": "count",
        "column": None,
        "type": "long",
        "window": "30m",
        "hop": "1m",
    }
    assert features["amount_mean_1d"]["type"] == "double"
    assert features["channel_last"]["type"] == "string"
    assert features["channel_last"]["window"] == "lifetime"
    newest_time = datetime.fromisoformat(spend["newest_event_time"])
    assert newest_time == datetime.fromtimestamp(newest // 1_000_000, tz=UTC).replace(
        microsecond=newest % 1_000_000
    )
    assert spend["newest_event_age_s"] > 0
    assert 0 <= catalog["freshness_s"] < 30

    health = http.get("/healthz")
    assert health.status == 200
    assert health.json()["status"] == "ready"

    http.post("/v1/views/spend", {"keys": ["user1"]})
    http.post("/v1/views/nope", {"keys": ["user1"]})
    metrics = http.get("/metrics")
    assert metrics.status == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.body.decode()
    assert 'featureflow_http_requests_total{endpoint="view",name="spend",status="200"}' in text
    assert 'featureflow_http_requests_total{endpoint="view",name="",status="404"}' in text
    assert 'featureflow_http_request_seconds_bucket{endpoint="view",le="0.001",name="spend"}' in (
        text
    )
    assert 'featureflow_http_errors_total{endpoint="view",kind="not_found"}' in text


BAD_REQUESTS = [
    (b"{not json", "is not valid JSON"),
    (b"", "is not valid JSON"),
    (b"[1, 2]", "is an array, not a JSON object"),
    (b"{}", 'has no "keys"'),
    (b'{"key": ["u1"]}', "unknown field(s) ['key']"),
    (b'{"keys": "user1"}', '"keys" is a string ("user1"), not a JSON array'),
    (b'{"keys": [1.5]}', "keys[0] is a number (1.5)"),
    (b'{"keys": ["u1", null]}', "keys[1] is null"),
    (b'{"keys": [{"user_id": "u1"}]}', "keys[0] is an object"),
    (b'{"keys": [true]}', "keys[0] is a boolean"),
    (b'{"keys": [[]]}', "keys[0] is an array"),
    (b'{"keys": [["user1", "web"]]}', "is a tuple (a composite key)"),
    (b'{"keys": ["u1"], "at": "2026-01-31T12:00:00"}', "has no zone"),
    (b'{"keys": ["u1"], "at": "yesterday"}', "is not ISO-8601 time"),
    (b'{"keys": ["u1"], "at": true}', '"at" is a boolean'),
    (b'{"keys": ["u1"], "at": [1]}', '"at" is an array'),
    (b'{"keys": ["u1"], "at": 1e300}', "is out of range"),
    (b'{"keys": ["u1"], "at": 99999999999999999999}', "is out of range"),
    (b'{"keys": ["user1"], "at": 0}', "as of"),  # older than the retained tiles can answer
]


@pytest.mark.parametrize(("body", "message"), BAD_REQUESTS)
def test_bad_requests_are_400_with_a_message(http: Http, body: bytes, message: str) -> None:
    answer = http.request("POST", "/v1/views/spend", body)
    assert answer.status == 400, answer.body
    assert message in answer.error
    assert answer.json()["status"] == 400


def test_not_found_method_and_too_large(http: Http) -> None:
    unknown = http.post("/v1/views/nope", {"keys": ["u1"]})
    assert unknown.status == 404
    assert "unknown view 'nope'; views: channels, spend, user_channel" in unknown.error
    assert http.post("/v1/views/nope", {"bad": 1}).status == 404  # the name is checked first
    endpoint = http.get("/v2/things")
    assert endpoint.status == 404
    assert "no endpoint GET '/v2/things'" in endpoint.error
    method = http.get("/v1/views/spend")
    assert method.status == 405
    assert "use POST" in method.error
    assert http.post("/healthz", {}).status == 405
    batch = http.post("/v1/views/spend", {"keys": [f"u{i}" for i in range(21)]})
    assert batch.status == 413
    assert "21 keys in one request is past the batch limit of 20" in batch.error
    assert http.post("/v1/views/spend", {"keys": [f"u{i}" for i in range(20)]}).status == 200
    huge = http.request("POST", "/v1/views/spend", b'{"keys": ["' + b"x" * 200_000 + b'"]}')
    assert huge.status == 413
    assert "larger than" in huge.error


def test_a_client_gone_mid_body_leaves_the_server_serving(server: Server, http: Http) -> None:
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/views/spend HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                b'{"keys": ["us'
            )
    assert http.post("/v1/views/spend", {"keys": ["user1"]}).status == 200
    assert http.get("/healthz").status == 200


def test_service_of_unknown_name_is_404(http: Http) -> None:
    answer = http.post("/v1/services/nope", {"rows": [{"user_id": "u1"}]})
    assert answer.status == 404
    assert "nope" in answer.error or "definitions" in answer.error


def test_token_required_on_every_endpoint_but_healthz(
    store: tuple[Path, Path, int], tmp_path: Path
) -> None:
    (tmp_path / "token").write_text("s3cret-token\n")
    with serving(store[0], "--token-file", str(tmp_path / "token")) as running:
        http = running.http()
        assert http.get("/healthz").status == 200
        for method, path in (
            ("GET", "/v1/views"),
            ("GET", "/metrics"),
            ("POST", "/v1/views/spend"),
            ("POST", "/v1/services/any"),
            ("POST", "/v1/views/nope"),
            ("GET", "/nothing-here"),
        ):
            body = b'{"keys": ["user1"]}' if method == "POST" else None
            # A refused request may close its connection (its body is not read): each on its own.
            http.close()
            http = running.http()
            missing = http.request(method, path, body)
            assert missing.status == 401, (method, path)
            assert "the bearer token is missing" in missing.error
            assert missing.headers["www-authenticate"] == "Bearer"
            http.close()
            http = running.http()
            wrong = http.request(method, path, body, token="s3cret-tokeN")
            assert wrong.status == 401
            assert "the bearer token is wrong" in wrong.error
        http.close()
        http = running.http()
        ok = http.post("/v1/views/spend", {"keys": ["user1"]}, token="s3cret-token")
        assert ok.status == 200
        assert http.get("/v1/views", token="s3cret-token").status == 200
        http.close()


def test_settings_from_env_and_config_file(store: tuple[Path, Path, int], tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text("batch_limit = 2\n")
    env = {"FEATUREFLOW_CONFIG": str(config), "FEATUREFLOW_WORKERS": "2"}
    with serving(store[0], env=env) as running:
        http = running.http()
        too_many = http.post("/v1/views/spend", {"keys": ["a", "b", "c"]})
        assert too_many.status == 413
        assert "batch limit of 2" in too_many.error
        for _ in range(40):  # two worker processes: metrics of both are summed
            http.close()
            http = running.http()
            http.post("/v1/views/spend", {"keys": ["user1"]})
        text = http.get("/metrics").body.decode()
        line = next(
            ln
            for ln in text.splitlines()
            if ln.startswith(
                'featureflow_http_requests_total{endpoint="view",name="spend",status="200"'
            )
        )
        assert float(line.rsplit(" ", 1)[1]) == 40.0
        http.close()


def test_health_waits_for_views_and_new_views_are_served(
    store: tuple[Path, Path, int], tmp_path: Path
) -> None:
    _, features, newest = store
    state = tmp_path / "state"
    ViewStore(state)  # an empty view store: no view yet
    with serving(state, ready=False) as running:
        http = running.http()
        health = http.get("/healthz")
        assert health.status == 503
        assert health.json()["status"] == "starting"
        assert http.post("/v1/views/spend", {"keys": ["user1"]}).status == 404
        warehouse = str(store[0].parent / "wh")
        result = run_command(
            "flows.run",
            "--features",
            str(features),
            "--warehouse",
            warehouse,
            "--state",
            str(state),
            "--until-caught-up",
            "--views",
            "spend",
        )
        assert result.returncode == 0, result.stderr
        wait_until(lambda: http.get("/healthz").status == 200, "a healthy server", timeout=30)
        assert http.get("/healthz").json()["views"] == ["spend"]
        answer = http.post("/v1/views/spend", {"keys": ["user1"], "at": (newest + 1) / 1e6})
        assert answer.status == 200
        assert answer.json()["rows"][0]["count"] > 0
        http.close()


def test_bad_settings_stop_with_one_line(store: tuple[Path, Path, int], tmp_path: Path) -> None:
    missing = run_command(
        "flows.serve", "--state", str(store[0]), "--token-file", str(tmp_path / "none")
    )
    assert missing.returncode == 2
    assert "--token-file" in missing.stderr
    assert "cannot be read" in missing.stderr
    (tmp_path / "empty").write_text("\n")
    empty = run_command(
        "flows.serve", "--state", str(store[0]), "--token-file", str(tmp_path / "empty")
    )
    assert empty.returncode == 2
    assert "is empty" in empty.stderr
    not_store = run_command("flows.serve", "--state", str(tmp_path))
    assert not_store.returncode == 2
    assert "is not a view store" in not_store.stderr
    bad_port = run_command("flows.serve", "--state", str(store[0]), "--port", "http")
    assert bad_port.returncode == 2
    assert "--port" in bad_port.stderr
    too_high = run_command("flows.serve", "--state", str(store[0]), "--port", "70000")
    assert too_high.returncode == 2
    assert "--port 70000 is not a TCP port" in too_high.stderr
    for refresh in ("0", "-1", "nan"):
        bad = run_command("flows.serve", "--state", str(store[0]), "--refresh-interval", refresh)
        assert bad.returncode == 2
        assert "--refresh-interval" in bad.stderr


def test_non_loopback_without_token_warns(store: tuple[Path, Path, int]) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.serve",
            "--state",
            str(store[0]),
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
        ],
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        first = process.stderr.readline()
    finally:
        process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()
    assert first.startswith("warning: serving on 0.0.0.0 without --token-file")
    assert "bind to 127.0.0.1" in first


def test_reads_while_a_replay_switches_versions(
    store: tuple[Path, Path, int], tmp_path: Path
) -> None:
    original, features, newest = store
    shutil.copytree(original.parent / "wh", tmp_path / "wh")
    shutil.copytree(original, tmp_path / "state")
    state = tmp_path / "state"
    at = (newest + MINUTE) / 1e6
    with FeatureClient(state) as client:
        expected = client.get_many("spend", KEYS, at=at)
    failures: list[str] = []
    versions: set[int] = set()
    stop = threading.Event()

    def hammer(server: Server) -> int:
        http, n = server.http(), 0
        while not stop.is_set():
            answer = http.post("/v1/views/spend", {"keys": KEYS, "at": at})
            n += 1
            if answer.status != 200 or answer.json()["rows"] != expected:
                failures.append(f"{answer.status}: {answer.body[:200]!r}")
            catalog = http.get("/v1/views").json()
            versions.update(v["version"] for v in catalog["views"] if v["name"] == "spend")
        http.close()
        return n

    with serving(state) as running:
        counts: list[int] = []
        threads = [
            threading.Thread(target=lambda: counts.append(hammer(running))) for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        replay = run_command(
            "flows.replay",
            "--features",
            str(features),
            "--warehouse",
            str(tmp_path / "wh"),
            "--state",
            str(state),
            "--views",
            "spend",
        )
        time.sleep(1.5)  # the server follows the switch within its refresh interval
        stop.set()
        for thread in threads:
            thread.join()
    assert replay.returncode == 0, replay.stderr
    assert failures == []
    assert sum(counts) > 20
    assert versions >= {2}  # the server switched to the replayed version while serving


def test_served_reads_are_logged_for_flows_skew(
    store: tuple[Path, Path, int], tmp_path: Path
) -> None:
    """`--served-log WAREHOUSE`: what the server answered lands as Parquet under _served/."""
    from state.servedlog import read_served

    with serving(store[0], "--served-log", str(tmp_path / "wh")) as running:
        http = running.http()
        answer = http.post("/v1/views/spend", {"keys": ["user1", "user2"]})
        assert answer.status == 200
        http.close()
    logged = read_served(tmp_path / "wh")  # the server flushed its log when it stopped
    assert logged.num_rows == 2
    assert sorted(logged.column("key").to_pylist()) == ["user1", "user2"]
