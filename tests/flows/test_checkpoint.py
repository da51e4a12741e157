"""View checkpoints (flows.checkpoint, flows.run --restore) on a local and an S3 warehouse:
a round trip, a follower bootstrapped from a checkpoint equal to one that replayed everything,
corrupt and incomplete checkpoints refused for the next older one, pruning by --keep, and
shards gathered from the checkpoints of several processes (a follower of a cluster, a cluster
of another size)."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from connectors.objectstore import open_store
from connectors.partitioner import partition_for
from flows.checkpoints import CHECKPOINTS, MANIFEST, checkpoint_ids, restore_views
from state.client import FeatureClient
from state.store import ViewStore
from tests.helpers import make_events, run_command, write_definitions

KEYS = [f"user{k}" for k in range(30)]
VIEWS = ("spend", "channels")
PARTITIONS = 3  # write_definitions' default: shards 0-2
NEEDS = {v: range(PARTITIONS) for v in VIEWS}


def ok(module: str, *args: str) -> str:
    result = run_command(module, *args)
    assert result.returncode == 0, f"{module}: {result.stderr[-3000:]}"
    return result.stdout


def reads(state: Path) -> dict[str, Any]:
    with FeatureClient(state) as client:
        return {v: client.get_many(v, KEYS) for v in VIEWS}


def ingest(root: Path, common: list[str], seed: int, start_us: int) -> None:
    path = root / f"events{seed}.parquet"
    pq.write_table(make_events(1500, 30, seed=seed, start_us=start_us), path)
    ok("flows.ingest", *common, str(path))


def setup(root: Path, warehouse: str) -> list[str]:
    features = write_definitions(root / "defs")
    common = ["--features", str(features), "--warehouse", warehouse]
    ingest(root, common, 1, 1_780_000_000_000_000)
    ok("flows.run", *common, "--state", str(root / "live"), "--until-caught-up")
    return common


def test_a_follower_bootstrapped_from_a_checkpoint_equals_one_that_replayed_everything(
    tmp_path: Path, warehouse_location: str
) -> None:
    common = setup(tmp_path, warehouse_location)
    out = ok(
        "flows.checkpoint", "--warehouse", warehouse_location, "--state", str(tmp_path / "live")
    )
    assert out.count("checkpoint ") == 2
    ingest(tmp_path, common, 2, 1_780_300_000_000_000)  # more history after the checkpoint
    follower = ["--state", str(tmp_path / "follower"), "--until-caught-up"]
    restored = ok("flows.run", *common, *follower, "--restore")
    assert "restored view 'spend'" in restored
    assert "restored view 'channels'" in restored
    ok("flows.run", *common, "--state", str(tmp_path / "replayed"), "--until-caught-up")
    ok("flows.run", *common, "--state", str(tmp_path / "live"), "--until-caught-up")
    assert reads(tmp_path / "follower") == reads(tmp_path / "replayed") == reads(tmp_path / "live")
    assert any(r["count"] for r in reads(tmp_path / "follower")["spend"])


def test_a_corrupt_or_incomplete_checkpoint_is_refused_and_the_next_older_used(
    tmp_path: Path, warehouse_location: str
) -> None:
    common = setup(tmp_path, warehouse_location)
    live = ["--warehouse", warehouse_location, "--state", str(tmp_path / "live"), "--views"]
    for _ in range(3):
        ok("flows.checkpoint", *live, "spend")
    store = open_store(warehouse_location)
    ids = checkpoint_ids(store, "spend", 0)
    assert len(ids) == 3
    newest, middle = (f"{CHECKPOINTS}/spend/{c}" for c in (ids[2], ids[1]))
    sst = next(n for n in store.tree(newest) if n.endswith(".sst"))
    data = bytearray(store.read_bytes(f"{newest}/{sst}"))
    data[len(data) // 2] ^= 0xFF
    store.write_bytes(f"{newest}/{sst}", bytes(data))
    store.delete(f"{middle}/{MANIFEST}")
    out = ok(
        "flows.run",
        *common,
        "--state",
        str(tmp_path / "new"),
        "--views",
        "spend",
        "--until-caught-up",
        "--restore",
    )
    assert f"refused checkpoint {ids[2]} of view 'spend'" in out
    assert "(corrupt or changed)" in out
    assert f"refused checkpoint {ids[1]} of view 'spend'" in out
    assert "incomplete" in out
    assert f"restored view 'spend' v1 from {ids[0]}" in out
    with FeatureClient(tmp_path / "new") as new, FeatureClient(tmp_path / "live") as old:
        assert new.get_many("spend", KEYS) == old.get_many("spend", KEYS)


def test_keep_prunes_older_checkpoints(tmp_path: Path, warehouse_location: str) -> None:
    setup(tmp_path, warehouse_location)
    live = ["--warehouse", warehouse_location, "--state", str(tmp_path / "live"), "--views"]
    for _ in range(4):
        ok("flows.checkpoint", *live, "channels", "--keep", "2")
    store = open_store(warehouse_location)
    ids = checkpoint_ids(store, "channels", 0)
    assert len(ids) == 2
    assert all(store.exists(f"{CHECKPOINTS}/channels/{c}/{MANIFEST}") for c in ids)


class _Died(BaseException):
    """Stands for kill -9: raised where the process would die, caught by nobody."""


def test_a_restore_killed_between_its_steps_is_done_again_by_the_next_one(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A restore that died after a view's version directory was in place but before it was
    made live (the last two steps of `_install`) left a directory the next restore could not
    rename onto; the next `--restore` now replaces it and finishes, equal to the live host."""
    warehouse = str(tmp_path / "wh")
    setup(tmp_path, warehouse)
    ok("flows.checkpoint", "--warehouse", warehouse, "--state", str(tmp_path / "live"))
    new = tmp_path / "new"

    def die(*args: Any, **kwargs: Any) -> None:
        raise _Died

    with monkeypatch.context() as patch:
        patch.setattr(ViewStore, "switch", die)
        with pytest.raises(_Died):
            restore_views(new, warehouse, NEEDS)
    assert ViewStore(new).views() == []  # nothing live: the next restore starts again
    lines = restore_views(new, warehouse, NEEDS)
    assert all(line.startswith("restored view") for line in lines), lines
    assert reads(new) == reads(tmp_path / "live")


