"""`python -m flows.replay`: backfill by replaying the log through the same dataflow.

Each named view (default: all) gets a new version built from the start of the log (or from
--from-time) beside the live one; when every partition has caught up with the log as it stood at
start, the new version becomes live atomically and readers switch on their next refresh. Older
complete versions beyond --keep-versions are removed, except those a running writer or reader
still uses; unfinished versions that a killed run left behind are removed and never counted. A
following `flows.run` of the same definitions continues on the new version by itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from flows.cli import command_main, exit_command
from flows.dataflow import FlowControl
from flows.errors import ConfigError
from flows.run import claim_versions, execute, load_views
from flows.runplan import build_plan
from flows.settings import (
    BATCH_MB,
    BATCH_ROWS,
    STATUS_INTERVAL,
    FlowSettings,
    option,
)
from flows.spec import FeatureView
from state.store import VersionCleanup, ViewStore
from state.timestamps import to_micros


@dataclass(frozen=True, slots=True)
class ReplaySettings(FlowSettings):
    views: str | None = option(None, "comma-separated views to rebuild (default: all)")
    from_time: str | None = option(None, "only apply events at or after this ISO-8601 UTC time")
    keep_versions: int = option(
        2,
        "how many complete versions of each view to keep (live included); versions in use "
        "are never removed, unfinished ones of killed runs are",
    )
    status_interval: float = STATUS_INTERVAL.field()
    batch_rows: int = BATCH_ROWS.field()
    batch_mb: int = BATCH_MB.field()


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("flows.replay", __doc__, ReplaySettings, _replay, argv)


def _replay(settings: ReplaySettings) -> int:
    _, views = load_views(settings)
    if settings.from_time:
        views = [_from_time(v, settings.from_time) for v in views]
    plan = build_plan(
        views,
        warehouse=settings.warehouse,
        state=Path(settings.state),
        kafka=settings.kafka,
        until_caught_up=True,
        rebuild=True,
        batch_rows=settings.batch_rows,
        batch_bytes=settings.batch_mb << 20,
    )
    for sp in plan.sources.values():
        for t in sp.targets:
            print(f"replaying view {t.view.name!r} into version v{t.version}", flush=True)
    with claim_versions(plan, 0):
        code = execute(
            plan, FlowControl(), workers=settings.workers, status_interval=settings.status_interval
        )
    store = ViewStore(settings.state)
    for sp in plan.sources.values():
        for t in sp.targets:
            _report(store.keep_versions(t.view.name, settings.keep_versions))
            print(f"view {t.view.name!r}: live version v{store.current_version(t.view.name)}")
    return code


def _report(cleanup: VersionCleanup) -> None:
    if cleanup.dropped:
        removed = ", ".join(f"v{v}" for v in cleanup.dropped)
        print(f"view {cleanup.view!r}: removed {removed}", flush=True)
    for v in cleanup.busy:
        print(
            f"view {cleanup.view!r}: kept v{v}: a running flows.run, flows.replay or reader "
            "uses it; the next replay removes it once it is free",
            flush=True,
        )


def _from_time(view: FeatureView, text: str) -> FeatureView:
    from datetime import datetime

    try:
        start = to_micros(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError as exc:
        raise ConfigError(
            f"--from-time {text!r} is not an ISO-8601 time with a timezone, e.g. "
            "2026-01-31T00:00:00Z"
        ) from exc
    user = view.transform
    ts_col = view.source.timestamp

    def since(table: pa.Table) -> pa.Table:
        ts = table.column(ts_col).cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        table = table.filter(pc.greater_equal(ts, start))
        return user(table) if user is not None else table

    transform: Callable[[pa.Table], pa.Table] = since
    return replace(view, transform=transform)


if __name__ == "__main__":
    exit_command(main())
