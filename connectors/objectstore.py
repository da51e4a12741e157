"""Where the warehouse's bytes live: a local directory, an S3-compatible object store, or any
other pyarrow filesystem, behind one small seam (`Store`) that `connectors.segments` writes
segments, manifests, schemas and dead letters through.

    location                                 store
    data/warehouse, /abs/path, file:///p     LocalStore   (fsync + rename; flock for manifests)
    s3://bucket/prefix[?endpoint_override=]  S3Store      (pyarrow S3FileSystem for data files,
                                                           boto3 for conditional puts)
    any other pyarrow URI (gs://, hdfs://)   FileSystemStore (single writer per source only)

Every path a store takes is relative to its root, '/'-separated (`tx/p0000/....parquet`).

What each store guarantees to the manifest protocol (connectors.manifest):
- `write_bytes` / `write_parquet` replace an object whole: a reader sees the old bytes or the new
  ones, never part (local: temp file, fsync, rename; S3: one PUT or one multipart completion).
- `create` writes an object only if it does not exist and says whether it did, atomically
  against concurrent writers: local `link(2)` of a fsynced temp file; S3 `PutObject` with
  `If-None-Match: *` (HTTP 412 when the key exists). pyarrow's S3FileSystem cannot send that
  header, so those small objects go through boto3 (botocore), the AWS SDK every S3-compatible
  store is tested against. Other pyarrow filesystems have no such primitive: `create` there
  checks then writes, which is safe for one writer per source only (said in the README).

Configuration of S3 comes from the standard AWS variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION or AWS_DEFAULT_REGION, AWS_ENDPOINT_URL)
and the URI's `endpoint_override` query parameter, which `with_endpoint` adds for the
commands' `--warehouse-endpoint` flag. A store that writes creates its bucket if it is missing.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import os
import shutil
import threading
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from connectors.errors import ObjectStoreError, SegmentError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
DEFAULT_REGION = "us-east-1"
ROW_GROUP_ROWS = 128 * 1024


class Store(Protocol):
    """The bytes under one warehouse root; paths are relative, '/'-separated."""

    url: str  # the root as the user gave it (for messages)
    local: bool  # a local directory: flock and rename protect its manifests

    def read_bytes(self, rel: str) -> bytes:
        """The whole object. Raises FileNotFoundError when it does not exist."""
        ...

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Create or replace the object whole."""
        ...

    def create(self, rel: str, data: bytes) -> bool:
        """Write the object only if it does not exist; False (nothing written) if it does."""
        ...

    def delete(self, rel: str) -> None:
        """Remove the object (nothing if it does not exist)."""
        ...

    def exists(self, rel: str) -> bool: ...

    def size(self, rel: str) -> int: ...

    def list(self, folder: str) -> list[str]:
        """Names (not paths) of the objects directly under `folder`, sorted; [] if none."""
        ...

    def write_parquet(self, rel: str, table: pa.Table) -> int:
        """Write `table` as a Parquet object (replaced whole); its size in bytes."""
        ...

    def folders(self, folder: str) -> builtins.list[str]:
        """Names of the folders directly under `folder`, sorted; [] if none."""
        ...

    def tree(self, folder: str) -> builtins.list[str]:
        """Paths (relative to `folder`) of every object under it, sorted."""
        ...

    def upload(self, rel: str, source: Path) -> None:
        """Copy a local file into the object (replaced whole)."""
        ...

    def delete_tree(self, folder: str) -> None:
        """Remove every object under `folder` (and the folder)."""
        ...

    def download(self, rel: str, target: Path) -> str:
        """Copy the object into a local file; returns the sha256 (hex) of its bytes, hashed as
        they are copied. Raises FileNotFoundError when it is missing."""
        ...

    def parquet_file(self, rel: str) -> pq.ParquetFile:
        """Open a Parquet object for reading (row groups read on demand)."""
        ...

    def describe(self, rel: str) -> str:
        """The object's full location, for messages."""
        ...