def test_two_restores_at_once_into_one_state_directory_take_turns(tmp_path: Path) -> None:
    """Both finish: one restores every view, the other finds them and leaves them as they
    are (they shared the staging directories and could delete each other's files)."""
    warehouse = str(tmp_path / "wh")
    setup(tmp_path, warehouse)
    ok("flows.checkpoint", "--warehouse", warehouse, "--state", str(tmp_path / "live"))
    new = tmp_path / "new"
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda _: restore_views(new, warehouse, NEEDS), [0, 1]))
    restored = [o for o in outcomes if all(line.startswith("restored view") for line in o)]
    skipped = [o for o in outcomes if o and "already holds views" in o[0]]
    assert len(restored) == 1, outcomes
    assert len(skipped) == 1, outcomes
    assert reads(new) == reads(tmp_path / "live")


def as_process(live: Path, state: Path, shards: set[int]) -> Path:
    """A copy of `live` holding only `shards` of every view, as a process of a cluster with
    its own state directory holds only its own."""
    shutil.copytree(live, state)
    for shard_dir in state.glob("views/*/v*/p[0-9][0-9][0-9][0-9]"):
        if int(shard_dir.name[1:]) not in shards:
            shutil.rmtree(shard_dir)
    return state


def checkpoint_as(warehouse: str, state: Path, process_id: int, *views: str) -> None:
    args = ["--warehouse", warehouse, "--state", str(state), "--process-id", str(process_id)]
    ok("flows.checkpoint", *args, *(("--views", ",".join(views)) if views else ()))


