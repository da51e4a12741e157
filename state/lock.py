"""Locks on view versions: who writes a version, who reads it, and when it may be deleted.

    <state>/views/<view>/v<N>/USE.lock             shared flock, held by every process that
                                                    writes or reads vN while it has vN open
    <state>/views/<view>/v<N>/WRITER-p<id>.lock    exclusive flock, held by the flows.run or
                                                    flows.replay process <id> of a cluster that
                                                    writes vN; holds "pid command" as text

A version is deleted only by a process that takes an exclusive, non-blocking lock on its
USE.lock, so a version in use by a writer or a reader is never deleted. Two writers of the same
version with the same cluster process id are refused with the holder's pid; the processes of one
bytewax cluster (different process ids) share a version, and a flows.replay building a new
version runs beside the flows.run that keeps the live one fresh. flock locks end with their
process, so a kill -9 leaves nothing stale behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
from pathlib import Path

from state.errors import StateLockedError

USE_LOCK = "USE.lock"


def _writer_lock_name(process_id: int) -> str:
    return f"WRITER-p{process_id}.lock"


class VersionLease:
    """An open flock on one lock file; `release()` (or process exit) ends it."""

    __slots__ = ("_fd", "path")

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def note(self, text: str) -> None:
        """Replace the lock file's text (who holds it), for the message of a refused process."""
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, text.encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops its flock
            self._fd = -1

    def __enter__(self) -> VersionLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _open_lock_file(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        return None  # the version directory is gone
    except PermissionError:
        try:
            return os.open(path, os.O_RDONLY)  # a read-only state dir: readers still lock
        except OSError:
            return None


def _try_flock(path: Path, mode: int) -> VersionLease | None:
    fd = _open_lock_file(path)
    if fd is None:
        return None
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return VersionLease(path, fd)


def use_version(version_dir: Path) -> VersionLease | None:
    """Mark a version in use (shared lock) while this process has it open.

    Returns None when the version is gone or being deleted right now."""
    lease = _try_flock(version_dir / USE_LOCK, fcntl.LOCK_SH)
    if lease is not None and not (version_dir / "layout.json").is_file():
        lease.release()  # deleted between the caller's look and the lock
        return None
    return lease


def claim_unused(version_dir: Path) -> VersionLease | None:
    """An exclusive lock on a version no process uses (None if one does): hold it to delete."""
    return _try_flock(version_dir / USE_LOCK, fcntl.LOCK_EX)


def claim_writer(
    state: Path, view: str, version: int, version_dir: Path, process_id: int
) -> VersionLease:
    """Become the writer of `version` for cluster process `process_id`.

    Raises:
        StateLockedError: another live process writes this version as the same process id.
    """
    path = version_dir / _writer_lock_name(process_id)
    lease = _try_flock(path, fcntl.LOCK_EX)
    if lease is None:
        holder = _holder(path)
        raise StateLockedError(
            f"another flows.run or flows.replay ({holder}) holds state dir {str(state)!r}: it "
            f"writes view {view!r} v{version} as cluster process {process_id}; stop it or use "
            "another --state"
        )
    lease.note(f"pid {os.getpid()}: {' '.join(sys.argv)}\n")
    return lease


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "pid unknown"
