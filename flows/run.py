"""`python -m flows.run`: the deployment. One dataflow over the log keeps every view fresh.

With no arguments it runs the embedded default: the shipped card-transaction definitions over
local demo data (generated into ./data/warehouse when it is empty), views in ./data/state, no
Kafka. It applies the whole log, prints a summary and a sample online read, then keeps following
the log for new data until Ctrl-C (or stops once caught up with --until-caught-up).
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow.parquet as pq

from connectors.log import KafkaStart, start_kafka_logs
from connectors.objectstore import is_uri
from connectors.segments import Warehouse
from flows.checkpoints import restore_views
from flows.cli import command_main, exit_command
from flows.cluster import Cluster
from flows.dataflow import FlowControl, run_dataflow
from flows.governance.breaking import refuse_breaking
from flows.governance.history import record_history, record_rate
from flows.metrics import ConsoleReporter, Metrics
from flows.runplan import FlowPlan, build_plan
from flows.settings import (
    BATCH_MB,
    BATCH_ROWS,
    EXAMPLE_FEATURES,
    STATUS_INTERVAL,
    FlowSettings,
    option,
)
from flows.spec import Definitions, FeatureView, Source, load_definitions
from state.codec import KEY_SEPARATOR, decode_key, entity_newest
from state.definitions import record_definitions
from state.errors import StateError
from state.store import ViewStore, iter_entities, peek, progress_of


@dataclass(frozen=True, slots=True)
class RunSettings(FlowSettings):
    views: str | None = option(
        None, "comma-separated views to run (default: all in the definitions)"
    )
    until_caught_up: bool = option(False, "stop once the log as it stood at start is applied")
    metrics_port: int | None = option(None, "serve Prometheus metrics on 127.0.0.1:PORT")
    addresses: str | None = option(None, "bytewax cluster: 'host:port;host:port' of every process")
    process_id: int | None = option(
        None, "bytewax cluster: this process's index in --addresses", minimum=0
    )
    separate_state: bool = option(
        False,
        "bytewax cluster: every process has its own --state (as on its own host), holding the "
        "view shards it owns (shard s on process s mod the process count); positions are "
        "exchanged through the warehouse",
    )
    kafka_start: str | None = option(
        None,
        "where a log that Kafka no longer holds from offset 0 starts: 'earliest-available' "
        "or an ISO time (e.g. 2026-01-31T00:00:00Z); the skipped offsets are recorded as a "
        "gap in the warehouse manifest",
    )
    restore: bool = option(
        False,
        "on an empty --state, first load each view's shards (those this process keeps) from "
        "the newest good checkpoints in the warehouse (python -m flows.checkpoint) of any "
        "process, then continue from their offsets",
    )
    allow_breaking: bool = option(
        False,
        "deploy definitions that take away a feature a recorded feature service serves "
        "(see python -m flows.plan); default: refuse and keep the live versions",
    )
    status_interval: float = STATUS_INTERVAL.field()
    batch_rows: int = BATCH_ROWS.field()
    batch_mb: int = BATCH_MB.field()


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("flows.run", __doc__, RunSettings, _run, argv)


class DataflowSettings(Protocol):
    """What the preamble of a command that runs the dataflow reads (flows.run, flows.replay)."""

    @property
    def features(self) -> str: ...
    @property
    def views(self) -> str | None: ...
    def describe(self) -> str: ...


def load_views(settings: DataflowSettings) -> tuple[Definitions, list[FeatureView]]:
    """The preamble of a command that runs the dataflow: print its settings, load the
    definitions module and select the views (`--views`, default every view)."""
    print(settings.describe(), flush=True)
    defs = load_definitions(settings.features)
    return defs, defs.select(settings.views.split(",") if settings.views else None)


def _run(settings: RunSettings) -> int:
    defs, views = load_views(settings)
    if not settings.allow_breaking:
        refuse_breaking(defs, Path(settings.state))
    warehouse = Warehouse(settings.warehouse)
    cluster = Cluster(
        settings.process_id or 0,
        len(settings.addresses.split(";")) if settings.addresses else 1,
        bool(settings.separate_state),
    )
    if settings.restore:
        # the shards this process keeps: every one, or its own in a separate-state cluster
        needs = {v.name: cluster.state_shards(v.source.partitions) for v in views}
        restored = restore_views(Path(settings.state), settings.warehouse, needs)
        for line in restored:
            print(line, flush=True)
    embedded_demo = Path(settings.features).resolve() == EXAMPLE_FEATURES.resolve()
    if embedded_demo and not settings.process_id:
        from flows.demo import ensure_demo_data  # the demo's generator and ingest: for it only

        for source in {v.source.name: v.source for v in views}.values():
            if settings.kafka and _topic_has_records(settings.kafka, source):
                continue  # real events are flowing: no made-up history in front of them
            report = ensure_demo_data(source, warehouse, spine=_demo_spine(settings))
            if report is not None:
                print(
                    f"generated demo data: {report.rows:,} events of {source.name!r} into "
                    f"{settings.warehouse} in {report.seconds:.1f}s",
                    flush=True,
                )
    if settings.kafka and not settings.process_id:  # before the plan reads the topic
        sources = {v.source.name: v.source for v in views}.values()
        logs = [(s.name, s.kafka_topic, s.partitions) for s in sources]
        start = KafkaStart.parse(settings.kafka_start)
        for line in start_kafka_logs(warehouse, settings.kafka, logs, start):
            print(line, flush=True)
    metrics = Metrics()
    for view in views:
        expected_us = view.freshness_us()
        if expected_us is not None:
            metrics.expect_freshness(view.name, expected_us / 1e6)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    while True:
        plan = build_plan(
            views,
            warehouse=settings.warehouse,
            state=Path(settings.state),
            kafka=settings.kafka,
            until_caught_up=settings.until_caught_up,
            process_id=cluster.process_id,
            batch_rows=settings.batch_rows,
            batch_bytes=settings.batch_mb << 20,
            processes=cluster.processes,
            separate_state=cluster.separate_state,
        )
        _print_plan(plan)
        if not settings.process_id or settings.separate_state:
            _record(plan, defs)
        addresses = settings.addresses.split(";") if settings.addresses else None
        control = FlowControl(metrics)
        with claim_versions(plan, settings.process_id or 0):
            code = execute(
                plan,
                control,
                workers=settings.workers,
                addresses=addresses,
                process_id=settings.process_id or 0,
                status_interval=settings.status_interval,
            )
        if not control.restart.is_set():
            if not settings.process_id:
                _print_service_sample(plan, defs, _demo_spine(settings))
            return code
        print("a replay made a new version of a view live: continuing on it", flush=True)


def _record(plan: FlowPlan, defs: Definitions) -> None:
    """Record the definitions module (and its schema files) in the state directory, with the
    view versions this run writes, so a FeatureClient without features= finds its services."""
    versions = {t.view.name: t.version for sp in plan.sources.values() for t in sp.targets}
    sha = record_definitions(plan.state, defs.path, defs.schema_files(), versions)
    record_history(plan.state, sha, defs, versions)


def _demo_spine(settings: RunSettings) -> Path:
    """Where the embedded demo writes its labelled spine: beside the warehouse (beside the
    state directory when the warehouse is an object store)."""
    if is_uri(settings.warehouse):
        return Path(settings.state).parent / "spine.parquet"
    return Path(settings.warehouse).parent / "spine.parquet"


def _print_service_sample(plan: FlowPlan, defs: Definitions, spine: Path) -> None:
    """One get_service call of the first feature service whose views this run serves, as of
    just after the newest event: its entities the most recently active keys, its request
    fields those of the demo spine's last row (or plain defaults)."""
    served = {t.view.name: (sp, t) for sp in plan.sources.values() for t in sp.targets}
    for name, service_plan in defs.plans.items():
        if not all(r.view in served for r in service_plan.reads):
            continue
        row: dict[str, Any] = _sample_request(service_plan.request, spine)
        newest = 0
        for read in service_plan.reads:
            sp, target = served[read.view]
            scanned = (_newest_entity(plan, read.view, target.version, p) for p in sp.start)
            found = [f for f in scanned if f is not None]
            if not found:
                return
            newest = max(newest, *(f[2] for f in found))
            key = max(found, key=lambda f: f[1])[0]
            row.update(zip(read.entity_columns, key.split(KEY_SEPARATOR), strict=False))
        try:
            from state.client import FeatureClient  # the read client: for this sample only

            with FeatureClient(plan.state, compiled=False) as client:
                values: Any = client.get_service(name, row, at=(newest + 1) / 1e6)
        except StateError as exc:  # a sample, not the run's result: say so and go on
            values = f"failed: {exc}"
        print(
            f'sample service read: FeatureClient("{plan.state}").get_service({name!r}, {row}, '
            f"at=<newest event + 1us>) = {values}",
            flush=True,
        )
        return


