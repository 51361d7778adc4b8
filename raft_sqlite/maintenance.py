"""Maintenance of a stopped node: give back the free pages of its database files (``VACUUM``).

After compaction and snapshot retention, ``raft.db`` and ``chunks.db`` keep their freed pages for reuse
(SQLite never shrinks a file by itself; 20% free pages were measured after a compaction). That is the
right default for a running node (reusing pages is cheaper than growing the file), but an operator who
compacted a big log, or removed groups, may want the space back. :func:`vacuum` does it for a node that
is **not running**: it opens the store as its node (taking the data_dir lock, so the node cannot start
meanwhile, and validating it under the given recovery policy, so nothing damaged is rewritten into a
fresh-looking file), runs ``VACUUM`` on each file, truncates the WAL, and closes the store cleanly.

Crash safety is SQLite's: ``VACUUM`` in WAL mode is one write transaction (the rebuilt pages are
committed to the WAL, then checkpointed), so a crash at any point leaves either the old or the new
file. It needs free space for a temporary copy of the file (in SQLite's temporary directory) and for
the WAL that carries the new pages; :func:`vacuum` checks both before it starts and refuses with
:class:`~raft_sqlite.errors.StorageFault` rather than fill the disk.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import apsw

from . import layout
from .dbrows import db_scalar
from .errors import StorageFault
from .fsync import FsyncMode
from .recovery import RecoveryPolicy
from .store import NodeStore

#: Extra free space asked for beyond the estimate (copy + WAL), as a fraction of the file's size.
SPACE_MARGIN = 0.1


@dataclass
class FileSpace:
    """Size and free pages of one database file (``PRAGMA page_count`` / ``freelist_count``), and the bytes
    the file and its WAL take on disk (``os.path.getsize``: a file shrinks only once a checkpoint copied
    the vacuumed pages back)."""

    name: str
    page_size: int
    pages: int
    free_pages: int
    file_bytes: int = 0
    wal_bytes: int = 0

    @property
    def size(self) -> int:
        """Bytes of the database's pages (what the file holds once checkpointed)."""
        return self.page_size * self.pages

    @property
    def free_bytes(self) -> int:
        """Bytes of free pages: reused as the log grows, given back by :func:`vacuum`."""
        return self.page_size * self.free_pages


def file_space(conn: apsw.Connection, schema: str = "main") -> tuple[int, int, int]:
    """``(page_size, page_count, freelist_count)`` of ``schema`` on ``conn`` (read-only queries)."""
    page_size, pages, free = (int(db_scalar(conn.execute(f"PRAGMA {schema}.{p}")))
                              for p in ("page_size", "page_count", "freelist_count"))
    return page_size, pages, free


@dataclass
class VacuumReport:
    """What :func:`vacuum` did: each file before and after, the recovery summary of its open, the time."""

    before: list[FileSpace] = field(default_factory=list)
    after: list[FileSpace] = field(default_factory=list)
    recovery: str = ""
    duration: float = 0.0
    #: files whose WAL could not be checkpointed back (a reader in another process held it): vacuumed,
    #: but the file shrinks only at the node's next complete checkpoint
    held_back: list[str] = field(default_factory=list)

    @property
    def reclaimed(self) -> int:
        """Bytes the database files and their WALs take less on disk than before (negative while a
        reader held a checkpoint back)."""
        return (sum(b.file_bytes + b.wal_bytes for b in self.before)
                - sum(a.file_bytes + a.wal_bytes for a in self.after))

    def to_dict(self) -> dict[str, Any]:
        """The report as ``raft-sqlite vacuum --json`` prints it."""
        return {"before": [asdict(b) | {"size": b.size, "free_bytes": b.free_bytes} for b in self.before],
                "after": [asdict(a) | {"size": a.size, "free_bytes": a.free_bytes} for a in self.after],
                "reclaimed_bytes": self.reclaimed, "held_back": self.held_back, "recovery": self.recovery,
                "duration_s": self.duration}


def sqlite_tmpdir() -> str:
    """The folder SQLite puts VACUUM's temporary copy in on Unix: ``SQLITE_TMPDIR``, ``TMPDIR``,
    ``/var/tmp``, ``/usr/tmp``, ``/tmp``, the first that is a writable folder, else the current one."""
    for d in (os.environ.get("SQLITE_TMPDIR"), os.environ.get("TMPDIR"), "/var/tmp", "/usr/tmp", "/tmp"):
        if d and os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK):
            return d
    return "."


def _on_disk(space: FileSpace, path: str) -> FileSpace:
    space.file_bytes = os.path.getsize(path)
    space.wal_bytes = os.path.getsize(path + "-wal") if os.path.exists(path + "-wal") else 0
    return space


