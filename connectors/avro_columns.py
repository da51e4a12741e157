"""Vectorized Avro binary decoding: many records of one flat writer schema into Arrow columns,
then resolved to the reader schema, with numpy over all records at once instead of a Python
call per record (the hot path of the Kafka tail).

Every record is checked as a strict reader would: a union branch or enum index out of range,
a varint longer than 10 bytes, a negative length, an int out of 32-bit range, a boolean byte
other than 0/1, invalid UTF-8, a record shorter or longer than its fields. A record that fails
a check is reported by its row with a reason and left out; it never stops the batch.

Arrays of float/double (vectors) are decoded block by block for all records at once: each round
reads one block header (count, and the byte size a negative count announces) per record still
inside its array, then gathers the block's fixed-width items; a record of one block takes two
rounds (the block, then the terminating 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from connectors.avro_fields import FieldSpec

PADDING = 16  # zero bytes after the last record, so that a varint read never leaves the buffer

_PROBLEMS = (
    "ok",
    "the record ends inside this field (truncated)",
    "union branch index out of range",
    "varint longer than 10 bytes",
    "negative length",
    "int outside the 32-bit range",
    "enum index out of range",
    "boolean byte other than 0 or 1",
    "invalid UTF-8",
)
(_OK, _TRUNCATED, _BRANCH, _VARINT, _NEGATIVE, _INT_RANGE, _ENUM, _BOOL, _UTF8) = range(9)


@dataclass(frozen=True, slots=True)
class DecodedRecords:
    """Columns of a batch of records (all rows; failed rows hold nulls) and each row's failure."""

    columns: dict[str, pa.Array]
    failures: dict[int, str] = field(default_factory=dict)  # row -> reason


