"""The flow's dead-letter writer over its sink seam: one source-level letter per log offset
where the sink keeps them (Kafka), late events in their original format and marked with their
view version, and the warehouse-file sink."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from connectors.avro import SchemaStore
from connectors.deadletters import FileDeadLetterSink, read_dead_letters, sent_offsets
from connectors.envelope import ARRIVAL, OFFSET, PARTITION, DeadLetter
from flows.deadletters import DeadLetterWriter
from tests.connectors.avro_oracle import decode_one
from tests.helpers import SCHEMA_JSON

T0 = 1_790_000_000_000_000  # µs


class RecordingSink:
    """A DeadLetterSink that keeps what it was given."""

    def __init__(self) -> None:
        self.written: list[DeadLetter] = []
        self.closed = False

    def write(self, letters: Sequence[DeadLetter]) -> None:
        self.written += letters

    def close(self) -> None:
        self.closed = True


def late_rows(amounts: list[float]) -> pa.Table:
    n = len(amounts)
    return pa.table(
        {
            "user_id": ["u1"] * n,
            "ts": pa.array([T0] * n, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "amount": amounts,
            "channel": ["pos"] * n,
            OFFSET: pa.array(range(7, 7 + n), pa.int64()),
            PARTITION: pa.array([2] * n, pa.int32()),
            ARRIVAL: pa.array([T0] * n, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        }
    )


def test_a_source_level_letter_is_written_once_per_log_offset(tmp_path: Path) -> None:
    sink = RecordingSink()
    writer = DeadLetterWriter(sink, sent=sent_offsets(tmp_path, "txns"))
    letters = [DeadLetter("bad", 0, 3, b"x"), DeadLetter("bad", 1, 3, b"y")]
    writer.write(letters)
    again = DeadLetterWriter(sink, sent=sent_offsets(tmp_path, "txns"))  # a rerun or replay
    again.write(
        [*letters, DeadLetter("bad", 0, 4, b"z"), DeadLetter("no position", None, None, b"")]
    )
    assert [(d.partition, d.offset) for d in sink.written] == [(0, 3), (1, 3), (0, 4), (None, None)]
    again.close()
    assert sink.closed


def test_late_events_keep_their_avro_format_and_name_their_view_version() -> None:
    sink = RecordingSink()
    DeadLetterWriter(sink, schema=json.loads(SCHEMA_JSON)).write_late(
        late_rows([7.5]), "spend", 2, version=3
    )
    (letter,) = sink.written
    assert (letter.partition, letter.offset, letter.view, letter.version) == (2, 7, "spend", 3)
    assert letter.payload_format == "avro-single-object"
    assert "view 'spend': event at offset 7 is too late" in letter.reason
    assert letter.payload is not None
    decoded = decode_one(SchemaStore(json.loads(SCHEMA_JSON)), letter.payload)
    assert decoded == {"user_id": "u1", "ts": T0, "amount": 7.5, "channel": "pos"}


def test_late_events_are_json_when_the_schema_is_not_known() -> None:
    sink = RecordingSink()
    DeadLetterWriter(sink).write_late(late_rows([1.0, 2.0]), "spend", 2, version=1)
    assert [d.payload_format for d in sink.written] == ["json", "json"]
    assert [json.loads(d.payload or b"")["amount"] for d in sink.written] == [1.0, 2.0]


def test_the_file_sink_keeps_letters_whole_beside_the_segments(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 8000  # 2 MB: more than a Kafka message may hold
    writer = DeadLetterWriter(FileDeadLetterSink(tmp_path, "txns"))
    writer.write([DeadLetter("undecodable", 1, 41, payload)])
    writer.write([DeadLetter("undecodable", 1, 41, payload)])  # files do not de-duplicate
    writer.write([])
    table = read_dead_letters(tmp_path, "txns")
    assert table.column("offset").to_pylist() == [41, 41]
    assert table.column("payload").to_pylist() == [payload, payload]
    assert table.column("reason").to_pylist() == ["undecodable", "undecodable"]