_REQUEST_DEFAULTS: dict[str, Any] = {
    "int": 1,
    "long": 1,
    "float": 1.0,
    "double": 100.0,
    "string": "",
    "boolean": False,
}  # array fields: None


def _sample_request(fields: Sequence[tuple[str, str]], spine: Path) -> dict[str, Any]:
    last: dict[str, Any] = {}
    if spine.is_file():
        table = pq.read_table(spine)
        last = table.slice(table.num_rows - 1).to_pylist()[0] if table.num_rows else {}
    return {
        field: last[field] if field in last else _REQUEST_DEFAULTS.get(kind)
        for field, kind in fields
    }


def _topic_has_records(bootstrap: str, source: Source) -> bool:
    from connectors.kafka_admin import ensure_topic, partition_watermarks

    ensure_topic(bootstrap, source.kafka_topic, source.partitions)
    return any(
        partition_watermarks(bootstrap, source.kafka_topic, p)[1] > 0
        for p in range(source.partitions)
    )


def claim_versions(plan: FlowPlan, process_id: int) -> contextlib.ExitStack:
    """Hold every view version the plan writes, as this cluster process, until the block ends:
    a second writer of one of them is refused (with this process's pid), a replay's cleanup
    never deletes them; a flows.replay building new versions runs beside.

    Raises:
        StateLockedError: another process writes one of these versions as `process_id`.
    """
    store = ViewStore(plan.state)
    with contextlib.ExitStack() as stack:
        for sp in plan.sources.values():
            for t in sp.targets:
                for lease in store.claim(t.view.name, t.version, process_id):
                    stack.enter_context(lease)
        return stack.pop_all()


