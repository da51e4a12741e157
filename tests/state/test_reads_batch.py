"""Batch reads equal single reads equal the oracles.

`state.batch_read.evaluate_blobs` (what `FeatureClient.get_many` runs) must give, value for
value and bit for bit, what `state.read.evaluate_blob` (what `get` runs) gives key by key, and
both must equal the DuckDB oracle (scalar and sketch aggregations) and the NumPy vector oracle:
every aggregation kind, several hops, unknown keys, empty windows, reads on and off hop
boundaries, as of now and as of a past time. Through the real client too: a view store written
with the store's own commit, read by `get` and `get_many` through RocksDB secondaries.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.partitioner import partition_for
from flows.aggregate import apply_batch, whole_partition
from flows.quarantine import apply_guarded
from flows.spec import (
    FeatureView,
    Source,
    count,
    distinct_count,
    first,
    last,
    last_k,
    max,
    mean,
    min,
    percentile,
    std,
    sum,
    var,
)
from state.batch_read import Checks, empty_blob, evaluate_blobs
from state.client import FeatureClient, _evaluate
from state.codec import encode_key
from state.compiled_read import compiled_values
from state.errors import CorruptStateError, FormatVersionError, InexactReadError
from state.layout import ViewLayout
from state.read import AsOf, evaluate_blob
from state.store import LogPosition, PartitionProgress, ViewStore
from tests.helpers import EV_SCHEMA, REPO
from tests.oracle import feature_ok, oracle_values
from tests.vector_oracle import differences, events_of, oracle_rows, well_formed

MINUTE = 60_000_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR
KEYS = [f"u{k}" for k in range(30)] + ["never-seen", "u7"]  # u7 twice: order is kept
SCHEMA: dict[str, Any] = {  # the core tests' events, and a vector
    **EV_SCHEMA,
    "fields": [
        *EV_SCHEMA["fields"],
        {"name": "emb", "type": ["null", {"type": "array", "items": "float"}], "default": None},
    ],
}
SOURCE = Source(name="ev", schema=SCHEMA, key="user_id", timestamp="ts")
VIEW = FeatureView(  # every exact aggregation kind, six hops and the lifetime group
    name="v",
    source=SOURCE,
    features=[
        count(window="30m"),
        count(window="2h", hop="10m"),
        count(),
        sum("amount", window="1h"),
        sum("qty", window="1d"),
        mean("amount", window="2h", hop="30m"),
        min("amount", window="45m", hop="15m"),
        max("qty", window="3h"),
        min("qty", window="1d"),
        var("amount", window="1d"),
        std("amount", window="6h", hop="2h"),
        std("qty", window="6h", hop="2h"),  # of an int column: a float, as the single read's
        mean("qty", window="1d"),
        first("channel", window="1h"),
        last("channel"),
        last("amount", window="30m"),
        first("qty", window="1d"),
        count("amount", window="1d"),
        mean("amount"),
    ],
)
PLAIN_VIEW = FeatureView(  # counts, sums and means only: every group takes state.window_sums
    name="p",
    source=SOURCE,
    features=[
        count(window="30m"),
        sum("amount", window="30m"),
        mean("qty", window="2h", hop="10m"),
        sum("qty", window="1d"),
        count("amount", window="1d"),
        mean("amount", window="3h"),
        count(),
        sum("qty"),
        mean("amount"),
    ],
)
SKETCH_VIEW = FeatureView(  # summaries beside numeric features in the same groups
    name="s",
    source=SOURCE,
    features=[
        last_k("channel", 3, window="1h"),
        last_k("amount", 5),
        distinct_count("channel", window="2h"),
        distinct_count("qty"),
        percentile("amount", 0.95, window="1h"),
        percentile("amount", 0.5, window="1d"),
        mean("amount", window="1h"),
        count(),
    ],
)
VECTOR_VIEW = FeatureView(
    name="text",
    source=SOURCE,
    features=[
        mean("emb", window="2h", hop="10m"),
        mean("emb", window="1d"),
        last("emb"),
        first("emb", window="1d"),
        count("emb", window="1d"),
        mean("amount", window="1d"),
    ],
)


def make_events(n: int, n_keys: int, seed: int, vectors: bool = False) -> pa.Table:
    """Events in log order: 10% out of order, bursts of equal times, many on tile boundaries,
    nulls; with `vectors`, 8-dimensional embeddings (3 for u0), null and empty ones."""
    rng = np.random.default_rng(seed)
    base = 1_700_000_000_000_000
    ts = base + np.sort(rng.integers(0, 2 * DAY, n))
    ts = ts - np.where(rng.random(n) < 0.1, rng.integers(0, 90 * MINUTE, n), 0)
    ts[rng.random(n) < 0.05] = base + 3 * MINUTE * 40
    ts = ts - ts % np.where(rng.random(n) < 0.3, MINUTE, 1)
    keys = rng.integers(0, n_keys, n)
    emb = [
        None if r < 0.1 else [] if r < 0.13 else rng.normal(0, 1, 3 if k == 0 else 8).tolist()
        for k, r in zip(keys, rng.random(n), strict=True)
    ]
    return pa.table(
        {
            "user_id": pa.array([f"u{k}" for k in keys]),
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "amount": pa.array(np.round(rng.normal(50, 20, n), 2), mask=rng.random(n) < 0.07),
            "qty": pa.array(rng.integers(1, 5, n), mask=rng.random(n) < 0.05),
            "channel": pa.array(
                rng.choice(["web", "pos", "app"], n).tolist(), mask=rng.random(n) < 0.1
            ),
            "emb": pa.array(emb if vectors else [None] * n, pa.list_(pa.float32())),
            "_offset": pa.array(np.arange(n, dtype=np.int64)),
        }
    )


def apply_all(layout: ViewLayout, events: pa.Table, batch: int) -> dict[bytes, bytes]:
    """The write path's blobs after applying `events` in batches of `batch`."""
    store: dict[bytes, bytes] = {}
    progress = PartitionProgress(-1, None, 0, 0)
    for start in range(0, events.num_rows, batch):
        result = apply_batch(
            layout, events.slice(start, batch), progress, lambda ks: [store.get(k) for k in ks]
        )
        store.update(result.puts)
        progress = result.progress
    return store


