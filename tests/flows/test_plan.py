"""flows.plan: every kind of definitions change against a real deployment, its exit codes and
JSON; flows.run refuses a breaking change unless --allow-breaking; the definitions history."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest

from flows.governance.history import read_history, record_rate, view_history
from flows.plan import main as plan_main
from state.definitions import recorded_module
from state.store import ViewStore
from tests.helpers import (
    DEPLOYMENT_DEFS,
    DEPLOYMENT_EVENTS,
    SCHEMA_JSON,
    run_command,
    write_module,
)


def plan(deployment: Path, features: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    args = [
        "--features",
        str(features),
        "--warehouse",
        str(deployment / "wh"),
        "--state",
        str(deployment / "state"),
        "--json",
    ]
    code = plan_main(args)
    return code, orjson.loads(capsys.readouterr().out)


def by_name(result: dict, kind: str) -> dict[str, dict]:
    return {c["name"]: c for c in result["changes"][kind]}


def test_same_definitions_change_nothing_and_exit_0(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, result = plan(deployment, write_module(tmp_path), capsys)
    assert code == 0
    assert not result["changed"]
    assert not result["breaking"]
    statuses = {c["status"] for kind in result["changes"].values() for c in kind}
    assert statuses == {"unchanged"}
    assert set(by_name(result, "view")) == {"spend", "channels"}


def test_feature_added_needs_a_replay_with_its_cost(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = DEPLOYMENT_DEFS.replace(
        'last("channel"),', 'last("channel"), sum("amount", window="2h"),'
    )
    code, result = plan(deployment, write_module(tmp_path, text), capsys)
    assert code == 2
    spend = by_name(result, "view")["spend"]
    assert spend["status"] == "changed"
    assert spend["new_version"]
    assert any("'amount_sum_2h' added" in d for d in spend["details"])
    replay = spend["replay"]
    assert replay["events"] == DEPLOYMENT_EVENTS  # every record of the log, from the manifests
    assert replay["seconds"] == pytest.approx(DEPLOYMENT_EVENTS / replay["rate"])
    assert replay["state_bytes"] > 0
    assert by_name(result, "view")["channels"]["status"] == "unchanged"
    assert not result["breaking"]


def test_window_changed_is_a_rename_with_a_hint(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = DEPLOYMENT_DEFS.replace('last("channel"),', 'last("channel", window="1h"),')
    code, result = plan(deployment, write_module(tmp_path, text), capsys)
    assert code == 2
    details = by_name(result, "view")["spend"]["details"]
    assert any(
        "'channel_last_1h' added" in d and "renamed from 'channel_last'" in d for d in details
    )
    assert any("'channel_last' removed" in d for d in details)
    assert not result["breaking"]  # no service serves channel_last


def test_hop_changed_under_the_same_name(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = DEPLOYMENT_DEFS.replace('count(window="30m")', 'count(window="30m", hop="10m")')
    code, result = plan(deployment, write_module(tmp_path, text), capsys)
    assert code == 2
    details = by_name(result, "view")["spend"]["details"]
    assert any("'count_30m' changed: hop 1m -> 10m" in d for d in details)


def test_view_removed_from_a_service_is_breaking(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kept = [line for line in DEPLOYMENT_DEFS.splitlines() if not line.startswith("channels =")]
    text = "\n".join(kept).replace(", channels])", "])")
    code, result = plan(deployment, write_module(tmp_path, text), capsys)
    assert code == 2
    assert by_name(result, "view")["channels"]["status"] == "removed"
    assert by_name(result, "service")["fraud"]["status"] == "changed"
    assert result["breaking"] == [
        {
            "service": "fraud",
            "column": "channels__amount_sum_6h",
            "reason": "view 'channels' is removed",
        }
    ]


def test_renamed_served_feature_is_breaking(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = DEPLOYMENT_DEFS.replace('window="1d", description', 'window="2d", description').replace(
        '"amount_mean_1d"]', '"amount_mean_2d"]'
    )
    code, result = plan(deployment, write_module(tmp_path, text), capsys)
    assert code == 2
    assert [b["column"] for b in result["breaking"]] == ["spend__amount_mean_1d"]
    assert "removed from view 'spend'" in result["breaking"][0]["reason"]


def test_source_schema_evolved(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    merchant = '{"name": "merchant", "type": ["null", "string"], "default": null},'
    schema = SCHEMA_JSON.replace('{"name": "channel"', f'{merchant}\n    {{"name": "channel"')
    code, result = plan(deployment, write_module(tmp_path, schema=schema), capsys)
    assert code == 2
    source = by_name(result, "source")["txns"]
    assert source["status"] == "changed"
    assert source["details"] == ["field 'merchant' added (string)"]
    assert {c["status"] for c in result["changes"]["view"]} == {"unchanged"}


def test_service_changed_and_new_view_and_metadata(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        DEPLOYMENT_DEFS.replace('"amount_mean_1d"]]', '"amount_mean_1d", "channel_last"]]').replace(
            'owner="risk-team"', 'owner="payments"'
        )
        + 'big = FeatureView(name="big", source=txns, features=[count(window="1h")])\n'
    )
    code, result = plan(deployment, write_module(tmp_path, text), capsys)
    assert code == 2
    service = by_name(result, "service")["fraud"]
    assert service["details"] == ["column 'spend__channel_last' added"]
    spend = by_name(result, "view")["spend"]
    assert spend["status"] == "changed"
    assert not spend["new_version"]
    assert spend["details"] == ["owner 'risk-team' -> 'payments' (metadata)"]
    big = by_name(result, "view")["big"]
    assert big["status"] == "new"
    assert big["replay"]["events"] == DEPLOYMENT_EVENTS
    assert big["replay"]["state_bytes"] > 0  # estimated from the views of the same source
    assert not result["breaking"]


def test_text_output_names_each_change(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = DEPLOYMENT_DEFS.replace(", channels])", "])")
    args = [
        "--features",
        str(write_module(tmp_path, text)),
        "--warehouse",
        str(deployment / "wh"),
        "--state",
        str(deployment / "state"),
    ]
    assert plan_main(args) == 2
    out = capsys.readouterr().out
    assert "~ fraud: changed" in out
    assert "BREAKING: service 'fraud' column 'channels__amount_sum_6h'" in out
    assert out.strip().splitlines()[-1].startswith("plan: ")


def test_missing_module_exits_1(deployment: Path, tmp_path: Path) -> None:
    args = ["--features", str(tmp_path / "nope.py"), "--state", str(deployment / "state")]
    assert plan_main(args) == 1


def test_run_refuses_breaking_unless_allowed_and_records_history(
    deployment: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    shutil.copytree(deployment / "state", state)
    before = recorded_module(state)
    assert len(read_history(state)) == 1
    text = DEPLOYMENT_DEFS.replace('sum("amount", window="6h")', 'sum("amount", window="12h")')
    features = write_module(tmp_path / "defs", text)
    common = [
        "--features",
        str(features),
        "--warehouse",
        str(deployment / "wh"),
        "--state",
        str(state),
        "--until-caught-up",
    ]
    refused = run_command("flows.run", *common)
    assert refused.returncode == 2
    assert "channels__amount_sum_6h" in refused.stderr
    assert "--allow-breaking" in refused.stderr
    assert ViewStore(state).current_version("channels") == 1  # the old version stays live
    assert recorded_module(state) == before
    allowed = run_command("flows.run", *common, "--allow-breaking")
    assert allowed.returncode == 0, allowed.stderr
    assert ViewStore(state).current_version("channels") == 2
    revisions = view_history(state, "channels")
    assert [r.version for r in revisions] == [1, 2]
    assert revisions[0].layout_sha256 != revisions[1].layout_sha256
    assert revisions[1].features == ("amount_sum_12h",)
    assert [r.version for r in view_history(state, "spend")] == [1]
    again = run_command("flows.run", *common)  # the same definitions again: nothing appended
    assert again.returncode == 0, again.stderr
    assert len(read_history(state)) == 2


def test_replay_time_uses_the_rate_measured_on_this_state(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    shutil.copytree(deployment / "state", state)
    record_rate(state, 5_000, 1.0)  # too short a run to measure anything: ignored
    record_rate(state, 200_000, 4.0)
    text = DEPLOYMENT_DEFS.replace(
        'last("channel"),', 'last("channel"), sum("amount", window="2h"),'
    )
    args = ["--features", str(write_module(tmp_path / "defs", text)), "--warehouse",
            str(deployment / "wh"), "--state", str(state), "--json"]  # fmt: skip
    assert plan_main(args) == 2
    replay = by_name(orjson.loads(capsys.readouterr().out), "view")["spend"]["replay"]
    assert replay["rate"] == 50_000
    assert replay["rate_source"].startswith("measured")
    assert replay["seconds"] == pytest.approx(DEPLOYMENT_EVENTS / 50_000)