def test_a_follower_gathers_every_process_shards_and_a_corrupt_one_falls_back(
    tmp_path: Path, warehouse_location: str
) -> None:
    """Process 0 keeps shards 0 and 2, process 1 shard 1, each checkpointing its own: a
    follower keeping every shard takes each from the newest good checkpoint holding it,
    whichever process wrote it; a corrupt file refuses that checkpoint and its shard comes
    from the same process's older one; reads equal the live host's."""
    setup(tmp_path, warehouse_location)
    live = tmp_path / "live"
    h0 = as_process(live, tmp_path / "h0", {0, 2})
    h1 = as_process(live, tmp_path / "h1", {1})
    checkpoint_as(warehouse_location, h0, 0)
    checkpoint_as(warehouse_location, h1, 1, "spend")
    checkpoint_as(warehouse_location, h1, 1, "spend")
    store = open_store(warehouse_location)
    older, newer = checkpoint_ids(store, "spend", 1)
    (h0_spend,) = checkpoint_ids(store, "spend", 0)
    corrupt = f"{CHECKPOINTS}/spend/{newer}/p0001.sst"
    data = bytearray(store.read_bytes(corrupt))
    data[len(data) // 2] ^= 0xFF
    store.write_bytes(corrupt, bytes(data))

    lines = restore_views(tmp_path / "follower", warehouse_location, {"spend": range(3)})
    assert lines[0].startswith(f"refused checkpoint {newer} of view 'spend'"), lines
    # newest first: process 1's older checkpoint was written after process 0's
    assert lines[1] == (
        f"restored view 'spend' v1 from {older} (1 shards), {h0_spend} (2 shards)"
    ), lines
    with FeatureClient(tmp_path / "follower") as new, FeatureClient(live) as old:
        assert new.get_many("spend", KEYS) == old.get_many("spend", KEYS)
        assert any(r["count"] for r in new.get_many("spend", KEYS))

    # 'channels' was checkpointed by process 0 only: shard 1 is in no checkpoint
    lines = restore_views(tmp_path / "partial", warehouse_location, {"channels": range(3)})
    assert lines == [
        "no good checkpoint of view 'channels' holds shard(s) 1: the view is rebuilt from the log"
    ]
    assert ViewStore(tmp_path / "partial").views() == []


def test_a_cluster_of_another_size_restores_each_shard_from_whoever_kept_it(
    tmp_path: Path, warehouse_location: str
) -> None:
    """A 1-process deployment's checkpoint (every shard) starts process 1 of a 2-process
    cluster with separate states: it keeps shard 1 only (shards go to process shard mod 2),
    restored with its applied offsets; its keys read as on the 1-process host."""
    setup(tmp_path, warehouse_location)
    live = tmp_path / "live"
    ok("flows.checkpoint", "--warehouse", warehouse_location, "--state", str(live))
    lines = restore_views(tmp_path / "p1", warehouse_location, {v: [1] for v in VIEWS})
    assert all(line.startswith("restored view") and "(1 shards)" in line for line in lines), lines
    shard_dirs = sorted(p.name for p in (tmp_path / "p1").glob("views/spend/v*/p*"))
    assert shard_dirs == ["p0001"]
    mine = [k for k in KEYS if partition_for(k, PARTITIONS) == 1]
    assert mine
    with FeatureClient(tmp_path / "p1") as restored, FeatureClient(live) as whole:
        assert restored.get_many("spend", mine) == whole.get_many("spend", mine)
        assert restored.get_many("channels", mine) == whole.get_many("channels", mine)
    src = ViewStore(live).open_partition("spend", 1, 1).progress()
    assert ViewStore(tmp_path / "p1").open_partition("spend", 1, 1).progress() == src


def test_a_version_not_every_process_has_checkpointed_falls_back_to_the_one_before(
    tmp_path: Path, warehouse_location: str
) -> None:
    """Process 0 has checkpointed a newer version (a redeployment) that process 1 has not
    yet: a follower needing every shard restores the version both have, not a mix."""
    setup(tmp_path, warehouse_location)
    live = tmp_path / "live"
    checkpoint_as(warehouse_location, as_process(live, tmp_path / "h0", {0, 2}), 0, "spend")
    checkpoint_as(warehouse_location, as_process(live, tmp_path / "h1", {1}), 1, "spend")
    store = open_store(warehouse_location)
    (old_h0,) = checkpoint_ids(store, "spend", 0)
    (h1,) = checkpoint_ids(store, "spend", 1)
    newer = "99991231T235959000000Z-h0-newer000"  # process 0's checkpoint of a version 2
    for name in store.tree(f"{CHECKPOINTS}/spend/{old_h0}"):
        data = store.read_bytes(f"{CHECKPOINTS}/spend/{old_h0}/{name}")
        if name == MANIFEST:
            data = data.replace(b'"version": 1', b'"version": 2')
        store.write_bytes(f"{CHECKPOINTS}/spend/{newer}/{name}", data)
    lines = restore_views(tmp_path / "follower", warehouse_location, {"spend": range(3)})
    assert lines == [f"restored view 'spend' v1 from {h1} (1 shards), {old_h0} (2 shards)"]
    with FeatureClient(tmp_path / "follower") as new, FeatureClient(live) as old:
        assert new.get_many("spend", KEYS) == old.get_many("spend", KEYS)
