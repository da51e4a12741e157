"""History files given to ingest (Parquet, CSV, JSON lines) read as a source's typed columns,
ready to be partitioned and appended to the warehouse log; rows that cannot be read become dead
letters, never a crash and never a value that poisons the log.

The format follows the extension: `.parquet`/`.pq`, `.csv`, `.jsonl`/`.ndjson`/`.json` (one JSON
object per line). Data compressed with gzip, zstd or bzip2 is recognised by its magic bytes and
read whatever its name (`events.csv` holding gzip data reads as CSV).

One rule for every format: the source schema's types decide how a value is read.

- Text (every CSV cell; JSON strings; Parquet text columns) is parsed as the column's type. The
  key column is read as the schema's key type: the CSV cell `00123` of a string key stays
  "00123"; a JSON or Parquet number in a string column becomes its decimal text.
- Nulls: in CSV only an empty cell is null for string columns ("NA" is the text NA); numeric,
  boolean and time columns also read the null spellings NA, N/A, null, NULL, nan, NaN (and
  surrounding spaces) as null.
- Non-finite numbers (NaN, +inf, -inf; the text nan/NaN/inf/Infinity in a float or double
  column) are read as null in every format, and counted per column (`HistoryFile.non_finite`).
- Event times: timestamps (naive = UTC), ISO-8601 text (UTC when it has no offset; fractions
  finer than the field's unit, e.g. nanoseconds, are truncated), or integer epoch times in the
  field's unit (`timestamp-millis`/`-micros`) or the unit given as `time_unit`. A column of
  integer times none of which falls in [1980, 2300) in that unit is refused, naming the column,
  the value and the unit (epoch seconds read as millis land in 1970).
- A row is a bad record (a dead letter, the other rows are read) when a line is not valid UTF-8,
  a JSON line is not an object, a CSV line has the wrong number of cells, a value cannot be read
  as its column's type, a string is not valid UTF-8 (Parquet), or a required column (the key, the
  event time) is null. Its dead letter names the file and the line (CSV, JSON lines) or row
  (Parquet) and keeps the original record: the line's bytes, or a JSON rendering of the Parquet
  row with the values as the file holds them.
"""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from connectors.envelope import DeadLetter
from connectors.errors import InputFileError

NULL_SPELLINGS = ("", "NA", "N/A", "null", "NULL", "nan", "NaN")
TIME_UNITS = ("s", "ms", "us", "ns")
_PLAUSIBLE_S = (315_532_800, 10_413_792_000)  # [1980-01-01, 2300-01-01) in epoch seconds
_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_FRACTION_DIGITS = {"s": 0, "ms": 3, "us": 6, "ns": 9}
_ZONED = r"\d\d:\d\d(:\d\d(\.\d*)?)?\s*([zZ]|[+-]\d\d(:?\d\d)?)$"
_INTEGER = r"^\s*-?\d+\s*$"
_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bz2"}
_CHUNK = 1024  # values cast together when looking for the ones that cannot be read


@dataclass(frozen=True, slots=True)
class HistoryFile:
    """One input file read as a source's typed columns.

    `rows_read` = `table.num_rows` + `len(rejected)`: every record of the file is either a row
    or a dead letter."""

    path: Path
    sha256: str  # of the file's bytes as stored (compressed or not)
    table: pa.Table
    rejected: tuple[DeadLetter, ...]
    non_finite: dict[str, int] = field(default_factory=dict)  # column -> values read as null

    @property
    def rows_read(self) -> int:
        return int(self.table.num_rows) + len(self.rejected)


