"""Issue 10: views keyed by any column or tuple of columns of their source (or of the columns
their transform adds), re-partitioned by that key in the dataflow. Online reads and the
snapshot both equal an independent DuckDB oracle, with 1 and 2 workers, and nulls in key parts
become dead letters of that view only."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from connectors.deadletters import read_dead_letters
from connectors.segments import Warehouse
from flows.aggregate import key_column
from flows.ingest import ingest_table
from flows.snapshot import build_snapshot, read_log
from flows.spec import Definitions, load_definitions
from state.client import FeatureClient
from state.codec import key_text
from state.layout import ViewLayout
from tests.helpers import MINUTE, make_events, run_command, write_definitions
from tests.oracle import mismatches, oracle_values

REKEYED = """

def with_flags(table):
    import pyarrow.compute as pc
    amount = table.column("amount")
    table = table.append_column("big", pc.greater(amount, 50.0))
    return table.append_column("cents", pc.multiply(amount, 100.0))


by_channel = FeatureView(name="by_channel", source=txns, key="channel", features=[
    count(window="1h"), sum("amount", window="1d"), last("user_id"),
    distinct_count("user_id", window="1d"),
])
user_channel = FeatureView(name="user_channel", source=txns, key=("user_id", "channel"),
                           features=[count(), mean("amount", window="6h"),
                                     max("amount", window="1d")])
flagged = FeatureView(name="flagged", source=txns, key=("channel", "big"), transform=with_flags,
                      columns={"big": "boolean", "cents": "double"},
                      features=[count(window="2h"), sum("cents", window="1d"), last("user_id")])
"""
VIEWS = ("spend", "by_channel", "user_channel", "flagged")


def deploy(tmp: Path, workers: int) -> tuple[Definitions, pa.Table]:
    features = write_definitions(tmp / "defs", partitions=3)
    features.write_text(features.read_text() + REKEYED)
    defs = load_definitions(features)
    ingest_table(defs.sources["txns"], make_events(6000, 40, seed=23), Warehouse(tmp / "wh"))
    result = run_command(
        "flows.run",
        *("--features", str(features), "--warehouse", str(tmp / "wh")),
        *("--state", str(tmp / "state"), "--until-caught-up", "--workers", str(workers)),
        *("--views", ",".join(VIEWS)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    log = pa.concat_tables(read_log(defs.sources["txns"], Warehouse(tmp / "wh"), None))
    return defs, log


def oracle_input(defs: Definitions, view: str, log: pa.Table) -> tuple[ViewLayout, pa.Table]:
    """The view's events as plain rows with their key text in column `kk`, and a layout that
    reads that column: what the oracle knows of keys (no routing, no tiles)."""
    spec, layout = defs.views[view], defs.layouts[view]
    events = spec.transform(log) if spec.transform else log
    keys = key_column(events, layout.key_columns)
    events = events.filter(keys.is_valid()).append_column("kk", keys.filter(keys.is_valid()))
    return dataclasses.replace(layout, key="kk", keys=()), events


def key_values(layout: ViewLayout, events: pa.Table) -> list[Any]:
    """Every distinct key of the view as the client takes it (a value, or a tuple), plus one
    that has no events."""
    rows = events.select(list(layout.key_columns)).to_pylist()
    keys = {tuple(r[c] for c in layout.key_columns) for r in rows}
    keys = {k for k in keys if None not in k}
    unknown = tuple("nobody" if isinstance(k, str) else k for k in next(iter(keys)))
    found = [*sorted(keys, key=str), unknown]
    return [k[0] for k in found] if len(layout.key_columns) == 1 else found


@pytest.mark.parametrize("workers", [1, 2])
def test_rekeyed_views_online_and_offline_equal_sql(tmp_path: Path, workers: int) -> None:
    defs, log = deploy(tmp_path, workers)
    t = int(log.column("ts").cast(pa.int64()).to_numpy().max()) + 5 * MINUTE
    for view in VIEWS:
        layout, events = oracle_input(defs, view, log)
        keys = key_values(defs.layouts[view], events)
        texts = [key_text(k if isinstance(k, tuple) else (k,)) for k in keys]
        spine = pa.table({"row": range(len(keys)), "k": texts, "t": [t] * len(keys)})
        expected = oracle_values(layout, events, spine)
        with FeatureClient(tmp_path / "state") as client:
            online = client.get_many(view, keys, at=t / 1e6)
        assert mismatches(layout, expected, online) == [], view

        columns = defs.layouts[view].key_columns
        parts = {c: [k if len(columns) == 1 else k[i] for k in keys] for i, c in enumerate(columns)}
        spine_file = pa.table({**parts, "ts": pa.array([t] * len(keys)).cast(pa.int64())})
        spine_file = spine_file.set_column(
            len(columns), "ts", pc.cast(spine_file.column("ts"), pa.timestamp("us", tz="UTC"))
        )
        snap = build_snapshot([defs.views[view]], spine_file, Warehouse(tmp_path / "wh"))
        offline = [
            {f.name: row[f"{view}__{f.name}"] for f in layout.features} for row in snap.to_pylist()
        ]
        assert mismatches(layout, expected, offline) == [], view


def test_a_null_key_part_is_a_dead_letter_of_that_view_only(tmp_path: Path) -> None:
    _defs, log = deploy(tmp_path, 1)
    reasons = read_dead_letters(tmp_path / "wh", "txns").column("reason").to_pylist()
    null_channel = log.column("channel").null_count
    null_big = pc.sum(pc.and_(log.column("amount").is_null(), log.column("channel").is_valid()))
    by_view = {v: sum(r.startswith(f"view {v!r}: key column") for r in reasons) for v in VIEWS}
    assert by_view == {
        "spend": 0,
        "by_channel": null_channel,
        "user_channel": null_channel,
        "flagged": null_channel + null_big.as_py(),
    }
    assert any("'big'" in r for r in reasons if r.startswith("view 'flagged'"))
