"""The health report: one self-contained HTML file with plots of a deployment's state.

Plots are made with plotly (plotly.js inlined once, so the file opens offline and its charts
stay interactive: hover for values, zoom into a time range). Sections, each a `<section>` with
a stable id the browser test looks for:

- `features`: per feature the distribution of its values over a sample of each view's keys
  (read through the FeatureClient as of the view's newest applied event) and its null rate;
- `freshness`: per view the age of its newest applied event against its expectation, and
  applied events over time (the log's records by arrival time, up to what the view applied);
- `dead-letters`: dead letters (bad records and late events) over time, by reason;
- `versions`: view versions built and switched live, and the deployments recorded, on a
  timeline;
- `skew`: the served-feature log recomputed offline (flows.skew), per feature.
"""

from __future__ import annotations

import html
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pyarrow as pa
import pyarrow.compute as pc

from connectors.deadletters import read_dead_letters
from connectors.envelope import ARRIVAL
from connectors.segments import Warehouse
from flows.governance.catalog import Catalog, build_catalog
from flows.governance.history import read_history
from flows.governance.skew import UNEXPLAINED, SkewReport
from flows.spec import Definitions
from state.client import FeatureClient
from state.codec import decode_key
from state.errors import StateError
from state.store import ViewStore, iter_entities, peek, progress_of

SECTIONS = (
    ("features", "Feature values"),
    ("freshness", "Freshness and applied events"),
    ("dead-letters", "Dead letters and late events"),
    ("versions", "Replays and version switches"),
    ("skew", "Online/offline skew"),
)
SAMPLE_KEYS = 2_000


@dataclass(frozen=True, slots=True)
class ReportInputs:
    """Where the report reads from."""

    defs: Definitions
    state: Path
    warehouse: Warehouse
    kafka: str | None
    skew: SkewReport | None


def build_report(inputs: ReportInputs) -> str:
    """The whole HTML page."""
    catalog = build_catalog(inputs.defs, inputs.state)
    store = ViewStore(inputs.state, create=False)
    figures = {
        "features": _feature_figures(inputs.defs, inputs.state, store),
        "freshness": _freshness_figures(catalog, inputs),
        "dead-letters": _dead_letter_figures(inputs),
        "versions": _version_figures(store, inputs.state),
        "skew": _skew_figures(inputs.skew),
    }
    return _page(catalog, figures, inputs.skew)


# --- features ----------------------------------------------------------------------------


def _feature_figures(defs: Definitions, state: Path, store: ViewStore) -> list[go.Figure | str]:
    out: list[go.Figure | str] = []
    with FeatureClient(state, compiled=False) as client:
        for name in defs.views:
            if name not in client.views():
                out.append(f"view {name}: not deployed")
                continue
            keys, at = _sample_keys(store, name, defs.layouts[name].partitions)
            rows = _values(client, name, keys, at)
            out += _view_feature_figures(name, rows, len(keys), at)
    return out


def _sample_keys(store: ViewStore, view: str, partitions: int) -> tuple[list[str], float | None]:
    version = store.current_version(view)
    keys: list[str] = []
    newest: list[int] = []
    for p in range(partitions):
        with peek(store.partition_dir(view, version or 0, p)) as db:
            if db is None:
                continue
            mark = progress_of(db).newest()
            newest += [mark] if mark is not None else []
            for i, (raw, _) in enumerate(iter_entities(db)):
                if i >= SAMPLE_KEYS // partitions:
                    break
                keys.append(decode_key(raw))
    return keys, (max(newest) + 1) / 1e6 if newest else None


def _values(
    client: FeatureClient, view: str, keys: list[str], at: float | None
) -> list[dict[str, Any]]:
    if not keys:
        return []
    layout = client.layout(view)
    parts: Any = [tuple(k.split("\x1f")) if len(layout.key_columns) > 1 else k for k in keys]
    try:
        return client.get_many(view, parts, at)
    except StateError:  # not exact at that time for some key: as of now instead
        return client.get_many(view, parts)


def _view_feature_figures(
    view: str, rows: list[dict[str, Any]], n: int, at: float | None
) -> list[go.Figure | str]:
    if not rows:
        return [f"view {view}: no entities yet"]
    when = _iso(at * 1e6) if at else "now"
    names = list(rows[0])
    nulls = [sum(r[f] is None for r in rows) / len(rows) for f in names]
    out: list[go.Figure | str] = [
        _figure(
            go.Bar(x=names, y=nulls, name="null rate"),
            f"{view}: null rate per feature ({n:,} keys as of {when})",
            yaxis_title="null rate",
            yaxis_range=[0, 1],
        )
    ]
    for feature in names:
        values = [r[feature] for r in rows if r[feature] is not None]
        if values and all(isinstance(v, int | float) for v in values):
            trace: Any = go.Histogram(x=values, nbinsx=40, name=feature)
        elif values and all(isinstance(v, str) for v in values):
            top = Counter(values).most_common(20)
            trace = go.Bar(x=[k for k, _ in top], y=[c for _, c in top], name=feature)
        else:
            continue  # vectors and lists: the null rate says enough here
        out.append(_figure(trace, f"{view}.{feature}: distribution", height=260))
    return out


