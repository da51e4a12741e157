"""Flow metrics: per view and partition, events applied, late and dead-letter counts, lag and
freshness; exported to Prometheus (prometheus-client) and summarized on the console.

Freshness is the delay from a record's arrival in the log (its Kafka message time) to its
being applied, taken for the newest record of each applied batch: it does not grow while the
log is idle. The age of the newest applied record (now minus its arrival) is reported
separately, and the console says "idle" when nothing new was applied since its last line.
While the flow catches up, a terminal on stderr shows a live progress bar instead of the
status lines (tqdm: records read, rate, ETA); logs (stderr not a terminal) keep the lines."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from connectors.envelope import ARRIVAL

if TYPE_CHECKING:
    from flows.aggregate import ApplyResult, LogSlice

BAR_REFRESH_S = 0.5  # how often the catch-up bar on a terminal moves


@dataclass
class _PartitionStats:
    applied: int = 0
    late: int = 0
    offset: int = -1
    newest_arrival_us: int | None = None
    freshness_s: float | None = None  # arrival-to-applied delay of the newest applied record

    def age_s(self) -> float:
        return _age_s(self.newest_arrival_us) or 0.0


@dataclass
class Metrics:
    """Counters shared by the worker threads of one process."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.to_catch_up = 0  # records to apply before the views are caught up (set at start)
        self._last_report = (time.monotonic(), 0)
        self._lock = threading.Lock()
        self._stats: dict[tuple[str, int], _PartitionStats] = {}
        self._dead: dict[str, int] = {}
        self._read: dict[str, int] = {}
        self._ends: dict[tuple[str, int], int] = {}
        labels = ["view", "partition"]
        self._events = Counter(
            "featureflow_events_applied", "events applied to a view", labels, registry=self.registry
        )
        self._late = Counter(
            "featureflow_late_events", "events too late for a view", labels, registry=self.registry
        )
        self._dlq = Counter(
            "featureflow_dead_letters",
            "records sent to the dead-letter output",
            ["source"],
            registry=self.registry,
        )
        self._offset = Gauge(
            "featureflow_applied_offset", "last applied log offset", labels, registry=self.registry
        )
        self._lag = Gauge(
            "featureflow_catch_up_lag_records",
            "records of the log as it stood at start not yet applied",
            labels,
            registry=self.registry,
        )
        self._kafka_lag = Gauge(
            "featureflow_kafka_lag_records",
            "records in Kafka not yet read, per source partition",
            ["source", "partition"],
            registry=self.registry,
        )
        self._freshness = Gauge(
            "featureflow_freshness_seconds",
            "delay from arrival to applied of the newest applied record (constant while idle)",
            labels,
            registry=self.registry,
        )
        self._age = Gauge(
            "featureflow_last_event_age_seconds",
            "now minus the arrival time of the newest applied record (grows while idle)",
            labels,
            registry=self.registry,
        )
        self._views = _ViewFreshness(self.registry)

    def serve(self, port: int) -> None:
        """Expose /metrics in Prometheus text format on 127.0.0.1:port."""
        start_http_server(port, addr="127.0.0.1", registry=self.registry)

    def applied(
        self, view: str, partition: int, result: ApplyResult, arrival_us: int | None
    ) -> None:
        """A view shard committed `result`; `arrival_us`: its newest record's arrival time
        (`newest_arrival`), its freshness now."""
        with self._lock:
            stats = self._stats.setdefault((view, partition), _PartitionStats())
            stats.applied += result.applied
            stats.late += result.late.num_rows
            stats.offset = result.progress.applied_offset
            if arrival_us is not None:
                new_child = stats.newest_arrival_us is None
                stats.newest_arrival_us = arrival_us
                stats.freshness_s = time.time() - arrival_us / 1e6
                if new_child:
                    self._age.labels(view, str(partition)).set_function(stats.age_s)
        labels = (view, str(partition))
        end = self._ends.get((view, partition))
        if end is not None:
            self._lag.labels(*labels).set(max(0, end - 1 - result.progress.applied_offset))
        self._events.labels(*labels).inc(result.applied)
        self._late.labels(*labels).inc(result.late.num_rows)
        self._offset.labels(*labels).set(result.progress.applied_offset)
        if stats.freshness_s is not None:
            self._freshness.labels(*labels).set(stats.freshness_s)
        self._views.applied(view, result.progress.newest())

    def resumed(self, view: str, newest_us: int | None) -> None:
        """The newest event time a view had applied before this run (its age starts there)."""
        self._views.applied(view, newest_us)

    def expect_freshness(self, view: str, seconds: float) -> None:
        """The view's freshness expectation (`FeatureView(freshness=)`), for the stale gauge."""
        self._views.expect(view, seconds)

    def records_read(self, source: str, n: int) -> None:
        """Records read from the log (events and records that became dead letters)."""
        with self._lock:
            self._read[source] = self._read.get(source, 0) + n

    def read_totals(self) -> dict[str, int]:
        with self._lock:
            return dict(self._read)

    def kafka_lag(self, source: str, partition: int, lag: int) -> None:
        self._kafka_lag.labels(source, str(partition)).set(lag)

    def dead_letters(self, source: str, n: int) -> None:
        if n:
            with self._lock:
                self._dead[source] = self._dead.get(source, 0) + n
            self._dlq.labels(source).inc(n)

    def totals(self) -> tuple[dict[str, int], int, int]:
        """Events applied per view, late events, dead letters."""
        with self._lock:
            per_view: dict[str, int] = {}
            late = 0
            for (view, _), s in self._stats.items():
                per_view[view] = per_view.get(view, 0) + s.applied
                late += s.late
            return per_view, late, sum(self._dead.values())

    def catch_up_target(self, view: str, partition: int, end_offset: int) -> None:
        """The log's end as of start, for the lag gauge of a view partition."""
        with self._lock:
            self._ends[(view, partition)] = end_offset

    def status_line(self) -> str:
        """One line: progress while catching up (a bar), else the live rate and freshness."""
        per_view, late, dead = self.totals()
        now = time.monotonic()
        events = max(per_view.values(), default=0)
        then, before = self._last_report
        self._last_report = (now, events)
        rate = (events - before) / (now - then) if now > then else 0.0
        head = f"[featureflow] {now - self.started:7.1f}s"
        tail = f"({rate:,.0f} events/s)  late {late:,}  dead letters {dead:,}"
        read = sum(self.read_totals().values())  # of every source: what to_catch_up counts
        if self.to_catch_up and read < self.to_catch_up:
            done = read / self.to_catch_up
            bar = "#" * int(done * 30)
            return (
                f"{head}  catching up [{bar:<30}] {done:4.0%}  "
                f"{read:,}/{self.to_catch_up:,} records read  {tail}"
            )
        fresh, age = self.freshness_s(), self.last_event_age_s()
        freshness = f"  freshness {fresh:.2f}s" if fresh is not None else ""
        idle = f"  idle (last event {age:.1f}s ago)" if events == before and age else ""
        return f"{head}  live  events {events:,}  {tail}{freshness}{idle}"

    def freshness_s(self) -> float | None:
        """Arrival-to-applied delay of the newest applied record (of the partition whose newest
        record arrived last); it stays put while the log is idle."""
        with self._lock:
            newest = max(
                (s for s in self._stats.values() if s.newest_arrival_us is not None),
                key=lambda s: s.newest_arrival_us or 0,
                default=None,
            )
        return None if newest is None else newest.freshness_s

    def last_event_age_s(self) -> float | None:
        """Seconds since the arrival of the newest applied record (max over partitions)."""
        with self._lock:
            arrivals = [s.newest_arrival_us for s in self._stats.values() if s.newest_arrival_us]
        return _age_s(max(arrivals)) if arrivals else None


