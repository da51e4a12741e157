"""The one bytewax dataflow: log -> validate -> route -> aggregate -> view store (+ dead letters).

    op.input("log")            LogSource: one bytewax partition per (source, log partition), each
                               a PartitionLog (segments, then Kafka); items are whole batches,
                               read while the rows in flight in the process fit its budget
                               (flows.inflight: one replay batch per worker at a time)
    op.flat_map("route")       on the worker that read the batch: bad records -> dead letters
                               (flows.validate), each event marked with its partition's
                               watermark (flows.shards.PartitionMark), the batch split by view
                               shard: murmur2 of the entity key, the function the read client
                               uses to find a key (flows.shards.split)
    op.output("views")         ViewSink: a shard's owner applies each slice to every view version
                               of the source (flows.aggregate, guarded by flows.quarantine) and
                               commits tiles + its position in the slice's partition in one
                               RocksDB WriteBatch (or ingested SST file) per view, then gives
                               the slice's rows back

Shards are the partitions of the key space (as many as the source has log partitions). A log
partitioned by entity key with murmur2 sends each batch whole to one shard, owned by the process
that read it, so no batch crosses processes; another partitioner costs a split and an exchange,
not correctness. The marking is not a keyed bytewax step: that would route each batch by a hash
of its partition's name, to another process of a cluster about half the time. bytewax recovery
is not used: each shard's store holds its applied offset per source partition, and sources
restart from the lowest of them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import cast

import bytewax.operators as op
import numpy as np
import pyarrow as pa
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from connectors.envelope import PARTITION
from connectors.errors import ConnectorError
from connectors.log import LogBatch, PartitionLog
from connectors.segments import Warehouse
from flows.aggregate import KEY
from flows.cluster import wait_for_listeners
from flows.deadletters import open_dead_letters
from flows.errors import FlowError
from flows.inflight import RowBudget
from flows.metrics import Metrics, newest_arrival
from flows.quarantine import apply_guarded, validate_guarded
from flows.runplan import (
    FlowPlan,
    SourcePlan,
    ViewTarget,
    caught_up,
    part_key,
    split_part_key,
)
from flows.shards import PartitionMark, Routed
from state.bulk import BULK_COMMIT_KEYS, BulkCommit, commit_building
from state.errors import StateError
from state.store import LogPosition, PartitionProgress, PartitionStore, ViewStore

_IDLE = timedelta(milliseconds=10)  # poll an idle partition every 10 ms
_WAIT = timedelta(milliseconds=1)  # poll a partition waiting for the row budget every 1 ms
_VERSION_CHECK_S = 2.0
KNOWN_ERRORS = (ConnectorError, FlowError, StateError)


@dataclass(eq=False)
class FlowControl:
    """What changes while the flow runs: its stop and restart signals, the known errors that
    ended it, and its metrics. The plan says what to run; this says how the run is going."""

    metrics: Metrics = field(default_factory=Metrics)
    stop: threading.Event = field(default_factory=threading.Event)  # set = end cleanly now
    restart: threading.Event = field(default_factory=threading.Event)  # set = rebuild the plan
    failures: list[Exception] = field(default_factory=list)  # known errors that ended the flow
    # the log rows read and not yet applied in this process; build_dataflow sets its bound
    budget: RowBudget = field(default_factory=lambda: RowBudget(0))

    def fail(self, exc: Exception) -> None:
        """End the flow cleanly because of a known error; `run_dataflow` raises it after."""
        self.failures.append(exc)
        self.stop.set()


class _VersionWatch:
    """Notices when another version of a view went live than the one this flow writes.

    Built from the same definition (a flows.replay), the flow restarts on it instead of keeping
    the old one fresh. Built from another definition (a newer deployment), the flow stops with
    an error: it must never write, or make live again, an older definition over a newer one."""

    def __init__(self, plan: FlowPlan, control: FlowControl, source: SourcePlan) -> None:
        self._plan, self._control, self._store = plan, control, ViewStore(plan.state)
        self._targets = source.targets
        self._next_check = time.monotonic() + _VERSION_CHECK_S

    def check(self) -> None:
        if not self._plan.watch_versions or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + _VERSION_CHECK_S
        for target in self._targets:
            name = target.view.name
            live = self._store.current_version(name)
            if live is None or live <= target.version:
                continue
            if self._store.layout(name, live).same_semantics(target.layout):
                self._control.restart.set()
                self._control.stop.set()
            else:
                self._control.fail(
                    FlowError(
                        f"view {name!r}: the deployed definition changed (v{live} is live, built "
                        f"from another definition); this flows.run runs v{target.version}'s "
                        "definition: restart it with the new definitions"
                    )
                )


class _LogPartition(StatefulSourcePartition[tuple[str, LogBatch], None]):
    def __init__(
        self, key: str, log: PartitionLog, control: FlowControl, watch: _VersionWatch
    ) -> None:
        self._key, self._log, self._stop, self._watch = key, log, control.stop, watch
        self._control, self._budget = control, control.budget
        self._expected = log.batch_rows  # the rows the next read may return: the last batch's
        self._next_lag_report = 0.0
        self._awake: datetime | None = None

    def next_batch(self) -> Iterable[tuple[str, LogBatch]]:
        self._watch.check()
        if self._stop.is_set() or self._log.done:
            self._budget.leave(self._key)
            raise StopIteration
        if not self._budget.reserve(self._key, self._expected):  # at the bound, or not its turn
            self._awake = datetime.now(UTC) + _WAIT
            return []
        batch = self._read()
        if batch is None:
            if self._log.done:
                raise StopIteration
            self._awake = datetime.now(UTC) + _IDLE
            self._report_lag()
            return []
        self._awake = None
        self._report_lag()
        return [(self._key, batch)]

    def _read(self) -> LogBatch | None:
        """The next batch, its rows taken from the budget (the reservation settled)."""
        rows = 0
        try:
            batch = self._log.read()
            rows = 0 if batch is None else batch.events.num_rows
        except KNOWN_ERRORS as exc:  # e.g. a retention gap: stop the flow, report it after
            self._control.fail(exc)
            raise StopIteration from exc
        finally:
            self._budget.settle(self._key, self._expected, rows)
        self._expected = rows or self._expected
        return batch

    def _report_lag(self) -> None:
        now = time.monotonic()
        if now >= self._next_lag_report:
            self._next_lag_report = now + 1.0
            lag = self._log.kafka_lag()
            if lag is not None:
                self._control.metrics.kafka_lag(self._log.source, self._log.partition, lag)

    def next_awake(self) -> datetime | None:
        return self._awake

    def snapshot(self) -> None:
        return None

    def close(self) -> None:
        self._log.close()


class LogSource(FixedPartitionedSource[tuple[str, LogBatch], None]):
    """Every partition of every source in the plan, each read as segments then Kafka."""

    def __init__(self, plan: FlowPlan, control: FlowControl) -> None:
        self._plan, self._control = plan, control

    def list_parts(self) -> list[str]:
        return self._plan.owned_part_keys()

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _LogPartition:
        source, partition = split_part_key(for_part)
        sp = self._plan.sources[source]
        log = PartitionLog(
            warehouse=Warehouse(self._plan.warehouse),
            source=source,
            partition=partition,
            start_offset=self._plan.resume_at(source, partition).offset + 1,
            arrow_schema=sp.arrow_schema,
            kafka=sp.kafka,
            stop_at=None if sp.stop is None else sp.stop[partition],
            batch_rows=self._plan.batch_rows,
            batch_bytes=self._plan.batch_bytes,
            defaults=sp.defaults,
        )
        log.read_ahead()  # a short catch-up: every partition's tail downloads at once
        watch = _VersionWatch(self._plan, self._control, sp)
        return _LogPartition(for_part, log, self._control, watch)


class _ViewPartition(StatefulSinkPartition[Routed, None]):
    """One view shard of one source: applies what every source partition routes to it."""

    def __init__(
        self, plan: FlowPlan, control: FlowControl, source: SourcePlan, shard: int
    ) -> None:
        self._plan, self._control, self._source, self._shard = plan, control, source, shard
        self._budget = control.budget
        store = ViewStore(plan.state)
        self._stores: list[PartitionStore] = [
            store.open_partition(t.view.name, t.version, shard) for t in source.targets
        ]
        self._progress = [s.progress() for s in self._stores]
        self._dead = open_dead_letters(
            plan.warehouse,
            source.name,
            plan.kafka_bootstrap,
            schema=source.targets[0].view.source.avro_schema(),
        )
        shards = plan.cluster.state_shards(len(source.start))
        self._switcher = _Switcher(store, source, shard, shards)
        self._switcher.check(self._progress)
        self._flushed = False

    def write_batch(self, items: list[Routed]) -> None:
        held = sum(item.held for item in items)
        try:
            if self._control.failures:
                return  # the flow is ending on an error: apply nothing more (a rerun resumes)
            groups = _runs_of_groups(items)
            items.clear()  # the groups hold the items now, each group until it is merged
            while groups:
                self._apply(groups.pop(0))
            self._switcher.check(self._progress)
            self._flush_when_done()
        except KNOWN_ERRORS as exc:
            self._control.fail(exc)
        finally:
            self._budget.release(held)

    def _flush_when_done(self) -> None:
        """In a run that stops once caught up, a shard that has applied its whole share starts
        writing its memtables out in RocksDB's background threads (off the interpreter), while
        the other shards still apply: the sinks' closes, one after another at the end, then
        find it done (4 shards of a bootstrap's catch-up: 4 x 20 ms)."""
        if self._flushed or self._source.stop is None:
            return
        if all(caught_up(p, self._shard, self._source.catch_up) for p in self._progress):
            self._flushed = True
            for store in self._stores:
                store.flush_soon()

    def _apply(self, items: list[Routed]) -> None:
        """Apply what one routing group received at once: one merge and one commit per view.
        Once every view has merged them, the group's records are let go (`items` is emptied):
        a replay batch's tables need not live through the last commit."""
        group = items[0].view
        chosen = [i for i, t in enumerate(self._source.targets) if route_group(t) == group]
        self._receive_all(items, chosen)
        parts = [item.slice for item in items]
        arrival = newest_arrival(parts[-1])
        events = sum(part.events.num_rows for part in parts)
        for n, i in enumerate(chosen, start=1):
            target = self._source.targets[i]
            store = self._stores[i]
            # a version not live yet has no readers: a replay batch goes in as a file, its
            # blobs written a merge run at a time (state.bulk)
            building = self._switcher.building(i)
            bulk = BulkCommit(store) if building and events >= BULK_COMMIT_KEYS else None
            read = store.get_many_once if building else store.get_many
            try:
                result = apply_guarded(
                    target.view, target.layout, parts, self._progress[i], read, bulk
                )
            except BaseException:
                if bulk is not None:
                    bulk.reset()  # the file of a commit that will not come
                raise
            if n == len(chosen):  # merged into every view: the records go before the commit
                items.clear()
                parts.clear()
                # Arrow's allocator keeps freed pages; the commit allocates elsewhere (RocksDB)
                pa.default_memory_pool().release_unused()
            self._write_late(target, result.late)
            if result.poison:
                self._dead.write(list(result.poison))
                self._control.metrics.dead_letters(self._source.name, len(result.poison))
            if bulk is not None and bulk.used:
                bulk.finish(result.progress)
            elif building:
                commit_building(store, result.puts, result.progress)
            else:
                store.commit(result.puts, result.progress)
            self._progress[i] = result.progress
            self._control.metrics.applied(target.view.name, self._shard, result, arrival)

    def _receive_all(self, items: list[Routed], chosen: list[int]) -> None:
        received: dict[int, int] = {}
        for item in items:
            self._receive(item, chosen, received)

    def _receive(self, item: Routed, chosen: list[int], received: dict[int, int]) -> None:
        """Check that nothing was lost before the item (`received`: the end of the items of
        each partition taken before it in this group); write its dead letters (once)."""
        part = item.slice
        positions = [self._progress[i].position(part.partition, self._shard) for i in chosen]
        before = received.get(part.partition, -1)
        positions = [p if p.offset >= before else LogPosition(before, None) for p in positions]
        _check_contiguous(item, positions, self._source.name)
        received[part.partition] = max(before, part.through_offset)
        floor = min((pos.offset for pos in positions), default=-1)
        letters = [d for d in item.dead_letters if d.offset is None or d.offset > floor]
        self._dead.write(letters)
        self._control.metrics.dead_letters(self._source.name, len(letters))

    def _write_late(self, target: ViewTarget, late: pa.Table) -> None:
        if not late.num_rows:
            return
        late = late.drop_columns([c for c in late.column_names if c == KEY])
        partitions = late.column(PARTITION).to_numpy()
        for p in np.unique(partitions).tolist():
            rows = late.filter(pa.array(partitions == p))
            self._dead.write_late(rows, target.view.name, int(p), version=target.version)

    def snapshot(self) -> None:
        return None

    def close(self) -> None:
        self._dead.close()
        for store in self._stores:
            try:
                store.close()
            except Exception:
                # After a failed commit (a full disk) RocksDB refuses to close cleanly; what was
                # committed is in its log. The flow is ending on that first error: report it.
                if not self._control.failures:
                    raise


def _runs_of_groups(items: list[Routed]) -> list[list[Routed]]:
    """The items of each routing group, each group in arrival order (so every partition's
    slices stay in offset order); groups write to different stores, so their order is free."""
    runs: dict[str | None, list[Routed]] = {}
    for item in items:
        runs.setdefault(item.view, []).append(item)
    return list(runs.values())


def route_group(target: ViewTarget) -> str | None:
    """The routing group of a view: its name when it has its own key, else None (the views
    of the source key share their slices)."""
    return target.view.name if target.layout.rekeyed else None


def _check_contiguous(item: Routed, positions: list[LogPosition], source: str) -> None:
    """Slices of a partition reach a shard in offset order; a hole means a lost item."""
    behind = [pos.offset for pos in positions if pos.offset < item.after]
    if behind:
        raise FlowError(
            f"source {source!r} partition {item.slice.partition}: shard {item.slice.shard} "
            f"received records after offset {item.after} but has applied only up to "
            f"{min(behind)}; records between were lost in transit. Restart flows.run: it "
            "resumes from the applied offsets"
        )


class _Switcher:
    """Makes rebuilt view versions live once every shard has caught up with the log."""

    def __init__(self, store: ViewStore, source: SourcePlan, shard: int, shards: list[int]) -> None:
        self._store, self._source, self._shard = store, source, shard
        self._shards = shards  # the shards of this state directory: all must catch up
        self._pending = {i for i, t in enumerate(source.targets) if t.switch_when_caught_up}

    def building(self, target: int) -> bool:
        """Whether this shard of target `target`'s version is still catching up (not live)."""
        return target in self._pending

    def check(self, progress: list[PartitionProgress]) -> None:
        if not self._pending:
            return
        for i in sorted(self._pending):
            if not caught_up(progress[i], self._shard, self._source.catch_up):
                continue
            self._pending.discard(i)
            target = self._source.targets[i]
            self._store.finish_catch_up(target.view.name, target.version, self._shard, self._shards)


class ViewSink(FixedPartitionedSink[Routed, None]):
    """Routes each view shard's slices to the worker that owns the shard's view stores."""

    def __init__(self, plan: FlowPlan, control: FlowControl) -> None:
        self._plan, self._control = plan, control
        self._parts = plan.part_keys()
        self._index = {key: i for i, key in enumerate(self._parts)}

    def list_parts(self) -> list[str]:
        return self._plan.owned_part_keys()

    def part_fn(self, item_key: str) -> int:
        return self._index[item_key]

    def build_part(
        self, step_id: str, for_part: str, resume_state: None
    ) -> StatefulSinkPartition[Routed, None]:
        source, shard = split_part_key(for_part)
        try:
            return _ViewPartition(self._plan, self._control, self._plan.sources[source], shard)
        except KNOWN_ERRORS as exc:  # e.g. a full disk: stop the flow, report it after
            self._control.fail(exc)
            return _Refusing(self._control.budget)


class _Refusing(StatefulSinkPartition[Routed, None]):
    """Stands in for a view shard that could not be opened while the flow stops on the error."""

    def __init__(self, budget: RowBudget) -> None:
        self._budget = budget

    def write_batch(self, items: list[Routed]) -> None:
        self._budget.release(sum(item.held for item in items))

    def snapshot(self) -> None:
        return None


def build_dataflow(plan: FlowPlan, control: FlowControl, workers: int = 1) -> Dataflow:
    """The dataflow of the diagram above, for every source and view version in `plan`; the
    rows in flight in the process are bounded by `plan.batch_rows` per worker thread."""
    flow = Dataflow("featureflow")
    budget = control.budget = RowBudget(plan.batch_rows * workers)
    log = op.input("log", flow, LogSource(plan, control))
    # Per log partition, its marker; a partition is read by one worker, so only that worker's
    # thread touches its entry.
    marks: dict[str, PartitionMark] = {}

    def route(item: tuple[str, LogBatch]) -> list[tuple[str, Routed]]:
        key, batch = item
        sp = plan.sources[batch.source]
        state = marks.get(key)
        if state is None:
            resume = plan.resume_at(batch.source, batch.partition)
            state = marks[key] = PartitionMark(resume.offset + 1, resume.watermark)
        control.metrics.records_read(batch.source, batch.events.num_rows + len(batch.dead_letters))
        checked = validate_guarded(batch, sp.event_rules)
        marked = state.mark(checked, sp.timestamp, sp.catch_up[batch.partition], time.monotonic())
        plain = any(not t.layout.rekeyed for t in sp.targets)
        parts = state.route(marked, sp.key, len(sp.start), sp.rekeyed, plain=plain)
        local = [plan.cluster.owns(shard) for shard, _ in parts]
        keyed = [(part_key(sp.name, shard), routed) for shard, routed in parts]
        return budget.hand_over(key, keyed, local)

    routed = op.flat_map("route", log, route)
    op.output("views", routed, ViewSink(plan, control))
    return flow


def run_dataflow(
    plan: FlowPlan,
    control: FlowControl,
    workers: int = 1,
    addresses: list[str] | None = None,
    process_id: int = 0,
) -> None:
    """Run the dataflow in this process (1 or more worker threads, optionally a process of a
    cluster) through bytewax's production entry point (`bytewax.run.cli_main`, what
    `python -m bytewax.run` calls; `bytewax.testing` is for unit tests)."""
    from bytewax.run import cli_main

    run = cast(Callable[..., None], cli_main)  # an untyped extension function
    if addresses:
        wait_for_listeners(addresses, process_id)
    try:
        run(
            build_dataflow(plan, control, workers),
            workers_per_process=workers,
            process_id=process_id if addresses else None,
            addresses=addresses or None,
        )
    except BaseException as exc:  # pyo3's PanicException derives from BaseException
        if not addresses or type(exc).__name__ != "PanicException":
            raise
        raise FlowError(
            f"cluster process {process_id}: bytewax lost its connection to another process of "
            f"--addresses {';'.join(addresses)} ({exc}); a bytewax cluster stops as a whole "
            "when one process dies: restart every process (each continues from its applied "
            "offsets; a host that lost its --state starts with --restore)"
        ) from exc
    if control.failures:
        raise control.failures[0]
