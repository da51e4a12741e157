"""`python -m flows.snapshot`: a point-in-time-correct training snapshot for a spine file.

The spine (Parquet, CSV or JSON lines) holds the entity key column, named as the source's key,
and a `ts` column (timestamps; integers are read in the source timestamp's unit). The output
Parquet holds every spine column, in spine order, plus one column `<view>__<feature>` per feature,
each the value as of that row's ts (events strictly before ts). The log is read exactly as the
live flow reads it (segments, then Kafka with --kafka), through the same aggregation core.

With `--service NAME` the spine holds the service's entity columns, `ts` and its request fields
(other columns are kept), and the output adds the service's columns (`<view>__<feature>`,
`<on_demand>__<output>`): the views' point-in-time values, then the on-demand functions over the
spine in batches through `state.services.evaluate_service`, the code `get_service` runs.
"""

from __future__ import annotations

import dataclasses
import errno
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from connectors.avro import arrow_schema
from connectors.envelope import log_schema
from connectors.files import implausible_epoch
from connectors.log import KafkaTail, PartitionLog
from connectors.objectstore import owned_temp, replace_file
from connectors.segments import Warehouse
from flows.aggregate import DERIVED_ARROW, NO_KEY, entity_keys, event_times, key_column
from flows.cli import command_main
from flows.errors import SnapshotError, SpineError
from flows.pointintime import kept_events, point_in_time
from flows.quarantine import validate_guarded
from flows.schemas import field_defaults, schema_store
from flows.settings import (
    DeploymentSettings,
    option,
)
from flows.spec import FeatureView, Source, load_definitions
from flows.validate import EventRules
from state.errors import OnDemandError, StateError
from state.layout import ViewLayout
from state.services import (
    ServicePlan,
    check_entity_columns,
    evaluate_service,
    feature_column,
    feature_type,
    request_columns,
)
from state.store import left_by_dead

SPINE_TS = "ts"
SNAPSHOT_FORMAT = "1"
SERVICE_BATCH_ROWS = 65_536  # spine rows per call of each on-demand function
KAFKA_TAIL_WAIT_S = 60.0  # how long reading the log waits for Kafka to deliver its tail


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotSettings(DeploymentSettings):
    spine: str | None = option(
        None, "spine file: entity key column + ts column (Parquet/CSV/JSONL)"
    )
    out: str | None = option(None, "output Parquet file")
    views: str | None = option(None, "comma-separated views (default: all)")
    service: str | None = option(
        None,
        "a feature service: the spine holds its entity columns, ts and request fields; the "
        "output adds the service's columns, as get_service gives them at ts",
    )
    allow_empty: bool = option(
        False,
        "make the snapshot even when a view's source has no events in the log (every "
        "feature then comes out empty: count 0, nulls); default: refuse",
    )


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("flows.snapshot", __doc__, SnapshotSettings, _snapshot, argv)


def _snapshot(settings: SnapshotSettings) -> int:
    if not settings.spine or not settings.out:
        raise SpineError("--spine FILE and --out FILE are both required")
    started = time.perf_counter()
    defs = load_definitions(settings.features)
    wh = Warehouse(settings.warehouse)
    if settings.service:
        if settings.views:
            raise SpineError("--service and --views exclude each other; give one of them")
        _, plan = defs.service(settings.service)
        spine = read_spine(Path(settings.spine), service_key_types(plan, defs.views))
        result = build_service_snapshot(
            plan, defs.views, spine, wh, settings.kafka, allow_empty=settings.allow_empty
        )
    else:
        views = defs.select(settings.views.split(",") if settings.views else None)
        spine = read_spine(Path(settings.spine), spine_key_types(views))
        result = build_snapshot(views, spine, wh, settings.kafka, allow_empty=settings.allow_empty)
    write_parquet_atomic(result, Path(settings.out))
    print(
        f"snapshot: {result.num_rows:,} rows x {result.num_columns - spine.num_columns} "
        f"features -> {settings.out} in {time.perf_counter() - started:.1f}s"
    )
    return 0