def execute(
    plan: FlowPlan,
    control: FlowControl,
    *,
    workers: int = 1,
    addresses: list[str] | None = None,
    process_id: int = 0,
    status_interval: float = 5.0,
) -> int:
    """Run the dataflow, then print the summary (also after Ctrl-C)."""
    track_catch_up(plan, control.metrics)
    reporter = ConsoleReporter(control.metrics, status_interval)
    reporter.start()
    started = time.perf_counter()
    # Ctrl-C / SIGTERM end the flow cleanly: the sources stop at their next batch, the sinks
    # finish what they hold and close. Every commit is atomic, so any stop point is safe.
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        control.stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_dataflow(plan, control, workers, addresses, process_id)
    finally:
        reporter.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stopped_by = _signal_name(received[0]) if received and not control.restart.is_set() else None
    if not plan.watch_versions and not received:  # --until-caught-up: a whole replay, timed
        elapsed = time.perf_counter() - started
        record_rate(plan.state, sum(control.metrics.read_totals().values()), elapsed)
    _print_summary(plan, control.metrics, time.perf_counter() - started, stopped_by)
    return 0


def track_catch_up(plan: FlowPlan, metrics: Metrics) -> None:
    """Tell the metrics how much of the log is to be applied (progress bar, lag gauges)."""
    total = 0
    for sp in plan.sources.values():
        total += sum(max(0, sp.catch_up[p] - sp.start[p]) for p in sp.start)
        marks = [m for m in sp.start_watermark.values() if m is not None]
        for t in sp.targets:
            for p, end in sp.catch_up.items():
                metrics.catch_up_target(t.view.name, p, end)
            metrics.resumed(t.view.name, max(marks, default=None))
    metrics.to_catch_up = total


