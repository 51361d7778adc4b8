"""The disk reserve: a pre-allocated file in data_dir (``layout.RESERVE_FILE``) that holds no data.

A snapshot that fills the disk fails its own write (StorageFault: the store fail-stops). Its partial
chunks are garbage that the next open removes, but opening writes too (the recovery transaction of
``raft.db``, the removal of the orphan chunks from ``chunks.db``), and on a disk that is still full those
writes fail, so every reopen would fail until someone deleted files by hand. The reserve breaks that
circle: when the writes of an open fail because the disk is full, open deletes the reserve, retries
once, then checkpoints ``chunks.db`` to give the partial snapshot's WAL space back and re-creates the
reserve if there is room again. (The same idea as CockroachDB's "ballast" file.)

Everything here is best effort and never raises for the reserve itself: a store without a reserve
works exactly as before, it only loses this one way out of a full disk.
"""

from __future__ import annotations

import errno
import logging
import os

import apsw

from . import fsio, layout

log = logging.getLogger("raft_sqlite.reserve")

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def reserve_path(data_dir: str) -> str:
    """Path of the reserve file of ``data_dir``."""
    return os.path.join(os.fspath(data_dir), layout.RESERVE_FILE)


def is_disk_full(exc: BaseException) -> bool:
    """True if ``exc`` or an exception it was raised from (``__cause__``/``__context__``) says the disk
    or quota is full (SQLite's SQLITE_FULL, or ENOSPC/EDQUOT)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, apsw.FullError) or (isinstance(e, OSError) and e.errno in _FULL_ERRNOS):
            return True
        e = e.__cause__ or e.__context__
    return False


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer can still allocate on the file system holding ``path``."""
    st = os.statvfs(os.fspath(path))
    return st.f_bavail * st.f_frsize


def release(data_dir: str) -> int:
    """Delete the reserve of ``data_dir``; returns the bytes given back (0 if there was none)."""
    p = reserve_path(data_dir)
    try:
        size = os.stat(p).st_blocks * 512
        fsio.unlink(p)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("%s: cannot remove the disk reserve: %s", p, exc)
        return 0
    return size


def ensure(data_dir: str, size: int = layout.DISK_RESERVE_BYTES) -> bool:
    """Make sure the reserve of ``data_dir`` exists with ``size`` bytes allocated on disk; returns
    whether it does. If the disk has no room for it, nothing is left behind and False is returned
    (logged at WARNING)."""
    p = reserve_path(data_dir)
    try:
        st = os.stat(p)
        if st.st_size == size and st.st_blocks * 512 >= size:
            return True
    except FileNotFoundError:
        pass
    except OSError:
        return False
    try:
        fd = fsio.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        log.warning("%s: cannot create the disk reserve: %s", p, exc)
        return False
    try:
        try:
            os.posix_fallocate(fd, 0, size)  # real blocks, not a sparse file
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                raise
            fsio.ftruncate(fd, 0)
            block = b"\0" * 65536
            left = size
            while left > 0:
                left -= fsio.write(fd, block[:min(left, len(block))])
        fsio.ftruncate(fd, size)
    except OSError as exc:
        fsio.close(fd)
        release(data_dir)
        log.warning("%s: no room for the %d-byte disk reserve (%s); the store runs without it", p, size, exc)
        return False
    fsio.close(fd)
    return True


__all__ = ["ensure", "free_bytes", "is_disk_full", "release", "reserve_path"]
