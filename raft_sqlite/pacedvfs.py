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
"""

from __future__ import annotations

import threading
from typing import Any

import apsw

#: Bytes written to one file between two syncs (default of :func:`paced_vfs`).
SYNC_BYTES = 1 << 20

_lock = threading.Lock()
_vfses: dict[tuple[str, int], PacedVFS] = {}


class PacedFile(apsw.VFSFile):
    """A file of the base VFS that syncs itself after every ``sync_bytes`` written."""

    def __init__(self, base: str, name: Any, flags: list[int], sync_bytes: int) -> None:
        super().__init__(base, name, flags)
        self._limit = sync_bytes
        self._unsynced = 0
        #: syncs made by the pacing (not asked for by SQLite)
        self.paced_syncs = 0

    def xWrite(self, data: bytes, offset: int) -> None:  # noqa: N802 - apsw's method name
        super().xWrite(data, offset)
        self._unsynced += len(data)
        if self._unsynced >= self._limit:
            self._unsynced = 0
            self.paced_syncs += 1
            super().xSync(apsw.SQLITE_SYNC_NORMAL)

    def xSync(self, flags: int) -> None:  # noqa: N802 - apsw's method name
        self._unsynced = 0
        super().xSync(flags)


class PacedVFS(apsw.VFS):
    """The VFS ``name`` over ``base`` (None or "": SQLite's default) whose files are :class:`PacedFile`."""

    def __init__(self, name: str, base: str | None, sync_bytes: int) -> None:
        self.sync_bytes = sync_bytes
        self.base_name = base or ""
        self.registered_name = name
        super().__init__(name, self.base_name)

    def xOpen(self, name: Any, flags: list[int]) -> apsw.VFSFile:  # noqa: N802 - apsw's method name
        return PacedFile(self.base_name, name, flags, self.sync_bytes)


def paced_vfs(base: str | None, sync_bytes: int = SYNC_BYTES) -> str:
    """The name of a registered :class:`PacedVFS` over ``base`` syncing every ``sync_bytes`` (registered
    once per process and kept for its lifetime, as apsw requires of a VFS in use)."""
    key = (base or "", sync_bytes)
    with _lock:
        vfs = _vfses.get(key)
        if vfs is None:
            vfs = _vfses[key] = PacedVFS(f"raft_sqlite-paced-{len(_vfses)}", base, sync_bytes)
        return vfs.registered_name
