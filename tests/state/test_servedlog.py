"""The served-feature log: what FeatureClient served, as Parquet in the warehouse, written off
the read's path, sampled and bounded; the client's old constructor calls still work."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from state.client import FeatureClient
from state.servedlog import SERVED_DIR, ServedLog, read_served

AT = 1_780_000_000 + 4 * 86_400  # seconds: after the newest test event


def test_every_read_is_logged_with_its_values(deployment: Path, tmp_path: Path) -> None:
    log = ServedLog(tmp_path / "wh", flush_s=0.05)
    with FeatureClient(deployment / "state", served_log=log) as client:
        one = client.get("spend", "user1", at=AT)
        many = client.get_many("channels", ["user2", "user3"], at=AT)
        now = client.get("spend", key="user4")
        vector = client.get_service("fraud", {"user_id": "user5"}, at=AT)
    assert log.stats().dropped == 0
    assert list((tmp_path / "wh" / SERVED_DIR).glob("date=*/served-*.parquet"))
    rows = read_served(tmp_path / "wh").to_pylist()
    views = [r for r in rows if r["kind"] == "view"]
    got = {(r["name"], r["key"]): r for r in views}
    assert orjson.loads(got["spend", "user1"]["values"]) == one
    assert got["spend", "user1"]["version"] == 1
    assert got["spend", "user1"]["at"].timestamp() == AT
    assert got["spend", "user1"]["at_given"]
    assert [orjson.loads(got["channels", k]["values"]) for k in ("user2", "user3")] == many
    assert not got["spend", "user4"]["at_given"]
    assert orjson.loads(got["spend", "user4"]["values"]) == now
    (service,) = [r for r in rows if r["kind"] == "service"]
    assert service["name"] == "fraud"
    assert orjson.loads(service["request"]) == {"user_id": "user5"}
    assert orjson.loads(service["values"]) == vector


def test_sampling_logs_about_the_rate(deployment: Path, tmp_path: Path) -> None:
    log = ServedLog(tmp_path / "wh", rate=0.25, seed=7)
    with FeatureClient(deployment / "state", served_log=log) as client:
        for i in range(400):
            client.get("spend", f"user{i % 20}", at=AT)
    rows = read_served(tmp_path / "wh").num_rows
    assert 60 <= rows <= 140  # 100 expected; the seed makes it the same every run
    assert rows == log.stats().logged


def test_the_queue_is_bounded_and_drops_are_counted(deployment: Path, tmp_path: Path) -> None:
    log = ServedLog(tmp_path / "wh", max_reads=5, flush_s=3600)  # the writer never wakes early
    with FeatureClient(deployment / "state", served_log=log) as client:
        for _ in range(12):
            client.get("spend", "user1", at=AT)
        assert log.stats().logged == 5
        assert log.stats().dropped == 7
    assert read_served(tmp_path / "wh").num_rows == 5  # close wrote what was queued


def test_old_constructor_calls_still_work(deployment: Path) -> None:
    with FeatureClient(str(deployment / "state"), refresh_s=0.1) as client:
        assert client.served_log is None
        assert client.get("spend", "user1", at=AT)["count_30m"] >= 0


def test_bad_rate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rate"):
        ServedLog(tmp_path, rate=1.5)
