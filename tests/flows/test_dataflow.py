"""flows.dataflow through bytewax's testing entry points: `run_main` (one worker) and
`cluster_main` (one process of two worker threads). The input is the production one (LogSource
over the warehouse's segments) or bytewax's `TestingSource` handing the same log over in small
batches, interleaved across partitions. Either way every view equals the DuckDB oracle."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from itertools import zip_longest
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pytest
from bytewax.testing import TestingSource, cluster_main, run_main

from connectors.log import LogBatch, PartitionLog
from connectors.segments import Warehouse
from flows import dataflow
from flows.dataflow import FlowControl, build_dataflow
from flows.ingest import ingest_table
from flows.runplan import FlowPlan, build_plan, part_key
from flows.spec import Definitions, load_definitions
from state.client import FeatureClient
from state.store import ViewStore
from tests.helpers import MINUTE, make_events, write_definitions
from tests.oracle import mismatches, oracle_values

PARTITIONS = 3


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Definitions, pa.Table]:
    """3000 events of 30 users in a warehouse of 3 partitions, and the log as it holds them."""
    root = tmp_path_factory.mktemp("dataflow")
    defs = load_definitions(write_definitions(root / "defs", partitions=PARTITIONS))
    warehouse = Warehouse(root / "wh")
    ingest_table(defs.sources["txns"], make_events(3000, 30, seed=8), warehouse)
    parts = [pa.Table.from_batches(list(warehouse.read("txns", p))) for p in range(PARTITIONS)]
    return root, defs, pa.concat_tables(parts)


def plan_for(root: Path, defs: Definitions, state: Path) -> FlowPlan:
    views = list(defs.views.values())
    return build_plan(views, warehouse=root / "wh", state=state, kafka=None, until_caught_up=True)


def run(plan: FlowPlan, workers: int) -> None:
    control = FlowControl()
    flow = build_dataflow(plan, control)
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    assert control.failures == []


def small_batches(plan: FlowPlan, rows: int) -> Iterator[tuple[str, LogBatch]]:
    """The whole log in batches of `rows`, taking turns between partitions, keyed as LogSource
    keys them."""
    source = plan.sources["txns"]

    def batches(partition: int) -> Iterator[tuple[str, LogBatch]]:
        log = PartitionLog(
            Warehouse(plan.warehouse),
            "txns",
            partition,
            0,
            source.arrow_schema,
            stop_at=source.catch_up[partition],
            batch_rows=rows,
        )
        while (batch := log.read()) is not None:
            yield part_key("txns", partition), batch
        log.close()

    for turn in zip_longest(*(batches(p) for p in source.start)):
        yield from (item for item in turn if item is not None)


def assert_views_equal_the_oracle(state: Path, defs: Definitions, log: pa.Table) -> None:
    store = ViewStore(state, create=False)
    assert {view: store.current_version(view) for view in defs.views} == {
        "spend": 1,
        "channels": 1,
    }
    newest = int(log.column("ts").cast(pa.int64()).to_numpy().max())
    keys = [*sorted(set(log.column("user_id").to_pylist())), "nobody"]
    with FeatureClient(state) as client:
        for t in (newest + 1, newest + 17 * MINUTE):
            spine = pa.table({"row": range(len(keys)), "k": keys, "t": [t] * len(keys)})
            for name, layout in defs.layouts.items():
                got = client.get_many(name, keys, at=t / 1e6)
                assert mismatches(layout, oracle_values(layout, log, spine), got) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_the_log_source_through_the_testing_entry_points(
    log: tuple[Path, Definitions, pa.Table], tmp_path: Path, workers: int
) -> None:
    root, defs, events = log
    run(plan_for(root, defs, tmp_path / "state"), workers)
    assert_views_equal_the_oracle(tmp_path / "state", defs, events)


@pytest.mark.parametrize("workers", [1, 2])
def test_small_interleaved_batches_from_the_testing_source(
    log: tuple[Path, Definitions, pa.Table],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    workers: int,
) -> None:
    """The input is the seam: bytewax's TestingSource stands in for LogSource and hands over
    the log 97 records at a time, the partitions taking turns."""
    root, defs, events = log
    plan = plan_for(root, defs, tmp_path / "state")
    batches = list(small_batches(plan, rows=97))
    assert len(batches) > 3 * PARTITIONS
    assert sum(batch.events.num_rows for _, batch in batches) == events.num_rows
    monkeypatch.setattr(dataflow, "LogSource", lambda plan, control: TestingSource(batches))
    run(plan, workers)
    assert_views_equal_the_oracle(tmp_path / "state", defs, events)


class _RecordingBudget(dataflow.RowBudget):
    """The row budget, recording the most rows in flight and how often a read had to wait."""

    most: ClassVar[int] = 0
    waits: ClassVar[int] = 0
    budgets: ClassVar[list[_RecordingBudget]] = []

    def __init__(self, rows: int) -> None:
        super().__init__(rows)
        self.budgets.append(self)

    def reserve(self, part: str, expected: int) -> bool:
        admitted = super().reserve(part, expected)
        type(self).waits += not admitted
        return admitted

    def settle(self, part: str, expected: int, read: int) -> None:
        super().settle(part, expected, read)
        type(self).most = max(type(self).most, self.in_flight)


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_read_under_the_row_budget(
    log: tuple[Path, Definitions, pa.Table],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    workers: int,
) -> None:
    """Batches of 150 records: a partition reads its next batch only when the rows in flight
    (read, not yet applied) leave room for it, and every row taken is given back."""
    root, defs, events = log
    plan = replace(plan_for(root, defs, tmp_path / "state"), batch_rows=150)
    monkeypatch.setattr(dataflow, "RowBudget", _RecordingBudget)
    monkeypatch.setattr(_RecordingBudget, "budgets", [])
    monkeypatch.setattr(_RecordingBudget, "most", 0)
    monkeypatch.setattr(_RecordingBudget, "waits", 0)
    control = FlowControl()
    flow = dataflow.build_dataflow(plan, control, workers)
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    assert control.failures == []
    assert_views_equal_the_oracle(tmp_path / "state", defs, events)
    (budget,) = [b for b in _RecordingBudget.budgets if b.rows]  # FlowControl's first is 0
    assert budget.rows == 150 * workers
    assert budget.in_flight == 0
    assert 0 < _RecordingBudget.most <= 2 * budget.rows  # a read's rows are settled after it
    assert _RecordingBudget.waits > 0
