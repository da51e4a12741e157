"""Where dead letters go: the `DeadLetterSink` seam, its warehouse-file form, and the record of
the dead letters already confirmed in Kafka.

    DeadLetter --> DeadLetterSink.write --> FileDeadLetterSink:   Parquet files beside the
                                            (here)                segments, full payloads
                                        --> KafkaDeadLetterSink:  the `.dlq` topic, payloads
                                            (connectors.          truncated to fit
                                             kafka_deadletters)

Files: `<warehouse>/<source>/_deadletter/<UTC time>-<uuid>.parquet`, columns reason,
partition, offset, payload, at (connectors.envelope.DEAD_LETTER_SCHEMA; view, version and
payload format are not kept). Written by `write_dead_letters`, read by `read_dead_letters`.

Sent offsets: `<warehouse>/<source>/_deadletter/_kafka_progress.json` holds, per partition, the
ranges of log offsets whose source-level dead letters are confirmed in the `.dlq` topic
({"<partition>": [[first, last], ...]}, changed under an flock and replaced atomically); on an
object-store warehouse the same JSON as numbered versions `_deadletter/_kafka_progress/<n>.json`,
changed by conditional put and retried on a conflict (connectors.objectstore.VersionedDocument).
"""

from __future__ import annotations

import bisect
import fcntl
import math
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import orjson
import pyarrow as pa

from connectors.envelope import DEAD_LETTER_SCHEMA, DeadLetter, dead_letter_table
from connectors.errors import SegmentError
from connectors.objectstore import LocalStore, Store, VersionedDocument, open_store, replace_file
from connectors.segment_writer import with_segment_metadata
from connectors.segments import Warehouse

DEAD_LETTER_DIR = "_deadletter"
PROGRESS = "_kafka_progress"  # `<PROGRESS>.json`, or the versioned `<PROGRESS>/<n>.json`


class DeadLetterSink(Protocol):
    """Where a source's dead letters are written."""

    def write(self, letters: Sequence[DeadLetter]) -> None:
        """Write `letters`; returns only once every one is durable (a file) or confirmed by
        the broker, since the caller commits the offsets that produced them next.

        Raises:
            DeadLetterError: a letter was not confirmed written (the caller must not commit).
        """

    def close(self) -> None:
        """Wait for anything still in flight, then release the sink."""


class FileDeadLetterSink:
    """Dead letters as Parquet files under `<warehouse>/<source>/_deadletter/`, one file per
    `write`; payloads are kept whole."""

    def __init__(self, warehouse: str | Path | Warehouse, source: str) -> None:
        self._warehouse, self._source = warehouse, source

    def write(self, letters: Sequence[DeadLetter]) -> None:
        if letters:
            now_us = int(datetime.now(UTC).timestamp() * 1_000_000)
            table = dead_letter_table(list(letters), now_us)
            write_dead_letters(self._warehouse, self._source, table)

    def close(self) -> None:
        return None


def write_dead_letters(
    root: str | Path | Warehouse, source: str, table: pa.Table, name: str | None = None
) -> str | None:
    """Append dead letters (columns reason, partition, offset, payload, at) as a new file
    under `<root>/<source>/_deadletter/`; its location, or None if `table` is empty. `name` (a
    file name without extension) replaces the file of that name, so that a retried writer
    (an ingest rerun after a crash) does not write its dead letters twice.

    Raises:
        SegmentError: a column is missing or cannot be cast to the dead-letter schema.
    """
    if table.num_rows == 0:
        return None
    try:
        table = table.select(DEAD_LETTER_SCHEMA.names).cast(DEAD_LETTER_SCHEMA)
    except (KeyError, pa.ArrowException) as exc:
        raise SegmentError(
            f"dead letters of source {source!r} do not fit the dead-letter schema "
            f"({exc}); give columns {DEAD_LETTER_SCHEMA}"
        ) from exc
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    name = name or f"{stamp}-{uuid.uuid4().hex}"
    store = _store_of(root)
    rel = f"{source}/{DEAD_LETTER_DIR}/{name}.parquet"
    store.write_parquet(rel, with_segment_metadata(table, ""))
    return store.describe(rel)


