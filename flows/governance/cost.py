"""Replay cost of a plan: events to replay, estimated time and state size of each new version.

Events come from the log as it stands: the warehouse manifests (segments) and, with Kafka, each
partition's high watermark above the archived offsets, the same end `flows.run` catches up to.
Time is events / rate, the rate being the newest one measured by a `--until-caught-up` run of
this state directory (`history.measured_rate`), else the README's benchmark figure. State size
scales the live version's bytes by the new feature count (or, for a new view, the bytes per
feature of the other views of its source).
"""

from __future__ import annotations

import dataclasses

from connectors.errors import ConnectorError
from connectors.kafka_admin import partition_watermarks
from connectors.segments import Warehouse
from flows.governance.deployed import Deployed
from flows.governance.diff import Change, Plan, ReplayCost
from flows.governance.history import measured_rate
from flows.spec import Definitions, Source

# scripts/bench_flow.py, flows.run --until-caught-up over segments, 1 worker (README)
BENCHMARK_RATE = 926_000.0


def with_costs(
    plan: Plan, defs: Definitions, deployed: Deployed, warehouse: Warehouse, kafka: str | None
) -> Plan:
    """The plan with a replay cost on every view that needs a new version."""
    measured = measured_rate(deployed.state)
    rate, how = (
        (measured, "measured by the last flows.run --until-caught-up of this state")
        if measured
        else (BENCHMARK_RATE, "README benchmark (no replay measured on this state yet)")
    )
    events: dict[str, int | None] = {}
    changes: list[Change] = []
    notes = list(plan.notes)
    for change in plan.changes:
        if change.kind != "view" or not change.new_version:
            changes.append(change)
            continue
        view = defs.views[change.name]
        if view.source.name not in events:
            events[view.source.name] = log_events(view.source, warehouse, kafka, notes)
        n = events[view.source.name]
        cost = ReplayCost(
            events=n,
            seconds=None if n is None else n / rate,
            rate=rate,
            rate_source=how,
            state_bytes=state_estimate(change.name, defs, deployed),
        )
        changes.append(dataclasses.replace(change, replay=cost))
    return dataclasses.replace(plan, changes=tuple(changes), notes=tuple(notes))


def log_events(
    source: Source, warehouse: Warehouse, kafka: str | None, notes: list[str]
) -> int | None:
    """Records in the source's log now (segments, then Kafka above the archived offsets)."""
    total = 0
    for p in range(source.partitions):
        end = warehouse.next_offset(source.name, p)
        if kafka:
            try:
                _, high = partition_watermarks(kafka, source.kafka_topic, p, timeout_s=5.0)
            except ConnectorError as exc:
                notes.append(f"source {source.name!r}: Kafka not counted ({exc})")
                return total or None
            base = warehouse.kafka_base(source.name, p)
            end = max(end, high + (end if base is None else base))
        total += end
    return total


def state_estimate(view: str, defs: Definitions, deployed: Deployed) -> int | None:
    """Estimated bytes of a new version of `view` (None when nothing comparable is stored)."""
    features = len(defs.layouts[view].features)
    live = deployed.views.get(view)
    if live is not None and live.layout.features:
        return round(live.bytes_on_disk * features / len(live.layout.features))
    source = defs.views[view].source.name
    peers = [v for v in deployed.views.values() if v.layout.source == source]
    stored = sum(v.bytes_on_disk for v in peers)
    per_feature = sum(len(v.layout.features) for v in peers)
    return round(stored / per_feature * features) if per_feature else None