def history_files(path: str | Path) -> list[Path]:
    """The file, or every supported file of a directory (sorted by name).

    Raises:
        InputFileError: the path does not exist, has an unknown extension, or is a directory
            without a supported file.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _READERS)
        if not files:
            raise InputFileError(
                f"directory {path} holds no history file; give files ending in "
                f"{', '.join(sorted(_READERS))}"
            )
        return files
    if not path.exists():
        raise InputFileError(f"history file {path} does not exist; check the path")
    if path.suffix.lower() not in _READERS:
        raise InputFileError(
            f"history file {path} has an unknown extension; use one of "
            f"{', '.join(sorted(_READERS))}"
        )
    return [path]


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_history(
    path: str | Path,
    arrow_schema: pa.Schema,
    *,
    required: Sequence[str] = (),
    time_unit: str | None = None,
) -> list[HistoryFile]:
    """The events of a file, or of every supported file of a directory (sorted by name), each
    as a table with exactly the columns of `arrow_schema`, cast to its types (other columns are
    dropped), plus the rows that are bad records (see the module docstring).

    Args:
        required: columns whose null makes a row a bad record (the key, the event time).
        time_unit: the unit of integer epoch times (s, ms, us, ns); default: the field's.

    Raises:
        InputFileError: the path holds no supported file, a file cannot be read at all (naming
            the file and the cause), lacks a column (naming the column and the columns found),
            or holds integer times implausible in their unit.
    """
    if time_unit is not None and time_unit not in TIME_UNITS:
        raise InputFileError(
            f"time unit {time_unit!r} is unknown; use one of {', '.join(TIME_UNITS)}"
        )
    return [_read_file(f, arrow_schema, required, time_unit) for f in history_files(path)]


def non_finite_as_null(table: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """`table` with NaN and +-inf of its float columns made null, and the count per column."""
    counts: dict[str, int] = {}
    for i, f in enumerate(table.schema):
        if pa.types.is_floating(f.type):
            finite = pc.fill_null(pc.is_finite(table.column(i)), True)
            if n := int(pc.sum(pc.invert(finite).cast(pa.int64())).as_py() or 0):
                counts[f.name] = n
                nulled = pc.if_else(finite, table.column(i), pa.scalar(None, f.type))
                table = table.set_column(i, f, nulled)
    return table, counts


@dataclass(frozen=True, slots=True)
class _Raw:
    """A file's columns as stored, and how to name and render each row for a dead letter."""

    table: pa.Table
    where: Callable[[int], str]
    payload: Callable[[int], bytes]
    rejected: tuple[DeadLetter, ...]
    found: Sequence[str]  # every column of the file


def _read_file(
    path: Path, schema: pa.Schema, required: Sequence[str], time_unit: str | None
) -> HistoryFile:
    try:
        data = path.read_bytes()
        raw = _READERS[path.suffix.lower()](path, _decompressed(data), schema)
    except InputFileError:
        raise
    except (OSError, pa.ArrowException, ValueError, EOFError) as exc:
        raise InputFileError(
            f"history file {path} cannot be read: {exc}; check that it is a "
            f"valid {path.suffix.lstrip('.')} file"
        ) from exc
    missing = [name for name in schema.names if name not in raw.table.column_names]
    if missing:
        raise InputFileError(
            f"history file {path} has no column {missing[0]!r} (columns found: "
            f"{list(raw.found)}); the source's schema needs {schema.names}"
        )
    typed = _Typed(path, raw, time_unit)
    columns = [typed.column(f) for f in schema]
    table = pa.Table.from_arrays(columns, schema=schema)
    table, letters = typed.split(table, required)
    sha = hashlib.sha256(data).hexdigest()
    return HistoryFile(path, sha, table, (*raw.rejected, *letters), typed.non_finite)


def _decompressed(data: bytes) -> bytes:
    """`data`, decompressed if it starts with a gzip, zstd or bzip2 magic number."""
    for magic, codec in _MAGIC.items():
        if data.startswith(magic):
            if codec == "gzip":
                return gzip.decompress(data)
            if codec == "bz2":
                return bz2.decompress(data)
            stream = pa.CompressedInputStream(pa.BufferReader(data), codec)
            return bytes(stream.read())
    return data


