"""Writing a snapshot: :class:`SnapshotWriter` carries out the write protocol (see the package doc):
insert a WRITING manifest, stream the chunks to chunks.db in batches, then flip the manifest to
DURABLE in one commit of raft.db (for an install also cutting the log), or discard it all."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import logging
import threading
import time
import zlib
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self

import apsw

from .. import layout
from ..dbrows import db_scalar
from ..errors import RaftSqliteError, SnapshotError
from ..groupstate import GroupState, write_group_row, write_meta_row
from ..log import PersistentRaftLog
from ..wal import cut_after
from .chunks import SnapshotStore
from .manifest import SnapshotKind, SnapshotMeta, manifest_fields_crc
from .reader import SnapshotReader

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer  # typeshed-only name (what memoryview() accepts)

log = logging.getLogger("raft_sqlite.snapshot")
_SEQ_SPAN = layout.CHUNK_SEQ_SPAN


class WriterHost(Protocol):
    """What a :class:`SnapshotWriter` needs from the :class:`~raft_sqlite.snapshot.SnapshotManager` that
    made it (a protocol, so this module does not import the manager, which imports it). The
    configuration is read when used, so a change on the manager applies to writers already open."""

    group: str
    chunk_size: int
    commit_bytes: int
    max_write_rate: float | None
    keep_chains: int | None

    @property
    def chunk_store(self) -> SnapshotStore:
        """The node's :class:`SnapshotStore`."""
        ...

    def retain(self, keep_chains: int | None = None) -> builtins.list[int]:
        """Retention, run after each finalize when ``keep_chains`` is set."""
        ...


