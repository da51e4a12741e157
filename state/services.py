"""Feature services: one model's feature vector for a batch of rows, online and offline.

A `flows.spec.FeatureService` reduces to a `ServicePlan` (plain data: the views it reads, by
which entity columns and which features; the request fields; the on-demand steps; the output
columns in order). `evaluate_service` is the one code path that turns a batch's view features
(Arrow columns `<view>__<feature>`) and request fields into the service's columns
(`<view>__<feature>`, `<on_demand>__<output>`): `FeatureClient.get_service_many` calls it with
the rows of one call, `flows.snapshot --service` with the spine in batches, so the on-demand
part is equal online and offline by construction. The view features it gets are not: the
online read and the point-in-time join are separate code, equal by test
(tests/flows/test_services.py holds whole service vectors equal). Both sides first bring their
inputs to the same canonical Arrow types (`request_columns`, `feature_type`), so an on-demand
function sees identical tables.

    request rows / spine  --request_columns-->  request fields (canonical types)  --+
    view reads / point-in-time --feature_column-->  <view>__<feature> columns ------+
                                                                                    v
                                      evaluate_service: each on-demand step in order, checked
                                      -> {column: pa.Array} in the service's order
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from state.errors import OnDemandError, RequestTypeError, ServiceRequestError
from state.layout import FeatureDef, ViewLayout

# Declared request-field and on-demand output types, and the Arrow type each arrives as.
FIELD_TYPES: dict[str, pa.DataType] = {
    "int": pa.int32(),
    "long": pa.int64(),
    "float": pa.float32(),
    "double": pa.float64(),
    "string": pa.string(),
    "boolean": pa.bool_(),
    "array<float>": pa.list_(pa.float32()),
    "array<double>": pa.list_(pa.float64()),
}

OnDemandFunction = Callable[[pa.Table], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class ViewRead:
    """One view a service reads: its key columns, the request/spine columns holding them (the
    same names unless the service maps them with `keys=`), and the features it needs."""

    view: str
    key_columns: tuple[str, ...]
    entity_columns: tuple[str, ...]
    features: tuple[str, ...]
    # derived: the features as a set (how the client's read takes them)
    wanted: frozenset[str] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "wanted", frozenset(self.features))

    def column(self, feature: str) -> str:
        return f"{self.view}__{feature}"


@dataclass(frozen=True, slots=True)
class OnDemandStep:
    """One on-demand function: the input columns of its table, in order, and its outputs."""

    name: str
    function: OnDemandFunction
    inputs: tuple[str, ...]
    outputs: tuple[tuple[str, str], ...]  # (output name, declared type)
    # derived: the output names as a set
    declared: frozenset[str] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "declared", frozenset(name for name, _ in self.outputs))


@dataclass(frozen=True, slots=True)
class ServicePlan:
    """What a service reads, computes and returns (built by `FeatureService.service_plan`)."""

    name: str
    reads: tuple[ViewRead, ...]
    request: tuple[tuple[str, str], ...]  # (field, declared type)
    steps: tuple[OnDemandStep, ...]
    columns: tuple[str, ...]  # the output columns, in the order the service lists them
    # derived: the columns some on-demand step reads, and the output columns as a set (a view
    # feature may be either or both: the online read builds each only in the form it needs)
    step_inputs: frozenset[str] = dataclasses.field(init=False, repr=False, compare=False)
    outputs: frozenset[str] = dataclasses.field(init=False, repr=False, compare=False)
    # derived: the entity columns the views are looked up by, each once, in order
    entity_columns: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False)
    # derived: per request field (field, whether a non-null value is a plain one of its kind
    # (`plain_check`), its Arrow type, whether a step reads it): the one-row read's checks
    request_checks: tuple[tuple[str, Callable[[Any], bool], pa.DataType, bool], ...] = (
        dataclasses.field(init=False, repr=False, compare=False)
    )

    def __post_init__(self) -> None:
        inputs = frozenset(c for s in self.steps for c in s.inputs)
        object.__setattr__(self, "step_inputs", inputs)
        object.__setattr__(self, "outputs", frozenset(self.columns))
        seen = dict.fromkeys(c for r in self.reads for c in r.entity_columns)
        object.__setattr__(self, "entity_columns", tuple(seen))
        checks = tuple(
            (field, plain_check(kind), FIELD_TYPES[kind], field in inputs)
            for field, kind in self.request
        )
        object.__setattr__(self, "request_checks", checks)


def evaluate_service(
    plan: ServicePlan, features: Mapping[str, pa.Array], request: Mapping[str, pa.Array], n: int
) -> dict[str, pa.Array]:
    """The service's output columns for a batch of `n` rows.

    Args:
        plan: the service.
        features: `<view>__<feature>` -> values (canonical types, see `feature_column`).
        request: request field -> values (as `request_columns` gives them).
        n: the number of rows.

    Raises:
        OnDemandError: a function raised, or returned a missing, extra, wrong-length or
            wrong-type output; the message names the service, the function and the output.
    """
    columns: dict[str, pa.Array] = {**request, **features}
    columns.update(on_demand_columns(plan, columns, n))
    return {name: columns[name] for name in plan.columns}


def on_demand_columns(
    plan: ServicePlan, inputs: Mapping[str, pa.Array], n: int
) -> dict[str, pa.Array]:
    """The outputs of the service's on-demand steps, `<on_demand>__<output>` -> values, for
    a batch of `n` rows: each step, in order, gets a table of its input columns (from
    `inputs`, the request fields and view features it reads, or an earlier step's outputs).

    Raises:
        OnDemandError: as `evaluate_service`.
    """
    columns = dict(inputs)
    out: dict[str, pa.Array] = {}
    for step in plan.steps:
        if n == 0:  # no rows: a function is not asked to handle an empty table
            outputs = {name: pa.array([], FIELD_TYPES[kind]) for name, kind in step.outputs}
        else:
            table = pa.Table.from_arrays([columns[c] for c in step.inputs], names=list(step.inputs))
            outputs = _call(plan.name, step, table, n)
        for name, values in outputs.items():
            columns[f"{step.name}__{name}"] = out[f"{step.name}__{name}"] = values
    return out


def step_structs(plan: ServicePlan, types: Mapping[str, pa.DataType]) -> tuple[pa.StructType, ...]:
    """The Arrow struct type of each on-demand step's one-row table (`one_row_steps`), given
    the canonical Arrow `types` of the request fields and view features the steps read; an
    earlier step's outputs are of their declared types."""
    kinds = dict(types)
    structs = []
    for step in plan.steps:
        structs.append(pa.struct([(c, kinds[c]) for c in step.inputs]))
        for name, kind in step.outputs:
            kinds[f"{step.name}__{name}"] = FIELD_TYPES[kind]
    return tuple(structs)


def one_row_steps(
    plan: ServicePlan, values: Mapping[str, Any], structs: Sequence[pa.StructType]
) -> dict[str, Any] | None:
    """`on_demand_columns` for one row given as Python values, with each step's table made in
    one conversion of the row to its struct type (`step_structs`: the same arrays
    `pa.array([value], type)` makes column by column, in about 60% of the time). Returns
    `<on_demand>__<output>` -> Python value, or None when a value does not convert (e.g. an
    int out of an `int` field's range: the batch path names it).

    Raises:
        OnDemandError: as `evaluate_service`.
    """
    row = dict(values)
    out: dict[str, Any] = {}
    for step, struct in zip(plan.steps, structs, strict=True):
        try:
            record = pa.array([{c: row[c] for c in step.inputs}], struct)
        except (TypeError, OverflowError, pa.ArrowException):
            return None
        outputs = _call(plan.name, step, pa.Table.from_struct_array(record), 1)
        for name, _ in step.outputs:
            column = f"{step.name}__{name}"
            row[column] = out[column] = outputs[name].to_pylist()[0]
    return out


def _call(service: str, step: OnDemandStep, table: pa.Table, n: int) -> dict[str, pa.Array]:
    try:
        result = step.function(table)
    except Exception as exc:
        raise OnDemandError(
            f"{_where(service, step)} raised {type(exc).__name__}: {exc} (computing "
            f"{', '.join(name for name, _ in step.outputs)} for {n} rows); fix the function"
        ) from exc
    if not isinstance(result, Mapping):
        raise OnDemandError(
            f"{_where(service, step)} returned a {type(result).__name__}; return a dict of "
            f"output name -> array with the outputs {[name for name, _ in step.outputs]}"
        )
    if not step.declared.issuperset(result):
        extra = [name for name in result if name not in step.declared]
        raise OnDemandError(
            f"{_where(service, step)}: output(s) {extra} are not declared; declare them in "
            f"@on_demand(outputs=...) (declared: {sorted(step.declared)}) or do not return them"
        )
    return {name: _output(service, step, name, kind, result, n) for name, kind in step.outputs}


def _where(service: str, step: OnDemandStep) -> str:
    return f"service {service!r}, on-demand function {step.name!r}"


def _output(
    service: str, step: OnDemandStep, name: str, kind: str, result: Mapping[str, Any], n: int
) -> pa.Array:
    if name not in result:
        raise OnDemandError(
            f"{_where(service, step)}: output {name!r} is missing from the returned dict (got "
            f"{sorted(result)}); return every declared output"
        )
    try:
        values = as_arrow(result[name])
    except (TypeError, ValueError, pa.ArrowException) as exc:
        raise OnDemandError(
            f"{_where(service, step)}: output {name!r} is a {type(result[name]).__name__}, not "
            f"an array ({exc}); return a pyarrow array, a NumPy array or a list of {n} values"
        ) from exc
    if len(values) != n:
        raise OnDemandError(
            f"{_where(service, step)}: output {name!r} has {len(values)} values for {n} rows; "
            "return one value per row of the table the function gets"
        )
    converted = conform(values, kind)
    if converted is None:
        raise OnDemandError(
            f"{_where(service, step)}: output {name!r} has type {values.type}, declared "
            f"{kind!r}; return {kind} values (or declare the output's type as what the "
            "function returns)"
        )
    return converted


def as_arrow(values: Any) -> pa.Array:
    """An Arrow array from an Arrow array or chunked array, a NumPy array or a list."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    if isinstance(values, np.ndarray) and values.ndim == 2:
        flat = pa.array(np.ascontiguousarray(values).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    if isinstance(values, np.ndarray | list | tuple):
        return pa.array(values)
    raise TypeError(f"{type(values).__name__} is not an array")


def conform(values: pa.Array, kind: str) -> pa.Array | None:
    """`values` as the canonical Arrow type of the declared `kind`, or None when they are of
    another kind (text for a number, a float for an int, ...). An int overflowing an `int`
    field is another kind too."""
    target = FIELD_TYPES[kind]
    if values.type == target:
        return values
    if not _compatible(values.type, kind):
        return None
    try:
        return values.cast(target, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def _compatible(have: pa.DataType, kind: str) -> bool:
    t = pa.types
    if t.is_null(have):
        return True
    if t.is_dictionary(have):
        return _compatible(have.value_type, kind)
    if kind in ("int", "long"):
        return bool(t.is_integer(have))
    if kind in ("float", "double"):
        return bool(t.is_integer(have) or t.is_floating(have))
    if kind == "string":
        return bool(t.is_string(have) or t.is_large_string(have))
    if kind == "boolean":
        return bool(t.is_boolean(have))
    if t.is_list(have) or t.is_large_list(have) or t.is_fixed_size_list(have):
        item = have.value_type
        return bool(t.is_integer(item) or t.is_floating(item) or t.is_null(item))
    return False


# --- request fields: the same checks and types for request rows and spine columns ----------


def request_columns(
    plan: ServicePlan, rows: pa.Table | Sequence[Mapping[str, Any]]
) -> dict[str, pa.Array]:
    """The request fields of a batch, checked and in their canonical types.

    Raises:
        ServiceRequestError: a field is missing (naming the field and the row).
        RequestTypeError: a value is not of the field's declared type.
    """
    out: dict[str, pa.Array] = {}
    for field, kind in plan.request:
        fast = _plain_values(rows, field, kind)
        if fast is not None:
            out[field] = fast
            continue
        raw = _field_values(plan, rows, field, "request field")
        values = conform(raw, kind)
        if values is None:
            raise RequestTypeError(
                f"service {plan.name!r}: request field {field!r} has {_kind_of(raw)} values, "
                f"declared {kind!r}; send {kind} values (or null)"
            )
        out[field] = values
    return out


def _plain_values(
    rows: pa.Table | Sequence[Mapping[str, Any]], field: str, kind: str
) -> pa.Array | None:
    """A field whose values are all plain Python values of its declared kind (or None), built
    straight in its declared Arrow type: what `pa.array` then `conform` gives (the same C
    conversion of each value, without the inference and the cast); None for anything else,
    which takes the checked path (and its error messages)."""
    plain = _PLAIN_CHECKS.get(kind)
    if plain is None or isinstance(rows, pa.Table):
        return None
    try:
        values = [row[field] for row in rows]
        if not all(v is None or plain(v) for v in values):
            return None
        return pa.array(values, FIELD_TYPES[kind])
    except (KeyError, TypeError, OverflowError, pa.ArrowException):
        return None  # missing, not a row, or out of range: the checked path names it


def plain_check(kind: str) -> Callable[[Any], bool]:
    """Whether a (non-null) request value is a plain Python value of the declared `kind`:
    what `request_columns` builds straight in the field's Arrow type (`FIELD_TYPES`)."""
    return _PLAIN_CHECKS.get(kind, _never)


def _never(value: Any) -> bool:
    return False


def _float_list(v: Any) -> bool:
    return type(v) is list and _FLOAT.issuperset(map(type, v))


_FLOAT = frozenset({float})


_PLAIN_CHECKS: dict[str, Callable[[Any], bool]] = {
    "float": lambda v: type(v) is float,
    "double": lambda v: type(v) is float,
    "int": lambda v: type(v) is int,
    "long": lambda v: type(v) is int,
    "string": lambda v: type(v) is str,
    "boolean": lambda v: type(v) is bool,
    "array<float>": _float_list,
    "array<double>": _float_list,
}


def check_entity_columns(plan: ServicePlan, rows: pa.Table | Sequence[Mapping[str, Any]]) -> None:
    """Every entity column the service's views are looked up by is in every row.

    Raises:
        ServiceRequestError: naming the column (and the row) that is missing.
    """
    for column in plan.entity_columns:
        _require(plan, rows, column, "entity column")


def _field_values(
    plan: ServicePlan, rows: pa.Table | Sequence[Mapping[str, Any]], field: str, what: str
) -> pa.Array:
    _require(plan, rows, field, what)
    if isinstance(rows, pa.Table):
        return rows.column(field).combine_chunks()
    values = [row[field] for row in rows]
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:  # e.g. 2**70
        kinds = sorted({type(v).__name__ for v in values if v is not None})
        raise RequestTypeError(
            f"service {plan.name!r}: request field {field!r} has values of mixed or "
            f"unsupported types ({', '.join(kinds)}): {exc}; send one type per field"
        ) from exc


def _require(
    plan: ServicePlan, rows: pa.Table | Sequence[Mapping[str, Any]], column: str, what: str
) -> None:
    if isinstance(rows, pa.Table):
        if column not in rows.column_names:
            raise ServiceRequestError(
                f"service {plan.name!r}: {what} {column!r} is missing (columns: "
                f"{', '.join(rows.column_names)}); {_need(plan)}"
            )
        return
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise RequestTypeError(
                f"service {plan.name!r}: row {i} is a {type(row).__name__}; pass each row "
                "as a dict of entity columns and request fields"
            )
        if column not in row:
            raise ServiceRequestError(
                f"service {plan.name!r}: {what} {column!r} is missing from row {i} (it has "
                f"{', '.join(map(repr, row)) or 'nothing'}); {_need(plan)}"
            )


def _need(plan: ServicePlan) -> str:
    fields = [f for f, _ in plan.request]
    return (
        f"each row needs the entity columns {list(plan.entity_columns)} and the request "
        f"fields {fields}"
    )


def _kind_of(values: pa.Array) -> str:
    return str(values.type)


# --- view features: one canonical Arrow type per feature, online and offline ----------------

_BASE = {
    "int": pa.int64(),
    "long": pa.int64(),
    "float": pa.float64(),
    "double": pa.float64(),
    "boolean": pa.bool_(),
}


def feature_type(layout: ViewLayout, feature: FeatureDef) -> pa.DataType:
    """The Arrow type of a view feature in a service's columns (as in a plain snapshot)."""
    if feature.agg in ("count", "distinct_count"):
        return pa.int64()
    col_type = layout.column_types.get(feature.column or "", "double")
    if col_type.startswith("array"):
        return pa.list_(pa.float64())
    integral = col_type in ("int", "long")
    if feature.agg == "sum":
        return pa.int64() if integral else pa.float64()
    if feature.agg in ("mean", "var", "std", "percentile"):
        return pa.float64()
    base = _BASE.get(col_type, pa.string())
    return pa.list_(base) if feature.agg == "last_k" else base


def feature_column(layout: ViewLayout, feature: FeatureDef, values: Any) -> pa.Array:
    """A feature's values (a list from online reads, an Arrow column from a snapshot) as its
    canonical Arrow array."""
    kind = feature_types(layout)[feature.name]
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values if values.type == kind else values.cast(kind)
    return pa.array(values, type=kind)


def feature_values(layout: ViewLayout, feature: FeatureDef, values: list[Any]) -> list[Any]:
    """A feature's values from an online read as the Python values of its canonical Arrow
    type (what `feature_column(...).to_pylist()` gives, without building the array): the
    read's ints, floats, strings and lists, with ints made floats in float columns."""
    convert = _PYTHON.get(feature_types(layout)[feature.name])
    if convert is None:
        found: list[Any] = feature_column(layout, feature, values).to_pylist()
        return found
    return [v if v is None else convert(v) for v in values]


def value_converter(layout: ViewLayout, feature: FeatureDef) -> Callable[[Any], Any]:
    """`feature_values` of one non-null value, as a function."""
    convert = _PYTHON.get(feature_types(layout)[feature.name])
    if convert is None:
        return lambda value: feature_column(layout, feature, [value]).to_pylist()[0]
    return convert


def _float_items(v: Any) -> list[float | None]:
    return [x if x is None else float(x) for x in v]


_PYTHON: dict[pa.DataType, Callable[[Any], Any]] = {
    pa.int64(): int,
    pa.float64(): float,
    pa.string(): str,
    pa.bool_(): bool,
    pa.list_(pa.float64()): _float_items,
}

_TYPES: dict[int, tuple[ViewLayout, dict[str, pa.DataType]]] = {}


def feature_types(layout: ViewLayout) -> dict[str, pa.DataType]:
    """`feature_type` of each feature of the layout, worked out once per layout."""
    cached = _TYPES.get(id(layout))
    if cached is None or cached[0] is not layout:
        types = {f.name: feature_type(layout, f) for f in layout.features}
        cached = _TYPES[id(layout)] = (layout, types)
    return cached[1]


def rows_of(columns: Mapping[str, list[Any]], n: int) -> list[dict[str, Any]]:
    """Output columns (lists of values) as one dict per row, in row order."""
    names = list(columns)
    if not names:
        return [{} for _ in range(n)]
    if n == 1:  # get_service: one dict, without zipping
        return [{name: values[0] for name, values in columns.items()}]
    return [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]
