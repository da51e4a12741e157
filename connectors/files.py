"""History files given to ingest (Parquet, CSV, JSON lines) read as a source's typed columns,
ready to be partitioned and appended to the warehouse log.

The format follows the extension: `.parquet`/`.pq`, `.csv`, `.jsonl`/`.ndjson`/`.json` (one JSON
object per line). Event times may be timestamps, ISO-8601 text (taken as UTC when it has no
offset) or integer epoch times in the unit of the field's Avro logical type (millis or micros).
In CSV an empty cell is a null.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from connectors.errors import InputFileError

_ZONED = r"\d\d:\d\d(:\d\d(\.\d*)?)?\s*([zZ]|[+-]\d\d(:?\d\d)?)$"
_INTEGER = r"^\s*-?\d+\s*$"


def read_history(path: str | Path, arrow_schema: pa.Schema) -> pa.Table:
    """The events in a file, or in every supported file of a directory (sorted by name), as a
    table with exactly the columns of `arrow_schema`, cast to its types; other columns are
    dropped.

    Raises:
        InputFileError: the path holds no supported file, a file cannot be read (naming the
            file and the cause), or lacks a column (naming the column and the columns found).
    """
    files = _files(Path(path))
    tables = [_read_file(f, arrow_schema) for f in files]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _files(path: Path) -> list[Path]:
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


def _read_file(path: Path, schema: pa.Schema) -> pa.Table:
    try:
        table = _READERS[path.suffix.lower()](path, schema)
    except InputFileError:
        raise
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise InputFileError(
            f"history file {path} cannot be read: {exc}; check that it is a "
            f"valid {path.suffix.lstrip('.')} file"
        ) from exc
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise InputFileError(
            f"history file {path} has no column {missing[0]!r} (columns found: "
            f"{table.column_names}); the source's schema needs {schema.names}"
        )
    columns = [_convert(table.column(f.name), f, path) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _read_parquet(path: Path, schema: pa.Schema) -> pa.Table:
    present = [n for n in schema.names if n in pq.read_schema(path).names]
    return pq.read_table(path, columns=present)


def _read_csv(path: Path, schema: pa.Schema) -> pa.Table:
    # Event times are read as text and converted here: ISO-8601 or integer epoch times.
    types = {f.name: pa.string() if pa.types.is_timestamp(f.type) else f.type for f in schema}
    convert = pacsv.ConvertOptions(column_types=types, strings_can_be_null=True)
    with pacsv.open_csv(path, convert_options=convert) as reader:
        return reader.read_all()


def _read_json(path: Path, schema: pa.Schema) -> pa.Table:
    return pajson.read_json(path)


_READERS: dict[str, Callable[[Path, pa.Schema], pa.Table]] = {
    ".parquet": _read_parquet,
    ".pq": _read_parquet,
    ".csv": _read_csv,
    ".jsonl": _read_json,
    ".ndjson": _read_json,
    ".json": _read_json,
}


def _convert(column: pa.ChunkedArray, field: pa.Field, path: Path) -> pa.ChunkedArray:
    try:
        if pa.types.is_timestamp(field.type):
            return _to_timestamps(column, field.type)
        return column.cast(field.type)
    except (pa.ArrowException, ValueError) as exc:
        raise InputFileError(
            f"history file {path}: column {field.name!r} of type "
            f"{column.type} cannot be read as {field.type}: {exc}; fix the "
            "values or the file's column type"
        ) from exc


def _to_timestamps(column: pa.ChunkedArray, target: pa.TimestampType) -> pa.ChunkedArray:
    """Timestamps from timestamps (naive = UTC), integer epoch times in the target's unit, or
    ISO-8601 text."""
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        naive = pa.timestamp(target.unit)
        if getattr(column.type, "tz", None) is None:
            column = column.cast(naive, safe=False)
        return column.cast(target, safe=False)
    if pa.types.is_integer(column.type):
        return column.cast(pa.int64()).cast(target)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return _parse_text(column, target)
    raise ValueError(
        f"event times must be timestamps, ISO-8601 text or integer epoch "
        f"{target.unit} (found {column.type})"
    )


def _parse_text(column: pa.ChunkedArray, target: pa.TimestampType) -> pa.ChunkedArray:
    if pc.all(pc.match_substring_regex(column, _INTEGER)).as_py() is not False:
        return pc.utf8_trim_whitespace(column).cast(pa.int64()).cast(target)
    zoned = pc.match_substring_regex(column, _ZONED)
    with_zone = pc.if_else(zoned, column, None).cast(target)
    without = pc.if_else(zoned, None, column).cast(pa.timestamp(target.unit)).cast(target)
    return pc.if_else(zoned, with_zone, without)
