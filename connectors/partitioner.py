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


def partitions_for(keys: pa.Array | pa.ChunkedArray, partitions: int) -> np.ndarray:
    """The partition of every key, as an int32 numpy array; -1 where the key is null.

    Each distinct key is hashed once (dictionary encoding), so the cost follows the number
    of distinct keys, not of rows. A null key has no partition: such rows are bad records.

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
    distinct = encoded.dictionary.to_pylist()
    # One slot past the distinct keys stands for null: its partition is -1.
    lookup = np.fromiter((partition_for(k, partitions) for k in distinct),
                         dtype=np.int32, count=len(distinct))
    lookup = np.append(lookup, np.int32(-1))
    indices = encoded.indices.fill_null(len(distinct)).to_numpy()
    return lookup[indices]
