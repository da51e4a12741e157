"""Errors at the log's edge (Avro, warehouse segments, Kafka, the dual source).

ConnectorError
├── SchemaError         an Avro schema is invalid, unknown, or evolved incompatibly
├── DecodeError         a payload is not a single-object Avro record of a known schema
├── SegmentError        a warehouse segment or manifest is missing, corrupt, or inconsistent
│   ├── ManifestConflictError  another writer committed the source's manifest first (object store)
│   └── ObjectStoreError       an object store cannot be reached, or refuses a request
├── InputFileError      a history file given to ingest cannot be read as the source's events
├── LogGapError         Kafka no longer holds offsets the log needs (retention passed)
├── TopicMissingError   a Kafka topic does not exist (the broker's UNKNOWN_TOPIC_OR_PART)
└── DeadLetterError     dead letters could not be written whole and confirmed (the flow stops)
"""

from __future__ import annotations


class ConnectorError(Exception):
    """Root of every error raised by the `connectors` package."""


class SchemaError(ConnectorError):
    """An Avro schema problem; the message names the field and the rule."""


class DecodeError(ConnectorError):
    """A payload cannot be decoded; `reason` says why (bad marker, unknown fingerprint, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SegmentError(ConnectorError):
    """A warehouse segment problem; the message names the file."""


class ManifestConflictError(SegmentError):
    """Another writer committed the next manifest of the source first; nothing of this
    transaction is visible: retry it on the new manifest."""


class ObjectStoreError(SegmentError):
    """An object-store request failed; the message names the URI and the fix."""


class InputFileError(ConnectorError):
    """An input file is unreadable or lacks a required column."""


class LogGapError(ConnectorError):
    """The log has a hole between warehouse segments and Kafka."""


class TopicMissingError(ConnectorError):
    """A Kafka topic does not exist; the message names the topic and the broker."""


class DeadLetterError(ConnectorError):
    """Dead letters were not confirmed written; the offsets that produced them must not be
    committed (a restart retries them)."""
