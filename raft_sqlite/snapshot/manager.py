"""A group's snapshots: :class:`SnapshotManager` (``store.snapshots(group)``) lists them, walks their
chains, hands out writers (local snapshots and installs), opens readers and runs retention."""

from __future__ import annotations

import builtins
import json
import logging
import threading
from collections.abc import Callable
from typing import Any, ClassVar

import apsw

from .. import layout
from ..args import float_arg, int_arg, term_arg
from ..dbrows import db_scalar
from ..errors import SnapshotError
from ..groupstate import GroupState
from ..kernel import Kernel
from .chain import SnapshotChain, chains_of
from .chunks import SnapshotStore
from .manifest import SnapshotKind, SnapshotMeta, meta_arg
from .reader import SnapshotReader
from .writer import SnapshotWriter

log = logging.getLogger("raft_sqlite.snapshot")

#: Default chunk size: the unit of CRC32 checking, of reading and of InstallSnapshot resumption.
DEFAULT_CHUNK_SIZE = 1 << 20
#: Default bytes per chunks.db transaction while streaming (bounds memory and WAL growth). Small on
#: purpose: each commit (and the checkpoint after it, see ``fsync.CHUNKS_PRAGMAS``) sends about this much
#: to the disk at once, and a commit of the log that syncs meanwhile waits behind it.
DEFAULT_COMMIT_BYTES = 1 << 20
#: Largest ``chunk_size`` accepted (SQLite's default BLOB limit is 10**9 bytes).
MAX_CHUNK_SIZE = 256 << 20
#: Default length of a delta chain (base included) before a new FULL snapshot is taken.
DEFAULT_MAX_CHAIN_LENGTH = 8
#: Default number of chains kept by retention.
DEFAULT_KEEP_CHAINS = 2


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
    _CONFIG: ClassVar[dict[str, Callable[[Any], Any]]] = {  # Any: values come from the user, unchecked
        "chunk_size": lambda v: int_arg("chunk_size", v, 1, MAX_CHUNK_SIZE),
        "commit_bytes": lambda v: int_arg("commit_bytes", v, 1, layout.MAX_SIZE),
        "max_chain_length": lambda v: int_arg("max_chain_length", v, 1, layout.MAX_INT64),
        "keep_chains": lambda v: None if v is None else int_arg("keep_chains", v, 1, layout.MAX_INT64),
        "max_write_rate": lambda v: None if v is None else float_arg("max_write_rate", v, 0.0, 1e18, lo_open=True),
    }

    def __setattr__(self, name: str, value: Any) -> None:
        check = self._CONFIG.get(name)
        super().__setattr__(name, value if check is None else check(value))

    def __init__(self, kernel: Kernel, group: str):
        self._kernel = kernel
        self.group = group
        self._sstore = SnapshotStore.of(kernel)
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

    def _g(self) -> GroupState:
        return self._kernel.group(self.group)

    @property
    def chunk_store(self) -> SnapshotStore:
        """The node's :class:`SnapshotStore` (chunks and manifest rows; shared by every group)."""
        return self._sstore

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
        head = self.latest() if head is None else meta_arg("head", head)
        return None if head is None else SnapshotChain.load(self, head)

    def chains(self) -> builtins.list[builtins.list[SnapshotMeta]]:
        """Durable snapshots grouped into chains (each list base first), newest chain first. A
        snapshot whose parent is gone forms a (broken) chain of its own."""
        return chains_of(self.list())

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
              parent: SnapshotMeta | None = None, structures: Any = None,
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

    def _writer(self, index: int, term: int, kind: SnapshotKind, parent: SnapshotMeta | None, structures: Any,
                install: bool, before_finalize: Callable[[SnapshotWriter], None] | None) -> SnapshotWriter:
        index, term = int_arg("index", index, 1, layout.MAX_INDEX), term_arg("term", term)
        kind = SnapshotKind(kind)
        if kind is SnapshotKind.FULL and parent is not None:
            raise ValueError("a FULL snapshot has no parent")
        if parent is not None:
            meta_arg("parent", parent)
        if structures is not None:
            structures = json.loads(json.dumps(structures))
        self._g()  # GroupNotFoundError once removed (a writer must never create the group again)
        return SnapshotWriter(self, index, term, kind=kind, parent=parent, structures=structures,
                              install=install, before_finalize=before_finalize)

    # ------------------------------------------------------------ reading
    def open(self, meta: SnapshotMeta, *, verify_digest: bool = True) -> SnapshotReader:
        """A readable, seekable binary stream of the DURABLE snapshot ``meta`` (see
        :class:`SnapshotReader`: CRC32 per chunk, sha256 at end of a sequential read, bounded memory).
        ``verify_digest=False`` skips the sha256 (CRC32 per chunk is always checked): for a reader
        that verifies end to end itself, e.g. a follower installing the stream. Raises
        :class:`SnapshotError` if it is not a durable snapshot of this group (e.g. deleted by
        retention) and :class:`CorruptionError` for damaged chunks."""
        meta_arg("meta", meta)
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
        metas = [meta_arg("meta", meta)] if meta is not None else self.list()
        for m in metas:
            with self.open(m) as r:
                for _ in r.chunks():
                    pass
            if m.kind is SnapshotKind.DELTA:
                SnapshotChain.load(self, m)
        return len(metas)

    # ------------------------------------------------------------ retention
    def retain(self, keep_chains: int | None = None) -> builtins.list[int]:
        """Delete all but the ``keep_chains`` (default ``self.keep_chains``) newest snapshot chains.

        The chain of the newest durable snapshot is always kept, as is any chain with a snapshot
        being read. Manifests are deleted first (one commit that re-checks the newest snapshot is
        untouched), then their chunks; both under ``store.gc_lock``. Stale partial installs (at or
        below the newest durable snapshot) are removed too. Returns the deleted ids."""
        keep = self.keep_chains if keep_chains is None else keep_chains
        keep = int_arg("keep_chains", keep if keep is not None else DEFAULT_KEEP_CHAINS, 1, layout.MAX_INT64)
        kernel = self._kernel
        with kernel.gc_lock:
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

            def write(conn: apsw.Connection, g: GroupState, _: object) -> None:
                for sid in doomed:
                    conn.execute("DELETE FROM snapshots WHERE snapshot_id=? AND status='DURABLE'", (sid,))
                for sid in stale:
                    conn.execute("DELETE FROM snapshots WHERE snapshot_id=? AND status='WRITING'", (sid,))
                newest = db_scalar(conn.execute("SELECT max(idx) FROM snapshots WHERE group_id=? AND "
                                                "status='DURABLE'", (g.gid,))) or 0
                if newest != g.snapshot_index:
                    raise SnapshotError(f"group {self.group!r}: retention would remove the newest durable snapshot "
                                        f"(head {head and head.id})")

            kernel.run(self.group, lambda g: None, write)
            self._sstore.delete_chunks(doomed + stale)
        if doomed:
            log.debug("group %r: retention deleted snapshots %s", self.group, doomed)
        return doomed + stale

    def __repr__(self) -> str:
        g = self._kernel.groups.get(self.group)  # (also on a closed store)
        return f"<SnapshotManager {self.group!r} snapshot_index={g.snapshot_index if g else '?'}>"

