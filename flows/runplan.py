"""Planning a run: which view versions to write, and which log offsets to read for each.

A view whose stored layout equals its definition continues where it stopped. A new or changed
view gets a new version built from the start of the log beside the live one (the same dataflow,
the same code path) and becomes live when it has caught up: that is the Kappa backfill.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from connectors.avro import arrow_schema
from connectors.log import BATCH_BYTES, BATCH_ROWS, KafkaTail, PartitionLog
from connectors.segments import Warehouse
from flows.cluster import Cluster, ClusterStarts, Publication, publish
from flows.errors import ConfigError
from flows.schemas import field_defaults, schema_store
from flows.shards import Rekeyed
from flows.spec import FeatureView, Source
from flows.validate import EventRules
from state.layout import ViewLayout
from state.store import (
    LogPosition,
    PartitionProgress,
    ViewStore,
    exclusive,
    read_partition_progress,
)


@dataclass(frozen=True)
class ViewTarget:
    """A view version the flow writes; `switch_when_caught_up` makes it live at the end."""

    view: FeatureView
    layout: ViewLayout
    version: int
    switch_when_caught_up: bool = False


@dataclass(frozen=True)
class SourcePlan:
    """One source's partitions: where to start, where to stop, and the views fed from it."""

    name: str
    key: str
    timestamp: str
    arrow_schema: pa.Schema
    targets: tuple[ViewTarget, ...]
    start: dict[int, int]  # partition -> first offset to read
    stop: dict[int, int] | None  # partition -> offset to stop at (exclusive); None = follow
    catch_up: dict[int, int]  # partition -> end of the log when the flow started
    kafka: KafkaTail | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # for fields added to the schema
    start_watermark: dict[int, int | None] = field(default_factory=dict)  # at start, per partition
    rekeyed: tuple[Rekeyed, ...] = ()  # the views with their own key (routed by it)
    rules: EventRules | None = None  # what records must satisfy (default: key and time present)

    @property
    def event_rules(self) -> EventRules:
        return self.rules or EventRules(self.name, self.key, self.timestamp)


@dataclass(frozen=True)
class FlowPlan:
    """Everything the dataflow needs, as plain data; built by flows.run / flows.replay
    (`build_plan`). What changes while the flow runs (stop, restart, failures, metrics) is the
    dataflow's `FlowControl`, not part of the plan."""

    warehouse: str | Path  # a directory or an object-store URI
    state: Path
    sources: dict[str, SourcePlan]
    kafka_bootstrap: str | None = None
    batch_rows: int = BATCH_ROWS  # records per replay batch from segments (memory vs speed)
    batch_bytes: int = BATCH_BYTES  # and bytes of them (Arrow, as read)
    watch_versions: bool = False  # follow mode: restart when a replay switches a live view
    cluster: Cluster = field(default_factory=Cluster)  # this process's place in the cluster
    starts: ClusterStarts | None = None  # separate state dirs: resume points of the cluster

    def part_keys(self) -> list[str]:
        return sorted(part_key(s, p) for s, plan in self.sources.items() for p in plan.start)

    def owned_part_keys(self) -> list[str]:
        """The partitions this process lists to bytewax (log reader and view shard alike):
        in a cluster only the shards it owns (flows.cluster), so the mapping is ours."""
        return [k for k in self.part_keys() if self.cluster.owns(split_part_key(k)[1])]

    def resume_at(self, source: str, partition: int) -> LogPosition:
        """The position a source partition resumes after: the lowest any view shard applied
        (of the whole cluster when each process has its own state directory)."""
        sp = self.sources[source]
        if self.starts is None:
            return LogPosition(sp.start[partition] - 1, sp.start_watermark.get(partition))
        versions = {t.view.name: t.version for t in sp.targets}
        return self.starts.position(source, versions, partition)


