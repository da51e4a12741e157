"""state.store: the view store's directory (format marker, views, versions, partitions), version
switches that only move forward, clean-up that never deletes a version in use, and each
partition's RocksDB committing tiles and progress together. Real rocksdict in tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flows.spec import FeatureView, Source, count, sum
from state.bulk import BULK_COMMIT_KEYS, commit_building
from state.errors import (
    FormatVersionError,
    NotAViewStoreError,
    StaleVersionError,
    StateError,
    UnknownViewError,
)
from state.layout import ViewLayout
from state.lock import use_version
from state.store import (
    NOTHING_APPLIED,
    STORE_FORMAT,
    LogPosition,
    PartitionProgress,
    ViewStore,
    _shared_cache,
    open_secondary,
    read_partition_progress,
    sweep_scratch,
)
from tests.helpers import TXN_SCHEMA

SOURCE = Source("txns", TXN_SCHEMA, "user_id", "ts", partitions=2)


def layout(view: str = "spend", window: str = "30m") -> ViewLayout:
    return FeatureView(view, SOURCE, [count(window=window), sum("amount")]).layout()


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def store(tmp_path: Path) -> ViewStore:
    return ViewStore(tmp_path / "state")


# --- the directory and its format marker ----------------------------------------------------


def test_a_new_store_writes_its_format_marker(tmp_path: Path) -> None:
    ViewStore(tmp_path / "state")
    assert (tmp_path / "state" / "FORMAT").read_text() == f"featureflow-state {STORE_FORMAT}\n"
    ViewStore(tmp_path / "state", create=False)  # opens what it made


@pytest.mark.parametrize("create", [True, False])
def test_a_directory_with_other_files_is_not_a_view_store(tmp_path: Path, create: bool) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(NotAViewStoreError, match=r"is not a view store \(no FORMAT file\); pass"):
        ViewStore(tmp_path, create=create)
    assert not (tmp_path / "FORMAT").exists()


def test_a_missing_directory_is_refused_without_create(tmp_path: Path) -> None:
    with pytest.raises(NotAViewStoreError, match="--state"):
        ViewStore(tmp_path / "nothing", create=False)
    assert not (tmp_path / "nothing").exists()


def test_a_foreign_or_newer_format_marker_is_refused(tmp_path: Path) -> None:
    (tmp_path / "FORMAT").write_text("something else\n")
    with pytest.raises(NotAViewStoreError, match="FORMAT says 'something else'"):
        ViewStore(tmp_path)
    (tmp_path / "FORMAT").write_text(f"featureflow-state {STORE_FORMAT + 1}\n")
    with pytest.raises(
        FormatVersionError, match=f"on-disk format {STORE_FORMAT + 1}.*flows.replay"
    ):
        ViewStore(tmp_path)


def test_a_dead_writers_temporary_marker_is_cleared(tmp_path: Path) -> None:
    root = tmp_path / "state"
    root.mkdir()
    (root / f".FORMAT.tmp-{dead_pid()}").write_text("half")
    ViewStore(root)
    assert sorted(p.name for p in root.iterdir()) == ["FORMAT"]


def test_many_threads_open_one_new_state_directory_at_once(tmp_path: Path) -> None:
    """They all create the FORMAT marker side by side: each under its own temporary name (one
    per process made two threads rename the same file, and the second found it gone)."""
    for attempt in range(20):
        root = tmp_path / f"state{attempt}"
        start = threading.Barrier(8)

        def open_store(_: int, root: Path = root, start: threading.Barrier = start) -> Path:
            start.wait()
            return ViewStore(root).root

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(open_store, range(8))) == [root] * 8
        assert sorted(p.name for p in root.iterdir()) == ["FORMAT"]


# --- views, versions and their paths ---------------------------------------------------------


def test_paths_follow_the_documented_layout(store: ViewStore) -> None:
    assert store.view_dir("spend") == store.root / "views" / "spend"
    assert store.version_dir("spend", 3) == store.root / "views" / "spend" / "v3"
    assert store.partition_dir("spend", 3, 7) == store.root / "views" / "spend" / "v3" / "p0007"


def test_versions_are_numbered_and_keep_their_layout(store: ViewStore) -> None:
    first, second = layout(), layout(window="1h")
    assert store.create_version(first) == 1
    assert store.create_version(second) == 2
    assert store.versions("spend") == [1, 2]
    assert store.layout("spend", 1) == first
    assert store.layout("spend", 2) == second
    vdir = store.version_dir("spend", 2)
    assert (vdir / "CREATOR").read_text() == f"{os.getpid()}\n"
    assert not list(vdir.parent.glob(".*"))  # built under a temporary name, renamed into place
    assert store.versions("other") == []


def test_a_view_is_listed_once_it_has_a_live_version(store: ViewStore) -> None:
    store.create_version(layout("spend"))
    store.create_version(layout("channels"))
    assert store.views() == []
    assert store.current_version("spend") is None
    store.switch("channels", 1)
    assert store.views() == ["channels"]
    assert store.current_version("channels") == 1


def test_a_missing_layout_and_a_damaged_current_are_errors(store: ViewStore) -> None:
    with pytest.raises(UnknownViewError, match="no view layout in"):
        store.layout("spend", 1)
    store.create_version(layout())
    (store.view_dir("spend") / "CURRENT").write_text("one\n")
    with pytest.raises(StateError, match="CURRENT is damaged; it must hold a version number"):
        store.current_version("spend")


def test_a_layout_of_another_format_is_refused(store: ViewStore) -> None:
    store.create_version(layout())
    path = store.version_dir("spend", 1) / "layout.json"
    payload = json.loads(path.read_text())
    path.write_text(json.dumps({**payload, "format": STORE_FORMAT + 1}))
    with pytest.raises(FormatVersionError, match="rebuild the view"):
        store.layout("spend", 1)


# --- switching versions ----------------------------------------------------------------------


def test_switches_only_move_forward_unless_rolled_back(store: ViewStore) -> None:
    for _ in range(2):
        store.create_version(layout())
    store.switch("spend", 2)
    with pytest.raises(StaleVersionError, match="not making v1 live: v2, a newer version"):
        store.switch("spend", 1)
    assert store.current_version("spend") == 2
    store.switch("spend", 1, rollback=True)
    assert store.current_version("spend") == 1
    with pytest.raises(StateError, match="view 'spend' has no version 9 to switch to"):
        store.switch("spend", 9)


def test_a_version_goes_live_once_every_partition_caught_up(store: ViewStore) -> None:
    store.create_version(layout())
    assert not store.is_complete("spend", 1)
    assert store.finish_catch_up("spend", 1, 0, [0, 1]) is False
    assert store.current_version("spend") is None
    assert store.finish_catch_up("spend", 1, 1, [0, 1]) is True
    assert store.current_version("spend") == 1
    assert store.is_complete("spend", 1)


def test_a_caught_up_version_behind_a_newer_live_one_is_stale(store: ViewStore) -> None:
    for _ in range(2):
        store.create_version(layout())
    store.switch("spend", 2)
    with pytest.raises(StaleVersionError):
        store.finish_catch_up("spend", 1, 0, [0])


# --- completeness, abandoned builds and clean-up ----------------------------------------------


def test_unfinished_versions_are_abandoned_only_when_their_creator_is_gone(
    store: ViewStore,
) -> None:
    for _ in range(3):
        store.create_version(layout())
    assert not store.is_abandoned("spend", 1)  # this process creates it: still building
    (store.version_dir("spend", 2) / "CREATOR").write_text(f"{dead_pid()}\n")
    assert store.is_abandoned("spend", 2)
    (store.version_dir("spend", 3) / "CREATOR").unlink()  # made before creators were recorded
    assert store.is_abandoned("spend", 3)
    store.switch("spend", 3)
    assert not store.is_abandoned("spend", 3)  # live: complete


def test_keep_versions_keeps_the_live_and_newest_complete_ones(store: ViewStore) -> None:
    for _ in range(5):
        store.create_version(layout())
    for version in (1, 2, 3):
        store.switch("spend", version)  # each was live once: complete
    (store.version_dir("spend", 5) / "CREATOR").write_text(f"{dead_pid()}\n")  # abandoned
    cleanup = store.keep_versions("spend", 2)
    assert (cleanup.view, cleanup.dropped, cleanup.busy) == ("spend", (1, 5), ())
    assert store.versions("spend") == [2, 3, 4]  # live 3, newest other complete 2, building 4
    assert not list(store.view_dir("spend").glob(".v*"))  # deleted, not left renamed


def test_a_version_in_use_is_never_deleted(store: ViewStore) -> None:
    for _ in range(3):
        store.create_version(layout())
    store.switch("spend", 3)
    lease = use_version(store.version_dir("spend", 1))
    assert lease is not None
    with lease:
        cleanup = store.drop_versions_except("spend", [])
        assert (cleanup.dropped, cleanup.busy) == ((2,), (1,))
        assert store.versions("spend") == [1, 3]
    assert store.drop_versions_except("spend", []).dropped == (1,)
    assert store.versions("spend") == [3]


def test_a_claim_holds_the_version_and_a_deleted_one_cannot_be_claimed(store: ViewStore) -> None:
    for _ in range(2):
        store.create_version(layout())
    store.switch("spend", 2)
    leases = store.claim("spend", 1, process_id=0)
    try:
        assert store.drop_versions_except("spend", []).busy == (1,)
    finally:
        for lease in leases:
            lease.release()
    store.drop_versions_except("spend", [])
    with pytest.raises(StateError, match=r"v1 was removed \(a flows.replay cleanup\)"):
        store.claim("spend", 1, process_id=0)


# --- partitions: tiles and progress in one commit ---------------------------------------------


def test_a_partition_commits_tiles_and_progress_together(store: ViewStore) -> None:
    store.create_version(layout())
    part = store.open_partition("spend", 1, 1)
    assert part.progress() == PartitionProgress(-1, None, 0, 0)
    assert part.get_many([]) == []
    progress = PartitionProgress(
        41, 1_000, 40, 2, {0: LogPosition(7, 900), 3: LogPosition(2, None)}
    )
    part.commit({b"e\x00a": b"tiles-a", b"e\x00b": b"tiles-b"}, progress)
    assert part.get_many([b"e\x00b", b"e\x00zz", b"e\x00a"]) == [b"tiles-b", None, b"tiles-a"]
    assert part.progress() == progress
    part.close()
    again = store.open_partition("spend", 1, 1)
    assert again.progress() == progress
    again.close()
    assert read_partition_progress(store.partition_dir("spend", 1, 1)) == progress


def test_bulk_commits_are_ingested_files_equal_to_write_batches(
    store: ViewStore, tmp_path: Path
) -> None:
    """A replay-sized commit goes in as one SST file: its blobs, the small commits around it
    and the progress read back as the last commit left them, beside the writer (a secondary
    caught up) and after a reopen; no file is left beside the store."""
    store.create_version(layout())
    part = store.open_partition("spend", 1, 0)
    n = BULK_COMMIT_KEYS + 500
    keys = [f"e\x00k{i:06d}".encode() for i in range(n)]
    expected: dict[bytes, bytes] = {}
    commits = [
        ({k: b"bulk-1-" + k for k in keys}, 10),  # bulk
        ({k: b"small-" + k for k in keys[:50]}, 11),  # write batch over the ingested file
        ({k: b"bulk-2-" + k for k in reversed(keys[25:])}, 12),  # bulk, keys out of order
    ]
    reader = open_secondary(store.partition_dir("spend", 1, 0), tmp_path / "secondary")
    try:
        for puts, offset in commits:
            expected.update(puts)
            progress = PartitionProgress(offset, offset * 100, offset, 0, {1: LogPosition(3, 7)})
            commit_building(part, dict(puts), progress)
            assert part.get_many(keys) == [expected[k] for k in keys]
            assert part.progress() == progress
            reader.try_catch_up_with_primary()
            assert reader.get(keys) == [expected[k] for k in keys]
            assert read_partition_progress(store.partition_dir("spend", 1, 0)) == progress
    finally:
        reader.close()
    part.close()
    assert not [p for p in store.version_dir("spend", 1).iterdir() if ".ingest-" in p.name]
    again = store.open_partition("spend", 1, 0)
    assert again.get_many(keys) == [expected[k] for k in keys]
    again.close()


def test_reopened_stores_and_followers_use_the_shared_block_cache(
    store: ViewStore, tmp_path: Path
) -> None:
    """A shard reopened (a restarted flow) and a reader's follower read through the process's
    one block cache of FEATUREFLOW_BLOCK_CACHE_MB, not the private 8 MB cache that the
    database's OPTIONS file would give them; a replay's once-read blobs stay out of it."""
    store.create_version(layout())
    part = store.open_partition("spend", 1, 0)
    keys = [f"e\x00k{i:06d}".encode() for i in range(3000)]
    part.commit({k: os.urandom(600) for k in keys}, PartitionProgress(1, 1, 1, 0))
    part.close()
    shared = _shared_cache()
    capacity = int(os.environ.get("FEATUREFLOW_BLOCK_CACHE_MB", "256")) << 20
    again = store.open_partition("spend", 1, 0)
    reader = open_secondary(store.partition_dir("spend", 1, 0), tmp_path / "secondary")
    try:
        again._db.flush()
        reader.try_catch_up_with_primary()
        for db in (again._db, reader):
            assert int(db.property_value("rocksdb.block-cache-capacity")) == capacity
        before = shared.get_usage()
        assert again.get_many_once(keys) == again.get_many(keys[:0] + keys)[: len(keys)]
        filled = shared.get_usage()
        assert filled > before  # the cached read filled the shared cache
        assert reader.get(keys) == again.get_many(keys)
    finally:
        reader.close()
        again.close()


def test_a_replays_once_read_blobs_do_not_fill_the_block_cache(store: ViewStore) -> None:
    store.create_version(layout())
    part = store.open_partition("spend", 1, 1)
    keys = [f"e\x00q{i:06d}".encode() for i in range(3000)]
    part.commit({k: os.urandom(600) for k in keys}, PartitionProgress(1, 1, 1, 0))
    part._db.flush()
    try:
        before = _shared_cache().get_usage()
        assert len(part.get_many_once(keys)) == len(keys)
        assert _shared_cache().get_usage() == before
    finally:
        part.close()


def test_a_killed_commits_ingest_file_is_removed_when_the_store_opens(store: ViewStore) -> None:
    store.create_version(layout())
    vdir = store.version_dir("spend", 1)
    vdir.joinpath("p0000").mkdir()
    dead = vdir / f".p0000.ingest-{dead_pid()}.sst"
    live = vdir / f".p0000.ingest-{os.getpid()}.sst"  # this process's: a commit under way
    dead.write_bytes(b"half an sst")
    live.write_bytes(b"being written")
    store.open_partition("spend", 1, 0).close()
    assert not dead.exists()
    assert live.exists()


def test_progress_is_read_beside_its_writer(store: ViewStore) -> None:
    store.create_version(layout())
    path = store.partition_dir("spend", 1, 0)
    assert read_partition_progress(path) == PartitionProgress(-1, None, 0, 0)  # not created yet
    part = store.open_partition("spend", 1, 0)
    try:
        part.commit({}, PartitionProgress(9, 5, 10, 0))
        assert read_partition_progress(path) == PartitionProgress(9, 5, 10, 0)
    finally:
        part.close()


def test_progress_positions_per_source_partition() -> None:
    start = PartitionProgress(-1, None, 0, 0)
    own = start.advanced(2, 2, LogPosition(10, 500), applied=8, late=1)
    both = own.advanced(0, 2, LogPosition(4, 700), applied=3, late=0)
    assert both == PartitionProgress(10, 500, 11, 1, {0: LogPosition(4, 700)})
    assert both.position(2, 2) == LogPosition(10, 500)
    assert both.position(0, 2) == LogPosition(4, 700)
    assert both.position(1, 2) == NOTHING_APPLIED
    assert both.newest() == 700
    assert start.newest() is None


# --- scratch directories of secondaries -------------------------------------------------------


def test_scratch_directories_of_dead_processes_are_swept(tmp_path: Path) -> None:
    dead = tmp_path / f"featureflow-peek-{dead_pid()}-abc"
    live = tmp_path / f"featureflow-client-{os.getpid()}-def"
    other = tmp_path / "featureflow-something-else"
    for path in (dead, live, other):
        path.mkdir()
    assert sweep_scratch(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_many_threads_record_the_same_definitions_at_once(tmp_path: Path) -> None:
    """Each writes its own staging directory; the record ends complete and the pointer names
    it (one shared staging name let one recorder delete the files another was renaming)."""
    from state.definitions import record_definitions, recorded_module

    module = tmp_path / "features.py"
    module.write_text("VIEWS = []\n" * 50)
    schemas = {f"schemas/s{i}.avsc": tmp_path / f"s{i}.avsc" for i in range(20)}
    for path in schemas.values():
        path.write_text('{"type": "record", "name": "r", "fields": []}\n')
    root = tmp_path / "state"
    ViewStore(root)
    start = threading.Barrier(8)

    def record(_: int) -> str:
        start.wait()
        return record_definitions(root, module, schemas, {"spend": 1})

    with ThreadPoolExecutor(8) as pool:
        (sha,) = set(pool.map(record, range(8)))
    found = recorded_module(root)
    assert found is not None
    assert found[0] == sha
    record_dir = root / "definitions" / sha
    assert sorted(p.name for p in (record_dir / "schemas").iterdir()) == sorted(
        Path(rel).name for rel in schemas
    )
    assert not [p for p in (root / "definitions").iterdir() if ".tmp" in p.name]