def is_uri(location: str | Path) -> bool:
    """True for `scheme://...` locations other than file://."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def with_endpoint(location: str, endpoint: str | None) -> str:
    """`location` with `endpoint` as its `endpoint_override` (the --warehouse-endpoint flag);
    unchanged for local paths or when `endpoint` is empty."""
    if not endpoint or not location.startswith("s3://"):
        return location
    parts = urllib.parse.urlsplit(location)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query["endpoint_override"] = endpoint
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def open_store(location: str | Path) -> Store:
    """The store for a warehouse location (see the module docstring for the forms).

    Raises:
        ObjectStoreError: the URI cannot be parsed or its filesystem is not available.
    """
    text = str(location)
    if text.startswith("file://"):
        return LocalStore(Path(urllib.parse.urlsplit(text).path))
    if not is_uri(text):
        return LocalStore(Path(text))
    if text.startswith("s3://"):
        return S3Store(text)
    try:
        fs, base = pafs.FileSystem.from_uri(text)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise ObjectStoreError(
            f"warehouse {text!r} is not a filesystem URI pyarrow can open ({exc}); give a local "
            "path, s3://bucket/prefix, or another pyarrow.fs URI"
        ) from exc
    return FileSystemStore(text, fs, base)


class LocalStore:
    """A local directory. Writes go to a temporary file, are fsynced and renamed into place."""

    local = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def describe(self, rel: str) -> str:
        return str(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def write_bytes(self, rel: str, data: bytes) -> None:
        replace_atomically(self.path(rel), lambda tmp: tmp.write_bytes(data))

    def create(self, rel: str, data: bytes) -> bool:
        path = self.path(rel)
        made = [False]

        def link(tmp: Path) -> None:
            tmp.write_bytes(data)
            fsync_path(tmp)
            try:
                os.link(tmp, path)
                made[0] = True
            except FileExistsError:
                pass

        _guard_disk(path, lambda: _with_temp(path, link))
        return made[0]

    def delete(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def size(self, rel: str) -> int:
        return self.path(rel).stat().st_size

    def list(self, folder: str) -> list[str]:
        directory = self.path(folder)
        return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []

    def write_parquet(self, rel: str, table: pa.Table) -> int:
        path = self.path(rel)
        replace_atomically(path, lambda tmp: _write_table(table, str(tmp)))
        return path.stat().st_size

    def parquet_file(self, rel: str) -> pq.ParquetFile:
        return pq.ParquetFile(self.path(rel), memory_map=True)

    def folders(self, folder: str) -> builtins.list[str]:
        directory = self.path(folder)
        return (
            sorted(p.name for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []
        )

    def tree(self, folder: str) -> builtins.list[str]:
        base = self.path(folder)
        files = base.rglob("*") if base.is_dir() else iter(())
        return sorted(str(p.relative_to(base)) for p in files if p.is_file())

    def upload(self, rel: str, source: Path) -> None:
        replace_atomically(self.path(rel), lambda tmp: shutil.copyfile(source, tmp))

    def delete_tree(self, folder: str) -> None:
        shutil.rmtree(self.path(folder), ignore_errors=True)

    def download(self, rel: str, target: Path) -> str:
        with open(self.path(rel), "rb") as src:
            return _copy_hashed(src.read, target)


class FileSystemStore:
    """Any pyarrow filesystem under a base path. `create` checks then writes: safe for one
    writer per source only (no conditional put in the pyarrow API)."""

    local = False

    def __init__(self, url: str, fs: pafs.FileSystem, base: str) -> None:
        self.url, self.fs, self.base = url, fs, base.rstrip("/")

    def full(self, rel: str) -> str:
        return f"{self.base}/{rel}" if self.base else rel

    def describe(self, rel: str) -> str:
        return f"{self.url.split('?')[0].rstrip('/')}/{rel}"

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.full(rel)) as stream:
                return bytes(stream.read())
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise self._failed("read", rel, exc) from exc

    def write_bytes(self, rel: str, data: bytes) -> None:
        try:
            with self.fs.open_output_stream(self.full(rel)) as stream:
                stream.write(data)
        except OSError as exc:
            raise self._failed("write", rel, exc) from exc

    def create(self, rel: str, data: bytes) -> bool:
        if self.exists(rel):
            return False
        self.write_bytes(rel, data)
        return True

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.full(rel))

    def exists(self, rel: str) -> bool:
        return bool(self.fs.get_file_info(self.full(rel)).type == pafs.FileType.File)

    def size(self, rel: str) -> int:
        return int(self.fs.get_file_info(self.full(rel)).size)

    def list(self, folder: str) -> list[str]:
        return self._names(folder, pafs.FileType.File)

    def write_parquet(self, rel: str, table: pa.Table) -> int:
        try:
            _write_table(table, self.full(rel), self.fs)
        except OSError as exc:
            raise self._failed("write", rel, exc) from exc
        return self.size(rel)

    def parquet_file(self, rel: str) -> pq.ParquetFile:
        return pq.ParquetFile(self.fs.open_input_file(self.full(rel)), pre_buffer=True)

    def folders(self, folder: str) -> builtins.list[str]:
        return self._names(folder, pafs.FileType.Directory)

    def tree(self, folder: str) -> builtins.list[str]:
        base = self.full(folder).rstrip("/")
        selector = pafs.FileSelector(base, allow_not_found=True, recursive=True)
        infos = self.fs.get_file_info(selector)
        return sorted(str(i.path[len(base) + 1 :]) for i in infos if i.type == pafs.FileType.File)

    def upload(self, rel: str, source: Path) -> None:
        self._before_write()
        try:
            with open(source, "rb") as src, self.fs.open_output_stream(self.full(rel)) as out:
                shutil.copyfileobj(src, out, 8 << 20)
        except OSError as exc:
            raise self._failed("upload to", rel, exc) from exc

    def delete_tree(self, folder: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_dir(self.full(folder))

    def download(self, rel: str, target: Path) -> str:
        with self.fs.open_input_stream(self.full(rel)) as src:
            return _copy_hashed(src.read_buffer, target)  # Arrow's buffers: no copy to bytes

    def _before_write(self) -> None:
        """Hook for stores that prepare before a write (S3: create the bucket)."""

    def _names(self, folder: str, kind: pafs.FileType) -> builtins.list[str]:
        selector = pafs.FileSelector(self.full(folder), allow_not_found=True)
        try:
            infos = self.fs.get_file_info(selector)
        except OSError as exc:
            raise self._failed("list", folder, exc) from exc
        return sorted(str(i.base_name) for i in infos if i.type == kind)

    def _failed(self, what: str, rel: str, exc: Exception) -> ObjectStoreError:
        return ObjectStoreError(
            f"could not {what} {self.describe(rel)} ({exc}); check that the store answers, "
            "the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and the endpoint "
            "(--warehouse-endpoint or AWS_ENDPOINT_URL)"
        )


class S3Store(FileSystemStore):
    """An S3 bucket (any S3-compatible server) under a prefix: data through pyarrow's
    S3FileSystem, conditional puts through boto3. The bucket is created on the first write."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(parts.query))
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        if not self.bucket:
            raise ObjectStoreError(f"warehouse {url!r} names no bucket; give s3://bucket/prefix")
        endpoint = query.get("endpoint_override") or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        region = query.get("region") or _env("AWS_REGION", "AWS_DEFAULT_REGION") or DEFAULT_REGION
        self.endpoint, self.region = endpoint, region
        fs = pafs.S3FileSystem(**_fs_options(endpoint, region))
        super().__init__(url, fs, f"{self.bucket}/{self.prefix}".rstrip("/"))
        self._client: Any = None
        self._bucket_ready = False
        self._guard = threading.Lock()

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._ensure_bucket()
        self._put(rel, data)

    def create(self, rel: str, data: bytes) -> bool:
        self._ensure_bucket()
        return self._put(rel, data, IfNoneMatch="*")

    def write_parquet(self, rel: str, table: pa.Table) -> int:
        self._ensure_bucket()
        return super().write_parquet(rel, table)

    def client(self) -> Any:
        """The boto3 S3 client of this store (created once, thread-safe to share)."""
        with self._guard:
            if self._client is None:
                import boto3  # imported here: local warehouses do not need it loaded
                from botocore.config import Config

                config = Config(retries={"max_attempts": 5, "mode": "standard"})
                self._client = boto3.client(
                    "s3", endpoint_url=self.endpoint, region_name=self.region, config=config
                )
            return self._client

    def _put(self, rel: str, data: bytes, **condition: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client().put_object(Bucket=self.bucket, Key=self.key(rel), Body=data, **condition)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if condition and (status in (409, 412) or code == "PreconditionFailed"):
                return False  # 412: the key exists; 409: a concurrent conditional write won
            raise self._conditional_failed(rel, exc, bool(condition)) from exc
        except BotoCoreError as exc:
            raise self._failed("write", rel, exc) from exc
        return True

    def _conditional_failed(self, rel: str, exc: Exception, conditional: bool) -> ObjectStoreError:
        if conditional and "NotImplemented" in str(exc):
            return ObjectStoreError(
                f"the object store at {self.endpoint or 'AWS S3'} refused a conditional put "
                f"(If-None-Match: *) of {self.describe(rel)} ({exc}); manifests need it to "
                "commit atomically: use a store that supports conditional writes (AWS S3, "
                "MinIO, S3Proxy 3+, R2, GCS)"
            )
        return self._failed("write", rel, exc)

    def _before_write(self) -> None:
        self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client()
        try:
            client.head_bucket(Bucket=self.bucket)
        except ClientError:
            try:
                client.create_bucket(Bucket=self.bucket, **_bucket_location(self.region))
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise self._failed("create the bucket of", "", exc) from exc
        except BotoCoreError as exc:
            raise self._failed("reach the bucket of", "", exc) from exc
        self._bucket_ready = True


_COPY_BLOCK = 8 << 20


def _copy_hashed(read: Callable[[int], Any], target: Path) -> str:
    """Copy a stream (`read(size)` gives its next block, any buffer, empty at the end) into a
    new local file; the sha256 of the bytes copied (hashlib and the reads release the
    interpreter: downloads in threads overlap)."""
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        while len(block := read(_COPY_BLOCK)):
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def _fs_options(endpoint: str | None, region: str) -> dict[str, Any]:
    options: dict[str, Any] = {"region": region}
    if endpoint:
        split = urllib.parse.urlsplit(endpoint)
        options["endpoint_override"] = split.netloc or endpoint
        options["scheme"] = split.scheme or "https"
    key, secret = _env("AWS_ACCESS_KEY_ID"), _env("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        options.update(access_key=key, secret_key=secret, session_token=_env("AWS_SESSION_TOKEN"))
    return options


def _bucket_location(region: str) -> dict[str, Any]:
    if region == DEFAULT_REGION:
        return {}  # us-east-1 takes no LocationConstraint
    return {"CreateBucketConfiguration": {"LocationConstraint": region}}


def _write_table(table: pa.Table, where: str, fs: pafs.FileSystem | None = None) -> None:
    pq.write_table(
        table,
        where,
        filesystem=fs,
        compression="zstd",
        row_group_size=ROW_GROUP_ROWS,
        store_schema=True,
    )


def owned_temp(path: Path) -> Path:
    """A temporary name beside `path` owned by this thread of this process:
    `.<name>.tmp-<thread>-<pid>`. Unique per thread (two threads of one process writing the
    same file must not share one), with the pid last so a later process can tell whether its
    owner is still alive (`tmp.name.rsplit("-", 1)[-1]`)."""
    return path.with_name(f".{path.name}.tmp-{threading.get_native_id()}-{os.getpid()}")


def replace_file(
    path: Path,
    write: Callable[[Path], object],
    *,
    tmp: Path | None = None,
    on_replaced: Callable[[], None] | None = None,
) -> None:
    """The one atomic write of a local file: `write(tmp)` to a temporary file beside `path`
    (default `.<name>.<uuid>.tmp`), fsync it, rename it onto `path` (the commit point), call
    `on_replaced()`, fsync the directory. The temporary file is removed on any error, and an
    OSError (a full disk, say) reaches the caller, which names it in its own terms."""

    def replace(temporary: Path) -> None:
        write(temporary)
        fsync_path(temporary)
        os.replace(temporary, path)

    _with_temp(path, replace, tmp)
    if on_replaced is not None:
        on_replaced()
    fsync_path(path.parent)


def replace_atomically(
    path: Path, write: Callable[[Path], object], on_replaced: Callable[[], None] | None = None
) -> None:
    """`replace_file` in the warehouse.

    Raises:
        SegmentError: the disk is full (naming the path); the temporary file is removed.
    """
    _guard_disk(path, lambda: replace_file(path, write, on_replaced=on_replaced))


def _with_temp(path: Path, use: Callable[[Path], None], tmp: Path | None = None) -> None:
    """`use(tmp)` for a temporary file beside `path` (default `.<name>.<uuid>.tmp`), removed
    afterwards whatever happens (after a rename there is nothing left to remove)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp or path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        use(tmp)
    finally:
        tmp.unlink(missing_ok=True)


def _guard_disk(path: Path, run: Callable[[], None]) -> None:
    try:
        run()
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        raise SegmentError(
            f"no space left on the device holding {path.parent} (writing {path}); nothing "
            "was committed: free space there (or move the warehouse) and run the command again"
        ) from exc


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path (what makes a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VersionedDocument:
    """A small document that changes by compare-and-swap on a store without rename: immutable
    numbered versions `<folder>/<version:020d>.json`, the newest is current.

    `commit(n, data)` creates version n+1 only if no writer did (`Store.create`), so of two
    writers that read version n exactly one succeeds. Old versions are pruned (`keep` newest);
    a writer whose number had been pruned and reused sees a newer version after its put and
    withdraws it, so a commit is never hidden behind a newer one."""

    def __init__(self, store: Store, folder: str, keep: int = 20) -> None:
        self.store, self.folder, self.keep = store, folder, keep

    def rel(self, version: int) -> str:
        return f"{self.folder}/{version:020d}.json"

    def versions(self) -> list[int]:
        names = self.store.list(self.folder)
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def read(self, attempts: int = 16) -> tuple[int, bytes | None]:
        """The newest version and its bytes; (0, None) when there is none.

        Raises:
            ObjectStoreError: versions kept disappearing between listing and reading.
        """
        for _ in range(attempts):
            versions = self.versions()
            if not versions:
                return 0, None
            try:
                return versions[-1], self.store.read_bytes(self.rel(versions[-1]))
            except FileNotFoundError:
                continue  # pruned between the listing and the read: list again
        raise ObjectStoreError(
            f"{self.store.describe(self.folder)} kept changing while being read; retry"
        )

    def commit(self, read_version: int, data: bytes) -> bool:
        """Make `data` version read_version + 1; False (nothing changed) if another writer
        made that version first."""
        mine = read_version + 1
        if not self.store.create(self.rel(mine), data):
            return False
        versions = self.versions()
        if versions[-1] > mine:
            self.store.delete(self.rel(mine))
            return False
        for old in versions[: -self.keep]:
            self.store.delete(self.rel(old))
        return True
