"""Key and value codecs of the view store (on-disk format, versioned).

Keys: b"k" + UTF-8 entity key for tiles; b"m" + name for metadata (applied offset, watermark):
b"mapplied_offset" / b"mwatermark" for the shard's own source partition, and
b"mapplied_offset/" / b"mwatermark/" + u32 big-endian partition for records routed to the shard
from other partitions (a producer that did not partition by the entity key).
Values: one blob per entity holding every hop group's tiles, so a read is one RocksDB get:

    u8  format version (VALUE_FORMAT)
    i64 newest event time of the entity (µs)
    per hop group, in layout order:
        u32 row count n
        the tile rows column-major: for each field of HopGroup.dtype, n little-endian 8-byte
            values (so a read slices one column without touching the others)
        if the group has object-valued stats: u32 section length, then
            u32 length + orjson object {field: [values...]} of plain values (first/last of
            strings and booleans), then per summary field (KLL, HLL, last-k) n entries of
            u32 length + bytes (length 0 = none)
        if the group aggregates vector columns, per field of HopGroup.vector_fields in order
            (`<column>.vsum`, `.vfirst`, `.vlast`): u32 length d of the entity's vectors (0
            while it has none), then the n x d little-endian float64 values row-major (each
            tile's vector contiguous, so a window's sum is one reduction over a 2-D slice)

A layout without vector columns has no vector section, so VALUE_FORMAT stays 1 for every view
this code could already read.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from state import sketches
from state.errors import CorruptStateError, FormatVersionError
from state.layout import ViewLayout
from state.tiles import TileBlock

VALUE_FORMAT = 1
_HEAD = struct.Struct("<Bq")
_U32 = struct.Struct("<I")
_I64 = struct.Struct(">q")  # metadata integers: big-endian, like keys

ENTITY_PREFIX = b"k"
META_PREFIX = b"m"
APPLIED_OFFSET = META_PREFIX + b"applied_offset"
WATERMARK = META_PREFIX + b"watermark"
EVENTS_APPLIED = META_PREFIX + b"events_applied"
LATE_EVENTS = META_PREFIX + b"late_events"
# A view shard's position in another source partition than its own (records routed to it from
# a partition other than the one its keys hash to): the prefix, then the partition, big-endian.
FOREIGN_OFFSET = META_PREFIX + b"applied_offset/"
FOREIGN_WATERMARK = META_PREFIX + b"watermark/"
_U32_BE = struct.Struct(">I")


def foreign_key(prefix: bytes, partition: int) -> bytes:
    """The metadata key of a shard's applied offset or watermark in source partition `partition`."""
    return prefix + _U32_BE.pack(partition)


def foreign_partition(raw: bytes, prefix: bytes) -> int:
    return int(_U32_BE.unpack(raw[len(prefix) :])[0])


KEY_SEPARATOR = "\x1f"  # between the parts of a composite key's text (ASCII unit separator)


def key_text(parts: Sequence[object]) -> str:
    """The text of an entity key: a single part as its text (an integer as its decimal digits),
    the parts of a composite key escaped and joined by KEY_SEPARATOR. murmur2 of its UTF-8 bytes
    picks the key's shard; b"k" + those bytes is its RocksDB key. The write path builds the same
    text column-wise (flows.keys.key_column); tests hold the two equal."""
    if len(parts) == 1:
        return _part_text(parts[0])
    return KEY_SEPARATOR.join(
        _part_text(p).replace("\\", "\\\\").replace(KEY_SEPARATOR, "\\u001f") for p in parts
    )


def _part_text(part: object) -> str:
    if isinstance(part, bool):
        return "true" if part else "false"
    return part if isinstance(part, str) else str(part)


def encode_key(key: str) -> bytes:
    return ENTITY_PREFIX + key.encode("utf-8")


def decode_key(raw: bytes) -> str:
    return raw[len(ENTITY_PREFIX) :].decode("utf-8")


def encode_int(value: int) -> bytes:
    return _I64.pack(value)


def decode_int(raw: bytes) -> int:
    return int(_I64.unpack(raw)[0])


Words = npt.NDArray[np.int64]  # tile rows as an (n, width) array of 8-byte words


def encode_entity(layout: ViewLayout, blocks: list[TileBlock], newest_ts: int) -> bytes:
    """One entity's blob from its tiles per hop group (vectors cut to the tiles' length)."""
    groups = []
    for group, block in zip(layout.groups, blocks, strict=True):
        width = len(group.dtype.names or ())
        rows = block.rows if block.rows.flags.c_contiguous else np.ascontiguousarray(block.rows)
        objs = dict(block.objs)
        for col in group.columns:
            dim = int(rows[f"{col.column}.dim"].max()) if col.vector and len(rows) else 0
            objs.update((f, objs[f][:, :dim]) for f in col.vector_stats)
        groups.append((rows.view(np.int64).reshape(len(rows), width), objs))
    return encode_words(layout, groups, newest_ts)


def encode_words(
    layout: ViewLayout, groups: list[tuple[Words, dict[str, Any]]], newest_ts: int
) -> bytes:
    """One entity's blob from its tile rows as word arrays (the write path's fast form)."""
    parts = [_HEAD.pack(VALUE_FORMAT, newest_ts)]
    for group, (words, objs) in zip(layout.groups, groups, strict=True):
        parts.append(_U32.pack(len(words)))
        parts.append(words.T.tobytes())
        if group.object_fields:
            section = b"".join(_encode_objects(group.object_fields, objs))
            parts.append(_U32.pack(len(section)))
            parts.append(section)
        for f in group.vector_fields:
            matrix = np.ascontiguousarray(objs[f], dtype="<f8")
            parts.append(_U32.pack(matrix.shape[1]))
            parts.append(matrix.tobytes())
    return b"".join(parts)


