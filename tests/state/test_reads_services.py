"""The fast paths of `get_service`: each gives what the checked path it skips gives.

- float and float-vector request fields given as Python floats are built straight in their
  declared Arrow type (`state.services._float_values`) instead of inferred and cast;
- `cosine_similarity` (one compiled loop over the columns' Arrow buffers) gives a row the same
  value alone, among many, sliced or not, and the value of a plain Python loop over its items.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.ondemand import cosine_similarity
from state.errors import RequestTypeError
from state.services import (
    FIELD_TYPES,
    OnDemandStep,
    ServicePlan,
    _plain_values,
    conform,
    on_demand_columns,
    one_row_steps,
    request_columns,
    step_structs,
)

EDGES = [0.1, 1 / 3, 1e300, -1e-320, 3.4028235e38, 3.4028236e38, math.inf, -0.0, 16777217.0]


def same_values(a: pa.Array, b: pa.Array) -> bool:
    """Equal type and values, NaN equal to NaN, -0.0 told from 0.0."""
    if a.type != b.type:
        return False
    return repr(a.to_pylist()) == repr(b.to_pylist())


@pytest.mark.parametrize("kind", ["float", "double", "array<float>", "array<double>"])
def test_float_fields_built_directly_equal_the_checked_path(kind: str) -> None:
    if kind.startswith("array"):
        values: list[Any] = [EDGES, None, [], [math.nan, 2.5]]
    else:
        values = [*EDGES, None, math.nan]
    rows = [{"x": v} for v in values]
    fast = _plain_values(rows, "x", kind)
    assert fast is not None
    checked = conform(pa.array(values), kind)
    assert checked is not None
    assert fast.type == FIELD_TYPES[kind]
    assert same_values(fast, checked)


@pytest.mark.parametrize(
    ("kind", "values"),
    [
        ("int", [0, -(2**31), 2**31 - 1, None]),
        ("long", [0, -(2**63), 2**63 - 1, None]),
        ("string", ["web", "", "\u00e9\u0000", None]),
        ("boolean", [True, False, None]),
    ],
)
def test_plain_fields_built_directly_equal_the_checked_path(kind: str, values: list[Any]) -> None:
    fast = _plain_values([{"x": v} for v in values], "x", kind)
    checked = conform(pa.array(values), kind)
    assert fast is not None
    assert checked is not None
    assert same_values(fast, checked)


def test_other_values_take_the_checked_path() -> None:
    assert _plain_values([{"x": 1}], "x", "double") is None  # an int: inferred, then cast
    assert _plain_values([{"x": True}], "x", "float") is None  # refused by the checked path
    assert _plain_values([{"x": True}], "x", "long") is None
    assert _plain_values([{"x": 2**31}], "x", "int") is None  # out of range: refused there
    assert _plain_values([{"x": 2**70}], "x", "long") is None
    assert _plain_values([{"x": [1.0, 2]}], "x", "array<float>") is None
    assert _plain_values([{"y": 1.0}], "x", "double") is None  # missing: named by it
    assert _plain_values(pa.table({"x": [1.0]}), "x", "double") is None
    assert _plain_values([{"x": 1.0}], "x", "string") is None


@pytest.mark.parametrize(("kind", "value"), [("int", 2**31), ("long", 2**70), ("int", True)])
def test_out_of_range_and_wrong_kind_ints_are_request_errors(kind: str, value: Any) -> None:
    plan = ServicePlan("svc", (), (("x", kind),), (), ())
    with pytest.raises(RequestTypeError, match="request field 'x'"):
        request_columns(plan, [{"x": value}])


@settings(max_examples=60)
@given(st.data(), st.integers(1, 6), st.integers(0, 3))
def test_cosine_paths_agree_bit_for_bit(data: st.DataObject, dim: int, cut: int) -> None:
    """A few rows (Python floats), the same rows among many without nulls (the uniform matrix)
    and among many with a null row (the general matrix): equal to the last bit, sliced or not.
    So a request's value online is the value its spine row gets in a snapshot batch."""
    n = data.draw(st.integers(1, 8))
    vec = st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=dim, max_size=dim)
    a_rows = data.draw(st.lists(vec, min_size=n, max_size=n))
    b_rows = data.draw(st.lists(vec, min_size=n, max_size=n))
    a = pa.array([*a_rows, [0.0] * dim], pa.list_(pa.float32()))
    b = pa.array([*b_rows, [1.0] * dim], pa.list_(pa.float64()))
    start = min(cut, n - 1)
    few = cosine_similarity(a.slice(start, n - start), b.slice(start, n - start))
    pad = 40
    uniform = cosine_similarity(
        pa.concat_arrays([a.slice(start, n - start), pa.array([[1.0] * dim] * pad, a.type)]),
        pa.concat_arrays([b.slice(start, n - start), pa.array([[2.0] * dim] * pad, b.type)]),
    )
    general = cosine_similarity(
        pa.concat_arrays([a.slice(start, n - start), pa.array([None] * pad, a.type)]),
        pa.concat_arrays([b.slice(start, n - start), pa.array([None] * pad, b.type)]),
    )
    assert same_values(few, uniform.slice(0, n - start))
    assert same_values(few, general.slice(0, n - start))


def python_cosine(u: list[float | None] | None, v: list[float | None] | None) -> float | None:
    """The reference: a row's sums over its items in order (left folds), in Python floats."""
    if not u or not v or None in u or None in v:
        return None
    pairs = list(zip(map(float, u), map(float, v), strict=True))
    dot = functools.reduce(lambda total, pq: total + pq[0] * pq[1], pairs, 0.0)
    norms = [
        functools.reduce(lambda total, x: total + x * x, side, 0.0)
        for side in zip(*pairs, strict=True)
    ]
    norm = math.sqrt(norms[0]) * math.sqrt(norms[1])
    return dot / norm if norm > 0 else None


