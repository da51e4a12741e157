"""Freshness expectations: FeatureView(freshness="5m") reaches /metrics as the view's age, its
expectation and a stale flag; a bad expectation is refused when the definitions load."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.errors import DefinitionError
from flows.spec import FeatureView, Source, count
from tests.helpers import REPO


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("featureflow_view_")
    }


def test_metrics_expose_age_expectation_and_staleness(deployment: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    shutil.copytree(deployment / "state", state)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    flow = subprocess.Popen(
        [sys.executable, "-m", "flows.run", "--features", str(deployment / "defs" / "features.py"),
         "--warehouse", str(deployment / "wh"), "--state", str(state), "--metrics-port",
         str(port), "--status-interval", "60"],
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        got: dict[str, float] = {}
        deadline = time.monotonic() + 60
        age = 'featureflow_view_newest_event_age_seconds{view="spend"}'
        while age not in got:
            assert time.monotonic() < deadline, f"no freshness metrics: {got}"
            time.sleep(0.2)
            try:
                got = scrape(port)
            except OSError:
                continue
        time.sleep(2.0)  # the flow's Ctrl-C handler is in place once its dataflow runs
    finally:
        flow.send_signal(signal.SIGINT)
        _, err = flow.communicate(timeout=60)
    assert flow.returncode == 0, err
    assert got['featureflow_view_freshness_expected_seconds{view="spend"}'] == 300.0
    assert got['featureflow_view_stale{view="spend"}'] == 1.0  # test events are months old
    assert 'featureflow_view_stale{view="channels"}' not in got  # no expectation declared
    assert got[age] > 300  # the resumed view's newest event, not "nothing applied"


def test_bad_freshness_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s.avsc").write_text(
        '{"type": "record", "name": "S", "fields": [{"name": "k", "type": "string"},'
        ' {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}}]}'
    )
    source = Source(name="s", schema=str(tmp_path / "s.avsc"), key="k", timestamp="ts")
    view = FeatureView(name="v", source=source, features=[count()], freshness="soon")
    with pytest.raises(DefinitionError, match="freshness 'soon' is not a duration"):
        view.layout()


def test_shipped_alert_rules_use_metrics_the_flow_exports() -> None:
    import re

    import yaml

    from flows.metrics import Metrics

    rules = yaml.safe_load((REPO / "docs" / "alerts.yml").read_text())["groups"][0]["rules"]
    exported = {m.name for m in Metrics().registry.collect()}
    exported |= {f"{n}_total" for n in exported}  # counters are scraped with _total
    for rule in rules:
        used = set(re.findall(r"featureflow_[a-z_]+", rule["expr"]))
        assert used, rule
        assert used <= exported, (rule["alert"], used - exported)
    assert {r["alert"] for r in rules} >= {
        "FeatureViewStale",
        "FeatureflowKafkaLagGrowing",
        "FeatureflowDeadLetters",
    }
