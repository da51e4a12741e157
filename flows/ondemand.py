"""Vectorized helpers for on-demand functions (request-time features).

Each takes Arrow arrays or chunked arrays, NumPy arrays or lists, all of one length, and
returns an Arrow array of that length; nulls in give nulls out (as documented per function).
They run the same way online (the rows of one `get_service_many` call) and offline (a spine
batch of `flows.snapshot --service`), so the values agree by construction.

    @on_demand(sources=[payment, user_spend], outputs={"text_similarity": "double"})
    def signals(rows):
        return {"text_similarity": cosine_similarity(
            rows["text_embedding"], rows["user_spend__text_embedding_mean_30d"])}
"""

from __future__ import annotations

import array
import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "EARTH_RADIUS_KM",
    "category_index",
    "cosine_similarity",
    "haversine_km",
    "one_hot",
    "ratio",
]

EARTH_RADIUS_KM = 6371.0088  # the IUGG mean Earth radius

_SMALL = 32  # rows up to which the helpers work in Python floats (same results, less set-up)
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]


def cosine_similarity(a: Any, b: Any) -> pa.Array:
    """Row-wise cosine similarity of two vector columns (lists of numbers), as float64.

    Null where either vector is null, holds a null element, or is all zeros. Each row's sums
    run over its items in order in float64 (`flows.ondemand_kernels.cosine_rows`), so a row
    gets the same value whatever batch it is in, online (one request) and offline (a spine
    batch).

    Raises:
        ValueError: the columns differ in length, a column's vectors differ in dimension, or
            two vectors of a row do.
    """
    left, right = _array(a), _array(b)
    _same_length(("a", left), ("b", right))
    if len(left) <= _SMALL:  # a request or a few: a Python loop beats the kernel's set-up
        return _cosine_few(_float_vectors(left, "a"), _float_vectors(right, "b"))
    kernels = _kernels()
    x, y = _vector_parts(left, "a"), _vector_parts(right, "b")
    values, ok, outcome = kernels.cosine_rows(*x, *y)
    if outcome == kernels.RAGGED:
        for name, arr in (("a", left), ("b", right)):
            dims = _usable_lengths(arr)
            if len(dims) > 1:
                _ragged(name, dims)
    if outcome == kernels.DIMENSIONS:
        _check_dims(_usable_lengths(left)[0], _usable_lengths(right)[0], True)
    return pa.array(values, mask=~ok)


def _cosine_few(left: pa.Array, right: pa.Array) -> pa.Array:
    """`cosine_rows` as a Python loop over a few rows: the same sums in the same order in
    float64 (Python floats), so the same values and the same errors, bit for bit."""
    xs, ys = left.to_pylist(), right.to_pylist()
    for name, rows in (("a", xs), ("b", ys)) if len(xs) > 1 else ():
        dims = {len(row) for row in rows if row and None not in row}
        if len(dims) > 1:
            _ragged(name, sorted(dims))
    out: list[float | None] = []
    for u, v in zip(xs, ys, strict=True):
        if not u or not v or None in u or None in v:
            out.append(None)
            continue
        _check_dims(len(u), len(v), True)
        dot = uu = vv = 0.0
        for p, q in zip(u, v, strict=True):
            dot += p * q
            uu += p * p
            vv += q * q
        norm = math.sqrt(uu) * math.sqrt(vv)
        out.append(dot / norm if norm > 0 else None)
    return _few_array(out, "d")


def warm_up() -> None:
    """Compile (or load from Numba's cache) the kernels for the common column types (vectors
    of float32 and float64, in lists), so that no request compiles one: the read client calls
    this when it loads definitions that use these helpers."""
    for left in (pa.float32(), pa.float64()):
        for right in (pa.float32(), pa.float64()):
            cosine_similarity(pa.array([[1.0]], pa.list_(left)), pa.array([[1.0]], pa.list_(right)))


@functools.cache
def _kernels() -> Any:
    """`flows.ondemand_kernels`, imported on first use (so a process that only declares
    on-demand functions, the flow, never loads Numba for them)."""
    import flows.ondemand_kernels

    return flows.ondemand_kernels


def _vector_parts(arr: pa.Array, name: str) -> tuple[Any, Any, Mask, Mask]:
    """A vector column as the kernel takes it: its items (float32 or float64), offsets, which
    rows are not null and which items are not null."""
    arr = _float_vectors(arr, name)
    items = arr.values
    rows_ok = _validity(arr)
    items_ok = _validity(items)
    values = items.to_numpy(zero_copy_only=False) if items.null_count else items.to_numpy()
    return values, arr.offsets.to_numpy(), rows_ok, items_ok


