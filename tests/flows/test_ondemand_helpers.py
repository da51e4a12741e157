"""`flows.ondemand`'s helpers against plain Python references, on both of their paths.

Each helper answers a few rows (a request) in Python floats and many rows (a spine batch) with
NumPy, Arrow compute or a compiled loop; a row must get the same value either way (to the
bit), with nulls, NaN, infinities, zeros and integer columns, so an online request and its
spine row in a snapshot agree. The references here are written from the documented semantics,
not from the helpers' code.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.ondemand import _SMALL, category_index, haversine_km, one_hot, ratio

MANY = _SMALL + 8  # rows past which the helpers take their vectorized path


def bits(values: list[Any]) -> list[Any]:
    """Floats by their bits (NaN equal to NaN, -0.0 told from 0.0), other values as they are."""
    return [int(np.float64(v).view(np.int64)) if isinstance(v, float) else v for v in values]


def both_paths(helper: Any, *columns: pa.Array) -> list[Any]:
    """The helper's values for the rows alone (the few-rows path) and the same rows padded to
    MANY (the vectorized path), checked equal; the values."""
    few = helper(*columns).to_pylist()
    pad = MANY - len(columns[0])
    padded = [pa.concat_arrays([c, pa.array([c[0].as_py()] * pad, c.type)]) for c in columns]
    many = helper(*padded).to_pylist()[: len(columns[0])]
    assert bits(few) == bits(many)
    return few


def python_ratio(x: float | None, y: float | None) -> float | None:
    if x is None or y is None or not math.isfinite(x) or not math.isfinite(y) or y == 0:
        return None
    return x / y


NUMBERS = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-308, 1e308, 5e-324]),
)


@settings(max_examples=80)
@given(st.lists(st.tuples(NUMBERS, NUMBERS), min_size=1, max_size=12))
def test_ratio_is_the_division_or_null(pairs: list[tuple[float | None, float | None]]) -> None:
    top = pa.array([p[0] for p in pairs], pa.float64())
    bottom = pa.array([p[1] for p in pairs], pa.float64())
    got = both_paths(ratio, top, bottom)
    assert bits(got) == bits([python_ratio(x, y) for x, y in pairs])


def test_ratio_of_integer_float32_and_null_columns() -> None:
    ints = pa.array([3, None, 2**53 + 1, -4])
    floats32 = pa.array([1.5, 2.0, 1.0, 0.0], pa.float32())
    got = both_paths(ratio, ints, floats32)
    assert got == [2.0, None, float(2**53), None]
    assert ratio(pa.nulls(3), pa.array([1.0, 2.0, 3.0])).to_pylist() == [None] * 3
    assert ratio([1.0, 2.0], np.array([4.0, 0.0])).to_pylist() == [0.25, None]
    assert ratio(pa.chunked_array([[1.0], [3.0]]), [2.0, 2.0]).to_pylist() == [0.5, 1.5]


def test_ratio_refuses_text_and_unequal_lengths() -> None:
    with pytest.raises(TypeError, match="numerator has type string"):
        ratio(pa.array(["1.0"]), pa.array([1.0]))
    with pytest.raises(TypeError, match="denominator has type list"):
        ratio(pa.array([1.0]), pa.array([[1.0]]))
    with pytest.raises(ValueError, match="different lengths"):
        ratio([1.0, 2.0], [1.0])


CHANNELS = ["pos", "web", "app", "web"]  # a repeated category keeps its first position


@settings(max_examples=60)
@given(
    st.lists(
        st.one_of(st.none(), st.sampled_from(["pos", "web", "app", "atm", ""])),
        min_size=1,
        max_size=12,
    )
)
def test_category_index_and_one_hot(values: list[str | None]) -> None:
    column = pa.array(values, pa.string())
    codes = both_paths(lambda c: category_index(c, CHANNELS), column)
    want = [None if v is None else (CHANNELS.index(v) if v in CHANNELS else -1) for v in values]
    assert codes == want
    hot = both_paths(lambda c: one_hot(c, CHANNELS), column)
    assert hot == [
        None if c is None else [1.0 if i == c else 0.0 for i in range(len(CHANNELS))] for c in want
    ]


def test_category_index_follows_changed_categories() -> None:
    cats = ["a", "b"]
    assert category_index(["b"], cats).to_pylist() == [1]
    cats.reverse()  # the same list object with other contents: not a stale cached lookup
    assert category_index(["b"], cats).to_pylist() == [0]
    with pytest.raises(TypeError, match="one string"):
        category_index(["a"], "ab")


def python_haversine(a: float, b: float, c: float, d: float) -> float:
    p1, l1, p2, l2 = map(math.radians, (a, b, c, d))
    h = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin((l2 - l1) / 2) ** 2
    return 2 * 6371.0088 * math.asin(math.sqrt(min(max(h, 0.0), 1.0)))


def test_haversine_against_known_distances_and_nulls() -> None:
    # Paris - London about 343.5 km; a quarter of the equator; the antipodes: half the circle
    lat1 = pa.array([48.8566, 0.0, 0.0, None, 10.0])
    lon1 = pa.array([2.3522, 0.0, 0.0, 1.0, 20.0])
    lat2 = pa.array([51.5074, 0.0, 0.0, 1.0, 10.0])
    lon2 = pa.array([-0.1278, 90.0, 180.0, 1.0, 20.0])
    got = haversine_km(lat1, lon1, lat2, lon2).to_pylist()
    assert got[0] == pytest.approx(343.5, abs=0.5)
    assert got[1] == pytest.approx(math.pi / 2 * 6371.0088, rel=1e-12)
    assert got[2] == pytest.approx(math.pi * 6371.0088, rel=1e-12)
    assert got[3] is None
    assert got[4] == 0.0
    for i in (0, 1, 2, 4):
        args = (lat1[i].as_py(), lon1[i].as_py(), lat2[i].as_py(), lon2[i].as_py())
        assert got[i] == pytest.approx(python_haversine(*args), rel=1e-12, abs=1e-9)
