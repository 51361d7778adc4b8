"""The exclusive lock of a data_dir: one process, one store per data_dir.

Two :class:`~raft_sqlite.NodeStore` handles on one data_dir fork the node's state (a stale handle can
write an older term or truncate committed entries), so :meth:`NodeStore.open` and
:func:`raft_sqlite.restore` hold :class:`DataDirLock` for their whole life. It is an ``flock(LOCK_EX)``
on ``data_dir/raft.lock`` (mode 0600):

* ``flock`` locks belong to the open file description, so a second open in the *same* process is
  refused too (POSIX ``fcntl`` record locks would let it through);
* the kernel drops the lock when the holding process dies (SIGKILL, power loss): a node restarts
  without any cleanup, and a stale holder record left in the file means nothing;
* the holder (pid, host, since, node_id) is written into the file after locking, so the refusal
  names who holds it.

The lock file is never deleted by a store (deleting a lock file while others may have it open is
how two holders happen); backups copy only the database files, never the lock.
:func:`holder` probes the lock without keeping it (read-only CLI commands use it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

from . import layout
from .errors import DataDirError, DataDirLocked

log = logging.getLogger("raft_sqlite.lock")

#: How long :meth:`DataDirLock.acquire` retries a lock that is busy before refusing. Only long enough
#: to ride out a momentary probe by :func:`holder` (microseconds); a real holder keeps it for good.
BUSY_RETRY_SECONDS = 0.1

_T = TypeVar("_T")


@dataclass(frozen=True)
class Holder:
    """Who holds a data_dir lock, as recorded in the lock file (fields are None when unknown, e.g.
    while the holder is between locking and writing its record)."""

    pid: int | None
    host: str | None
    since: float | None  #: unix time the lock was taken
    node_id: str | None

    def describe(self) -> str:
        """One phrase naming the holder, for error messages."""
        if self.pid is None:
            return "another process (holder record not written yet)"
        since = "" if self.since is None else time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(self.since))
        node = "" if self.node_id is None else f" (node {self.node_id!r})"
        return f"process {self.pid} on host {self.host}{node}{since}"


def lock_path(data_dir: str | os.PathLike[str]) -> str:
    """Path of the lock file of ``data_dir``."""
    return os.path.join(os.fspath(data_dir), layout.LOCK_FILE)


def check_data_dir(data_dir: str | os.PathLike[str]) -> str:
    """Return ``data_dir`` as a str if it is usable as a data_dir (absent, or a directory); raise
    :class:`DataDirError` if it exists and is not a directory (a regular file, a dangling symlink...)."""
    p = os.fspath(data_dir)
    if not isinstance(p, str):
        raise TypeError(f"data_dir must be a str or os.PathLike of str, not {type(data_dir).__name__}")
    if os.path.lexists(p) and not os.path.isdir(p):
        kind = "a dangling symlink" if os.path.islink(p) else "not a directory"
        raise DataDirError(f"data_dir {p} exists and is {kind}; give a directory (or a path that does not exist)")
    return p


def _read_holder(path: str) -> Holder:
    try:
        with open(path, "rb") as f:
            d = json.loads(f.read(4096) or b"null")
    except (OSError, ValueError):
        d = None
    if not isinstance(d, dict):
        return Holder(None, None, None, None)

    def get(k: str, t: type[_T] | tuple[type[_T], ...]) -> _T | None:
        v = d.get(k)
        return v if isinstance(v, t) and not isinstance(v, bool) else None

    return Holder(get("pid", int), get("host", str), get("since", (int, float)), get("node_id", str))


class DataDirLock:
    """An exclusive lock on a data_dir, held until :meth:`release` (or the process dies). Create one
    with :meth:`acquire`; usable as a context manager."""

    def __init__(self, data_dir: str, fd: int, created: bool):  # use DataDirLock.acquire()
        self.data_dir = data_dir
        self.path = lock_path(data_dir)
        #: True if :meth:`acquire` created the lock file (EXTRA mode then fsyncs data_dir).
        self.created = created
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, data_dir: str | os.PathLike[str], *, node_id: str | None = None) -> DataDirLock:
        """Lock the existing directory ``data_dir`` exclusively for this process and open file
        description (creating ``raft.lock``, mode 0600, if needed) and write the holder record into it.

        Raises :class:`DataDirLocked` (naming the holder) if any process, this one included, holds it;
        :class:`DataDirError` if ``data_dir`` is not a usable directory or the lock file cannot be
        created/opened (permissions)."""
        data_dir = check_data_dir(data_dir)
        if not os.path.isdir(data_dir):
            raise DataDirError(f"data_dir {data_dir} does not exist")
        path = lock_path(data_dir)
        deadline = time.monotonic() + BUSY_RETRY_SECONDS
        for _ in range(10_000):  # bounded: each retry is a race lost to another process
            created = False
            try:
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
                except FileNotFoundError:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                    created = True
            except FileExistsError:
                continue  # created by someone else between our two opens: open it again
            except OSError as exc:
                raise DataDirError(f"cannot open the lock file {path}: {exc.strerror or exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise DataDirError(f"cannot lock {path}: {exc.strerror or exc}") from exc
                if time.monotonic() < deadline:
                    time.sleep(0.005)
                    continue
                h = _read_holder(path)
                raise DataDirLocked(data_dir, h) from None
            # The file may have been unlinked (or replaced) between our open and our lock: then we
            # locked an orphan inode and must start again on the file the path names now.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            break
        else:
            raise DataDirError(f"cannot lock {path}: the lock file keeps being replaced")
        lock = cls(data_dir, fd, created)
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o077:
                log.warning("%s: lock file mode was %04o; tightened to 0600", path, st.st_mode & 0o7777)
                os.fchmod(fd, 0o600)
            rec = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                              "node_id": node_id}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, rec, 0)
        except OSError as exc:
            lock.release()
            raise DataDirError(f"cannot write the holder record into {path}: {exc.strerror or exc}") from exc
        return lock

    @property
    def held(self) -> bool:
        """True until :meth:`release`."""
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (closing its descriptor). Idempotent. The lock file stays in place."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the only descriptor of the open file description drops the flock

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<DataDirLock {self.path} {'held' if self.held else 'released'}>"


def holder(data_dir: str | os.PathLike[str]) -> Holder | None:
    """Who holds the lock of ``data_dir`` now, or None if nobody does (or there is no lock file).

    Probes with a shared, non-blocking ``flock`` that is dropped at once: it never waits, writes
    nothing, and a :meth:`DataDirLock.acquire` that races with it retries for
    :data:`BUSY_RETRY_SECONDS` instead of failing."""
    path = lock_path(data_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return _read_holder(path)
            return None
        return None  # we got it: nobody holds it (closing fd releases our probe)
    finally:
        os.close(fd)


class GcLock:
    """The store's garbage-collection lock (``kernel.gc_lock``): whoever deletes snapshot chunks holds it,
    and so does a hot backup while it pins its two read snapshots (raft.db, then chunks.db), so that
    every chunk a pinned raft.db names is still in the pinned chunks.db.

    In the process it is a re-entrant thread lock. While a thread holds it (outermost level) it also
    holds ``flock(LOCK_EX)`` on ``data_dir/raft.gc.lock``, which a backup taken by *another process*
    (``raft-sqlite backup`` on a running node, :class:`raft_sqlite.backup.LiveSource`) takes for the
    microseconds of its pin. The store waits for that flock at most :data:`GC_PIN_WAIT` seconds and then
    goes on without it (logged): a stuck or stopped backup process must never stall the node's snapshot
    retention. The backup still checks on what it pinned that no chunk it needs is missing, so a pin
    that was not honoured fails that backup, never the store. Without the lock file (a read-only
    data_dir) the lock is in-process only."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._rlock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None  # opened at the first use (the store creates data_dir after this)
        self._closed = False

    def _file(self) -> int | None:
        if self._fd is None and not self._closed:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except OSError as exc:
                log.debug("%s: no cross-process gc lock (%s)", self.path, exc)
        return self._fd

    def __enter__(self) -> GcLock:
        self._rlock.acquire()
        try:
            if self._depth == 0 and self._file() is not None:
                assert self._fd is not None, "opened by _file()"
                try:
                    _flock_within(self._fd, GC_PIN_WAIT)
                except TimeoutError:
                    log.warning("%s: a backup in another process held the gc pin for more than %.1f s; going "
                                "on without it (that backup will fail its consistency check)", self.path,
                                GC_PIN_WAIT)
                except OSError as exc:
                    log.warning("%s: cannot take the gc pin (%s); going on without it", self.path, exc)
        except BaseException:  # an interrupt while waiting: leave the lock as it was found
            if self._depth == 0 and self._fd is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._rlock.release()
            raise
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._rlock.release()

    def close(self) -> None:
        """Close the lock file (releasing its flock). Idempotent."""
        with self._rlock:
            fd, self._fd, self._closed = self._fd, None, True
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)


#: Longest wait (seconds) for the gc pin: by the store for a backup in another process, and by such a
#: backup for the store.
GC_PIN_WAIT = 2.0


def _flock_within(fd: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            raise TimeoutError
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


@contextlib.contextmanager
def gc_pin(data_dir: str) -> Iterator[None]:
    """Hold the gc pin of the store in ``data_dir`` (see :class:`GcLock`) from another process: while held,
    the store deletes no snapshot chunk. Waits at most :data:`GC_PIN_WAIT` seconds, then raises
    :class:`TimeoutError`. Creates the lock file if the store never did (an older store: nothing honours
    the pin then, which the backup's own consistency check covers)."""
    path = os.path.join(data_dir, layout.GC_LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError:
        try:  # a read-only view of data_dir (a backup sidecar's mount): flock works on a read-only descriptor
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            log.warning("%s: cannot open the gc pin (%s); the backup relies on its chunk check alone", path, exc)
            yield
            return
    try:
        _flock_within(fd, GC_PIN_WAIT)
        yield
    finally:
        os.close(fd)  # releases the flock
