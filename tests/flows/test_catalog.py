"""flows.catalog: lineage, owners, types, windows, live versions, freshness; search by name
and tag; the definitions history of a view."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from flows.catalog import main as catalog_main
from tests.helpers import DEPLOYMENT_DEFS, write_module


def catalog(deployment: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    features = deployment / "defs" / "features.py"
    args = ["--features", str(features), "--state", str(deployment / "state"), "--json", *extra]
    assert catalog_main(args) == 0
    return orjson.loads(capsys.readouterr().out)


def test_catalog_lists_lineage_owners_versions_and_freshness(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    got = catalog(deployment, capsys)
    assert [s["name"] for s in got["sources"]] == ["txns"]
    assert got["sources"][0]["views"] == ["spend", "channels"]
    assert got["sources"][0]["fields"]["amount"] == "double"
    spend = next(v for v in got["views"] if v["name"] == "spend")
    assert spend["owner"] == "risk-team"
    assert spend["tags"] == {"fraud": ""}
    assert spend["live_version"] == 1
    assert spend["freshness_expected_s"] == 300
    assert spend["newest_event_us"] > 1_780_000_000_000_000
    assert spend["stale"] is True  # the test events are from 2026-05: far older than 5 minutes
    features = {f["name"]: f for f in spend["features"]}
    assert features["amount_mean_1d"] == {
        "name": "amount_mean_1d",
        "agg": "mean",
        "column": "amount",
        "param": None,
        "type": "double",
        "window": "1d",
        "hop": "1h",
        "description": "mean amount",
        "owner": "ds",
        "tags": {},
        "consumers": ["fraud"],
    }
    assert features["count_30m"]["owner"] == "risk-team"  # the view's owner by default
    assert features["channel_last"]["consumers"] == []
    assert features["channel_last"]["window"] == ""  # lifetime
    assert spend["consumers"] == ["fraud"]
    (service,) = got["services"]
    assert service["columns"] == [
        "spend__count_30m",
        "spend__amount_mean_1d",
        "channels__amount_sum_6h",
    ]
    assert [r["version"] for r in spend["history"]] == [1]


def test_search_by_name_and_by_tag(deployment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    got = catalog(deployment, capsys, "--search", "MEAN")
    assert [v["name"] for v in got["views"]] == ["spend"]
    assert [f["name"] for f in got["views"][0]["features"]] == ["amount_mean_1d"]
    assert got["services"] == []
    got = catalog(deployment, capsys, "--tag", "fraud")
    assert [v["name"] for v in got["views"]] == ["spend"]
    assert len(got["views"][0]["features"]) == 3  # the view matched as a whole
    got = catalog(deployment, capsys, "--search", "sum_6h")
    assert [v["name"] for v in got["views"]] == ["channels"]
    got = catalog(deployment, capsys, "--search", "no-such-thing")
    assert got["views"] == []
    assert got["sources"] == []


def test_text_catalog_and_history(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    features = write_module(tmp_path, DEPLOYMENT_DEFS)
    assert catalog_main(["--features", str(features), "--state", str(deployment / "state")]) == 0
    out = capsys.readouterr().out
    assert "view spend [v1 live] key user_id (owner risk-team; tags fraud)" in out
    assert "feature amount_mean_1d: mean(amount) window 1d hop 1h -> double; used by fraud" in out
    assert "STALE" in out
    assert catalog_main(["--state", str(deployment / "state"), "--history", "spend"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("spend v1  layout sha256 ")
    assert "features: count_30m, amount_mean_1d, channel_last" in line
    assert catalog_main(["--state", str(deployment / "state"), "--history", "nope"]) == 2
    assert "no deployment" in capsys.readouterr().err
