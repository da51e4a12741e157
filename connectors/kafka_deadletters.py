"""The dead-letter sink of a source's `.dlq` topic (a `connectors.deadletters.DeadLetterSink`):
every letter confirmed by the broker, oversized ones truncated to fit the topic.

    DeadLetter --> key, payload, headers --fit to the topic's limit--> produce --> wait for
                                          (payload truncated)                    every report
    refused as too large by the broker: fit again to half the limit (a few times), resend

The topic and its limit (max.message.bytes) are looked up, and the topic created if missing,
at the first letter (connectors.kafka_admin.topic_message_limit).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from connectors.envelope import DeadLetter
from connectors.errors import DeadLetterError
from connectors.kafka_admin import topic_message_limit
from connectors.kafka_logging import KAFKA_LOG

__all__ = ["KafkaDeadLetterSink"]

# Bytes of a one-record batch besides key, value and headers: the v2 batch header (61) and
# the record's framing varints, with a margin; a broker refusal halves the budget anyway.
FRAMING_BYTES = 61 + 40
HEADER_FRAMING_BYTES = 10
DELIVERY_TIMEOUT_S = 120.0  # librdkafka retries through a broker outage this long
_TOO_LARGE = {KafkaError.MSG_SIZE_TOO_LARGE}  # refused by the producer or by the broker
_SIZE_RETRIES = 4


@dataclass(frozen=True, slots=True)
class _Letter:
    """A dead letter as a Kafka message, before it is fitted to the topic's size limit."""

    key: bytes
    payload: bytes | None
    headers: tuple[tuple[str, bytes], ...]