def decode_records(
    fields: Sequence[FieldSpec], data: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> DecodedRecords:
    """Decode records `data[starts[i]:ends[i]]` written with the flat schema `fields`.

    `data` must be followed by PADDING zero bytes. Timestamps come out as raw int64 in the
    writer's unit; enums as their symbols.
    """
    cursor = _Cursor(data, starts.astype(np.int64), ends.astype(np.int64))
    columns = {f.name: _decode_field(cursor, f, i) for i, f in enumerate(fields)}
    trailing = cursor.live[cursor.pos[cursor.live] != cursor.end[cursor.live]]
    cursor.fail(trailing, len(fields), _OK)
    failures = {int(row): cursor.reason(int(row), fields) for row in np.nonzero(cursor.code)[0]}
    return DecodedRecords(columns, failures)


class _Cursor:
    """Read positions of all records; `live` are the rows without a failure so far."""

    def __init__(self, data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
        self.data, self.pos, self.end = data, starts.copy(), ends
        self.n = len(starts)
        self.code = np.zeros(self.n, dtype=np.int32)
        self.live = np.arange(self.n, dtype=np.int64)

    def fail(self, rows: np.ndarray, field_index: int, problem: int) -> None:
        """Record the first failure of each of `rows`; later ones do not replace it."""
        rows = rows[self.code[rows] == 0]
        if len(rows):
            self.code[rows] = field_index * 16 + problem + 1
            self.live = self.live[self.code[self.live] == 0]

    def reason(self, row: int, fields: Sequence[FieldSpec]) -> str:
        field_index, problem = divmod(int(self.code[row]) - 1, 16)
        if field_index == len(fields):
            extra = int(self.end[row] - self.pos[row])
            return f"{extra} bytes left over after the last field (not a record of this schema)"
        return f"field {fields[field_index].name!r}: {_PROBLEMS[problem]}"

    def varint(self, rows: np.ndarray, field_index: int, max_bytes: int = 10) -> np.ndarray:
        """Zigzag varints at the rows' positions; rows with a bad one are failed."""
        at = self.pos[rows]
        acc = np.zeros(len(rows), dtype=np.uint64)
        size = np.zeros(len(rows), dtype=np.int64)
        more = np.ones(len(rows), dtype=bool)
        overflow = np.zeros(len(rows), dtype=bool)
        for k in range(10):
            byte = self.data[at + k].astype(np.uint64)
            acc |= np.where(more, (byte & np.uint64(0x7F)) << np.uint64(7 * k), np.uint64(0))
            size += more
            if k == 9:  # a tenth byte may hold bit 63 only
                overflow = more & ((byte & np.uint64(0x7E)) != 0)
            more &= byte >= 0x80
            if not more.any():
                break
        bad = more | overflow | (size > max_bytes)
        self.pos[rows] = at + size
        self.fail(rows[bad], field_index, _VARINT)
        self.fail(rows[self.pos[rows] > self.end[rows]], field_index, _TRUNCATED)
        values: np.ndarray = (acc >> np.uint64(1)) ^ (np.uint64(0) - (acc & np.uint64(1)))
        return values.view(np.int64)

    def fixed(self, rows: np.ndarray, size: int, field_index: int) -> np.ndarray:
        """The `size` bytes at the rows' positions, as a (rows, size) uint8 matrix."""
        at = self.pos[rows]
        self.pos[rows] = at + size
        self.fail(rows[self.pos[rows] > self.end[rows]], field_index, _TRUNCATED)
        matrix: np.ndarray = self.data[at[:, None] + np.arange(size)]
        return matrix

    def keep(self, rows: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows (and their values) still live after the last check."""
        ok = self.code[rows] == 0
        return rows[ok], values[ok]


def _decode_field(cursor: _Cursor, spec: FieldSpec, index: int) -> pa.Array:
    rows = cursor.live
    if spec.branches:
        branch = cursor.varint(rows, index)
        rows, branch = cursor.keep(rows, branch)
        cursor.fail(rows[(branch < 0) | (branch >= spec.branches)], index, _BRANCH)
        rows, branch = cursor.keep(rows, branch)
        rows = rows[branch != spec.null_branch]
    if spec.kind in ("string", "bytes"):
        return _decode_bytes(cursor, rows, spec, index)
    if spec.kind == "array":
        return _decode_array(cursor, rows, spec, index)
    values = _DECODERS[spec.kind](cursor, rows, spec, index)
    rows, values = cursor.keep(rows, values)
    return _scatter(cursor.n, rows, values, spec)


def _decode_long(cursor: _Cursor, rows: np.ndarray, spec: FieldSpec, index: int) -> np.ndarray:
    return cursor.varint(rows, index)


def _decode_int(cursor: _Cursor, rows: np.ndarray, spec: FieldSpec, index: int) -> np.ndarray:
    values = cursor.varint(rows, index, max_bytes=5)
    cursor.fail(rows[(values < -(2**31)) | (values >= 2**31)], index, _INT_RANGE)
    return values.astype(np.int32)


def _decode_enum(cursor: _Cursor, rows: np.ndarray, spec: FieldSpec, index: int) -> np.ndarray:
    values = cursor.varint(rows, index)
    cursor.fail(rows[(values < 0) | (values >= len(spec.symbols))], index, _ENUM)
    return values


def _decode_boolean(
    cursor: _Cursor,
    rows: np.ndarray,
    spec: FieldSpec,
    index: int,
) -> np.ndarray:
    values = cursor.fixed(rows, 1, index)[:, 0]
    cursor.fail(rows[values > 1], index, _BOOL)
    truth: np.ndarray = values == 1
    return truth


def _decode_float(cursor: _Cursor, rows: np.ndarray, spec: FieldSpec, index: int) -> np.ndarray:
    return cursor.fixed(rows, 4, index).view("<f4").ravel()


def _decode_double(cursor: _Cursor, rows: np.ndarray, spec: FieldSpec, index: int) -> np.ndarray:
    return cursor.fixed(rows, 8, index).view("<f8").ravel()


_DECODERS = {
    "long": _decode_long,
    "int": _decode_int,
    "enum": _decode_enum,
    "boolean": _decode_boolean,
    "float": _decode_float,
    "double": _decode_double,
}
_NUMPY_TYPES = {
    "long": np.int64,
    "int": np.int32,
    "enum": np.int64,
    "boolean": np.bool_,
    "float": np.float32,
    "double": np.float64,
}


def _scatter(n: int, rows: np.ndarray, values: np.ndarray, spec: FieldSpec) -> pa.Array:
    full: np.ndarray = np.zeros(n, dtype=_NUMPY_TYPES[spec.kind])
    full[rows] = values
    missing = np.ones(n, dtype=bool)
    missing[rows] = False
    if spec.kind == "enum":
        symbols = pa.array(spec.symbols, pa.string())
        return symbols.take(pa.array(full, mask=missing))
    arrow_type = pa.int64() if spec.unit else spec.arrow_type
    return pa.array(full, type=arrow_type, mask=missing)


def _decode_bytes(cursor: _Cursor, rows: np.ndarray, spec: FieldSpec, index: int) -> pa.Array:
    lengths = cursor.varint(rows, index)
    rows, lengths = cursor.keep(rows, lengths)
    cursor.fail(rows[lengths < 0], index, _NEGATIVE)
    rows, lengths = cursor.keep(rows, lengths)
    at = cursor.pos[rows]
    cursor.fail(rows[lengths > cursor.end[rows] - at], index, _TRUNCATED)  # no overflow
    ok = cursor.code[rows] == 0
    rows, at, lengths = rows[ok], at[ok], lengths[ok]
    cursor.pos[rows] = at + lengths
    array = _binary_array(cursor.n, rows, cursor.data, at, lengths)
    if spec.kind == "bytes":
        return array
    try:
        return array.cast(pa.large_string())
    except pa.ArrowInvalid:  # invalid UTF-8 somewhere: find the rows, fail them, retry
        bad = _invalid_utf8(array, rows)
    cursor.fail(bad, index, _UTF8)
    keep = np.isin(rows, bad, invert=True)
    array = _binary_array(cursor.n, rows[keep], cursor.data, at[keep], lengths[keep])
    return array.cast(pa.large_string())


def _decode_array(cursor: _Cursor, rows: np.ndarray, spec: FieldSpec, index: int) -> pa.Array:
    """Vectors at `rows` as a list<float32|float64> array of all records (null elsewhere)."""
    size = 4 if spec.items == "float" else 8
    blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (rows, at, count) per round
    active = rows
    while len(active):
        active, counts = _block_header(cursor, active, index)
        more = counts > 0
        active, counts = active[more], counts[more]
        at = cursor.pos[active]
        cursor.fail(active[counts > (cursor.end[active] - at) // size], index, _TRUNCATED)
        ok = cursor.code[active] == 0
        active, at, counts = active[ok], at[ok], counts[ok]
        cursor.pos[active] = at + counts * size
        blocks.append((active, at, counts))
    return _vectors(cursor, rows, blocks, spec, size)


def _block_header(cursor: _Cursor, rows: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Item counts of the next array block of each row (a negative count is followed by the
    block's byte size, which is read and skipped: the items have a fixed width)."""
    counts = cursor.varint(rows, index)
    rows, counts = cursor.keep(rows, counts)
    sized = counts < 0
    if sized.any():
        cursor.varint(rows[sized], index)
        rows, counts = cursor.keep(rows, counts)
        cursor.fail(rows[counts == np.iinfo(np.int64).min], index, _NEGATIVE)
        rows, counts = cursor.keep(rows, np.abs(counts))
    return rows, counts


def _vectors(
    cursor: _Cursor,
    rows: np.ndarray,
    blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    spec: FieldSpec,
    size: int,
) -> pa.Array:
    """The list array of the decoded blocks; rows that failed or are null hold null."""
    b_row = np.concatenate([b[0] for b in blocks]) if blocks else np.zeros(0, np.int64)
    b_at = np.concatenate([b[1] for b in blocks]) if blocks else np.zeros(0, np.int64)
    b_cnt = np.concatenate([b[2] for b in blocks]) if blocks else np.zeros(0, np.int64)
    live = cursor.code[b_row] == 0
    b_row, b_at, b_cnt = b_row[live], b_at[live], b_cnt[live]
    order = np.argsort(b_row, kind="stable")  # rows in order, each row's blocks in order
    b_row, b_at, b_cnt = b_row[order], b_at[order], b_cnt[order]
    lengths = np.bincount(b_row, weights=b_cnt, minlength=cursor.n).astype(np.int64)
    offsets = np.zeros(cursor.n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    total = int(b_cnt.sum())
    first_item = np.cumsum(b_cnt) - b_cnt
    starts = np.repeat(b_at - first_item * size, b_cnt) + np.arange(total, dtype=np.int64) * size
    raw = cursor.data[starts[:, None] + np.arange(size)] if total else np.zeros((0, size), np.uint8)
    values = np.ascontiguousarray(raw).view("<f4" if size == 4 else "<f8").ravel()
    valid = np.zeros(cursor.n, dtype=bool)
    valid[rows] = True
    valid &= cursor.code == 0
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(values), type=spec.arrow_type, mask=pa.array(~valid)
    )


def _binary_array(
    n: int, rows: np.ndarray, data: np.ndarray, at: np.ndarray, lengths: np.ndarray
) -> pa.Array:
    """A large_binary array of n rows: data[at:at+length] at `rows`, null elsewhere."""
    sizes = np.zeros(n, dtype=np.int64)
    sizes[rows] = lengths
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    total = int(offsets[-1])
    # Byte j of the output comes from data[at_k + (j - first output byte of k)].
    gather = np.repeat(at - offsets[rows], lengths) + np.arange(total, dtype=np.int64)
    valid = np.zeros(n, dtype=bool)
    valid[rows] = True
    buffers = [
        pa.py_buffer(np.packbits(valid, bitorder="little")),
        pa.py_buffer(offsets),
        pa.py_buffer(data[gather]),
    ]
    return pa.Array.from_buffers(pa.large_binary(), n, buffers, null_count=n - len(rows))


def _invalid_utf8(array: pa.Array, rows: np.ndarray) -> np.ndarray:
    """The rows among `rows` whose bytes are not valid UTF-8 (a Python loop: failure path only)."""
    values = array.to_pylist()
    return np.array([r for r in rows if not _is_utf8(values[r])], dtype=np.int64)


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def resolve(
    decoded: DecodedRecords,
    writer: Sequence[FieldSpec],
    reader: Sequence[FieldSpec],
    schema: pa.Schema,
) -> DecodedRecords:
    """The columns of `schema` (reader fields) from columns decoded with the writer's schema.

    Applies Avro schema resolution for flat records: fields matched by name or reader alias,
    defaults for fields the writer lacks, promotions (int->long->float->double,
    string<->bytes), enum symbols unknown to the reader mapped to its default, timestamp units.
    """
    by_name = {w.name: w for w in writer}
    specs = {r.name: r for r in reader}
    n = _rows(decoded)
    columns: dict[str, pa.Array] = {}
    failures = dict(decoded.failures)
    for column in schema:
        spec, target = specs[column.name], column.type
        source = next((by_name[a] for a in (spec.name, *spec.aliases) if a in by_name), None)
        if source is None:
            columns[spec.name] = _default_column(spec, n, target)
        else:
            columns[spec.name] = _convert(
                decoded.columns[source.name], source, spec, target, failures
            )
    return DecodedRecords(columns, failures)


def _rows(decoded: DecodedRecords) -> int:
    return len(next(iter(decoded.columns.values()))) if decoded.columns else 0


def _default_column(spec: FieldSpec, n: int, target: pa.DataType) -> pa.Array:
    value = spec.default
    if spec.kind == "bytes" and isinstance(value, str):
        value = value.encode("latin-1")  # JSON defaults of bytes are ISO-8859-1 text
    if value is None:
        return pa.nulls(n, target)
    raw = pa.scalar(value, pa.int64() if spec.unit else spec.arrow_type)
    return pa.repeat(raw, n).cast(target)


def _convert(
    column: pa.Array,
    writer: FieldSpec,
    reader: FieldSpec,
    target: pa.DataType,
    failures: dict[int, str],
) -> pa.Array:
    if writer.unit or reader.unit:
        return _timestamps(column, writer.unit or reader.unit, reader.unit, target)
    if reader.kind == "enum":
        column = _enum_symbols(column, reader, failures)
    if writer.kind == "bytes" and reader.kind == "string":
        column = _bytes_to_text(column, reader, failures)
    return column.cast(target, safe=False)


def _timestamps(
    raw: pa.Array, unit: str | None, reader_unit: str | None, target: pa.DataType
) -> pa.Array:
    if reader_unit is None:
        return raw.cast(target)
    if unit == "ms" and reader_unit == "us":
        raw = pc.multiply(raw, 1000)
    elif unit == "us" and reader_unit == "ms":
        nulls = raw.is_null().to_numpy(zero_copy_only=False)
        raw = pa.array(raw.fill_null(0).to_numpy() // 1000, mask=nulls)
    return raw.cast(pa.timestamp(reader_unit, tz="UTC")).cast(target)


def _enum_symbols(column: pa.Array, reader: FieldSpec, failures: dict[int, str]) -> pa.Array:
    known = pc.or_kleene(
        pc.is_in(column, pa.array(reader.symbols, pa.string())), pc.is_null(column)
    )
    if pc.all(known).as_py():
        return column
    if reader.enum_default is not None:
        return pc.if_else(known, column, reader.enum_default)
    for row in np.nonzero(~known.to_numpy(zero_copy_only=False))[0]:
        failures.setdefault(
            int(row),
            f"field {reader.name!r}: enum symbol "
            f"{column[int(row)].as_py()!r} unknown to the reader schema",
        )
    return pc.if_else(known, column, None)


def _bytes_to_text(column: pa.Array, reader: FieldSpec, failures: dict[int, str]) -> pa.Array:
    try:
        return column.cast(pa.large_string())
    except pa.ArrowInvalid:
        rows = np.nonzero(column.is_valid().to_numpy(zero_copy_only=False))[0]
        bad = _invalid_utf8(column, rows)
    for row in bad:
        failures.setdefault(int(row), f"field {reader.name!r}: {_PROBLEMS[_UTF8]}")
    if len(bad):
        keep = np.ones(len(column), dtype=bool)
        keep[bad] = False
        column = pc.if_else(pa.array(keep), column, None)
    return column.cast(pa.large_string())
