"""What a model consumes (ARCHITECTURE.md "Model-facing contracts"): `RequestSource`,
`on_demand` functions and `FeatureService`, reduced to a `state.services.ServicePlan`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flows.errors import DefinitionError
from flows.spec.views import FeatureSelection, FeatureView
from state.services import FIELD_TYPES, OnDemandStep, ServicePlan, ViewRead

# --- feature services: what a model consumes (ARCHITECTURE.md "Model-facing contracts") ------

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
REQUEST_TYPES = tuple(FIELD_TYPES)


@dataclass(frozen=True, slots=True)
class RequestSource:
    """The named fields a caller sends with each request, e.g. `{"amount": "double"}`.

    Types: int, long, float, double, string, boolean, array<float>, array<double>."""

    name: str
    schema: Mapping[str, str]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _IDENT.fullmatch(self.name):
            raise DefinitionError(
                f"request source name {self.name!r} must be a Python-style identifier"
            )
        if not isinstance(self.schema, Mapping) or not self.schema:
            raise DefinitionError(
                f"request source {self.name!r}: schema must be a dict of field -> type, "
                "e.g. {'amount': 'double'}"
            )
        for name, kind in self.schema.items():
            if not isinstance(name, str) or not _IDENT.fullmatch(name):
                raise DefinitionError(
                    f"request source {self.name!r}: field name {name!r} must be an identifier"
                )
            if kind not in FIELD_TYPES:
                raise DefinitionError(
                    f"request source {self.name!r}: field {name!r} has type {kind!r}, which "
                    f"requests do not support; use one of {', '.join(REQUEST_TYPES)}"
                )


OnDemandSource = RequestSource | FeatureView | FeatureSelection


@dataclass(frozen=True, slots=True)
class OnDemand:
    """A vectorized function computed at request time (online) and per spine batch (offline).

    It gets a `pyarrow.Table` with one row per request: each request field by its name, each
    view feature as `<view>__<feature>`; it returns {output name: array of the same length}."""

    name: str
    function: Callable[[Any], Any]
    sources: tuple[OnDemandSource, ...]
    outputs: Mapping[str, str]

    def __call__(self, rows: Any) -> Any:
        return self.function(rows)

    def views(self) -> list[tuple[FeatureView, tuple[str, ...]]]:
        """(view, features) of each view source."""
        return [_view_part(s) for s in self.sources if not isinstance(s, RequestSource)]

    def request_fields(self) -> dict[str, str]:
        """The request fields the function gets, with their declared types."""
        fields: dict[str, str] = {}
        for source in self.sources:
            if isinstance(source, RequestSource):
                fields.update(source.schema)
        return fields

    def inputs(self) -> tuple[str, ...]:
        """The columns of the function's table, in the order of its sources."""
        columns: list[str] = []
        for source in self.sources:
            if isinstance(source, RequestSource):
                columns += list(source.schema)
            else:
                view, names = _view_part(source)
                columns += [f"{view.name}__{n}" for n in names]
        return tuple(columns)

    def validate(self) -> None:
        where = f"on-demand function {self.name!r}"
        if not _IDENT.fullmatch(self.name):
            raise DefinitionError(f"{where}: the name must be a Python-style identifier")
        if not callable(self.function):
            raise DefinitionError(f"{where}: {self.function!r} is not a function")
        if not self.sources:
            raise DefinitionError(
                f"{where} has no sources; give sources=[a RequestSource, views...]"
            )
        for i, source in enumerate(self.sources):
            if not isinstance(source, RequestSource | FeatureView | FeatureSelection):
                raise DefinitionError(
                    f"{where}: source {i} is {type(source).__name__} {source!r}, neither a "
                    "RequestSource nor a view; pass RequestSource, FeatureView or "
                    "view[['feature', ...]] objects"
                )
        self._check_inputs(where)
        self._check_outputs(where)

    def _check_inputs(self, where: str) -> None:
        types: dict[str, str] = {}
        for source in self.sources:
            if isinstance(source, RequestSource):
                for name, kind in source.schema.items():
                    if types.setdefault(name, kind) != kind:
                        raise DefinitionError(
                            f"{where}: request field {name!r} is declared {types[name]!r} and "
                            f"{kind!r} by two sources; declare it once"
                        )
            else:
                _view_part(source)
        columns = self.inputs()
        dupes = sorted({c for c in columns if columns.count(c) > 1 and "__" in c})
        if dupes:
            raise DefinitionError(f"{where}: input columns {dupes} are listed twice; list once")

    def _check_outputs(self, where: str) -> None:
        if not isinstance(self.outputs, Mapping) or not self.outputs:
            raise DefinitionError(
                f"{where}: outputs must be a dict of name -> type, e.g. {{'ratio': 'double'}}"
            )
        for name, kind in self.outputs.items():
            if not isinstance(name, str) or not _IDENT.fullmatch(name) or "__" in name:
                raise DefinitionError(
                    f"{where}: output name {name!r} must be an identifier without '__'"
                )
            if kind not in FIELD_TYPES:
                raise DefinitionError(
                    f"{where}: output {name!r} has type {kind!r}; use one of "
                    f"{', '.join(REQUEST_TYPES)}"
                )


def _view_part(source: FeatureView | FeatureSelection) -> tuple[FeatureView, tuple[str, ...]]:
    if isinstance(source, FeatureView):
        return source, source.feature_names()
    return source.view, source.feature_names()


