"""An independent NumPy oracle for vector features, over events as plain Python rows.

It shares no code with the platform: the window is computed from the definition's numbers
(start(t) = floor(t / hop) * hop - window, t exclusive), vectors are averaged with np.mean and
the last/first vector is chosen by (event time, offset). Records whose vector length is not the
length of their key's first non-null vector (in offset order) are left out whole, as the
platform dead-letters them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from state.layout import FeatureDef, ViewLayout

MINUTE = 60_000_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR


@dataclass(frozen=True, slots=True)
class Event:
    key: str
    ts: int
    offset: int
    values: dict[str, Any]  # column -> value (a vector is a list or None)


def events_of(table: pa.Table, key: str, ts: str, columns: Sequence[str]) -> list[Event]:
    """The rows of a log table (with `_offset`, and `_partition` when several partitions)."""
    times = table.column(ts).cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_pylist()
    keys = table.column(key).to_pylist()
    offsets = table.column("_offset").to_pylist()
    parts = table.column("_partition").to_pylist() if "_partition" in table.column_names else None
    data = {c: table.column(c).to_pylist() for c in columns}
    return [
        Event(
            str(keys[i]),
            times[i],
            offsets[i] + (0 if parts is None else parts[i] << 40),
            {c: data[c][i] for c in columns},
        )
        for i in range(table.num_rows)
    ]


def well_formed(events: Iterable[Event], vector_columns: Sequence[str]) -> list[Event]:
    """The events without those whose vector length differs from their key's first one."""
    fixed: dict[tuple[str, str], int] = {}
    kept = []
    for e in sorted(events, key=lambda e: (e.key, e.offset)):
        ok = True
        for c in vector_columns:
            v = e.values[c]
            if v and fixed.get((e.key, c), len(v)) != len(v):
                ok = False
        if ok:
            for c in vector_columns:
                if e.values[c]:
                    fixed.setdefault((e.key, c), len(e.values[c]))
            kept.append(e)
    return kept


def feature_value(f: FeatureDef, events: Sequence[Event], t: int) -> Any:
    """The value of feature `f` over one key's (well-formed) events as of t."""
    start = (t // f.hop_us) * f.hop_us - f.window_us if f.window_us else None
    rows = [e for e in events if e.ts < t and (start is None or e.ts >= start)]
    if f.column is None:
        return len(rows)
    present = [e for e in rows if e.values[f.column] not in (None, [])]
    if f.agg == "count":
        return len(present)
    if not present:
        return None
    if f.agg == "mean":
        if isinstance(present[0].values[f.column], list):
            return np.mean(np.array([e.values[f.column] for e in present]), axis=0).tolist()
        return float(np.mean([e.values[f.column] for e in present]))
    pick = (max if f.agg == "last" else min)(present, key=lambda e: (e.ts, e.offset))
    return pick.values[f.column]


def oracle_rows(
    layout: ViewLayout, events: Sequence[Event], keys: Sequence[str], times: Sequence[int]
) -> list[dict[str, Any]]:
    by_key: dict[str, list[Event]] = {}
    for e in events:
        by_key.setdefault(e.key, []).append(e)
    return [
        {f.name: feature_value(f, by_key.get(k, []), t) for f in layout.features}
        for k, t in zip(keys, times, strict=True)
    ]


def same(a: Any, b: Any, rel: float = 1e-9) -> bool:
    """Equal values: ints exactly, floats and vectors to `rel` relative tolerance."""
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, list) or isinstance(b, list):
        if not (isinstance(a, list) and isinstance(b, list)) or len(a) != len(b):
            return False
        return bool(np.allclose(a, b, rtol=rel, atol=1e-12))
    if isinstance(a, float) or isinstance(b, float):
        return bool(np.isclose(a, b, rtol=rel, atol=1e-12))
    return bool(a == b)


def differences(
    layout: ViewLayout, expected: Sequence[dict[str, Any]], got: Sequence[dict[str, Any]]
) -> list[tuple[int, str, Any, Any]]:
    """(row, feature, expected, got) of every value that differs."""
    assert len(expected) == len(got)
    return [
        (i, f.name, exp[f.name], row[f.name])
        for i, (exp, row) in enumerate(zip(expected, got, strict=True))
        for f in layout.features
        if not same(exp[f.name], row[f.name])
    ]
