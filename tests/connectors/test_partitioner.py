from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectors.partitioner import (
    murmur2,
    murmur2_many,
    partition_for,
    partition_list,
    partitions_for,
)

# Kafka's UtilsTest.testMurmur2
KAFKA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("data", "expected"), KAFKA_VECTORS.items())
def test_murmur2_matches_kafka_test_vectors(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


def test_murmur2_many_matches_kafka_test_vectors() -> None:
    keys = pa.array([k.decode() for k in KAFKA_VECTORS])
    assert murmur2_many(keys).view(np.int32).tolist() == list(KAFKA_VECTORS.values())


def test_partition_for_is_positive_murmur2_modulo_partitions() -> None:
    # -973932308 & 0x7fffffff = 1173551340
    assert partition_for("21", 7) == 1173551340 % 7
    assert all(0 <= partition_for(f"user-{i}", 5) < 5 for i in range(1000))


@given(st.lists(st.text(max_size=40), min_size=1, max_size=60))
def test_vectorized_hash_equals_scalar_hash(keys: list[str]) -> None:
    expected = [murmur2(k.encode()) & 0xFFFFFFFF for k in keys]
    assert murmur2_many(pa.array(keys, pa.string())).tolist() == expected


@given(
    st.lists(st.one_of(st.none(), st.sampled_from(["a", "b", "ü", "long-key-" * 5])), max_size=50),
    st.integers(1, 16),
)
def test_partitions_for_maps_each_row_like_partition_for(
    keys: list[str | None], partitions: int
) -> None:
    result = partitions_for(pa.array(keys, pa.string()), partitions)
    assert result.dtype == np.int32
    assert result.tolist() == [-1 if k is None else partition_for(k, partitions) for k in keys]


def test_partitions_for_accepts_chunked_sliced_and_large_strings() -> None:
    keys = ["k1", "k2", "k3", "k1", "k4"]
    expected = [partition_for(k, 3) for k in keys]
    chunked = pa.chunked_array([keys[:2], keys[2:]], pa.string())
    assert partitions_for(chunked, 3).tolist() == expected
    assert partitions_for(pa.array(["x", *keys]).slice(1), 3).tolist() == expected
    assert partitions_for(pa.array(keys, pa.large_string()), 3).tolist() == expected


def test_partitions_for_refuses_non_string_keys_and_no_partitions() -> None:
    with pytest.raises(TypeError, match="int64"):
        partitions_for(pa.array([1, 2]), 3)
    with pytest.raises(ValueError, match="partitions=0"):
        partitions_for(pa.array(["a"]), 0)


@given(st.lists(st.text(max_size=40), max_size=80), st.integers(1, 12))
def test_partition_list_is_partition_for_of_each_key(keys: list[str], partitions: int) -> None:
    """Below 8 keys one at a time, from 8 compiled: the same partitions."""
    assert partition_list(keys, partitions) == [partition_for(k, partitions) for k in keys]


def test_partition_list_raises_what_encoding_a_key_raises() -> None:
    for n in (1, 7, 8, 40):
        with pytest.raises(UnicodeEncodeError):
            partition_list(["u1"] * (n - 1) + ["\udc80"], 4)


@given(st.lists(st.binary(max_size=40).map(lambda b: b.decode("latin-1")), max_size=40))
def test_the_compiled_hash_is_kafkas_murmur2(keys: list[str]) -> None:
    """Every length's tail (0-3 bytes) and multi-byte UTF-8, through the compiled pass."""
    padded = keys + ["u1"] * 8  # enough keys for the compiled pass
    assert partition_list(padded, 1_000_003) == [partition_for(k, 1_000_003) for k in padded]