def on_demand(
    *, sources: Sequence[OnDemandSource], outputs: Mapping[str, str], name: str | None = None
) -> Callable[[Callable[[Any], Any]], OnDemand]:
    """Declare a vectorized request-time function (see `OnDemand`).

    Raises:
        DefinitionError: a source is neither a RequestSource nor a view, a selected feature
            does not exist, an output name or type is invalid.
    """

    def wrap(function: Callable[[Any], Any]) -> OnDemand:
        label = name or str(getattr(function, "__name__", "on_demand"))
        made = OnDemand(label, function, tuple(sources), dict(outputs))
        made.validate()
        return made

    return wrap


@dataclass(frozen=True, slots=True)
class FeatureService:
    """What a model consumes: whole views, chosen features (`view[["a"]]`), on-demand functions.

    Args:
        name: the service's name (`get_service(name, row)`, `flows.snapshot --service`).
        features: views, selections and on-demand functions, in output order; the columns are
            `<view>__<feature>` and `<on_demand>__<output>`.
        keys: the request column of a view's key when it is not named as the view's key
            columns (`{"merchant_risk": "payee_id"}`; a tuple for a composite key).
    """

    name: str
    features: Sequence[FeatureView | FeatureSelection | OnDemand]
    keys: Mapping[str, str | tuple[str, ...]] = field(default_factory=dict)
    description: str = ""
    owner: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)

    def service_plan(self) -> ServicePlan:
        """Validate the service and reduce it to the plain plan the serving core runs.

        Raises:
            DefinitionError: naming the value and the fix.
        """
        if not isinstance(self.name, str) or not _IDENT.fullmatch(self.name):
            raise DefinitionError(f"feature service name {self.name!r} must be an identifier")
        if isinstance(self.features, str | bytes) or not self.features:
            raise DefinitionError(
                f"feature service {self.name!r} has no features; list views, view[[...]] "
                "selections and on-demand functions"
            )
        views, columns, steps = self._parts()
        reads = tuple(self._read(view, names) for view, names in views.values())
        self._check_keys(views)
        request: dict[str, str] = {}
        for od in steps:
            for fname, kind in od.request_fields().items():
                if request.setdefault(fname, kind) != kind:
                    raise DefinitionError(
                        f"feature service {self.name!r}: request field {fname!r} is "
                        f"{request[fname]!r} in one on-demand function and {kind!r} in "
                        f"{od.name!r}; use one type"
                    )
        plan_steps = tuple(
            OnDemandStep(od.name, od.function, od.inputs(), tuple(od.outputs.items()))
            for od in steps
        )
        return ServicePlan(self.name, reads, tuple(request.items()), plan_steps, columns)

    def _parts(
        self,
    ) -> tuple[dict[str, tuple[FeatureView, tuple[str, ...]]], tuple[str, ...], list[OnDemand]]:
        views: dict[str, tuple[FeatureView, tuple[str, ...]]] = {}
        columns: list[str] = []
        steps: list[OnDemand] = []
        for item in self.features:
            if isinstance(item, OnDemand):
                item.validate()
                steps.append(item)
                columns += [f"{item.name}__{out}" for out in item.outputs]
                for view, names in item.views():
                    self._add_view(views, view, names)
            elif isinstance(item, FeatureView | FeatureSelection):
                view, names = _view_part(item)
                self._add_view(views, view, names)
                columns += [f"{view.name}__{n}" for n in names]
            else:
                raise DefinitionError(
                    f"feature service {self.name!r}: {type(item).__name__} {item!r} is not a "
                    "feature; list FeatureViews, view[['feature', ...]] selections and "
                    "@on_demand functions"
                )
        self._check_names(columns, steps, views)
        return views, tuple(columns), steps

    def _add_view(
        self,
        views: dict[str, tuple[FeatureView, tuple[str, ...]]],
        view: FeatureView,
        names: tuple[str, ...],
    ) -> None:
        known = views.get(view.name)
        if known is not None and known[0] != view:
            raise DefinitionError(
                f"feature service {self.name!r}: two different views are named {view.name!r}; "
                "give each view its own name"
            )
        have = known[1] if known else ()
        views[view.name] = (view, tuple(dict.fromkeys((*have, *names))))

    def _check_names(
        self,
        columns: list[str],
        steps: list[OnDemand],
        views: dict[str, tuple[FeatureView, tuple[str, ...]]],
    ) -> None:
        dupes = sorted({c for c in columns if columns.count(c) > 1})
        if dupes:
            raise DefinitionError(
                f"feature service {self.name!r}: output column(s) {dupes} are listed twice; "
                "list each view, feature and on-demand function once"
            )
        clash = sorted({od.name for od in steps} & set(views))
        if clash:
            raise DefinitionError(
                f"feature service {self.name!r}: on-demand function {clash[0]!r} has the name "
                "of a view, so their output columns could clash; rename the function"
            )

    def _read(self, view: FeatureView, names: tuple[str, ...]) -> ViewRead:
        keys = view.key_columns()
        mapped = self.keys.get(view.name, keys) if isinstance(self.keys, Mapping) else keys
        entity = (mapped,) if isinstance(mapped, str) else tuple(mapped)
        if len(entity) != len(keys) or not all(isinstance(c, str) and c for c in entity):
            raise DefinitionError(
                f"feature service {self.name!r}: keys[{view.name!r}]={mapped!r} must name "
                f"{len(keys)} request column(s), one per key column {keys} of the view"
            )
        return ViewRead(view.name, keys, entity, names)

    def _check_keys(self, views: Mapping[str, object]) -> None:
        if not isinstance(self.keys, Mapping):
            raise DefinitionError(
                f"feature service {self.name!r}: keys={self.keys!r} must be a dict of view "
                "name -> request column"
            )
        unknown = [v for v in self.keys if v not in views]
        if unknown:
            raise DefinitionError(
                f"feature service {self.name!r}: keys names view {unknown[0]!r}, which the "
                f"service does not read (views: {', '.join(views)}); fix the name"
            )
