"""Skew: every logged online read recomputed offline, through the snapshot path, and compared.

For each view read in the served-feature log (`state.servedlog`; a service read counts as one
read of each view it serves) the same (key, at) is answered by `flows.pointintime.point_in_time`
over the log as it stands now (segments, then Kafka), with the events the view keeps
(`kept_events`): the code `flows.snapshot` runs. Each feature is then equal (exactly, or within
a relative 1e-9 for floating point), or a mismatch, explained when a cause is found:

- "arrived after the read": the value over only the events whose `_arrival` (ingestion time) is
  not after the read's `served_at` equals the served one. The event existed in event time but
  not yet in the log when the read was served.
- "not yet applied at the read": excluding the newest-arrived events of the key (arrived before
  the read, within `apply_lag_s`) gives the served value: the flow had not applied them yet.
- "view version changed": the read was served by a version whose layout differs from the
  definitions compared with (or by a version that no longer exists).

Anything else stays unexplained: a real skew (a damaged view, a bug), the thing to look at.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from connectors.envelope import ARRIVAL, TIMESTAMP_US
from connectors.segments import Warehouse
from flows.aggregate import entity_keys
from flows.errors import FlowError
from flows.pointintime import kept_events, point_in_time
from flows.snapshot import build_service_snapshot, read_log
from flows.spec import Definitions, FeatureView
from state.codec import key_text
from state.errors import StateError
from state.layout import ViewLayout
from state.store import ViewStore, read_layout

TOLERANCE = 1e-9
ARRIVED_LATE = "arrived after the read"
NOT_APPLIED = "not yet applied at the read"
VERSION_CHANGED = "view version changed"
UNEXPLAINED = "unexplained"


@dataclass(frozen=True, slots=True)
class Read:
    """One logged read of one view: which key, as of when, served when, by which version."""

    view: str
    key: str
    at_us: int
    served_at_us: int
    version: int | None
    values: Mapping[str, Any]
    service_row: int | None = None  # the service read it is part of (`ServiceRow` index)


@dataclass(frozen=True, slots=True)
class ServiceRow:
    """One logged service read: its request row and the vector served."""

    service: str
    request: Mapping[str, Any]
    at_us: int
    served_at_us: int
    values: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Mismatch:
    view: str
    feature: str
    key: str
    at: str
    served_at: str
    served: Any
    offline: Any
    reason: str


@dataclass(frozen=True, slots=True)
class FeatureSkew:
    """The comparison of one feature over every logged read of its view."""

    view: str
    feature: str
    rows: int
    exact: int
    within_tolerance: int
    mismatches: int
    max_abs_diff: float | None
    max_rel_diff: float | None
    reasons: dict[str, int]
    examples: tuple[Mismatch, ...]


@dataclass(frozen=True, slots=True)
class SkewReport:
    reads: int  # view reads in the log (service reads counted per view they read)
    compared: int
    skipped: dict[str, int]
    features: tuple[FeatureSkew, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def unexplained(self) -> int:
        return sum(f.reasons.get(UNEXPLAINED, 0) for f in self.features)

    @property
    def mismatches(self) -> int:
        return sum(f.mismatches for f in self.features)


def logged_reads(served: pa.Table, defs: Definitions) -> tuple[list[Read], list[ServiceRow]]:
    """The reads in a served-feature log: view rows as they are, and each service row both as
    a `ServiceRow` and split into one read per view it serves (key from its entity columns)."""
    reads: list[Read] = []
    services: list[ServiceRow] = []
    for row in served.to_pylist():
        at, when = _micros(row["at"]), _micros(row["served_at"])
        values = orjson.loads(row["values"])
        if row["kind"] == "view":
            reads.append(Read(row["name"], row["key"], at, when, row["version"], values))
        elif row["name"] in defs.plans:
            request = orjson.loads(row["request"])
            services.append(ServiceRow(row["name"], request, at, when, values))
            for r in defs.plans[row["name"]].reads:
                parts = [request.get(c) for c in r.entity_columns]
                if any(p is None for p in parts):
                    continue
                got = {f: values[r.column(f)] for f in r.features if r.column(f) in values}
                one = Read(r.view, key_text(parts), at, when, None, got, len(services) - 1)
                reads.append(one)
    return reads, services


def _micros(value: datetime) -> int:
    return (value - datetime(1970, 1, 1, tzinfo=UTC)) // _US


_US = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)


def skew_report(
    defs: Definitions,
    reads: Sequence[Read],
    warehouse: Warehouse,
    kafka: str | None,
    state: Path | None,
    *,
    services: Sequence[ServiceRow] = (),
    examples: int = 5,
    apply_lag_s: float = 60.0,
) -> SkewReport:
    """Recompute every read offline and compare, feature by feature; the on-demand outputs
    of service reads through `build_service_snapshot`, the code `flows.snapshot --service`
    runs, a mismatch explained by the cause found for its row's view inputs."""
    skipped: Counter[str] = Counter()
    row_causes: dict[int, list[str]] = {}  # service row -> causes of its view mismatches
    logs: dict[str, list[pa.Table]] = {}
    results: list[FeatureSkew] = []
    by_view: dict[str, list[Read]] = {}
    for read in reads:
        by_view.setdefault(read.view, []).append(read)
    for name, group in sorted(by_view.items()):
        if name not in defs.views:
            skipped[f"view {name!r} is not in the definitions"] += len(group)
            continue
        view = defs.views[name]
        if view.source.name not in logs:
            logs[view.source.name] = read_log(view.source, warehouse, kafka)
        checker = _ViewCheck(view, defs.layouts[name], logs[view.source.name], group)
        stale = _changed_versions(state, name, defs.layouts[name], group)
        results += checker.compare(stale, examples, int(apply_lag_s * 1e6), row_causes)
    compared = sum(len(g) for n, g in by_view.items() if n in defs.views)
    results += service_skew(defs, services, warehouse, kafka, row_causes, examples, skipped)
    return SkewReport(len(reads), compared, dict(skipped), tuple(results))


