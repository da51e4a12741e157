"""Feature services on the read client: which services it serves, and each view's features for
a batch of request rows.

`FeatureClient.get_service_many` looks the service's `ServicePlan` up in its `ServiceBook`
(the definitions module given as `features=`, or the one `flows.run` recorded in the state
directory, followed when the deployment records new definitions), then, per view the service
reads, `view_features` turns the rows into the view's keys and reads the features through the
client's batch read (`get_many`'s, as `ViewColumns`); `state.services.evaluate_service` then
adds the on-demand outputs over all the rows:

    rows --entity columns--> keys of the view (None where a part is null)
         --ViewColumns: one batch read of the non-null keys, only the service's features-->
         {feature: values} --rows without a key: the empty-window values-->
         --feature_column--> {<view>__<feature>: pa.Array}

`get_service` (one row) first tries `one_row`: a row of plain values and str keys is read with
one point read per view (`FeatureClient._one_entity`) and each on-demand table made from its
Python values in one conversion, equal to the batch path above (tests/flows/test_services.py);
any other row takes that path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from state.batch_read import empty_blob
from state.definitions import load_service_plans, recorded_module
from state.errors import (
    KeyTypeError,
    MissingFeatureError,
    RequestTypeError,
    UnknownServiceError,
)
from state.layout import FeatureDef, ViewLayout
from state.read import evaluate_blob
from state.services import (
    ServicePlan,
    ViewRead,
    feature_column,
    feature_types,
    feature_values,
    one_row_steps,
    step_structs,
    value_converter,
)
from state.timestamps import Timestamp

_RECHECK_S = 1.0  # how often the definitions record is looked at for new definitions


class ViewColumns(Protocol):
    """The client's batch read of some features (`FeatureClient._columns`)."""

    def __call__(
        self, view: str, keys: Sequence[Any], at: Timestamp | None, only: frozenset[str]
    ) -> tuple[int, ViewLayout, dict[str, list[Any]]]:
        """The features `only` of `keys` as {feature: values} columns, with the version and
        layout read."""
        ...


class EntityRead(Protocol):
    """The client's read of one entity (`FeatureClient._one_entity`)."""

    def __call__(
        self, view: str, key: str, at: Timestamp | None, only: frozenset[str]
    ) -> tuple[int, ViewLayout, dict[str, Any]]:
        """The features `only` of the entity `key` as {feature: value}, with the version and
        layout read."""
        ...


class ServiceBook:
    """The feature services a client serves: from `features=`, or from the definitions record
    (re-read when the deployment records new definitions, looked at once a second)."""

    __slots__ = ("_checked", "_lock", "_plans", "_record", "features", "root")

    def __init__(self, root: Path, features: Path | None) -> None:
        self.root, self.features = root, features
        self._plans: dict[str, ServicePlan] | None = None
        self._record: str | None = None
        self._checked = -_RECHECK_S
        self._lock = threading.Lock()

    def plan(self, name: str) -> ServicePlan:
        plans = self._plans
        if plans is None or (
            self.features is None and time.monotonic() - self._checked >= _RECHECK_S
        ):
            plans = self._current()
        plan = plans.get(name)
        if plan is None:
            where = (
                f"definitions module {str(self.features)!r}"
                if self.features
                else f"the definitions recorded in {self.root}"
            )
            raise UnknownServiceError(
                f"unknown feature service {name!r}: {where} declare(s) "
                f"{', '.join(map(repr, plans)) or 'no FeatureService'}; check the name"
            )
        return plan

    def _current(self) -> dict[str, ServicePlan]:
        with self._lock:
            plans = self._plans  # another thread may have looked meanwhile
            if plans is not None and (
                self.features or time.monotonic() - self._checked < _RECHECK_S
            ):
                return plans
            if self.features is not None:
                self._plans = self._plans or load_service_plans(self.features)
                return self._plans
            return self._from_record()

    def _from_record(self) -> dict[str, ServicePlan]:
        found = recorded_module(self.root)
        self._checked = time.monotonic()
        if found is None:
            raise UnknownServiceError(
                f"no feature definitions are recorded in {self.root} (flows.run records them "
                "when it starts); run flows.run with your definitions, or pass "
                "FeatureClient(state_dir, features=FILE)"
            )
        record, module = found
        if self._plans is None or record != self._record:
            self._plans, self._record = load_service_plans(module), record
        return self._plans