class _ViewFreshness:
    """Per view: seconds since the newest applied event (event time, max over partitions), the
    expectation, and whether the age is over it. Computed when Prometheus scrapes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._newest: dict[str, int] = {}
        self._expected: dict[str, float] = {}
        self._age = Gauge(
            "featureflow_view_newest_event_age_seconds",
            "now minus the event time of the newest event the view has applied",
            ["view"],
            registry=registry,
        )
        self._limit = Gauge(
            "featureflow_view_freshness_expected_seconds",
            "the view's freshness expectation (FeatureView(freshness=))",
            ["view"],
            registry=registry,
        )
        self._stale = Gauge(
            "featureflow_view_stale",
            "1 when the newest applied event is older than the view's freshness expectation",
            ["view"],
            registry=registry,
        )

    def applied(self, view: str, newest_us: int | None) -> None:
        if newest_us is None or newest_us <= self._newest.get(view, -1):
            return
        first = view not in self._newest
        self._newest[view] = newest_us
        if first:
            self._age.labels(view).set_function(lambda: self.age_s(view) or 0.0)

    def expect(self, view: str, seconds: float) -> None:
        self._expected[view] = seconds
        self._limit.labels(view).set(seconds)
        self._stale.labels(view).set_function(lambda: float(self.stale(view)))

    def age_s(self, view: str) -> float | None:
        newest = self._newest.get(view)
        return None if newest is None else time.time() - newest / 1e6

    def stale(self, view: str) -> bool:
        """Over the expectation; a view that applied nothing yet is stale too."""
        age = self.age_s(view)
        return age is None or age > self._expected.get(view, float("inf"))


def newest_arrival(batch: LogSlice) -> int | None:
    """The arrival time (µs) of a slice's last record, if it has one."""
    if not batch.events.num_rows or ARRIVAL not in batch.events.column_names:
        return None
    arrival = batch.events.column(ARRIVAL)[-1].value
    return None if arrival is None else int(arrival)


def _age_s(arrival_us: int | None) -> float | None:
    return None if arrival_us is None else time.time() - arrival_us / 1e6


class ConsoleReporter:
    """Prints the status line every `interval_s` seconds in a daemon thread. While the flow
    catches up, a `terminal` (default: stderr) that is a terminal shows a live progress bar
    instead of the catch-up lines: records of the log as it stood at start read so far, with
    rate and ETA. The live lines follow once they are all read."""

    def __init__(
        self, metrics: Metrics, interval_s: float = 5.0, terminal: TextIO | None = None
    ) -> None:
        self._metrics, self._interval = metrics, interval_s
        self._terminal = terminal if terminal is not None else sys.stderr
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="status")

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        if self._metrics.to_catch_up and self._terminal.isatty():
            self._show_catch_up()
            self._metrics.status_line()  # the next status line's rate counts from here
        while not self._stop.wait(self._interval):
            print(self._metrics.status_line(), flush=True)

    def _show_catch_up(self) -> None:
        from tqdm import tqdm  # a terminal's progress bar: logs never load it

        total = self._metrics.to_catch_up
        with tqdm(
            total=total,
            desc="catching up",
            unit=" records",
            unit_scale=True,
            file=self._terminal,
            dynamic_ncols=True,
        ) as bar:
            while True:
                stopped = self._stop.wait(BAR_REFRESH_S)
                read = min(sum(self._metrics.read_totals().values()), total)
                _, late, dead = self._metrics.totals()
                bar.set_postfix_str(f"late {late:,}, dead letters {dead:,}", refresh=False)
                bar.update(read - bar.n)
                if stopped or read >= total:
                    return

    def stop(self) -> None:
        """Stop printing; the bar, if shown, is drawn a last time before this returns."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