class _Typed:
    """Converts a file's columns to the schema's types, remembering which rows failed and why,
    and which non-finite numbers were read as null."""

    def __init__(self, path: Path, raw: _Raw, time_unit: str | None) -> None:
        self.path, self.raw, self.time_unit = path, raw, time_unit
        self.bad = np.zeros(raw.table.num_rows, dtype=bool)
        self.reasons: dict[int, tuple[str, str]] = {}  # row -> (column, why)
        self.nulled: dict[str, np.ndarray] = {}  # column -> rows whose non-finite became null
        self.non_finite: dict[str, int] = {}  # counted over the rows kept, by `split`

    def column(self, target: pa.Field) -> pa.ChunkedArray:
        column = self.raw.table.column(target.name)
        column, bad = _invalid_utf8_as_null(column)
        self._reject(bad, target.name, "holds text that is not valid UTF-8")
        try:
            if pa.types.is_timestamp(target.type):
                converted, bad = self._times(column, target)
            else:
                converted, bad = _cast_text(column, target.type)
        except (pa.ArrowException, ValueError) as exc:
            raise InputFileError(
                f"history file {self.path}: column {target.name!r} of type {column.type} "
                f"cannot be read as {target.type}: {exc}; fix the values or the file's "
                "column type"
            ) from exc
        self._reject(bad, target.name, f"cannot be read as {target.type}")
        return self._finite(converted, target)

    def split(self, table: pa.Table, required: Sequence[str]) -> tuple[pa.Table, list[DeadLetter]]:
        """The good rows, and a dead letter per bad row (file order)."""
        for name in required:
            nulls = np.asarray(pc.is_null(table.column(name)).to_numpy(zero_copy_only=False))
            self._reject(nulls, name, "is null; events need an entity key and an event time")
        for name, rows in self.nulled.items():
            if count := int(np.count_nonzero(rows & ~self.bad)):
                self.non_finite[name] = count
        letters = [
            DeadLetter(
                f"history file {self.path} {self.raw.where(i)}: {self._reason(i)}",
                None,
                None,
                self.raw.payload(i),
            )
            for i in np.flatnonzero(self.bad).tolist()
        ]
        return (table.filter(pa.array(~self.bad)) if letters else table), letters

    def _reason(self, row: int) -> str:
        name, why = self.reasons[row]
        if why.startswith("cannot"):
            value = _value_text(self.raw.table.column(name), row)
            return f"column {name!r}: value {value} {why}"
        return f"column {name!r} {why}"

    def _reject(self, rows: np.ndarray | None, name: str, why: str) -> None:
        if rows is None or not rows.any():
            return
        for i in np.flatnonzero(rows & ~self.bad).tolist():
            self.reasons[i] = (name, why)
        self.bad |= rows

    def _finite(self, column: pa.ChunkedArray, target: pa.Field) -> pa.ChunkedArray:
        if not pa.types.is_floating(target.type):
            return column
        finite = pc.fill_null(pc.is_finite(column), True)
        nulled = ~np.asarray(finite.to_numpy(zero_copy_only=False), dtype=bool)
        if not nulled.any():
            return column
        self.nulled[target.name] = nulled
        return pc.if_else(finite, column, pa.scalar(None, target.type))

    def _times(
        self, column: pa.ChunkedArray, target: pa.Field
    ) -> tuple[pa.ChunkedArray, np.ndarray | None]:
        if pa.types.is_null(column.type):
            return _chunked(column.cast(target.type)), None
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            return self._text_times(_text_nulls(column, target.type), target)
        if pa.types.is_floating(column.type):
            column, bad = _cast_values(column, pa.int64())
            self._reject(bad, target.name, "cannot be read as an integer epoch time")
        if pa.types.is_integer(column.type):
            return self._epoch_times(column, target)
        return _from_timestamps(column, target.type), None

    def _text_times(
        self, column: pa.ChunkedArray, target: pa.Field
    ) -> tuple[pa.ChunkedArray, np.ndarray | None]:
        """ISO-8601 text, or integer epoch times written as text, row by row."""
        try:  # the common case: every value ISO-8601 with a zone, in the field's precision
            return _chunked(column.cast(target.type)), None
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        integer = pc.fill_null(pc.match_substring_regex(column, _INTEGER), False)
        if not pc.any(integer).as_py():
            return _parse_iso(column, target.type)
        digits = pc.if_else(integer, pc.utf8_trim_whitespace(column), None)
        numbers, bad = _cast_values(digits, pa.int64())
        self._reject(bad, target.name, "cannot be read as an integer epoch time")
        epoch, _ = self._epoch_times(numbers, target)
        if pc.all(integer).as_py():
            return epoch, None
        iso, bad = _parse_iso(pc.if_else(integer, None, column), target.type)
        return pc.if_else(integer, epoch, iso), bad

    def _epoch_times(
        self, column: pa.ChunkedArray, target: pa.Field
    ) -> tuple[pa.ChunkedArray, np.ndarray | None]:
        unit = self.time_unit or target.type.unit
        _check_plausible(self.path, target.name, column, unit)
        as_unit = column.cast(pa.int64()).cast(pa.timestamp(unit, tz="UTC"))
        finer = _PER_SECOND[unit] > _PER_SECOND[target.type.unit]  # truncates, no overflow
        return _cast_values(as_unit, target.type, safe=not finer)


