"""The file-system seam: every file operation raft_sqlite performs *outside* SQLite goes through here.

SQLite's own files are reached through an apsw VFS (``NodeStore.open(..., vfs=...)``); everything else the
library writes (the WAL high-water mark ``raft.db-hwm``, the files created at store creation, directory
syncs, the interval ``fdatasync`` of NORMAL mode, backup folders and manifests, restore copies, the disk
reserve) is written through the functions of this module, which delegate to one installed backend.

The default backend, :class:`OsFileSystem`, is the operating system (``os`` / ``shutil``) and adds
nothing. Tests install another one with :func:`installed` (for instance the fault model in
``tests/support/faultvfs.py``, which puts these files under the same power-loss and I/O-error model as
SQLite's files: an unsynced write may be lost or torn, a new directory entry is durable only after its
directory was synced). This is hashicorp/raft-wal's VFS seam, for the files SQLite does not own.

Durability contract of each operation (what a backend must model):

* ``open``/``write``/``pwrite``/``ftruncate``: change the file's *current* content only; nothing is durable
  until ``fsync``/``fdatasync`` of that file returns.
* ``fsync``/``fdatasync``: the file's content (not its directory entry) is durable when it returns.
* a created, renamed or removed name (``open`` with ``O_CREAT``, ``rename``/``replace``, ``unlink``,
  ``mkdir``, ``rmtree``) is durable only once ``sync_dir`` of its parent directory returns.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer  # what os.write accepts (bytes, bytearray, memoryview...); stub-only


class OsFileSystem:
    """The real file system (the default backend)."""

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        """``os.open`` (always with ``O_CLOEXEC``)."""
        return os.open(path, flags | os.O_CLOEXEC, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def read(self, fd: int, n: int) -> bytes:
        return os.read(fd, n)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        return os.pread(fd, n, offset)

    def write(self, fd: int, data: ReadableBuffer) -> int:
        return os.write(fd, data)

    def pwrite(self, fd: int, data: ReadableBuffer, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def sync_dir(self, path: str) -> None:
        """fsync the directory ``path`` itself: names created, renamed or removed in it become durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        """``os.rename`` (fails if ``dst`` is a non-empty directory)."""
        os.rename(src, dst)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def mkdir(self, path: str, mode: int = 0o700) -> None:
        os.mkdir(path, mode)

    def makedirs(self, path: str, mode: int = 0o700, exist_ok: bool = False) -> None:
        os.makedirs(path, mode=mode, exist_ok=exist_ok)

    def rmtree(self, path: str, ignore_errors: bool = False) -> None:
        shutil.rmtree(path, ignore_errors=ignore_errors)


_lock = threading.Lock()
_backend: OsFileSystem = OsFileSystem()


def backend() -> OsFileSystem:
    """The installed backend (an :class:`OsFileSystem` unless a test installed another)."""
    return _backend


@contextlib.contextmanager
def installed(fs: OsFileSystem) -> Iterator[OsFileSystem]:
    """Install ``fs`` as the process-wide backend for the duration of the block (tests only: it affects
    every store of the process). Backends subclass :class:`OsFileSystem` and override what they model."""
    global _backend
    with _lock:
        prev, _backend = _backend, fs
    try:
        yield fs
    finally:
        with _lock:
            _backend = prev


# Module-level shorthands: call sites write ``fsio.fsync(fd)``, which always reaches the installed backend.
def open(path: str, flags: int, mode: int = 0o600) -> int:  # noqa: A001 - mirrors os.open
    return _backend.open(path, flags, mode)


def close(fd: int) -> None:
    _backend.close(fd)


def read(fd: int, n: int) -> bytes:
    return _backend.read(fd, n)


def pread(fd: int, n: int, offset: int) -> bytes:
    return _backend.pread(fd, n, offset)


def write(fd: int, data: ReadableBuffer) -> int:
    return _backend.write(fd, data)


