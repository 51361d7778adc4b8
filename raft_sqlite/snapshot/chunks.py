"""The chunk database: :class:`SnapshotStore`, one per node, holds the chunks of every snapshot in
``chunks.db`` (key ``snapshot_id * layout.CHUNK_SEQ_SPAN + seq``) and reads the manifest rows of
``raft.db``; it also tracks which snapshots are being read (pinned) or written (active)."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

import apsw

from .. import fsio, layout
from ..errors import CorruptionError, RaftSqliteError, SnapshotError, StorageFault
from ..fsync import CHUNKS_PRAGMAS, FsyncMode
from ..kernel import Kernel
from .manifest import MANIFEST_COLUMNS, SnapshotMeta, meta_from_row

#: Page cache of the chunk connections (KiB; from :data:`~raft_sqlite.fsync.CHUNKS_PRAGMAS`).
CHUNKS_CACHE_KIB = -int(CHUNKS_PRAGMAS["cache_size"])
_SEQ_SPAN = layout.CHUNK_SEQ_SPAN
_T = TypeVar("_T")

_COLS = MANIFEST_COLUMNS

_STORES: weakref.WeakKeyDictionary[Kernel, SnapshotStore] = weakref.WeakKeyDictionary()
_STORES_LOCK = threading.Lock()


def _apply_chunk_pragmas(conn: apsw.Connection) -> None:
    for k, v in CHUNKS_PRAGMAS.items():
        conn.execute(f"PRAGMA {k}={v}").fetchall()


class SnapshotStore:
    """Chunks and manifests of every group of one :class:`~raft_sqlite.store.NodeStore` (one instance
    per store: :meth:`of`). Low level: most callers use :class:`~raft_sqlite.snapshot.SnapshotManager`.

    Chunk writes go through ``store.chunks_conn`` under ``store.chunks_lock``, one transaction per
    batch (never left open across calls). Chunk reads use a small pool of read-only connections to
    ``chunks.db``. Deletions of chunks and manifests hold ``store.gc_lock`` (hot backups hold it while
    copying, so a backup never sees a manifest without its chunks). Snapshots being read are *pinned*
    and snapshots being written are *active*: retention and cleanup never touch either.
    """

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self._readers: list[apsw.Connection] = []
        self._lock = threading.Lock()
        self._pins: Counter[int] = Counter()
        self._active: set[int] = set()
        # a small page cache and frequent small checkpoints (why: CHUNKS_PRAGMAS); the writer holds up
        # to two batches itself
        with contextlib.suppress(apsw.Error), kernel.chunks_lock:
            _apply_chunk_pragmas(kernel.chunks_conn)

    @classmethod
    def of(cls, kernel: Kernel) -> SnapshotStore:
        """The SnapshotStore of the store behind ``kernel`` (created on first use)."""
        with _STORES_LOCK:
            s = _STORES.get(kernel)
            if s is None:
                s = _STORES[kernel] = cls(kernel)
            return s

    # ---------------------------------------------------------------- chunks.db
    @property
    def chunks_path(self) -> str:
        """The path of ``chunks.db`` (for messages)."""
        return self.kernel.chunks_path

    def _error_for(self, exc: apsw.Error, what: str) -> RaftSqliteError:
        if isinstance(exc, (apsw.CorruptError, apsw.NotADBError)):
            return CorruptionError(f"{self.kernel.chunks_path}: SQLite reports corruption during {what}: {exc}")
        return StorageFault(f"{self.kernel.chunks_path}: storage fault during {what} ({type(exc).__name__}: "
                            f"{exc})")

    def write_chunks(self, rows: list[tuple[int, int, int, bytes, int]]) -> None:
        """Insert ``rows`` ``(key, snapshot_id, seq, data, crc32)`` in one chunks.db transaction and
        commit it (durable per the store's fsync mode when this returns)."""
        if not rows:
            return
        st = self.kernel
        with st.chunks_lock:
            st.check_open()
            c = st.chunks_conn
            try:
                c.execute("BEGIN IMMEDIATE")
                try:
                    # Each chunk's bytes go in through SQLite's incremental blob I/O, which copies them without
                    # the GIL: a bound 1 MiB parameter is copied with it held. Measured with a thread inserting
                    # 8 x 1 MiB batches in a loop: another thread's GIL wait p99 82-90 us and max 0.6-0.8 ms
                    # with bound blobs, ~20 us and 0.2-0.3 ms with blob I/O. A snapshot stream's thread may run
                    # at idle priority (the asyncio facade), where holding the GIL while preempted stalls every
                    # other thread, an event loop too. Snapshot write throughput is unchanged (512 MiB,
                    # benchmarks/snapshot.py: 320-364 MB/s before, 339-371 after).
                    for key, sid, seq, data, crc in rows:
                        c.execute("INSERT INTO snapshot_chunks(key, snapshot_id, seq, data, crc32) "
                                  "VALUES (?,?,?,zeroblob(?),?)", (key, sid, seq, len(data), crc))
                        if data:
                            with c.blob_open("main", "snapshot_chunks", "data", key, True) as blob:
                                blob.write(data)
                    c.execute("COMMIT")
                except BaseException:
                    if not c.getautocommit():
                        c.execute("ROLLBACK")
                    raise
            except apsw.ConstraintError as exc:
                raise SnapshotError(f"{st.chunks_path}: chunk rows collide ({exc})") from exc
            except apsw.Error as exc:
                st.fail(st.fault or exc)  # fail-stop, as a failed raft.db commit: no retry until reopened
                raise self._error_for(exc, "snapshot chunk write") from exc

    def sync(self) -> None:
        """Make every committed chunk durable before a manifest that names it can become DURABLE.

        In FULL/EXTRA mode each chunks.db COMMIT already fsyncs; in NORMAL mode SQLite does not sync
        at COMMIT and the store's interval syncer covers only raft.db, so the WAL of chunks.db is
        fdatasync'ed here (a manifest must never outlive its chunks on power loss). OFF: nothing."""
        st = self.kernel
        if st.fsync is not FsyncMode.NORMAL:
            return
        with st.chunks_lock:
            try:
                fsio.fdatasync_path(st.chunks_path + "-wal")
            except OSError as exc:
                raise StorageFault(f"{st.chunks_path}: WAL sync failed ({exc})") from exc

    def delete_chunks(self, ids: Iterable[int]) -> int:
        """Delete every chunk of the snapshots ``ids`` (holding ``gc_lock``); returns rows deleted."""
        ids = list(ids)
        if not ids:
            return 0
        st = self.kernel
        n = 0
        with st.gc_lock, st.chunks_lock:
            st.check_open()
            c = st.chunks_conn
            try:
                c.execute("BEGIN IMMEDIATE")
                for sid in ids:
                    c.execute("DELETE FROM snapshot_chunks WHERE key >= ? AND key < ?",
                              (sid * _SEQ_SPAN, (sid + 1) * _SEQ_SPAN))
                    n += c.changes()
                c.execute("COMMIT")
            except apsw.Error as exc:
                st.fail(st.fault or exc)  # fail-stop, as a failed raft.db commit: no retry until reopened
                if not c.getautocommit():
                    c.execute("ROLLBACK")
                raise self._error_for(exc, "snapshot chunk deletion") from exc
        return n

    def drop_chunks_from(self, sid: int, seq: int) -> None:
        """Delete the chunks of snapshot ``sid`` from ``seq`` on (holding ``gc_lock``): a partial install
        being resumed drops a bad or missing chunk and everything after it."""
        st = self.kernel
        with st.gc_lock, st.chunks_lock:
            st.chunks_conn.execute("DELETE FROM snapshot_chunks WHERE key >= ? AND key < ?",
                                   (sid * _SEQ_SPAN + seq, (sid + 1) * _SEQ_SPAN))

    def _read_chunks(self, fn: Callable[[apsw.Connection], _T]) -> _T:
        st = self.kernel
        if st.closed:
            raise RaftSqliteError("the store is closed")
        with self._lock:
            conn = self._readers.pop() if self._readers else None
        if conn is None:
            st.check_open()
            try:
                conn = st.connect(st.chunks_path, query_only=True)
                _apply_chunk_pragmas(conn)
            except apsw.Error as exc:
                raise self._error_for(exc, "snapshot chunk read") from exc
            st.track(conn)  # closed with the store
        try:
            return fn(conn)
        except apsw.Error as exc:
            raise self._error_for(exc, "snapshot chunk read") from exc
        finally:
            with self._lock:
                self._readers.append(conn)

    def chunk_shape(self, sid: int) -> list[tuple[int, int]]:
        """``(seq, length)`` of every chunk of snapshot ``sid`` in order. No blob is read: the length
        comes from the record header (selecting ``crc32``, stored after the blob, would make SQLite
        walk the whole overflow chain)."""
        rows = self._read_chunks(lambda c: c.execute(
            "SELECT seq, length(data) FROM snapshot_chunks WHERE key >= ? AND key < ? ORDER BY key",
            (sid * _SEQ_SPAN, (sid + 1) * _SEQ_SPAN)).fetchall())
        # cast: apsw types a row as any SQLite values; seq is an INTEGER column and length() an integer
        return cast(list[tuple[int, int]], rows)

    def read_chunk(self, sid: int, seq: int) -> tuple[bytes, int] | None:
        """``(data, crc32)`` of one chunk (not verified here), or None if it does not exist."""
        row = self._read_chunks(lambda c: c.execute("SELECT data, crc32 FROM snapshot_chunks WHERE key=?",
                                                    (sid * _SEQ_SPAN + seq,)).fetchone())
        return None if row is None else (row[0], row[1])

    def chunk_snapshot_ids(self, conn: apsw.Connection | None = None) -> list[int]:
        """Distinct snapshot ids that own chunks in chunks.db (a skip scan over the key: cheap)."""
        def scan(c: apsw.Connection) -> list[int]:
            out: list[int] = []
            key = 0
            while True:
                row = c.execute("SELECT key FROM snapshot_chunks WHERE key >= ? ORDER BY key LIMIT 1",
                                (key,)).fetchone()
                if row is None:
                    return out
                sid = row[0] // _SEQ_SPAN
                out.append(sid)
                key = (sid + 1) * _SEQ_SPAN
        return scan(conn) if conn is not None else self._read_chunks(scan)

    # ---------------------------------------------------------------- pins
    def pin(self, sid: int) -> None:
        """Mark snapshot ``sid`` as being read (counted: each pin needs its :meth:`unpin`)."""
        with self._lock:
            self._pins[sid] += 1

    def unpin(self, sid: int) -> None:
        """Release one :meth:`pin` of snapshot ``sid``."""
        with self._lock:
            self._pins[sid] -= 1
            if self._pins[sid] <= 0:
                del self._pins[sid]

    def activate(self, sid: int) -> None:
        """Mark snapshot ``sid`` as being written (by a :class:`~raft_sqlite.snapshot.SnapshotWriter`)."""
        with self._lock:
            self._active.add(sid)

    def deactivate(self, sid: int) -> None:
        """Snapshot ``sid`` is no longer being written (no-op if it was not)."""
        with self._lock:
            self._active.discard(sid)

    def busy(self) -> set[int]:
        """Ids that are being read or written in this process (never deleted while so)."""
        with self._lock:
            return set(self._pins) | set(self._active)

    # ---------------------------------------------------------------- manifests
    def _row_to_meta(self, row: Any, group: str) -> SnapshotMeta:  # row: one apsw result row of _COLS
        return meta_from_row(row, group, self.kernel.path)

    def manifests(self, group: str, gid: int, status: str | None = "DURABLE") -> list[SnapshotMeta]:
        """Manifests of group ``group`` (id ``gid``) ordered by (index, id); ``status`` None: all."""
        sql = f"SELECT {_COLS} FROM snapshots WHERE group_id=?"
        args: tuple[int] | tuple[int, str] = (gid,)
        if status is not None:
            sql += " AND status=?"
            args = (gid, status)
        rows = self.kernel.read(lambda c: c.execute(sql + " ORDER BY idx, snapshot_id", args).fetchall())
        return [self._row_to_meta(r, group) for r in rows]

    def manifest(self, sid: int, group: str, gid: int) -> SnapshotMeta | None:
        """The manifest with id ``sid`` if it belongs to group ``group`` (id ``gid``), else None."""
        row = self.kernel.read(lambda c: c.execute(f"SELECT {_COLS} FROM snapshots WHERE snapshot_id=? AND group_id=?",
                                                   (sid, gid)).fetchone())
        return None if row is None else self._row_to_meta(row, group)