class KafkaDeadLetterSink:
    """A source's dead letters in its `.dlq` topic: every message confirmed, oversized ones
    truncated to fit (a `connectors.deadletters.DeadLetterSink`).

        key      b"<partition>:<offset>" (log offsets; b"-" for a row without a log position)
        value    the letter's payload, cut to what the topic accepts
        headers  reason, source, partition, offset, payload_format, (view, version: for a
                 late event), original_size (bytes of the whole payload), truncated
                 ("true"/"false")

    A letter larger than the topic accepts (its `max.message.bytes`, at most 1 MB by the
    producer's default) is written truncated to fit; a topic too small even for the key and
    headers is a DeadLetterError. The topic is looked up (and created with 1 partition if
    missing) at the first letter, not before: a flow without dead letters makes no topic.
    """

    def __init__(self, bootstrap: str, topic: str, source: str) -> None:
        self.topic, self._bootstrap, self._source = topic, bootstrap, source
        self._limit = 0
        self._started: Producer | None = None

    def write(self, letters: Sequence[DeadLetter]) -> None:
        """Deliver `letters`; returns once the broker confirmed every one.

        Raises:
            DeadLetterError: a letter cannot fit the topic, or was not delivered.
        """
        if letters:
            self._send([self._letter(d) for d in letters])

    def _letter(self, d: DeadLetter) -> _Letter:
        key = b"-" if d.offset is None else f"{d.partition}:{d.offset}".encode()
        headers = [
            ("reason", d.reason.encode()),
            ("source", self._source.encode()),
            ("partition", str(d.partition).encode()),
            ("offset", str(d.offset).encode()),
            ("payload_format", d.payload_format.encode()),
        ]
        if d.view is not None:  # a late event: the view version it was late for
            headers += [("view", d.view.encode()), ("version", str(d.version).encode())]
        return _Letter(key, d.payload, tuple(headers))

    def _producer(self) -> Producer:
        """The producer, made at first use (when the topic's size limit is looked up)."""
        if self._started is None:
            self._limit = topic_message_limit(self._bootstrap, self.topic)
            self._started = Producer(
                {
                    "bootstrap.servers": self._bootstrap,
                    "enable.idempotence": True,
                    "linger.ms": 5,
                    # One batch never exceeds what the topic accepts, so small letters are
                    # never refused for sharing a batch with others.
                    "message.max.bytes": max(1000, self._limit),
                    "batch.size": max(1, self._limit),
                    "message.timeout.ms": int(DELIVERY_TIMEOUT_S * 1000),
                    "logger": KAFKA_LOG,
                }
            )
        return self._started

    def _send(self, letters: Sequence[_Letter]) -> None:
        self._producer()  # fixes the topic's limit on first use
        pending, limit = list(letters), self._limit
        for _ in range(_SIZE_RETRIES):
            failed = self._deliver([self._fit(d, limit) for d in pending])
            too_large = [pending[i] for i, e in failed if e.code() in _TOO_LARGE]
            others = [(pending[i], e) for i, e in failed if e.code() not in _TOO_LARGE]
            if others:
                letter, error = others[0]
                raise DeadLetterError(
                    f"{len(others)} dead letter(s) to topic {self.topic!r} were not delivered, "
                    f"the first (key {letter.key.decode()}): {error.str()}; the offsets that "
                    "produced them are not committed: check the broker and the topic, then "
                    "restart the flow (it retries them)"
                )
            if not too_large:
                return
            pending, limit = too_large, limit // 2  # the broker counts more framing than we
        raise DeadLetterError(
            f"{len(pending)} dead letter(s) were refused as too large by topic {self.topic!r} "
            f"even truncated to {limit} bytes; raise the topic's max.message.bytes and restart"
        )

    def _fit(self, letter: _Letter, limit: int) -> tuple[bytes, bytes | None, list[Any]]:
        """(key, value, headers) of a letter, its value truncated to fit in `limit` bytes."""
        size = -1 if letter.payload is None else len(letter.payload)
        headers = [*letter.headers, ("original_size", str(size).encode())]
        overhead = FRAMING_BYTES + len(letter.key) + len(b"truncated") + len(b"false")
        overhead += sum(len(k) + len(v) + HEADER_FRAMING_BYTES for k, v in headers)
        budget = limit - overhead - HEADER_FRAMING_BYTES
        if budget < 0:
            raise DeadLetterError(
                f"dead letter {letter.key.decode()}: topic {self.topic!r} accepts messages of "
                f"at most {limit} bytes (max.message.bytes), fewer than the letter's key and "
                f"headers take ({overhead} bytes); raise the topic's max.message.bytes to at "
                "least 4096 and restart the flow (the offsets were not committed)"
            )
        value, truncated = letter.payload, size > budget
        if truncated and value is not None:
            value = value[:budget]
        return letter.key, value, [*headers, ("truncated", b"true" if truncated else b"false")]

    def _deliver(
        self, messages: Sequence[tuple[bytes, bytes | None, list[Any]]]
    ) -> list[tuple[int, KafkaError]]:
        """Produce `messages` and wait for every delivery report; the failures by index."""
        failed: list[tuple[int, KafkaError]] = []
        for i, (key, value, headers) in enumerate(messages):

            def report(error: KafkaError | None, _msg: Message, i: int = i) -> None:
                if error is not None:
                    failed.append((i, error))

            self._produce(key, value, headers, report, failed, i)
        self._wait()
        return failed

    def _produce(
        self,
        key: bytes,
        value: bytes | None,
        headers: list[Any],
        report: Any,
        failed: list[tuple[int, KafkaError]],
        i: int,
    ) -> None:
        while True:
            try:
                self._producer().produce(
                    self.topic, value=value, key=key, headers=headers, on_delivery=report
                )
                return
            except BufferError:  # local queue full: let deliveries drain, then retry
                self._producer().poll(0.1)
            except KafkaException as exc:  # refused before sending (e.g. too large)
                failed.append((i, exc.args[0]))
                return

    def _wait(self) -> None:
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S + 30
        while self._producer().flush(1.0) > 0:
            if time.monotonic() > deadline:
                raise DeadLetterError(
                    f"{len(self._producer())} dead letter(s) to topic {self.topic!r} were not "
                    f"confirmed within {DELIVERY_TIMEOUT_S + 30:.0f} s; the offsets that "
                    "produced them are not committed: check the broker, then restart the flow"
                )

    def close(self) -> None:
        if self._started is not None:
            self._wait()