def _float_vectors(arr: pa.Array, name: str) -> pa.Array:
    """A vector column as lists of float32 or float64 (fixed-size lists, integer items and a
    null column cast to list<float64>).

    Raises:
        TypeError: the column is not a vector column.
    """
    t = arr.type
    if t.id in _LIST_IDS and t.value_type.id in _FLOAT_IDS:
        return arr
    _vector_type(arr, name)
    return arr.cast(pa.list_(pa.float64()))


# Arrow type ids for the helpers' type checks (one set lookup instead of pa.types calls)
_LIST_IDS = frozenset({pa.list_(pa.int8()).id, pa.large_list(pa.int8()).id})
_FLOAT_IDS = frozenset({pa.float32().id, pa.float64().id})
_NUMBER_IDS = frozenset(
    t.id
    for t in (
        *(pa.int8(), pa.int16(), pa.int32(), pa.int64()),
        *(pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64()),
        *(pa.float16(), pa.float32(), pa.float64(), pa.null()),
    )
)


def _validity(arr: pa.Array) -> Mask:
    """Which values are not null; empty when none is (the kernels read that as all valid)."""
    if not arr.null_count:
        return _NONE_NULL
    return np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


_NONE_NULL = np.zeros(0, dtype=bool)


def _usable_lengths(arr: pa.Array) -> list[int]:
    """The distinct lengths of a column's usable vectors (non-null, non-empty, no null item),
    in order (for the error messages)."""
    rows = arr.cast(pa.list_(pa.float64())).to_pylist()
    return sorted({len(row) for row in rows if row and None not in row})


def _check_dims(x_dim: int, y_dim: int, compared: bool) -> None:
    if compared and x_dim != y_dim:
        raise ValueError(
            f"cosine_similarity: vectors of dimension {x_dim} and {y_dim}; "
            "compare vectors of one dimension"
        )


def _ragged(name: str, dims: list[int]) -> None:
    raise ValueError(
        f"cosine_similarity: {name} holds vectors of dimensions {dims}; every vector of a "
        "column must have one dimension"
    )


def haversine_km(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> pa.Array:
    """Great-circle distance in km between (lat1, lon1) and (lat2, lon2), in degrees.

    Null where any of the four is null."""
    cols = [_array(c) for c in (lat1, lon1, lat2, lon2)]
    _same_length(*zip(("lat1", "lon1", "lat2", "lon2"), cols, strict=True))
    values = [_floats(c) for c in cols]
    ok = np.logical_and.reduce([v[1] for v in values])
    p1, l1, p2, l2 = (np.radians(v[0]) for v in values)
    h = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin((l2 - l1) / 2) ** 2
    out = 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))
    return pa.array(np.where(ok, out, 0.0), mask=~ok)


def category_index(values: Any, categories: Sequence[Any]) -> pa.Array:
    """The position of each value in `categories` as int32: -1 for a value not in it, null
    for null (e.g. a request channel's code)."""
    arr = _array(values)
    if len(arr) <= _SMALL:  # a request or a few: a dict lookup beats the kernels' set-up
        codes = _codes(categories)
        return _few_array(
            [None if v is None else codes.get(v, -1) for v in arr.to_pylist()], _INT32
        )
    found = pc.index_in(arr, value_set=_categories(categories, arr.type))
    coded = pc.fill_null(found, -1).cast(pa.int32())
    return pc.if_else(pc.is_valid(arr), coded, pa.scalar(None, pa.int32()))


def _codes(categories: Sequence[Any]) -> dict[Any, int]:
    """{category: its first position}, made once per list of categories."""
    return _codes_of(tuple(_checked(categories)))


@functools.lru_cache(maxsize=256)
def _codes_of(categories: tuple[Any, ...]) -> dict[Any, int]:
    return {c: i for i, c in reversed(list(enumerate(categories)))}


def ratio(numerator: Any, denominator: Any) -> pa.Array:
    """Row-wise `numerator / denominator` as float64 (e.g. a request's amount against the
    user's mean amount): null where either side is null or not finite (NaN, +-inf) or the
    denominator is 0. Integers are divided as float64."""
    top, bottom = _number_column(numerator, "numerator"), _number_column(denominator, "denominator")
    _same_length(("numerator", top), ("denominator", bottom))
    if len(top) <= _SMALL:  # the same IEEE division on Python floats
        return _few_array(
            [
                x / y if x is not None and y and math.isfinite(x) and math.isfinite(y) else None
                for x, y in zip(_float_list(top), _float_list(bottom), strict=True)
            ],
            "d",
        )
    (x, x_ok), (y, y_ok) = _floats(top), _floats(bottom)
    usable = x_ok & y_ok & np.isfinite(x) & np.isfinite(y) & (y != 0)
    with np.errstate(over="ignore"):  # an overflow is inf, as in Python floats
        out = np.divide(x, y, out=np.zeros_like(x), where=usable)
    return pa.array(out, mask=~usable)