def _with_crc(rows: list[tuple[int, int, int, bytes]]) -> list[tuple[int, int, int, bytes, int]]:
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

    def __init__(self, mgr: WriterHost, index: int, term: int, *, kind: SnapshotKind,
                 parent: SnapshotMeta | None, structures: Any, install: bool,
                 before_finalize: Callable[[SnapshotWriter], None] | None):
        self._m = mgr
        self._s = mgr.chunk_store
        self._kernel = self._s.kernel
        self.index, self.term = index, term
        self.kind, self.parent, self.structures = kind, parent, structures
        self.install = install
        self.before_finalize = before_finalize
        #: The :class:`SnapshotMeta` of the finalized snapshot (set by a clean exit / :meth:`finish`).
        self.meta: SnapshotMeta | None = None
        self.id: int | None = None
        self._buf = bytearray()
        self._rows: list[tuple[int, int, int, bytes]] = []
        self._pending = 0
        self._seq = 0
        self._size = 0  # bytes accepted (buffered + durable)
        self._durable = 0
        self._hash = hashlib.sha256()
        # (thread, bytes, [error]) of the batch committed in the background
        self._inflight: tuple[threading.Thread, int, list[BaseException]] | None = None
        self._next_at = time.monotonic()  # pacing (max_write_rate)
        self._state = "new"
        self._checksum: str | None = None  # sha256 hex digest, set by finish()
        self._parent_pinned = False
        #: True when :meth:`begin` resumed a partial install received before (``offset`` > 0 then).
        self.resumed = False

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> Self:
        self.begin()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
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
        if self._kernel.in_transaction():
            raise SnapshotError("a snapshot cannot be written inside store.transaction(): its chunks are committed "
                                "separately and its manifest flips in a commit of its own")
        g = self._g()
        if self.install:
            if self.index <= g.snapshot_index:
                raise SnapshotError(f"group {m.group!r}: install of a snapshot at {self.index} refused: a durable "
                                    f"snapshot at {g.snapshot_index} is already held")
            pend = [p for p in self._s.manifests(m.group, g.gid, "WRITING")
                    if p.source == "install" and p.id not in self._s.busy()]
            for p in pend:
                if p.index == self.index and p.term == self.term and self.id is None:
                    self._s.activate(p.id)
                    try:
                        self._resume(p)
                    except BaseException:
                        self._s.deactivate(p.id)
                        raise
                else:
                    self._discard(p.id)
        else:
            self._check_local(g, self.index, self.term)
        if self.kind is SnapshotKind.DELTA:
            parent = self.parent
            if parent is None or parent.status != "DURABLE" or parent.group != m.group:
                raise SnapshotError(f"group {m.group!r}: a DELTA snapshot needs a DURABLE parent of the same group")
            if parent.index > self.index:
                raise SnapshotError(f"group {m.group!r}: a DELTA at {self.index} cannot follow its parent at "
                                    f"{parent.index}")
            self._s.pin(parent.id)  # retention keeps the parent's chain while this delta is written
            self._parent_pinned = True
        try:
            if self.id is None:
                self.id = self._insert_writing()
        except BaseException:
            self._unpin_parent()
            raise
        self._s.activate(self.id)
        self._state = "open"
        return self

    def _unpin_parent(self) -> None:
        if self._parent_pinned:
            self._parent_pinned = False
            assert self.parent is not None  # only a writer with a parent pins one (begin())
            self._s.unpin(self.parent.id)

    def _resume(self, p: SnapshotMeta) -> None:
        """Continue a partial install: re-hash its durable chunks (verifying CRCs); a bad or missing
        chunk and everything after it is dropped and will be received again."""
        s = self._s
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
            s.drop_chunks_from(p.id, good)
        self._seq = good
        self._durable = self._size
        self.id = p.id
        self.resumed = True

    # ------------------------------------------------------------ data
    def write(self, data: ReadableBuffer, offset: int | None = None) -> int:
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
        assert sid is not None  # set by begin(); chunks are emitted only while open
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
        self._kernel.governor.pace()  # the log's commits first (see raft_sqlite.governor)
        rate = self._m.max_write_rate
        if rate:
            wait = self._next_at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._next_at = max(self._next_at, time.monotonic() - 0.1) + n / rate
        if not background:
            try:
                self._s.write_chunks(_with_crc(rows))
            except BaseException:
                self._state = "failed"
                raise
            self._durable += n
            return
        err: list[BaseException] = []
        store = self._s

        def job() -> None:
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
        try:
            self.flush()
            self._s.sync()
            self._checksum = self._hash.hexdigest()
            if self.before_finalize is not None:
                self.before_finalize(self)
            self.meta = meta = self._finalize()
        except BaseException:
            self.abort()
            raise
        self._state = "done"
        assert self.id is not None  # set by begin() (the writer is open)
        self._s.deactivate(self.id)
        self._unpin_parent()
        self._after_finalize(meta)
        return meta

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
                if self._kernel.fault is None:  # fail-stopped: no more I/O; the next open drops the WRITING row
                    self._discard(self.id, busy_ok=True)
            finally:
                self._s.deactivate(self.id)
        self._unpin_parent()

    def suspend(self) -> int:
        """Install only: make the bytes received so far durable and release the writer without
        discarding them; :meth:`SnapshotManager.install` with the same index and term resumes at the
        returned offset (also after a restart)."""
        if not self.install:
            raise SnapshotError("only an install can be suspended; a local snapshot is written at once")
        off = self.flush()
        self._state = "suspended"
        assert self.id is not None  # set by begin() (flush() above checked the writer is open)
        self._s.deactivate(self.id)
        return off

    def stream(self) -> SnapshotReader:
        """A reader over the bytes committed so far (used by ``before_finalize`` hooks)."""
        if self.id is None:
            raise SnapshotError("snapshot writer is new, not open: stream() needs begin() first")
        meta = SnapshotMeta(self.id, self._m.group, self.index, self.term, self.kind, self._durable,
                            status="WRITING")
        return SnapshotReader(self._s, meta, size=self._durable,
                              checksum=self._hash.hexdigest() if self._durable == self._size else None)

    # ------------------------------------------------------------ raft.db: the manifest row
    def _g(self) -> GroupState:
        return self._kernel.group(self._m.group)

    def _check_local(self, g: GroupState, index: int, term: int, conn: apsw.Connection | None = None) -> None:
        """Refuse a local snapshot at ``index``/``term`` unless ``index`` is committed, not below the newest
        durable snapshot, not compacted, and the log has ``term`` there (``conn``: read inside a commit)."""
        name = self._m.group
        if index < g.snapshot_index:
            raise SnapshotError(f"group {name!r}: snapshot at {index} refused: a durable snapshot at "
                                f"{g.snapshot_index} is newer")
        if index > g.commit:
            raise SnapshotError(f"group {name!r}: snapshot at {index} refused: only entries up to the commit "
                                f"index {g.commit} may be covered by a snapshot")
        if index > g.last_index:
            raise SnapshotError(f"group {name!r}: snapshot at {index} refused: beyond the last index {g.last_index}")
        actual: int | None  # None: the record is gone (never equal to a term: refused below)
        if index == g.snapshot_index and index < g.first_index:
            actual = g.snapshot_term
        elif index < g.first_index:
            raise SnapshotError(f"group {name!r}: snapshot at {index} refused: compacted (first index "
                                f"{g.first_index})")
        elif index == g.last_index:
            actual = g.last_term
        elif conn is not None:
            actual = self._kernel.reader.term(conn, g.gid, index)
        else:
            actual = PersistentRaftLog(self._kernel, name).term(index)
        if actual != term:
            raise SnapshotError(f"group {name!r}: snapshot at {index} refused: term {term} given, the log has "
                                f"term {actual} there")

    def _insert_writing(self) -> int:
        """Insert the WRITING manifest row (one commit of raft.db); returns its snapshot id."""
        w = self
        box: list[int] = []
        now = time.time()
        source = "install" if w.install else "local"
        parent_id = w.parent.id if w.parent is not None else None

        def write(conn: apsw.Connection, g: GroupState, _: object) -> None:
            conn.execute("INSERT INTO snapshots(group_id, idx, term, kind, parent_id, status, created_at, source) "
                         "VALUES (?,?,?,?,?,'WRITING',?,?)", (g.gid, w.index, w.term, w.kind.value, parent_id, now,
                                                             source))
            box.append(conn.last_insert_rowid())

        self._kernel.run(self._m.group, lambda g: None, write)
        sid = box[0]
        # an id may be reused after a crash removed its manifest: drop any chunks left under it
        self._s.delete_chunks([sid])
        return sid

    def _finalize(self) -> SnapshotMeta:
        """Flip the manifest to DURABLE in one commit of raft.db, re-checking the group's state there
        (see :meth:`~raft_sqlite.snapshot.SnapshotManager.write` and ``install``)."""
        w = self
        kernel = self._kernel
        name = self._m.group
        sid, index, term = w.id, w.index, w.term
        assert sid is not None  # set by begin() (finish() runs on an open writer)
        size, count, checksum = w._size, w._seq, w._checksum
        structures = json.dumps(w.structures, sort_keys=True) if w.structures is not None else None
        source = "install" if w.install else "local"
        parent_id = w.parent.id if w.parent is not None else None
        now = time.time()
        keep: list[bool] = []

        def check(g: GroupState) -> None:
            if w.install:
                if index <= g.snapshot_index:
                    raise SnapshotError(f"group {name!r}: install at {index} refused: a durable snapshot at "
                                        f"{g.snapshot_index} is already held")
            elif index < g.snapshot_index:
                raise SnapshotError(f"group {name!r}: snapshot at {index} refused: a durable snapshot at "
                                    f"{g.snapshot_index} is newer")

        def write(conn: apsw.Connection, g: GroupState, _: object) -> None:
            if not w.install:
                self._check_local(g, index, term, conn)
            crc = manifest_fields_crc(sid, g.gid, index, term, w.kind.value, parent_id, "DURABLE", size, count, checksum,
                               structures, source)
            if w.install:
                at = None
                if g.first_index <= index <= g.last_index:
                    at = g.last_term if index == g.last_index else kernel.reader.term(conn, g.gid, index)
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
            if parent_id is not None and db_scalar(conn.execute(
                    "SELECT count(*) FROM snapshots WHERE snapshot_id=? AND group_id=? AND status='DURABLE' AND idx<=?",
                    (parent_id, g.gid, index))) != 1:
                raise SnapshotError(f"group {name!r}: the parent {parent_id} of delta snapshot {sid} is gone")
            if index > g.snapshot_index or (index == g.snapshot_index and term != g.snapshot_term):
                g.snapshot_index, g.snapshot_term = index, term
                write_group_row(conn, g)
            if not w.install:
                return
            if index > g.commit:
                g.commit = index
                write_meta_row(conn, g)
            g.first_index = index + 1
            if keep_suffix:
                keep.append(True)
            else:
                # entries <= index are covered by the snapshot made DURABLE above; those above it are
                # uncommitted (checked) and need the truncate permit to pass the guard trigger
                cut_after(conn, g.gid, 0, permit=index)  # every record and segment of the group
                g.seg = None
                g.last_index, g.last_term = index, term
            write_group_row(conn, g)

        kernel.run(name, check, write)
        if keep:
            try:
                kernel.compact_segments(name)
            except RaftSqliteError as exc:  # the snapshot is durable; segment removal retries on compact()
                log.warning("group %r: segment compaction after install failed: %s", name, exc)
        meta = self._s.manifest(sid, name, self._g().gid)
        assert meta is not None and meta.status == "DURABLE"
        return meta

    def _after_finalize(self, meta: SnapshotMeta) -> None:
        m = self._m
        log.debug("group %r: snapshot %d durable (%s, index %d, term %d, %d bytes)", m.group, meta.id,
                  meta.kind.value, meta.index, meta.term, meta.size)
        if m.keep_chains is not None:
            try:
                m.retain(m.keep_chains)
            except RaftSqliteError as exc:
                log.warning("group %r: snapshot retention failed: %s", m.group, exc)

    def _discard(self, sid: int, busy_ok: bool = False) -> None:
        """Remove a WRITING snapshot: manifest first (one commit), then its chunks."""
        kernel = self._kernel
        if not busy_ok and sid in self._s.busy():
            raise SnapshotError(f"group {self._m.group!r}: snapshot {sid} is being written or read")
        with kernel.gc_lock:
            def write(conn: apsw.Connection, g: GroupState, _: object) -> None:
                conn.execute("DELETE FROM snapshots WHERE snapshot_id=? AND status='WRITING'", (sid,))

            try:
                kernel.run(self._m.group, lambda g: None, write)
            finally:
                self._s.delete_chunks([sid])

