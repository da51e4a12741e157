"""The flow's dead-letter output: bad and too-late records are kept, with the reason, never
dropped.

    validate / route / quarantine --DeadLetter--> DeadLetterWriter --> DeadLetterSink
    aggregate (late rows) --write_late----------> (Avro or JSON)       Kafka `<source>.dlq`, or
                                                                        warehouse files

Dead letters are part of the exactly-once commit: the view sink writes a batch's dead letters
before it commits the offsets that produced them, and `DeadLetterWriter.write` returns only once
the sink confirmed every one; else it raises `connectors.errors.DeadLetterError`, the flow stops
without committing, and a restart retries them.

With Kafka (`connectors.kafka_deadletters.KafkaDeadLetterSink`, whose docstring draws the
message), a late event's payload is the row re-encoded as Avro single-object with the source's
schema (its original format) when the writer knows the schema, else JSON. A source-level dead
letter is written once per log offset, whatever the number of replays, view versions or
restarts: the offsets confirmed in the topic are kept in the warehouse
(`connectors.deadletters.SentOffsets`) and skipped. Late events are per view version: a replay
into a new version writes its own, marked by the `view` and `version` headers.

Without Kafka, dead letters go to Parquet files under `<warehouse>/<source>/_deadletter/`
(`connectors.deadletters.FileDeadLetterSink`: the full payload, never truncated). Either way
they are counted in the flow's metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa

from connectors.deadletters import DeadLetterSink, FileDeadLetterSink, SentOffsets, sent_offsets
from connectors.envelope import OFFSET, DeadLetter, PayloadFormat
from connectors.errors import SchemaError

if TYPE_CHECKING:  # Avro and Kafka load when a flow has a late event or a broker, not before
    from connectors.avro import SingleObjectWriter


def dlq_topic(source: str) -> str:
    return f"{source}.dlq"


def open_dead_letters(
    warehouse: str | Path,
    source: str,
    kafka_bootstrap: str | None,
    *,
    schema: Mapping[str, Any] | None = None,
) -> DeadLetterWriter:
    """The dead-letter output of `source`: its `.dlq` topic with Kafka, else warehouse files.

    Args:
        schema: the source's Avro schema; late events are then re-encoded as Avro
            single-object payloads (their original format) instead of JSON.
    """
    if not kafka_bootstrap:
        return DeadLetterWriter(FileDeadLetterSink(warehouse, source), schema=schema)
    from connectors.kafka_deadletters import KafkaDeadLetterSink

    sink = KafkaDeadLetterSink(kafka_bootstrap, dlq_topic(source), source)
    return DeadLetterWriter(sink, sent=sent_offsets(warehouse, source), schema=schema)


class DeadLetterWriter:
    """Writes the dead letters of one source to a sink.

    Args:
        sink: where they go.
        sent: the log offsets whose source-level dead letters the sink already holds; those
            are skipped (a sink that keeps its letters elsewhere, such as a Kafka topic).
        schema: the source's Avro schema, to re-encode late events in their original format.
    """

    def __init__(
        self,
        sink: DeadLetterSink,
        *,
        sent: SentOffsets | None = None,
        schema: Mapping[str, Any] | None = None,
    ) -> None:
        self._sink, self._sent, self._schema = sink, sent, schema
        self._writer: SingleObjectWriter | None = None

    def write(self, letters: Sequence[DeadLetter]) -> None:
        """Write source-level dead letters; returns once every one is confirmed written.

        A letter at a log position already in `sent` (written by an earlier run, replay, view
        version or another view) is skipped: one source-level letter per log offset.

        Raises:
            DeadLetterError: a dead letter was not confirmed written (the caller must not
                commit the offsets that produced it).
        """
        if self._sent is None:
            self._sink.write(letters)
            return
        fresh = self._sent.fresh(letters)
        if fresh:
            self._sink.write(fresh)
            self._sent.advance(fresh)

    def write_late(
        self, late: pa.Table, view: str, partition: int, version: int | None = None
    ) -> None:
        """Events too late for `view` (older than its retention behind the watermark).

        Raises:
            DeadLetterError: as `write`.
        """
        letters = [self._late_letter(row, view, partition, version) for row in late.to_pylist()]
        if letters:
            self._sink.write(letters)

    def _late_letter(
        self, row: dict[str, Any], view: str, partition: int, version: int | None
    ) -> DeadLetter:
        payload, fmt = self._encode_row({k: v for k, v in row.items() if not k.startswith("_")})
        reason = (
            f"view {view!r}: event at offset {row[OFFSET]} is too late (older than the "
            "view's retention behind the partition's newest event time); raise "
            "allowed_lateness to keep such events"
        )
        return DeadLetter(reason, partition, int(row[OFFSET]), payload, fmt, view, version)

    def _encoder(self) -> SingleObjectWriter | None:
        if self._writer is None and self._schema is not None:
            from connectors.avro import SingleObjectWriter

            self._writer = SingleObjectWriter(self._schema)
        return self._writer

    def _encode_row(self, row: dict[str, Any]) -> tuple[bytes, PayloadFormat]:
        encoder = self._encoder()
        if encoder is not None:
            fields = {f["name"] for f in encoder.schema["fields"]}
            try:
                return encoder.encode({k: row.get(k) for k in fields}), "avro-single-object"
            except SchemaError:  # a transform changed a column: keep what can be kept
                pass
        return orjson.dumps(row, default=str), "json"

    def close(self) -> None:
        self._sink.close()


__all__ = ["DeadLetterWriter", "dlq_topic", "open_dead_letters"]