def caught_up(progress: PartitionProgress, shard: int, ends: dict[int, int]) -> bool:
    """A shard has applied every source partition up to the log's end as of the start."""
    return all(progress.position(p, shard).offset + 1 >= end for p, end in ends.items())


def part_key(source: str, partition: int) -> str:
    return f"{source}/p{partition:04d}"


def split_part_key(key: str) -> tuple[str, int]:
    source, _, part = key.rpartition("/p")
    return source, int(part)


def choose_targets(
    store: ViewStore,
    views: Sequence[FeatureView],
    *,
    rebuild: bool,
    create: bool = True,
) -> list[ViewTarget]:
    """The version each view is written to; `rebuild` forces a new version (flows.replay).

    With `create=False` (every process of a cluster but the first) a needed new version is
    waited for, not created, so that all processes write the same version.
    """
    if not create:
        return [_choose_target(store, view, rebuild=rebuild, create=False) for view in views]
    with exclusive(store.root / PLAN_LOCK):  # two runs starting at once: one creates, the other
        return [_choose_target(store, view, rebuild=rebuild, create=True) for view in views]


PLAN_LOCK = "PLAN.lock"  # held while a run or replay chooses (and creates) its versions


def _choose_target(
    store: ViewStore, view: FeatureView, *, rebuild: bool, create: bool
) -> ViewTarget:
    layout = view.layout()
    current = store.current_version(view.name)
    if (
        not rebuild
        and current is not None
        and store.layout(view.name, current).same_semantics(layout)
    ):
        return ViewTarget(view, layout, current)
    pending = _pending_versions(store, view.name, layout, current)
    if not create:
        version = _wait_for_version(store, view.name, layout, current)
    elif rebuild or not pending:
        version = store.create_version(layout)
    else:
        version = pending[-1]
    return ViewTarget(view, layout, version, switch_when_caught_up=True)


def _pending_versions(
    store: ViewStore, view: str, layout: ViewLayout, current: int | None
) -> list[int]:
    """Versions beside the live one that build exactly this definition (an unfinished build)."""
    return [
        v
        for v in store.versions(view)
        if v != current
        and (store.version_dir(view, v) / "layout.json").is_file()
        and store.layout(view, v).same_semantics(layout)
    ]


def _wait_for_version(
    store: ViewStore, view: str, layout: ViewLayout, current: int | None, timeout_s: float = 120.0
) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pending = _pending_versions(store, view, layout, current)
        if pending:
            return pending[-1]
        time.sleep(0.2)
    raise ConfigError(
        f"view {view!r}: process 0 of the cluster did not create its new version "
        f"within {timeout_s:.0f}s; start process 0 (--process-id 0) too"
    )


def _switch_if_caught_up(
    store: ViewStore,
    target: ViewTarget,
    done: dict[int, bool],
) -> ViewTarget:
    """Mark the partitions of a new version that already hold the log as it stands (nothing to
    read: empty, or a crash came after their last commit); if that is every partition, the
    version goes live now, as no partition will ever report it."""
    if not target.switch_when_caught_up:
        return target
    name, version = target.view.name, target.version
    every = list(done)  # the shards of this state directory
    for p in [p for p, ok in done.items() if ok]:
        if store.finish_catch_up(name, version, p, every):
            return ViewTarget(target.view, target.layout, target.version)
    return target


def read_progress(store: ViewStore, view: str, version: int, partition: int) -> PartitionProgress:
    """A view partition's progress, read beside a running writer."""
    return read_partition_progress(store.partition_dir(view, version, partition))


def resume_points(
    progress: list[dict[int, PartitionProgress]], partitions: int
) -> tuple[dict[int, int], dict[int, int | None]]:
    """Where each source partition resumes: after the lowest offset any view shard has applied
    (shards skip what they already hold), with the partition's watermark at that offset."""
    start: dict[int, int] = {}
    marks: dict[int, int | None] = {}
    for p in range(partitions):
        positions = [pr.position(p, h) for per in progress for h, pr in per.items()]
        lowest = min(positions, key=lambda pos: pos.offset, default=LogPosition(-1, None))
        start[p], marks[p] = lowest.offset + 1, lowest.watermark
    return start, marks


