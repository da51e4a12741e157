"""flows.runplan: which view version each view is written to (continue, new, rebuilt, an
unfinished build reused), where each source partition resumes and where it stops, and the
partition keys a process lists to bytewax. Real view stores and warehouses in tmp_path."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from connectors.segments import Warehouse
from flows.cluster import Cluster
from flows.ingest import ingest_table
from flows.runplan import (
    FlowPlan,
    SourcePlan,
    build_plan,
    caught_up,
    choose_targets,
    part_key,
    resume_points,
    split_part_key,
)
from flows.spec import FeatureView, Source, count, mean
from state.store import LogPosition, PartitionProgress, ViewStore
from tests.helpers import TXN_SCHEMA, make_events

SOURCE = Source("txns", TXN_SCHEMA, "user_id", "ts", partitions=3)
SPEND = FeatureView("spend", SOURCE, [count(window="30m"), mean("amount", window="1h")])
CHANGED = FeatureView("spend", SOURCE, [count(window="45m", hop="15m")])
CHANNELS = FeatureView("channels", SOURCE, [count()])


def progress(
    offset: int, watermark: int | None = None, others: dict[int, LogPosition] | None = None
) -> PartitionProgress:
    """A shard's progress: `offset` in its own partition, `others` in the other partitions."""
    return PartitionProgress(offset, watermark, offset + 1, 0, others or {})


# --- partition keys and positions ---------------------------------------------------------------


@pytest.mark.parametrize(("source", "partition"), [("txns", 0), ("txns", 12), ("a/pb", 3)])
def test_part_keys_round_trip(source: str, partition: int) -> None:
    assert split_part_key(part_key(source, partition)) == (source, partition)
    assert part_key("txns", 7) == "txns/p0007"


def test_a_shard_has_caught_up_when_every_partition_reached_the_start_end() -> None:
    shard = progress(9, others={0: LogPosition(4, None)})
    assert caught_up(shard, 1, {1: 10, 0: 5})
    assert not caught_up(shard, 1, {1: 11, 0: 5})
    assert not caught_up(shard, 1, {1: 10, 0: 5, 2: 1})  # nothing of partition 2 yet
    assert caught_up(shard, 1, {1: 10, 0: 5, 2: 0})  # partition 2 is empty


def test_partitions_resume_after_the_lowest_position_any_shard_applied() -> None:
    spend = {
        0: progress(9, 900, {1: LogPosition(3, 300), 2: LogPosition(5, 500)}),
        1: progress(19, 1900, {0: LogPosition(7, 700), 2: LogPosition(6, 600)}),
    }
    channels = {
        0: progress(4, 400, {1: LogPosition(8, 800), 2: LogPosition(5, 550)}),
        1: progress(29, 2900, {0: LogPosition(2, 200), 2: LogPosition(1, 100)}),
    }
    start, marks = resume_points([spend, channels], partitions=3)
    assert start == {0: 3, 1: 4, 2: 2}
    assert marks == {0: 200, 1: 300, 2: 100}
    nothing = PartitionProgress(-1, None, 0, 0)  # a shard that has applied nothing yet
    assert resume_points([{0: progress(5, 50), 1: nothing}], 2) == (
        {0: 0, 1: 0},
        {0: None, 1: None},
    )
    assert resume_points([], partitions=2) == ({0: 0, 1: 0}, {0: None, 1: None})


# --- choosing view versions ---------------------------------------------------------------------


def test_a_new_view_gets_a_version_that_goes_live_once_caught_up(tmp_path: Path) -> None:
    store = ViewStore(tmp_path)
    (target,) = choose_targets(store, [SPEND], rebuild=False)
    assert (target.version, target.switch_when_caught_up) == (1, True)
    assert target.layout == SPEND.layout()
    assert store.current_version("spend") is None


def test_an_unchanged_live_view_continues_and_a_changed_one_is_rebuilt_beside_it(
    tmp_path: Path,
) -> None:
    store = ViewStore(tmp_path)
    store.switch("spend", choose_targets(store, [SPEND], rebuild=False)[0].version)
    (same,) = choose_targets(store, [SPEND], rebuild=False)
    assert (same.version, same.switch_when_caught_up) == (1, False)
    (changed,) = choose_targets(store, [CHANGED], rebuild=False)
    assert (changed.version, changed.switch_when_caught_up) == (2, True)
    (again,) = choose_targets(store, [CHANGED], rebuild=False)  # the unfinished build, reused
    assert again.version == 2
    (rebuilt,) = choose_targets(store, [SPEND], rebuild=True)  # flows.replay: always new
    assert (rebuilt.version, rebuilt.switch_when_caught_up) == (3, True)
    assert store.versions("spend") == [1, 2, 3]
    assert store.current_version("spend") == 1