def spine_key_types(views: Sequence[FeatureView]) -> dict[str, pa.DataType]:
    """The Arrow type of each spine key column: the type of the source's key field."""
    types: dict[str, pa.DataType] = {}
    for view in views:
        schema = arrow_schema(view.source.avro_schema())
        for column in view.key_columns():
            if column in schema.names:
                types.setdefault(column, schema.field(column).type)
            elif column in view.columns:  # a derived key column: its declared type
                types.setdefault(column, DERIVED_ARROW[view.columns[column]])
    return types


def service_key_types(
    plan: ServicePlan, views: Mapping[str, FeatureView]
) -> dict[str, pa.DataType]:
    """The Arrow type of each entity column of a service's spine: its view key's type."""
    types: dict[str, pa.DataType] = {}
    for read in plan.reads:
        by_key = spine_key_types([views[read.view]])
        for entity, key in zip(read.entity_columns, read.key_columns, strict=True):
            if key in by_key:
                types.setdefault(entity, by_key[key])
    return types


def read_spine(path: Path, key_types: Mapping[str, pa.DataType] | None = None) -> pa.Table:
    """Read a spine file by extension, its key columns as `key_types` (the sources' key types:
    the CSV key `00123` of a string key stays "00123"); a file with no rows gives 0 rows.

    Raises:
        SpineError: naming the file and the cause.
    """
    if not path.is_file():
        raise SpineError(f"spine file {str(path)!r} not found")
    key_types = dict(key_types or {})
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return _typed_spine(pq.read_table(path), key_types, path)
        if suffix == ".csv":
            convert = pacsv.ConvertOptions(column_types=key_types)
            return _typed_spine(pacsv.read_csv(path, convert_options=convert), key_types, path)
        if suffix in (".jsonl", ".json", ".ndjson"):
            return _typed_spine(pajson.read_json(path), key_types, path)
    except (pa.ArrowException, OSError) as exc:
        raise SpineError(f"spine file {str(path)!r} cannot be read: {exc}") from exc
    raise SpineError(
        f"spine file {str(path)!r}: unknown extension {suffix!r}; use .parquet, .csv or .jsonl"
    )


def _typed_spine(spine: pa.Table, key_types: dict[str, pa.DataType], path: Path) -> pa.Table:
    """Key columns cast to the sources' key types; an all-null `ts` (a file without rows)
    typed as timestamps."""
    wanted = {**key_types, SPINE_TS: pa.timestamp("us", tz="UTC")}
    for i, f in enumerate(spine.schema):
        target = wanted.get(f.name)
        if target is None or f.type == target or (f.name == SPINE_TS and f.type != pa.null()):
            continue
        try:
            spine = spine.set_column(i, pa.field(f.name, target), spine.column(i).cast(target))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise SpineError(
                f"spine file {str(path)!r}: key column {f.name!r} of type {f.type} cannot be "
                f"read as the source key's type {target}: {exc}; fix the spine's keys"
            ) from exc
    return spine


def spine_times(spine: pa.Table, source: Source) -> np.ndarray:
    """The spine's ts column as int64 µs (UTC)."""
    if SPINE_TS not in spine.column_names:
        raise SpineError(
            f"spine has no {SPINE_TS!r} column (columns: "
            f"{', '.join(spine.column_names)}); add the time of each row as 'ts'"
        )
    col = spine.column(SPINE_TS)
    if pc.any(pc.is_null(col)).as_py():
        raise SpineError(f"spine column {SPINE_TS!r} has nulls; every row needs a time")
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        try:
            col = pc.cast(col, pa.timestamp("us", tz="UTC"))
        except pa.ArrowInvalid as exc:
            raise SpineError(
                f"spine column 'ts' has text that is not an ISO-8601 time: {exc}"
            ) from exc
    if pa.types.is_timestamp(col.type):
        return event_times(pa.table({SPINE_TS: col}), SPINE_TS)
    if pa.types.is_integer(col.type):
        unit = source.field_types()[source.timestamp]
        values = np.asarray(col.to_numpy(), dtype=np.int64)
        fits = implausible_epoch(values, "ms" if unit == "timestamp-millis" else "us")
        if fits is not None:
            raise SpineError(
                f"spine column 'ts' holds integer times like {values[0]}, which read in the "
                f"unit of {source.name!r}'s {unit} field are outside the years 1980-2300; "
                f"write the times in that unit (these look like {fits}) or as ISO-8601 text"
            )
        return values * (1000 if unit == "timestamp-millis" else 1)
    raise SpineError(
        f"spine column 'ts' has type {col.type}; use timestamps, ISO-8601 text or "
        "integer epoch times"
    )


