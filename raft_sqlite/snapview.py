"""A read-only view of the snapshots in a ``data_dir``: the backend of ``raft-sqlite snapshot``.

:class:`SnapshotView` opens ``raft.db`` and ``chunks.db`` with :func:`raft_sqlite.verify.open_readonly`
(``SQLITE_OPEN_READONLY`` + ``PRAGMA query_only``): it never writes, never takes the node's lock and is
safe beside a running node, like ``raft-sqlite verify``. It lists manifests (checking their CRC), groups
them into chains (:func:`raft_sqlite.snapshot.chains_of`), opens verifying streams
(:class:`raft_sqlite.snapshot.SnapshotReader`, for which it is the :class:`~raft_sqlite.snapshot.ChunkSource`),
verifies snapshots and exports one to a file atomically.

Consistency beside a running node: :meth:`SnapshotView.consistent` holds one read transaction on
``chunks.db`` and, begun after it, one on ``raft.db``. A manifest seen in the second was not yet deleted
when the first began (retention deletes the manifest before its chunks), so its chunks are all there. A
snapshot that became DURABLE between the two may miss chunks in the first: :meth:`SnapshotView.verify`
checks a snapshot that fails again in fresh transactions before reporting it, and reports one that
retention removed meanwhile as gone, not as a problem.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import IO, Any, Self, cast

import apsw

from . import fsio, layout
from .errors import CorruptionError, GroupNotFoundError, SnapshotError
from .snapshot import (
    MANIFEST_COLUMNS,
    SnapshotChain,
    SnapshotMeta,
    SnapshotReader,
    chains_of,
    meta_from_row,
)
from .statemachine import StructureTableError, verify_stream
from .verify import open_readonly

_SEQ_SPAN = layout.CHUNK_SEQ_SPAN

#: ``progress(bytes_done, bytes_total)``, called as an export or a verify streams.
ByteProgress = Callable[[int, int], None]


class SnapshotNotFoundError(SnapshotError):
    """No snapshot with that id (in that group), or it is not DURABLE (still being written)."""


@dataclasses.dataclass
class SnapshotCheck:
    """What :meth:`SnapshotView.verify` found for one snapshot: ``problems`` are ``(kind, message)`` with
    kind ``manifest`` (CRC or fields), ``chain`` (a link), ``chunks`` (CRC32, sequence, count, size,
    sha256) or ``structures`` (the structure table or a structure's sha256). ``gone``: retention removed
    it while it was being checked (not a problem)."""

    snapshot_id: int
    group: str
    index: int | None
    kind: str | None
    size: int | None
    state_machine: bool
    problems: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    gone: bool = False

    @property
    def ok(self) -> bool:
        """True when nothing is wrong with it."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``raft-sqlite snapshot verify --json``)."""
        return {"snapshot_id": self.snapshot_id, "group": self.group, "index": self.index, "kind": self.kind,
                "size": self.size, "state_machine": self.state_machine, "ok": self.ok, "gone": self.gone,
                "problems": [{"kind": k, "message": m} for k, m in self.problems]}


class _GroupSnapshots:
    """One group's durable snapshots, as :meth:`SnapshotChain.load` reads them (a ``SnapshotSource``)."""

    def __init__(self, group: str, metas: list[SnapshotMeta]):
        self.group = group
        self._metas = metas

    def list(self) -> list[SnapshotMeta]:
        """The group's durable snapshots (as read when this was made)."""
        return list(self._metas)


class SnapshotView:
    """Read-only access to the snapshots of ``data_dir`` (see the module doc). Use as a context manager
    or call :meth:`close`. Raises :class:`raft_sqlite.verify.NotAStoreError` when there is no ``raft.db``.
    Not thread-safe beyond what :class:`SnapshotReader` does with it (one prefetch thread)."""

    def __init__(self, data_dir: str | os.PathLike[str]):
        self.data_dir = os.fspath(data_dir)
        self.path = os.path.join(self.data_dir, layout.MAIN_DB)
        self.chunks_path = os.path.join(self.data_dir, layout.CHUNKS_DB)
        self._main = open_readonly(self.path)
        self._chunks: apsw.Connection | None = None
        try:
            if os.path.isfile(self.chunks_path):
                self._chunks = open_readonly(self.chunks_path)
        except BaseException:
            self._main.close()
            raise
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close both connections."""
        if self._chunks is not None:
            self._chunks.close()
        self._main.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @contextlib.contextmanager
    def consistent(self) -> Iterator[None]:
        """A read transaction on ``chunks.db`` and then one on ``raft.db`` for the ``with`` block (see the
        module doc). While it is open the node's ``chunks.db`` checkpoints cannot pass this reader's
        view, so keep it for one command."""
        with contextlib.ExitStack() as stack:
            for c in (self._chunks, self._main):
                if c is not None:
                    stack.enter_context(c)  # apsw: a SAVEPOINT, i.e. a read transaction from the first read
                    c.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # the snapshot starts here
            yield

    # ---------------------------------------------------------------- manifests
    def groups(self) -> dict[str, int]:
        """Group name -> group id, by id."""
        return {str(n): int(g) for g, n in self._main.execute("SELECT group_id, name FROM groups ORDER BY group_id")}

    def _gid(self, group: str) -> int:
        gid = self.groups().get(group)
        if gid is None:
            raise GroupNotFoundError(f"no group {group!r} in this store (groups: {', '.join(self.groups()) or 'none'})")
        return gid

    def _rows(self, where: str, args: tuple[Any, ...]) -> list[Any]:
        return self._main.execute(f"SELECT {MANIFEST_COLUMNS} FROM snapshots WHERE {where} ORDER BY idx, snapshot_id",
                                  args).fetchall()

    def manifests(self, group: str, status: str | None = "DURABLE") -> list[SnapshotMeta]:
        """Manifests of ``group`` ordered by (index, id); ``status`` None: WRITING ones too. Raises
        :class:`CorruptionError` when a DURABLE manifest fails its CRC check and
        :class:`GroupNotFoundError` for an unknown group."""
        gid = self._gid(group)
        rows = self._rows("group_id=?" + (" AND status=?" if status else ""), (gid, status) if status else (gid,))
        return [meta_from_row(r, group, self.path) for r in rows]

    def find(self, sid: int, group: str | None = None) -> SnapshotMeta:
        """The manifest with id ``sid`` (of ``group`` when given), any status. Raises
        :class:`SnapshotNotFoundError` when there is none and :class:`CorruptionError` when it fails its
        CRC check."""
        if group is not None:
            gid = self._gid(group)
            rows = self._rows("snapshot_id=? AND group_id=?", (sid, gid))
        else:
            rows = self._rows("snapshot_id=?", (sid,))
        if not rows:
            raise SnapshotNotFoundError(f"no snapshot {sid}" + (f" in group {group!r}" if group is not None else "")
                                        + " (`raft-sqlite snapshot list` shows them)")
        names = {g: n for n, g in self.groups().items()}
        gname = names.get(rows[0][1], f"<unknown group {rows[0][1]}>")
        return meta_from_row(rows[0], gname, self.path)

    def chains(self, group: str) -> list[list[SnapshotMeta]]:
        """Durable snapshots of ``group`` grouped into chains, each base first, newest chain first."""
        return chains_of(self.manifests(group))

    def chain(self, meta: SnapshotMeta) -> SnapshotChain:
        """The verified chain ending at ``meta`` (:meth:`SnapshotChain.load`; :class:`SnapshotError` for
        a missing parent or a broken link)."""
        return SnapshotChain.load(_GroupSnapshots(meta.group, self.manifests(meta.group)), meta)

    # ---------------------------------------------------------------- chunks (ChunkSource)
    def _chunk_conn(self) -> apsw.Connection:
        if self._chunks is None:
            raise CorruptionError(f"{self.chunks_path}: missing (the snapshot chunks are stored there)")
        return self._chunks

    def chunk_shape(self, sid: int) -> list[tuple[int, int]]:
        """``(seq, length)`` of every chunk of snapshot ``sid`` in order (no blob is read)."""
        with self._lock:
            rows = self._chunk_conn().execute(
                "SELECT seq, length(data) FROM snapshot_chunks WHERE key >= ? AND key < ? ORDER BY key",
                (sid * _SEQ_SPAN, (sid + 1) * _SEQ_SPAN)).fetchall()
        return [(int(cast(int, s)), int(cast(int, n))) for s, n in rows]  # INTEGER seq, length() of a blob

    def read_chunk(self, sid: int, seq: int) -> tuple[bytes, int] | None:
        """``(data, crc32)`` of one chunk (unverified), or None if it does not exist."""
        with self._lock:
            row = self._chunk_conn().execute("SELECT CAST(data AS BLOB), crc32 FROM snapshot_chunks WHERE key=?",
                                             (sid * _SEQ_SPAN + seq,)).fetchone()
        return None if row is None else (bytes(row[0] or b""), int(row[1]) if isinstance(row[1], int) else -1)

    def pin(self, sid: int) -> None:
        """Nothing to do: this process never deletes (the read transaction keeps the chunks in view)."""

    def unpin(self, sid: int) -> None:
        """Nothing to do (see :meth:`pin`)."""

    # ---------------------------------------------------------------- reading
    def open(self, meta: SnapshotMeta) -> SnapshotReader:
        """A verifying stream (:class:`SnapshotReader`: CRC32 per chunk, sha256 at the end of a sequential
        read) of the DURABLE snapshot ``meta``; :class:`SnapshotNotFoundError` if it is not durable."""
        if meta.status != "DURABLE":
            raise SnapshotNotFoundError(f"group {meta.group!r}: snapshot {meta.id} is {meta.status}, not durable")
        return SnapshotReader(self, meta)

    def export(self, meta: SnapshotMeta, out: IO[bytes], progress: ByteProgress | None = None) -> int:
        """Write the bytes of ``meta`` to ``out``, verified as they are read (a :class:`CorruptionError`
        is raised before the last byte if anything fails; the caller discards ``out`` then). Returns the
        bytes written."""
        done = 0
        with self.open(meta) as r:
            for data in r.chunks():
                out.write(data)
                done += len(data)
                if progress is not None:
                    progress(done, meta.size)
        return done

    def export_file(self, meta: SnapshotMeta, path: str, progress: ByteProgress | None = None) -> int:
        """:meth:`export` into the file ``path`` atomically: a temporary file beside it, fsync'ed, then
        renamed over ``path`` and the folder fsync'ed. On any failure the temporary file is removed and
        ``path`` is untouched. A path inside a node's data_dir, or an existing SQLite database, is refused
        first (:class:`~raft_sqlite.errors.OutputRefused`)."""
        path = fsio.check_output_path(path)
        folder = os.path.dirname(path) or "."
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
        try:
            with open(tmp, "xb") as f:
                n = self.export(meta, f, progress)
                f.flush()
                os.fsync(f.fileno())
            fsio.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsio.sync_dir(folder)
        return n

    # ---------------------------------------------------------------- verify
    def verify(self, sid: int | None = None, group: str | None = None,
               progress: ByteProgress | None = None) -> list[SnapshotCheck]:
        """Check snapshot ``sid`` (else every DURABLE snapshot, of ``group`` when given): manifest CRC, chain
        links, every chunk (CRC32, sequence, count, size, sha256) and, for a state-machine snapshot, the
        structure table and each structure's sha256 (:func:`raft_sqlite.statemachine.verify_stream`).
        Raises :class:`SnapshotNotFoundError`/:class:`GroupNotFoundError` for an unknown id or group."""
        with self.consistent():
            if sid is not None:
                gid = self._gid(group) if group is not None else None
                rows = self._rows("snapshot_id=?", (sid,))  # not through find(): a CRC failure is reported
                if not rows or (gid is not None and rows[0][1] != gid):
                    raise SnapshotNotFoundError(f"no snapshot {sid}" + (f" in group {group!r}" if group is not None
                                                                        else "") + " (`raft-sqlite snapshot list`)")
                if rows[0][6] != "DURABLE":
                    raise SnapshotNotFoundError(f"snapshot {sid} is {rows[0][6]} (being written or an interrupted "
                                                "install): nothing to verify yet")
                targets = [sid]
            else:
                gids = {group: self._gid(group)} if group is not None else self.groups()
                targets = [int(r[0]) for g in gids.values() for r in self._main.execute(
                    "SELECT snapshot_id FROM snapshots WHERE group_id=? AND status='DURABLE' ORDER BY snapshot_id",
                    (g,))]
            sizes = {int(r[0]): r[1] for r in self._main.execute(
                f"SELECT snapshot_id, size FROM snapshots WHERE snapshot_id IN ({','.join(map(str, targets))})")}
        grand = sum(n for n in sizes.values() if isinstance(n, int))  # for the progress bar only
        done = 0
        out: list[SnapshotCheck] = []
        for t in targets:
            check = self._check_once(t, progress, done, grand)
            if not check.ok:  # a snapshot finalized or removed beside a running node: look again, fresh
                check = self._check_once(t, progress, done, grand)
            done += check.size or 0
            out.append(check)
        return out

    def _check_once(self, sid: int, progress: ByteProgress | None, base: int, grand: int) -> SnapshotCheck:
        with self.consistent():
            rows = self._rows("snapshot_id=?", (sid,))
            if not rows or rows[0][6] != "DURABLE":
                return SnapshotCheck(sid, "?", None, None, None, False, gone=True)
            names = {g: n for n, g in self.groups().items()}
            gname = names.get(rows[0][1])
            if gname is None:
                return SnapshotCheck(sid, f"<unknown group {rows[0][1]}>", rows[0][2], str(rows[0][4]), rows[0][7],
                                     False, [("manifest", f"{self.path}: snapshot {sid} belongs to unknown group "
                                                          f"{rows[0][1]}")])
            try:
                meta = meta_from_row(rows[0], gname, self.path)
            except CorruptionError as exc:
                return SnapshotCheck(sid, gname, rows[0][2], str(rows[0][4]), rows[0][7], False,
                                     [("manifest", str(exc))])
            check = SnapshotCheck(sid, gname, meta.index, meta.kind.value, meta.size, meta.structures is not None)
            good = []
            for r in self._rows("group_id=? AND status='DURABLE'", (rows[0][1],)):
                with contextlib.suppress(CorruptionError):
                    good.append(meta_from_row(r, gname, self.path))
            try:
                SnapshotChain.load(_GroupSnapshots(gname, good), meta)
            except (SnapshotError, CorruptionError) as exc:
                check.problems.append(("chain", str(exc)))
            where = f"{self.chunks_path}: group {gname!r}: snapshot {sid}"
            try:
                with self.open(meta) as r:
                    if meta.structures is not None:
                        verify_stream(r, meta, where)
                    else:
                        done = 0
                        for data in r.chunks():
                            done += len(data)
                            if progress is not None:
                                progress(base + done, max(grand, base + done))
            except StructureTableError as exc:
                check.problems.append(("structures", str(exc)))
            except CorruptionError as exc:
                check.problems.append(("chunks", str(exc)))
            except SnapshotError as exc:  # a stream that is not a state-machine snapshot, yet has a table
                check.problems.append(("structures", str(exc)))
            if progress is not None:
                progress(base + meta.size, max(grand, base + meta.size))
            return check
