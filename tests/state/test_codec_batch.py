"""The write path's batched blob codec (`state.codec.decode_many`/`encode_many`) against the
per-blob reference (`decode_words`/`encode_words`): same tiles, same bytes, the same errors for a
damaged blob, and stored summaries written back untouched unless a merge needs them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from flows.aggregate import _event_order, apply_batch
from flows.spec import (
    FeatureView,
    Source,
    count,
    distinct_count,
    first,
    last,
    last_k,
    mean,
    percentile,
    sum,
)
from state import codec, sketches
from state.codec import (
    StoredGroup,
    decode_many,
    decode_words,
    encode_key,
    encode_many,
    encode_words,
)
from state.errors import CorruptStateError
from state.layout import ViewLayout
from state.read import evaluate_blob
from state.store import PartitionProgress

MINUTE = 60_000_000
SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "E",
    "fields": [
        {"name": "k", "type": "string"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "x", "type": ["null", "double"], "default": None},
        {"name": "s", "type": ["null", "string"], "default": None},
        {"name": "v", "type": ["null", {"type": "array", "items": "double"}], "default": None},
    ],
}
LAYOUT: ViewLayout = FeatureView(
    name="b",
    source=Source("e", SCHEMA, "k", "ts"),
    features=[
        count(window="10m"),
        sum("x", window="1h", hop="5m"),
        percentile("x", 0.5, window="1h", hop="5m"),
        distinct_count("s", window="1h", hop="5m"),
        last_k("s", 3, window="1d"),
        first("s", window="1d"),
        last("s"),
        mean("v", window="1d"),
    ],
).layout()


def events(seed: int, n: int, offset: int, minute: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 40, n)
    ts = (minute + np.sort(rng.integers(0, 30, n))) * MINUTE + rng.integers(0, MINUTE, n)
    x = [None if i % 7 == 0 else float(v) for i, v in enumerate(rng.normal(0, 10, n))]
    s = [None if i % 5 == 0 else f"s{v}" for i, v in enumerate(rng.integers(0, 9, n))]
    v = [None if i % 4 == 0 else [float(i), 1.0] for i in range(n)]
    return pa.table(
        {
            "k": [f"key{k}" for k in keys],
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "x": pa.array(x, pa.float64()),
            "s": pa.array(s, pa.string()),
            "v": pa.array(v, pa.list_(pa.float64())),
            "_offset": pa.array(np.arange(offset, offset + n), pa.int64()),
        }
    )


def applied(batches: list[pa.Table]) -> dict[bytes, bytes]:
    store: dict[bytes, bytes] = {}
    progress = PartitionProgress(-1, None, 0, 0)
    for batch in batches:
        result = apply_batch(LAYOUT, batch, progress, lambda keys: [store.get(k) for k in keys])
        store.update(result.puts)
        progress = result.progress
    return store


def batches(count_: int, size: int = 150) -> list[pa.Table]:
    return [events(i, size, i * size, i * 20) for i in range(count_)]


def test_decode_many_equals_decode_words_and_encode_many_gives_the_same_bytes() -> None:
    store = applied(batches(6))
    keys = sorted(store)
    blobs: list[bytes | None] = [store[k] for k in keys]
    blobs.insert(3, None)  # a key without a blob reads as no tiles
    decoded = decode_many(LAYOUT, blobs)
    assert decoded is not None
    groups, newest = decoded
    assert newest[3] == np.iinfo(np.int64).min
    assert all(g.counts[3] == 0 for g in groups)
    present = [b for b in blobs if b is not None]
    singles = [decode_words(LAYOUT, b) for b in present]
    assert newest[[i for i, b in enumerate(blobs) if b is not None]].tolist() == [
        s[1] for s in singles
    ]
    for gi, group in enumerate(groups):
        words = np.concatenate([s[0][gi][0] for s in singles])
        assert np.array_equal(group.words, words)
        for f, values in group.objs.items():
            expected = [x for s in singles for x in _comparable(f, s[0][gi][1][f])]
            assert _comparable(f, values) == expected
    dims = {"v": np.asarray([2] * len(blobs), dtype=np.int64)}
    dims["v"][3] = 0
    again = encode_many(LAYOUT, groups, newest, dims)
    assert [b for i, b in enumerate(again) if i != 3] == present
    empty = encode_words(LAYOUT, [(g.words[:0], _no_rows(g)) for g in groups], int(newest[3]))
    assert again[3] == empty


def _no_rows(group: StoredGroup) -> dict[str, Any]:
    return {f: v[:0] if v.ndim == 1 else np.zeros((0, 0)) for f, v in group.objs.items()}


def _comparable(field: str, values: Any) -> list[Any]:
    """Summaries as their stored bytes (stored bytes and decoded sketches alike)."""
    kind = field.rpartition(".")[2]
    if kind in ("kll", "hll", "lastk"):
        return [sketches.encode(kind, x) for x in values.tolist()]
    return [x.tolist() if isinstance(x, np.ndarray) else x for x in values.tolist()]


def test_many_batches_read_like_one_batch() -> None:
    """Stored summaries kept as bytes and merged later give the values of one merge."""
    parts = batches(5)
    t = 5 * 20 * MINUTE + 15 * MINUTE  # after every event: the 1h windows see them all
    one, many = applied([pa.concat_tables(parts)]), applied(parts)
    assert one.keys() == many.keys()
    for key in one:
        a, b = evaluate_blob(LAYOUT, one[key], t), evaluate_blob(LAYOUT, many[key], t)
        assert a.keys() == b.keys()
        for name in a:
            if isinstance(a[name], float):
                assert a[name] == pytest.approx(b[name], rel=1e-12), name
            else:
                assert a[name] == b[name], name


def test_a_damaged_blob_is_refused_as_before() -> None:
    store = applied(batches(2))
    key = encode_key("key1")
    store[key] = store[key][:-3]
    assert decode_many(LAYOUT, [store[key]]) is None
    batch = events(9, 50, 10_000, 60)
    with pytest.raises(CorruptStateError, match="damaged"):
        apply_batch(
            LAYOUT, batch, PartitionProgress(-1, None, 0, 0), lambda keys: [store[key]] * len(keys)
        )


def one_key(minutes: list[float], offset: int) -> pa.Table:
    n = len(minutes)
    return pa.table(
        {
            "k": ["a"] * n,
            "ts": pa.array([int(m * MINUTE) for m in minutes], pa.timestamp("us", tz="UTC")),
            "x": pa.array([float(i + offset) for i in range(n)], pa.float64()),
            "s": pa.array([f"s{i % 3}" for i in range(n)], pa.string()),
            "v": pa.array([[1.0, 2.0]] * n, pa.list_(pa.float64())),
            "_offset": pa.array(np.arange(offset, offset + n), pa.int64()),
        }
    )


def summary_entries(blob: bytes) -> dict[str, list[bytes]]:
    decoded = decode_many(LAYOUT, [blob], lazy=True)
    assert decoded is not None
    out = {}
    for group in decoded[0]:
        for name, entries in group.entries.items():
            out[name] = [entries.span(i, i) for i in range(len(entries.start))]
    return out


def test_untouched_tiles_keep_their_stored_bytes_and_late_tiles_merge() -> None:
    """A batch that touches a key's newest tile writes its older summary entries back byte for
    byte; an event into an older tile merges there; values equal one merge of every event."""
    first = one_key([float(m) for m in range(0, 50)], 0)
    newest = one_key([52.5], 100)
    older = one_key([12.5], 200)
    store = applied([first])
    before = summary_entries(store[encode_key("a")])
    store = applied([first, newest])
    after = summary_entries(store[encode_key("a")])
    assert len(before["x.kll"]) == 11  # 5-minute tiles 0..9 and the boundary row
    for name, entries in before.items():  # the last two: the newest tile and its boundary row
        assert after[name][: len(entries) - 2] == entries[:-2], name
    everything = applied([first, newest, older])
    once = applied([pa.concat_tables([first, newest, older])])
    t = 60 * MINUTE
    assert evaluate_blob(LAYOUT, everything[encode_key("a")], t) == evaluate_blob(
        LAYOUT, once[encode_key("a")], t
    )


def test_event_order_is_the_key_time_offset_lexsort() -> None:
    """The write path's fast sort (composite number + tie fix-up) equals the plain lexsort,
    with many ties, and with rows out of offset order (the lexsort fallback)."""
    rng = np.random.default_rng(5)
    for _ in range(200):
        n = int(rng.integers(2, 300))
        kid, ts = rng.integers(0, 5, n), rng.integers(0, 10, n)
        for offsets in (np.arange(n) * 3 + 7, rng.permutation(n)):
            expected = np.lexsort((offsets, ts, kid))
            assert np.array_equal(_event_order(kid, ts, offsets), expected)


def test_encode_many_in_chunks_of_keys_gives_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """decode_many and encode_many bound their temporaries by working on keys in chunks: any
    chunk size, the same tiles and blobs (leading spans of kept rows included)."""
    applied_default = applied(batches(6))
    store = applied(batches(4))
    blobs: list[bytes | None] = [store[k] for k in sorted(store)]
    decoded = decode_many(LAYOUT, blobs)
    assert decoded is not None
    groups, newest = decoded
    dims = {"v": np.full(len(blobs), 2, dtype=np.int64)}
    whole = encode_many(LAYOUT, groups, newest, dims)
    assert whole == blobs
    for size in (1, 3, 7):
        monkeypatch.setattr(codec, "ENCODE_CHUNK", size)
        assert encode_many(LAYOUT, groups, newest, dims) == whole
        again = decode_many(LAYOUT, blobs)  # decoded a chunk of keys at a time too
        assert again is not None
        assert all(np.array_equal(a.words, b.words) for a, b in zip(again[0], groups, strict=True))
    monkeypatch.setattr(codec, "_VIEW_LIMIT", 0)  # joined blobs too large for Arrow's views
    indexed = decode_many(LAYOUT, blobs)  # words indexed one by one: the same tiles
    assert indexed is not None
    assert all(np.array_equal(a.words, b.words) for a, b in zip(indexed[0], groups, strict=True))
    assert applied(batches(6)) == applied_default  # the write path, kept rows' spans too


PLAIN: ViewLayout = FeatureView(
    name="p",
    source=Source("e", SCHEMA, "k", "ts"),
    features=[count(window="10m"), sum("x", window="1h", hop="5m"), mean("x", window="1d")],
).layout()


@pytest.mark.parametrize("chunk", [1, 3, 16_384])
def test_plain_tiles_are_encoded_for_all_keys_at_once_with_the_per_blob_bytes(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """A layout of fixed-width tiles only takes encode_many's one-buffer path: every key's
    blob is the per-blob encoder's, keys without tiles (in some group or all) included."""
    assert not any(g.object_fields or g.vector_fields for g in PLAIN.groups)
    store: dict[bytes, bytes] = {}
    progress = PartitionProgress(-1, None, 0, 0)
    for batch in batches(5):
        result = apply_batch(PLAIN, batch, progress, lambda keys: [store.get(k) for k in keys])
        store.update(result.puts)
        progress = result.progress
    blobs: list[bytes | None] = [store[k] for k in sorted(store)]
    blobs.insert(2, None)
    decoded = decode_many(PLAIN, blobs)
    assert decoded is not None
    groups, newest = decoded
    assert any((g.counts == 0).sum() > 1 for g in groups)  # a key without rows in a group
    monkeypatch.setattr(codec, "ENCODE_CHUNK", chunk)
    again = encode_many(PLAIN, groups, newest)
    singles = [
        encode_words(PLAIN, [(g.words[:0], {}) for g in groups], int(newest[i])) if b is None else b
        for i, b in enumerate(blobs)
    ]
    assert again == singles
