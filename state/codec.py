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

import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from state import sketches
from state.errors import CorruptStateError, FormatVersionError
from state.layout import HopGroup, ViewLayout
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


BLOB_HEADER_SIZE = _HEAD.size


def blob_header(layout: ViewLayout, blob: bytes) -> int:
    """A blob's newest event time, from its header (format byte, newest time).

    Raises:
        CorruptStateError: the blob is too short to hold a header.
        FormatVersionError: the blob is of another value format.
    """
    try:
        version, newest = _HEAD.unpack_from(blob, 0)
    except struct.error as exc:
        raise CorruptStateError(
            f"view {layout.view!r}: damaged tile blob ({len(blob)} bytes is too short for its "
            "header); rebuild the view with flows.replay"
        ) from exc
    if version != VALUE_FORMAT:
        raise FormatVersionError(
            f"view {layout.view!r}: tile blob format {version}, this code "
            f"reads format {VALUE_FORMAT}; rebuild the view with flows.replay"
        )
    return int(newest)


def entity_newest(blob: bytes) -> int:
    """The newest event time of an entity, from its blob's header alone."""
    return int(_HEAD.unpack_from(blob, 0)[1])


def decode_words(layout: ViewLayout, blob: bytes) -> tuple[list[tuple[Words, dict[str, Any]]], int]:
    """The entity's tile rows per hop group as (n, width) word views (no copy), and its newest
    event time."""
    newest = blob_header(layout, blob)
    pos = BLOB_HEADER_SIZE
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
    return groups, newest


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


# -- The write path's batched form: every touched key's blob decoded and encoded at once ------
#
# Same bytes as `decode_words`/`encode_words`, one NumPy pass per hop group instead of a Python
# loop per key. Stored summaries (KLL, HLL, last-k) stay undecoded: each is its stored bytes (a
# type no raw event value has: bytes columns cannot be aggregated), which `state.sketches`
# decodes only when a merge needs it and writes back unchanged otherwise.

I64 = npt.NDArray[np.int64]
INT64_MIN = int(np.iinfo(np.int64).min)


class _IrregularBlobError(Exception):
    """A blob the batched decoder cannot walk; the per-blob decoder says why (or reads it)."""


@dataclass(frozen=True, slots=True)
class StoredEntries:
    """A summary field's entries of stored rows, left in the blobs' bytes: row i's entry
    (u32 length + bytes) is buf[start[i]:end[i]]."""

    buf: bytes
    start: I64
    end: I64

    def items(self, rows: I64) -> npt.NDArray[np.object_]:
        """The stored bytes of `rows` (None for an empty entry)."""
        buf = self.buf
        spans = zip((self.start[rows] + 4).tolist(), self.end[rows].tolist(), strict=True)
        return _object_array([buf[a:z] if z > a else None for a, z in spans])

    def span(self, first: int, last: int) -> bytes:
        """The entries of rows first..last (inclusive), as they are stored."""
        return self.buf[int(self.start[first]) : int(self.end[last])]


@dataclass(frozen=True, slots=True)
class StoredGroup:
    """One hop group's tiles of many keys: rows in key order (`counts[k]` rows of key k), their
    object stats (summaries as their stored bytes) and vectors.

    Decoded with `lazy`, summary fields are in `entries` instead of `objs`. Decoded, `dims[f]`
    is each key's stored vector length of vector field f (0: none yet). For encoding,
    `leading[f][k]` may hold the stored entries of key k's first `leading_rows[k]` rows of
    summary field f, written as they are (the rows' `objs[f]` items are then ignored)."""

    words: Words
    objs: dict[str, Any]
    counts: I64
    entries: dict[str, StoredEntries] = field(default_factory=dict)
    leading: dict[str, list[bytes]] = field(default_factory=dict)
    leading_rows: I64 | None = None
    dims: dict[str, I64] = field(default_factory=dict)