def entity_newest(blob: bytes) -> int:
    """The newest event time of an entity, from its blob's header alone."""
    return int(_HEAD.unpack_from(blob, 0)[1])


def decode_entity(layout: ViewLayout, blob: bytes) -> tuple[list[TileBlock], int]:
    """The entity's tiles per hop group and its newest event time."""
    groups, newest = decode_words(layout, blob)
    blocks = [
        TileBlock(np.ascontiguousarray(words).view(group.dtype).reshape(len(words)), objs)
        for group, (words, objs) in zip(layout.groups, groups, strict=True)
    ]
    return blocks, newest


def decode_words(layout: ViewLayout, blob: bytes) -> tuple[list[tuple[Words, dict[str, Any]]], int]:
    """The entity's tile rows per hop group as (n, width) word views (no copy), and its newest
    event time."""
    try:
        version, newest = _HEAD.unpack_from(blob, 0)
    except struct.error as exc:
        raise CorruptStateError(
            f"view {layout.view!r}: value of {len(blob)} bytes is too short "
            "to be a tile blob; rebuild the view with flows.replay"
        ) from exc
    if version != VALUE_FORMAT:
        raise FormatVersionError(
            f"view {layout.view!r}: tile blob format {version}, this code "
            f"reads format {VALUE_FORMAT}; rebuild the view with flows.replay"
        )
    pos = _HEAD.size
    groups: list[tuple[Words, dict[str, Any]]] = []
    try:
        for group in layout.groups:
            (n,) = _U32.unpack_from(blob, pos)
            width = len(group.dtype.names or ())
            columns = np.frombuffer(blob, dtype=np.int64, count=n * width, offset=pos + 4)
            pos += 4 + n * width * 8
            objs: dict[str, Any] = {}
            if group.object_fields:
                objs, pos = decode_objects(group.object_fields, blob, pos + 4, n)
            for f in group.vector_fields:
                objs[f], pos = decode_vectors(blob, pos, n)
            groups.append((columns.reshape(width, n).T, objs))
    except (struct.error, ValueError, KeyError, orjson.JSONDecodeError) as exc:
        raise CorruptStateError(
            f"view {layout.view!r}: tile blob is damaged ({exc}); rebuild "
            "the view with flows.replay"
        ) from exc
    return groups, int(newest)


def decode_vectors(blob: bytes, pos: int, n: int) -> tuple[npt.NDArray[np.float64], int]:
    """One vector field of a group: its (n, d) matrix (no copy) and the position after it."""
    (dim,) = _U32.unpack_from(blob, pos)
    pos += 4
    if pos + 8 * n * dim > len(blob):
        raise ValueError(f"vector section of {n} x {dim} values runs past the blob's end")
    matrix = np.frombuffer(blob, dtype="<f8", count=n * dim, offset=pos).reshape(n, dim)
    return matrix, pos + 8 * n * dim


def vector_lengths(layout: ViewLayout, blob: bytes) -> dict[str, int]:
    """The length of an entity's stored vectors per vector column (0: none yet), read by
    walking the blob's sections without decoding them."""
    lengths: dict[str, int] = {}
    pos = _HEAD.size
    for group in layout.groups:
        (n,) = _U32.unpack_from(blob, pos)
        pos += 4 + 8 * n * len(group.dtype.names or ())
        if group.object_fields:
            pos += 4 + _U32.unpack_from(blob, pos)[0]
        for f in group.vector_fields:
            (dim,) = _U32.unpack_from(blob, pos)
            column = f.rpartition(".")[0]
            lengths[column] = max(lengths.get(column, 0), dim)
            pos += 4 + 8 * n * dim
    return lengths


def _summary_kind(field: str) -> str | None:
    kind = field.rpartition(".")[2]
    return kind if kind in ("kll", "hll", "lastk") else None


def _encode_objects(fields: tuple[str, ...], objs: dict[str, Any]) -> list[bytes]:
    """Plain values (first/last of strings, booleans) as one orjson document; summaries as
    length-prefixed bytes (u32 length, 0 = none) per tile row."""
    plain = {f: objs[f].tolist() for f in fields if _summary_kind(f) is None}
    doc = orjson.dumps(plain)
    parts = [_U32.pack(len(doc)), doc]
    for f in fields:
        kind = _summary_kind(f)
        if kind is None:
            continue
        for item in objs[f].tolist():
            raw = sketches.encode(kind, item)
            parts.append(_U32.pack(len(raw)))
            parts.append(raw)
    return parts


def decode_objects(
    fields: tuple[str, ...], blob: bytes, pos: int, n: int
) -> tuple[dict[str, Any], int]:
    (size,) = _U32.unpack_from(blob, pos)
    pos += 4
    loaded = orjson.loads(blob[pos : pos + size])
    pos += size
    objs: dict[str, Any] = {}
    for f in fields:
        kind = _summary_kind(f)
        if kind is None:
            objs[f] = _object_array(loaded[f])
            continue
        items = []
        for _ in range(n):
            (length,) = _U32.unpack_from(blob, pos)
            pos += 4
            items.append(sketches.decode(kind, blob[pos : pos + length]))
            pos += length
        objs[f] = _object_array(items)
    return objs, pos


def _object_array(values: list[Any]) -> np.ndarray[Any, np.dtype[np.object_]]:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
