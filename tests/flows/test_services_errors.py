"""Issue 9: every bad service definition and every bad request gives a clear error naming the
value; an on-demand function that raises, returns the wrong length or the wrong type fails
naming the service, the function and the output, online and in `flows.snapshot --service`
(which then leaves no output file); a definition changed under a service fails, never nulls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.segments import Warehouse
from flows.errors import DefinitionError
from flows.ingest import ingest_table
from flows.spec import (
    FeatureService,
    FeatureView,
    RequestSource,
    Source,
    count,
    load_definitions,
    mean,
    on_demand,
)
from state.client import FeatureClient
from state.definitions import load_service_plans
from state.errors import (
    MissingFeatureError,
    OnDemandError,
    RequestTypeError,
    ServiceDefinitionError,
    ServiceRequestError,
    StateError,
    UnknownServiceError,
)
from tests.helpers import make_events, run_command, write_definitions

AT = 1_780_000_000 + 4 * 86_400

txns = Source(name="txns", schema="txn.avsc", key="user_id", timestamp="ts")
spend = FeatureView(
    name="spend", source=txns, features=[mean("amount", window="1d"), count(window="1h")]
)
payment = RequestSource(name="payment", schema={"amount": "double", "channel": "string"})


def ratio(rows: pa.Table) -> dict[str, Any]:
    return {"ratio": rows["amount"]}


# --- bad definitions ---------------------------------------------------------------------


def test_unsupported_request_type() -> None:
    with pytest.raises(DefinitionError, match=r"field 'amount' has type 'decimal'.*array<float>"):
        RequestSource(name="payment", schema={"amount": "decimal"})


def test_on_demand_source_neither_request_nor_view() -> None:
    with pytest.raises(DefinitionError, match=r"source 1 is str 'spend'.*RequestSource"):
        on_demand(sources=[payment, "spend"], outputs={"ratio": "double"})(ratio)  # type: ignore[list-item]


def test_unknown_input_feature() -> None:
    with pytest.raises(DefinitionError, match=r"view 'spend' has no feature 'amount_mean_7d'"):
        on_demand(sources=[payment, spend[["amount_mean_7d"]]], outputs={"ratio": "double"})(ratio)
    service = FeatureService(name="m", features=[spend[["nope"]]])
    with pytest.raises(DefinitionError, match=r"no feature 'nope' \(features: amount_mean_1d"):
        service.service_plan()


def test_unsupported_output_type() -> None:
    with pytest.raises(DefinitionError, match=r"output 'ratio' has type 'decimal'"):
        on_demand(sources=[payment], outputs={"ratio": "decimal"})(ratio)


def test_output_name_clashes() -> None:
    twice = FeatureService(name="m", features=[spend, spend[["count_1h"]]])
    with pytest.raises(DefinitionError, match=r"output column\(s\) \['spend__count_1h'\]"):
        twice.service_plan()
    named_like_view = on_demand(sources=[payment], outputs={"x": "double"}, name="spend")(ratio)
    with pytest.raises(DefinitionError, match=r"on-demand function 'spend' has the name of a"):
        FeatureService(name="m", features=[spend, named_like_view]).service_plan()
    a = on_demand(sources=[payment], outputs={"x": "double"}, name="f")(ratio)
    with pytest.raises(DefinitionError, match=r"\['f__x'\] are listed twice"):
        FeatureService(name="m", features=[a, a]).service_plan()


def test_conflicting_request_types() -> None:
    other = RequestSource(name="other", schema={"amount": "string"})
    with pytest.raises(DefinitionError, match=r"request field 'amount' is declared 'double'"):
        on_demand(sources=[payment, other], outputs={"x": "double"})(ratio)


def test_service_items_and_keys() -> None:
    with pytest.raises(DefinitionError, match=r"str 'spend' is not a feature"):
        FeatureService(name="m", features=["spend"]).service_plan()  # type: ignore[list-item]
    with pytest.raises(DefinitionError, match=r"keys names view 'risk'"):
        FeatureService(name="m", features=[spend], keys={"risk": "m_id"}).service_plan()
    with pytest.raises(DefinitionError, match=r"keys\['spend'\]=\('a', 'b'\) must name 1"):
        FeatureService(name="m", features=[spend], keys={"spend": ("a", "b")}).service_plan()
    with pytest.raises(DefinitionError, match=r"has no features"):
        FeatureService(name="m", features=[]).service_plan()


def test_bad_service_in_a_module_names_the_module(tmp_path: Path) -> None:
    features = write_definitions(tmp_path)
    features.write_text(
        features.read_text()
        + "from flows.spec import FeatureService\n"
        + "bad = FeatureService(name='bad', features=[spend[['no_such_feature']]])\n"
    )
    with pytest.raises(DefinitionError, match=rf"{features}.*no feature 'no_such_feature'"):
        load_definitions(features)
    with pytest.raises(ServiceDefinitionError, match=r"no feature 'no_such_feature'"):
        load_service_plans(features)


# --- bad requests and failing functions, online and offline ---------------------------------

SERVICE = """
import numpy as np
import pyarrow.compute as pc
from flows.spec import FeatureService, RequestSource, on_demand