def apply_vectors(view: FeatureView, events: pa.Table, batch: int) -> dict[bytes, bytes]:
    """As `apply_all`, through the dead-letter guard (wrong-length vectors are refused)."""
    layout = view.layout()
    store: dict[bytes, bytes] = {}
    progress = PartitionProgress(-1, None, 0, 0)
    for start in range(0, events.num_rows, batch):
        part = whole_partition(events.slice(start, batch), layout, progress)
        result = apply_guarded(
            view, layout, [part], progress, lambda ks: [store.get(k) for k in ks]
        )
        store.update(result.puts)
        progress = result.progress
    return store


def singles(layout: ViewLayout, blobs: list[bytes | None], t: int) -> list[dict[str, Any]]:
    return [evaluate_blob(layout, b if b is not None else empty_blob(layout), t) for b in blobs]


def rows(layout: ViewLayout, columns: dict[str, list[Any]]) -> list[dict[str, Any]]:
    assert list(columns) == [f.name for f in layout.features]
    n = {len(v) for v in columns.values()}
    assert len(n) == 1
    return [{name: columns[name][i] for name in columns} for i in range(n.pop())]


def times_around(events: pa.Table) -> list[int]:
    ts = events.column("ts").cast(pa.int64()).to_numpy()
    newest, oldest = int(ts.max()), int(ts.min())
    return [
        newest,  # the entity's newest events are left out (t is exclusive)
        newest + 1,
        newest + 7 * MINUTE + 3,  # off every hop boundary
        newest // HOUR * HOUR + HOUR,  # on a boundary of every hop
        newest + 2 * DAY,  # every window but the lifetime ones empty
        oldest - DAY,  # before any event (not exact for lifetime features: batch == single)
    ]