def _invalid_utf8_as_null(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    """Strings that are not valid UTF-8 replaced by null, and the rows that held them."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return column, None
    try:
        column.validate(full=True)
        return column, None
    except pa.ArrowInvalid:
        pass
    values = column.cast(pa.binary()).to_pylist()
    bad = np.array([v is not None and not _is_utf8(v) for v in values], dtype=bool)
    good = [None if b else v for v, b in zip(values, bad, strict=True)]
    return pa.chunked_array([pa.array(good, pa.binary()).cast(column.type)]), bad


def _value_text(column: pa.ChunkedArray, row: int) -> str:
    value = column[row]
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        raw = value.cast(pa.binary()).as_py()
        return "null" if raw is None else repr(raw.decode("utf-8", "backslashreplace"))
    return repr(value.as_py())


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _text_nulls(column: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray:
    """Text bound for a non-string type: spaces trimmed, null spellings made null."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return column
    if pa.types.is_string(target) or pa.types.is_large_string(target):
        return column
    trimmed = pc.utf8_trim_whitespace(column)
    spellings = NULL_SPELLINGS[:-2] if pa.types.is_floating(target) else NULL_SPELLINGS
    null = pc.is_in(trimmed, value_set=pa.array(spellings))
    return pc.if_else(null, pa.scalar(None, column.type), trimmed)


def _cast_text(
    column: pa.ChunkedArray, target: pa.DataType
) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    """`column` (text or not) read as `target`: directly when every value parses (no null
    spelling, no spaces), else after `_text_nulls`, flagging the values that still fail.
    A vector (list) column held as text (a CSV cell, a JSON line read as text) is read as the
    JSON array it spells, e.g. "[0.1, 0.2]"."""
    if pa.types.is_list(target) and pa.types.is_string(column.type):
        return _text_lists(_text_nulls(column, target), target)
    try:
        return _chunked(column.cast(target)), None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return _cast_values(_text_nulls(column, target), target)


def _cast_values(
    column: pa.ChunkedArray | pa.Array, target: pa.DataType, *, safe: bool = True
) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    """`column` cast to `target`; values that cannot be cast become null and are flagged."""
    try:
        return _chunked(column.cast(target, safe=safe)), None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    flat = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    parts, bad = [], np.zeros(len(flat), dtype=bool)
    for start in range(0, len(flat), _CHUNK):
        part = flat.slice(start, _CHUNK)
        try:
            parts.append(part.cast(target, safe=safe))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            values = [_cast_one(part.slice(i, 1), target, safe) for i in range(len(part))]
            bad[start : start + len(part)] = [v is _FAILED for v in values]
            parts.append(pa.array([None if v is _FAILED else v for v in values], target))
    return pa.chunked_array(parts, target), bad


_FAILED = object()


def _text_lists(
    column: pa.ChunkedArray, target: pa.ListType
) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    """JSON arrays of numbers spelled as text, as a list column; other text is flagged."""
    values: list[Any] = []
    for text in column.to_pylist():
        try:
            value = None if text is None else orjson.loads(text)
        except orjson.JSONDecodeError:
            value = _FAILED
        numbers = isinstance(value, list) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        )
        values.append(value if value is None or numbers else _FAILED)
    bad = np.array([v is _FAILED for v in values], dtype=bool)
    array = pa.array([None if v is _FAILED else v for v in values], target)
    return pa.chunked_array([array], target), (bad if bad.any() else None)


