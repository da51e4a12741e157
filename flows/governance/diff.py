"""The plan: what a definitions module changes against what a state directory runs.

Pure comparison (no I/O beyond the objects given): sources by schema and log settings, views by
their stored layout (the same test `flows.run` uses to decide on a new version) plus their
transform code and catalog metadata, services by their columns and request fields. A change
that takes away a feature a recorded service serves (the feature or its view removed, renamed,
or dropped from the service) is breaking: a model trained on it would get nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flows.governance.deployed import Deployed, layout_key
from flows.governance.history import tag_map
from flows.spec import Definitions, FeatureView, Source, format_duration
from state.layout import FeatureDef, ViewLayout
from state.services import ServicePlan

NEW, CHANGED, UNCHANGED, REMOVED = "new", "changed", "unchanged", "removed"


@dataclass(frozen=True, slots=True)
class ReplayCost:
    """What rebuilding a view from the log costs: events, estimated seconds, state bytes."""

    events: int | None
    seconds: float | None
    rate: float
    rate_source: str
    state_bytes: int | None


@dataclass(frozen=True, slots=True)
class Change:
    """One source, view or service and what the definitions do to it."""

    kind: str  # "source" | "view" | "service"
    name: str
    status: str  # new | changed | unchanged | removed
    details: tuple[str, ...] = ()
    new_version: bool = False  # flows.run builds a new version (a replay from the log)
    replay: ReplayCost | None = None


@dataclass(frozen=True, slots=True)
class Breaking:
    """A feature a recorded service serves that the new definitions take away."""

    service: str
    column: str
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    """The whole comparison."""

    changes: tuple[Change, ...]
    breaking: tuple[Breaking, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def changed(self) -> bool:
        return any(c.status != UNCHANGED for c in self.changes)

    def of(self, kind: str) -> list[Change]:
        return [c for c in self.changes if c.kind == kind]


def diff_definitions(defs: Definitions, deployed: Deployed) -> Plan:
    """Compare `defs` with what `deployed` runs (no replay cost yet: see `cost.with_costs`)."""
    old = deployed.definitions
    changes = [
        *_sources(defs, old, deployed),
        *_views(defs, old, deployed),
        *_services(defs, old),
    ]
    return Plan(tuple(changes), tuple(find_breaking(defs, old)), deployed.notes)


# --- sources ---------------------------------------------------------------------------------


def _sources(defs: Definitions, old: Definitions | None, deployed: Deployed) -> list[Change]:
    before: dict[str, Source] = dict(old.sources) if old else {}
    live_sources = {v.layout.source for v in deployed.views.values()}
    out: list[Change] = []
    for name, source in sorted(defs.sources.items()):
        if name in before:
            details = source_details(before[name], source)
            out.append(Change("source", name, CHANGED if details else UNCHANGED, details))
        elif old is None and name in live_sources:
            out.append(Change("source", name, UNCHANGED, ("compared by view layouts only",)))
        else:
            out.append(Change("source", name, NEW, _fields_text(source)))
    for name in sorted(set(before) - set(defs.sources)):
        out.append(Change("source", name, REMOVED, ("no view reads it any more",)))
    return out


def source_details(old: Source, new: Source) -> tuple[str, ...]:
    """What changed in a source: schema fields (the schema evolved), key, time, partitions."""
    details: list[str] = []
    was, now = old.field_types(), new.field_types()
    details += [f"field {f!r} added ({now[f]})" for f in now if f not in was]
    details += [f"field {f!r} removed (was {was[f]})" for f in was if f not in now]
    details += [
        f"field {f!r} type {was[f]} -> {now[f]}" for f in now if f in was and was[f] != now[f]
    ]
    for attr in ("key", "timestamp", "partitions", "kafka_topic", "max_future"):
        a, b = getattr(old, attr), getattr(new, attr)
        if a != b:
            details.append(f"{attr} {a!r} -> {b!r}")
    return tuple(details)


def _fields_text(source: Source) -> tuple[str, ...]:
    types = source.field_types()
    return (f"fields: {', '.join(f'{k} ({v})' for k, v in types.items())}",)


# --- views -----------------------------------------------------------------------------------


def _views(defs: Definitions, old: Definitions | None, deployed: Deployed) -> list[Change]:
    out: list[Change] = []
    for name, view in sorted(defs.views.items()):
        layout = defs.layouts[name]
        live = deployed.views.get(name)
        if live is None:
            out.append(Change("view", name, NEW, _new_view_text(layout), new_version=True))
            continue
        prior = old.views.get(name) if old else None
        out.append(_view_change(view, layout, live.layout, prior, deployed.builds.get(name, {})))
    for name in sorted(set(deployed.views) - set(defs.views)):
        live = deployed.views[name]
        out.append(
            Change(
                "view",
                name,
                REMOVED,
                (
                    f"no longer maintained: v{live.version} stays readable (frozen) until its "
                    f"directory {deployed.state / 'views' / name} is deleted",
                ),
            )
        )
    return out


def _view_change(
    view: FeatureView,
    layout: ViewLayout,
    live: ViewLayout,
    prior: FeatureView | None,
    builds: Mapping[str, int],
) -> Change:
    if layout.same_semantics(live):
        meta = _code_and_meta(view, prior)
        return Change("view", view.name, CHANGED if meta else UNCHANGED, meta)
    details = list(layout_details(live, layout))
    building = builds.get(layout_key(layout))
    if building is not None:
        details.append(f"a build of this definition is under way as v{building}")
    details.append(
        "needs a new version: the stored tiles were computed for the old definition, so the "
        "view is rebuilt from the log beside the live one and switched when caught up"
    )
    return Change("view", view.name, CHANGED, tuple(details), new_version=True)


def _new_view_text(layout: ViewLayout) -> tuple[str, ...]:
    feats = ", ".join(feature_text(f) for f in layout.features)
    return (f"features: {feats}", "built from the start of the log, live when caught up")


def layout_details(old: ViewLayout, new: ViewLayout) -> tuple[str, ...]:
    """Which features (and view settings) differ between two layouts of one view."""
    details: list[str] = []
    before = {f.name: f for f in old.features}
    after = {f.name: f for f in new.features}
    for name, f in after.items():
        if name not in before:
            twin = _renamed_from(f, [b for n, b in before.items() if n not in after])
            hint = f" (renamed from {twin!r}?)" if twin else ""
            details.append(f"feature {name!r} added: {feature_text(f)}{hint}")
        elif before[name] != f:
            details.append(f"feature {name!r} changed: {_feature_delta(before[name], f)}")
    details += [f"feature {n!r} removed" for n in before if n not in after]
    for attr in ("source", "key_columns", "partitions", "allowed_lateness_us", "timestamp"):
        a, b = getattr(old, attr), getattr(new, attr)
        if a != b:
            details.append(f"{attr} {a!r} -> {b!r}")
    for col, kind in new.column_types.items():
        was = old.column_types.get(col)
        if was is not None and was != kind:
            details.append(f"column {col!r} type {was} -> {kind}")
    return tuple(details)


def _renamed_from(feature: FeatureDef, gone: list[FeatureDef]) -> str | None:
    same = [
        g.name
        for g in gone
        if (g.agg, g.column, g.param) == (feature.agg, feature.column, feature.param)
    ]
    return same[0] if len(same) == 1 else None


def feature_text(f: FeatureDef) -> str:
    """`mean(amount) over 14d, hop 1h` or `last(channel) lifetime`."""
    col = f.column or ""
    param = f", {f.param}" if f.param is not None else ""
    if not f.window_us:
        return f"{f.agg}({col}{param}) lifetime"
    window, hop = format_duration(f.window_us), format_duration(f.hop_us)
    return f"{f.agg}({col}{param}) over {window}, hop {hop}"


def _feature_delta(a: FeatureDef, b: FeatureDef) -> str:
    parts: list[str] = []
    for attr, show in (
        ("agg", str),
        ("column", str),
        ("param", str),
        ("window_us", _duration),
        ("hop_us", _duration),
    ):
        x, y = getattr(a, attr), getattr(b, attr)
        if x != y:
            parts.append(f"{attr.removesuffix('_us')} {show(x)} -> {show(y)}")
    return ", ".join(parts)


def _duration(us: int) -> str:
    return format_duration(us) if us else "lifetime"


def _code_and_meta(view: FeatureView, prior: FeatureView | None) -> tuple[str, ...]:
    if prior is None:
        return ()
    details: list[str] = []
    if _code(view.transform) != _code(prior.transform):
        details.append(
            "transform code changed but the layout did not: flows.run keeps the live version; "
            f"run python -m flows.replay --views {view.name} to recompute it with the new code"
        )
    for attr in ("description", "owner", "freshness"):
        if getattr(view, attr) != getattr(prior, attr):
            details.append(f"{attr} {getattr(prior, attr)!r} -> {getattr(view, attr)!r} (metadata)")
    if tag_map(view.tags) != tag_map(prior.tags):
        details.append(f"tags {tag_map(prior.tags)} -> {tag_map(view.tags)} (metadata)")
    return tuple(details)


def _code(function: Callable[..., Any] | None) -> str | None:
    if function is None:
        return None
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        code = getattr(function, "__code__", None)
        return repr(code.co_code) if code is not None else repr(function)


# --- services --------------------------------------------------------------------------------


def _services(defs: Definitions, old: Definitions | None) -> list[Change]:
    if old is None:
        return [
            Change("service", n, NEW, ("no recorded definitions to compare with",))
            for n in sorted(defs.plans)
        ]
    out: list[Change] = []
    for name, plan in sorted(defs.plans.items()):
        prior = old.plans.get(name)
        if prior is None:
            out.append(Change("service", name, NEW, (f"columns: {', '.join(plan.columns)}",)))
            continue
        details = service_details(prior, plan)
        out.append(Change("service", name, CHANGED if details else UNCHANGED, details))
    for name in sorted(set(old.plans) - set(defs.plans)):
        out.append(Change("service", name, REMOVED, ("get_service calls of it will fail",)))
    return out


def service_details(old: ServicePlan, new: ServicePlan) -> tuple[str, ...]:
    """Columns added or removed, request fields and entity keys changed."""
    details = [f"column {c!r} added" for c in new.columns if c not in old.columns]
    details += [f"column {c!r} removed" for c in old.columns if c not in new.columns]
    if dict(old.request) != dict(new.request):
        details.append(f"request fields {dict(old.request)} -> {dict(new.request)}")
    keys_old = {r.view: r.entity_columns for r in old.reads}
    keys_new = {r.view: r.entity_columns for r in new.reads}
    details += [
        f"view {v!r} looked up by {keys_old[v]} -> {k}"
        for v, k in keys_new.items()
        if v in keys_old and keys_old[v] != k
    ]
    return tuple(details)


def find_breaking(defs: Definitions, old: Definitions | None) -> list[Breaking]:
    """Every column of a recorded service whose feature the new definitions take away."""
    if old is None:
        return []
    found: list[Breaking] = []
    for name, plan in sorted(old.plans.items()):
        now = defs.plans.get(name)
        for read in plan.reads:
            for feature in read.features:
                served = read.column(feature) in plan.columns  # else an on-demand input only
                reason = _taken_away(defs, now if served else None, read.view, feature, served)
                if reason:
                    found.append(Breaking(name, read.column(feature), reason))
        for step in plan.steps:
            for out_name, _ in step.outputs:
                column = f"{step.name}__{out_name}"
                if now is None or column not in now.columns:
                    found.append(Breaking(name, column, _gone(now, "on-demand output")))
    return found


def _taken_away(
    defs: Definitions, now: ServicePlan | None, view: str, feature: str, served: bool
) -> str:
    if view not in defs.views:
        return f"view {view!r} is removed"
    if feature not in defs.views[view].feature_names():
        return f"feature {feature!r} is removed from view {view!r} (or renamed)"
    if served and (now is None or f"{view}__{feature}" not in now.columns):
        return _gone(now, "feature")
    return ""


def _gone(now: ServicePlan | None, what: str) -> str:
    if now is None:
        return "the service is removed"
    return f"the service no longer serves this {what}"