@pytest.mark.parametrize("view", [VIEW, SKETCH_VIEW], ids=["exact", "sketches"])
def test_batch_equals_single_equals_duckdb_oracle(view: FeatureView) -> None:
    layout = view.layout()
    events = make_events(4000, 30, seed=5)
    store = apply_all(layout, events, batch=700)
    blobs = [store.get(encode_key(k)) for k in KEYS]
    assert blobs[KEYS.index("never-seen")] is None
    for t in times_around(events):
        batch = rows(layout, evaluate_blobs(layout, blobs, t))
        assert batch == singles(layout, blobs, t)  # exactly: same order of additions
        if t < int(events.column("ts").cast(pa.int64()).to_numpy().max()):
            continue  # an online read answers as of its view's newest event or later
        spine = pa.table({"row": list(range(len(KEYS))), "k": KEYS, "t": [t] * len(KEYS)})
        expected_rows = oracle_values(layout, events, spine).to_pylist()
        for expected, got in zip(expected_rows, batch, strict=True):
            for f in layout.features:
                assert feature_ok(f, expected[f.name], got[f.name]), (t, f.name, expected, got)


def test_batch_equals_single_equals_the_vector_oracle() -> None:
    layout = VECTOR_VIEW.layout()
    events = make_events(2500, 20, seed=3, vectors=True)
    store = apply_vectors(VECTOR_VIEW, events, batch=400)
    kept = well_formed(events_of(events, "user_id", "ts", ("emb", "amount")), ("emb",))
    keys = [f"u{k}" for k in range(20)] + ["nobody"]
    blobs = [store.get(encode_key(k)) for k in keys]
    for t in times_around(events):
        batch = rows(layout, evaluate_blobs(layout, blobs, t))
        assert batch == singles(layout, blobs, t)
        if t < int(events.column("ts").cast(pa.int64()).to_numpy().max()):
            continue
        assert differences(layout, oracle_rows(layout, kept, keys, [t] * len(keys)), batch) == []


def test_checked_reads_refuse_what_single_reads_refuse() -> None:
    """As of a past time inside a stored tile (events before and after t in it), the batch
    refuses, naming the first such key, as the single read does; on a boundary both answer."""
    layout = VIEW.layout()
    events = make_events(3000, 20, seed=8)
    store = apply_all(layout, events, batch=500)
    keys = ["never-seen", *(f"u{k}" for k in range(20))]
    blobs = [store.get(encode_key(k)) for k in keys]
    checks = [AsOf(k, None) if b is not None else None for k, b in zip(keys, blobs, strict=True)]
    ts = events.column("ts").cast(pa.int64()).to_numpy()
    inside = int(np.median(ts)) // MINUTE * MINUTE + 17
    with pytest.raises(InexactReadError) as batch_error:
        evaluate_blobs(layout, blobs, inside, Checks(keys, [None] * len(keys)))
    first_refused = next(
        k for k, b, c in zip(keys, blobs, checks, strict=True) if _refuses(layout, b, inside, c)
    )
    assert f"key {first_refused!r}" in str(batch_error.value)
    assert "no exact value as of" in str(batch_error.value)
    after = int(ts.max()) + 1
    assert rows(layout, evaluate_blobs(layout, blobs, after, Checks(keys, [None] * 21))) == [
        evaluate_blob(layout, b if b is not None else empty_blob(layout), after, c)
        for b, c in zip(blobs, checks, strict=True)
    ]