def _number_column(values: Any, name: str) -> pa.Array:
    arr = _array(values)
    t = arr.type
    if t.id not in _NUMBER_IDS:
        raise TypeError(f"ratio: {name} has type {t}; pass number columns")
    return arr


def _float_list(arr: pa.Array) -> list[float | None]:
    if arr.type.id not in _FLOAT_IDS:  # integers, float16 and nulls as _floats reads them
        arr = arr.cast(pa.float64(), safe=False)
    values: list[float | None] = arr.to_pylist()
    return values


def one_hot(values: Any, categories: Sequence[Any]) -> pa.Array:
    """A list<float64> of len(categories) per value: 1.0 at its category, 0.0 elsewhere (all
    zeros for a value not in `categories`), null for null."""
    arr = _array(values)
    index = np.asarray(category_index(arr, categories).fill_null(-1).to_numpy(), dtype=np.int64)
    width = len(categories)
    hot = np.zeros((len(arr), width))
    rows = np.flatnonzero(index >= 0)
    hot[rows, index[rows]] = 1.0
    flat = pa.array(hot.reshape(-1))
    offsets = pa.array(np.arange(len(arr) + 1, dtype=np.int32) * width)
    mask = pc.is_null(arr) if arr.null_count else None
    return pa.ListArray.from_arrays(offsets, flat, mask=mask)


_INT32 = next(code for code in "ilh" if array.array(code).itemsize == 4)  # "i" in practice
_FEW_TYPES = {"d": pa.float64(), _INT32: pa.int32()}


def _few_array(values: list[Any], code: str) -> pa.Array:
    """A few rows' Python values (None for null) as a float64 ("d") or int32 (`_INT32`) array,
    from their buffers: what `pa.array(values, type)` makes, in half its time."""
    n = len(values)
    if None not in values:
        buffers = [None, pa.py_buffer(array.array(code, values))]
        return pa.Array.from_buffers(_FEW_TYPES[code], n, buffers, 0)
    valid = sum(1 << i for i, v in enumerate(values) if v is not None)
    data = array.array(code, [0 if v is None else v for v in values])
    bitmap = pa.py_buffer(valid.to_bytes((n + 7) // 8, "little"))
    nulls = values.count(None)
    return pa.Array.from_buffers(_FEW_TYPES[code], n, [bitmap, pa.py_buffer(data)], nulls)


def _array(values: Any) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if isinstance(values, pa.Array):
        return values
    if isinstance(values, np.ndarray) and values.ndim == 2:
        flat = pa.array(np.ascontiguousarray(values, dtype=np.float64).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    if isinstance(values, np.ndarray | list | tuple):
        return pa.array(values)
    raise TypeError(
        f"{type(values).__name__} is not an array; pass a pyarrow array, a NumPy array or a list"
    )


def _same_length(*named: tuple[str, pa.Array]) -> None:
    if len({len(arr) for _, arr in named}) == 1:
        return
    lengths = {name: len(arr) for name, arr in named}
    raise ValueError(f"arguments of different lengths {lengths}; pass columns of one table")


def _floats(arr: pa.Array) -> tuple[F64, Mask]:
    ok = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    filled = arr.fill_null(0) if arr.null_count else arr
    return np.asarray(filled.to_numpy(zero_copy_only=False), dtype=np.float64), ok


def _vector_type(arr: pa.Array, name: str) -> None:
    t = arr.type
    if not (pa.types.is_null(t) or pa.types.is_list(t) or pa.types.is_large_list(t)) and not (
        pa.types.is_fixed_size_list(t)
    ):
        raise TypeError(f"cosine_similarity: {name} has type {t}; pass vector columns")


def _checked(categories: Sequence[Any]) -> Sequence[Any]:
    if isinstance(categories, str | bytes):
        raise TypeError(
            f"categories {categories!r} is one string; pass a list, e.g. ['web', 'pos']"
        )
    return categories


def _categories(categories: Sequence[Any], kind: pa.DataType) -> pa.Array:
    cats = pa.array(list(_checked(categories)))
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return cats if cats.type == kind or pa.types.is_null(kind) else cats.cast(kind)