def decode_many(
    layout: ViewLayout, blobs: Sequence[bytes | None], lazy: bool = False
) -> tuple[list[StoredGroup], I64] | None:
    """The stored tiles of many keys per hop group (None blobs: keys without tiles) and each
    key's newest event time (INT64_MIN without a blob); None when a blob is not regular
    (the per-blob `decode_words` then reads it or says what is wrong). With `lazy`, summary
    fields stay in the blobs' bytes (`StoredGroup.entries`)."""
    present = np.asarray([i for i, b in enumerate(blobs) if b is not None], dtype=np.int64)
    newest = np.full(len(blobs), INT64_MIN, dtype=np.int64)
    if not len(present):
        empty = [_empty_group(layout, g, len(blobs)) for g in range(len(layout.groups))]
        return empty, newest
    try:
        walk = _BlobWalk(layout, [b for b in blobs if b is not None], lazy)
        groups, stored_newest = walk.run()
    except (_IrregularBlobError, IndexError, ValueError, orjson.JSONDecodeError):
        return None
    newest[present] = stored_newest
    return [_spread(g, present, len(blobs)) for g in groups], newest


def _empty_group(layout: ViewLayout, gi: int, n_keys: int) -> StoredGroup:
    group = layout.groups[gi]
    width = len(group.dtype.names or ())
    objs: dict[str, Any] = {f: np.empty(0, dtype=object) for f in group.object_fields}
    objs.update((f, np.zeros((0, 0))) for f in group.vector_fields)
    dims = {f: np.zeros(n_keys, np.int64) for f in group.vector_fields}
    return StoredGroup(np.zeros((0, width), np.int64), objs, np.zeros(n_keys, np.int64), dims=dims)


def _spread(group: StoredGroup, present: I64, n_keys: int) -> StoredGroup:
    """`group` of the keys with a blob, for every key (the others without rows)."""
    counts = np.zeros(n_keys, dtype=np.int64)
    counts[present] = group.counts
    dims = {f: np.zeros(n_keys, dtype=np.int64) for f in group.dims}
    for f, d in group.dims.items():
        dims[f][present] = d
    return StoredGroup(group.words, group.objs, counts, group.entries, dims=dims)


def _unaligned(buf: bytes | bytearray, dtype: str) -> npt.NDArray[Any]:
    """The `dtype` value starting at every byte of `buf` (index = byte position): a view with a
    one-byte stride, so a gather (or, on a bytearray, a scatter) of values at any positions is
    one indexing call, no copy."""
    size = np.dtype(dtype).itemsize
    count = max(len(buf) - size + 1, 0)
    if not count:
        return np.zeros(0, dtype=dtype)
    return np.ndarray((count,), dtype=dtype, buffer=buf, strides=(1,))


# Arrow's binary view (pa.binary_view()): a 16-byte view per value, values of up to 12 bytes
# held in the view itself, longer ones as a prefix, a buffer index and an offset into it.
_BINARY_VIEW = np.dtype(
    [("length", "<i4"), ("prefix", "<u4"), ("buffer", "<i4"), ("offset", "<i4")]
)
_VIEW_INLINE = 12
_VIEW_LIMIT = 2**31 - 1  # a view's offset is an int32: larger joined blobs are indexed instead