def test_runs_planning_at_once_on_a_new_state_directory_share_one_version(
    tmp_path: Path,
) -> None:
    """Two flows.run started together must not both create a version (both would then write
    the view, or one would crash renaming onto the other's directory): the second plans after
    the first and finds its unfinished version; claiming it then refuses one of them. Two
    replays at once each get their own new version."""
    for attempt in range(10):
        store = ViewStore(tmp_path / f"s{attempt}")
        start = threading.Barrier(6)

        def plan(rebuild: bool, store: ViewStore = store, start: threading.Barrier = start) -> int:
            start.wait()
            return choose_targets(store, [SPEND], rebuild=rebuild)[0].version

        with ThreadPoolExecutor(6) as pool:
            assert set(pool.map(plan, [False] * 6)) == {1}
        assert store.versions("spend") == [1]
        start.reset()
        with ThreadPoolExecutor(6) as pool:
            assert sorted(pool.map(plan, [True] * 6)) == [2, 3, 4, 5, 6, 7]
        assert store.versions("spend") == [1, 2, 3, 4, 5, 6, 7]


def test_other_cluster_processes_take_the_version_process_0_created(tmp_path: Path) -> None:
    store = ViewStore(tmp_path)
    created = choose_targets(store, [SPEND], rebuild=False)
    taken = choose_targets(ViewStore(tmp_path), [SPEND], rebuild=False, create=False)
    assert taken == created
    assert store.versions("spend") == [1]


# --- the whole plan over a warehouse -------------------------------------------------------------


@pytest.fixture
def warehouse(tmp_path: Path) -> Path:
    """A warehouse with 600 events of `txns` over its 3 partitions."""
    root = tmp_path / "wh"
    ingest_table(SOURCE, make_events(600, 20, seed=3), Warehouse(root))
    return root


def ends(warehouse: Path) -> dict[int, int]:
    wh = Warehouse(warehouse)
    return {p: sum(batch.num_rows for batch in wh.read("txns", p)) for p in range(3)}


def test_a_plan_reads_every_partition_from_the_start_to_its_end(
    tmp_path: Path, warehouse: Path
) -> None:
    plan = build_plan(
        [SPEND, CHANNELS],
        warehouse=warehouse,
        state=tmp_path / "state",
        kafka=None,
        until_caught_up=True,
    )
    (source,) = plan.sources.values()
    assert isinstance(source, SourcePlan)
    assert [(t.view.name, t.version, t.switch_when_caught_up) for t in source.targets] == [
        ("spend", 1, True),
        ("channels", 1, True),
    ]
    assert source.start == {0: 0, 1: 0, 2: 0}
    assert source.stop == source.catch_up == ends(warehouse)
    assert sum(source.catch_up.values()) == 600
    assert source.arrow_schema.names == ["user_id", "ts", "amount", "channel"]
    assert (source.key, source.timestamp, source.kafka, source.rekeyed) == (
        "user_id",
        "ts",
        None,
        (),
    )
    assert plan.part_keys() == plan.owned_part_keys() == ["txns/p0000", "txns/p0001", "txns/p0002"]
    assert plan.resume_at("txns", 2) == LogPosition(-1, None)
    assert not plan.watch_versions


def test_a_following_plan_has_no_stop_and_watches_for_replays(
    tmp_path: Path, warehouse: Path
) -> None:
    plan = build_plan(
        [SPEND], warehouse=warehouse, state=tmp_path / "s", kafka=None, until_caught_up=False
    )
    assert plan.sources["txns"].stop is None
    assert plan.watch_versions


def test_a_new_view_over_an_empty_log_is_live_at_once(tmp_path: Path) -> None:
    plan = build_plan(
        [SPEND], warehouse=tmp_path / "wh", state=tmp_path / "s", kafka=None, until_caught_up=True
    )
    (target,) = plan.sources["txns"].targets
    assert not target.switch_when_caught_up  # nothing to read: no shard will ever report it
    assert plan.sources["txns"].stop == {0: 0, 1: 0, 2: 0}
    assert ViewStore(tmp_path / "s").current_version("spend") == 1


def test_a_plan_resumes_after_what_the_shards_committed(tmp_path: Path, warehouse: Path) -> None:
    state = tmp_path / "state"
    first = build_plan([SPEND], warehouse=warehouse, state=state, kafka=None, until_caught_up=True)
    store = ViewStore(state)
    applied = {
        0: progress(4, 1000, {1: LogPosition(9, 1100), 2: LogPosition(2, 1200)}),
        1: progress(12, 2000, {0: LogPosition(6, 600), 2: LogPosition(3, 1300)}),
        2: progress(7, 3000, {0: LogPosition(5, 500), 1: LogPosition(10, 1000)}),
    }
    for shard, shard_progress in applied.items():
        part = store.open_partition("spend", 1, shard)
        part.commit({}, shard_progress)
        part.close()
    again = build_plan([SPEND], warehouse=warehouse, state=state, kafka=None, until_caught_up=True)
    source = again.sources["txns"]
    assert source.targets == first.sources["txns"].targets  # the same version, still building
    assert source.start == {0: 5, 1: 10, 2: 3}
    assert source.start_watermark == {0: 1000, 1: 1100, 2: 1200}
    assert again.resume_at("txns", 1) == LogPosition(9, 1100)


def test_a_cluster_process_lists_only_the_shards_it_owns(tmp_path: Path, warehouse: Path) -> None:
    plan = build_plan(
        [SPEND], warehouse=warehouse, state=tmp_path / "s", kafka=None, until_caught_up=True
    )
    second = FlowPlan(plan.warehouse, plan.state, plan.sources, cluster=Cluster(1, 2))
    assert second.owned_part_keys() == ["txns/p0001"]
    assert second.part_keys() == plan.part_keys()