def write_all(fd: int, data: ReadableBuffer) -> None:
    """Write all of ``data`` at the current offset (loops over short writes)."""
    view = memoryview(data)
    while view:
        view = view[_backend.write(fd, view):]


def pwrite(fd: int, data: ReadableBuffer, offset: int) -> int:
    return _backend.pwrite(fd, data, offset)


def ftruncate(fd: int, size: int) -> None:
    _backend.ftruncate(fd, size)


def fsync(fd: int) -> None:
    _backend.fsync(fd)


def fdatasync(fd: int) -> None:
    _backend.fdatasync(fd)


def sync_dir(path: str) -> None:
    _backend.sync_dir(path)


def fdatasync_path(path: str) -> bool:
    """``fdatasync`` the file at ``path`` (opened read-only for the purpose); False if it does not exist.
    Any other error (of the open or of the sync) is raised as the OSError it is."""
    try:
        fd = _backend.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        _backend.fdatasync(fd)
    finally:
        _backend.close(fd)
    return True


def rename(src: str, dst: str) -> None:
    _backend.rename(src, dst)


def replace(src: str, dst: str) -> None:
    _backend.replace(src, dst)


def unlink(path: str) -> None:
    _backend.unlink(path)


def mkdir(path: str, mode: int = 0o700) -> None:
    _backend.mkdir(path, mode)


def makedirs(path: str, mode: int = 0o700, exist_ok: bool = False) -> None:
    _backend.makedirs(path, mode, exist_ok)


#: Bytes by which :func:`rmtree` shrinks a big file per step before it unlinks it. Unlinking a big file
#: frees all its blocks in one file-system transaction, and every fdatasync of the node that comes next
#: waits for the journal commit that carries it (on ext4 mounted with ``discard`` that commit also trims
#: every freed block). Measured (issue 13, a 356 MB backup deleted next to single FULL appends): the
#: worst append 37-100 ms with a plain unlink, 25-31 ms in steps of 64 MiB, 16-22 ms of 32 MiB, 7-11 ms
#: of 8 MiB and 4.5-7 ms of 2 MiB (the deletion then takes ~2.4x as long: ~460 instead of ~190 ms).
SHRINK_STEP_BYTES = 2 << 20
#: Pause between two shrink steps (seconds), so that the node's commits find short journal commits.
SHRINK_PAUSE = 0.001


def shrink_gradually(path: str, step: int | None = None, pause: float | None = None,
                     expect: os.stat_result | None = None) -> None:
    """Truncate the regular file ``path`` to zero from its end, ``step`` bytes at a time (default
    :data:`SHRINK_STEP_BYTES`; 0 turns shrinking off) with ``pause`` seconds between steps (default
    :data:`SHRINK_PAUSE`), so that its blocks are freed in small file-system transactions.

    Only the very file seen is touched: ``expect`` (default: ``lstat(path)``) must be a regular file with
    one link (truncating a file with another name would empty that name too), and the file opened
    (``O_NOFOLLOW | O_NONBLOCK``: never through a final symlink, never blocking on a FIFO) must be that
    inode, still with one link; a name or a parent directory swapped meanwhile leads elsewhere and the
    file is left alone. Best effort: any ``OSError`` leaves the file as it is (the unlink that follows
    reports what matters)."""
    step = SHRINK_STEP_BYTES if step is None else step
    pause = SHRINK_PAUSE if pause is None else pause
    if step <= 0:
        return
    try:
        st = os.lstat(path) if expect is None else expect
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size <= step:
            return
        fd = open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(now.st_mode) or now.st_nlink != 1:
            return
        size = now.st_size
        while size > step:
            size -= step
            ftruncate(fd, size)
            if pause:
                time.sleep(pause)
    except OSError:
        pass
    finally:
        close(fd)