class _BlobWalk:
    """Walks the blobs of a batch side by side, one section of every blob per step."""

    def __init__(self, layout: ViewLayout, blobs: list[bytes], lazy: bool) -> None:
        self.layout, self.lazy = layout, lazy
        self.entries: dict[str, StoredEntries] = {}
        lengths = np.fromiter((len(b) for b in blobs), dtype=np.int64, count=len(blobs))
        self.buf = b"".join(blobs)
        self.ends = np.cumsum(lengths)
        self.pos = self.ends - lengths
        self.w4, self.w8 = _unaligned(self.buf, "<u4"), _unaligned(self.buf, "<i8")

    def u32(self, pos: I64) -> I64:
        return self.w4[pos].astype(np.int64)

    def i64(self, pos: I64) -> I64:
        return self.w8[pos]

    def run(self) -> tuple[list[StoredGroup], I64]:
        heads = np.frombuffer(self.buf, dtype=np.uint8)
        if len(self.buf) < 9 * len(self.pos) or (heads[self.pos] != VALUE_FORMAT).any():
            raise _IrregularBlobError
        newest = self.i64(self.pos + 1)
        self.pos = self.pos + _HEAD.size
        groups = [self.group(g) for g in self.layout.groups]
        if (self.pos != self.ends).any():
            raise _IrregularBlobError
        return groups, newest

    def group(self, group: HopGroup) -> StoredGroup:
        n = self.u32(self.pos)
        width = len(group.dtype.names or ())
        base = self.pos + 4
        self.pos = base + n * width * 8
        if (self.pos > self.ends).any():
            raise _IrregularBlobError
        firsts = np.cumsum(n) - n
        words = np.empty((int(n.sum()), width), dtype=np.int64)
        for a in range(0, len(n), ENCODE_CHUNK):  # keys a chunk at a time: bounded temporaries
            keys = np.arange(a, min(a + ENCODE_CHUNK, len(n)))
            rows = slice(firsts[a], firsts[a] + int(n[keys].sum()))
            if len(self.buf) < _VIEW_LIMIT:
                words[rows] = self.columns(base[keys], n[keys], width).T
                continue
            key = np.repeat(keys, n[keys])
            row = np.arange(len(key)) + (firsts[a] - firsts[key])
            at, step = base[key] + row * 8, n[key] * 8  # column j of a row: at + j * step
            for j in range(width):
                words[rows, j] = self.i64(at + j * step)
        objs: dict[str, Any] = {}
        self.entries = {}
        if group.object_fields:
            objs = self.objects(group.object_fields, n, firsts)
        dims: dict[str, I64] = {}
        if group.vector_fields:
            key = np.repeat(np.arange(len(n)), n)
            row = np.arange(len(key)) - firsts[key]
            for f in group.vector_fields:
                dims[f] = self.u32(self.pos)
                objs[f] = self.vectors(n, key, row)
        return StoredGroup(words, objs, n, self.entries, dims=dims)

    def columns(self, base: I64, n: I64, width: int) -> npt.NDArray[np.int64]:
        """The rows of keys whose sections start at `base` (n[k] rows of `width` words, stored
        column-major) as a (width, rows) array: column j of every key, then column j + 1.
        Each key's column is one byte range of the joined blobs; Arrow copies the ranges one
        after the other (a binary view array over the blobs, cast to binary: one memcpy per
        range, where indexing copies word by word; 25k keys of 2.7 kB, 2.3x faster)."""
        has = np.flatnonzero(n)
        nh, bh = n[has], base[has]
        if not len(has):
            return np.zeros((width, 0), dtype=np.int64)
        starts = (bh + 8 * nh * np.arange(width)[:, None]).reshape(-1)
        lengths = np.tile(8 * nh, width)
        views = np.zeros(len(starts), dtype=_BINARY_VIEW)
        views["length"], views["prefix"], views["offset"] = lengths, self.w4[starts], starts
        short = np.flatnonzero(lengths <= _VIEW_INLINE)
        if len(short):  # a one-row column (8 bytes) is held in its view: bytes 4-11, then zeros
            raw = views.view(np.uint8).reshape(-1, 16)
            raw[short, 4:] = 0
            raw[short, 4:12] = self.w8[starts[short]].astype("<i8").view(np.uint8).reshape(-1, 8)
        spans = pa.Array.from_buffers(
            pa.binary_view(), len(views), [None, pa.py_buffer(views), pa.py_buffer(self.buf)]
        )
        joined = spans.cast(pa.binary()).buffers()[2]
        flat = np.frombuffer(joined, dtype="<i8", count=int(lengths.sum()) // 8)
        return flat.reshape(width, -1)

    def objects(self, fields: tuple[str, ...], n: I64, firsts: I64) -> dict[str, Any]:
        end = self.pos + 4 + self.u32(self.pos)
        doc_len = self.u32(self.pos + 4)
        doc_at = self.pos + 8
        buf = self.buf
        docs = [buf[a:b] for a, b in zip(doc_at.tolist(), (doc_at + doc_len).tolist(), strict=True)]
        loaded = orjson.loads(b"[" + b",".join(docs) + b"]")
        self.pos = doc_at + doc_len
        objs: dict[str, Any] = {}
        for f in fields:
            if _summary_kind(f) is None:
                objs[f] = _object_array([v for d in loaded for v in d[f]])
            else:
                self.entries[f] = self.summaries(n, firsts)
                if not self.lazy:
                    objs[f] = self.entries.pop(f).items(np.arange(int(n.sum())))
            if len(objs[f] if f in objs else self.entries[f].start) != int(n.sum()):
                raise _IrregularBlobError
        if (self.pos != end).any():
            raise _IrregularBlobError
        return objs

    def summaries(self, n: I64, firsts: I64) -> StoredEntries:
        """One summary field of every key: n entries of u32 length + bytes, walked for all
        keys at once (entry i of every key per step)."""
        total = int(n.sum())
        at, size = np.zeros(total, np.int64), np.zeros(total, np.int64)
        live, i = np.flatnonzero(n > 0), 0
        while len(live):
            length = self.u32(self.pos[live])
            at[firsts[live] + i], size[firsts[live] + i] = self.pos[live] + 4, length
            self.pos[live] += 4 + length
            i += 1
            live = live[n[live] > i]
        return StoredEntries(self.buf, at - 4, at + size)

    def vectors(self, n: I64, key: I64, row: I64) -> npt.NDArray[np.float64]:
        dim = self.u32(self.pos)
        width = int(dim.max()) if len(dim) else 0
        out = np.zeros((len(key), width), dtype=np.float64)
        if width:
            cells = np.arange(width)[None, :] < dim[key][:, None]
            at = (
                self.pos[key][:, None]
                + 4
                + (row[:, None] * dim[key][:, None] + np.arange(width)) * 8
            )
            out[cells] = self.i64(at[cells]).view(np.float64)
        self.pos = self.pos + 4 + 8 * n * dim
        if (self.pos > self.ends).any():
            raise _IrregularBlobError
        return out


def encode_many(
    layout: ViewLayout,
    groups: Sequence[StoredGroup],
    newest: I64,
    dims: dict[str, I64] | None = None,
) -> list[bytes]:
    """The blobs of many keys (key order), byte for byte what `encode_words` writes for each;
    `dims`: per vector column, each key's vector length (vectors cut or zero-padded to it)."""
    blobs: list[bytes] = []
    firsts = [np.concatenate([[0], np.cumsum(g.counts)]) for g in groups]
    for a in range(0, len(newest), ENCODE_CHUNK):  # bounded temporaries on a replay's batch
        z = min(a + ENCODE_CHUNK, len(newest))
        part = [
            _key_range(g, a, z, int(f[a]), int(f[z])) for g, f in zip(groups, firsts, strict=True)
        ]
        own_dims = {c: v[a:z] for c, v in (dims or {}).items()}
        blobs += _encode_chunk(layout, part, newest[a:z], own_dims)
    return blobs


ENCODE_CHUNK = 16_384  # keys encoded together


def _key_range(group: StoredGroup, a: int, z: int, first: int, last: int) -> StoredGroup:
    """Keys a..z-1 of a group (their rows first..last-1)."""
    lead = group.leading_rows
    return StoredGroup(
        group.words[first:last],
        {f: v[first:last] for f, v in group.objs.items()},
        group.counts[a:z],
        leading={f: v[a:z] for f, v in group.leading.items()},
        leading_rows=None if lead is None else lead[a:z],
    )


def _encode_chunk(
    layout: ViewLayout, groups: list[StoredGroup], newest: I64, dims: dict[str, I64]
) -> list[bytes]:
    """The blobs of a chunk of keys: every key's parts (its head; per group its row count,
    each column's rows, its object section, its vectors) as binary arrays, one value per key,
    most of them zero-copy over one buffer per part, joined key by key by Arrow
    (`binary_join_element_wise`): one memcpy per part, where a scatter of every word into
    place copied word by word (25k keys of 2.7 kB of plain tiles: 3.1x faster)."""
    n_keys = len(newest)
    heads = np.zeros(n_keys, dtype=[("v", "u1"), ("t", "<i8")])
    heads["v"], heads["t"] = VALUE_FORMAT, newest
    parts = [_binary(heads, np.full(n_keys, _HEAD.size))]
    for group, g in zip(layout.groups, groups, strict=True):
        parts += _group_parts(group, g, dims)
    joined = pc.binary_join_element_wise(*parts, _NO_SEPARATOR)
    blobs: list[bytes] = joined.to_pylist()
    return blobs


_NO_SEPARATOR = pa.scalar(b"", pa.large_binary())


def _binary(data: npt.NDArray[Any], sizes: I64) -> pa.Array:
    """`data`'s bytes cut into consecutive values of `sizes` bytes: a large binary array over
    them (no copy of contiguous `data`, which lives as long as the array)."""
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(data))]
    return pa.Array.from_buffers(pa.large_binary(), len(sizes), buffers)


