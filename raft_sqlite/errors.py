"""Typed exceptions. Every error the library raises on purpose derives from :class:`RaftSqliteError`
(wrong argument *types* raise ``TypeError``/``ValueError`` as usual in Python)."""

from __future__ import annotations

from typing import Protocol


class RaftSqliteError(Exception):
    """Base class of all raft_sqlite errors."""


class CorruptionError(RaftSqliteError):
    """Stored data failed validation (CRC, sidecar checksum, digest, structure). The message names
    the file, group and index/segment/snapshot concerned."""


class RecoveryRefused(RaftSqliteError):
    """Opening was refused because the data's shape is not acceptable under the chosen
    :class:`~raft_sqlite.RecoveryPolicy`."""


class NodeIdentityMismatch(RaftSqliteError):
    """The data_dir belongs to another node_id/cluster_id, or was written by a newer format."""


class LogGapError(RaftSqliteError):
    """Appended entries are not contiguous with the log (or among themselves)."""


class LogConflictError(RaftSqliteError):
    """An append overlaps existing entries, terms decrease, or a truncation would cut committed
    entries. The caller resolves conflicts explicitly with ``truncate_after``."""


class LogCompactedError(RaftSqliteError):
    """The requested index is below ``first_index``: it was compacted into a snapshot."""


class LogUnavailableError(RaftSqliteError):
    """The requested index is above ``last_index``."""


class MetadataError(RaftSqliteError):
    """A term/vote/commit-index update would violate Raft's rules (term decrease, second vote in a
    term, commit index going backwards or beyond the log)."""


class CompactionError(RaftSqliteError):
    """Compaction refused: no DURABLE snapshot covers the requested range."""


class SnapshotError(RaftSqliteError):
    """A snapshot could not be written, read or installed (including a missing or unknown registered
    structure)."""


class BackupError(RaftSqliteError):
    """A backup could not be taken, or a restore was refused."""


class BackupCorrupt(BackupError):
    """The backup itself fails verification: incomplete (no manifest, a missing piece), a manifest that is
    malformed or disagrees with the data, a size or sha256 that does not match. Other causes of a failed
    restore (the target, the local disk, the network) are plain :class:`BackupError` or ``OSError``:
    ``restore(latest=True)`` falls back to an older backup only on this one."""


class StorageFault(RaftSqliteError):
    """The disk failed (I/O error, disk full). The store is now fail-stop: it refuses every further
    write until it is closed and reopened; the outcome of the failed write is unknown until then."""


class GroupNotFoundError(RaftSqliteError):
    """The group does not exist on this node: it was removed (:meth:`NodeStore.remove_group`) after the
    view naming it (``store.log(name)``, ``metadata``, ``snapshots``) was taken. Reads and writes through
    such a view raise this (nothing is written); asking the store for the group again
    (``store.log(name)``) creates a new, empty one."""


class OutputRefused(RaftSqliteError, ValueError):
    """A file an operator named for output (``metrics --output``, ``snapshot export``, ``sql``'s
    ``.output``) would be written into a node's data_dir or over an SQLite database: refused, nothing
    written (replacing ``raft.db`` with a metrics text file destroys the store, even a running one)."""


class DataDirError(RaftSqliteError):
    """The data_dir cannot be used: it exists but is not a directory (a regular file, a dangling
    symlink), or it or its lock file cannot be created or opened (permissions)."""


class LockHolder(Protocol):
    """What :class:`DataDirLocked` reads from a lock holder: :class:`raft_sqlite.lock.Holder` matches it.
    A protocol, not that class, because lock imports this module (an import back would be a cycle)."""

    @property
    def pid(self) -> int | None: ...
    @property
    def host(self) -> str | None: ...
    @property
    def since(self) -> float | None: ...
    @property
    def node_id(self) -> str | None: ...
    def describe(self) -> str: ...


class DataDirLocked(RaftSqliteError):
    """The data_dir is locked by another live store (another process, or another open in this one):
    one process, one store per data_dir. ``pid``, ``host``, ``since`` (unix time) and ``node_id``
    name the holder as it recorded itself (None when unknown)."""

    def __init__(self, data_dir: str, holder: LockHolder | None):
        self.data_dir = data_dir
        self.holder = holder
        self.pid: int | None = getattr(holder, "pid", None)
        self.host: str | None = getattr(holder, "host", None)
        self.since: float | None = getattr(holder, "since", None)
        self.node_id: str | None = getattr(holder, "node_id", None)
        who = holder.describe() if holder is not None else "another process"
        super().__init__(f"data_dir {data_dir} is in use by {who}: one store per data_dir; stop that "
                         "store first (a store is released on close, or by the OS when its process dies)")

    def __reduce__(self) -> tuple[type[DataDirLocked], tuple[str, LockHolder | None]]:
        return (type(self), (self.data_dir, self.holder))
