"""Vector columns (embeddings) in tiles: how a batch's Arrow list column becomes a padded
float64 matrix, how vector blocks of different widths concatenate, and the length rule.

A vector column is an Avro `array` of `float`/`double` (Arrow `list<float32|float64>`). In the
aggregation core its values are a (rows, width) float64 matrix, each row zero-padded to the
widest vector of the batch, with each row's own length beside it; tiles keep the element-wise
sum (`.vsum`), first (`.vfirst`) and last (`.vlast`) vectors as such matrices, and the length
of the tile's vectors in the row field `.dim`. On disk each entity's vectors are stored at its
own length (`state.codec`). An empty list counts as null (no vector).

The length rule: an entity's vectors all have the length of its first non-null vector, in the
order its events are applied (offset order within a source partition); `first_lengths` fixes
it and `check_lengths` refuses a record that breaks it (the write path turns that record into a
dead letter; the offline snapshot leaves out the same records, `flows.pointintime`). The
length is kept with the entity's stored tiles, so replays, restarts and snapshots apply it
alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


def padded(column: pa.Array | pa.ChunkedArray) -> tuple[F64, I64]:
    """A list column as a zero-padded (rows, width) float64 matrix and each row's length
    (0 for a null or empty list)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    lengths = np.asarray(
        pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False),
        dtype=np.int64,
    )
    width = int(lengths.max()) if len(lengths) else 0
    matrix = np.zeros((len(lengths), width), dtype=np.float64)
    flat = column.flatten().cast(pa.float64())
    if width:
        mask = np.arange(width)[None, :] < lengths[:, None]
        matrix[mask] = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float64)
    return matrix, lengths


def widened(matrix: npt.NDArray[Any], width: int) -> npt.NDArray[Any]:
    """`matrix` zero-padded on the right to `width` columns (itself when already that wide)."""
    if matrix.shape[1] >= width:
        return matrix
    out = np.zeros((matrix.shape[0], width), dtype=np.float64)
    out[:, : matrix.shape[1]] = matrix
    return out


def concat_matrices(parts: Sequence[npt.NDArray[Any]]) -> npt.NDArray[Any]:
    """Row-wise concatenation of vector matrices of possibly different widths."""
    width = max((p.shape[1] for p in parts), default=0)
    return np.concatenate([widened(p, width) for p in parts])


def list_array(matrix: F64, lengths: I64, null: npt.NDArray[np.bool_]) -> pa.Array:
    """Rows of `matrix` cut to their lengths as an Arrow `list<float64>` (null where `null`)."""
    lengths = np.where(null, 0, lengths)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    if matrix.shape[1]:
        values = matrix[np.arange(matrix.shape[1])[None, :] < lengths[:, None]]
    else:
        values = np.zeros(0, dtype=np.float64)
    return pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), pa.array(values, pa.float64()), mask=pa.array(null)
    )


def first_lengths(kid: I64, off: I64, lengths: I64, valid: npt.NDArray[np.bool_], n: int) -> I64:
    """Per key id (0..n-1): the length of its first valid vector by offset (0 when none)."""
    out = np.zeros(n, dtype=np.int64)
    rows = np.flatnonzero(valid)
    if len(rows):
        order = rows[np.lexsort((off[rows], kid[rows]))]
        keys, first = np.unique(kid[order], return_index=True)
        out[keys] = lengths[order[first]]
    return out


def mismatched(
    kid: I64, lengths: I64, valid: npt.NDArray[np.bool_], expected: I64
) -> npt.NDArray[np.bool_]:
    """Rows holding a vector whose length differs from their key's expected length."""
    want = expected[kid]
    bad: npt.NDArray[np.bool_] = valid & (want > 0) & (lengths != want)
    return bad


def check_lengths(
    view: str,
    column: str,
    kid: I64,
    off: I64,
    lengths: I64,
    valid: npt.NDArray[np.bool_],
    stored: I64,
    keys: Sequence[str],
) -> I64:
    """The vector length of every key of a batch: the stored one, else that of the key's first
    vector in the batch (by offset).

    Raises:
        ValueError: a record holds a vector of another length than its key's (naming the view,
            the field, the key, the offset and both lengths); the caller's bisection turns it
            into a dead letter and applies the rest.
    """
    expected = np.where(stored > 0, stored, first_lengths(kid, off, lengths, valid, len(stored)))
    bad = np.flatnonzero(mismatched(kid, lengths, valid, expected))
    if len(bad):
        row = int(bad[0])
        raise ValueError(
            f"view {view!r}: field {column!r} of the record at offset {int(off[row])} (key "
            f"{keys[int(kid[row])]!r}) holds a vector of length {int(lengths[row])}, but the "
            f"key's vectors have length {int(expected[kid[row]])} (fixed by its first "
            "vector); write vectors of one length per feature, or give the new length its own "
            "field"
        )
    return expected


def entity_objects(
    objs: dict[str, npt.NDArray[Any]], a: int, z: int, lengths: dict[str, I64], key: int
) -> dict[str, npt.NDArray[Any]]:
    """Rows a..z of a block's object stats and vectors, the vectors cut (or zero-padded) to the
    key's length (`lengths`: per vector column, per key id), so that the blob keeps the length
    even while the key has no tile with a vector in a group."""
    if not lengths:
        return {f: v[a:z] for f, v in objs.items()}
    out = {}
    for f, v in objs.items():
        if v.ndim == 2:
            dim = int(lengths[f.rpartition(".")[0]][key])
            out[f] = widened(v[a:z, :dim], dim)
        else:
            out[f] = v[a:z]
    return out
