"""`python -m flows.skew`: recompute the logged online reads offline and report every difference.

Reads the served-feature log (`<warehouse>/_served/`, written by a `FeatureClient` given a
`ServedLog`), answers each read again at its `at` through the snapshot path over the log, and
prints per feature: rows compared, exact matches, matches within 1e-9, mismatches, the largest
absolute and relative difference, the causes found (arrived after the read, not yet applied,
view version changed; else unexplained) and examples. Exit code 0 when every mismatch is
explained, 3 when some is not (a real skew), 2 on an error.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from connectors.segments import Warehouse
from flows.cli import command_main
from flows.errors import ConfigError
from flows.governance.errors import ServedLogError
from flows.governance.skew import SkewReport, logged_reads, skew_report
from flows.settings import (
    DeploymentSettings,
    option,
)
from flows.spec import load_definitions
from state.servedlog import SERVED_DIR, read_served

EXIT_CLEAN, EXIT_SKEW = 0, 3


@dataclasses.dataclass(frozen=True, slots=True)
class SkewSettings(DeploymentSettings):
    examples: int = option(5, "mismatches shown per feature", minimum=0)
    apply_lag: float = option(
        60.0,
        "seconds before a read within which an event may have arrived and not been applied yet",
    )
    since: str | None = option(
        None, "only reads served at or after this ISO time (e.g. 2026-11-27T00:00Z)"
    )
    json: bool = option(False, "print the report as one JSON document")


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("flows.skew", __doc__, SkewSettings, _skew, argv)


def _skew(settings: SkewSettings) -> int:
    report = run_skew(settings.features, settings.warehouse, settings.kafka, Path(settings.state),
                      examples=settings.examples, apply_lag_s=settings.apply_lag,
                      since=_since(settings.since))  # fmt: skip
    if settings.json:
        print(orjson.dumps(report_json(report), option=orjson.OPT_INDENT_2).decode())
    else:
        print("\n".join(report_lines(report)))
    return EXIT_SKEW if report.unexplained else EXIT_CLEAN


def run_skew(
    features: str | Path,
    warehouse: str | Path,
    kafka: str | None,
    state: Path | None,
    *,
    examples: int = 5,
    apply_lag_s: float = 60.0,
    since: datetime | None = None,
) -> SkewReport:
    """Read the served-feature log of `warehouse` and compare every read (served at or after
    `since`) with the log.

    Raises:
        ServedLogError: the warehouse holds no served-feature log.
    """
    defs = load_definitions(features)
    served = read_served(warehouse)
    if not served.num_rows:
        raise ServedLogError(
            f"no served-feature log in {warehouse}/{SERVED_DIR}: give the FeatureClient a "
            "served_log=ServedLog(warehouse) and serve "
            "some reads first"
        )
    if since is not None:
        served = served.filter(pc.greater_equal(served.column("served_at"), pa.scalar(since)))
    reads, services = logged_reads(served, defs)
    state = state if state is not None and (state / "FORMAT").is_file() else None
    wh = Warehouse(warehouse)
    return skew_report(defs, reads, wh, kafka, state, services=services, examples=examples,
                       apply_lag_s=apply_lag_s)  # fmt: skip


def _since(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(
            f"--since {text!r} is not an ISO-8601 time; write e.g. 2026-11-27T00:00:00Z"
        ) from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def report_json(report: SkewReport) -> dict[str, Any]:
    """The report as plain data, with its totals."""
    return {
        **dataclasses.asdict(report),
        "mismatches": report.mismatches,
        "unexplained": report.unexplained,
    }


def report_lines(report: SkewReport) -> list[str]:
    """The report as text: one line per feature, then the examples of each mismatch."""
    lines = [f"skew: {report.reads:,} logged view reads, {report.compared:,} compared"]
    lines += [f"  skipped {n:,}: {why}" for why, n in report.skipped.items()]
    for f in report.features:
        diff = "" if f.max_abs_diff is None else f"; max abs {f.max_abs_diff:.6g}"
        rel = "" if f.max_rel_diff is None else f", max rel {f.max_rel_diff:.3g}"
        causes = ", ".join(f"{why} {n}" for why, n in f.reasons.items())
        lines.append(
            f"{f.view}__{f.feature}: {f.rows:,} rows, {f.exact:,} exact, "
            f"{f.within_tolerance:,} within 1e-9, {f.mismatches:,} mismatches"
            f"{diff}{rel}{'; ' + causes if causes else ''}"
        )
        lines += [
            f"    key {m.key!r} at {m.at} (served {m.served_at}): served {m.served!r}, "
            f"offline {m.offline!r} - {m.reason}"
            for m in f.examples
        ]
    lines.append(f"total: {report.mismatches:,} mismatches, {report.unexplained:,} unexplained")
    return lines


if __name__ == "__main__":
    sys.exit(main())