def _print_plan(plan: FlowPlan) -> None:
    for name, sp in plan.sources.items():
        todo = sum(sp.catch_up[p] - sp.start[p] for p in sp.start)
        mode = f"Kafka {plan.kafka_bootstrap} after segments" if sp.kafka else "segments"
        print(
            f"source {name!r}: {len(sp.start)} partitions from {mode}; {todo:,} records to apply",
            flush=True,
        )
        for t in sp.targets:
            state = "new version, live when caught up" if t.switch_when_caught_up else "live"
            print(
                f"  view {t.view.name!r} v{t.version} ({state}): "
                f"{', '.join(f.name for f in t.layout.features)}",
                flush=True,
            )


def _signal_name(signum: int) -> str:
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name


def _print_summary(
    plan: FlowPlan, metrics: Metrics, elapsed: float, stopped_by: str | None
) -> None:
    per_view, late, dead = metrics.totals()
    read = sum(metrics.read_totals().values())
    events = max(per_view.values(), default=0)
    rate = read / elapsed if elapsed > 0 else 0.0
    how = f"stopped by {stopped_by}" if stopped_by else "done"
    views = [t.view.name for sp in plan.sources.values() for t in sp.targets]
    each = ", ".join(f"{v} {per_view.get(v, 0):,}" for v in views)
    print(
        f"{how}: applied {events:,} events (per view: {each or 'none'}) from {read:,} records "
        f"read in {elapsed:.1f}s ({rate:,.0f} records/s); late {late:,}; dead letters {dead:,}",
        flush=True,
    )
    sample = _sample_read(plan)
    if sample:
        print(sample, flush=True)


def _sample_read(plan: FlowPlan) -> str | None:
    """One online read through the embedded client, as of just after the view's newest event:
    the most recently active of the first entities of each partition."""
    for sp in plan.sources.values():
        for target in sp.targets:
            scanned = (_newest_entity(plan, target.view.name, target.version, p) for p in sp.start)
            found = [f for f in scanned if f is not None]
            if not found:
                continue
            view_newest = max(f[2] for f in found)
            key = max(found, key=lambda f: f[1])[0]
            from state.client import FeatureClient  # the read client: for this sample only

            with FeatureClient(plan.state, compiled=False) as client:
                if target.view.name not in client.views():
                    return None
                values = client.get(target.view.name, key, at=(view_newest + 1) / 1e6)
            return (
                f'sample read: FeatureClient("{plan.state}").get({target.view.name!r}, '
                f"{key!r}, at=<newest event + 1us>) = {values}"
            )
    return None


def _newest_entity(
    plan: FlowPlan, view: str, version: int, p: int, scan: int = 200
) -> tuple[str, int, int] | None:
    """(key, its newest event time, the shard's newest event time) among the first `scan` keys."""
    store = ViewStore(plan.state)
    with peek(store.partition_dir(view, version, p)) as db:
        if db is None:
            return None
        watermark = progress_of(db).newest()  # with the partitions other shards told it of
        best: tuple[str, int] | None = None
        for i, (raw_key, blob) in enumerate(iter_entities(db)):
            newest = entity_newest(blob)
            if best is None or newest > best[1]:
                best = (decode_key(raw_key), newest)
            if i >= scan:
                break
    if best is None or watermark is None:
        return None
    return best[0], best[1], watermark


if __name__ == "__main__":
    exit_command(main())