def service_skew(
    defs: Definitions,
    rows: Sequence[ServiceRow],
    warehouse: Warehouse,
    kafka: str | None,
    row_causes: Mapping[int, list[str]],
    examples: int,
    skipped: Counter[str],
) -> list[FeatureSkew]:
    """The on-demand outputs of logged service reads against the offline service snapshot."""
    out: list[FeatureSkew] = []
    for name in sorted({r.service for r in rows}):
        index = [i for i, r in enumerate(rows) if r.service == name]
        plan = defs.plans[name]
        spine = pa.Table.from_pylist([dict(rows[i].request) for i in index]).append_column(
            "ts", pa.array([rows[i].at_us for i in index], pa.timestamp("us", tz="UTC"))
        )
        try:
            offline = build_service_snapshot(plan, defs.views, spine, warehouse, kafka,
                                             allow_empty=True)  # fmt: skip
        except (FlowError, StateError) as exc:
            skipped[f"service {name!r}: {exc}"] += len(index)
            continue
        for step in plan.steps:
            for output, _ in step.outputs:
                column = f"{step.name}__{output}"
                got = offline.column(column).to_pylist()
                out.append(_output_skew(name, column, rows, index, got, row_causes, examples))
    return out


def _output_skew(
    service: str,
    column: str,
    rows: Sequence[ServiceRow],
    index: list[int],
    offline: list[Any],
    row_causes: Mapping[int, list[str]],
    examples: int,
) -> FeatureSkew:
    counts: Counter[str] = Counter()
    causes: Counter[str] = Counter()
    shown: list[Mismatch] = []
    diffs: list[tuple[float | None, float | None]] = []
    for j, i in enumerate(index):
        served = rows[i].values.get(column)
        verdict = compare_values(served, offline[j])
        counts[verdict] += 1
        if verdict != "differ":
            continue
        found = row_causes.get(i, [])
        reason = found[0] if found and UNEXPLAINED not in found else UNEXPLAINED
        causes[reason] += 1
        diffs.append(differences(served, offline[j]))
        if len(shown) < examples:
            key = orjson.dumps(dict(rows[i].request)).decode()
            at, when = _iso(rows[i].at_us), _iso(rows[i].served_at_us)
            shown.append(Mismatch(service, column, key, at, when, served, offline[j], reason))
    absolute = [a for a, _ in diffs if a is not None]
    relative = [r for _, r in diffs if r is not None]
    return FeatureSkew(
        service, column, len(index), counts["exact"], counts["close"], counts["differ"],
        max(absolute, default=None), max(relative, default=None), dict(causes), tuple(shown),
    )  # fmt: skip


def _changed_versions(
    state: Path | None, view: str, layout: ViewLayout, reads: Sequence[Read]
) -> set[int]:
    """The versions among the reads whose layout is not the definitions' (or is gone)."""
    if state is None:
        return set()
    store = ViewStore(state, create=False)
    changed: set[int] = set()
    for version in {r.version for r in reads if r.version is not None}:
        try:
            same = read_layout(store.version_dir(view, version)).same_semantics(layout)
        except StateError:
            same = False
        if not same:
            changed.add(version)
    return changed


