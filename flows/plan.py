"""Planning a run: which view versions to write, and which log offsets to read for each.

A view whose stored layout equals its definition continues where it stopped. A new or changed
view gets a new version built from the start of the log beside the live one (the same dataflow,
the same code path) and becomes live when it has caught up: that is the Kappa backfill.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from connectors.avro import SchemaStore, arrow_schema
from connectors.log import KafkaTail, PartitionLog
from connectors.segments import Warehouse
from flows.dataflow import FlowPlan, SourcePlan, ViewTarget
from flows.metrics import Metrics
from flows.spec import Definitions, FeatureView
from state.store import PartitionProgress, ViewStore, open_secondary, partition_dir


def choose_targets(
    store: ViewStore,
    views: Sequence[FeatureView],
    *,
    rebuild: bool,
) -> list[ViewTarget]:
    """The version each view is written to; `rebuild` forces a new version (flows.replay)."""
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
        pending = [
            v
            for v in store.versions(view.name)
            if v != current
            and (store.version_dir(view.name, v) / "layout.json").is_file()
            and store.layout(view.name, v).same_semantics(layout)
        ]
        version = store.create_version(layout) if rebuild or not pending else pending[-1]
        targets.append(ViewTarget(view, layout, version, switch_when_caught_up=True))
    return targets


def read_progress(store: ViewStore, view: str, version: int, partition: int) -> PartitionProgress:
    """A partition's progress, read through a secondary so a running writer is not disturbed."""
    primary = partition_dir(store.version_dir(view, version), partition)
    if not (primary / "CURRENT").is_file():
        return PartitionProgress(-1, None, 0, 0)
    tmp = Path(tempfile.mkdtemp(prefix="featureflow-progress-"))
    try:
        db = open_secondary(primary, tmp)
        try:
            from state.codec import APPLIED_OFFSET, decode_int

            raw = db.get(APPLIED_OFFSET)
            applied = decode_int(raw) if raw is not None else -1
        finally:
            db.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PartitionProgress(applied, None, 0, 0)


def build_plan(
    defs: Definitions,
    views: Sequence[FeatureView],
    *,
    warehouse: Path,
    state: Path,
    kafka: str | None,
    until_caught_up: bool,
    rebuild: bool = False,
    metrics: Metrics | None = None,
) -> FlowPlan:
    store = ViewStore(state)
    targets = choose_targets(store, views, rebuild=rebuild)
    wh = Warehouse(warehouse)
    sources: dict[str, SourcePlan] = {}
    for name in sorted({t.view.source.name for t in targets}):
        src_targets = tuple(t for t in targets if t.view.source.name == name)
        source = src_targets[0].view.source
        schema = source.avro_schema()
        tail = (
            KafkaTail(kafka, source.kafka_topic, SchemaStore(schema), source.key) if kafka else None
        )
        start, ends = {}, {}
        for p in range(source.partitions):
            start[p] = min(
                read_progress(store, t.view.name, t.version, p).applied_offset + 1
                for t in src_targets
            )
            log = PartitionLog(wh, name, p, start[p], arrow_schema(schema), kafka=tail)
            try:
                ends[p] = log.end_offset()
            finally:
                log.close()
        sources[name] = SourcePlan(
            name=name,
            key=source.key,
            timestamp=source.timestamp,
            arrow_schema=arrow_schema(schema),
            targets=src_targets,
            start=start,
            stop=dict(ends) if until_caught_up else None,
            catch_up=ends,
            kafka=tail,
        )
    return FlowPlan(
        warehouse=warehouse,
        state=state,
        sources=sources,
        kafka_bootstrap=kafka,
        metrics=metrics or Metrics(),
    )