def rmtree(path: str | os.PathLike[str], ignore_errors: bool = False) -> None:
    """Remove the directory tree ``path`` (``shutil.rmtree``: a symlink ``path`` is refused), its big
    files first shrunk by :func:`shrink_gradually`, so that removing a backup or a restore's scratch
    copy next to a running node does not stall the node's commits behind one huge journal commit. The
    tree is walked like ``shutil.rmtree`` walks it: each directory opened relative to its parent's
    descriptor, never through a symlink (``os.fwalk``), and each file checked by its directory
    descriptor before it is opened (see :func:`shrink_gradually`)."""
    path = os.fspath(path)
    if not os.path.islink(path.rstrip("/") or "/"):
        with contextlib.suppress(OSError):
            for root, _dirs, files, dirfd in os.fwalk(path, follow_symlinks=False):
                for name in files:
                    try:
                        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                    except OSError:
                        continue
                    shrink_gradually(os.path.join(root, name), expect=st)
    _backend.rmtree(path, ignore_errors)


def make_dirs(path: str, mode: int = 0o700, sync: Callable[[str], None] | None = None) -> None:
    """Create the directory ``path`` (``mode``) and its missing parents, each new name made durable by a
    sync of its parent (``sync``, default :func:`sync_dir`: a backup whose call returned must not vanish
    with its folder's name after a power cut). An existing directory is left alone; an existing
    non-directory raises ``FileExistsError``."""
    sync = sync or sync_dir
    missing = []
    p = path
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in reversed(missing):
        try:
            mkdir(d, mode)
        except FileExistsError:
            if not os.path.isdir(d):
                raise
            continue
        sync(os.path.dirname(d))


builtins_open = builtins.open  # this module's open() is the seam's, for descriptors

#: The first 16 bytes of every SQLite database file.
SQLITE_HEADER = b"SQLite format 3\x00"
#: A folder holding a file of this name is a node's data_dir (``layout.MAIN_DB``; kept here as a literal:
#: the seam imports nothing of the library but the error types).
_MAIN_DB = "raft.db"


def check_output_path(path: str | os.PathLike[str]) -> str:
    """The absolute real path of ``path``, an output file an operator named, after refusing
    (:class:`~raft_sqlite.errors.OutputRefused`) one that lies in a node's data_dir (its folder holds
    ``raft.db``, at any depth of the real path) or that is an existing SQLite database: writing there could
    replace a node's own files. Checked before anything is written."""
    from .errors import OutputRefused

    real = os.path.realpath(os.fspath(path))
    folder = os.path.dirname(real)
    d = folder
    while True:
        if os.path.isfile(os.path.join(d, _MAIN_DB)):
            raise OutputRefused(f"refused to write {os.fspath(path)!r}: it is inside the data_dir {d} (a folder "
                                f"holding {_MAIN_DB}); write outputs outside it")
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    try:
        with builtins_open(real, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        head = b""
    if head == SQLITE_HEADER:
        raise OutputRefused(f"refused to write {os.fspath(path)!r}: it is an SQLite database; pick another name")
    return real


def write_output_atomically(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path``, an output file an operator named (a metrics textfile, an export),
    atomically: :func:`check_output_path` first, then a hidden temporary name in the same folder
    (``.NAME.<random>.tmp``, which node_exporter's textfile collector ignores), written, ``mode``, fsync'ed,
    renamed over ``path``, the folder fsync'ed. On any failure the temporary file is removed and ``path`` is
    left as it was (the OSError propagates)."""
    import tempfile

    real = check_output_path(path)
    folder, name = os.path.split(real)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        try:
            write_all(fd, data)
            os.fchmod(fd, mode)
            fsync(fd)
        finally:
            os.close(fd)
        replace(tmp, real)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    sync_dir(folder)


def write_file_atomically(folder: str, name: str, data: bytes) -> None:
    """Write ``folder/name`` so that after a power cut it is either absent (or its previous content) or
    complete: a temporary name, fsync, rename, fsync of ``folder``."""
    tmp = os.path.join(folder, f".{name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        unlink(tmp)  # a leftover of an interrupted earlier attempt
    fd = open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        write_all(fd, data)
        fsync(fd)
    finally:
        close(fd)
    replace(tmp, os.path.join(folder, name))
    sync_dir(folder)