def _check_room(path: str, space: FileSpace) -> None:
    """Refuse before writing anything when the disks cannot hold VACUUM's copy and WAL."""
    need = int((space.size - space.free_bytes) * (1 + SPACE_MARGIN))
    tmp = sqlite_tmpdir()
    here = os.path.dirname(path)
    try:
        same = os.stat(tmp).st_dev == os.stat(here).st_dev
        free_here = shutil.disk_usage(here).free
        free_tmp = free_here if same else shutil.disk_usage(tmp).free
    except OSError as exc:
        raise StorageFault(f"{path}: cannot tell the free disk space ({exc.strerror or exc})") from exc
    if same and free_here < 2 * need:
        raise StorageFault(f"{path}: VACUUM needs about {2 * need} bytes free (a temporary copy and the WAL, "
                           f"both on this file system) but {free_here} are; nothing was changed")
    if not same and (free_here < need or free_tmp < need):
        raise StorageFault(f"{path}: VACUUM needs about {need} bytes free next to the file and in {tmp} "
                           f"(its temporary copy) but {free_here} and {free_tmp} are; nothing was changed "
                           "(TMPDIR / SQLITE_TMPDIR choose the temporary directory)")


def _checkpoint_back(store: NodeStore, conn: apsw.Connection, name: str) -> bool:
    """Copy the vacuumed pages from the WAL back into the file (which shrinks) and give the WAL's space
    back; False when a reader in another process holds the WAL (then nothing is truncated).

    raft.db's WAL is watched by the store's high-water mark (``raft.db-hwm``: how much of the WAL is
    durable, and whether it was checkpointed), which an open checks against the WAL it finds. Truncating
    the WAL behind the mark's back would make the next open see durable frames gone and refuse the store.
    So: a FULL checkpoint; then the mark records "checkpointed" (raft.db synced first); only then the
    TRUNCATE. chunks.db has no mark."""
    busy = conn.execute("PRAGMA wal_checkpoint(FULL)").fetchall()[0][0]
    if busy:
        return False
    mark = store.kernel.hwm if name == layout.MAIN_DB else None
    if mark is not None:
        try:
            mark.note(sync=True)
        except OSError as exc:
            raise StorageFault(f"{store.path}-hwm: cannot record the checkpoint ({exc.strerror or exc})") from exc
    return not conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0][0]


def vacuum(data_dir: str, node_id: str, *, cluster_id: str, fsync: FsyncMode = FsyncMode.FULL,
           recovery: RecoveryPolicy = RecoveryPolicy.STRICT,
           progress: Callable[[str], None] | None = None) -> VacuumReport:
    """``VACUUM`` ``raft.db`` and ``chunks.db`` of the stopped node at ``data_dir`` (see the module
    docstring). Opens the store with ``NodeStore.open(data_dir, node_id, cluster_id=, fsync=,
    recovery=)``, so it raises what that raises (:class:`~raft_sqlite.errors.DataDirLocked` while the node
    runs, :class:`~raft_sqlite.errors.CorruptionError` on damage under STRICT, ...), and
    :class:`~raft_sqlite.errors.StorageFault` when there is not enough free space (nothing changed) or
    the VACUUM itself fails (the file is then as before: the transaction rolled back). ``progress(name)``
    is called before each file. Nothing else may use the store meanwhile: it is opened and closed here.
    """
    t0 = time.monotonic()
    report = VacuumReport()
    store = NodeStore.open(data_dir, node_id, cluster_id=cluster_id, fsync=fsync, recovery=recovery)
    try:
        report.recovery = store.recovery_report.summary()
        for name, path in ((layout.MAIN_DB, store.path), (layout.CHUNKS_DB, store.chunks_path)):
            if not os.path.isfile(path):
                continue
            conn = store.kernel.connect(path)
            try:
                # the temporary copy on disk (the store's pragmas keep temporary data in memory: a copy of
                # a big file would take as much RAM); its room is checked by _check_room
                conn.execute("PRAGMA temp_store=FILE")
                before = _on_disk(FileSpace(name, *file_space(conn)), path)
                report.before.append(before)
                if before.free_pages:
                    _check_room(path, before)
                    if progress is not None:
                        progress(name)
                    conn.execute("VACUUM")
                if not _checkpoint_back(store, conn, name):
                    report.held_back.append(name)
                report.after.append(_on_disk(FileSpace(name, *file_space(conn)), path))
            except apsw.Error as exc:
                raise store.kernel.translate(exc, f"VACUUM of {name}") from exc
            finally:
                conn.close()
    finally:
        store.close()
    report.duration = time.monotonic() - t0
    return report