def _cast_one(value: pa.Array, target: pa.DataType, safe: bool) -> Any:
    try:
        return value.cast(target, safe=safe)[0].as_py()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return _FAILED


def _chunked(values: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray:
    return values if isinstance(values, pa.ChunkedArray) else pa.chunked_array([values])


def implausible_epoch(values: np.ndarray, unit: str) -> str | None:
    """None when some integer epoch times of `values` fall in the years [1980, 2300) read in
    `unit` (or there are none); else the unit in which the first value would, for a message
    ("s|ms|us|ns" when none would)."""
    if len(values) == 0:
        return None
    seconds = np.asarray(values, dtype=np.int64) // _PER_SECOND[unit]
    if np.any((seconds >= _PLAUSIBLE_S[0]) & (seconds < _PLAUSIBLE_S[1])):
        return None
    first = int(values[0])
    fits = [u for u in TIME_UNITS if _PLAUSIBLE_S[0] <= first // _PER_SECOND[u] < _PLAUSIBLE_S[1]]
    return fits[0] if fits else "|".join(TIME_UNITS)


def _check_plausible(path: Path, name: str, column: pa.ChunkedArray, unit: str) -> None:
    """Refuse integer times of which none is in [1980, 2300) when read in `unit`."""
    values = np.asarray(column.drop_null().to_numpy(), dtype=np.int64)
    fits = implausible_epoch(values, unit)
    if fits is None:
        return
    value, hint = int(values[0]), f"--time-unit {fits}"
    raise InputFileError(
        f"history file {path}: column {name!r} holds integer times like {value}, which read "
        f"in {unit} are outside the years 1980-2300 (every value is); say the unit of these "
        f"epoch times with {hint}, or fix the values"
    )


def _parse_iso(
    column: pa.ChunkedArray, target: pa.TimestampType
) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    digits = _FRACTION_DIGITS[target.unit]
    cut = rf"(\.\d{{{digits}}})\d+" if digits else r"\.\d+"
    column = pc.replace_substring_regex(column, cut, r"\1" if digits else "")
    zoned = pc.match_substring_regex(column, _ZONED)
    with_zone, bad_zoned = _cast_values(pc.if_else(zoned, column, None), target)
    naive, bad_naive = _cast_values(pc.if_else(zoned, None, column), pa.timestamp(target.unit))
    times = pc.if_else(zoned, with_zone, naive.cast(target))
    if bad_zoned is None and bad_naive is None:
        return times, None
    n = len(column)
    bad = (np.zeros(n, bool) if bad_zoned is None else bad_zoned) | (
        np.zeros(n, bool) if bad_naive is None else bad_naive
    )
    return times, bad


def _from_timestamps(column: pa.ChunkedArray, target: pa.TimestampType) -> pa.ChunkedArray:
    if not (pa.types.is_timestamp(column.type) or pa.types.is_date(column.type)):
        raise ValueError(
            f"event times must be timestamps, ISO-8601 text or integer epoch "
            f"times (found {column.type})"
        )
    if getattr(column.type, "tz", None) is None:
        column = column.cast(pa.timestamp(target.unit), safe=False)
    return column.cast(target, safe=False)


def _read_parquet(path: Path, data: bytes, schema: pa.Schema) -> _Raw:
    file = pq.ParquetFile(pa.BufferReader(data))
    present = [n for n in schema.names if n in file.schema_arrow.names]
    table = file.read(columns=present)
    return _Raw(
        table,
        lambda i: f"row {i + 1}",
        lambda i: _render_row(table.slice(i, 1)),
        (),
        file.schema_arrow.names,
    )


def _render_row(row: pa.Table) -> bytes:
    """A JSON rendering of one row as stored (text that is not UTF-8 shown with \\x escapes)."""
    values: dict[str, Any] = {}
    for name in row.column_names:
        column = row.column(name)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            raw = column.cast(pa.binary())[0].as_py()
            values[name] = None if raw is None else raw.decode("utf-8", "backslashreplace")
        else:
            values[name] = column[0].as_py()
    return orjson.dumps(values, default=str, option=orjson.OPT_SERIALIZE_NUMPY)


@dataclass(frozen=True, slots=True)
class _Lines:
    """The non-empty lines of a text file: line numbers (1-based) and bytes."""

    numbers: Sequence[int]
    lines: list[bytes]
    valid_utf8: bool

    @classmethod
    def of(cls, data: bytes, *, blank_if_spaces: bool) -> _Lines:
        """Lines that pyarrow skips are left out: empty ones, and for JSON (`blank_if_spaces`)
        those holding only white space."""
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        valid = _is_utf8(data)
        if blank_if_spaces:
            kept = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
        elif lines.count(b"") + lines.count(b"\r") == 0:
            return cls(range(1, len(lines) + 1), lines, valid)
        else:
            kept = [(n, line) for n, line in enumerate(lines, start=1) if line not in (b"", b"\r")]
        return cls([n for n, _ in kept], [line for _, line in kept], valid)

    def invalid_utf8(self) -> list[int]:
        """Indexes of the lines that are not valid UTF-8."""
        if self.valid_utf8:
            return []
        return [i for i, line in enumerate(self.lines) if not _is_utf8(line)]

    def letter(self, path: Path, i: int, reason: str) -> DeadLetter:
        return DeadLetter(
            f"history file {path} line {self.numbers[i]}: {reason}", None, None, self.lines[i]
        )

    def joined(self, rows: Sequence[int]) -> bytes:
        return b"\n".join(self.lines[i] for i in rows)


class _TextRows:
    """The line each row read from a text file comes from. The file is split into lines only
    when a dead letter needs one (or when some lines are not valid UTF-8)."""

    def __init__(self, data: bytes, first: int) -> None:
        self._data, self._first = data, first  # first: index of the first data line (CSV: 1)
        self.skipped: set[int] = set()  # indexes of non-empty lines that are not rows

    @functools.cached_property
    def lines(self) -> _Lines:
        return _Lines.of(self._data, blank_if_spaces=self._first == 0)

    @functools.cached_property
    def rows(self) -> Sequence[int]:
        n = len(self.lines.lines)
        if not self.skipped:
            return range(self._first, n)
        return [i for i in range(self._first, n) if i not in self.skipped]

    def where(self, row: int) -> str:
        return f"line {self.lines.numbers[self.rows[row]]}"

    def payload(self, row: int) -> bytes:
        return self.lines.lines[self.rows[row]]

    def valid_text(self, path: Path) -> tuple[bytes, list[tuple[int, DeadLetter]]]:
        """The file without its lines that are not valid UTF-8, and their dead letters."""
        if _is_utf8(self._data):
            return self._data, []
        lines = self.lines
        bad = lines.invalid_utf8()
        self.skipped |= set(bad)
        text = lines.joined([i for i in range(len(lines.lines)) if i not in self.skipped])
        return text, [(i, lines.letter(path, i, "not valid UTF-8 text")) for i in bad]


def _raw_text(
    table: pa.Table, rows: _TextRows, letters: list[tuple[int, DeadLetter]], found: Sequence[str]
) -> _Raw:
    ordered = tuple(d for _, d in sorted(letters, key=lambda x: x[0]))
    return _Raw(table, rows.where, rows.payload, ordered, found)


def _read_csv(path: Path, data: bytes, schema: pa.Schema) -> _Raw:
    # Every schema column is read as text and converted by the schema's types (module doc).
    head = data[: data.find(b"\n") if b"\n" in data else len(data)].rstrip(b"\r")
    if not head.strip() or not _is_utf8(head):
        raise ValueError("the first line must be a UTF-8 header naming the columns")
    header = next(csv.reader([head.decode()]))
    present = [n for n in schema.names if n in header]
    rows = _TextRows(data, first=1)
    text, letters = rows.valid_text(path)
    table, invalid = _csv_table(text, present, use_threads=True)
    if invalid:  # read again in one thread: only then does pyarrow number the bad lines
        table, invalid = _csv_table(text, present, use_threads=False)
        kept = [i for i in range(1, len(rows.lines.lines)) if i not in rows.skipped]
        bad_shape = [kept[n - 2] for n in invalid]
        reason = f"the line does not have the {len(header)} cells of the header"
        letters += [(i, rows.lines.letter(path, i, reason)) for i in bad_shape]
        rows.skipped |= set(bad_shape)
    return _raw_text(table, rows, letters, header)


def _csv_table(text: bytes, columns: list[str], *, use_threads: bool) -> tuple[pa.Table, list[int]]:
    """The columns as text, and the numbers (1-based among non-empty lines, the header being
    1; None with threads) of the lines whose cell count differs from the header's."""
    invalid: list[int] = []

    def skip_row(row: pacsv.InvalidRow) -> str:
        invalid.append(row.number)
        return "skip"

    table = pacsv.read_csv(
        pa.BufferReader(text),
        read_options=pacsv.ReadOptions(use_threads=use_threads),
        parse_options=pacsv.ParseOptions(invalid_row_handler=skip_row),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in columns},
            include_columns=columns,
            strings_can_be_null=True,
            null_values=[""],
            quoted_strings_can_be_null=False,
        ),
    )
    return table, invalid