def read_log(source: Source, warehouse: Warehouse, kafka: str | None) -> list[pa.Table]:
    """The whole log of a source as it stands now: one offset-ordered table per partition."""
    schema = arrow_schema(source.avro_schema())
    store = schema_store(source, warehouse)
    tail = KafkaTail(kafka, source.kafka_topic, store, source.key) if kafka else None
    out: list[pa.Table] = []
    for p in range(source.partitions):
        log = PartitionLog(
            warehouse, source.name, p, 0, schema, kafka=tail, defaults=field_defaults(source)
        )
        try:
            log.stop_at = log.end_offset()
            parts = []
            deadline = time.monotonic() + KAFKA_TAIL_WAIT_S
            while not log.done:
                batch = log.read()
                if batch is None and tail is not None and time.monotonic() < deadline:
                    time.sleep(0.01)  # Kafka reads never block: the fetch is on its way
                    continue
                if batch is None:
                    _incomplete_log(source, p, log, tail)
                    break
                parts.append(validate_guarded(batch, EventRules.of(source)).events)
        finally:
            log.close()
        out.append(pa.concat_tables(parts) if parts else log_schema(schema).empty_table())
    return out


def _incomplete_log(source: Source, partition: int, log: PartitionLog, tail: object) -> None:
    if tail is not None:
        raise SnapshotError(
            f"source {source.name!r} partition {partition}: Kafka did not deliver offsets up "
            f"to {log.stop_at} within {KAFKA_TAIL_WAIT_S:.0f}s; check that the broker runs "
            "and answers (--kafka), then retry"
        )


def build_snapshot(
    views: Sequence[FeatureView],
    spine: pa.Table,
    warehouse: Warehouse,
    kafka: str | None = None,
    *,
    allow_empty: bool = False,
) -> pa.Table:
    """The spine plus one column per feature of each view, point-in-time correct.

    Raises:
        SnapshotError: a view's source has no events in the log (unless `allow_empty`).
    """
    result = spine
    reads = [(view, view.layout().key_columns, None) for view in views]
    for name, column in _view_columns(reads, spine, warehouse, kafka, allow_empty):
        result = result.append_column(name, column)
    return _with_format(result)


def build_service_snapshot(
    plan: ServicePlan,
    views: Mapping[str, FeatureView],
    spine: pa.Table,
    warehouse: Warehouse,
    kafka: str | None = None,
    *,
    allow_empty: bool = False,
    batch_rows: int = SERVICE_BATCH_ROWS,
) -> pa.Table:
    """The spine plus a feature service's columns, each row as `get_service` gives it at ts.

    Raises:
        SpineError: an entity column, `ts` or a request field is missing or mistyped.
        SnapshotError: an on-demand function failed (nothing is written), or a source is empty.
    """
    try:
        check_entity_columns(plan, spine)
        request = request_columns(plan, spine)
    except StateError as exc:
        raise SpineError(f"spine: {exc}") from exc
    reads = [(views[r.view], r.entity_columns, r.features) for r in plan.reads]
    features = dict(_view_columns(reads, spine, warehouse, kafka, allow_empty))
    parts: dict[str, list[pa.Array]] = {c: [] for c in plan.columns}
    for start in range(0, spine.num_rows, batch_rows) or [0]:
        n = min(batch_rows, spine.num_rows - start)
        batch = {k: v.slice(start, n) for k, v in features.items()}
        asked = {k: v.slice(start, n) for k, v in request.items()}
        try:
            columns = evaluate_service(plan, batch, asked, n)
        except OnDemandError as exc:
            raise SnapshotError(f"{exc}; no snapshot was written") from exc
        for name, values in columns.items():
            parts[name].append(values)
    result = spine
    for name, chunks in parts.items():
        result = result.append_column(name, pa.chunked_array(chunks))
    return _with_format(result)


