"""Kafka's default partitioner, so that warehouse ingest puts every key in the partition Kafka
would: murmur2 of the key's UTF-8 bytes, as in Java's `Utils.murmur2` and librdkafka's
`murmur2_random` partitioner for non-null keys."""

from __future__ import annotations

import struct

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK32 = 0xFFFFFFFF
_WORDS = [struct.Struct(f"<{n}I") for n in range(64)]
LONG_KEY_BYTES = 1024


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash of `data` as a signed 32-bit int (Java `Utils.murmur2`)."""
    m, mask = _M, _MASK32
    length = len(data)
    h = (_SEED ^ length) & mask
    n_words = length >> 2
    words = _WORDS[n_words] if n_words < 64 else struct.Struct(f"<{n_words}I")
    for k in words.unpack_from(data):
        k = (k * m) & mask
        k = ((k ^ (k >> 24)) * m) & mask
        h = ((h * m) & mask) ^ k
    tail = length & 3
    if tail:
        i = length - tail
        if tail == 3:
            h ^= data[i + 2] << 16
        if tail >= 2:
            h ^= data[i + 1] << 8
        h = ((h ^ data[i]) * m) & mask
    h = ((h ^ (h >> 13)) * m) & mask
    h ^= h >> 15
    return h - 0x100000000 if h & 0x80000000 else h


def partition_for(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives `key` among `partitions` partitions."""
    return (murmur2(key.encode("utf-8")) & 0x7FFFFFFF) % partitions


_COMPILED_FROM = 8  # keys from which the compiled hash beats a Python loop (100 keys: 7 us vs 90)


def partition_list(keys: list[str], partitions: int) -> list[int]:
    """`partition_for` of each key of a list (a read's keys): from `_COMPILED_FROM` keys in
    one compiled pass over their UTF-8 bytes (`connectors.murmur2_compiled`), one at a time
    below."""
    if len(keys) >= _COMPILED_FROM:
        try:
            arr = pa.array(keys, pa.string())
        except (pa.ArrowException, UnicodeEncodeError):
            pass  # e.g. a lone surrogate: the loop raises what encoding one key raises
        else:
            from connectors.murmur2_compiled import partitions_of

            _, offsets, data = arr.buffers()
            chars = np.zeros(0, np.uint8) if data is None else np.frombuffer(data, np.uint8)
            starts = np.frombuffer(offsets, np.int32, len(keys) + 1).astype(np.int64)
            found: list[int] = partitions_of(chars, starts, partitions).tolist()
            return found
    return [partition_for(key, partitions) for key in keys]


def partitions_for(keys: pa.Array | pa.ChunkedArray, partitions: int) -> np.ndarray:
    """The partition of every key, as an int32 numpy array; -1 where the key is null.

    Each distinct key is hashed once (dictionary encoding), so the cost follows the number
    of distinct keys, not of rows. A null key has no partition: such rows are bad records.

    Raises:
        TypeError: `keys` is not a string array.
        ValueError: `partitions` is not positive.
    """
    return partitions_and_codes(keys, partitions)[0]


def partitions_and_codes(
    keys: pa.Array | pa.ChunkedArray, partitions: int
) -> tuple[np.ndarray, pa.DictionaryArray]:
    """`partitions_for`, and the dictionary encoding of `keys` it hashed (for a caller that
    numbers the keys too: encoding millions of strings twice costs ~40 ms per million).

    Raises:
        TypeError: `keys` is not a string array.
        ValueError: `partitions` is not positive.
    """
    if partitions < 1:
        raise ValueError(f"partitions={partitions}: a source needs at least one partition")
    if not (pa.types.is_string(keys.type) or pa.types.is_large_string(keys.type)):
        raise TypeError(f"keys have type {keys.type}; cast the entity key column to string first")
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks() if keys.num_chunks != 1 else keys.chunk(0)
    encoded = pc.dictionary_encode(keys)
    hashes = murmur2_many(encoded.dictionary)
    # One slot past the distinct keys stands for null: its partition is -1.
    lookup = np.append((hashes & 0x7FFFFFFF) % partitions, -1).astype(np.int32)
    indices = encoded.indices.fill_null(len(hashes)).to_numpy()
    partitions_of_rows: np.ndarray = lookup[indices]
    return partitions_of_rows, encoded


def murmur2_many(keys: pa.Array) -> np.ndarray:
    """murmur2 of every UTF-8 string in `keys` (no nulls), vectorized; uint32 (unsigned) hashes.

    The vectorized loop runs once per 4-byte word of the longest key, so keys longer than
    LONG_KEY_BYTES are hashed one at a time instead (a 5 MB key: 0.2 s, not 12 s)."""
    data, starts, lengths = _string_buffers(keys)
    long = np.flatnonzero(lengths > LONG_KEY_BYTES)
    if len(long) == 0:
        return _murmur2_vectorized(data, starts, lengths)
    hashes = np.empty(len(lengths), dtype=np.uint32)
    short = np.flatnonzero(lengths <= LONG_KEY_BYTES)
    hashes[short] = _murmur2_vectorized(data, starts[short], lengths[short])
    for i in long.tolist():
        hashes[i] = murmur2(keys[i].as_py().encode("utf-8")) & _MASK32
    return hashes


def _murmur2_vectorized(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    # Work in order of decreasing word count, so the keys still hashing words form a prefix.
    order = np.argsort(-(lengths >> 2), kind="stable")
    starts, lengths = starts[order], lengths[order]
    n_words = lengths >> 2
    m = np.uint32(_M)
    h = lengths.astype(np.uint32) ^ np.uint32(_SEED)
    for j in range(int(n_words[0]) if len(n_words) else 0):
        n = len(n_words) - int(np.searchsorted(n_words[::-1], j, side="right"))
        at = starts[:n] + 4 * j
        k = data[at] | data[at + 1] << 8 | data[at + 2] << 16 | data[at + 3] << 24
        k *= m
        k ^= k >> 24
        k *= m
        h[:n] = (h[:n] * m) ^ k
    hashes = np.empty_like(h)
    hashes[order] = _mix_tail(h, data, starts + (n_words << 2), lengths & 3)
    return hashes


def _mix_tail(h: np.ndarray, data: np.ndarray, tail_at: np.ndarray, tail: np.ndarray) -> np.ndarray:
    m = np.uint32(_M)
    for size, shift in ((3, 16), (2, 8), (1, 0)):
        rows = np.nonzero(tail >= size)[0]
        h[rows] ^= data[tail_at[rows] + size - 1] << shift
    rows = np.nonzero(tail > 0)[0]
    h[rows] *= m
    h ^= h >> 13
    h *= m
    h ^= h >> 15
    return h


def _string_buffers(keys: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The UTF-8 bytes (as uint32, for shifting), start positions and byte lengths of `keys`."""
    offset_type = np.int64 if pa.types.is_large_string(keys.type) else np.int32
    _, offsets_buf, data_buf = keys.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=offset_type)
    offsets = offsets[keys.offset : keys.offset + len(keys) + 1].astype(np.int64)
    data = np.zeros(0, np.uint8) if data_buf is None else np.frombuffer(data_buf, dtype=np.uint8)
    return data.astype(np.uint32), offsets[:-1], np.diff(offsets)
