"""The definitions history: every definition a deployment ran, versioned, with hashes.

`flows.run` records its definitions module in `<state>/definitions/<sha256>/` (immutable, see
`state.definitions`) and, through `record_history`, appends one line per change to

    <state>/governance/history.jsonl
        {"format": 1, "recorded_at": "2026-11-27T15:00:00+00:00", "record": "<sha256>",
         "module": "/path/features.py",
         "views": {"user_spend": {"version": 3, "layout_sha256": "...", "features": [...],
                                  "owner": "", "description": "", "tags": {}}},
         "services": {"fraud_model": {"columns": [...], "sha256": "..."}}}

A line is appended only when the record or a view's version or hash differs from the last
line, so a restart of the same deployment adds nothing. Measured replay rates go beside it
(`rates.jsonl`: records read per second of a `--until-caught-up` run), for the plan's estimate.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from flows.governance.deployed import layout_key
from flows.spec import Definitions, FeatureView, Tags

HISTORY_FORMAT = 1
GOVERNANCE_DIR = "governance"
HISTORY_FILE = "history.jsonl"
RATES_FILE = "rates.jsonl"
_MIN_RATE_RECORDS = 10_000  # a shorter run measures start-up, not throughput


@dataclass(frozen=True, slots=True)
class ViewRevision:
    """One definition of a view as a deployment ran it."""

    recorded_at: str
    record: str
    version: int
    layout_sha256: str
    features: tuple[str, ...]


def tag_map(tags: Tags) -> dict[str, str]:
    """Tags as a dict: a list `["pii"]` becomes `{"pii": ""}`."""
    if isinstance(tags, Mapping):
        return {str(k): str(v) for k, v in tags.items()}
    return {str(t): "" for t in tags}


def layout_sha256(view: FeatureView) -> str:
    """The hash of a view's stored semantics (its layout), as the history keeps it."""
    return hashlib.sha256(layout_key(view.layout()).encode()).hexdigest()


def record_history(
    state: Path, record: str, defs: Definitions, versions: Mapping[str, int]
) -> bool:
    """Append the deployment's definitions to the history unless they equal the last entry.

    Returns:
        True when a line was appended.
    """
    entry = _entry(record, defs, versions)
    entries = read_history(state)
    if entries and _same(entries[-1], entry):
        return False
    path = state / GOVERNANCE_DIR / HISTORY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    _append(path, entry)
    return True


def _entry(record: str, defs: Definitions, versions: Mapping[str, int]) -> dict[str, Any]:
    views = {
        name: {
            "version": versions[name],
            "layout_sha256": layout_sha256(view),
            "features": list(view.feature_names()),
            "owner": view.owner,
            "description": view.description,
            "tags": tag_map(view.tags),
        }
        for name, view in defs.views.items()
        if name in versions
    }
    services = {
        name: {
            "columns": list(plan.columns),
            "sha256": hashlib.sha256("\n".join(plan.columns).encode()).hexdigest(),
        }
        for name, plan in defs.plans.items()
    }
    return {
        "format": HISTORY_FORMAT,
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "record": record,
        "module": str(defs.path),
        "views": views,
        "services": services,
    }


def _same(last: Mapping[str, Any], entry: Mapping[str, Any]) -> bool:
    keep = ("record", "views", "services")
    return all(last.get(k) == entry.get(k) for k in keep)


def _append(path: Path, entry: Mapping[str, Any]) -> None:
    # One write of one line with O_APPEND: concurrent appenders never interleave lines.
    line = orjson.dumps(entry) + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_history(state: Path) -> list[dict[str, Any]]:
    """Every history entry, oldest first (a torn last line of a crash is skipped)."""
    return _read_lines(state / GOVERNANCE_DIR / HISTORY_FILE)


def view_history(state: Path, view: str) -> list[ViewRevision]:
    """The definitions a view went through: one revision per change of version or hash."""
    revisions: list[ViewRevision] = []
    for entry in read_history(state):
        got = entry.get("views", {}).get(view)
        if got is None:
            continue
        rev = ViewRevision(
            recorded_at=str(entry["recorded_at"]),
            record=str(entry["record"]),
            version=int(got["version"]),
            layout_sha256=str(got["layout_sha256"]),
            features=tuple(got["features"]),
        )
        if not revisions or (rev.version, rev.layout_sha256) != (
            revisions[-1].version,
            revisions[-1].layout_sha256,
        ):
            revisions.append(rev)
    return revisions


def record_rate(state: Path, records: int, seconds: float) -> None:
    """Keep a measured replay rate (records read / seconds) when the run was long enough."""
    if records < _MIN_RATE_RECORDS or seconds <= 0:
        return
    path = state / GOVERNANCE_DIR / RATES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    _append(path, {"records": records, "seconds": round(seconds, 3), "at": _now()})


def measured_rate(state: Path) -> float | None:
    """Records per second of the newest measured replay (None when nothing was measured)."""
    rates = _read_lines(state / GOVERNANCE_DIR / RATES_FILE)
    if not rates:
        return None
    last = rates[-1]
    return float(last["records"]) / float(last["seconds"])


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out: list[dict[str, Any]] = []
    for line in path.read_bytes().splitlines():
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue  # a torn line of a crashed append
    return out


def recorded_versions(entries: Sequence[Mapping[str, Any]], view: str) -> list[int]:
    """The versions of a view the history names, oldest first, each once."""
    seen: dict[int, None] = {}
    for entry in entries:
        got = entry.get("views", {}).get(view)
        if got is not None:
            seen.setdefault(int(got["version"]), None)
    return list(seen)
