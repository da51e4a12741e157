"""`python -m flows.plan`: what a definitions change will do before `flows.run` does it.

Compares the definitions module (`--features`) with what the state directory (`--state`) runs:
for each source, view and service new / changed (what, and whether the view needs a new
version, i.e. a replay) / unchanged / removed; for each replay the events in the log, an
estimated time and state size; and every breaking change (a feature a recorded service serves
taken away), which `flows.run` refuses unless `--allow-breaking`. Exit code 0 when nothing
changes, 2 when something does (like `terraform plan -detailed-exitcode`), 1 on an error.

The dataflow planner that used to live here (which view versions to write, which offsets to
read) is `flows.runplan`.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from connectors.segments import Warehouse
from flows.cli import KNOWN_ERRORS, command_main
from flows.governance.cost import with_costs
from flows.governance.deployed import read_deployed
from flows.governance.diff import UNCHANGED, Change, Plan, diff_definitions
from flows.settings import (
    DeploymentSettings,
    option,
)
from flows.spec import load_definitions

EXIT_SAME, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2
_MARK = {"new": "+", "changed": "~", "unchanged": "=", "removed": "-"}


@dataclasses.dataclass(frozen=True, slots=True)
class PlanSettings(DeploymentSettings):
    json: bool = option(False, "print the plan as one JSON document")


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("flows.plan", __doc__, PlanSettings, _plan, argv)


def _plan(settings: PlanSettings) -> int:
    try:
        plan = make_plan(
            settings.features, Path(settings.state), settings.warehouse, settings.kafka
        )
    except KNOWN_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if settings.json:
        print(orjson.dumps(plan_json(plan), option=orjson.OPT_INDENT_2).decode())
    else:
        print("\n".join(plan_lines(plan)))
    return EXIT_CHANGES if plan.changed else EXIT_SAME


def make_plan(features: str | Path, state: Path, warehouse: str | Path, kafka: str | None) -> Plan:
    """Diff the definitions module with the state directory, with replay costs."""
    defs = load_definitions(features)
    deployed = read_deployed(state)
    return with_costs(diff_definitions(defs, deployed), defs, deployed, Warehouse(warehouse), kafka)


def plan_json(plan: Plan) -> dict[str, Any]:
    """The plan as plain data: {"changed", "changes": {kind: [...]}, "breaking", "notes"}."""
    return {
        "changed": plan.changed,
        "changes": {
            kind: [dataclasses.asdict(c) for c in plan.of(kind)]
            for kind in ("source", "view", "service")
        },
        "breaking": [dataclasses.asdict(b) for b in plan.breaking],
        "notes": list(plan.notes),
    }


def plan_lines(plan: Plan) -> list[str]:
    """The plan as text a person reads."""
    lines: list[str] = [f"note: {n}" for n in plan.notes]
    for kind in ("source", "view", "service"):
        lines.append(f"{kind}s:")
        lines += [line for c in plan.of(kind) for line in _change_lines(c)] or ["  (none)"]
    for b in plan.breaking:
        lines.append(f"BREAKING: service {b.service!r} column {b.column!r}: {b.reason}")
    if plan.breaking:
        lines.append(
            "flows.run refuses these definitions (the live versions stay as they are) unless "
            "given --allow-breaking; retrain or update the models first"
        )
    lines.append(_summary(plan))
    return lines


def _change_lines(c: Change) -> list[str]:
    version = " (new version: replay)" if c.new_version else ""
    lines = [f"  {_MARK[c.status]} {c.name}: {c.status}{version}"]
    lines += [f"      {d}" for d in c.details]
    if c.replay is not None:
        r = c.replay
        events = "unknown" if r.events is None else f"{r.events:,}"
        secs = "unknown" if r.seconds is None else f"~{r.seconds:,.1f} s"
        size = "unknown" if r.state_bytes is None else f"~{r.state_bytes / 1e6:,.1f} MB"
        lines.append(
            f"      replay: {events} events, {secs} at {r.rate:,.0f} events/s "
            f"({r.rate_source}), state {size}"
        )
    return lines


def _summary(plan: Plan) -> str:
    counts = {s: sum(c.status == s for c in plan.changes) for s in _MARK}
    replays = [c.replay for c in plan.changes if c.replay is not None]
    events = sum(r.events or 0 for r in replays)
    seconds = sum(r.seconds or 0.0 for r in replays)
    head = ", ".join(f"{n} {s}" for s, n in counts.items() if n or s == UNCHANGED)
    return (
        f"plan: {head}; {len(replays)} view(s) to replay ({events:,} events, ~{seconds:,.1f} s); "
        f"{len(plan.breaking)} breaking; exit {EXIT_CHANGES if plan.changed else EXIT_SAME}"
    )


if __name__ == "__main__":
    sys.exit(main())
