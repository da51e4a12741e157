"""Vectorized helpers for on-demand functions (request-time features).

Each takes Arrow arrays or chunked arrays, NumPy arrays or lists, all of one length, and
returns an Arrow array of that length; nulls in give nulls out (as documented per function).
They run the same way online (the rows of one `get_service_many` call) and offline (a spine
batch of `flows.snapshot --service`), so the values agree by construction.

    @on_demand(sources=[payment, user_text], outputs={"text_similarity": "double"})
    def signals(rows):
        return {"text_similarity": cosine_similarity(
            rows["text_embedding"], rows["user_text__text_embedding_mean_30d"])}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["EARTH_RADIUS_KM", "category_index", "cosine_similarity", "haversine_km", "one_hot"]

EARTH_RADIUS_KM = 6371.0088  # the IUGG mean Earth radius

_SMALL = 32  # rows up to which category_index looks values up in Python (same results)
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]


def cosine_similarity(a: Any, b: Any) -> pa.Array:
    """Row-wise cosine similarity of two vector columns (lists of numbers), as float64.

    Null where either vector is null, holds a null element, or is all zeros. Each row's sums
    run over its items in order (`_cosine_rows` for a few rows, `_cosine_matrix` column by
    column for many), so a row gets the same float64 value whatever batch it is in.

    Raises:
        ValueError: the columns differ in length, or two vectors of a row differ in dimension.
    """
    left, right = _array(a), _array(b)
    _same_length(("a", left), ("b", right))
    if len(left) <= _SMALL:  # a request or a few: Python floats beat the kernels' set-up
        values = _cosine_rows(_vectors(left, "a"), _vectors(right, "b"))
        return pa.array(values, pa.float64())
    x, x_ok = _matrix(left, "a")
    y, y_ok = _matrix(right, "b")
    return _cosine_matrix(x, y, x_ok & y_ok)


def _cosine_matrix(x: F64, y: F64, ok: Mask) -> pa.Array:
    if x.shape[1] != y.shape[1]:  # rows that are not both valid are zeros of any width
        _check_dims(x.shape[1], y.shape[1], bool(ok.any()))
        return pa.nulls(len(ok), pa.float64())
    n = len(ok)
    dots, xx, yy = np.zeros(n), np.zeros(n), np.zeros(n)
    for xj, yj in zip(np.ascontiguousarray(x.T), np.ascontiguousarray(y.T), strict=True):
        dots += xj * yj  # item by item, in order: what `_cosine_rows` adds
        xx += xj * xj
        yy += yj * yj
    norms = np.sqrt(xx) * np.sqrt(yy)
    ok &= norms > 0  # invalid rows are zeros, so their norm is 0 too
    out = np.divide(dots, norms, out=np.zeros(n), where=ok)
    return pa.array(out, mask=~ok)


def _cosine_rows(xs: list[list[float] | None], ys: list[list[float] | None]) -> list[float | None]:
    """`_cosine_matrix` row by row in Python floats, with the same operations in the same
    order (IEEE float64 products, sums, square roots and quotients: equal bit for bit)."""
    _check_dims(_dim(xs, "a"), _dim(ys, "b"), any(u and v for u, v in zip(xs, ys, strict=True)))
    out: list[float | None] = []
    for u, v in zip(xs, ys, strict=True):
        if not u or not v:
            out.append(None)
            continue
        dot = uu = vv = 0.0
        for p, q in zip(u, v, strict=True):
            dot += p * q
            uu += p * p
            vv += q * q
        norm = math.sqrt(uu) * math.sqrt(vv)
        out.append(dot / norm if norm > 0 else None)
    return out


def _vectors(arr: pa.Array, name: str) -> list[list[float] | None]:
    """The rows as lists of floats; None for a null row, an empty row or a row with a null
    item (the rows `_matrix` marks invalid)."""
    _vector_type(arr, name)
    return [[float(x) for x in row] if row and None not in row else None for row in arr.to_pylist()]


def _dim(rows: list[list[float] | None], name: str) -> int:
    dims = sorted({len(row) for row in rows if row})
    if len(dims) > 1:
        _ragged(name, dims)
    return dims[0] if dims else 0


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
        codes = {c: i for i, c in reversed(list(enumerate(_checked(categories))))}
        return pa.array(
            [None if v is None else codes.get(v, -1) for v in arr.to_pylist()], pa.int32()
        )
    found = pc.index_in(arr, value_set=_categories(categories, arr.type))
    coded = pc.fill_null(found, -1).cast(pa.int32())
    return pc.if_else(pc.is_valid(arr), coded, pa.scalar(None, pa.int32()))


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


def _matrix(arr: pa.Array, name: str) -> tuple[F64, Mask]:
    """Rows as a (n, dim) float64 matrix (zeros for invalid rows) and which rows are valid."""
    if pa.types.is_null(arr.type):
        return np.zeros((len(arr), 0)), np.zeros(len(arr), dtype=bool)
    _vector_type(arr, name)
    if arr.null_count == len(arr):  # no vector at all (e.g. a request for an unknown user)
        return np.zeros((len(arr), 0)), np.zeros(len(arr), dtype=bool)
    uniform = _uniform_matrix(arr)
    if uniform is not None:
        return uniform, np.ones(len(arr), dtype=bool)
    lengths = np.asarray(pc.list_value_length(arr).fill_null(-1).to_numpy(), dtype=np.int64)
    has_null_item = _rows_with_null_items(arr)
    ok = (lengths > 0) & ~has_null_item
    dims = np.unique(lengths[ok])
    if len(dims) > 1:
        _ragged(name, dims.tolist())
    dim = int(dims[0]) if len(dims) else 0
    out = np.zeros((len(arr), dim))
    if ok.any():
        flat = pc.list_flatten(arr.filter(pa.array(ok)))
        out[ok] = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float64).reshape(-1, dim)
    return out, ok


def _vector_type(arr: pa.Array, name: str) -> None:
    t = arr.type
    if not (pa.types.is_null(t) or pa.types.is_list(t) or pa.types.is_large_list(t)) and not (
        pa.types.is_fixed_size_list(t)
    ):
        raise TypeError(f"cosine_similarity: {name} has type {t}; pass vector columns")


def _uniform_matrix(arr: pa.Array) -> F64 | None:
    """The common case without the kernels' set-up (what `_matrix` computes, when no row or
    item is null and every row has one non-zero length): the rows as a (n, dim) matrix."""
    if arr.null_count or not len(arr) or not pa.types.is_list(arr.type):
        return None
    flat = arr.flatten()  # the items of this slice's rows
    n, size = len(arr), len(flat)
    dim = size // n
    if dim <= 0 or dim * n != size or flat.null_count:
        return None
    if n > 1 and (np.diff(arr.offsets.to_numpy()) != dim).any():
        return None
    values = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float64)
    return values.reshape(n, dim)


def _rows_with_null_items(arr: pa.Array) -> Mask:
    flat = pc.list_flatten(arr)
    if flat.null_count == 0:
        return np.zeros(len(arr), dtype=bool)
    parents = np.asarray(pc.list_parent_indices(arr).to_numpy(), dtype=np.int64)
    nulls = np.asarray(flat.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    out = np.zeros(len(arr), dtype=bool)
    out[parents[nulls]] = True
    return out


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