def _group_parts(group: HopGroup, stored: StoredGroup, dims: dict[str, I64]) -> list[pa.Array]:
    """One hop group's section as binary arrays of one part per key each."""
    n = stored.counts
    parts = [_binary(n.astype("<u4"), np.full(len(n), 4))]
    for j in range(len(group.dtype.names or ())):  # column-major: a column's rows, the next's
        parts.append(_binary(np.ascontiguousarray(stored.words[:, j], dtype="<i8"), n * 8))
    if group.object_fields:
        parts += _object_parts(group.object_fields, stored)
    for f in group.vector_fields:
        parts += _vector_parts(f, stored.objs[f], n, dims)
    return parts


def _object_parts(fields: tuple[str, ...], stored: StoredGroup) -> list[pa.Array]:
    """Per key: u32 section length, u32 document length, the document, the summaries."""
    objs, n = stored.objs, stored.counts
    bounds = np.concatenate([[0], np.cumsum(n)]).tolist()
    plain = [(f, objs[f].tolist()) for f in fields if _summary_kind(f) is None]
    docs = [orjson.dumps({f: v[a:z] for f, v in plain}) for a, z in itertools.pairwise(bounds)]
    regions = [_summary_region(f, stored) for f in fields if _summary_kind(f)]
    summaries = (
        regions[0] if len(regions) == 1 else [b"".join(r) for r in zip(*regions, strict=True)]
    )
    if not regions:
        summaries = [b""] * len(docs)
    doc_sizes = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    sum_sizes = np.fromiter(map(len, summaries), dtype=np.int64, count=len(docs))
    sizes = np.stack([4 + doc_sizes + sum_sizes, doc_sizes], axis=1).astype("<u4")
    return [
        _binary(sizes, np.full(len(docs), 8)),
        pa.array(docs, pa.large_binary()),
        pa.array(summaries, pa.large_binary()),
    ]


