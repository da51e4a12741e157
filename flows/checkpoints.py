"""View checkpoints: consistent copies of the live view shards, kept in the warehouse, so a new
host (a restarted cluster process, a new serving follower) starts from a copy and catches up
from its offsets instead of replaying all history.

    <warehouse>/_checkpoints/<view>/<id>/               id = <UTC time>-h<process id>-<uuid8>
        layout.json             the version's layout record, as in the state directory
        p<shard:04d>.sst        every key of the shard's RocksDB (tiles AND applied offsets)
        definitions/...         the deployment's live definitions record (if any)
        manifest.json           written last: the commit marker
            {"format": 1, "view": "user_spend", "version": 3, "process_id": 0,
             "created_at": "<ISO UTC>", "shards": {"0": {"applied_offset": 41, ...}},
             "kept": [0, 2],     every shard the process kept (one without keys has no file)
             "files": {"p0000.sst": {"sha256": "...", "bytes": 123}, ...}}

Consistency: a shard's tiles and its applied offsets (own partition and, in `others`, every source
partition that routed records to it) are one RocksDB written in one WriteBatch (or one ingested SST
file) per commit. A checkpoint reads each shard through a RocksDB secondary caught up with the
writer and exports every key from one iterator (a point-in-time view) into an SST file, so the copy
holds tiles and offsets of one and the same commit. Shards may be at different offsets: restart
already handles that (each shard skips what it applied). A RocksDB Checkpoint of a secondary would
miss the writer's memtable, hence the export.

Restore (flows.run --restore on an empty state directory): per view, the shards the restoring
process keeps (all of them, or its own in a cluster with --separate-state) are each taken from
the newest good checkpoint that holds it, whichever process wrote it: a process restarts from
its own checkpoint, a serving follower gathers every process's shards, a cluster of another
size takes each shard from whoever owned it. Every shard taken comes from checkpoints of one
version and layout: the newest version whose checkpoints hold every shard (a redeployment that
only some processes have checkpointed yet gives way to the version before). A checkpoint is good
when its manifest parses and every file taken from it matches its sha256; one without manifest
(incomplete) or with a bad checksum is refused with a message naming it, and its shards are
taken from the next older ones. Shards of one view may come from checkpoints of different
times: each holds its own applied offsets, and the flow resumes every partition from the
lowest (segments, then Kafka). The shards are ingested into fresh stores (the same version
number) and made live only when all of them are in; when no good checkpoint holds one of
them, the view is not restored and is rebuilt from the log.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from rocksdict import IngestExternalFileOptions, Options, SstFileWriter

from connectors.objectstore import Store, open_store
from flows.errors import FlowError
from state.definitions import DEFINITIONS_DIR
from state.lock import USE_LOCK
from state.store import (
    ViewStore,
    exclusive,
    open_rocks,
    open_secondary,
    progress_of,
    rocks_options,
    scratch_dir,
)

CHECKPOINTS = "_checkpoints"
CHECKPOINT_FORMAT = 1
MANIFEST = "manifest.json"


class CheckpointError(FlowError):
    """A checkpoint cannot be written, or no good checkpoint can be restored."""


@dataclass(frozen=True, slots=True)
class Written:
    """A checkpoint written: where, how many shards and bytes."""

    view: str
    checkpoint_id: str
    shards: int
    bytes: int


def write_checkpoints(
    state: Path, warehouse: str | Path, views: Sequence[str] | None, process_id: int, keep: int
) -> list[Written]:
    """Checkpoint the live version of every view (or `views`) of `state` into the warehouse,
    then keep only the newest `keep` complete checkpoints of each (for this process id).

    Raises:
        CheckpointError: a view is unknown or has no live version.
    """
    store, views_store = open_store(warehouse), ViewStore(state, create=False)
    names = list(views) if views else views_store.views()
    written = [_write_one(store, views_store, state, v, process_id) for v in names]
    for name in names:
        prune(store, name, process_id, keep)
    return written


def _write_one(store: Store, views: ViewStore, state: Path, view: str, process_id: int) -> Written:
    version = views.current_version(view)
    if version is None:
        raise CheckpointError(
            f"view {view!r} has no live version in {state}; run flows.run until it is live, "
            "or leave it out of --views"
        )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    cid = f"{stamp}-h{process_id}-{uuid.uuid4().hex[:8]}"
    base = f"{CHECKPOINTS}/{view}/{cid}"
    vdir = views.version_dir(view, version)
    files: dict[str, dict[str, Any]] = {}
    shards: dict[str, Any] = {}
    kept: list[int] = []  # every shard of the process, an empty one (no file) included
    with _scratch() as tmp:
        _put(store, base, "layout.json", vdir / "layout.json", files)
        for shard_dir in sorted(vdir.glob("p[0-9][0-9][0-9][0-9]")):
            kept.append(int(shard_dir.name[1:]))
            sst, progress = _export(shard_dir, tmp)
            if sst is not None:
                _put(store, base, f"{shard_dir.name}.sst", sst, files)
                shards[str(int(shard_dir.name[1:]))] = progress
        _put_definitions(store, base, state, files)
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "view": view,
        "version": version,
        "process_id": process_id,
        "created_at": datetime.now(UTC).isoformat(),
        "shards": shards,
        "kept": kept,
        "files": files,
    }
    store.write_bytes(f"{base}/{MANIFEST}", orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return Written(view, cid, len(shards), sum(f["bytes"] for f in files.values()))


def _export(shard_dir: Path, tmp: Path) -> tuple[Path | None, dict[str, Any]]:
    """Every key of a shard's RocksDB, read through a secondary at one point in time, as an
    SST file (None when the store holds no key); and the shard's progress in that copy."""
    if not (shard_dir / "CURRENT").is_file():
        return None, {}
    scratch = scratch_dir("peek")
    db = open_secondary(shard_dir, scratch)
    try:
        db.try_catch_up_with_primary()
        progress = progress_of(db)
        target = tmp / f"{shard_dir.name}.sst"
        writer, count = SstFileWriter(Options(raw_mode=True)), 0
        writer.open(str(target))
        it = db.iter()
        it.seek_to_first()
        while it.valid():
            writer[it.key()] = it.value()
            count += 1
            it.next()
        if count:
            writer.finish()
    finally:
        db.close()
        shutil.rmtree(scratch, ignore_errors=True)
    summary = {
        "applied_offset": progress.applied_offset,
        "events_applied": progress.events_applied,
        "others": {str(p): pos.offset for p, pos in progress.others.items()},
    }
    return (target if count else None), summary