def view_values(
    plan: ServicePlan,
    read: ViewRead,
    rows: Sequence[Mapping[str, Any]] | pa.Table,
    at: Timestamp | None,
    columns: ViewColumns,
) -> tuple[ViewLayout, dict[str, FeatureDef], dict[str, list[Any]]]:
    """The features `read` takes from its view for `rows`, as {feature: values} (the read's
    Python values), with the layout read and its features by name.

    Raises:
        RequestTypeError: an entity value of the wrong type.
        MissingFeatureError: a feature is not in the live version of its view.
    """
    keys = _entity_keys(read, rows)
    present = [i for i, k in enumerate(keys) if k is not None]
    try:
        wanted = keys if len(present) == len(keys) else [keys[i] for i in present]
        version, layout, found = columns(read.view, wanted, at, read.wanted)
    except KeyTypeError as exc:
        raise RequestTypeError(
            f"service {plan.name!r}: entity column(s) {list(read.entity_columns)} of view "
            f"{read.view!r}: {exc}"
        ) from exc
    by_name = _features_by_name(layout)
    missing = [f for f in read.features if f not in by_name]
    if missing:  # the live version does not have them: the definitions changed under it
        raise _missing_feature(plan, read, missing, version, layout)
    if len(present) < len(keys):  # rows without a key read as unknown keys do
        empty = _empty_values(layout)
        for f in read.features:
            values = [empty[f]] * len(keys)
            for i, v in zip(present, found[f], strict=True):
                values[i] = v
            found[f] = values
    return layout, by_name, found


def view_features(
    plan: ServicePlan,
    read: ViewRead,
    rows: Sequence[Mapping[str, Any]] | pa.Table,
    at: Timestamp | None,
    columns: ViewColumns,
) -> tuple[dict[str, list[Any]], dict[str, pa.Array]]:
    """`view_values` as service columns `<view>__<feature>`, in the forms the service uses
    them: its output columns as the Python values of their canonical type, and an on-demand
    step's inputs as canonical Arrow arrays."""
    layout, by_name, found = view_values(plan, read, rows, at, columns)
    values: dict[str, list[Any]] = {}
    arrays: dict[str, pa.Array] = {}
    for f in read.features:
        column = read.column(f)
        if column in plan.outputs:
            values[column] = feature_values(layout, by_name[f], found[f])
        if column in plan.step_inputs:
            arrays[column] = feature_column(layout, by_name[f], found[f])
    return values, arrays


def one_row(
    plan: ServicePlan, row: Mapping[str, Any], at: Timestamp | None, read_one: EntityRead
) -> dict[str, Any] | None:
    """`get_service`'s vector for one row whose request fields are plain Python values of
    their declared kinds and whose entity keys are str: one point read per view, and each
    on-demand step's input table made from the row's Python values in one conversion
    (`one_row_steps`). The same values as `get_service_many([row])` (tested), without its
    per-batch work. None for any other row (a missing column, another type, a null or int
    key, a composite key, an out-of-range int, a feature the live version lacks): the caller
    then takes the batch path, which reads it or names what is wrong.

    Raises:
        OnDemandError: as `state.services.on_demand_columns`.
        InexactReadError: as a read as of `at`.
    """
    inputs: dict[str, Any] = {}  # the on-demand steps' inputs, as Python values
    for field, plain, kind_type, is_input in plan.request_checks:
        value = row.get(field, _ABSENT)
        if value is _ABSENT or (value is not None and not plain(value)):
            return None
        if is_input:
            inputs[field] = value
        elif not _converts(value, kind_type):
            return None  # e.g. an int out of an int field's range: the batch path names it
    layouts: list[ViewLayout] = []
    found: list[dict[str, Any]] = []
    for read in plan.reads:
        if len(read.entity_columns) != 1:
            return None
        key = row.get(read.entity_columns[0])
        if type(key) is not str:
            return None
        _, layout, read_values = read_one(read.view, key, at, read.wanted)
        layouts.append(layout)
        found.append(read_values)
    recipe = _row_recipe(plan, tuple(layouts))
    if recipe is None:
        return None  # a feature the live version lacks: the batch path raises naming it
    values: dict[str, Any] = {}
    for takes, features in zip(recipe.takes, found, strict=True):
        for name, column, to_python, is_output, is_input in takes:
            value = features[name]
            if is_output:
                values[column] = value if value is None else to_python(value)
            if is_input:
                inputs[column] = value
    outputs = one_row_steps(plan, inputs, recipe.structs)
    if outputs is None:
        return None
    return {c: values[c] if c in values else outputs[c] for c in plan.columns}