def read_dead_letters(root: str | Path | Warehouse, source: str) -> pa.Table:
    """All dead letters of a source, in file-name order (time-stamped files, then the
    `ingest-<hash>` files of ingests)."""
    store, folder = _store_of(root), f"{source}/{DEAD_LETTER_DIR}"
    names = [n for n in store.list(folder) if n.endswith(".parquet")]
    tables = [store.parquet_file(f"{folder}/{n}").read().cast(DEAD_LETTER_SCHEMA) for n in names]
    return pa.concat_tables(tables) if tables else DEAD_LETTER_SCHEMA.empty_table()


def _store_of(root: str | Path | Warehouse) -> Store:
    return root.store if isinstance(root, Warehouse) else open_store(root)


class SentOffsets:
    """The log offsets whose source-level dead letters are confirmed in the `.dlq` topic, per
    partition, as sorted inclusive ranges: a JSON object {"<partition>": [[first, last], ...]}
    in one file, changed under an flock and replaced atomically (tmp, fsync, rename), so
    concurrent workers and processes never lose a mark. Exact offsets, not a high mark: letters
    of one partition may come in any order (shards, views)."""

    def __init__(self, path: Path | VersionedDocument) -> None:
        self._path = path

    def delivered(self) -> dict[int, list[tuple[int, int]]]:
        return self._read()[1]

    def _read(self) -> tuple[int, dict[int, list[tuple[int, int]]]]:
        try:
            version, data = (
                (0, self._path.read_bytes()) if isinstance(self._path, Path) else self._path.read()
            )
        except FileNotFoundError:
            return 0, {}
        raw: dict[str, list[list[int]]] = orjson.loads(data) if data else {}
        return version, {int(p): [(int(a), int(b)) for a, b in spans] for p, spans in raw.items()}

    def fresh(self, letters: Sequence[DeadLetter]) -> list[DeadLetter]:
        """The letters not yet delivered (those without a log position always are)."""
        done = self.delivered() if letters else {}
        return [
            d
            for d in letters
            if d.partition is None
            or d.offset is None
            or not _within(done.get(d.partition), d.offset)
        ]

    def advance(self, letters: Sequence[DeadLetter]) -> None:
        """Mark the log positions of `letters` delivered."""
        marks: dict[int, list[int]] = {}
        for d in letters:
            if d.partition is not None and d.offset is not None:
                marks.setdefault(d.partition, []).append(d.offset)
        if not marks:
            return
        if isinstance(self._path, VersionedDocument):
            self._advance_versioned(self._path, marks)
            return
        path = self._path
        with self._locked():
            done = self.delivered()
            for p, offsets in marks.items():
                done[p] = _merged(done.get(p, []), offsets)
            data = orjson.dumps({str(p): spans for p, spans in sorted(done.items())})
            replace_file(path, lambda tmp: tmp.write_bytes(data))

    def _advance_versioned(self, doc: VersionedDocument, marks: dict[int, list[int]]) -> None:
        """Merge `marks` into the newest version; on a conflict, merge into the newer one."""
        while True:
            version, done = self._read()
            for p, offsets in marks.items():
                done[p] = _merged(done.get(p, []), offsets)
            if doc.commit(version, orjson.dumps({str(p): s for p, s in sorted(done.items())})):
                return

    @contextmanager
    def _locked(self) -> Iterator[None]:
        assert isinstance(self._path, Path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def sent_offsets(warehouse: str | Path, source: str) -> SentOffsets:
    """The source's record of dead letters confirmed in Kafka, in its warehouse."""
    store = open_store(warehouse)
    if isinstance(store, LocalStore):
        return SentOffsets(store.path(f"{source}/{DEAD_LETTER_DIR}/{PROGRESS}.json"))
    return SentOffsets(VersionedDocument(store, f"{source}/{DEAD_LETTER_DIR}/{PROGRESS}"))


def _within(spans: list[tuple[int, int]] | None, offset: int) -> bool:
    if not spans:
        return False
    i = bisect.bisect_right(spans, (offset, math.inf)) - 1
    return i >= 0 and spans[i][0] <= offset <= spans[i][1]


def _merged(spans: list[tuple[int, int]], offsets: list[int]) -> list[tuple[int, int]]:
    """`spans` plus `offsets`, as sorted, disjoint, non-adjacent inclusive ranges."""
    out: list[tuple[int, int]] = []
    for a, b in sorted([*spans, *((o, o) for o in offsets)]):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


__all__ = [
    "DEAD_LETTER_DIR",
    "DeadLetterSink",
    "FileDeadLetterSink",
    "SentOffsets",
    "read_dead_letters",
    "sent_offsets",
    "write_dead_letters",
]