@settings(max_examples=80)
@given(st.data(), st.integers(1, 6), st.sampled_from([pa.float32(), pa.float64(), pa.int64()]))
def test_cosine_is_the_python_loop_bit_for_bit(
    data: st.DataObject, dim: int, item: pa.DataType
) -> None:
    """Null rows, empty rows, null items, zero vectors, integer items, a sliced column."""
    number = (
        st.integers(-1000, 1000)
        if pa.types.is_integer(item)
        else st.floats(-1e6, 1e6, allow_nan=False, width=32)
    )
    vec = st.one_of(
        st.none(),
        st.just([]),
        st.lists(st.one_of(st.none(), number), min_size=dim, max_size=dim),
        st.lists(number, min_size=dim, max_size=dim),
        st.just([0] * dim if pa.types.is_integer(item) else [0.0] * dim),
    )
    n = data.draw(st.integers(1, 12))
    a_rows = data.draw(st.lists(vec, min_size=n, max_size=n))
    b_rows = data.draw(st.lists(vec, min_size=n, max_size=n))
    cut = data.draw(st.integers(0, n - 1))
    a = pa.array(a_rows, pa.list_(item)).slice(cut)
    b = pa.array(b_rows, pa.large_list(pa.float64())).slice(cut)
    want = [python_cosine(u, v) for u, v in zip(a.to_pylist(), b.to_pylist(), strict=True)]
    few = cosine_similarity(a, b).to_pylist()  # a few rows: flows.ondemand's Python loop
    pad = 40  # past _SMALL rows: the compiled loop over the Arrow buffers
    many = cosine_similarity(
        pa.concat_arrays([a, pa.nulls(pad, a.type)]), pa.concat_arrays([b, pa.nulls(pad, b.type)])
    ).to_pylist()[: len(a)]
    for got in (few, many):
        assert [None if x is None else struct_bits(x) for x in got] == [
            None if x is None else struct_bits(x) for x in want
        ]


def struct_bits(x: float) -> int:
    return int(np.float64(x).view(np.int64))


@pytest.mark.parametrize("rows", [2, 40])
def test_cosine_nulls_zeros_and_dimensions_on_both_paths(rows: int) -> None:
    half = rows // 2
    a = pa.array([[1.0, 2.0]] * half + [None] * (rows - half))
    b = pa.array([[2.0, 4.0]] * half + [[1.0, 0.0]] * (rows - half))
    assert cosine_similarity(a, b).to_pylist() == [pytest.approx(1.0)] * half + [None] * (
        rows - half
    )
    nulls = pa.nulls(rows, pa.list_(pa.float64()))
    assert cosine_similarity(nulls, b).to_pylist() == [None] * rows
    with pytest.raises(ValueError, match="dimension 2 and 3"):
        cosine_similarity(a, pa.array([[1.0, 2.0, 3.0]] * rows))
    with pytest.raises(TypeError, match="a has type int64"):
        cosine_similarity(pa.array(list(range(rows))), b)


def test_cosine_fast_path_leaves_ragged_and_null_columns_to_the_general_path() -> None:
    ragged = pa.array([[1.0, 0.0], [1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="dimensions"):
        cosine_similarity(ragged, ragged)
    items = pa.array([[1.0, None], [1.0, 1.0]])
    assert cosine_similarity(items, pa.array([[1.0, 1.0], [1.0, 1.0]])).to_pylist() == [
        None,
        pytest.approx(1.0),
    ]
    zeros = np.zeros((2, 3))
    assert cosine_similarity(zeros, zeros).to_pylist() == [None, None]


def test_one_row_steps_equal_the_batch_steps_with_a_chain_of_steps() -> None:
    """The one-row path's tables (one struct conversion per step) give every step, a second
    one reading the first's outputs included, what the batch path's column arrays give; a
    value that does not convert sends the row to the batch path (None)."""

    def first(rows: pa.Table) -> dict[str, Any]:
        return {"scaled": pc.multiply(rows["amount"], 2.0), "code": pa.array([7] * len(rows))}

    def second(rows: pa.Table) -> dict[str, Any]:
        return {"sum": pc.add(rows["first__scaled"], rows["first__code"]), "echo": rows["tags"]}

    steps = (
        OnDemandStep("first", first, ("amount",), (("scaled", "double"), ("code", "int"))),
        OnDemandStep(
            "second",
            second,
            ("first__scaled", "first__code", "tags"),
            (("sum", "double"), ("echo", "array<float>")),
        ),
    )
    columns = ("first__scaled", "first__code", "second__sum", "second__echo")
    plan = ServicePlan("svc", (), (("amount", "double"), ("tags", "array<float>")), steps, columns)
    types = {"amount": FIELD_TYPES["double"], "tags": FIELD_TYPES["array<float>"]}
    for amount, tags in [(1.5, [0.1, 1 / 3]), (None, None), (1e300, []), (-0.0, [math.nan])]:
        values = {"amount": amount, "tags": tags}
        batch = on_demand_columns(plan, {k: pa.array([v], types[k]) for k, v in values.items()}, 1)
        one = one_row_steps(plan, values, step_structs(plan, types))
        assert one is not None
        assert repr(one) == repr({c: batch[c][0].as_py() for c in columns})
    assert one_row_steps(plan, {"amount": "text", "tags": None}, step_structs(plan, types)) is None
