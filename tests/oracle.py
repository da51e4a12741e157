"""An independent oracle: feature values computed by DuckDB SQL straight from raw events.

Shared by the tests; it knows the window semantics of ARCHITECTURE.md and nothing of tiles:
value(k, t) = agg{ e.value : e.key = k and floor(t/H)*H - W <= e.ts < t } (no lower bound for
lifetime features), nulls skipped, count/sum of nothing = 0, other aggregations of nothing = NULL.
"""

from __future__ import annotations

import builtins
import math
from typing import Any

import duckdb
import pyarrow as pa

from state.layout import FeatureDef, ViewLayout


def oracle_values(layout: ViewLayout, events: pa.Table, spine: pa.Table) -> pa.Table:
    """One row per spine row (columns `row`, then one per feature) computed by DuckDB."""
    con = duckdb.connect()
    ts_us = events.column(layout.timestamp).cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    ev = events.append_column("ts_us", ts_us)
    key_col = ev.column(layout.key).cast(pa.string())
    ev = ev.set_column(ev.column_names.index(layout.key), "k", key_col)
    con.register("ev", ev)
    con.register("spine", spine)
    selects = [_feature_sql(f) for f in layout.features]
    sql = f"""
        SELECT s.row, {", ".join(selects)}
        FROM spine s LEFT JOIN ev e ON e.k = s.k AND e.ts_us < s.t
        GROUP BY s.row ORDER BY s.row"""
    return con.sql(sql).to_arrow_table()


def _feature_sql(f: FeatureDef) -> str:
    col = f'e."{f.column}"' if f.column else "e.ts_us"
    cond = "TRUE"
    if f.window_us:
        cond = f"e.ts_us >= (s.t // {f.hop_us}) * {f.hop_us} - {f.window_us}"
    if f.agg in ("first", "last"):
        fn = "arg_min" if f.agg == "first" else "arg_max"
        expr = f"{fn}({col}, (e.ts_us, e._offset)) FILTER (WHERE {cond} AND {col} IS NOT NULL)"
    elif f.agg == "last_k":
        expr = (
            f"list({col} ORDER BY e.ts_us DESC, e._offset DESC) "
            f"FILTER (WHERE {cond} AND {col} IS NOT NULL)[1:{int(f.param or 1)}]"
        )
    elif f.agg == "distinct_count":
        expr = f"count(DISTINCT {col}) FILTER (WHERE {cond})"
    elif f.agg == "percentile":
        expr = f"list({col}) FILTER (WHERE {cond} AND {col} IS NOT NULL)"
    elif f.agg == "sum":
        expr = f"coalesce(sum({col}) FILTER (WHERE {cond}), 0)"
    else:
        fn = {
            "count": "count",
            "mean": "avg",
            "min": "min",
            "max": "max",
            "var": "var_pop",
            "std": "stddev_pop",
        }[f.agg]
        expr = f"{fn}({col}) FILTER (WHERE {cond})"
    return f'{expr} AS "{f.name}"'  # percentile: the raw values, for a rank check


def same(expected: Any, got: Any, rel: float = 1e-9) -> bool:
    """Equal, or both floats within `rel` relative tolerance (tiny absolute slack near 0)."""
    if expected is None or got is None:
        return expected is None and got is None
    if isinstance(expected, float) or isinstance(got, float):
        return math.isclose(float(expected), float(got), rel_tol=rel, abs_tol=1e-9)
    return bool(expected == got)


def rank_ok(values: list[float] | None, q: float, got: float | None) -> bool:
    """KLL's guarantee: got's rank among the exact values is within 2 x its rank error of q."""
    from state.sketches import KLL_RANK_ERROR

    if not values:
        return got is None
    if got is None:
        return False
    below = builtins.sum(v < got for v in values) / len(values)
    upto = builtins.sum(v <= got for v in values) / len(values)
    slack = 2 * KLL_RANK_ERROR + 1 / len(values)
    return below - slack <= q <= upto + slack


def feature_ok(f: FeatureDef, expected: Any, got: Any) -> bool:
    """One feature value against the oracle: exact aggregations to 1e-9, sketches within their
    stated bounds (percentile: rank error; distinct count: 3 standard errors)."""
    from state.sketches import HLL_RSE

    if f.agg == "percentile":
        return rank_ok(expected, float(f.param or 0), got)
    if f.agg == "distinct_count":
        if not expected:
            return got is None
        return got is not None and abs(got - expected) <= builtins.max(1, 3 * HLL_RSE * expected)
    if f.agg == "last_k":
        return (expected or None) == got
    return same(expected, got)


def mismatches(
    layout: ViewLayout, expected: pa.Table, got: list[dict[str, Any]], prefix: str = ""
) -> list[str]:
    """Every (row, feature) where `got` disagrees with the oracle, described."""
    out = []
    for i, (exp, row) in enumerate(zip(expected.to_pylist(), got, strict=True)):
        for f in layout.features:
            if not feature_ok(f, exp[f.name], row[prefix + f.name]):
                out.append(
                    f"row {i} {f.name}: oracle {exp[f.name]!r}, got {row[prefix + f.name]!r}"
                )
    return out
