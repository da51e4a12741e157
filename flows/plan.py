"""Planning a run: which view versions to write, and which log offsets to read for each.

A view whose stored layout equals its definition continues where it stopped. A new or changed
view gets a new version built from the start of the log beside the live one (the same dataflow,
the same code path) and becomes live when it has caught up: that is the Kappa backfill.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from connectors.avro import arrow_schema
from connectors.kafka import ensure_topic
from connectors.log import KafkaTail, PartitionLog
from connectors.segments import Warehouse
from flows.dataflow import FlowPlan, SourcePlan, ViewTarget
from flows.errors import ConfigError
from flows.metrics import Metrics
from flows.schemas import field_defaults, schema_store
from flows.spec import FeatureView
from state.layout import ViewLayout
from state.store import PartitionProgress, ViewStore, partition_dir, read_partition_progress


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
    targets: list[ViewTarget] = []
    for view in views:
        layout = view.layout()
        current = store.current_version(view.name)
        if (
            not rebuild
            and current is not None
            and store.layout(view.name, current).same_semantics(layout)
        ):
            targets.append(ViewTarget(view, layout, current))
            continue
        pending = _pending_versions(store, view.name, layout, current)
        if not create:
            version = _wait_for_version(store, view.name, layout, current)
        elif rebuild or not pending:
            version = store.create_version(layout)
        else:
            version = pending[-1]
        targets.append(ViewTarget(view, layout, version, switch_when_caught_up=True))
    return targets


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
    caught_up: list[bool],
) -> ViewTarget:
    """Mark the partitions of a new version that already hold the log as it stands (nothing to
    read: empty, or a crash came after their last commit); if that is every partition, the
    version goes live now, as no partition will ever report it."""
    if not target.switch_when_caught_up:
        return target
    name, version = target.view.name, target.version
    every = range(len(caught_up))
    for p in [p for p, ok in enumerate(caught_up) if ok]:
        if store.finish_catch_up(name, version, p, every):
            return ViewTarget(target.view, target.layout, target.version)
    return target


def read_progress(store: ViewStore, view: str, version: int, partition: int) -> PartitionProgress:
    """A view partition's progress, read beside a running writer."""
    return read_partition_progress(partition_dir(store.version_dir(view, version), partition))


def build_plan(
    views: Sequence[FeatureView],
    *,
    warehouse: Path,
    state: Path,
    kafka: str | None,
    until_caught_up: bool,
    rebuild: bool = False,
    metrics: Metrics | None = None,
    process_id: int = 0,
    batch_rows: int = 4_000_000,
) -> FlowPlan:
    """The versions to write and the offsets to read for `views`.

    Follow mode (not `until_caught_up`) also watches for replays that switch a view."""
    store = ViewStore(state)
    targets = choose_targets(store, views, rebuild=rebuild, create=process_id == 0)
    wh = Warehouse(warehouse)
    sources: dict[str, SourcePlan] = {}
    for name in sorted({t.view.source.name for t in targets}):
        src_targets = tuple(t for t in targets if t.view.source.name == name)
        source = src_targets[0].view.source
        if kafka and process_id == 0 and ensure_topic(kafka, source.kafka_topic, source.partitions):
            print(
                f"created topic {source.kafka_topic!r} with {source.partitions} partitions "
                f"on {kafka}",
                flush=True,
            )
        store_ = schema_store(source, wh)
        tail = KafkaTail(kafka, source.kafka_topic, store_, source.key) if kafka else None
        start, ends = {}, {}
        applied = {
            (i, p): read_progress(store, t.view.name, t.version, p).applied_offset
            for i, t in enumerate(src_targets)
            for p in range(source.partitions)
        }
        columns = arrow_schema(source.avro_schema())
        for p in range(source.partitions):
            start[p] = min(applied[i, p] + 1 for i in range(len(src_targets)))
            log = PartitionLog(wh, name, p, start[p], columns, kafka=tail)
            try:
                ends[p] = log.end_offset()
            finally:
                log.close()
        src_targets = tuple(
            _switch_if_caught_up(store, t, [applied[i, p] + 1 >= ends[p] for p in ends])
            for i, t in enumerate(src_targets)
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
        )
    return FlowPlan(
        warehouse=warehouse,
        state=state,
        sources=sources,
        kafka_bootstrap=kafka,
        batch_rows=batch_rows,
        metrics=metrics or Metrics(),
        watch_versions=not until_caught_up,
    )
