"""POST /v1/services/{service} over real HTTP: a feature service's rows equal
`FeatureClient.get_service_many` for the same rows and `at`; a missing request field, a value of
the wrong type, a row that is not an object are 400s, an unknown service a 404, too many rows a
413."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from state.client import FeatureClient
from tests.helpers import MINUTE, make_events, run_command, write_definitions
from tests.serve_helpers import Http, serving

SERVICE = """

import pyarrow.compute as pc

from flows.spec import FeatureService, RequestSource, on_demand

payment = RequestSource(name="payment", schema={"amount": "double", "channel": "string"})


@on_demand(sources=[payment, spend], outputs={"amount_vs_mean": "double"})
def signals(rows):
    return {"amount_vs_mean": pc.subtract(rows["amount"], rows["spend__amount_mean_1d"])}


fraud = FeatureService(name="fraud", features=[spend[["count", "amount_mean_1d"]], channels,
                                               signals])
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Http, Path, Path, int]]:
    root = tmp_path_factory.mktemp("serve-services")
    features = write_definitions(root / "defs")
    features.write_text(features.read_text() + SERVICE)
    events = make_events(1500, 8, seed=9)
    pq.write_table(events, root / "e.parquet")
    common = ["--features", str(features), "--warehouse", str(root / "wh")]
    assert run_command("flows.ingest", *common, str(root / "e.parquet")).returncode == 0
    result = run_command("flows.run", *common, "--state", str(root / "state"), "--until-caught-up")
    assert result.returncode == 0, result.stderr
    newest = int(events.column("ts").cast(pa.int64()).to_numpy().max())
    state = root / "state"
    with serving(state, "--features", str(features), "--batch-limit", "10") as server:
        http = server.http()
        yield http, state, features, newest
        http.close()


def rows(n: int) -> list[dict[str, object]]:
    return [
        {"user_id": f"user{i}", "amount": 10.0 * i, "channel": ["web", "pos"][i % 2]}
        for i in range(n)
    ]


def test_service_rows_equal_the_client(served: tuple[Http, Path, Path, int]) -> None:
    http, state, features, newest = served
    at = (newest + 5 * MINUTE) / 1e6
    request = [*rows(9), {"user_id": "nobody", "amount": 1.0, "channel": "atm"}]
    with FeatureClient(state, features=features) as client:
        expected = client.get_service_many("fraud", request, at=at)
    answer = http.post("/v1/services/fraud", {"rows": request, "at": at})
    assert answer.status == 200, answer.body
    assert answer.json() == {"rows": expected}
    assert list(expected[0]) == [
        "spend__count",
        "spend__amount_mean_1d",
        "channels__channel_distinct_count_1d",
        "channels__channel_last_1h",
        "channels__avg_amount_6h",
        "signals__amount_vs_mean",
    ]
    assert http.post("/v1/services/fraud", {"rows": []}).json() == {"rows": []}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"rows": [{"user_id": "user1", "channel": "web"}]}, 400, "amount"),
        ({"rows": [{"amount": 1.0, "channel": "web"}]}, 400, "user_id"),
        ({"rows": [{"user_id": "user1", "amount": "ten", "channel": "web"}]}, 400, "amount"),
        ({"rows": [["user1", 1.0]]}, 400, "rows[0] is an array"),
        ({"rows": {"user_id": "u1"}}, 400, '"rows" is an object'),
        ({"keys": ["user1"]}, 400, "unknown field(s) ['keys']"),
        ({"rows": rows(1), "at": "noon"}, 400, "is not ISO-8601 time"),
        ({"rows": rows(11)}, 413, "11 rows in one request is past the batch limit of 10"),
    ],
)
def test_service_errors(
    served: tuple[Http, Path, Path, int], body: object, status: int, message: str
) -> None:
    answer = served[0].post("/v1/services/fraud", body)
    assert answer.status == status, answer.body
    assert message in answer.error


def test_unknown_service_is_404(served: tuple[Http, Path, Path, int]) -> None:
    answer = served[0].post("/v1/services/nope", {"rows": rows(1)})
    assert answer.status == 404
    assert "unknown feature service 'nope'" in answer.error
    assert "'fraud'" in answer.error  # names the services that exist