# --- freshness ---------------------------------------------------------------------------


def _freshness_figures(catalog: Catalog, inputs: ReportInputs) -> list[go.Figure | str]:
    views = [v for v in catalog.views if v.age_s is not None]
    age = go.Bar(
        x=[v.name for v in views],
        y=[v.age_s for v in views],
        name="age of newest applied event (s)",
        marker_color=["crimson" if v.stale else "seagreen" for v in views],
    )
    expected = go.Scatter(
        x=[v.name for v in views if v.freshness_expected_s],
        y=[v.freshness_expected_s for v in views if v.freshness_expected_s],
        mode="markers",
        marker={"symbol": "line-ew-open", "size": 40, "color": "black"},
        name="expected freshness (s)",
    )
    out: list[go.Figure | str] = [
        _figure(
            [age, expected],
            "Freshness per view (red: over its expectation)",
            yaxis_type="log",
            yaxis_title="seconds",
        )
    ]
    traces = []
    for source in inputs.defs.sources.values():
        arrivals = _arrivals(inputs.warehouse, source.name, source.partitions)
        if arrivals.size:
            bucket, counts = _per_bucket(arrivals)
            names = ", ".join(v.name for v in catalog.views if v.source == source.name)
            traces.append(
                go.Scatter(x=bucket, y=counts, mode="lines", name=f"{source.name} ({names})")
            )
    out.append(
        _figure(
            traces,
            "Applied events over time (log records by arrival, per source and its views)",
            yaxis_title="events per bucket",
        )
        if traces
        else "no events in the warehouse log yet"
    )
    return out