_ABSENT = object()

# (feature, its service column, Python value -> canonical Python value, is an output column,
# is a step input)
_Take = tuple[str, str, Callable[[Any], Any], bool, bool]


@dataclass(frozen=True, slots=True)
class _RowRecipe:
    """How `one_row` uses what it read, for one plan and the layouts its views were read at:
    per view the features it takes, and each on-demand step's struct type."""

    takes: tuple[tuple[_Take, ...], ...]
    structs: tuple[pa.StructType, ...]


_RECIPES: dict[tuple[int, ...], tuple[ServicePlan, tuple[ViewLayout, ...], _RowRecipe | None]] = {}


def _row_recipe(plan: ServicePlan, layouts: tuple[ViewLayout, ...]) -> _RowRecipe | None:
    """`_RowRecipe` of the plan at these layouts, made once (None when a feature the plan
    reads is not in its view's layout)."""
    key = (id(plan), *map(id, layouts))
    cached = _RECIPES.get(key)
    if cached is not None:  # its entry holds the plan and layouts: their ids are not reused
        return cached[2]
    if len(_RECIPES) >= 256:  # layouts come and go with versions: keep the cache small
        _RECIPES.clear()
    recipe = _make_recipe(plan, layouts)
    _RECIPES[key] = (plan, layouts, recipe)
    return recipe


def _make_recipe(plan: ServicePlan, layouts: tuple[ViewLayout, ...]) -> _RowRecipe | None:
    types: dict[str, pa.DataType] = {f: t for f, _, t, _ in plan.request_checks}
    takes = []
    for read, layout in zip(plan.reads, layouts, strict=True):
        by_name = _features_by_name(layout)
        if any(f not in by_name for f in read.features):
            return None
        kinds = feature_types(layout)
        view_takes = []
        for f in read.features:
            column = read.column(f)
            types[column] = kinds[f]
            view_takes.append(
                (
                    f,
                    column,
                    value_converter(layout, by_name[f]),
                    column in plan.outputs,
                    column in plan.step_inputs,
                )
            )
        takes.append(tuple(view_takes))
    return _RowRecipe(tuple(takes), step_structs(plan, types))


def _converts(value: Any, kind: pa.DataType) -> bool:
    try:
        pa.array([value], kind)
    except (TypeError, OverflowError, pa.ArrowException):
        return False
    return True


def _entity_keys(read: ViewRead, rows: Sequence[Mapping[str, Any]] | pa.Table) -> list[Any]:
    """Each row's key of the view (a value, or a tuple for a composite key); None when a part
    is null: that row gets the view's empty-window values, as an unknown key does."""
    if isinstance(rows, pa.Table):
        parts = [rows.column(c).to_pylist() for c in read.entity_columns]
    else:
        parts = [[row[c] for row in rows] for c in read.entity_columns]
    if len(parts) == 1:
        return list(parts[0])
    return [None if None in key else key for key in zip(*parts, strict=True)]


_BY_NAME: dict[int, tuple[ViewLayout, dict[str, FeatureDef]]] = {}


def _features_by_name(layout: ViewLayout) -> dict[str, FeatureDef]:
    cached = _BY_NAME.get(id(layout))
    if cached is None or cached[0] is not layout:
        cached = _BY_NAME[id(layout)] = (layout, {f.name: f for f in layout.features})
    return cached[1]


_EMPTY: dict[int, tuple[ViewLayout, dict[str, Any]]] = {}


def _empty_values(layout: ViewLayout) -> dict[str, Any]:
    """The view's empty-window values (what an unknown key reads), computed once per layout."""
    cached = _EMPTY.get(id(layout))
    if cached is None or cached[0] is not layout:
        cached = _EMPTY[id(layout)] = (layout, evaluate_blob(layout, empty_blob(layout), 0, None))
    return cached[1]


def _missing_feature(
    plan: ServicePlan, read: ViewRead, missing: list[str], version: int, layout: ViewLayout
) -> MissingFeatureError:
    return MissingFeatureError(
        f"service {plan.name!r}: feature(s) {missing} of view {read.view!r} are not in its "
        f"live version v{version} (features: {', '.join(f.name for f in layout.features)}); "
        "the view's definition changed under the service: deploy the definitions that "
        "declare them (flows.run / flows.replay), or change the service"
    )