def _view_columns(
    reads: Sequence[tuple[FeatureView, tuple[str, ...], tuple[str, ...] | None]],
    spine: pa.Table,
    warehouse: Warehouse,
    kafka: str | None,
    allow_empty: bool,
) -> Iterator[tuple[str, pa.Array]]:
    """`<view>__<feature>` columns of each (view, spine key columns, features or None = all),
    each source's log read once."""
    logs: dict[str, list[pa.Table]] = {}
    for view, key_columns, wanted in reads:
        source = view.source
        layout = view.layout()
        missing = [c for c in key_columns if c not in spine.column_names]
        if missing:
            raise SpineError(
                f"spine has no {missing[0]!r} column (a key column of view {view.name!r}, "
                f"keyed by {key_columns}); columns: {', '.join(spine.column_names)}"
            )
        times = spine_times(spine, source)
        if source.name not in logs:
            logs[source.name] = read_log(source, warehouse, kafka)
            if not allow_empty and not any(t.num_rows for t in logs[source.name]):
                raise _empty_source(source, [r[0] for r in reads], warehouse, kafka)
        keys = pc.fill_null(key_column(spine, key_columns), NO_KEY)
        events = _only_keys(kept_events(layout, logs[source.name], view.transform), layout, keys)
        chosen = dataclasses.replace(
            layout, features=tuple(f for f in layout.features if wanted is None or f.name in wanted)
        )
        values = point_in_time(chosen, events, keys, times)
        for feature in chosen.features:
            column = values[feature.name]
            if wanted is None:
                column = column.cast(feature_type(layout, feature))
            else:
                column = feature_column(layout, feature, column)
            yield f"{view.name}__{feature.name}", column


def _with_format(result: pa.Table) -> pa.Table:
    meta = dict(result.schema.metadata or {})
    meta[b"featureflow.snapshot_format"] = SNAPSHOT_FORMAT.encode()
    return result.replace_schema_metadata(meta)


def _only_keys(events: pa.Table, layout: ViewLayout, keys: pa.ChunkedArray) -> pa.Table:
    if events.num_rows == 0:
        return events
    wanted = pc.unique(keys)
    return events.filter(pc.is_in(entity_keys(events, layout), value_set=wanted))


def _empty_source(
    source: Source, views: Sequence[FeatureView], warehouse: Warehouse, kafka: str | None
) -> SnapshotError:
    names = ", ".join(repr(v.name) for v in views if v.source.name == source.name)
    where = f"the warehouse {warehouse.root}" + (f" nor Kafka at {kafka}" if kafka else "")
    return SnapshotError(
        f"source {source.name!r} has no events in {where}, so every feature of view(s) "
        f"{names} would be empty (count 0, nulls) for every spine row. Ingest or archive its "
        "history first (or check --warehouse and --kafka), or pass --allow-empty to make the "
        "snapshot anyway"
    )


def write_parquet_atomic(table: pa.Table, out: Path) -> None:
    """Write to a temporary name beside `out` (`owned_temp(out)`), fsync, then rename: never
    a half-written file. Temporary files of killed snapshots (dead pids) are removed first.

    Raises:
        SnapshotError: the disk is full (naming the path); nothing is left behind.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    tmp = owned_temp(out)
    try:
        replace_file(out, lambda t: pq.write_table(table, t, compression="zstd"), tmp=tmp)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise SnapshotError(
            f"no space left on the device holding {out.parent} (writing {out}); the snapshot "
            "was not written: free space there (or choose another --out) and run it again"
        ) from exc


def _remove_stale_temporaries(out: Path) -> None:
    for tmp in left_by_dead(out.parent.glob(f".{out.name}.tmp-*")):
        tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