def _arrivals(warehouse: Warehouse, source: str, partitions: int) -> np.ndarray:
    parts = []
    for p in range(partitions):
        for batch in warehouse.read(source, p):
            if ARRIVAL in batch.schema.names:
                col = batch.column(ARRIVAL).cast(pa.int64())
                parts.append(np.asarray(pc.fill_null(col, 0).to_numpy(zero_copy_only=False)))
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _per_bucket(us: np.ndarray, buckets: int = 60) -> tuple[list[datetime], list[int]]:
    """Counts per time bucket (at most `buckets`, each at least a second wide)."""
    low = int(us.min())
    width = max(1_000_000, -(-(int(us.max()) + 1 - low) // buckets))
    counts = np.bincount((us - low) // width)
    starts = [datetime.fromtimestamp((low + i * width) / 1e6, UTC) for i in range(len(counts))]
    return starts, counts.tolist()


# --- dead letters ------------------------------------------------------------------------


def _dead_letter_figures(inputs: ReportInputs) -> list[go.Figure | str]:
    traces = []
    total = 0
    for source in inputs.defs.sources:
        letters = read_dead_letters(inputs.warehouse, source)
        total += letters.num_rows
        if not letters.num_rows:
            continue
        at = np.asarray(letters.column("at").cast(pa.int64()).to_numpy(zero_copy_only=False))
        reasons = [_reason_kind(r) for r in letters.column("reason").to_pylist()]
        for reason in sorted(set(reasons)):
            mask = np.array([r == reason for r in reasons])
            bucket, counts = _per_bucket(at[mask], 30)
            traces.append(go.Bar(x=bucket, y=counts, name=f"{source}: {reason}"))
    note = f"{total:,} dead letters in the warehouse" + (
        "; with Kafka they also go to the <source>.dlq topics" if inputs.kafka else ""
    )
    if not traces:
        return [note]
    return [note, _figure(traces, "Dead letters over time, by reason", barmode="stack")]


def _reason_kind(reason: str) -> str:
    """A reason's kind: its text up to the first colon or digit, so values do not split it."""
    head = reason.split(":", 1)[0]
    return head if len(head) <= 80 else head[:77] + "..."


# --- versions ----------------------------------------------------------------------------


def _version_figures(store: ViewStore, state: Path) -> list[go.Figure | str]:
    traces = []
    for view in store.views():
        built, live = [], []
        for version in store.versions(view):
            vdir = store.version_dir(view, version)
            if (vdir / "layout.json").is_file():
                built.append((_mtime(vdir / "layout.json"), f"v{version} built"))
            if (vdir / "WAS_LIVE").is_file():
                live.append((_mtime(vdir / "WAS_LIVE"), f"v{version} live"))
        for events, symbol, what in (
            (built, "circle-open", "new version"),
            (live, "star", "switched live"),
        ):
            if events:
                traces.append(go.Scatter(
                    x=[t for t, _ in events], y=[view] * len(events), text=[s for _, s in events],
                    mode="markers+text", textposition="top center",
                    marker={"symbol": symbol, "size": 12}, name=f"{view}: {what}",
                ))  # fmt: skip
    deployed = [datetime.fromisoformat(e["recorded_at"]) for e in read_history(state)]
    if deployed:
        traces.append(go.Scatter(x=deployed, y=["(deployments)"] * len(deployed),
                                 mode="markers", marker={"symbol": "diamond", "size": 10},
                                 name="definitions recorded by flows.run"))  # fmt: skip
    if not traces:
        return ["no view versions yet"]
    return [_figure(traces, "Replays (new versions) and switches on a timeline", height=380)]


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC)


# --- skew --------------------------------------------------------------------------------


def _skew_figures(skew: SkewReport | None) -> list[go.Figure | str]:
    if skew is None:
        return ["no served-feature log in the warehouse: give FeatureClient a served_log"]
    names = [f"{f.view}.{f.feature}" for f in skew.features]
    unexplained = [f.reasons.get(UNEXPLAINED, 0) for f in skew.features]
    parts = {
        "exact": [f.exact for f in skew.features],
        "within 1e-9": [f.within_tolerance for f in skew.features],
        "mismatch, explained": [
            f.mismatches - u for f, u in zip(skew.features, unexplained, strict=True)
        ],
        "mismatch, unexplained": unexplained,
    }
    traces = [go.Bar(x=names, y=v, name=k) for k, v in parts.items()]
    summary = (
        f"{skew.compared:,} logged reads compared: {skew.mismatches:,} mismatches, "
        f"{skew.unexplained:,} unexplained"
    )
    return [summary, _figure(traces, "Logged online reads recomputed offline", barmode="stack")]


# --- the page ----------------------------------------------------------------------------


def _figure(traces: Any, title: str, height: int = 320, **layout: Any) -> go.Figure:
    figure = go.Figure(traces if isinstance(traces, list) else [traces])
    figure.update_layout(title=title, height=height, margin={"t": 48, "b": 40}, **layout)
    return figure


def _page(
    catalog: Catalog, figures: dict[str, list[go.Figure | str]], skew: SkewReport | None
) -> str:
    body: list[str] = []
    first = True
    for section, title in SECTIONS:
        parts = [f'<section id="{section}"><h2>{html.escape(title)}</h2>']
        for item in figures[section]:
            if isinstance(item, str):
                parts.append(f"<p>{html.escape(item)}</p>")
                continue
            parts.append(pio.to_html(item, include_plotlyjs=first, full_html=False,
                                     config={"displaylogo": False}))  # fmt: skip
            first = False
        body.append("\n".join(parts) + "</section>")
    if first:  # no figure at all: still load plotly, so the page behaves the same
        body.append(pio.to_html(go.Figure(), include_plotlyjs=True, full_html=False))
    return _TEMPLATE.format(
        generated=_iso(time.time() * 1e6),
        state=html.escape(catalog.state),
        definitions=html.escape(catalog.definitions),
        summary=html.escape(_summary(catalog, skew)),
        nav=" · ".join(f'<a href="#{s}">{html.escape(t)}</a>' for s, t in SECTIONS),
        body="\n".join(body),
    )


def _summary(catalog: Catalog, skew: SkewReport | None) -> str:
    stale = [v.name for v in catalog.views if v.stale]
    features = sum(len(v.features) for v in catalog.views)
    text = (
        f"{len(catalog.sources)} sources, {len(catalog.views)} views, {features} features, "
        f"{len(catalog.services)} services; stale views: {', '.join(stale) or 'none'}"
    )
    if skew is not None:
        text += f"; skew: {skew.unexplained:,} unexplained of {skew.mismatches:,} mismatches"
    return text


def _iso(us: float) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat(timespec="seconds")


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>featureflow health report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem 2rem; color: #222; }}
section {{ border-top: 1px solid #ccc; padding-top: .5rem; margin-top: 1rem; }}
nav a {{ margin-right: .3rem; }}
.meta {{ color: #555; font-size: .9rem; }}
</style></head>
<body>
<h1>featureflow health report</h1>
<p class="meta">generated {generated} from state {state}, definitions {definitions}</p>
<p id="summary">{summary}</p>
<nav>{nav}</nav>
{body}
</body></html>
"""


def section_ids() -> Sequence[str]:
    """The ids of the report's sections, in order."""
    return [s for s, _ in SECTIONS]