payment = RequestSource(name="payment", schema={"amount": "double", "channel": "string",
                                               "n": "int"})


@on_demand(sources=[payment, spend[["mean_amount_1d"]]], outputs={"ratio": "double"})
def signals(rows):
    if pc.any(pc.equal(rows["channel"], "boom")).as_py():
        raise ZeroDivisionError("boom channel")
    if pc.any(pc.equal(rows["channel"], "short")).as_py():
        return {"ratio": [1.0]}
    if pc.any(pc.equal(rows["channel"], "text")).as_py():
        return {"ratio": ["x"] * len(rows)}
    return {"ratio": pc.divide(rows["amount"], rows["spend__mean_amount_1d"])}


fraud = FeatureService(name="fraud", features=[spend[["mean_amount_1d"]], signals])
"""

SPEND = """
spend = FeatureView(name="spend", source=txns, features=[
    mean("amount", window="1d", name="mean_amount_1d"), count(window="30m"),
])
"""


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("service-errors")
    features = write_definitions(tmp / "defs", partitions=2)
    features.write_text(features.read_text() + SPEND + SERVICE)
    defs = load_definitions(features)
    ingest_table(defs.sources["txns"], make_events(500, 10, seed=3), Warehouse(tmp / "wh"))
    result = run_command(
        "flows.run",
        *("--features", str(features), "--warehouse", str(tmp / "wh")),
        *("--state", str(tmp / "state"), "--until-caught-up", "--views", "spend"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp, features


def row(**changes: Any) -> dict[str, Any]:
    return {"user_id": "user1", "amount": 10.0, "channel": "web", "n": 3, **changes}


def test_bad_requests(deployed: tuple[Path, Path]) -> None:
    tmp, features = deployed
    with FeatureClient(tmp / "state", features=features) as client:
        assert client.get_service("fraud", row(), at=AT)["spend__mean_amount_1d"] is not None
        with pytest.raises(
            UnknownServiceError, match=r"unknown feature service 'fraud_v2'.*'fraud'"
        ):
            client.get_service("fraud_v2", row(), at=AT)
        no_user = row()
        del no_user["user_id"]
        with pytest.raises(
            ServiceRequestError, match=r"entity column 'user_id' is missing from row 0"
        ):
            client.get_service("fraud", no_user, at=AT)
        with pytest.raises(
            ServiceRequestError, match=r"request field 'amount' is missing from row 1"
        ):
            client.get_service_many("fraud", [row(), {"user_id": "u", "channel": "web", "n": 1}])
        table = pa.Table.from_pylist([row()]).drop_columns(["channel"])
        with pytest.raises(ServiceRequestError, match=r"request field 'channel' is missing"):
            client.get_service_many("fraud", table, at=AT)
        with pytest.raises(
            RequestTypeError, match=r"request field 'amount' has string values, declared 'double'"
        ):
            client.get_service("fraud", row(amount="12.5"), at=AT)
        with pytest.raises(
            RequestTypeError, match=r"request field 'n' has double values, declared 'int'"
        ):
            client.get_service("fraud", row(n=1.5), at=AT)
        with pytest.raises(RequestTypeError, match=r"request field 'n'"):
            client.get_service("fraud", row(n=2**40), at=AT)
        with pytest.raises(RequestTypeError, match=r"entity column\(s\) \['user_id'\]"):
            client.get_service("fraud", row(user_id=1.5), at=AT)
        with pytest.raises(RequestTypeError, match=r"takes one row as a dict"):
            client.get_service("fraud", [row()], at=AT)  # type: ignore[arg-type]
        assert client.get_service_many("fraud", [], at=AT) == []
        nulls = client.get_service("fraud", row(amount=None, channel=None, n=None), at=AT)
        assert nulls["signals__ratio"] is None


@pytest.mark.parametrize(
    ("channel", "message"),
    [
        ("boom", r"service 'fraud', on-demand function 'signals' raised ZeroDivisionError: boom"),
        ("short", r"'signals': output 'ratio' has 1 values for 2 rows"),
        ("text", r"'signals': output 'ratio' has type string, declared 'double'"),
    ],
)
def test_failing_function_online(deployed: tuple[Path, Path], channel: str, message: str) -> None:
    tmp, features = deployed
    with (
        FeatureClient(tmp / "state", features=features) as client,
        pytest.raises(OnDemandError, match=message),
    ):
        client.get_service_many("fraud", [row(), row(channel=channel)], at=AT)


def test_failing_function_fails_the_snapshot_and_writes_nothing(
    deployed: tuple[Path, Path],
) -> None:
    tmp, features = deployed
    spine = tmp / "spine.parquet"
    rows = [{**row(channel=c), "ts": AT * 1_000_000} for c in ("web", "boom", "pos")]
    table = pa.Table.from_pylist(rows)
    pq.write_table(
        table.set_column(4, "ts", table.column("ts").cast(pa.timestamp("us", "UTC"))), spine
    )
    out = tmp / "out.parquet"
    result = run_command(
        "flows.snapshot",
        *("--features", str(features), "--warehouse", str(tmp / "wh"), "--service", "fraud"),
        *("--spine", str(spine), "--out", str(out)),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "on-demand function 'signals' raised ZeroDivisionError: boom channel" in result.stderr
    assert "no snapshot was written" in result.stderr
    assert not out.exists()
    assert not list(tmp.glob(".out.parquet.tmp-*"))
    missing = run_command(
        "flows.snapshot",
        *("--features", str(features), "--warehouse", str(tmp / "wh"), "--service", "fraud"),
        *("--spine", str(tmp / "nospine.parquet"), "--out", str(out)),
    )
    assert missing.returncode == 2
    pq.write_table(pa.Table.from_pylist(rows).drop_columns(["channel"]), tmp / "bad.parquet")
    lacking = run_command(
        "flows.snapshot",
        *("--features", str(features), "--warehouse", str(tmp / "wh"), "--service", "fraud"),
        *("--spine", str(tmp / "bad.parquet"), "--out", str(out)),
    )
    assert lacking.returncode == 2
    assert "request field 'channel' is missing" in lacking.stderr
    assert not out.exists()


def test_feature_missing_from_the_live_version(deployed: tuple[Path, Path]) -> None:
    tmp, features = deployed
    changed = tmp / "changed" / "features.py"
    changed.parent.mkdir()
    (changed.parent / "txn.avsc").write_text((features.parent / "txn.avsc").read_text())
    changed.write_text(
        features.read_text()
        .replace('count(window="30m"),', 'count(window="30m"), max("amount", window="1d"),')
        .replace('spend[["mean_amount_1d"]], signals', "spend, signals")
    )
    with (
        FeatureClient(tmp / "state", features=changed) as client,
        pytest.raises(
            MissingFeatureError,
            match=r"\['amount_max_1d'\] of view 'spend' are not in its live version v1",
        ),
    ):
        client.get_service("fraud", row(), at=AT)


def test_no_recorded_definitions(tmp_path: Path, deployed: tuple[Path, Path]) -> None:
    tmp, _ = deployed
    with FeatureClient(tmp / "state") as client:  # flows.run recorded the definitions
        assert "signals__ratio" in client.get_service("fraud", row(), at=AT)
    record = tmp / "state" / "definitions" / "CURRENT"
    saved = record.read_bytes()
    record.unlink()
    try:
        with (
            FeatureClient(tmp / "state") as client,
            pytest.raises(
                UnknownServiceError, match=r"no feature definitions are recorded.*features=FILE"
            ),
        ):
            client.get_service("fraud", row(), at=AT)
    finally:
        record.write_bytes(saved)
    assert issubclass(UnknownServiceError, StateError)
