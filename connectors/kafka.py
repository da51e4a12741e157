"""Producing events to a source's Kafka topic in the log's wire format (README, "Kafka wire
format"): the record key is the entity key as UTF-8, the value the event as single-object
encoded Avro, and partitions are chosen by murmur2 of the key, as the warehouse ingest
partitions are (connectors.partitioner).

    records --SingleObjectWriter.encode--> (key, value) --murmur2_random--> topic partition

The rest of the Kafka side: the log reader (connectors.kafka_reader), topics and offsets
(connectors.kafka_admin), the `.dlq` sink (connectors.kafka_deadletters) and the clients' log
(connectors.kafka_logging).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from connectors.avro import SingleObjectWriter
from connectors.errors import ConnectorError
from connectors.kafka_logging import KAFKA_LOG

__all__ = ["AvroProducer"]


class AvroProducer:
    """Produces records of one schema to a topic: key = entity key (UTF-8), value = single-object
    Avro; partitioned with murmur2 as the warehouse ingest partitions."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        schema: Mapping[str, Any],
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.topic = topic
        self._writer = SingleObjectWriter(schema)
        self._errors: list[str] = []
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "partitioner": "murmur2_random",
                "enable.idempotence": True,
                "linger.ms": 5,
                "logger": KAFKA_LOG,
                **(config or {}),
            }
        )

    def produce(self, records: Sequence[Mapping[str, Any]], key_field: str) -> None:
        """Queue `records` for sending (see `flush`).

        Raises:
            ConnectorError: a record has no value for `key_field`.
            SchemaError: a record does not match the schema.
        """
        for i, record in enumerate(records):
            key = record.get(key_field)
            if key is None:
                raise ConnectorError(
                    f"record {i} has no value for key field {key_field!r}; "
                    "every event needs its entity key"
                )
            self._send(str(key).encode("utf-8"), self._writer.encode(record))

    def _send(self, key: bytes, value: bytes) -> None:
        while True:
            try:
                self._producer.produce(
                    self.topic, value=value, key=key, on_delivery=self._delivered
                )
                break
            except BufferError:  # local queue full: let deliveries drain, then retry
                self._producer.poll(0.1)
        self._producer.poll(0)

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._errors.append(error.str())

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued record is delivered.

        Raises:
            ConnectorError: records remain undelivered after `timeout_s`, or a delivery failed.
        """
        remaining = self._producer.flush(timeout_s)
        if remaining:
            raise ConnectorError(
                f"{remaining} records to topic {self.topic!r} were not "
                f"delivered within {timeout_s} s; check that the broker runs"
            )
        if self._errors:
            errors, self._errors = self._errors, []
            raise ConnectorError(
                f"{len(errors)} records to topic {self.topic!r} failed: {errors[0]}"
            )