def test_checked_reads_refuse_pruned_windows_as_single_reads_do() -> None:
    layout = FeatureView(
        name="p",
        source=VIEW.source,
        features=[count(window="1h"), mean("amount", window="2h", hop="30m")],
    ).layout()
    events = make_events(2000, 10, seed=9)
    store = apply_all(layout, events, batch=500)
    keys = [f"u{k}" for k in range(10)]
    blobs = [store.get(encode_key(k)) for k in keys]
    ts = events.column("ts").cast(pa.int64()).to_numpy()
    boundary = int(np.median(ts)) // DAY * DAY  # on every hop boundary: no tile is mixed
    fresh = [AsOf(k, None) for k in keys]  # no watermark recorded: nothing pruned
    no_marks = Checks(keys, [None] * len(keys))
    assert rows(layout, evaluate_blobs(layout, blobs, boundary, no_marks)) == [
        evaluate_blob(layout, b, boundary, c) for b, c in zip(blobs, fresh, strict=True) if b
    ]
    pruned = [AsOf(k, int(ts.max()) + 30 * DAY) for k in keys]  # the writer moved far on
    with pytest.raises(InexactReadError, match="were pruned") as caught:
        evaluate_blobs(layout, blobs, boundary, Checks(keys, [c.watermark for c in pruned]))
    with pytest.raises(InexactReadError) as single:
        evaluate_blob(layout, blobs[0] or b"", boundary, pruned[0])
    assert str(caught.value) == str(single.value)


def _refuses(layout: ViewLayout, blob: bytes | None, t: int, check: AsOf | None) -> bool:
    if blob is None:
        return False
    try:
        evaluate_blob(layout, blob, t, check)
    except InexactReadError:
        return True
    return False


@pytest.mark.parametrize("view", [VIEW, PLAIN_VIEW], ids=["every kind", "compiled"])
def test_damaged_and_foreign_blobs_are_refused(view: FeatureView) -> None:
    """By the batch read and the single read, compiled (counts, sums, means) or not."""
    layout = view.layout()
    store = apply_all(layout, make_events(500, 5, seed=2), batch=500)
    good = store[encode_key("u1")]
    t = 1_800_000_000_000_000
    for damaged in (good[:5], good[:-3], good + b"\0\0\0", good[:9] + b"\xff" * 4):
        with pytest.raises(CorruptStateError, match=r"damaged tile blob.*flows\.replay"):
            evaluate_blobs(layout, [good, damaged], t)
        with pytest.raises(CorruptStateError):
            FeatureClient_evaluate(layout, damaged, t)
    with pytest.raises(FormatVersionError, match="format 99"):
        evaluate_blobs(layout, [good, b"\x63" + good[1:]], t)
    with pytest.raises(FormatVersionError, match="format 99"):
        FeatureClient_evaluate(layout, b"\x63" + good[1:], t)
    assert evaluate_blobs(layout, [], t) == {f.name: [] for f in layout.features}


def FeatureClient_evaluate(layout: ViewLayout, blob: bytes, t: int) -> dict[str, Any]:  # noqa: N802
    """The client's single read of a blob: compiled when it answers, else evaluate_blob."""
    return _evaluate(layout, blob, t, None)


# --- through the client: RocksDB secondaries, one multi-get per partition ---------------------

SMALL = FeatureView(
    name="small",
    source=Source(
        name="ev", schema=VIEW.source.schema, key="user_id", timestamp="ts", partitions=3
    ),
    features=[
        count(window="30m"),
        sum("qty", window="1d"),
        mean("amount", window="2h", hop="30m"),
        last("channel"),
        first("amount", window="6h"),
        last_k("channel", 2, window="1h"),
        percentile("amount", 0.5, window="1d"),
    ],
)


def write_store(
    root: Path,
    layout: ViewLayout,
    store: dict[bytes, bytes],
    newest: int,
    others: dict[int, LogPosition] | None = None,
) -> None:
    """The view's entities in a real view store, each in its key's partition, every partition
    at watermark `newest` and, with `others`, at those positions of other source partitions."""
    views = ViewStore(root)
    version = views.create_version(layout)
    for p in range(layout.partitions):
        mine = {
            k: v for k, v in store.items() if partition_for(k[1:].decode(), layout.partitions) == p
        }
        foreign = {q: pos for q, pos in (others or {}).items() if q != p}
        db = views.open_partition(layout.view, version, p)
        db.commit(mine, PartitionProgress(len(mine), newest, len(mine), 0, foreign))
        db.close()
    views.switch(layout.view, version)