def _read_json(path: Path, data: bytes, schema: pa.Schema) -> _Raw:
    rows = _TextRows(data, first=0)
    text, letters = rows.valid_text(path)
    try:
        table = pajson.read_json(pa.BufferReader(text)) if text.strip() else pa.table({})
    except pa.ArrowInvalid:
        table, more = _json_row_by_row(path, rows, schema)
        letters += more
    found = table.column_names
    table = table.select([n for n in schema.names if n in found])
    if table.num_rows == 0:  # no row at all (or only bad ones): no column is missing
        table = pa.table({n: pa.nulls(0, pa.string()) for n in schema.names})
    return _raw_text(table, rows, letters, found)


def _json_row_by_row(
    path: Path, rows: _TextRows, schema: pa.Schema
) -> tuple[pa.Table, list[tuple[int, DeadLetter]]]:
    """The slow path, for files pyarrow refuses as a whole (a line that is not a JSON object,
    a column whose JSON type varies): each value is kept as its JSON text, or the text itself
    for a string, and read by the schema's type like CSV text."""
    objects: list[dict[str, Any]] = []
    letters: list[tuple[int, DeadLetter]] = []
    lines = rows.lines
    for i in list(rows.rows):
        obj = _json_object(lines.lines[i])
        if obj is None:
            letters.append((i, lines.letter(path, i, "the line is not a JSON object")))
        else:
            objects.append(obj)
    rows.skipped |= {i for i, _ in letters}
    del rows.rows  # recomputed without the lines just skipped
    names = [n for n in schema.names if any(n in o for o in objects)]
    columns = {n: pa.array([_as_text(o.get(n)) for o in objects], pa.string()) for n in names}
    return (pa.table(columns) if names else pa.table({})), letters


def _json_object(line: bytes) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        try:
            obj = json.loads(line)  # accepts NaN and Infinity, which orjson refuses
        except ValueError:
            return None
    return obj if isinstance(obj, dict) else None


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)  # nan, inf, -inf read as non-finite by float columns
    return orjson.dumps(value).decode()


_READERS: dict[str, Callable[[Path, bytes, pa.Schema], _Raw]] = {
    ".parquet": _read_parquet,
    ".pq": _read_parquet,
    ".csv": _read_csv,
    ".jsonl": _read_json,
    ".ndjson": _read_json,
    ".json": _read_json,
}