def _vector_parts(
    field: str, matrix: npt.NDArray[Any], n: I64, dims: dict[str, I64]
) -> list[pa.Array]:
    """Per key: u32 vector length d, then its n rows of d float64 values (the stored rows
    cut to d, or zero-padded to it; d is the matrix's width unless `dims` says otherwise)."""
    own = dims.get(field.rpartition(".")[0])
    d = own if own is not None else np.full(len(n), matrix.shape[1], dtype=np.int64)
    width = int(d.max()) if len(d) else 0
    rows = np.zeros((len(matrix), width), dtype="<f8")
    fit = min(width, matrix.shape[1])
    rows[:, :fit] = matrix[:, :fit]
    d_row = np.repeat(d, n)  # each row's key's length: the row keeps its first d values
    values = rows[np.arange(width)[None, :] < d_row[:, None]]
    return [_binary(d.astype("<u4"), np.full(len(n), 4)), _binary(values, n * d * 8)]


def _summary_region(name: str, stored: StoredGroup) -> list[bytes]:
    """Per key, its entries (u32 length + bytes) of one summary field, interleaved for all rows
    at once; stored bytes (items and `leading` spans alike) are written back as they are."""
    kind = _summary_kind(name) or ""
    n = stored.counts
    lead = stored.leading_rows if name in stored.leading else None
    rows = np.ones(len(stored.objs[name]), dtype=bool)
    if lead is not None:  # rows covered by the leading spans are not encoded again
        rows[_leading_mask(n, lead)] = False
    items = stored.objs[name][rows].tolist()
    raw = [x if isinstance(x, bytes) else sketches.encode(kind, x) for x in items]
    lengths = np.fromiter(map(len, raw), dtype=np.int64, count=len(raw))
    ends = np.cumsum(4 + lengths)
    heads = (ends - 4 - lengths)[:, None] + np.arange(4)
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.uint8)
    out[heads] = lengths.astype("<u4").view(np.uint8).reshape(-1, 4)
    body = np.ones(len(out), dtype=bool)
    body[heads] = False
    out[body] = np.frombuffer(b"".join(raw), dtype=np.uint8)
    region = out.tobytes()
    own = n - (lead if lead is not None else 0)
    at = np.concatenate([[0], ends])[np.concatenate([[0], np.cumsum(own)])].tolist()
    spans = [region[a:z] for a, z in itertools.pairwise(at)]
    if lead is None:
        return spans
    return [a + b for a, b in zip(stored.leading[name], spans, strict=True)]


def _leading_mask(n: I64, lead: I64) -> npt.NDArray[np.bool_]:
    """Which rows (keys' rows in order, `n[k]` per key) are among their key's first lead[k]."""
    firsts = np.cumsum(n) - n
    key = np.repeat(np.arange(len(n)), n)
    return np.asarray((np.arange(int(n.sum())) - firsts[key]) < lead[key])