def _put(store: Store, base: str, name: str, path: Path, files: dict[str, Any]) -> None:
    store.upload(f"{base}/{name}", path)
    files[name] = {"sha256": _sha256(path), "bytes": path.stat().st_size}


def _put_definitions(store: Store, base: str, state: Path, files: dict[str, Any]) -> None:
    """The live definitions record (CURRENT and its folder), if the deployment recorded one."""
    root = state / DEFINITIONS_DIR
    current = root / "CURRENT"
    if not current.is_file():
        return
    record = root / current.read_text().strip()
    _put(store, base, f"{DEFINITIONS_DIR}/CURRENT", current, files)
    for path in sorted(p for p in record.rglob("*") if p.is_file()):
        _put(store, base, f"{DEFINITIONS_DIR}/{path.relative_to(root)}", path, files)


def checkpoint_ids(store: Store, view: str, process_id: int | None) -> list[str]:
    """Ids of the view's checkpoints of this process id (None: of every process), oldest first
    (complete or not): an id starts with its UTC time."""
    ids = sorted(store.folders(f"{CHECKPOINTS}/{view}"))
    return [c for c in ids if process_id is None or f"-h{process_id}-" in c]


def prune(store: Store, view: str, process_id: int, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than
    the newest complete one (a newer incomplete one may still be being written)."""
    ids = checkpoint_ids(store, view, process_id)
    complete = [c for c in ids if store.exists(f"{CHECKPOINTS}/{view}/{c}/{MANIFEST}")]
    kept = set(complete[-keep:]) if keep > 0 else set()
    newest = complete[-1] if complete else ""
    doomed = [c for c in ids if c not in kept and (c in complete or c < newest)]
    for cid in doomed:
        base = f"{CHECKPOINTS}/{view}/{cid}"
        store.delete(f"{base}/{MANIFEST}")  # first: a reader then sees it incomplete, refuses it
        store.delete_tree(base)
    return doomed


def restore_views(
    state: Path, warehouse: str | Path, needs: Mapping[str, Sequence[int]]
) -> list[str]:
    """Load each view's shards `needs[view]` from the newest good checkpoints holding them
    into an empty state directory; returns a line per view saying what was restored or
    refused (see the module's docstring).

    A state directory that already holds views is left as it is (restore never overwrites
    views; the flow continues from them), so `--restore` can stay in a deployment's flags.
    Two restores into one state directory at once take turns (`RESTORE.lock`): the second
    finds the first's views. One that died before making a view live is done again.
    """
    store, target = open_store(warehouse), ViewStore(state)
    state.mkdir(parents=True, exist_ok=True)
    with exclusive(state / RESTORE_LOCK):  # a second restore waits, then finds the views
        if target.views():
            return [f"--restore: {state} already holds views: continuing from them, not restoring"]
        lines: list[str] = []
        for view, shards in needs.items():
            lines.extend(_restore_view(store, target, state, view, sorted(set(shards))))
        return lines


RESTORE_LOCK = "RESTORE.lock"


@dataclass(frozen=True, slots=True)
class _Source:
    """A checkpoint some of the restored shards are taken from."""

    checkpoint_id: str
    manifest: dict[str, Any]
    shards: list[int]  # the shards taken from it (those without a file start empty)

    @property
    def base(self) -> str:
        return f"{CHECKPOINTS}/{self.manifest['view']}/{self.checkpoint_id}"

    def files(self, primary: bool) -> list[str]:
        """The files to fetch: its shards' (and, from the primary, the layout and the
        definitions record)."""
        held = self.manifest["shards"]
        names = [f"p{s:04d}.sst" for s in self.shards if str(s) in held]
        if primary:
            names += [n for n in self.manifest["files"] if not n.endswith(".sst")]
        return names


def _restore_view(
    store: Store, target: ViewStore, state: Path, view: str, shards: list[int]
) -> list[str]:
    lines: list[str] = []
    ids = list(reversed(checkpoint_ids(store, view, None)))  # newest first
    refused: set[str] = set()
    manifests: dict[str, dict[str, Any] | None] = {}
    while True:
        sources, missing = _choose(store, view, ids, shards, refused, manifests, lines)
        if missing:
            held = ", ".join(str(s) for s in missing)
            lines.append(
                f"no good checkpoint of view {view!r} holds shard(s) {held}: the view is "
                "rebuilt from the log"
            )
            return lines
        try:
            _install_from(store, target, state, view, sources)
        except _RefusedError as exc:
            refused.add(exc.checkpoint_id)
            lines.append(f"refused checkpoint {exc.checkpoint_id} of view {view!r}: {exc.reason}")
            continue
        used = ", ".join(f"{s.checkpoint_id} ({len(s.shards)} shards)" for s in sources)
        lines.append(f"restored view {view!r} v{sources[0].manifest['version']} from {used}")
        return lines


def _choose(
    store: Store,
    view: str,
    ids: list[str],
    shards: list[int],
    refused: set[str],
    manifests: dict[str, dict[str, Any] | None],
    lines: list[str],
) -> tuple[list[_Source], list[int]]:
    """Each shard's newest checkpoint that kept it (of `ids`, newest first, not refused),
    all of one version and layout: the newest version whose checkpoints keep every shard (a
    redeployment that not every process has checkpointed yet falls back to the version
    before); and, when none does, the shards the newest version's checkpoints miss."""
    held: list[tuple[str, dict[str, Any], set[int]]] = []
    for cid in ids:
        if cid in refused:
            continue
        if cid not in manifests:  # read once per restore, refusals said once
            manifests[cid] = _read_manifest(store, view, cid, lines)
        manifest = manifests[cid]
        if manifest is None:
            continue
        kept = {int(s) for s in manifest.get("kept", manifest["shards"])}
        if kept & set(shards):
            held.append((cid, manifest, kept))
    first: tuple[list[_Source], list[int]] | None = None
    for version in dict.fromkeys(_version(m) for _, m, _ in held):
        sources: list[_Source] = []
        wanted = set(shards)
        for cid, manifest, kept in held:
            if _version(manifest) == version and kept & wanted:
                sources.append(_Source(cid, manifest, sorted(kept & wanted)))
                wanted -= kept
        if not wanted:
            return sources, []
        first = first or (sources, sorted(wanted))
    return first or ([], list(shards))


def _version(manifest: dict[str, Any]) -> tuple[Any, Any]:
    return manifest["version"], manifest["files"]["layout.json"]["sha256"]


def _read_manifest(store: Store, view: str, cid: str, lines: list[str]) -> dict[str, Any] | None:
    try:
        return _manifest(store, f"{CHECKPOINTS}/{view}/{cid}")
    except CheckpointError as exc:
        lines.append(f"refused checkpoint {cid} of view {view!r}: {exc}")
        return None


class _RefusedError(Exception):
    """A checkpoint a restore chose has a missing or corrupt file."""

    def __init__(self, checkpoint_id: str, reason: CheckpointError) -> None:
        super().__init__(checkpoint_id, reason)
        self.checkpoint_id, self.reason = checkpoint_id, reason


def _manifest(store: Store, base: str) -> dict[str, Any]:
    """A checkpoint's manifest.

    Raises:
        CheckpointError: no manifest (incomplete), or a bad one.
    """
    try:
        manifest: dict[str, Any] = orjson.loads(store.read_bytes(f"{base}/{MANIFEST}"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{store.describe(base)} has no {MANIFEST}: incomplete (its writer stopped "
            "before the end); it is skipped and pruned by the next flows.checkpoint"
        ) from None
    except orjson.JSONDecodeError as exc:
        raise CheckpointError(f"{store.describe(base)}/{MANIFEST} is not JSON ({exc})") from exc
    if manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{store.describe(base)} has format {manifest.get('format')!r}; this version "
            f"reads {CHECKPOINT_FORMAT}: upgrade featureflow"
        )
    return manifest


FETCH_THREADS = 4  # files downloaded at once: I/O and hashing release the interpreter


class _Fetch:
    """Files of a checkpoint downloading side by side into `tmp`, each hashed as it arrives;
    `ready(name)` waits for one and gives its verified local path, so the restore ingests a
    shard while the next ones download. Leaving the block cancels what has not started."""

    def __init__(self, store: Store, source: _Source, names: list[str], tmp: Path) -> None:
        self.tmp, self._id = tmp, source.checkpoint_id
        self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="checkpoint-fetch")
        files = source.manifest["files"]
        self._files: dict[str, Future[Path]] = {
            name: self._pool.submit(_fetch_file, store, source.base, name, files[name], tmp)
            for name in names
        }

    def __enter__(self) -> _Fetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def ready(self, name: str) -> Path:
        """The verified local copy of file `name` of the checkpoint.

        Raises:
            _RefusedError: the file is missing, or its checksum does not match.
        """
        try:
            return self._files[name].result()
        except CheckpointError as exc:
            raise _RefusedError(self._id, exc) from exc

    def all_ready(self) -> None:
        for name in self._files:
            self.ready(name)


def _fetch_file(store: Store, base: str, name: str, meta: dict[str, Any], tmp: Path) -> Path:
    local = tmp / name
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        digest = store.download(f"{base}/{name}", local)
    except FileNotFoundError:
        raise CheckpointError(f"{store.describe(base)}/{name} is missing") from None
    if digest != meta["sha256"]:
        raise CheckpointError(
            f"{store.describe(base)}/{name} has sha256 {digest[:16]}..., the manifest says "
            f"{meta['sha256'][:16]}... (corrupt or changed)"
        )
    return local


def _install_from(
    store: Store, target: ViewStore, state: Path, view: str, sources: list[_Source]
) -> None:
    """The shards of `sources` as version `version` of the view (the primary's layout and
    definitions record), made live; each shard ingested as soon as its file verifies.
    Nothing is made live unless every file verifies.

    Raises:
        _RefusedError: a file of one of the checkpoints is missing or corrupt.
    """
    version = int(sources[0].manifest["version"])
    vdir = target.version_dir(view, version)
    staging = vdir.with_name(f".{vdir.name}.restore")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with _scratch() as tmp, ExitStack() as fetching:
        try:
            fetches = [
                fetching.enter_context(_Fetch(store, src, src.files(i == 0), tmp / str(i)))
                for i, src in enumerate(sources)
            ]
            shutil.copyfile(fetches[0].ready("layout.json"), staging / "layout.json")
            for src, fetch in zip(sources, fetches, strict=True):
                _ingest_shards(staging, src, fetch)
            for fetch in fetches:  # the definitions record too, before anything is made live
                fetch.all_ready()
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        (staging / USE_LOCK).touch()
        if vdir.exists() and target.current_version(view) != version:
            shutil.rmtree(vdir)  # a restore that died before making it live left it: not in use
        staging.rename(vdir)
        target.switch(view, version)
        _install_definitions(state, tmp / "0")


def _ingest_shards(staging: Path, source: _Source, fetch: _Fetch) -> None:
    ingest = IngestExternalFileOptions()
    ingest.set_move_files(True)  # the downloaded copy is ours: link it in, no second copy
    for shard in source.shards:
        if str(shard) not in source.manifest["shards"]:
            continue  # kept without keys: its store starts empty
        name = f"p{shard:04d}"
        sst = fetch.ready(f"{name}.sst")
        db = open_rocks(staging / name, rocks_options())
        db.ingest_external_file([str(sst)], ingest)
        db.close()


def _install_definitions(state: Path, tmp: Path) -> None:
    source, root = tmp / DEFINITIONS_DIR, state / DEFINITIONS_DIR
    if source.is_dir() and not (root / "CURRENT").is_file():
        shutil.copytree(source, root, dirs_exist_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="featureflow-checkpoint-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