def test_client_get_many_equals_get(tmp_path: Path) -> None:
    layout = SMALL.layout()
    events = make_events(3000, 40, seed=4)
    newest = int(events.column("ts").cast(pa.int64()).to_numpy().max())
    write_store(tmp_path / "state", layout, apply_all(layout, events, batch=1000), newest)
    keys = [f"u{k}" for k in range(45)] + ["u3", "nobody"]  # 5 unknown, a repeat
    with FeatureClient(tmp_path / "state") as client:
        for at in (newest / 1e6, (newest + 1) / 1e6, (newest + 2 * HOUR) / 1e6, None):
            many = client.get_many("small", keys, at=at)
            assert many == [client.get("small", k, at=at) for k in keys]
            assert many[-1]["count_30m"] == 0
            assert many[-1]["channel_last"] is None
            assert many[3] == many[-2] == client.get_many("small", ["u3"], at=at)[0]
            if many[3]["channel_last2_1h"] is not None:  # read once, handed out twice
                assert many[3]["channel_last2_1h"] is not many[-2]["channel_last2_1h"]
        assert client.get_many("small", [], at=None) == []
        with pytest.raises(InexactReadError, match="no exact value"):
            client.get_many("small", keys, at=(newest - 3 * HOUR + 7) / 1e6)


def test_a_newer_event_time_routed_from_another_partition_counts(tmp_path: Path) -> None:
    """A shard's newest event time is the newest over every source partition it applied
    (records routed to it from others): reads as of a time whose tiles that pruned refuse,
    `get` and `get_many` alike, though the shard's own partition is far behind."""
    layout = FeatureView(
        name="small", source=SMALL.source, features=[count(window="1h"), sum("qty", window="1d")]
    ).layout()
    events = make_events(2000, 30, seed=6)
    newest = int(events.column("ts").cast(pa.int64()).to_numpy().max())
    later = {2: LogPosition(10, newest + 40 * DAY)}  # partition 2's events are 40 days newer
    write_store(tmp_path / "state", layout, apply_all(layout, events, batch=1000), newest, later)
    keys = [f"u{k}" for k in range(30)]
    boundary = (newest // DAY + 1) * DAY / 1e6  # on every hop boundary, after every event
    theirs = [k for k in keys if partition_for(k, 3) == 2]  # partition 2: its own mark
    mine = [k for k in keys if partition_for(k, 3) != 2]
    assert len(theirs) > 2
    assert len(mine) > 2
    # refresh_s=3600: no catch-up during the test, so the second read of a partition uses
    # the newest event time the first one found; the default client catches up meanwhile
    for refresh_s in (3600.0, 0.05):
        with FeatureClient(tmp_path / "state", refresh_s=refresh_s) as client:
            many = client.get_many("small", theirs, at=boundary)
            for _ in range(3):
                assert [client.get("small", k, at=boundary) for k in theirs] == many
                for key in mine:
                    with pytest.raises(InexactReadError, match="were pruned"):
                        client.get("small", key, at=boundary)
                with pytest.raises(InexactReadError, match="were pruned"):
                    client.get_many("small", mine, at=boundary)
                assert client.get_many("small", mine) == [client.get("small", k) for k in mine]
                time.sleep(refresh_s if refresh_s < 1 else 0)


EXIT_UNCLOSED = """
import sys, time
from state.client import FeatureClient
client = FeatureClient(sys.argv[1], refresh_s=0.001)  # catching up all the time
for _ in range(50):
    client.get("small", "u1", at=2e9)
time.sleep(0.05)
"""  # and no close(): the interpreter exits with the catch-up thread running


def test_a_process_exits_cleanly_with_an_unclosed_client(tmp_path: Path) -> None:
    """The catch-up thread is a daemon thread: at exit it must not be inside a RocksDB call
    that releases the GIL (an earlier version read watermarks there and aborted the process
    with "FATAL: exception not rethrown" in 12 exits of 15)."""
    layout = SMALL.layout()
    events = make_events(500, 10, seed=2)
    newest = int(events.column("ts").cast(pa.int64()).to_numpy().max())
    write_store(tmp_path / "state", layout, apply_all(layout, events, batch=500), newest)
    script = tmp_path / "unclosed.py"
    script.write_text(EXIT_UNCLOSED)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(8):
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "state")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]


