"""Snapshots: chunked, checksummed snapshot storage, delta chains, retention and scheduling.

Layout
------
* The **manifest** of a snapshot is one row of ``raft.db``'s ``snapshots`` table (id, group, index,
  term, kind FULL/DELTA, parent, status WRITING/DURABLE, size, chunk count, sha256 of the whole
  snapshot, per-structure entries as JSON, source local/install, CRC32 over the manifest fields).
* Its **bytes** are chunks (default 1 MiB) in ``chunks.db``'s ``snapshot_chunks`` table, keyed
  ``snapshot_id << 32 | seq``, each with its CRC32. ``chunks.db`` is a separate SQLite file, so that
  streaming a big snapshot never holds the write lock of ``raft.db`` (which every log append needs)
  nor grows its WAL.

Write protocol (:meth:`SnapshotManager.write`)
----------------------------------------------
1. A WRITING manifest row is inserted (one commit of ``raft.db``).
2. Chunks are streamed to ``chunks.db`` in batches of ``commit_bytes`` (one transaction per batch, under
   ``store.chunks_lock``), so memory stays bounded whatever the snapshot size.
3. On a clean exit the last batch is committed (durable per the fsync mode) and THEN one committer op
   on ``raft.db`` flips the manifest to DURABLE with its sizes and digest *and* moves
   ``groups.snapshot_index/snapshot_term`` (and, for an install, discards the log it replaces). The
   snapshot becomes visible atomically with that commit; a crash at any earlier point leaves a
   WRITING row that the next open removes (local snapshots) or keeps for resumption (installs).

Reading (:meth:`SnapshotManager.open`) verifies each chunk's CRC32 as it is read and the sha256 of the
whole snapshot at end of stream; a mismatch raises :class:`~raft_sqlite.errors.CorruptionError`.
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import hashlib
import io
import json
import logging
import queue
import threading
import time
import weakref
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Self

import apsw

from .. import fsio, layout
from ..args import float_arg, int_arg, term_arg
from ..errors import CorruptionError, RaftSqliteError, SnapshotError, StorageFault

log = logging.getLogger("raft_sqlite.snapshot")

#: Default chunk size: the unit of CRC32 checking, of reading and of InstallSnapshot resumption.
DEFAULT_CHUNK_SIZE = 1 << 20
#: Default bytes per chunks.db transaction while streaming (bounds memory and WAL growth).
DEFAULT_COMMIT_BYTES = 8 << 20
#: Largest ``chunk_size`` accepted (SQLite's default BLOB limit is 10**9 bytes).
MAX_CHUNK_SIZE = 256 << 20
#: Default length of a delta chain (base included) before a new FULL snapshot is taken.
DEFAULT_MAX_CHAIN_LENGTH = 8
#: Default number of chains kept by retention.
DEFAULT_KEEP_CHAINS = 2
_SEQ_SPAN = 1 << 32
#: Page cache of the chunk connections (KiB).
CHUNKS_CACHE_KIB = 2048


class SnapshotKind(str, enum.Enum):
    """FULL: self-contained. DELTA: only what changed since its parent (see :class:`SnapshotChain`)."""

    FULL = "FULL"
    DELTA = "DELTA"


def manifest_fields_crc(sid, gid, index, term, kind, parent_id, status, size, chunk_count, checksum, structures,
                        source) -> int:
    """CRC32 stored with a manifest row, over every field that describes the snapshot."""
    text = f"{sid}|{gid}|{index}|{term}|{kind}|{parent_id}|{status}|{size}|{chunk_count}|{checksum}|" \
           f"{structures}|{source}"
    return zlib.crc32(text.encode())


def manifest_crc(conn, sid: int) -> int | None:
    """The CRC32 the manifest row ``sid`` should carry, computed from its fields as stored (read on
    the apsw connection ``conn`` to raft.db); None if there is no such row. Compare with its
    ``crc32`` column (set when the snapshot became DURABLE)."""
    row = conn.execute("SELECT snapshot_id, group_id, idx, term, kind, parent_id, status, size, chunk_count, "
                       "checksum, structures, source FROM snapshots WHERE snapshot_id=?", (sid,)).fetchone()
    return None if row is None else manifest_fields_crc(*row)


@dataclass(frozen=True)
class SnapshotMeta:
    """The manifest of one snapshot.

    ``id`` is unique within the node. ``index``/``term`` are the last log entry the snapshot covers.
    ``size`` is its length in bytes (for a WRITING install: the bytes durably received so far).
    ``parent_id`` names the snapshot a DELTA applies on (None for FULL). ``checksum`` is the sha256 hex
    digest of the whole byte stream. ``structures`` is the per-structure table written by
    :class:`~raft_sqlite.statemachine.StateMachineSnapshotManager` (None for raw snapshots).
    ``source`` is ``"local"`` or ``"install"`` (received from a leader).
    """

    id: int
    group: str
    index: int
    term: int
    kind: SnapshotKind
    size: int
    parent_id: int | None = None
    status: str = "DURABLE"
    chunk_count: int = 0
    checksum: str | None = None
    structures: Any = field(default=None, compare=False)
    source: str = "local"
    created_at: float = 0.0
    finished_at: float | None = None


_COLS = ("snapshot_id, group_id, idx, term, kind, parent_id, status, size, chunk_count, checksum, structures, "
         "created_at, finished_at, crc32, source")


def _int(name, v, lo=0, hi=layout.MAX_INT64) -> int:
    return int_arg(name, v, lo, hi)


def _meta_arg(name: str, meta) -> "SnapshotMeta":
    """``meta`` if it is a :class:`SnapshotMeta` whose id and index are integers the store can hold
    (TypeError/ValueError otherwise): a hand-made manifest object must not reach SQL."""
    if not isinstance(meta, SnapshotMeta):
        raise TypeError(f"{name} must be a SnapshotMeta, not {type(meta).__name__}")
    int_arg(f"{name}.id", meta.id, layout.MIN_INT64, layout.MAX_INT64)
    int_arg(f"{name}.index", meta.index, layout.MIN_INT64, layout.MAX_INT64)
    return meta


# ---------------------------------------------------------------------------------------------- store
_STORES: weakref.WeakKeyDictionary[Any, SnapshotStore] = weakref.WeakKeyDictionary()
_STORES_LOCK = threading.Lock()


class SnapshotStore:
    """Chunks and manifests of every group of one :class:`~raft_sqlite.store.NodeStore` (one instance
    per store: :meth:`of`). Low level: most callers use :class:`SnapshotManager`.

    Chunk writes go through ``store.chunks_conn`` under ``store.chunks_lock``, one transaction per
    batch (never left open across calls). Chunk reads use a small pool of read-only connections to
    ``chunks.db``. Deletions of chunks and manifests hold ``store.gc_lock`` (hot backups hold it while
    copying, so a backup never sees a manifest without its chunks). Snapshots being read are *pinned*
    and snapshots being written are *active*: retention and cleanup never touch either.
    """

    def __init__(self, store):
        self.store = store
        self._readers: list[apsw.Connection] = []
        self._lock = threading.Lock()
        self._pins: Counter = Counter()
        self._active: set[int] = set()
        # chunk pages are written once and read once: a big page cache only costs memory (the
        # writer holds up to two batches itself)
        with contextlib.suppress(apsw.Error), store.chunks_lock:
            store.chunks_conn.execute(f"PRAGMA cache_size=-{CHUNKS_CACHE_KIB}")

    @classmethod
    def of(cls, store) -> SnapshotStore:
        """The SnapshotStore of ``store`` (created on first use)."""
        with _STORES_LOCK:
            s = _STORES.get(store)
            if s is None:
                s = _STORES[store] = cls(store)
            return s

    # ---------------------------------------------------------------- chunks.db
    def _fault(self, exc: apsw.Error, what: str) -> RaftSqliteError:
        if isinstance(exc, (apsw.CorruptError, apsw.NotADBError)):
            return CorruptionError(f"{self.store.chunks_path}: SQLite reports corruption during {what}: {exc}")
        return StorageFault(f"{self.store.chunks_path}: storage fault during {what} ({type(exc).__name__}: "
                            f"{exc})")

    def write_chunks(self, rows: list[tuple]) -> None:
        """Insert ``rows`` ``(key, snapshot_id, seq, data, crc32)`` in one chunks.db transaction and
        commit it (durable per the store's fsync mode when this returns)."""
        if not rows:
            return
        st = self.store
        with st.chunks_lock:
            st._check_open()
            c = st.chunks_conn
            try:
                c.execute("BEGIN IMMEDIATE")
                try:
                    c.executemany("INSERT INTO snapshot_chunks(key, snapshot_id, seq, data, crc32) VALUES (?,?,?,?,?)",
                                  rows)
                    c.execute("COMMIT")
                except BaseException:
                    if not c.getautocommit():
                        c.execute("ROLLBACK")
                    raise
            except apsw.ConstraintError as exc:
                raise SnapshotError(f"{st.chunks_path}: chunk rows collide ({exc})") from exc
            except apsw.Error as exc:
                st._fault = st._fault or exc  # fail-stop, as a failed raft.db commit: no retry until reopened
                raise self._fault(exc, "snapshot chunk write") from exc

    def sync(self) -> None:
        """Make every committed chunk durable before a manifest that names it can become DURABLE.

        In FULL/EXTRA mode each chunks.db COMMIT already fsyncs; in NORMAL mode SQLite does not sync
        at COMMIT and the store's interval syncer covers only raft.db, so the WAL of chunks.db is
        fdatasync'ed here (a manifest must never outlive its chunks on power loss). OFF: nothing."""
        from ..fsync import FsyncMode

        st = self.store
        if st.fsync is not FsyncMode.NORMAL:
            return
        with st.chunks_lock:
            try:
                fsio.fdatasync_path(st.chunks_path + "-wal")
            except OSError as exc:
                raise StorageFault(f"{st.chunks_path}: WAL sync failed ({exc})") from exc

    def delete_chunks(self, ids) -> int:
        """Delete every chunk of the snapshots ``ids`` (holding ``gc_lock``); returns rows deleted."""
        ids = list(ids)
        if not ids:
            return 0
        st = self.store
        n = 0
        with st.gc_lock, st.chunks_lock:
            st._check_open()
            c = st.chunks_conn
            try:
                c.execute("BEGIN IMMEDIATE")
                for sid in ids:
                    c.execute("DELETE FROM snapshot_chunks WHERE key >= ? AND key < ?",
                              (sid * _SEQ_SPAN, (sid + 1) * _SEQ_SPAN))
                    n += c.changes()
                c.execute("COMMIT")
            except apsw.Error as exc:
                st._fault = st._fault or exc  # fail-stop, as a failed raft.db commit: no retry until reopened
                if not c.getautocommit():
                    c.execute("ROLLBACK")
                raise self._fault(exc, "snapshot chunk deletion") from exc
        return n

    def _read_chunks(self, fn):
        st = self.store
        if st._closed:
            raise RaftSqliteError("the store is closed")
        with self._lock:
            conn = self._readers.pop() if self._readers else None
        if conn is None:
            st._check_open()
            try:
                conn = st._connect(st.chunks_path, query_only=True)
                conn.execute(f"PRAGMA cache_size=-{CHUNKS_CACHE_KIB}")  # chunks are read once
            except apsw.Error as exc:
                raise self._fault(exc, "snapshot chunk read") from exc
            st._all_readers.append(conn)  # closed with the store
        try:
            return fn(conn)
        except apsw.Error as exc:
            raise self._fault(exc, "snapshot chunk read") from exc
        finally:
            with self._lock:
                self._readers.append(conn)

    def chunk_shape(self, sid: int) -> list[tuple[int, int]]:
        """``(seq, length)`` of every chunk of snapshot ``sid`` in order. No blob is read: the length
        comes from the record header (selecting ``crc32``, stored after the blob, would make SQLite
        walk the whole overflow chain)."""
        return self._read_chunks(lambda c: c.execute(
            "SELECT seq, length(data) FROM snapshot_chunks WHERE key >= ? AND key < ? ORDER BY key",
            (sid * _SEQ_SPAN, (sid + 1) * _SEQ_SPAN)).fetchall())

    def read_chunk(self, sid: int, seq: int) -> tuple[bytes, int] | None:
        """``(data, crc32)`` of one chunk (not verified here), or None if it does not exist."""
        row = self._read_chunks(lambda c: c.execute("SELECT data, crc32 FROM snapshot_chunks WHERE key=?",
                                                    (sid * _SEQ_SPAN + seq,)).fetchone())
        return None if row is None else (row[0], row[1])

    def chunk_snapshot_ids(self, conn=None) -> list[int]:
        """Distinct snapshot ids that own chunks in chunks.db (a skip scan over the key: cheap)."""
        def scan(c):
            out, key = [], 0
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
        with self._lock:
            self._pins[sid] += 1

    def unpin(self, sid: int) -> None:
        with self._lock:
            self._pins[sid] -= 1
            if self._pins[sid] <= 0:
                del self._pins[sid]

    def busy(self) -> set[int]:
        """Ids that are being read or written in this process (never deleted while so)."""
        with self._lock:
            return set(self._pins) | set(self._active)

    # ---------------------------------------------------------------- manifests
    def _row_to_meta(self, row, group: str) -> SnapshotMeta:
        (sid, gid, idx, term, kind, parent, status, size, count, checksum, structures, created, finished, crc,
         source) = row
        if status == "DURABLE" and manifest_fields_crc(sid, gid, idx, term, kind, parent, status, size, count, checksum,
                                                structures, source) != crc:
            raise CorruptionError(f"{self.store.path}: group {group!r}: snapshot {sid} manifest fails its CRC check")
        return SnapshotMeta(sid, group, idx, term, SnapshotKind(kind), size, parent, status, count, checksum,
                            json.loads(structures) if structures else None, source, created, finished)

    def manifests(self, group: str, gid: int, status: str | None = "DURABLE") -> list[SnapshotMeta]:
        """Manifests of group ``group`` (id ``gid``) ordered by (index, id); ``status`` None: all."""
        sql = f"SELECT {_COLS} FROM snapshots WHERE group_id=?"
        args: tuple = (gid,)
        if status is not None:
            sql += " AND status=?"
            args = (gid, status)
        rows = self.store._read(lambda c: c.execute(sql + " ORDER BY idx, snapshot_id", args).fetchall())
        return [self._row_to_meta(r, group) for r in rows]

    def manifest(self, sid: int, group: str, gid: int) -> SnapshotMeta | None:
        """The manifest with id ``sid`` if it belongs to group ``group`` (id ``gid``), else None."""
        row = self.store._read(lambda c: c.execute(f"SELECT {_COLS} FROM snapshots WHERE snapshot_id=? AND group_id=?",
                                                   (sid, gid)).fetchone())
        return None if row is None else self._row_to_meta(row, group)


# ---------------------------------------------------------------------------------------------- reader
class SnapshotReader(io.RawIOBase):
    """A readable, seekable binary stream over one snapshot's chunks (:meth:`SnapshotManager.open`).

    Each chunk's CRC32 is checked when it is loaded; a stream read from offset 0 to the end without
    seeking also checks the sha256 of the whole snapshot before reporting end of stream. Any
    mismatch, missing chunk or size disagreement raises :class:`CorruptionError` naming the file,
    group, snapshot and chunk. Memory: one chunk. The snapshot is pinned (retention skips it) until
    the stream is closed. ``read(n)`` returns exactly ``n`` bytes unless the end is reached.
    """

    def __init__(self, sstore: SnapshotStore, meta: SnapshotMeta, *, size: int | None = None,
                 checksum: str | None = None, shape=None, verify_digest: bool = True):
        super().__init__()
        self._s = sstore
        self.meta = meta
        self._where = f"{sstore.store.chunks_path}: group {meta.group!r}: snapshot {meta.id}"
        sstore.pin(meta.id)
        self._pinned = True
        try:
            shape = sstore.chunk_shape(meta.id) if shape is None else shape
            size = meta.size if size is None else size
            offs, total = [], 0
            for i, (seq, n) in enumerate(shape):
                if seq != i:
                    raise CorruptionError(f"{self._where}: chunk {i} is missing")
                offs.append(total)
                total += n
            if meta.status == "DURABLE" and len(shape) != meta.chunk_count:
                raise CorruptionError(f"{self._where}: {len(shape)} chunks found, manifest says {meta.chunk_count}")
            if total != size:
                raise CorruptionError(f"{self._where}: chunks hold {total} bytes, manifest says {size}")
        except BaseException:
            self.close()
            raise
        self._offs, self._size = offs, size
        self._checksum = meta.checksum if checksum is None else checksum
        self._digest_on = verify_digest
        self._pos = 0
        self._cur_seq, self._cur = -1, b""
        self._hash = hashlib.sha256()
        self._hashed = 0  # next seq to hash (sequential reading only)
        self._sequential = True
        self._verified = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        if pos != self._pos:
            self._sequential = False  # the digest can no longer be checked on this stream
        self._pos = pos
        return pos

    def _load(self, seq: int) -> bytes:
        if seq == self._cur_seq:
            return self._cur
        return self._accept(seq, self._s.read_chunk(self.meta.id, seq))

    def _accept(self, seq: int, got, crc_ok: bool | None = None) -> bytes:
        """Verify chunk ``seq`` as read (``(data, crc32)`` or None) and make it current. ``crc_ok``: the
        CRC32 was already checked (by the prefetch thread)."""
        if got is None:
            raise CorruptionError(f"{self._where}: chunk {seq} is missing")
        data, crc = got
        if not (crc_ok if crc_ok is not None else zlib.crc32(data) == crc):
            raise CorruptionError(f"{self._where}: chunk {seq} fails its CRC32 check")
        if seq + 1 < len(self._offs) and self._offs[seq + 1] - self._offs[seq] != len(data):
            raise CorruptionError(f"{self._where}: chunk {seq} changed size while being read")
        if self._sequential and seq == self._hashed:
            if self._digest_on:
                self._hash.update(data)
            self._hashed += 1
        self._cur_seq, self._cur = seq, data
        return data

    def _check_digest(self):
        if self._sequential and not self._verified and self._hashed == len(self._offs):
            if self._digest_on and self._checksum is not None and self._hash.hexdigest() != self._checksum:
                raise CorruptionError(f"{self._where}: sha256 of the snapshot does not match its manifest")
            self._verified = True

    def readinto(self, b) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed snapshot stream")
        pos = self._pos
        if pos >= self._size:
            self._check_digest()
            return 0
        seq = bisect.bisect_right(self._offs, pos) - 1
        data = self._load(seq)
        start = pos - self._offs[seq]
        n = min(len(b), len(data) - start)
        mv = memoryview(b).cast("B")
        mv[:n] = data[start:start + n]
        self._pos = pos + n
        if self._pos >= self._size:
            self._check_digest()
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        out = bytearray()
        while len(out) < size:
            pos = self._pos
            if pos >= self._size:
                self._check_digest()
                break
            seq = bisect.bisect_right(self._offs, pos) - 1
            data = self._load(seq)
            start = pos - self._offs[seq]
            take = min(size - len(out), len(data) - start)
            if take == len(data) and not out and take == size:
                self._pos = pos + take
                if self._pos >= self._size:
                    self._check_digest()
                return data
            out += data[start:start + take]
            self._pos = pos + take
            if self._pos >= self._size:
                self._check_digest()
        return bytes(out)

    def readall(self) -> bytes:
        return self.read(max(0, self._size - self._pos))

    def chunks(self, prefetch: int = 2) -> Iterator[bytes]:
        """Yield the remaining bytes chunk by chunk (as stored), verifying as :meth:`read` does.

        A helper thread reads up to ``prefetch`` chunks ahead from chunks.db while the caller's
        thread verifies (CRC32, sha256) and consumes, so I/O and hashing overlap; memory stays at
        ``prefetch + 1`` chunks. ``prefetch=0`` reads inline."""
        if self._pos >= self._size:
            self._check_digest()
            return
        first = bisect.bisect_right(self._offs, self._pos) - 1
        if prefetch <= 0 or len(self._offs) - first < 3:
            yield from self._chunks_inline()
            return
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()
        sid, sstore = self.meta.id, self._s

        def fetch():
            try:
                for seq in range(first, len(self._offs)):
                    got = sstore.read_chunk(sid, seq)
                    # the CRC32 here, the sha256 in the consumer: both release the GIL, so they overlap
                    item = (seq, got, got is not None and zlib.crc32(got[0]) == got[1])
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as exc:  # noqa: BLE001 -- re-raised in the consumer
                q.put((-1, exc, None))

        t = threading.Thread(target=fetch, name=f"raft_sqlite-snapshot-read-{sid}", daemon=True)
        t.start()
        try:
            for _ in range(first, len(self._offs)):
                seq, got, crc_ok = q.get()
                if seq < 0:
                    raise got
                data = self._accept(seq, got, crc_ok)
                start = self._pos - self._offs[seq]
                self._pos += len(data) - start
                if self._pos >= self._size:
                    self._check_digest()
                yield data if start == 0 else data[start:]
        finally:
            stop.set()
            t.join()
        self._check_digest()

    def _chunks_inline(self) -> Iterator[bytes]:
        while self._pos < self._size:
            seq = bisect.bisect_right(self._offs, self._pos) - 1
            data = self._load(seq)
            start = self._pos - self._offs[seq]
            self._pos += len(data) - start
            if self._pos >= self._size:
                self._check_digest()
            yield data if start == 0 else data[start:]
        self._check_digest()

    def close(self) -> None:
        if getattr(self, "_pinned", False):
            self._pinned = False
            self._s.unpin(self.meta.id)
        super().close()


# ---------------------------------------------------------------------------------------------- writer
def _with_crc(rows: list[tuple]) -> list[tuple]:
    """Chunk rows ``(key, snapshot_id, seq, data)`` with the CRC32 of ``data`` appended."""
    return [(k, sid, seq, data, zlib.crc32(data)) for k, sid, seq, data in rows]


class SnapshotWriter:
    """Streams one snapshot in (from :meth:`SnapshotManager.write` / :meth:`SnapshotManager.install`).

    Use as a context manager: ``with mgr.write(index, term) as w: w.write(chunk)``. A clean exit
    finalizes the snapshot atomically (see the module doc) and sets :attr:`meta`; an exception
    discards it (manifest row and chunks). Outside a ``with`` block call :meth:`begin`, then
    :meth:`finish` or :meth:`abort` (or, for an install, :meth:`suspend` to keep the bytes received so
    far for a later resume). Not thread-safe: one thread writes one snapshot.

    Memory is bounded by ``chunk_size + 2 * commit_bytes`` whatever the snapshot size.
    """

    def __init__(self, mgr: SnapshotManager, index: int, term: int, *, kind: SnapshotKind,
                 parent: SnapshotMeta | None, structures, install: bool,
                 before_finalize: Callable[[SnapshotWriter], None] | None):
        self._m = mgr
        self.index, self.term = index, term
        self.kind, self.parent, self.structures = kind, parent, structures
        self.install = install
        self.before_finalize = before_finalize
        #: The :class:`SnapshotMeta` of the finalized snapshot (set by a clean exit / :meth:`finish`).
        self.meta: SnapshotMeta | None = None
        self.id: int | None = None
        self._buf = bytearray()
        self._rows: list[tuple] = []
        self._pending = 0
        self._seq = 0
        self._size = 0  # bytes accepted (buffered + durable)
        self._durable = 0
        self._hash = hashlib.sha256()
        self._inflight = None  # (thread, bytes, [error]) of the batch committed in the background
        self._next_at = time.monotonic()  # pacing (max_write_rate)
        self._state = "new"
        #: True when :meth:`begin` resumed a partial install received before (``offset`` > 0 then).
        self.resumed = False

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> Self:
        self.begin()
        return self

    def __exit__(self, et, ev, tb) -> bool:
        if et is None:
            self.finish()
        else:
            self.abort()
        return False

    @property
    def offset(self) -> int:
        """Bytes accepted so far: the offset the next :meth:`write` continues at (after a resumed
        install: the bytes received durably before the restart)."""
        return self._size

    @property
    def durable_offset(self) -> int:
        """Bytes durably stored in chunks.db so far (what a resume after a crash would start from)."""
        return self._durable

    def begin(self) -> SnapshotWriter:
        """Validate against the group's state and insert the WRITING manifest (or resume a partial
        install of the same index and term)."""
        if self._state != "new":
            raise SnapshotError("this snapshot writer was already started")
        m = self._m
        if getattr(m._store._tx, "tx", None) is not None:
            raise SnapshotError("a snapshot cannot be written inside store.transaction(): its chunks are committed "
                                "separately and its manifest flips in a commit of its own")
        g = m._g()
        if self.install:
            if self.index <= g.snapshot_index:
                raise SnapshotError(f"group {m.group!r}: install of a snapshot at {self.index} refused: a durable "
                                    f"snapshot at {g.snapshot_index} is already held")
            pend = [p for p in m._sstore.manifests(m.group, g.gid, "WRITING")
                    if p.source == "install" and p.id not in m._sstore.busy()]
            for p in pend:
                if p.index == self.index and p.term == self.term and self.id is None:
                    m._sstore._active.add(p.id)
                    try:
                        self._resume(p)
                    except BaseException:
                        m._sstore._active.discard(p.id)
                        raise
                else:
                    m._discard(p.id)
        else:
            m._check_local(g, self.index, self.term)
        if self.kind is SnapshotKind.DELTA:
            p = self.parent
            if p is None or p.status != "DURABLE" or p.group != m.group:
                raise SnapshotError(f"group {m.group!r}: a DELTA snapshot needs a DURABLE parent of the same group")
            if p.index > self.index:
                raise SnapshotError(f"group {m.group!r}: a DELTA at {self.index} cannot follow its parent at "
                                    f"{p.index}")
            m._sstore.pin(p.id)  # retention keeps the parent's chain while this delta is written
            self._parent_pinned = True
        try:
            if self.id is None:
                self.id = m._insert_writing(self)
        except BaseException:
            self._unpin_parent()
            raise
        m._sstore._active.add(self.id)
        self._state = "open"
        return self

    def _unpin_parent(self) -> None:
        if getattr(self, "_parent_pinned", False):
            self._parent_pinned = False
            self._m._sstore.unpin(self.parent.id)

    def _resume(self, p: SnapshotMeta) -> None:
        """Continue a partial install: re-hash its durable chunks (verifying CRCs); a bad or missing
        chunk and everything after it is dropped and will be received again."""
        s = self._m._sstore
        shape = s.chunk_shape(p.id)
        good = 0
        for i, (seq, n) in enumerate(shape):
            if seq != i:
                break
            got = s.read_chunk(p.id, seq)
            if got is None or zlib.crc32(got[0]) != got[1] or len(got[0]) != n:
                break
            self._hash.update(got[0])
            self._size += n
            good += 1
        if good < len(shape):
            log.warning("group %r: partial install %d: dropping chunks from %d on (bad or missing)",
                        self._m.group, p.id, good)
            st = self._m._store
            with st.gc_lock, st.chunks_lock:
                st.chunks_conn.execute("DELETE FROM snapshot_chunks WHERE key >= ? AND key < ?",
                                       (p.id * _SEQ_SPAN + good, (p.id + 1) * _SEQ_SPAN))
        self._seq = good
        self._durable = self._size
        self.id = p.id
        self.resumed = True

    # ------------------------------------------------------------ data
    def write(self, data, offset: int | None = None) -> int:
        """Append ``data`` (bytes-like) to the snapshot; returns the new :attr:`offset`.

        ``offset`` (optional, as in Raft's InstallSnapshot RPC) must equal :attr:`offset`; otherwise
        :class:`SnapshotError` is raised (nothing is written) and the sender should resume from
        :attr:`offset`. Full chunks are written out as they fill; a batch is committed every
        ``commit_bytes``."""
        if self._state != "open":
            raise SnapshotError(f"snapshot writer is {self._state}, not open")
        if offset is not None and offset != self._size:
            raise SnapshotError(f"group {self._m.group!r}: snapshot data at offset {offset} does not continue the "
                                f"stream (expected offset {self._size})")
        try:
            mv = memoryview(data).cast("B")
        except TypeError:
            raise TypeError(f"snapshot data must be bytes-like, not {type(data).__name__}") from None
        cs = self._m.chunk_size
        pos, n = 0, len(mv)
        buf = self._buf
        if n == cs and not buf and type(data) is bytes:  # immutable and chunk-sized: no copy
            self._emit(data)
            self._size += n
            return self._size
        while pos < n:
            if not buf and n - pos >= cs:
                self._emit(bytes(mv[pos:pos + cs]))
                pos += cs
                continue
            take = min(cs - len(buf), n - pos)
            buf += mv[pos:pos + take]
            pos += take
            if len(buf) >= cs:
                self._emit(bytes(buf))
                buf.clear()
        self._size += n
        return self._size

    def _emit(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        sid = self.id
        self._rows.append((sid * _SEQ_SPAN + self._seq, sid, self._seq, chunk))  # CRC32 added at commit
        self._seq += 1
        self._pending += len(chunk)
        if self._pending >= self._m.commit_bytes:
            self._commit(background=True)

    def _join(self) -> None:
        """Wait for the batch being committed in the background; re-raise its error."""
        job = self._inflight
        if job is None:
            return
        self._inflight = None
        job[0].join()
        if job[2]:
            self._state = "failed"
            raise job[2][0]
        self._durable += job[1]

    def _commit(self, background: bool = False) -> None:
        """Commit the pending batch. In the background (a thread per batch) while the caller goes on
        hashing the next one: at most two batches are in memory; one batch is in flight at a time."""
        self._join()
        rows, self._rows = self._rows, []
        n, self._pending = self._pending, 0
        if not rows:
            return
        rate = self._m.max_write_rate
        if rate:
            wait = self._next_at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._next_at = max(self._next_at, time.monotonic() - 0.1) + n / rate
        if not background:
            try:
                self._m._sstore.write_chunks(_with_crc(rows))
            except BaseException:
                self._state = "failed"
                raise
            self._durable += n
            return
        err: list = []
        store = self._m._sstore

        def job():
            try:
                # the CRC32s here, the sha256 on the caller's thread: both release the GIL, so they overlap
                store.write_chunks(_with_crc(rows))
            except BaseException as exc:  # noqa: BLE001 -- handed to the writer's thread
                err.append(exc)

        t = threading.Thread(target=job, name=f"raft_sqlite-snapshot-{self.id}", daemon=True)
        t.start()
        self._inflight = (t, n, err)

    def flush(self) -> int:
        """Make every byte accepted so far durable in chunks.db (a short chunk may be written);
        returns :attr:`durable_offset`. An install receiver may call this before acknowledging."""
        if self._state != "open":
            raise SnapshotError(f"snapshot writer is {self._state}, not open")
        if self._buf:
            self._emit(bytes(self._buf))
            self._buf.clear()
        self._commit()
        return self._durable

    # ------------------------------------------------------------ end
    def finish(self) -> SnapshotMeta:
        """Finalize: commit the last chunks, then flip the manifest to DURABLE in one committer op
        (see :meth:`SnapshotManager.write` for what is checked and what an install discards)."""
        if self._state != "open":
            raise SnapshotError(f"snapshot writer is {self._state}, not open")
        m = self._m
        try:
            self.flush()
            m._sstore.sync()
            self._checksum = self._hash.hexdigest()
            if self.before_finalize is not None:
                self.before_finalize(self)
            self.meta = m._finalize(self)
        except BaseException:
            self.abort()
            raise
        self._state = "done"
        m._sstore._active.discard(self.id)
        self._unpin_parent()
        m._after_finalize(self.meta)
        return self.meta

    def abort(self) -> None:
        """Discard the snapshot (manifest row and chunks). Idempotent."""
        if self._state in ("done", "aborted", "suspended"):
            return
        self._state = "aborted"
        self._rows = []
        with contextlib.suppress(Exception):  # the snapshot is being discarded anyway
            self._join()
        if self.id is not None:
            try:
                if self._m._store._fault is None:  # fail-stopped: no more I/O; the next open drops the WRITING row
                    self._m._discard(self.id, busy_ok=True)
            finally:
                self._m._sstore._active.discard(self.id)
        self._unpin_parent()

    def suspend(self) -> int:
        """Install only: make the bytes received so far durable and release the writer without
        discarding them; :meth:`SnapshotManager.install` with the same index and term resumes at the
        returned offset (also after a restart)."""
        if not self.install:
            raise SnapshotError("only an install can be suspended; a local snapshot is written at once")
        off = self.flush()
        self._state = "suspended"
        self._m._sstore._active.discard(self.id)
        return off

    def stream(self) -> SnapshotReader:
        """A reader over the bytes committed so far (used by ``before_finalize`` hooks)."""
        meta = SnapshotMeta(self.id, self._m.group, self.index, self.term, self.kind, self._durable,
                            status="WRITING")
        return SnapshotReader(self._m._sstore, meta, size=self._durable,
                              checksum=self._hash.hexdigest() if self._durable == self._size else None)


# ---------------------------------------------------------------------------------------------- chains
@dataclass(frozen=True)
class DeltaSnapshot:
    """One link of a :class:`SnapshotChain`: a DELTA snapshot and the snapshot it applies on.

    A delta records only what changed since ``parent``; applying it requires the state restored from
    ``parent`` (and, recursively, the chain below it)."""

    meta: SnapshotMeta
    parent: SnapshotMeta

    def verify_link(self) -> None:
        """Raise :class:`SnapshotError` unless this link is sound: kind DELTA, ``parent_id`` names the
        parent, same group, the parent is DURABLE, older (smaller id) and at an index no higher."""
        m, p = self.meta, self.parent
        where = f"group {m.group!r}: snapshot chain link {p.id} -> {m.id}"
        if m.kind is not SnapshotKind.DELTA:
            raise SnapshotError(f"{where}: child is not a DELTA")
        if m.parent_id != p.id:
            raise SnapshotError(f"{where}: child names parent {m.parent_id}")
        if p.group != m.group:
            raise SnapshotError(f"{where}: parent belongs to group {p.group!r}")
        if p.status != "DURABLE":
            raise SnapshotError(f"{where}: parent is {p.status}")
        if not (p.id < m.id and p.index <= m.index):
            raise SnapshotError(f"{where}: out of order (parent index {p.index}, child index {m.index})")


class SnapshotChain:
    """A FULL base snapshot plus its ordered deltas, oldest first: restoring applies ``base`` and then
    every delta in order. Build with :meth:`load` (which verifies every link)."""

    def __init__(self, base: SnapshotMeta, deltas: list[DeltaSnapshot]):
        self.base = base
        self.deltas = deltas

    @classmethod
    def load(cls, mgr: SnapshotManager, head: SnapshotMeta) -> SnapshotChain:
        """The chain ending at ``head``, walking parent links down to a FULL base. Raises
        :class:`SnapshotError` for a missing parent or a broken link (see
        :meth:`DeltaSnapshot.verify_link`) and :class:`CorruptionError` for a bad manifest."""
        by_id = {m.id: m for m in mgr.list()}
        links: list[DeltaSnapshot] = []
        cur = head
        seen = set()
        while cur.kind is SnapshotKind.DELTA:
            if cur.id in seen:
                raise SnapshotError(f"group {mgr.group!r}: snapshot chain has a cycle at {cur.id}")
            seen.add(cur.id)
            parent = by_id.get(cur.parent_id)
            if parent is None:
                raise SnapshotError(f"group {mgr.group!r}: snapshot {cur.id} names parent {cur.parent_id}, "
                                    "which is not a durable snapshot of this group")
            link = DeltaSnapshot(cur, parent)
            link.verify_link()
            links.append(link)
            cur = parent
        links.reverse()
        return cls(cur, links)

    @property
    def head(self) -> SnapshotMeta:
        """The newest snapshot of the chain."""
        return self.deltas[-1].meta if self.deltas else self.base

    def metas(self) -> list[SnapshotMeta]:
        """Base first, then every delta in order."""
        return [self.base] + [d.meta for d in self.deltas]

    def __iter__(self):
        return iter(self.metas())

    def __len__(self) -> int:
        return 1 + len(self.deltas)

    def __repr__(self):
        return f"<SnapshotChain base={self.base.id} deltas={[d.meta.id for d in self.deltas]}>"


# ---------------------------------------------------------------------------------------------- manager
class SnapshotManager:
    """Snapshots of one group: ``store.snapshots(group)``.

    Attributes (configuration, may be set after creation): ``chunk_size`` (1 MiB),
    ``commit_bytes`` (8 MiB per chunks.db transaction; the writer hashes the next batch while the
    previous one commits, so up to two batches are in memory), ``max_chain_length`` (8: chain length,
    base included, after which :meth:`next_kind` asks for a FULL snapshot), ``keep_chains`` (2:
    retention after every finalize; None disables automatic retention), ``max_write_rate`` (None:
    bytes/s cap for writers).
    """

    #: Configuration attributes and their checks (run on every assignment: a bad value raises
    #: TypeError/ValueError and leaves the old one). A chunk must fit in one SQLite BLOB.
    _CONFIG = {
        "chunk_size": lambda v: int_arg("chunk_size", v, 1, MAX_CHUNK_SIZE),
        "commit_bytes": lambda v: int_arg("commit_bytes", v, 1, layout.MAX_SIZE),
        "max_chain_length": lambda v: int_arg("max_chain_length", v, 1, layout.MAX_INT64),
        "keep_chains": lambda v: None if v is None else int_arg("keep_chains", v, 1, layout.MAX_INT64),
        "max_write_rate": lambda v: None if v is None else float_arg("max_write_rate", v, 0.0, 1e18, lo_open=True),
    }

    def __setattr__(self, name, value):
        check = self._CONFIG.get(name)
        super().__setattr__(name, value if check is None else check(value))

    def __init__(self, store, group: str):
        self._store = store
        self.group = group
        self._sstore = SnapshotStore.of(store)
        self.chunk_size = DEFAULT_CHUNK_SIZE
        self.commit_bytes = DEFAULT_COMMIT_BYTES
        self.max_chain_length = DEFAULT_MAX_CHAIN_LENGTH
        self.keep_chains: int | None = DEFAULT_KEEP_CHAINS
        #: Optional cap on the snapshot write rate in bytes/s (None: as fast as the disk allows), to
        #: leave disk bandwidth to log commits while a big snapshot is written.
        self.max_write_rate: float | None = None
        #: Held while a snapshot of this group is captured, by whoever starts the capture: a
        #: :class:`SnapshotScheduler` holds it across the user's capture function and the compaction
        #: after it (so "is a capture running?" and "run one" are one decision, and a trigger while
        #: one runs is skipped and retried, never run alongside); ``StateMachineSnapshotManager.capture``
        #: takes it for a manual capture. Re-entrant on purpose: the documented
        #: ``SnapshotScheduler(store, g, lambda: sm.capture(...))`` calls ``sm.capture`` on the
        #: scheduler's thread while the scheduler holds the lock, and that call joins the capture
        #: the scheduler owns instead of waiting for itself forever. Another thread still blocks
        #: (a manual capture) or is skipped (a scheduler), so two captures of a group never overlap.
        self.capture_lock = threading.RLock()

    def _g(self):
        return self._store._groups[self.group]

    # ------------------------------------------------------------ queries
    def list(self) -> list[SnapshotMeta]:
        """DURABLE snapshots of the group, oldest first (by index, then id). Raises
        :class:`CorruptionError` if a manifest fails its CRC check."""
        return self._sstore.manifests(self.group, self._g().gid)

    def latest(self) -> SnapshotMeta | None:
        """The newest DURABLE snapshot (highest index, then highest id), or None. Its index is
        ``store.log(group).snapshot_index``."""
        ms = self.list()
        return ms[-1] if ms else None

    def pending_install(self) -> SnapshotMeta | None:
        """A partial InstallSnapshot kept from before (status WRITING, ``size`` = bytes durably
        received), not being written right now; None if there is none. Resume it with
        :meth:`install` at the same index and term."""
        busy = self._sstore.busy()
        for p in self._sstore.manifests(self.group, self._g().gid, "WRITING"):
            if p.source == "install" and p.id not in busy:
                shape = self._sstore.chunk_shape(p.id)
                size = 0
                for i, (seq, n) in enumerate(shape):
                    if seq != i:
                        break
                    size += n
                return SnapshotMeta(p.id, p.group, p.index, p.term, p.kind, size, p.parent_id, p.status,
                                    len(shape), None, None, p.source, p.created_at, None)
        return None

    def chain(self, head: SnapshotMeta | None = None) -> SnapshotChain | None:
        """The :class:`SnapshotChain` ending at ``head`` (default: :meth:`latest`), links verified."""
        head = self.latest() if head is None else _meta_arg("head", head)
        return None if head is None else SnapshotChain.load(self, head)

    def chains(self) -> list[list[SnapshotMeta]]:
        """Durable snapshots grouped into chains (each list base first), newest chain first. A
        snapshot whose parent is gone forms a (broken) chain of its own."""
        ms = self.list()
        by_id = {m.id: m for m in ms}
        root: dict[int, int] = {}

        def root_of(m):
            r = root.get(m.id)
            if r is None:
                p = by_id.get(m.parent_id) if m.kind is SnapshotKind.DELTA else None
                r = m.id if p is None or p.id >= m.id else root_of(p)
                root[m.id] = r
            return r

        groups: dict[int, list[SnapshotMeta]] = {}
        for m in ms:
            groups.setdefault(root_of(m), []).append(m)
        out = [sorted(v, key=lambda m: m.id) for v in groups.values()]
        out.sort(key=lambda c: max((m.index, m.id) for m in c), reverse=True)
        return out

    def next_kind(self) -> tuple[SnapshotKind, SnapshotMeta | None]:
        """The chain policy: ``(DELTA, parent)`` when the newest snapshot's chain is shorter than
        ``max_chain_length``, else ``(FULL, None)``."""
        head = self.latest()
        if head is None:
            return SnapshotKind.FULL, None
        try:
            n = len(SnapshotChain.load(self, head))
        except SnapshotError:
            return SnapshotKind.FULL, None
        return (SnapshotKind.DELTA, head) if n < self.max_chain_length else (SnapshotKind.FULL, None)

    # ------------------------------------------------------------ writing
    def write(self, index: int, term: int, *, kind: SnapshotKind = SnapshotKind.FULL,
              parent: SnapshotMeta | None = None, structures=None,
              before_finalize: Callable[[SnapshotWriter], None] | None = None) -> SnapshotWriter:
        """A writer for a **local** snapshot of the state machine as of log entry ``index``/``term``.

        Preconditions (checked when the writer starts and again atomically at finalize; violations
        raise :class:`SnapshotError` and nothing stays behind): ``index`` is committed
        (``<= commit_index``, hence ``<= last_index``), ``term == log.term(index)``, and ``index`` is
        not below the newest durable snapshot. A DELTA needs ``parent`` (a DURABLE snapshot of this
        group at an index ``<= index``). On finalize the manifest becomes DURABLE and
        ``snapshot_index``/``snapshot_term`` move to it in the same commit; the log is not changed
        (compact it with ``store.log(group).compact(index)``). ``structures`` (JSON-able) is stored in
        the manifest. ``before_finalize(writer)`` runs after the last chunk is durable and before the
        manifest flips; raising there discards the snapshot.
        """
        return self._writer(index, term, kind, parent, structures, False, before_finalize)

    def install(self, index: int, term: int, *,
                before_finalize: Callable[[SnapshotWriter], None] | None = None) -> SnapshotWriter:
        """A writer for a snapshot streamed from a leader (Raft's InstallSnapshot), FULL only.

        ``index`` must be above the newest durable snapshot (else :class:`SnapshotError`). If a
        partial install of the same ``index``/``term`` survives from before (a crash, or
        :meth:`SnapshotWriter.suspend`), the writer resumes it: ``w.offset`` tells where the leader
        must continue. A partial install of another index/term is discarded. Chunks arrive in order
        (``w.write(data, offset=...)``).

        On finalize, in ONE commit: the manifest becomes DURABLE, ``snapshot_index/term`` move to it,
        ``commit_index`` becomes ``max(commit_index, index)`` and the log is cut: if the log holds
        ``index`` with the same ``term`` the entries after it are kept (only ``first_index`` moves to
        ``index + 1``; whole segments below are deleted afterwards); otherwise the whole log is
        discarded (``first_index == index + 1``, ``last_index == index``, ``last_term == term``).
        Refused (:class:`SnapshotError`) when that would discard an entry at or below the commit
        index that disagrees with the snapshot. ``term(index)`` answers ``term`` afterwards.
        """
        return self._writer(index, term, SnapshotKind.FULL, None, None, True, before_finalize)

    def _writer(self, index, term, kind, parent, structures, install, before_finalize) -> SnapshotWriter:
        index, term = _int("index", index, 1, layout.MAX_INDEX), term_arg("term", term)
        kind = SnapshotKind(kind)
        if kind is SnapshotKind.FULL and parent is not None:
            raise ValueError("a FULL snapshot has no parent")
        if parent is not None:
            _meta_arg("parent", parent)
        if structures is not None:
            structures = json.loads(json.dumps(structures))
        self._store._ensure_group(self.group)
        return SnapshotWriter(self, index, term, kind=kind, parent=parent, structures=structures,
                              install=install, before_finalize=before_finalize)

    def _check_local(self, g, index, term, conn=None) -> None:
        name = self.group
        if index < g.snapshot_index:
            raise SnapshotError(f"group {name!r}: snapshot at {index} refused: a durable snapshot at "
                                f"{g.snapshot_index} is newer")
        if index > g.commit:
            raise SnapshotError(f"group {name!r}: snapshot at {index} refused: only entries up to the commit "
                                f"index {g.commit} may be covered by a snapshot")
        if index > g.last_index:
            raise SnapshotError(f"group {name!r}: snapshot at {index} refused: beyond the last index {g.last_index}")
        if index == g.snapshot_index and index < g.first_index:
            actual = g.snapshot_term
        elif index < g.first_index:
            raise SnapshotError(f"group {name!r}: snapshot at {index} refused: compacted (first index "
                                f"{g.first_index})")
        elif index == g.last_index:
            actual = g.last_term
        elif conn is not None:
            actual = self._store._reader_wal.term(conn, g.gid, index)
        else:
            actual = self._store.log(name).term(index)
        if actual != term:
            raise SnapshotError(f"group {name!r}: snapshot at {index} refused: term {term} given, the log has "
                                f"term {actual} there")

    def _insert_writing(self, w: SnapshotWriter) -> int:
        box = []
        now = time.time()
        source = "install" if w.install else "local"
        parent_id = w.parent.id if w.parent is not None else None

        def write(conn, g, _):
            conn.execute("INSERT INTO snapshots(group_id, idx, term, kind, parent_id, status, created_at, source) "
                         "VALUES (?,?,?,?,?,'WRITING',?,?)", (g.gid, w.index, w.term, w.kind.value, parent_id, now,
                                                             source))
            box.append(conn.last_insert_rowid())

        self._store._run(self.group, lambda g: None, write)
        sid = box[0]
        # an id may be reused after a crash removed its manifest: drop any chunks left under it
        self._sstore.delete_chunks([sid])
        return sid

    def _finalize(self, w: SnapshotWriter) -> SnapshotMeta:
        store = self._store
        name = self.group
        sid, index, term = w.id, w.index, w.term
        size, count, checksum = w._size, w._seq, w._checksum
        structures = json.dumps(w.structures, sort_keys=True) if w.structures is not None else None
        source = "install" if w.install else "local"
        parent_id = w.parent.id if w.parent is not None else None
        now = time.time()
        keep = []

        def check(g):
            if w.install:
                if index <= g.snapshot_index:
                    raise SnapshotError(f"group {name!r}: install at {index} refused: a durable snapshot at "
                                        f"{g.snapshot_index} is already held")
            elif index < g.snapshot_index:
                raise SnapshotError(f"group {name!r}: snapshot at {index} refused: a durable snapshot at "
                                    f"{g.snapshot_index} is newer")

        def write(conn, g, _):
            if not w.install:
                self._check_local(g, index, term, conn)
            crc = manifest_fields_crc(sid, g.gid, index, term, w.kind.value, parent_id, "DURABLE", size, count, checksum,
                               structures, source)
            if w.install:
                at = None
                if g.first_index <= index <= g.last_index:
                    at = g.last_term if index == g.last_index else store._reader_wal.term(conn, g.gid, index)
                elif index == g.snapshot_index:
                    at = g.snapshot_term
                keep_suffix = at == term
                if not keep_suffix and index < g.commit:
                    raise SnapshotError(f"group {name!r}: install at {index} (term {term}) refused: the local log "
                                        f"has term {at} there and commit index {g.commit}: committed entries "
                                        "would be lost (Raft safety violation)")
            conn.execute("UPDATE snapshots SET status='DURABLE', size=?, chunk_count=?, checksum=?, structures=?, "
                         "finished_at=?, crc32=? WHERE snapshot_id=? AND status='WRITING' AND group_id=?",
                         (size, count, checksum, structures, now, crc, sid, g.gid))
            if conn.changes() != 1:
                raise SnapshotError(f"group {name!r}: snapshot {sid} vanished while being written")
            if parent_id is not None and conn.execute(
                    "SELECT count(*) FROM snapshots WHERE snapshot_id=? AND group_id=? AND status='DURABLE' AND idx<=?",
                    (parent_id, g.gid, index)).fetchone()[0] != 1:
                raise SnapshotError(f"group {name!r}: the parent {parent_id} of delta snapshot {sid} is gone")
            if index > g.snapshot_index or (index == g.snapshot_index and term != g.snapshot_term):
                g.snapshot_index, g.snapshot_term = index, term
                store._write_group(conn, g)
            if not w.install:
                return
            base = g.gid * (1 << 40)
            if index > g.commit:
                g.commit = index
                store._write_meta(conn, g, True)
            g.first_index = index + 1
            if keep_suffix:
                keep.append(True)
            else:
                # entries <= index are covered by the snapshot made DURABLE above; those above it are
                # uncommitted (checked) and need the truncate permit to pass the guard trigger
                conn.execute("UPDATE groups SET truncate_permit=? WHERE group_id=?", (index, g.gid))
                conn.execute("DELETE FROM log_entries WHERE key >= ? AND key < ?", (base, base + (1 << 40)))
                conn.execute("UPDATE groups SET truncate_permit=NULL WHERE group_id=?", (g.gid,))
                conn.execute("DELETE FROM log_segments WHERE group_id=?", (g.gid,))
                g.seg = None
                g.last_index, g.last_term = index, term
            store._write_group(conn, g)

        store._run(name, check, write)
        if keep:
            try:
                store._compact_segments(name)
            except RaftSqliteError as exc:  # the snapshot is durable; segment removal retries on compact()
                log.warning("group %r: segment compaction after install failed: %s", name, exc)
        meta = self._sstore.manifest(sid, name, self._g().gid)
        assert meta is not None and meta.status == "DURABLE"
        return meta

    def _after_finalize(self, meta: SnapshotMeta) -> None:
        log.debug("group %r: snapshot %d durable (%s, index %d, term %d, %d bytes)", self.group, meta.id,
                  meta.kind.value, meta.index, meta.term, meta.size)
        if self.keep_chains is not None:
            try:
                self.retain(self.keep_chains)
            except RaftSqliteError as exc:
                log.warning("group %r: snapshot retention failed: %s", self.group, exc)

    def _discard(self, sid: int, busy_ok: bool = False) -> None:
        """Remove a WRITING snapshot: manifest first (one commit), then its chunks."""
        store = self._store
        if not busy_ok and sid in self._sstore.busy():
            raise SnapshotError(f"group {self.group!r}: snapshot {sid} is being written or read")
        with store.gc_lock:
            def write(conn, g, _):
                conn.execute("DELETE FROM snapshots WHERE snapshot_id=? AND status='WRITING'", (sid,))

            try:
                store._run(self.group, lambda g: None, write)
            finally:
                self._sstore.delete_chunks([sid])

    # ------------------------------------------------------------ reading
    def open(self, meta: SnapshotMeta, *, verify_digest: bool = True) -> SnapshotReader:
        """A readable, seekable binary stream of the DURABLE snapshot ``meta`` (see
        :class:`SnapshotReader`: CRC32 per chunk, sha256 at end of a sequential read, bounded memory).
        ``verify_digest=False`` skips the sha256 (CRC32 per chunk is always checked): for a reader
        that verifies end to end itself, e.g. a follower installing the stream. Raises
        :class:`SnapshotError` if it is not a durable snapshot of this group (e.g. deleted by
        retention) and :class:`CorruptionError` for damaged chunks."""
        _meta_arg("meta", meta)
        cur = self._sstore.manifest(meta.id, self.group, self._g().gid)
        if cur is None or cur.status != "DURABLE":
            raise SnapshotError(f"group {self.group!r}: snapshot {meta.id} is not a durable snapshot")
        if (cur.index, cur.term, cur.checksum) != (meta.index, meta.term, meta.checksum):
            raise SnapshotError(f"group {self.group!r}: snapshot {meta.id} does not match the given manifest")
        return SnapshotReader(self._sstore, cur, verify_digest=verify_digest)

    def verify(self, meta: SnapshotMeta | None = None) -> int:
        """Read ``meta`` (default: every durable snapshot of the group) completely, checking every
        chunk's CRC32 and the sha256 digest, and every chain link. Returns the snapshots verified;
        raises :class:`CorruptionError`/:class:`SnapshotError` at the first problem."""
        metas = [_meta_arg("meta", meta)] if meta is not None else self.list()
        for m in metas:
            with self.open(m) as r:
                for _ in r.chunks():
                    pass
            if m.kind is SnapshotKind.DELTA:
                SnapshotChain.load(self, m)
        return len(metas)

    # ------------------------------------------------------------ retention
    def retain(self, keep_chains: int | None = None) -> list[int]:
        """Delete all but the ``keep_chains`` (default ``self.keep_chains``) newest snapshot chains.

        The chain of the newest durable snapshot is always kept, as is any chain with a snapshot
        being read. Manifests are deleted first (one commit that re-checks the newest snapshot is
        untouched), then their chunks; both under ``store.gc_lock``. Stale partial installs (at or
        below the newest durable snapshot) are removed too. Returns the deleted ids."""
        keep = self.keep_chains if keep_chains is None else keep_chains
        keep = _int("keep_chains", keep if keep is not None else DEFAULT_KEEP_CHAINS, 1)
        store = self._store
        with store.gc_lock:
            chains = self.chains()
            busy = self._sstore.busy()
            doomed: list[int] = []
            for i, ch in enumerate(chains):
                if i < keep or any(m.id in busy for m in ch):
                    continue
                doomed.extend(m.id for m in ch)
            g = self._g()
            stale = [p.id for p in self._sstore.manifests(self.group, g.gid, "WRITING")
                     if p.source == "install" and p.index <= g.snapshot_index and p.id not in busy]
            if not doomed and not stale:
                return []
            head = chains[0][-1] if chains else None

            def write(conn, g, _):
                for sid in doomed:
                    conn.execute("DELETE FROM snapshots WHERE snapshot_id=? AND status='DURABLE'", (sid,))
                for sid in stale:
                    conn.execute("DELETE FROM snapshots WHERE snapshot_id=? AND status='WRITING'", (sid,))
                newest = conn.execute("SELECT max(idx) FROM snapshots WHERE group_id=? AND status='DURABLE'",
                                      (g.gid,)).fetchone()[0] or 0
                if newest != g.snapshot_index:
                    raise SnapshotError(f"group {self.group!r}: retention would remove the newest durable snapshot "
                                        f"(head {head and head.id})")

            store._run(self.group, lambda g: None, write)
            self._sstore.delete_chunks(doomed + stale)
        if doomed:
            log.debug("group %r: retention deleted snapshots %s", self.group, doomed)
        return doomed + stale

    def __repr__(self):
        return f"<SnapshotManager {self.group!r} snapshot_index={self._g().snapshot_index}>"


# ---------------------------------------------------------------------------------------------- scheduler
class SnapshotScheduler:
    """Takes snapshots of one group in the background, off the append path.

    ``capture()`` is the user's function that snapshots the state machine at its applied index and
    returns the :class:`SnapshotMeta` (typically
    ``lambda: sm.capture(applied, log.term(applied))``). It runs on the scheduler's thread when
    ``applied_index() - snapshot_index >= every_entries`` or, if ``every_seconds`` is set, when that
    much time passed since the last snapshot and something was applied since. ``applied_index``
    defaults to the group's commit index. At most one capture per group runs at a time (the group's
    :attr:`SnapshotManager.capture_lock`, shared with manual captures: a trigger while another
    thread's capture runs is skipped and retried at the next wake-up; ``capture()`` itself may call
    ``StateMachineSnapshotManager.capture``, which joins the capture the scheduler owns). With ``compact_lag`` set, the log is compacted after each snapshot up to
    ``snapshot.index - compact_lag`` (entries kept for slow followers). ``notify()`` wakes the thread
    early (cheap: an Event set; safe to call on the append path).
    """

    def __init__(self, store, group: str, capture: Callable[[], SnapshotMeta | None], *,
                 every_entries: int | None = 10_000, every_seconds: float | None = None,
                 applied_index: Callable[[], int] | None = None, compact_lag: int | None = None,
                 poll_interval: float = 0.5):
        if every_entries is None and every_seconds is None:
            raise ValueError("give every_entries and/or every_seconds")
        if every_entries is not None:
            every_entries = _int("every_entries", every_entries, 1, layout.MAX_INDEX)
        if compact_lag is not None:
            compact_lag = _int("compact_lag", compact_lag, 0, layout.MAX_INDEX)
        if every_seconds is not None:
            every_seconds = float_arg("every_seconds", every_seconds, 0.0, 1e9, lo_open=True)
        poll_interval = float_arg("poll_interval", poll_interval, 0.0, 1e6, lo_open=True)
        if not callable(capture):
            raise TypeError(f"capture must be callable, not {type(capture).__name__}")
        if applied_index is not None and not callable(applied_index):
            raise TypeError(f"applied_index must be callable, not {type(applied_index).__name__}")
        self.store = store
        self.group = group
        self.capture = capture
        self.every_entries, self.every_seconds = every_entries, every_seconds
        self.applied_index = applied_index or (lambda: store._groups[group].commit)
        self.compact_lag = compact_lag
        self.poll_interval = poll_interval
        self.mgr: SnapshotManager = store.snapshots(group)
        self.runs = 0
        self.skipped = 0
        self.failures = 0
        self.last_error: BaseException | None = None
        self.last_meta: SnapshotMeta | None = None
        self._last_time = time.monotonic()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._force = False
        self._thread: threading.Thread | None = None

    def due(self) -> bool:
        """True when a trigger condition holds now."""
        if self._force:
            return True
        applied = self.applied_index()
        since = applied - self.store._groups[self.group].snapshot_index
        if self.every_entries is not None and since >= self.every_entries:
            return True
        return bool(self.every_seconds is not None and since > 0 and time.monotonic() - self._last_time >= self.every_seconds)

    def run_once(self) -> SnapshotMeta | None:
        """Capture now if no capture of this group is running (else return None and count a skip)."""
        if not self.mgr.capture_lock.acquire(blocking=False):
            self.skipped += 1
            return None
        try:
            self._force = False
            meta = self.capture()
            self.runs += 1
            self.last_meta = meta
            if meta is not None and self.compact_lag is not None:
                up_to = meta.index - self.compact_lag
                if up_to >= self.store.log(self.group).first_index:
                    self.store.log(self.group).compact(up_to)
            return meta
        finally:
            self._last_time = time.monotonic()
            self.mgr.capture_lock.release()

    def _loop(self):
        while not self._stop.is_set():
            self._wake.wait(self.poll_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self.due():
                    self.run_once()
            except Exception as exc:  # noqa: BLE001 -- keep scheduling; the error is kept and logged
                self.failures += 1
                self.last_error = exc
                log.warning("group %r: scheduled snapshot failed: %s", self.group, exc)

    def notify(self) -> None:
        """Wake the scheduler to re-check its triggers now."""
        self._wake.set()

    def trigger(self) -> None:
        """Ask for a snapshot at the next wake-up regardless of the thresholds, and wake up."""
        self._force = True
        self._wake.set()

    def start(self) -> SnapshotScheduler:
        """Start the background thread (daemon)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"raft_sqlite-snapshot-{self.group}",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread, waiting for a running capture to finish."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["DEFAULT_CHUNK_SIZE", "DEFAULT_COMMIT_BYTES", "DEFAULT_KEEP_CHAINS", "DEFAULT_MAX_CHAIN_LENGTH",
           "DeltaSnapshot", "SnapshotChain", "SnapshotKind", "SnapshotManager", "SnapshotMeta", "SnapshotReader",
           "SnapshotScheduler", "SnapshotStore", "SnapshotWriter", "manifest_crc", "manifest_fields_crc"]
