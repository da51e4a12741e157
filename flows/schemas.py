"""Schema evolution of a source: which writer schemas its log may carry, checked against the
current one.

The current schema (`Source.schema`) is the reader schema. Writer schemas are the source's
`previous_schemas` plus every schema the warehouse has recorded for the log (`flows.ingest` and
`flows.archive` record the schema they wrote with). Each must be readable as the current schema
under Avro's resolution rules (added fields need defaults; only int->long->float->double and
string<->bytes promotions), else the command stops with the field and the rule.
"""

from __future__ import annotations

from typing import Any

from connectors.avro import SchemaStore
from connectors.avro_fields import record_fields
from connectors.errors import SchemaError
from connectors.segments import Warehouse
from flows.spec import Source


def schema_store(source: Source, warehouse: Warehouse) -> SchemaStore:
    """The source's reader schema with every known writer schema, compatibility checked.

    Raises:
        SchemaError: a writer schema cannot be read as the current schema (names the field).
    """
    reader = source.avro_schema()
    # Writers are not deduplicated here by fingerprint: the store refuses two schemas that
    # share one but differ in a logical type (e.g. timestamp-millis vs -micros).
    writers = [*source.older_schemas(), *warehouse.schemas(source.name)]
    try:
        return SchemaStore(reader, writers)
    except SchemaError as exc:
        raise SchemaError(
            f"source {source.name!r}: its current schema cannot read records written with an "
            f"earlier schema of its log: {exc}"
        ) from exc


def field_defaults(source: Source) -> dict[str, Any]:
    """Default values of the current schema's fields (for segments written before they existed)."""
    return {f.name: f.default for f in record_fields(source.avro_schema()) if f.has_default}


def register_current(source: Source, warehouse: Warehouse) -> SchemaStore:
    """Check the current schema against the log's, then record it as a writer schema."""
    store = schema_store(source, warehouse)
    warehouse.register_schema(source.name, source.avro_schema())
    return store
