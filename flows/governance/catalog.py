"""The catalog: sources -> views -> features -> services, with owners, live versions, freshness
and lineage (which services consume which feature), from a definitions module and the state
directory that runs it.

Freshness is the newest event time each live view has applied (the highest watermark over its
partitions, read beside a running writer), against the view's `freshness=` expectation.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from flows.governance.history import ViewRevision, tag_map, view_history
from flows.spec import Aggregation, Definitions, FeatureView, format_duration
from state.layout import FeatureDef
from state.services import feature_type
from state.store import ViewStore, partition_dir, read_partition_progress


@dataclass(frozen=True, slots=True)
class FeatureEntry:
    name: str
    agg: str
    column: str | None
    param: float | int | None  # the percentile's q, last_k's k
    type: str
    window: str  # "" = lifetime
    hop: str
    description: str
    owner: str
    tags: dict[str, str]
    consumers: tuple[str, ...]  # services that serve or read it


@dataclass(frozen=True, slots=True)
class ViewEntry:
    name: str
    source: str
    key: tuple[str, ...]
    description: str
    owner: str
    tags: dict[str, str]
    features: tuple[FeatureEntry, ...]
    consumers: tuple[str, ...]
    live_version: int | None
    versions: tuple[int, ...]
    newest_event_us: int | None  # newest applied event time of the live version
    age_s: float | None  # now minus that
    freshness_expected_s: float | None
    stale: bool | None
    history: tuple[ViewRevision, ...] = ()


@dataclass(frozen=True, slots=True)
class SourceEntry:
    name: str
    key: str
    timestamp: str
    partitions: int
    topic: str
    fields: dict[str, str]
    views: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    name: str
    description: str
    owner: str
    tags: dict[str, str]
    columns: tuple[str, ...]
    views: tuple[str, ...]
    on_demand: tuple[str, ...]
    request: dict[str, str]


@dataclass(frozen=True, slots=True)
class Catalog:
    definitions: str
    state: str
    sources: tuple[SourceEntry, ...]
    views: tuple[ViewEntry, ...]
    services: tuple[ServiceEntry, ...]
    notes: tuple[str, ...] = field(default=())


def build_catalog(defs: Definitions, state: Path) -> Catalog:
    """Everything the definitions declare, with what `state` runs of it."""
    consumers = _consumers(defs)
    store = ViewStore(state, create=False) if (state / "FORMAT").is_file() else None
    views = tuple(_view_entry(view, defs, consumers, store, state) for view in defs.views.values())
    sources = tuple(
        SourceEntry(
            s.name,
            s.key,
            s.timestamp,
            s.partitions,
            s.kafka_topic,
            s.field_types(),
            tuple(v.name for v in defs.views.values() if v.source.name == s.name),
        )
        for s in defs.sources.values()
    )
    services = tuple(_service_entry(defs, name) for name in defs.services)
    notes = () if store else (f"{state} holds no view store: no live versions or freshness",)
    return Catalog(str(defs.path), str(state), sources, views, services, notes)


def _consumers(defs: Definitions) -> dict[tuple[str, str], list[str]]:
    """(view, feature) -> services that serve it or feed it to an on-demand function."""
    found: dict[tuple[str, str], list[str]] = {}
    for name, plan in defs.plans.items():
        for read in plan.reads:
            for feature in read.features:
                found.setdefault((read.view, feature), []).append(name)
    return found


def _view_entry(
    view: FeatureView,
    defs: Definitions,
    consumers: Mapping[tuple[str, str], list[str]],
    store: ViewStore | None,
    state: Path,
) -> ViewEntry:
    layout = defs.layouts[view.name]
    aggs = dict(zip([f.name for f in layout.features], view.features, strict=True))
    features = tuple(
        _feature_entry(f, aggs[f.name], view, consumers.get((view.name, f.name), []), defs)
        for f in layout.features
    )
    live = store.current_version(view.name) if store else None
    newest = _newest_event(store, view.name, live, layout.partitions) if store and live else None
    age = None if newest is None else time.time() - newest / 1e6
    expected = view.freshness_us()
    used = sorted({s for f in features for s in f.consumers})
    return ViewEntry(
        name=view.name,
        source=view.source.name,
        key=layout.key_columns,
        description=view.description,
        owner=view.owner,
        tags=tag_map(view.tags),
        features=features,
        consumers=tuple(used),
        live_version=live,
        versions=tuple(store.versions(view.name)) if store else (),
        newest_event_us=newest,
        age_s=age,
        freshness_expected_s=None if expected is None else expected / 1e6,
        stale=None if expected is None or age is None else age > expected / 1e6,
        history=tuple(view_history(state, view.name)),
    )


def _feature_entry(
    f: FeatureDef, agg: Aggregation, view: FeatureView, used: list[str], defs: Definitions
) -> FeatureEntry:
    return FeatureEntry(
        name=f.name,
        agg=f.agg,
        column=f.column,
        param=f.param,
        type=str(feature_type(defs.layouts[view.name], f)),
        window=format_duration(f.window_us) if f.window_us else "",
        hop=format_duration(f.hop_us) if f.hop_us else "",
        description=agg.description,
        owner=agg.owner or view.owner,
        tags=tag_map(agg.tags),
        consumers=tuple(dict.fromkeys(used)),
    )


def _newest_event(store: ViewStore, view: str, version: int, partitions: int) -> int | None:
    vdir = store.version_dir(view, version)
    marks = [read_partition_progress(partition_dir(vdir, p)).newest() for p in range(partitions)]
    found = [m for m in marks if m is not None]
    return max(found) if found else None


def _service_entry(defs: Definitions, name: str) -> ServiceEntry:
    service, plan = defs.service(name)
    return ServiceEntry(
        name=name,
        description=service.description,
        owner=service.owner,
        tags=tag_map(service.tags),
        columns=plan.columns,
        views=tuple(r.view for r in plan.reads),
        on_demand=tuple(s.name for s in plan.steps),
        request=dict(plan.request),
    )


def search_catalog(catalog: Catalog, text: str | None, tag: str | None) -> Catalog:
    """The catalog narrowed to what matches `text` (a name or description, any case) and
    `tag` (`key` or `key=value`); a view matching as a whole keeps all its features."""
    if not text and not tag:
        return catalog
    views = tuple(v for v in (_narrow(v, text, tag) for v in catalog.views) if v is not None)
    kept = {v.name for v in views}
    services = tuple(s for s in catalog.services if _hit(s.name, s.description, s.tags, text, tag))
    sources = tuple(
        replace(s, views=tuple(v for v in s.views if v in kept))
        for s in catalog.sources
        if kept & set(s.views) or (not tag and _hit(s.name, "", {}, text, None))
    )
    return replace(catalog, sources=sources, views=views, services=services)


def _narrow(view: ViewEntry, text: str | None, tag: str | None) -> ViewEntry | None:
    if _hit(view.name, view.description, view.tags, text, tag):
        return view
    features = tuple(
        f for f in view.features if _hit(f.name, f.description, {**view.tags, **f.tags}, text, tag)
    )
    return replace(view, features=features) if features else None


def _hit(
    name: str, description: str, tags: Mapping[str, str], text: str | None, tag: str | None
) -> bool:
    if text and text.lower() not in f"{name}\n{description}".lower():
        return False
    if tag:
        key, _, value = tag.partition("=")
        if key not in tags or (value and tags[key] != value):
            return False
    return True


def catalog_lines(catalog: Catalog) -> list[str]:
    """The catalog as an indented tree a person reads."""
    lines = [f"note: {n}" for n in catalog.notes]
    views = {v.name: v for v in catalog.views}
    for s in catalog.sources:
        lines.append(
            f"source {s.name} (key {s.key}, time {s.timestamp}, {s.partitions} partitions, "
            f"topic {s.topic})"
        )
        lines.append("  fields: " + ", ".join(f"{k} {t}" for k, t in s.fields.items()))
        for name in s.views:
            if name in views:
                lines += _view_lines(views[name])
    for svc in catalog.services:
        lines.append(f"service {svc.name}{_who(svc.owner, svc.tags)}")
        if svc.description:
            lines.append(f"  {svc.description}")
        lines.append(
            f"  views: {', '.join(svc.views)}; on-demand: {', '.join(svc.on_demand) or '-'}"
        )
        lines.append(f"  columns: {', '.join(svc.columns)}")
    return lines


def _view_lines(v: ViewEntry) -> list[str]:
    version = f"v{v.live_version} live" if v.live_version else "not deployed"
    lines = [f"  view {v.name} [{version}] key {', '.join(v.key)}{_who(v.owner, v.tags)}"]
    if v.description:
        lines.append(f"    {v.description}")
    lines.append(f"    freshness: {_freshness(v)}")
    for f in v.features:
        window = f"window {f.window} hop {f.hop}" if f.window else "lifetime"
        used = f"; used by {', '.join(f.consumers)}" if f.consumers else ""
        about = f" - {f.description}" if f.description else ""
        args = ", ".join(str(a) for a in (f.column, f.param) if a is not None)
        lines.append(f"    feature {f.name}: {f.agg}({args}) {window} -> {f.type}{used}{about}")
    for r in v.history:
        lines.append(f"    history: v{r.version} layout {r.layout_sha256[:12]} ({r.recorded_at})")
    return lines


def _who(owner: str, tags: Mapping[str, str]) -> str:
    parts = [f"owner {owner}"] if owner else []
    if tags:
        parts.append("tags " + ", ".join(f"{k}={v}" if v else k for k, v in tags.items()))
    return f" ({'; '.join(parts)})" if parts else ""


def _freshness(v: ViewEntry) -> str:
    expected = (
        f"expected within {format_duration(int(v.freshness_expected_s * 1e6))}"
        if v.freshness_expected_s
        else "no expectation"
    )
    if v.age_s is None:
        return f"no applied events; {expected}"
    state = " STALE" if v.stale else (" ok" if v.stale is False else "")
    return f"newest applied event {v.age_s:,.0f} s ago; {expected}{state}"