def test_an_unclosed_client_takes_no_lock_at_interpreter_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At interpreter exit daemon threads (a client's catch-up thread) are frozen wherever they
    were, perhaps inside the client's locks: `__del__` then closing the client waited for them
    forever (a benchmark process hung at exit this way). So at exit it closes nothing."""
    layout = SMALL.layout()
    events = make_events(200, 10, seed=3)
    newest = int(events.column("ts").cast(pa.int64()).to_numpy().max())
    write_store(tmp_path / "state", layout, apply_all(layout, events, batch=200), newest)
    client = FeatureClient(tmp_path / "state")
    client.get("small", "u1", at=2e9)
    monkeypatch.setattr(sys, "is_finalizing", lambda: True)
    with client._versions._opening:  # held, as by a frozen catch-up thread
        deleting = threading.Thread(target=client.__del__, daemon=True)
        deleting.start()
        deleting.join(10)
        assert not deleting.is_alive(), "__del__ waited for a lock at interpreter exit"
    monkeypatch.undo()
    client.close()


# --- property: the vectorized merge is the per-entity merge --------------------------------

EVENT = st.tuples(
    st.integers(0, 5),  # key
    st.integers(0, 3 * DAY),  # time
    st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False, width=32)),
    st.one_of(st.none(), st.integers(-1000, 1000)),
    st.one_of(st.none(), st.sampled_from(["web", "pos", "app"])),
)


BASE = 1_700_000_000_000_000  # the property tests' time origin (µs)


def event_table(events: list[tuple[int, int, float | None, int | None, str | None]]) -> pa.Table:
    """Generated events (key, µs after BASE, amount, qty, channel) as a log batch."""
    return pa.table(
        {
            "user_id": [f"u{e[0]}" for e in events],
            "ts": pa.array([BASE + e[1] for e in events], pa.timestamp("us", tz="UTC")),
            "amount": pa.array([e[2] for e in events], pa.float64()),
            "qty": pa.array([e[3] for e in events], pa.int64()),
            "channel": pa.array([e[4] for e in events], pa.string()),
            "_offset": pa.array(np.arange(len(events), dtype=np.int64)),
        }
    )


@settings(max_examples=40)
@given(
    st.lists(EVENT, min_size=1, max_size=60),
    st.integers(-HOUR, 4 * DAY),
    st.integers(1, 60),
)
def test_vectorized_finalize_equals_per_entity(
    events: list[tuple[int, int, float | None, int | None, str | None]], at: int, batch: int
) -> None:
    layout = VIEW.layout()
    base = BASE
    table = event_table(events)
    store = apply_all(layout, table, batch=batch)
    blobs = [store.get(encode_key(f"u{k}")) for k in range(7)]
    t = base + at
    assert rows(layout, evaluate_blobs(layout, blobs, t)) == singles(layout, blobs, t)


@settings(max_examples=60)
@given(
    st.lists(EVENT, min_size=1, max_size=60),
    st.integers(-HOUR, 4 * DAY),
    st.integers(1, 60),
    st.booleans(),
)
def test_compiled_window_sums_equal_the_single_read_and_numpy(
    events: list[tuple[int, int, float | None, int | None, str | None]],
    at: int,
    batch: int,
    on_hop: bool,
) -> None:
    """Counts, sums and means through state.window_sums: bit for bit the single read's values
    (and the NumPy path's, for the plain features of a view with other kinds too), checked
    reads refused alike."""
    base = BASE
    table = event_table(events)
    t = base + (at - at % (10 * 60_000_000) if on_hop else at)
    for view in (PLAIN_VIEW, VIEW):
        layout = view.layout()
        store = apply_all(layout, table, batch=batch)
        keys = [f"u{k}" for k in range(7)]
        blobs = [store.get(encode_key(k)) for k in keys]
        plain = frozenset(f.name for f in layout.features if f.agg in ("count", "sum", "mean"))
        got = evaluate_blobs(layout, blobs, t, only=plain)
        want = [{k: v for k, v in row.items() if k in plain} for row in singles(layout, blobs, t)]
        assert [dict(zip(got, row, strict=True)) for row in zip(*got.values(), strict=True)] == want
        newest = int(table.column("ts").cast(pa.int64()).to_numpy().max())
        checks = Checks(keys, [newest] * len(keys))
        single_error = batch_error = None
        for key, blob in zip(keys, blobs, strict=True):
            if blob is None:
                continue
            try:
                evaluate_blob(layout, blob, t, AsOf(key, newest), plain)
            except InexactReadError as exc:
                single_error = str(exc)
                break
        try:
            evaluate_blobs(layout, blobs, t, checks, plain)
        except InexactReadError as exc:
            batch_error = str(exc)
        assert (single_error is None) == (batch_error is None), (single_error, batch_error)


@settings(max_examples=60)
@given(
    st.lists(EVENT, min_size=1, max_size=60),
    st.integers(-HOUR, 4 * DAY),
    st.integers(1, 60),
    st.sampled_from([None, 0, 2 * DAY]),
)
def test_the_compiled_single_read_is_evaluate_blob(
    events: list[tuple[int, int, float | None, int | None, str | None]],
    at: int,
    batch: int,
    watermark_after: int | None,
) -> None:
    """state.compiled_read answers exactly what evaluate_blob answers (values, refusals), or
    defers to it: plain views whole, and the plain features of a view with every kind."""
    base = BASE
    table = event_table(events)
    t = base + at
    newest = int(table.column("ts").cast(pa.int64()).to_numpy().max())
    for view in (PLAIN_VIEW, VIEW):
        layout = view.layout()
        store = apply_all(layout, table, batch=batch)
        plain = frozenset(f.name for f in layout.features if f.agg in ("count", "sum", "mean"))
        only = None if view is PLAIN_VIEW else plain
        for key in ("u0", "u1", "u2"):
            blob = store.get(encode_key(key)) or empty_blob(layout)
            checks = [None]
            if watermark_after is not None:
                checks.append(AsOf(key, newest + watermark_after))
            for as_of in checks:
                want = _outcome(evaluate_blob, layout, blob, t, as_of, only)
                got = _outcome(compiled_values, layout, blob, t, as_of, only)
                if got != ("value", None):  # None: deferred to evaluate_blob
                    assert got == want
                    assert got[0] == "refused" or list(got[1]) == list(want[1])


def _outcome(read: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "value", read(*args)
    except InexactReadError as exc:
        return "refused", str(exc)


VECTOR_EVENT = st.tuples(
    st.integers(0, 3),  # key
    st.integers(0, 3 * DAY),  # time
    st.one_of(  # a vector: null, empty, or of the key's length (1 for u0: NumPy's 1-d case)
        st.none(),
        st.just([]),
        st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=4, max_size=4),
    ),
    st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False, width=32)),
)


@settings(max_examples=60)
@given(
    st.lists(VECTOR_EVENT, min_size=1, max_size=60),
    st.integers(-HOUR, 4 * DAY),
    st.integers(1, 60),
)
def test_the_compiled_vector_mean_is_evaluate_blob(
    events: list[tuple[int, int, list[float] | None, float | None]], at: int, batch: int
) -> None:
    """Element-wise vector means through the compiled single read: equal to evaluate_blob
    (rows added in order, also for one-element vectors), empty windows None, and the read of
    a group with a vector first/last deferred to it."""
    vectors = [None if v is None else v[:1] if k == 0 else v for k, _, v, _ in events]
    table = pa.table(
        {
            "user_id": [f"u{e[0]}" for e in events],
            "ts": pa.array([BASE + e[1] for e in events], pa.timestamp("us", tz="UTC")),
            "amount": pa.array([e[3] for e in events], pa.float64()),
            "qty": pa.array([None] * len(events), pa.int64()),
            "channel": pa.array([None] * len(events), pa.string()),
            "emb": pa.array(vectors, pa.list_(pa.float32())),
            "_offset": pa.array(np.arange(len(events), dtype=np.int64)),
        }
    )
    layout = VECTOR_VIEW.layout()
    store = apply_vectors(VECTOR_VIEW, table, batch=batch)
    means = frozenset(
        f.name for f in layout.features if f.agg in ("mean", "count") and f.column != "amount"
    )
    t = BASE + at
    for key in ("u0", "u1", "u2", "nobody"):
        blob = store.get(encode_key(key)) or empty_blob(layout)
        for only in (means, frozenset({"emb_mean_2h"}), None):
            got = compiled_values(layout, blob, t, None, only)
            want = evaluate_blob(layout, blob, t, None, only)
            if only is None:  # last/first of a vector: not compiled
                assert got is None
                continue
            assert got == want
            assert all(type(v) is type(want[k]) for k, v in got.items())


def test_damaged_vector_blobs_never_crash_the_compiled_read() -> None:
    """Every byte of a vector view's blob overwritten in turn (0x00, 0xff, a flipped bit),
    and every cut: the compiled read of the vector means answers exactly what evaluate_blob
    answers, or defers to it (None); it never writes past its arrays, nor allocates from a
    length read out of garbage (a compiled kernel checks no bounds)."""
    layout = VECTOR_VIEW.layout()
    store = apply_vectors(VECTOR_VIEW, make_events(400, 3, seed=4, vectors=True), batch=150)
    good = store[encode_key("u1")]
    only = frozenset({"emb_mean_2h", "emb_mean_1d", "emb_count_1d"})
    t = 1_700_000_000_000_000 + 2 * DAY
    damaged = [good[:cut] for cut in range(0, len(good), 7)]
    for at in range(len(good)):
        for byte in (0, 0xFF, good[at] ^ 0x10):
            damaged.append(good[:at] + bytes([byte]) + good[at + 1 :])
    for blob in damaged:
        try:
            got = compiled_values(layout, blob, t, None, only)
        except (CorruptStateError, FormatVersionError):  # a bad header: named as the read does
            with pytest.raises((CorruptStateError, FormatVersionError)):
                evaluate_blob(layout, blob, t, None, only)
            continue
        if got is None:
            continue  # deferred: evaluate_blob reads it (or names the damage)
        try:
            want = evaluate_blob(layout, blob, t, None, only)
        except Exception:  # damage the Python read names, the pass did not see
            continue
        assert list(got) == list(want)
        for name, value in got.items():  # equal, NaN (a damaged float) to NaN
            assert np.array_equal(np.array(value, float), np.array(want[name], float), True)


def test_the_compiled_read_gives_each_thread_its_own_answers() -> None:
    """The compiled read reuses its output arrays per thread: 8 threads reading blobs of
    different lengths (its vector space grows) and different feature sets at once each get
    what the same reads give one at a time."""
    layout = VECTOR_VIEW.layout()
    store = apply_vectors(VECTOR_VIEW, make_events(600, 5, seed=9, vectors=True), batch=200)
    blobs = [store.get(encode_key(f"u{k}")) or empty_blob(layout) for k in range(6)]
    onlies = [
        frozenset({"emb_mean_2h", "emb_mean_1d", "emb_count_1d"}),
        frozenset({"emb_mean_2h"}),
        frozenset({"emb_count_1d"}),
    ]
    t = 1_700_000_000_000_000 + 2 * DAY
    reads = [(b, o) for b in blobs for o in onlies]
    alone = [compiled_values(layout, b, t, None, o) for b, o in reads]
    assert any(v is not None for v in alone)
    start = threading.Barrier(8)

    def run(shift: int) -> list[Any]:
        start.wait()
        order = [(i + shift) % len(reads) for i in range(len(reads))] * 40
        got: list[Any] = [None] * len(reads)
        for i in order:
            b, o = reads[i]
            value = compiled_values(layout, b, t, None, o)
            assert got[i] is None or got[i] == value
            got[i] = value
        return got

    results: list[list[Any]] = []
    threads = [threading.Thread(target=lambda s=s: results.append(run(s))) for s in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    for got in results:
        assert repr(got) == repr(alone)