class _ViewCheck:
    """The offline values of one view's reads, and the search for a cause of a mismatch."""

    def __init__(
        self, view: FeatureView, layout: ViewLayout, log: list[pa.Table], reads: Sequence[Read]
    ) -> None:
        self.view, self.layout, self.reads = view, layout, reads
        wanted = pa.array(sorted({r.key for r in reads}), pa.string())
        events = kept_events(layout, log, view.transform)
        if events.num_rows:
            self.keys = entity_keys(events, layout)
            keep = pc.is_in(self.keys, value_set=wanted)
            events, self.keys = events.filter(keep), self.keys.filter(keep)
        self.events = events
        self.offline = self._values(events, [r.key for r in reads], [r.at_us for r in reads])

    def _values(self, events: pa.Table, keys: list[str], times: list[int]) -> dict[str, list[Any]]:
        got = point_in_time(
            self.layout, events, pa.array(keys, pa.string()), np.asarray(times, dtype=np.int64)
        )
        return {name: column.to_pylist() for name, column in got.items()}

    def compare(
        self, stale: set[int], examples: int, lag_us: int, row_causes: dict[int, list[str]]
    ) -> list[FeatureSkew]:
        reasons: dict[int, str] = {}  # read index -> the cause of its mismatches
        out: list[FeatureSkew] = []
        for feature in self.layout.features:
            out.append(self._feature(feature.name, stale, reasons, examples, lag_us))
        for i, reason in reasons.items():
            row = self.reads[i].service_row
            if row is not None:
                row_causes.setdefault(row, []).append(reason)
        return out

    def _feature(
        self, name: str, stale: set[int], reasons: dict[int, str], examples: int, lag_us: int
    ) -> FeatureSkew:
        exact = close = rows = 0
        max_abs: float | None = None
        max_rel: float | None = None
        causes: Counter[str] = Counter()
        shown: list[Mismatch] = []
        for i, read in enumerate(self.reads):
            if name not in read.values:
                continue  # the version served had no such feature (or the service not it)
            rows += 1
            served, offline = read.values[name], self.offline[name][i]
            verdict = compare_values(served, offline)
            if verdict == "exact":
                exact += 1
                continue
            if verdict == "close":
                close += 1
                continue
            a, r = differences(served, offline)
            max_abs = a if max_abs is None or (a is not None and a > max_abs) else max_abs
            max_rel = r if max_rel is None or (r is not None and r > max_rel) else max_rel
            if i not in reasons:
                reasons[i] = self._cause(i, stale, lag_us)
            causes[reasons[i]] += 1
            if len(shown) < examples:
                shown.append(self._example(read, name, offline, reasons[i]))
        return FeatureSkew(
            self.layout.view, name, rows, exact, close, rows - exact - close, max_abs, max_rel,
            dict(causes), tuple(shown),
        )  # fmt: skip

    def _example(self, read: Read, name: str, offline: Any, reason: str) -> Mismatch:
        return Mismatch(
            read.view, name, read.key, _iso(read.at_us), _iso(read.served_at_us),
            read.values[name], offline, reason,
        )  # fmt: skip

    def _cause(self, i: int, stale: set[int], lag_us: int) -> str:
        read = self.reads[i]
        if read.version is not None and read.version in stale:
            return VERSION_CHANGED
        if not self.events.num_rows or ARRIVAL not in self.events.column_names:
            return UNEXPLAINED
        mine = self.events.filter(pc.equal(self.keys, read.key))
        arrival = _arrivals(mine)
        cutoffs = [read.served_at_us + 1]  # keep what had arrived by the read
        before = np.sort(arrival[(arrival <= read.served_at_us)])[::-1]
        cutoffs += [int(a) for a in before[:50] if a >= read.served_at_us - lag_us]
        for n, cutoff in enumerate(cutoffs):
            if self._matches(read, mine.filter(pa.array(arrival < cutoff))):
                if n == 0:
                    return ARRIVED_LATE if (arrival > read.served_at_us).any() else UNEXPLAINED
                return NOT_APPLIED
        return UNEXPLAINED

    def _matches(self, read: Read, events: pa.Table) -> bool:
        got = self._values(events, [read.key], [read.at_us])
        return all(
            compare_values(read.values[name], got[name][0]) != "differ"
            for name in read.values
            if name in got
        )


def _arrivals(events: pa.Table) -> np.ndarray:
    column = events.column(ARRIVAL).cast(TIMESTAMP_US).cast(pa.int64())
    return np.asarray(column.fill_null(0).to_numpy(), dtype=np.int64)


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat(timespec="milliseconds")


def compare_values(served: Any, offline: Any) -> str:
    """ "exact", "close" (floats within a relative 1e-9) or "differ"; JSON has no NaN, so a
    served null equals an offline NaN."""
    if served == offline:
        return "exact"
    if isinstance(offline, float) and math.isnan(offline) and served is None:
        return "exact"
    if isinstance(served, list) and isinstance(offline, list) and len(served) == len(offline):
        verdicts = [compare_values(a, b) for a, b in zip(served, offline, strict=True)]
        return "differ" if "differ" in verdicts else "close"
    numbers = _number(served) and _number(offline)
    if numbers and math.isclose(float(served), float(offline), rel_tol=TOLERANCE, abs_tol=1e-12):
        return "close"
    return "differ"


def differences(served: Any, offline: Any) -> tuple[float | None, float | None]:
    """Absolute and relative difference of two numbers (None when not both numbers)."""
    if not (_number(served) and _number(offline)):
        return None, None
    a = abs(float(served) - float(offline))
    scale = max(abs(float(served)), abs(float(offline)))
    return a, (a / scale if scale else 0.0)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
