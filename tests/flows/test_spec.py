"""flows.spec, the definitions API: durations and default hops, the default names of features,
and every `DefinitionError` it raises, each with the value it names and the fix it gives."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flows.errors import DefinitionError
from flows.spec import (
    Aggregation,
    FeatureService,
    FeatureView,
    RequestSource,
    Source,
    count,
    default_hop,
    distinct_count,
    first,
    format_duration,
    last,
    last_k,
    load_definitions,
    max,
    mean,
    min,
    on_demand,
    parse_duration,
    percentile,
    std,
    sum,
    var,
)
from flows.spec.services import OnDemand
from tests.helpers import DAY, HOUR, MINUTE, SCHEMA_JSON, write_definitions

SECOND = 1_000_000
SCHEMA: dict[str, Any] = json.loads(SCHEMA_JSON)  # user_id, ts, amount (double), channel
SOURCE = Source("txns", SCHEMA, "user_id", "ts")
VIEW = FeatureView("spend", SOURCE, [count(window="30m"), sum("amount", window="1h")])
REQUEST = RequestSource("req", {"x": "double"})
ODD_SCHEMA = {  # a vector and a field type that features cannot aggregate
    **SCHEMA,
    "fields": [
        *SCHEMA["fields"],
        {"name": "emb", "type": {"type": "array", "items": "float"}},
        {"name": "blob", "type": "bytes"},
    ],
}


def identity(rows: Any) -> Any:
    return rows


# --- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "us"),
    [
        ("45s", 45 * SECOND),
        ("30m", 30 * MINUTE),
        ("1h", HOUR),
        ("14d", 14 * DAY),
        (" 2 h ", 2 * HOUR),
        (90, 90 * SECOND),  # an int is seconds
        ("36525d", 36_525 * DAY),  # 100 years: the longest window
    ],
)
def test_durations_parse_to_microseconds(text: str | int, us: int) -> None:
    assert parse_duration(text) == us


@pytest.mark.parametrize(
    ("us", "text"),
    [(14 * DAY, "14d"), (36 * HOUR, "36h"), (90 * MINUTE, "90m"), (61 * SECOND, "61s")],
)
def test_durations_format_to_their_shortest_exact_spelling(us: int, text: str) -> None:
    assert format_duration(us) == text
    assert parse_duration(text) == us


@pytest.mark.parametrize(
    ("window", "hop"),
    [
        (MINUTE, MINUTE),
        (6 * HOUR, MINUTE),
        (6 * HOUR + SECOND, HOUR),
        (30 * DAY, HOUR),
        (30 * DAY + HOUR, DAY),
        (365 * DAY, DAY),
    ],
)
def test_default_hops_grow_with_the_window(window: int, hop: int) -> None:
    assert default_hop(window) == hop


# --- default names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("feature", "name", "window_us", "hop_us"),
    [
        (count(), "count", 0, 0),
        (count(window="30m"), "count_30m", 30 * MINUTE, MINUTE),
        (count("amount", window="1440m"), "amount_count_1d", DAY, HOUR),
        (sum("amount", window="2h", hop="10m"), "amount_sum_2h", 2 * HOUR, 10 * MINUTE),
        (mean("amount", window="14d"), "amount_mean_14d", 14 * DAY, HOUR),
        (min("amount", window="90d"), "amount_min_90d", 90 * DAY, DAY),
        (max("amount"), "amount_max", 0, 0),
        (var("amount", window=3600), "amount_var_1h", HOUR, MINUTE),
        (std("amount", window="1d"), "amount_std_1d", DAY, HOUR),
        (first("channel"), "channel_first", 0, 0),
        (last("channel", window="1h"), "channel_last_1h", HOUR, MINUTE),
        (last_k("channel", 3, window="1d"), "channel_last3_1d", DAY, HOUR),
        (distinct_count("channel"), "channel_distinct_count", 0, 0),
        (percentile("amount", 0.9, window="1d"), "amount_p90_1d", DAY, HOUR),
        (percentile("amount", 0.999), "amount_p99_9", 0, 0),
        (percentile("amount", 0.5, name="median"), "median", 0, 0),
    ],
)
def test_features_resolve_to_default_names_windows_and_hops(
    feature: Aggregation, name: str, window_us: int, hop_us: int
) -> None:
    resolved = feature.resolve("spend")
    assert (resolved.name, resolved.window_us, resolved.hop_us) == (name, window_us, hop_us)


def test_a_view_lists_its_feature_names_in_order() -> None:
    assert VIEW.feature_names() == ("count_30m", "amount_sum_1h")
    assert VIEW[["amount_sum_1h", "count_30m", "amount_sum_1h"]].feature_names() == (
        "amount_sum_1h",
        "count_30m",
    )


# --- every DefinitionError ----------------------------------------------------------------------


def module(tmp_path: Path, text: str) -> Path:
    """A definitions module with `text` beside the txn.avsc schema."""
    (tmp_path / "txn.avsc").write_text(SCHEMA_JSON)
    path = tmp_path / "defs.py"
    path.write_text("from flows.spec import *\n" + text)
    return path


def touched(path: Path) -> Path:
    path.touch()
    return path


TXNS = 'txns = Source(name="txns", schema="txn.avsc", key="user_id", timestamp="ts")\n'
SPEND = 'spend = FeatureView(name="spend", source=txns, features=[count()])\n'
SAME_NAME = "b = FeatureService('s', [spend])\n"


def od(name: str, sources: list[Any], outputs: dict[str, str] | None = None) -> OnDemand:
    return on_demand(sources=sources, outputs=outputs or {"y": "double"}, name=name)(identity)


def service(*features: Any, **keys: Any) -> Callable[[Path], object]:
    return lambda _: FeatureService("svc", list(features), **keys).service_plan()


def view(*features: Aggregation, **options: Any) -> Callable[[Path], object]:
    name, source = options.pop("name", "v"), options.pop("source", SOURCE)
    return lambda _: FeatureView(name, source, list(features), **options).layout()


def source(**options: Any) -> Callable[[Path], object]:
    fields = {"name": "txns", "schema": SCHEMA, "key": "user_id", "timestamp": "ts", **options}
    return lambda _: Source(**fields).validate()


def schema_file(text: str | None) -> Callable[[Path], object]:
    def load(tmp_path: Path) -> object:
        if text is not None:
            (tmp_path / "txn.avsc").write_text(text)
        return Source("txns", "txn.avsc", "user_id", "ts", base_dir=tmp_path).avro_schema()

    return load


# One case per `raise DefinitionError` in flows/spec (test_every_raise_has_a_case counts them).
CASES: list[tuple[str, Callable[[Path], object], str]] = [
    # durations
    ("bool", lambda _: parse_duration(True, "window"), r"window True is not a duration"),
    ("not positive", lambda _: parse_duration(0, "hop"), r"hop 0 must be positive"),
    ("no unit", lambda _: parse_duration("soon"), r"'soon' is not a duration; write a positive"),
    ("too long", lambda _: parse_duration("36526d"), r"longer than 100 years; .* lifetime"),
    ("fraction", lambda _: format_duration(1500), r"1500 microseconds is not a whole number"),
    # aggregations
    ("lifetime hop", lambda _: count(hop="1m").resolve("v"), r"hop='1m' given for a lifetime"),
    (
        "hop not dividing",
        lambda _: count(window="1h", hop="7m").resolve("v"),
        r"view 'v', feature 'count': hop '7m' does not divide window '1h'",
    ),
    ("last_k k", lambda _: last_k("channel", 0), r"last_k\('channel', 0\): k must be an int"),
    ("percentile q", lambda _: percentile("amount", 1.5), r"q must be a fraction in \(0, 1\)"),
    # sources
    (
        "min_time",
        lambda _: Source("txns", SCHEMA, "user_id", "ts", min_time="yesterday").min_time_us(),
        r"source 'txns': min_time 'yesterday' is not an ISO-8601 time",
    ),
    ("schema not JSON", schema_file("{"), r"schema file .*txn.avsc is not valid JSON"),
    ("schema not object", schema_file("[]"), r"must hold one Avro record schema"),
    (
        "schema not record",
        lambda _: Source(
            "txns", {"type": "enum", "name": "E", "symbols": ["A"]}, "k", "t"
        ).field_types(),
        r"source 'txns': schema must be an Avro record with fields",
    ),
    ("source name", source(name="two words"), r"source name 'two words' must be letters"),
    ("partitions", source(partitions=0), r"partitions=0 must be a positive int"),
    ("missing key", source(key="merchant"), r"key field 'merchant' is not in the schema"),
    ("timestamp type", source(timestamp="amount"), r"timestamp field 'amount' has type 'double'"),
    (
        "source key type",
        source(key="amount"),
        r"key field 'amount' has type 'double'; use a string",
    ),
    ("schema missing", schema_file(None), r"Avro schema file 'txn.avsc' not found"),
    # views
    ("view name", view(count(), name="my-view"), r"view name 'my-view' must be a Python-style"),
    ("no features", view(), r"view 'v' has no features"),
    ("repeated", view(count(), count()), r"feature names \['count'\] are repeated"),
    ("columns alone", view(count(), columns={"x": "long"}), r"needs a transform= that adds"),
    (
        "column exists",
        view(count(), columns={"amount": "long"}, transform=identity),
        r"derived column 'amount' is already a field of source 'txns'",
    ),
    (
        "column type",
        view(count(), columns={"x": "decimal"}, transform=identity),
        r"derived column 'x' has type 'decimal'; use one of int",
    ),
    ("key twice", view(count(), key=("user_id", "user_id")), r"distinct columns"),
    ("key missing", view(count(), key="merchant"), r"key column 'merchant' is not a field"),
    ("view key type", view(count(), key="amount"), r"key column 'amount' has type 'double'; keys"),
    ("aggregation", view(Aggregation("median", "amount")), r"unknown aggregation 'median'"),
    ("no column", view(Aggregation("sum", None)), r"feature 'None_sum': sum needs a column"),
    ("unknown field", view(sum("merchant")), r"unknown field 'merchant'; the source has fields"),
    (
        "vector",
        view(sum("emb"), source=Source("txns", ODD_SCHEMA, "user_id", "ts")),
        r"sum cannot aggregate the vector column 'emb' \(array<float>\)",
    ),
    ("numeric", view(sum("channel")), r"sum needs a numeric column, but 'channel' is 'string'"),
    (
        "unaggregatable",
        view(count("blob"), source=Source("txns", ODD_SCHEMA, "user_id", "ts")),
        r"column 'blob' has type 'bytes', which features cannot aggregate",
    ),
    ("selection", lambda _: VIEW[[]].feature_names(), r"choose features by name"),
    ("selected", lambda _: VIEW[["nope"]].feature_names(), r"view 'spend' has no feature 'nope'"),
    # request sources
    ("request name", lambda _: RequestSource("1x", {"x": "double"}), r"'1x' must be a Python"),
    ("request schema", lambda _: RequestSource("r", {}), r"schema must be a dict of field"),
    ("request field", lambda _: RequestSource("r", {"a-b": "long"}), r"'a-b' must be an ident"),
    ("request type", lambda _: RequestSource("r", {"x": "decimal"}), r"type 'decimal', which"),
    # on-demand functions
    ("od name", lambda _: od("bad name", [REQUEST]), r"'bad name': the name must be a Python"),
    (
        "od function",
        lambda _: on_demand(sources=[REQUEST], outputs={"y": "double"})(42),  # type: ignore[arg-type]
        r"on-demand function 'on_demand': 42 is not a function",
    ),
    ("od sources", lambda _: od("f", []), r"function 'f' has no sources"),
    ("od source", lambda _: od("f", ["amount"]), r"source 0 is str 'amount', neither a"),
    (
        "od request twice",
        lambda _: od("f", [REQUEST, RequestSource("other", {"x": "long"})]),
        r"request field 'x' is declared 'double' and 'long' by two sources",
    ),
    ("od inputs", lambda _: od("f", [VIEW, VIEW]), r"input columns \['spend__amount_sum_1h'"),
    ("od outputs", lambda _: on_demand(sources=[REQUEST], outputs={})(identity), r"outputs must"),
    ("od output", lambda _: od("f", [REQUEST], {"a__b": "double"}), r"without '__'"),
    ("od type", lambda _: od("f", [REQUEST], {"y": "money"}), r"output 'y' has type 'money'"),
    # feature services
    (
        "service name",
        lambda _: FeatureService("my service", [VIEW]).service_plan(),
        r"feature service name 'my service' must be an identifier",
    ),
    ("service empty", service(), r"feature service 'svc' has no features"),
    (
        "service request",
        service(od("f", [REQUEST]), od("g", [RequestSource("r", {"x": "long"})])),
        r"request field 'x' is 'double' in one on-demand function and 'long' in 'g'",
    ),
    ("service item", service("spend"), r"str 'spend' is not a feature"),
    (
        "service views",
        service(VIEW, FeatureView("spend", SOURCE, [count()])),
        r"two different views are named 'spend'",
    ),
    ("service columns", service(VIEW, VIEW), r"output column\(s\) \['spend__amount_sum_1h'"),
    ("service clash", service(VIEW, od("spend", [VIEW])), r"function 'spend' has the name of a"),
    (
        "service key",
        service(VIEW, keys={"spend": ("a", "b")}),
        r"keys\['spend'\]=\('a', 'b'\) must name 1 request column",
    ),
    ("service keys", service(VIEW, keys=["spend"]), r"keys=\['spend'\] must be a dict of view"),
    ("service key view", service(VIEW, keys={"risk": "x"}), r"keys names view 'risk', which"),
    # loading a definitions module
    (
        "unknown service",
        lambda tmp: load_definitions(write_definitions(tmp)).service("fraud"),
        r"unknown feature service 'fraud' in .*; defined services: \(none\)",
    ),
    (
        "unknown view",
        lambda tmp: load_definitions(write_definitions(tmp)).select(["spend", "risk"]),
        r"unknown view\(s\) 'risk' in .*; defined views: spend, channels",
    ),
    ("no module", lambda tmp: load_definitions(tmp / "nope.py"), r"nope.py' not found; pass"),
    (
        "not Python",
        lambda tmp: load_definitions(touched(tmp / "defs.txt")),
        r"defs.txt' cannot be imported",
    ),
    (
        "definition at import",
        lambda tmp: load_definitions(module(tmp, "parse_duration('soon', 'window')\n")),
        r"definitions module .*defs.py: window 'soon' is not a duration",
    ),
    (
        "import fails",
        lambda tmp: load_definitions(module(tmp, "1 / 0\n")),
        r"defs.py failed to import: ZeroDivisionError: division by zero; fix the module",
    ),
    (
        "services twice",
        lambda tmp: load_definitions(
            module(tmp, TXNS + SPEND + "a = FeatureService('s', [spend])\n" + SAME_NAME)
        ),
        r"two feature services are named 's'; give each its own name",
    ),
    ("no view", lambda tmp: load_definitions(module(tmp, TXNS)), r"declares no FeatureView"),
    (
        "service in module",
        lambda tmp: load_definitions(module(tmp, TXNS + SPEND + "s = FeatureService('s', [])\n")),
        r"definitions module .*defs.py: feature service 's' has no features",
    ),
]


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_definition_error_names_the_value_and_the_fix(
    tmp_path: Path, make: Callable[[Path], object], message: str
) -> None:
    with pytest.raises(DefinitionError, match=message):
        make(tmp_path)


def test_every_raise_has_a_case() -> None:
    """A new `raise DefinitionError` in flows/spec needs its case in CASES."""
    package = Path(__file__).resolve().parents[2] / "flows" / "spec"
    raises = [re.findall(r"\braise DefinitionError\(", p.read_text()) for p in package.glob("*.py")]
    assert len(CASES) == len([r for found in raises for r in found])
