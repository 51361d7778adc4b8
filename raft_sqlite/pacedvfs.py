"""Writeback in small pieces for background writers: an apsw VFS that syncs a file every ``sync_bytes``
written (RocksDB's ``bytes_per_sync``, PostgreSQL's ``checkpoint_flush_after``).

Why: a background writer (a snapshot streaming into chunks.db, a checkpoint copying a grown WAL into
raft.db) writes into the page cache at memory speed and syncs once at the end. Until then the data sits
in the cache, or in the disk's (here: the virtual disk's) write cache, and the log's next commit, whose
fdatasync is a cache flush of the device, pays for all of it: measured on this project's VM, a
foreground 4 KiB write + fdatasync that takes 60-150 us idle took up to 40 ms while a snapshot wrote
64 MiB between its syncs. Syncing the background file every ``sync_bytes`` bounds what any foreground
flush can find ahead of it at about that much, whatever the transaction or checkpoint size.

Only raft.db's checkpoint connection (:mod:`raft_sqlite.checkpointer`) opens files through this VFS: a
checkpoint is one SQLite call that may copy a WAL of any size (after a hot backup held it back: tens of
MiB), and this is the only way to cut its writes into pieces. Every read and write of that connection
costs one Python call, which the commit path never pays. chunks.db does not use it: its 1 MiB commits and
checkpoints already sync every 1 MiB (``fsync.CHUNKS_PRAGMAS``), and pacing it as well made a snapshot
slower (171-192 MB/s against 219-235) and the appends' p99 worse (9-11 ms against 7-8 ms) in the same
runs. An extra sync is always safe for SQLite (it only adds a barrier), so the layer changes no
durability rule; it is stacked on whatever VFS the store uses (the fault-injection VFS of the tests).

The syncs run without the GIL. A Python VFS calls its base VFS with the GIL held, so a sync made through
``super().xSync`` froze every Python thread of the process (the committer, an event loop) for as long as
the disk took: measured, a checkpoint of 948 frames right after an open stopped the main thread for 176 ms,
and a pass-through Python VFS under a writer raised another thread's p99 wake-up delay from ~1 ms to ~6 ms.
Given ``fd_of`` (the store's pinned descriptors, :class:`raft_sqlite.sqlitewal.PinnedFiles`: a descriptor
of a SQLite file must never be closed while SQLite has it open), a file syncs through
``os.fdatasync`` of that descriptor, which releases the GIL: the pacing syncs entirely, and SQLite's own
syncs first (then its ``xSync``, with nothing left to write, keeps SQLite's exact semantics).

Given ``on_sync`` (the store's metrics, ``commit.SyncListener``), each sync of a file is timed and
reported as ``on_sync("wal" | "db", seconds)``: two clock reads per sync, never per read or write.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import apsw

#: Bytes written to one file between two syncs (default of :func:`paced_vfs`).
SYNC_BYTES = 1 << 20

_lock = threading.Lock()
_vfses: dict[tuple[str, int], PacedVFS] = {}


class PacedFile(apsw.VFSFile):
    """A file of the base VFS that syncs itself after every ``sync_bytes`` written (through ``fd``, a
    descriptor of the same file it must not close, when one is given: without the GIL)."""

    def __init__(self, base: str, name: Any, flags: list[int], sync_bytes: int, fd: int = -1,
                 on_sync: Callable[[str, float], None] | None = None, file: str = "db") -> None:
        super().__init__(base, name, flags)
        self._limit = sync_bytes
        self._unsynced = 0
        self._fd = fd
        self._on_sync = on_sync
        self._file = file
        #: syncs made by the pacing (not asked for by SQLite)
        self.paced_syncs = 0

    def xWrite(self, data: bytes, offset: int) -> None:  # noqa: N802 - apsw's method name
        super().xWrite(data, offset)
        self._unsynced += len(data)
        if self._unsynced >= self._limit:
            self._unsynced = 0
            self.paced_syncs += 1
            t0 = time.perf_counter()
            if self._fd >= 0:
                os.fdatasync(self._fd)  # (an OSError fails the checkpoint: the checkpointer fail-stops the store)
            else:
                super().xSync(apsw.SQLITE_SYNC_NORMAL)
            self._synced(t0)

    def xSync(self, flags: int) -> None:  # noqa: N802 - apsw's method name
        self._unsynced = 0
        t0 = time.perf_counter()
        if self._fd >= 0:
            os.fdatasync(self._fd)  # the data, the GIL released; SQLite's own sync below then finds it clean
        super().xSync(flags)
        self._synced(t0)

    def _synced(self, t0: float) -> None:
        cb = self._on_sync
        if cb is not None:
            cb(self._file, time.perf_counter() - t0)


class PacedVFS(apsw.VFS):
    """The VFS ``name`` over ``base`` (None or "": SQLite's default) whose files are :class:`PacedFile`.
    ``fd_of(path)``: a descriptor of ``path`` to sync through, owned (and closed) by the caller, or None.
    ``on_sync(file, seconds)``: told of each sync ("wal" for a ``-wal`` file, else "db"), or None."""

    def __init__(self, name: str, base: str | None, sync_bytes: int,
                 fd_of: Callable[[str], int] | None = None,
                 on_sync: Callable[[str, float], None] | None = None) -> None:
        self.sync_bytes = sync_bytes
        self.base_name = base or ""
        self.registered_name = name
        self.fd_of = fd_of
        self.on_sync = on_sync
        super().__init__(name, self.base_name)

    def xOpen(self, name: Any, flags: list[int]) -> apsw.VFSFile:  # noqa: N802 - apsw's method name
        fd = -1
        path = "" if name is None else name.filename() if isinstance(name, apsw.URIFilename) else str(name)
        if self.fd_of is not None and name is not None:
            try:
                fd = self.fd_of(path)
            except OSError:
                fd = -1  # (not openable by path: SQLite's own syncs, with the GIL, as before)
        return PacedFile(self.base_name, name, flags, self.sync_bytes, fd, self.on_sync,
                         "wal" if path.endswith("-wal") else "db")


_counter = [0]


def store_paced_vfs(fd_of: Callable[[str], int], sync_bytes: int = SYNC_BYTES,
                    on_sync: Callable[[str, float], None] | None = None) -> PacedVFS:
    """A new paced VFS over SQLite's default VFS for one store, syncing through ``fd_of``'s descriptors
    and telling ``on_sync`` of each sync. The caller keeps it while connections use it and calls
    ``unregister()`` once they are closed."""
    with _lock:
        _counter[0] += 1
        return PacedVFS(f"raft_sqlite-paced-store-{_counter[0]}", None, sync_bytes, fd_of, on_sync)


def paced_vfs(base: str | None, sync_bytes: int = SYNC_BYTES) -> str:
    """The name of a registered :class:`PacedVFS` over ``base`` syncing every ``sync_bytes`` (registered
    once per process and kept for its lifetime, as apsw requires of a VFS in use)."""
    key = (base or "", sync_bytes)
    with _lock:
        vfs = _vfses.get(key)
        if vfs is None:
            vfs = _vfses[key] = PacedVFS(f"raft_sqlite-paced-{len(_vfses)}", base, sync_bytes)
        return vfs.registered_name