def _ensure_topic(bootstrap: str, source: Source) -> bool:
    from connectors.kafka_admin import ensure_topic  # Kafka's client: for flows with a broker

    return ensure_topic(bootstrap, source.kafka_topic, source.partitions)


def build_plan(
    views: Sequence[FeatureView],
    *,
    warehouse: str | Path,
    state: Path,
    kafka: str | None,
    until_caught_up: bool,
    rebuild: bool = False,
    process_id: int = 0,
    batch_rows: int = BATCH_ROWS,
    batch_bytes: int = BATCH_BYTES,
    processes: int = 1,
    separate_state: bool = False,
) -> FlowPlan:
    """The versions to write and the offsets to read for `views`.

    Follow mode (not `until_caught_up`) also watches for replays that switch a view. In a
    cluster whose processes each have their own state directory (`separate_state`), each
    process plans only the shards it owns and publishes their positions (flows.cluster)."""
    store = ViewStore(state)
    cluster = Cluster(process_id, processes, separate_state)
    create = process_id == 0 or separate_state
    targets = choose_targets(store, views, rebuild=rebuild, create=create)
    wh = Warehouse(warehouse)
    sources: dict[str, SourcePlan] = {}
    for name in sorted({t.view.source.name for t in targets}):
        src_targets = tuple(t for t in targets if t.view.source.name == name)
        source = src_targets[0].view.source
        if kafka and process_id == 0 and _ensure_topic(kafka, source):
            print(
                f"created topic {source.kafka_topic!r} with {source.partitions} partitions "
                f"on {kafka}",
                flush=True,
            )
        store_ = schema_store(source, wh)
        tail = (
            KafkaTail(kafka, source.kafka_topic, store_, source.key, partitions=source.partitions)
            if kafka
            else None
        )
        shards = cluster.state_shards(source.partitions)
        progress = [
            {h: read_progress(store, t.view.name, t.version, h) for h in shards}
            for t in src_targets
        ]
        start, marks = resume_points(progress, source.partitions)
        if separate_state:
            versions = {t.view.name: t.version for t in src_targets}
            # a process that holds no shard of the source (more processes than partitions)
            # publishes no position: it has nothing to resume
            lowest = {p: LogPosition(start[p] - 1, marks[p]) for p in start} if shards else {}
            publish(warehouse, name, cluster, Publication(process_id, versions, lowest))
        columns = arrow_schema(source.avro_schema())
        ends = {}
        for p in range(source.partitions):
            log = PartitionLog(wh, name, p, start[p], columns, kafka=tail)
            try:
                ends[p] = log.end_offset()
            finally:
                log.close()
        src_targets = tuple(
            _switch_if_caught_up(store, t, {h: caught_up(pr, h, ends) for h, pr in per.items()})
            for t, per in zip(src_targets, progress, strict=True)
        )
        sources[name] = SourcePlan(
            name=name,
            key=source.key,
            timestamp=source.timestamp,
            arrow_schema=columns,
            targets=src_targets,
            start=start,
            stop=dict(ends) if until_caught_up else None,
            catch_up=ends,
            kafka=tail,
            defaults=field_defaults(source),
            start_watermark=marks,
            rules=EventRules.of(source),
            rekeyed=tuple(
                Rekeyed(t.view.name, t.layout, t.view.transform)
                for t in src_targets
                if t.layout.rekeyed
            ),
        )
    return FlowPlan(
        warehouse=warehouse,
        state=state,
        sources=sources,
        kafka_bootstrap=kafka,
        batch_rows=batch_rows,
        batch_bytes=batch_bytes,
        watch_versions=not until_caught_up,
        cluster=cluster,
        starts=ClusterStarts(warehouse, cluster) if separate_state else None,
    )
