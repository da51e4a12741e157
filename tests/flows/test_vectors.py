"""Vector columns in the aggregation core: `last`, `first`, element-wise `mean` and `count` over
Avro float/double arrays, online (stored blobs) and offline (point in time) against the NumPy
oracle; wrong-length vectors as dead letters; definitions and Avro decoding of vectors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.avro import SchemaStore, SingleObjectWriter, arrow_schema, decode_batch
from connectors.errors import DecodeError, SchemaError
from flows import aggregate
from flows.aggregate import whole_partition
from flows.errors import DefinitionError
from flows.pointintime import kept_events, point_in_time
from flows.quarantine import apply_guarded
from flows.spec import FeatureView, Source, count, first, last, mean, sum
from state.bulk import BulkCommit, commit_building
from state.codec import encode_key
from state.layout import ViewLayout
from state.read import evaluate_blob
from state.store import PartitionProgress, ViewStore
from state.tiles import empty_block
from tests.connectors.avro_oracle import decode_one
from tests.helpers import evaluate
from tests.vector_oracle import (
    DAY,
    HOUR,
    MINUTE,
    differences,
    events_of,
    oracle_rows,
    well_formed,
)

SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Doc",
    "fields": [
        {"name": "user_id", "type": "string"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "emb", "type": ["null", {"type": "array", "items": "float"}], "default": None},
        {"name": "pos", "type": ["null", {"type": "array", "items": "double"}], "default": None},
        {"name": "amount", "type": ["null", "double"], "default": None},
    ],
}
SOURCE = Source(name="docs", schema=SCHEMA, key="user_id", timestamp="ts")
VIEW = FeatureView(
    name="text",
    source=SOURCE,
    features=[
        mean("emb", window="2h", hop="10m"),
        mean("emb", window="1d"),
        last("emb"),
        last("emb", window="1h", hop="30m"),
        first("emb", window="1d"),
        count("emb", window="1d"),
        count(window="1h"),
        mean("pos", window="6h"),
        last("pos"),
        mean("amount", window="1h"),
    ],
)
VECTORS = ("emb", "pos")
T0 = 1_780_000_000_000_000


def make_docs(n: int, n_keys: int, seed: int, bad: float = 0.01) -> pa.Table:
    """Events in log order: out of order by up to 90 minutes, equal times, null and empty
    vectors, a key with 3-dimensional embeddings (the others have 8), a few vectors of a wrong
    length (a fraction `bad`)."""
    rng = np.random.default_rng(seed)
    ts = T0 + np.sort(rng.integers(0, 2 * DAY, n))
    ts = ts - np.where(rng.random(n) < 0.15, rng.integers(0, 90 * MINUTE, n), 0)
    ts = ts - ts % np.where(rng.random(n) < 0.3, 10 * MINUTE, 1)  # many on tile boundaries
    keys = rng.integers(0, n_keys, n)
    emb: list[list[float] | None] = []
    pos: list[list[float] | None] = []
    for i in range(n):
        dim = 3 if keys[i] == 0 else 8
        dim = int(rng.integers(1, 12)) if rng.random() < bad else dim
        roll = rng.random()
        emb.append(None if roll < 0.1 else [] if roll < 0.13 else rng.normal(0, 1, dim).tolist())
        pos.append(None if rng.random() < 0.2 else rng.uniform(-90, 90, 2).tolist())
    return pa.table(
        {
            "user_id": [f"u{k}" for k in keys],
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "emb": pa.array(emb, pa.list_(pa.float32())),
            "pos": pa.array(pos, pa.list_(pa.float64())),
            "amount": pa.array(rng.normal(50, 10, n), mask=rng.random(n) < 0.1),
            "_offset": pa.array(np.arange(n, dtype=np.int64)),
        }
    )


def apply_all(
    view: FeatureView, events: pa.Table, batch: int
) -> tuple[dict[bytes, bytes], list[int]]:
    """Apply the events in batches through the dead-letter guard: the store and the offsets
    of the records that became dead letters."""
    layout = view.layout()
    store: dict[bytes, bytes] = {}
    progress = PartitionProgress(-1, None, 0, 0)
    dead: list[int] = []
    for start in range(0, events.num_rows, batch):
        part = whole_partition(events.slice(start, batch), layout, progress)
        result = apply_guarded(
            view, layout, [part], progress, lambda ks: [store.get(k) for k in ks]
        )
        store.update(result.puts)
        progress = result.progress
        dead += [letter.offset for letter in result.poison if letter.offset is not None]
    return store, dead


def online(layout: ViewLayout, store: dict[bytes, bytes], key: str, t: int) -> dict[str, Any]:
    blob = store.get(encode_key(key))
    if blob is None:
        return evaluate(layout, [empty_block(g) for g in layout.groups], t)
    return evaluate_blob(layout, blob, t)


def expected_bad(events: pa.Table) -> list[int]:
    log = events_of(events, "user_id", "ts", VECTORS)
    kept = {e.offset for e in well_formed(log, VECTORS)}
    return sorted(e.offset for e in log if e.offset not in kept)


@pytest.mark.parametrize("seed", [1, 2])
def test_online_and_offline_equal_the_numpy_oracle(seed: int) -> None:
    layout = VIEW.layout()
    events = make_docs(2500, 20, seed)
    store, dead = apply_all(VIEW, events, batch=400)
    assert sorted(dead) == expected_bad(events)
    assert dead
    oracle_events = well_formed(
        events_of(events, "user_id", "ts", ("emb", "pos", "amount")), VECTORS
    )
    keys = [f"u{k}" for k in range(20)] + ["nobody"]
    newest = int(events.column("ts").cast(pa.int64()).to_numpy().max())
    kept = kept_events(layout, [events], None)
    assert kept.num_rows == events.num_rows - len(dead)  # the snapshot leaves out the same
    for t in (newest, newest + 1, newest + 7 * MINUTE + 3, newest + 2 * HOUR, newest + 3 * DAY):
        times = [t] * len(keys)
        expected = oracle_rows(layout, oracle_events, keys, times)
        got_online = [online(layout, store, k, t) for k in keys]
        values = point_in_time(layout, kept, pa.array(keys), np.array(times, dtype=np.int64))
        got_offline = [{n: values[n][i].as_py() for n in values} for i in range(len(keys))]
        assert differences(layout, expected, got_online) == []
        assert differences(layout, expected, got_offline) == []
        assert differences(layout, got_online, got_offline) == []


def test_point_in_time_at_past_times_equals_the_oracle() -> None:
    layout = VIEW.layout()
    events = make_docs(2000, 12, seed=7)
    oracle_events = well_formed(
        events_of(events, "user_id", "ts", ("emb", "pos", "amount")), VECTORS
    )
    ts = events.column("ts").cast(pa.int64()).to_numpy()
    rng = np.random.default_rng(7)
    n = 600
    times = np.concatenate(
        [
            rng.integers(int(ts.min()) - HOUR, int(ts.max()) + HOUR, n // 3),
            rng.choice(ts, n // 3),  # exactly at an event: it must not count
            rng.choice(ts, n - 2 * (n // 3)) // (10 * MINUTE) * (10 * MINUTE),
        ]
    ).astype(np.int64)
    keys = [f"u{k}" for k in rng.integers(0, 14, n)]
    values = point_in_time(layout, kept_events(layout, [events], None), pa.array(keys), times)
    assert values["emb_mean_1d"].type == pa.list_(pa.float64())
    got = [{name: values[name][i].as_py() for name in values} for i in range(n)]
    expected = oracle_rows(layout, oracle_events, keys, times.tolist())
    assert differences(layout, expected, got) == []


def test_batch_size_does_not_change_the_values() -> None:
    layout = VIEW.layout()
    events = make_docs(600, 6, seed=11)
    newest = int(events.column("ts").cast(pa.int64()).to_numpy().max())
    results = [apply_all(VIEW, events, batch) for batch in (1, 37, 10_000)]
    assert results[0][1] == results[1][1] == results[2][1]
    keys = [f"u{k}" for k in range(6)]
    reads = [[online(layout, store, k, newest + 1) for k in keys] for store, _ in results]
    assert differences(layout, reads[0], reads[1]) == []
    assert differences(layout, reads[0], reads[2]) == []


def test_a_wrong_length_vector_is_a_dead_letter_naming_view_field_and_lengths() -> None:
    events = pa.table(
        {
            "user_id": ["a", "a", "b", "a", "b"],
            "ts": pa.array([T0, T0 + 1, T0 + 2, T0 + 3, T0 + 4], pa.timestamp("us", tz="UTC")),
            "emb": pa.array([[1, 2], [3, 4, 5], [1, 1, 1], [5, 6], None], pa.list_(pa.float32())),
            "pos": pa.array([None] * 5, pa.list_(pa.float64())),
            "amount": pa.array([1.0] * 5),
            "_offset": pa.array(np.arange(10, 15, dtype=np.int64)),
        }
    )
    layout = VIEW.layout()
    store: dict[bytes, bytes] = {}
    part = whole_partition(events, layout, PartitionProgress(-1, None, 0, 0))
    result = apply_guarded(
        VIEW, layout, [part], PartitionProgress(-1, None, 0, 0), lambda ks: [None for _ in ks]
    )
    store.update(result.puts)
    assert [letter.offset for letter in result.poison] == [11]
    reason = result.poison[0].reason
    for part_of_reason in ("'text'", "'emb'", "offset 11", "length 3", "length 2", "key 'a'"):
        assert part_of_reason in reason
    assert result.applied == 4
    assert result.progress.applied_offset == 14
    a = evaluate_blob(layout, store[encode_key("a")], T0 + 10)
    assert a["emb_mean_1d"] == [3.0, 4.0]
    assert a["emb_last"] == [5.0, 6.0]
    assert a["count_1h"] == 2  # the dead letter counts for no feature
    b = evaluate_blob(layout, store[encode_key("b")], T0 + 10)
    assert b["emb_last"] == [1.0, 1.0, 1.0]
    assert b["emb_count_1d"] == 1
    # a later batch is checked against the stored length
    later = events.slice(1, 1).set_column(5, "_offset", pa.array([20], pa.int64()))
    again = apply_guarded(
        VIEW,
        layout,
        [whole_partition(later, layout, result.progress)],
        result.progress,
        lambda ks: [store.get(k) for k in ks],
    )
    assert [letter.offset for letter in again.poison] == [20]


def test_only_count_first_last_and_mean_accept_vectors() -> None:
    bad = FeatureView(name="bad", source=SOURCE, features=[sum("emb", window="1d")])
    with pytest.raises(DefinitionError, match=r"feature 'emb_sum_1d': sum cannot aggregate"):
        bad.layout()
    with pytest.raises(DefinitionError, match="vectors accept only count, first, last, mean"):
        bad.layout()
    assert SOURCE.field_types()["emb"] == "array<float>"
    assert SOURCE.field_types()["pos"] == "array<double>"
    assert [f.name for f in VIEW.layout().features][:3] == [
        "emb_mean_2h",
        "emb_mean_1d",
        "emb_last",
    ]


def test_arrays_of_other_items_are_refused_naming_the_field() -> None:
    schema = {
        "type": "record",
        "name": "R",
        "fields": [{"name": "tags", "type": {"type": "array", "items": "string"}}],
    }
    with pytest.raises(SchemaError, match=r"'tags'.*float.*double"):
        arrow_schema(schema)


def test_batch_decoder_reads_vectors_as_fastavro_does() -> None:
    rng = np.random.default_rng(3)
    writer = SingleObjectWriter(SCHEMA)
    records = [
        {
            "user_id": f"u{i}",
            "ts": T0 + i,
            "emb": None if i % 5 == 0 else rng.normal(0, 1, int(rng.integers(0, 20))).tolist(),
            "pos": rng.uniform(-1, 1, 2).tolist() if i % 3 else None,
            "amount": float(i),
        }
        for i in range(200)
    ]
    payloads = [writer.encode(r) for r in records]
    payloads.append(payloads[7][:-12])  # cut inside the vectors
    store = SchemaStore(SCHEMA)
    batch, failures = decode_batch(store, payloads, arrow_schema(SCHEMA))
    assert [row for row, _ in failures] == [200]
    assert batch.schema.field("emb").type == pa.list_(pa.float32())
    decoded = [{**decode_one(store, p), "ts": None} for p in payloads[:200]]
    assert [{**row, "ts": None} for row in batch.to_pylist()] == decoded
    for record, row in zip(records, batch.to_pylist(), strict=True):
        if record["emb"] is not None:  # float32 on the wire
            np.testing.assert_array_equal(np.float32(record["emb"]), np.float32(row["emb"]))


def test_a_reader_with_double_items_reads_float_vectors() -> None:
    reader: dict[str, Any] = json.loads(json.dumps(SCHEMA))
    reader["fields"][2]["type"][1]["items"] = "double"  # emb: float -> double
    store = SchemaStore(reader, [SCHEMA])
    payload = SingleObjectWriter(SCHEMA).encode(
        {"user_id": "u", "ts": T0, "emb": [0.5, 1.5], "pos": None, "amount": None}
    )
    batch, failures = decode_batch(store, [payload], arrow_schema(reader))
    assert failures == []
    assert batch.column("emb").to_pylist() == [[0.5, 1.5]]
    assert batch.schema.field("emb").type == pa.list_(pa.float64())


def test_the_length_stays_with_the_key_after_its_tiles_expire() -> None:
    """A key's vectors keep their length after every tile holding one was pruned: the blob
    records it, and the snapshot (first vector ever) refuses the same record."""
    view = FeatureView(name="short", source=SOURCE, features=[mean("emb", window="1h")])
    layout = view.layout()
    rows = [("a", T0, [1.0, 2.0]), ("a", T0 + 10 * DAY, None), ("a", T0 + 20 * DAY, [1.0, 2, 3])]
    events = pa.table(
        {
            "user_id": [r[0] for r in rows],
            "ts": pa.array([r[1] for r in rows], pa.timestamp("us", tz="UTC")),
            "emb": pa.array([r[2] for r in rows], pa.list_(pa.float32())),
            "pos": pa.array([None] * 3, pa.list_(pa.float64())),
            "amount": pa.array([None] * 3, pa.float64()),
            "_offset": pa.array([0, 1, 2], pa.int64()),
        }
    )
    store, dead = apply_all(view, events, batch=1)
    assert dead == [2]
    assert online(layout, store, "a", T0 + 20 * DAY + 1) == {"emb_mean_1h": None}
    assert kept_events(layout, [events], None).column("_offset").to_pylist() == [0, 1]


@settings(max_examples=200)
@given(st.data())
def test_corrupted_vector_payloads_are_refused_or_read_as_fastavro_reads_them(
    data: st.DataObject,
) -> None:
    """Whatever the batch decoder accepts, fastavro decodes to the same record; a corrupted
    array (a huge or negative count, a cut block) is a refused record, never a crash."""
    store = SchemaStore(SCHEMA)
    writer = SingleObjectWriter(SCHEMA)
    payloads = []
    for i in range(6):
        emb = data.draw(st.none() | st.lists(st.floats(width=32, allow_nan=False), max_size=6))
        record = {"user_id": f"u{i}", "ts": T0, "emb": emb, "pos": [1.0, 2.0], "amount": 1.0}
        raw = bytearray(writer.encode(record))
        for _ in range(data.draw(st.integers(0, 3))):
            raw[data.draw(st.integers(10, len(raw) - 1))] = data.draw(st.integers(0, 255))
        payloads.append(bytes(raw[: data.draw(st.integers(10, len(raw)))]))
    batch, failures = decode_batch(store, payloads, arrow_schema(SCHEMA))
    failed = {i for i, _ in failures}
    accepted = [i for i in range(len(payloads)) if i not in failed]
    decoded = [comparable(decode_one(store, payloads[i])) for i in accepted]
    assert [comparable(row) for row in batch.to_pylist()] == decoded
    for i in failed:
        try:
            decode_one(store, payloads[i])
        except DecodeError:
            continue
        # stricter than fastavro only where fastavro is lenient (it indexes unions from the end)
        assert any(
            why in dict(failures)[i] for why in ("varint longer", "union branch", "negative")
        ), dict(failures)[i]


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    """A decoded record without its time (its Python type differs by decoder), NaN as text."""
    return {
        k: [repr(x) for x in v] if isinstance(v, list) else v
        for k, v in record.items()
        if k != "ts"
    }


@pytest.mark.parametrize("bad", [False, True], ids=["clean", "a-bad-vector-in-the-last-run"])
def test_a_bulk_commit_streams_the_runs_and_drops_them_when_a_record_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: bool
) -> None:
    """A replay batch's blobs go into the commit's SST file a merge run at a time. When a
    record fails in a later run (a wrong-length vector), what earlier runs wrote is dropped and
    the bisection's blobs are committed instead: the store ends as the WriteBatch path's."""
    monkeypatch.setattr(aggregate, "MERGE_RUN_EVENTS", 40)  # several runs per batch
    n = 600
    vectors: list[list[float] | None] = [[float(i), 1.0] for i in range(n)]
    if bad:
        vectors[n - 5] = [1.0, 2.0, 3.0]  # the last key's events come in the last run
    keys = [f"k{i % 150:03d}" for i in range(n)]
    events = pa.table(
        {
            "user_id": keys,
            "ts": pa.array([T0 + i for i in range(n)], pa.timestamp("us", tz="UTC")),
            "emb": pa.array(vectors, pa.list_(pa.float32())),
            "pos": pa.array([None] * n, pa.list_(pa.float64())),
            "amount": pa.array([1.0] * n),
            "_offset": pa.array(np.arange(n, dtype=np.int64)),
        }
    )
    layout = VIEW.layout()
    start = PartitionProgress(-1, None, 0, 0)
    part = whole_partition(events, layout, start)
    reference = apply_guarded(VIEW, layout, [part], start, lambda ks: [None for _ in ks])

    store = ViewStore(tmp_path)
    store.create_version(layout)
    shard = store.open_partition(VIEW.name, 1, 0)
    bulk = BulkCommit(shard)
    result = apply_guarded(VIEW, layout, [part], start, shard.get_many, bulk)
    assert [letter.offset for letter in result.poison] == ([n - 5] if bad else [])
    assert bulk.used is not bad  # streamed; or dropped for the bisection's blobs
    assert bool(list(tmp_path.rglob("*.ingest-*.sst"))) is not bad
    if bulk.used:
        assert result.puts == {}
        bulk.finish(result.progress)
    else:
        commit_building(shard, result.puts, result.progress)
    assert not list(tmp_path.rglob("*.ingest-*.sst"))
    stored = shard.get_many(sorted(reference.puts))
    assert stored == [reference.puts[k] for k in sorted(reference.puts)]
    assert shard.progress() == reference.progress
    shard.close()
