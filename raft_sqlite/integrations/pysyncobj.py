"""PySyncObj (0.3.17) on raft_sqlite: a durable, CRC-checked, inspectable journal for PySyncObj.

PySyncObj builds its Raft log with the module-level factory ``createJournal(conf.journalFile)`` and
has no configuration hook for it, so the integration is a documented patch::

    from raft_sqlite.integrations.pysyncobj import patch_pysyncobj
    patch_pysyncobj()                       # or: with patch_pysyncobj(): ...
    conf = SyncObjConf(journalFile="/var/lib/raft/node1")   # journalFile names the node's data_dir

What :func:`patch_pysyncobj` installs (and the context manager restores):

- ``createJournal`` in ``pysyncobj.syncobj``, ``pysyncobj`` and ``pysyncobj.journal`` ->
  :func:`create_journal`: ``None`` keeps PySyncObj's in-memory journal, anything else opens a
  :class:`~raft_sqlite.NodeStore` in that directory and returns a :class:`RaftSqliteJournal`.
- ``pysyncobj.syncobj.Serializer`` -> :class:`RaftSqliteSerializer`. For a SyncObj whose journal is a
  :class:`RaftSqliteJournal` it routes PySyncObj's full dumps (log compaction, and the snapshots a
  leader streams to a lagging follower) into the store's durable snapshots; for any other SyncObj it
  *is* the stock Serializer.
- ``SyncObjConf.validate``: when ``journalFile`` is set and ``fullDumpFile`` is not, ``fullDumpFile``
  defaults to ``<data_dir>/pysyncobj-full.dump``. PySyncObj reloads its state at startup only from
  ``fullDumpFile``, so without one a compacted log could never be replayed. The file is a cache: it is
  rewritten from the store's newest durable snapshot whenever the node starts.

Durability: **no ack, vote or callback leaves a node before what it depends on is durable** (per the store's
fsync mode). A SyncObj built under the patch gets a :class:`_DurabilityGate`: its journal queues ``add()`` and
``setCurrentTerm()``, its transport holds outgoing messages, and once per tick (before and after PySyncObj's
poll) the gate commits everything queued in **one** store transaction (one fsync in FULL) and only then
releases the held messages; client callbacks run only after that commit. So a follower makes one fsync per
batch of AppendEntries it acknowledges, a leader one per tick, a voter one per vote. A journal used without a
SyncObj writes through: every ``add()`` and ``setCurrentTerm()`` is committed before it returns. The commit
index is not needed for safety; it is persisted lazily (with the next commit, on PySyncObj's one-second timer,
``flush()`` and ``_destroy()``), never decreases, and is clamped to the end of the journal on open
(PySyncObj's own file journal can come back with a commit index past its end after an unclean stop). See
docs/pysyncobj.md, "Durability".
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import io
import itertools
import logging
import os
import pickle as _stdpickle
import struct
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, overload

import pysyncobj
import pysyncobj.config as _pso_config
import pysyncobj.journal as _pso_journal
import pysyncobj.pickle as _pso_pickle
import pysyncobj.serializer as _pso_serializer
import pysyncobj.syncobj as _pso_syncobj
from pysyncobj.config import SERIALIZER_STATE

from .. import fsio
from ..args import term_arg
from ..errors import LogConflictError, LogGapError, MetadataError, RaftSqliteError, SnapshotError
from ..fsync import FsyncMode
from ..log import EntryKind, LogEntry
from ..metadata import check_vote, term_vote_changes
from ..store import NodeStore

# not at run time: the journal works (compaction "off") where raft_sqlite.snapshot is missing
if TYPE_CHECKING:
    from ..snapshot import SnapshotManager, SnapshotMeta, SnapshotReader

__all__ = [
    "DEFAULT_GROUP",
    "DUMP_FILE_NAME",
    "RaftSqliteJournal",
    "RaftSqliteSerializer",
    "create_journal",
    "patch_pysyncobj",
]

log = logging.getLogger("raft_sqlite.integrations.pysyncobj")

#: Raft group used inside the store when none is given (env ``RAFT_SQLITE_GROUP``).
DEFAULT_GROUP = "pysyncobj"
#: Default cluster id (env ``RAFT_SQLITE_CLUSTER_ID``).
DEFAULT_CLUSTER_ID = "pysyncobj"
#: Name of the default ``fullDumpFile`` inside the data_dir (see :func:`patch_pysyncobj`).
DUMP_FILE_NAME = "pysyncobj-full.dump"

_MAGIC = b"RSQLPSO1"  # snapshot blob: magic, u32 header length, pickled header, PySyncObj dump bytes
_CHUNK = 1 << 20

_NO_OP = _pso_syncobj._COMMAND_TYPE.NO_OP
_MEMBERSHIP = _pso_syncobj._COMMAND_TYPE.MEMBERSHIP

# The stock objects, captured at import (before any patch).
_STOCK_CREATE_JOURNAL = _pso_journal.createJournal
_STOCK_SERIALIZER = _pso_serializer.Serializer
_STOCK_VALIDATE = _pso_config.SyncObjConf.validate
_STOCK_INIT = _pso_syncobj.SyncObj.__init__
_STOCK_AUTO_TICK = _pso_syncobj.SyncObj._autoTickThread
_STOCK_APPLY_COMMAND = _pso_syncobj.SyncObj._applyCommand

# create_journal() -> the Serializer SyncObj.__init__ builds next in the same thread (see RaftSqliteSerializer)
_link = threading.local()

#: One journal entry as PySyncObj sees it: ``(command, idx, term)``.
Entry = tuple[bytes, int, int]
#: A client callback ``fn(result, error)`` (PySyncObj's ``FAIL_REASON`` as error).
_Callback = Callable[[Any, Any], None]


class _SyncObjConf(Protocol):
    """The ``SyncObjConf`` fields the adapter reads or sets (pysyncobj ships no types)."""

    journalFile: str | os.PathLike[str] | None
    fullDumpFile: str | None
    autoTick: bool


class _SyncObj(Protocol):
    """The public ``SyncObj`` members the adapter uses; its journal, transport and command queues are
    name-mangled attributes (see :func:`_pso_private`), its poller ``_poller`` (read with ``getattr``)."""

    @property
    def conf(self) -> _SyncObjConf: ...

    def destroy(self) -> None: ...


class _Transfer(TypedDict):
    """One snapshot being streamed to a follower (:meth:`RaftSqliteSerializer.getTransmissionData`)."""

    stream: SnapshotReader
    sent: int


def _kind(command: bytes) -> EntryKind:
    t = command[0] if command else -1
    if t == _NO_OP:
        return EntryKind.NOOP
    if t == _MEMBERSHIP:
        return EntryKind.CONFIG
    return EntryKind.NORMAL


def _snapshots_supported(store: NodeStore, group: str) -> bool:
    try:
        m = store.snapshots(group)
    except ImportError:
        return False
    return all(callable(getattr(m, a, None)) for a in ("write", "latest", "open"))


def _write_file_atomic(path: str, data: bytes) -> None:
    # Through fsio, the file-system seam (tests put it under their power-loss model). No fsync, no directory
    # sync: the file is a cache that create_journal's Serializer rewrites from the store's newest durable
    # snapshot whenever the node starts, before PySyncObj reads it; the replace only keeps a reader from
    # seeing half a file. Mode 0o666 (less the umask) as the open() this replaced.
    tmp = path + ".rsql.tmp"
    fd = fsio.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        fsio.write_all(fd, data)
    finally:
        fsio.close(fd)
    fsio.replace(tmp, path)


def _read_file(path: str) -> bytes:
    """The whole content of ``path``, read through fsio."""
    fd = fsio.open(path, os.O_RDONLY)
    try:
        parts = []
        while part := fsio.read(fd, _CHUNK):
            parts.append(part)
    finally:
        fsio.close(fd)
    return b"".join(parts)


def _gzip_pickle(obj: Any) -> bytes:
    """The bytes PySyncObj's stock Serializer writes to ``fullDumpFile`` (gzip of its pickle)."""
    with io.BytesIO() as bio:
        with gzip.GzipFile(fileobj=bio, mode="wb") as g:
            _pso_pickle.dump(obj, g)
        return bio.getvalue()


def _gunzip_unpickle(data: bytes) -> Any:
    with io.BytesIO(data) as bio, gzip.GzipFile(fileobj=bio, mode="rb") as g:
        return _pso_pickle.load(g)


def _entry(e: Sequence[Any]) -> Entry:
    # e comes from PySyncObj (its journal calls, its dumps) or from a snapshot header this module pickled
    command, idx, term = e
    if isinstance(command, (bytearray, memoryview)):
        command = bytes(command)
    elif not isinstance(command, bytes):
        command = _pso_pickle.to_bytes(command)  # str (as PySyncObj's FileJournal accepts)
    if type(idx) is not int or type(term) is not int:
        if isinstance(idx, bool) or isinstance(term, bool):
            raise TypeError("idx and term must be ints")
        idx, term = int(idx), int(term)
    return (command, idx, term)


# pysyncobj ships no types: its Journal is Any to mypy, which refuses an Any base class in strict mode
class RaftSqliteJournal(_pso_journal.Journal):  # type: ignore[misc]
    """PySyncObj's ``Journal`` interface on one group of a :class:`~raft_sqlite.NodeStore`.

    PySyncObj addresses its journal by *list position*: ``journal[0]`` is the oldest entry it keeps
    (after a compaction: the entry just before the last one its full dump covers), ``journal[-1]`` the
    newest; entries are ``(command: bytes, idx, term)`` tuples with contiguous ``idx``, and SyncObj
    seeds an empty journal with a no-op at index 1, term 0. This class keeps that view in memory
    (as PySyncObj's own FileJournal does) and writes every change to the store: committed before the call
    returns, or, in *batched mode* (a SyncObj's durability gate drives the journal, see :attr:`batched`),
    queued and committed by the next :meth:`sync`, which the gate runs before anything that depends on the
    write leaves the node:

    - ``add(command, idx, term)``: ``idx`` must follow ``journal[-1]`` (any index on an empty view). If the store already holds an entry at ``idx`` (a tail PySyncObj
      dropped from its view but the store had to keep, see below) with the same term and payload,
      nothing is written; with another term the store's log is truncated there first, which the store
      refuses (:class:`~raft_sqlite.LogConflictError`) if it would remove committed entries: a Raft
      safety violation is never written. An index below the store's ``first_index`` is accepted only
      if a durable snapshot covers it (PySyncObj re-adds the two entries its dump names after
      installing it) and is then kept in memory and in the snapshot's header.
    - ``deleteEntriesFrom(pos)``: drops ``journal[pos:]``. On its own the journal drops the same entries from
      the store except committed ones (the store's commit index only grows). In batched mode the store keeps
      them all (PySyncObj cuts matching entries too, and they may have been acknowledged) until an ``add()``
      of another term at their index truncates there. Either way PySyncObj re-adds what it cut (same term: no
      write) and a kept entry is visible again after a restart.
    - ``deleteEntriesTo(pos)``: drops ``journal[:pos]`` (log compaction after a full dump). The store
      compacts only what its newest durable snapshot covers (its trigger refuses anything else).
      Under a SyncObj (a :class:`RaftSqliteSerializer` attached) the view never starts later than
      ``snapshot_index - 1``, so a lagging follower is always sent a snapshot that exists; with
      compaction ``"off"`` it keeps everything. A journal used on its own honours the request as a
      durable *logical* trim: the view's start is kept in the store's ``settings`` table (row
      ``pysyncobj.view_start.<group>``) and the records stay until a durable snapshot covers them.
    - ``clear()``: empties the view (PySyncObj installs a dump next and re-adds its two entries); the
      store's tail above the re-added entries and its commit index is dropped on the next
      ``setRaftCommitIndex``/``flush``/one-second timer.
    - ``setCurrentTerm(term, votedForNodeId)``: committed (see above). The store refuses a lower
      term or a second, different vote in the same term (:class:`~raft_sqlite.MetadataError`); PySyncObj
      0.3.17 never asks for either (it votes only when it has not voted in the current term). A vote
      that is not a str/int/None is stored as ``str()`` (PySyncObj only tests it against None).
    - ``setRaftCommitIndex(i)`` / ``getRaftCommitIndex()``: see the module docstring. On open the
      answer is ``max(store commit index, snapshot index, 1)`` clamped to ``journal[-1]``.

    On open the view is rebuilt from the store: from ``snapshot_index - 1`` (taking the two entries
    the newest durable snapshot names from its header when the store no longer holds them) or from
    ``first_index``, to ``last_index``. Record CRCs are verified by the store as they are read.
    ``compaction`` is ``"store"`` (dumps go to the store's snapshots; default when
    :mod:`raft_sqlite.snapshot` is available) or ``"off"`` (no dumps, no compaction).
    """

    def __init__(self, store: NodeStore, group: str = DEFAULT_GROUP, *, owns_store: bool = False,
                 compaction: str | None = None) -> None:
        self._store = store
        self._group = group
        self._log = store.log(group)
        self._meta = store.metadata(group)
        self._owns = owns_store
        self._lock = threading.RLock()
        if compaction is None:
            compaction = os.environ.get("RAFT_SQLITE_PYSYNCOBJ_COMPACTION") or (
                "store" if _snapshots_supported(store, group) else "off")
        if compaction not in ("store", "off"):
            raise ValueError(f"compaction must be 'store' or 'off', not {compaction!r}")
        if compaction == "store" and not _snapshots_supported(store, group):
            raise SnapshotError("compaction='store' needs raft_sqlite.snapshot (SnapshotManager)")
        self.compaction = compaction
        self._pending_commit: int | None = None
        self._tail_dirty = False
        self._closed = False
        self._attached = False  # set by RaftSqliteSerializer when a SyncObj uses this journal
        self._start_key = f"pysyncobj.view_start.{group}"
        self._marker: int | None = None
        # Batched mode (switched on by the durability gate a SyncObj gets, see _DurabilityGate): add() and
        # setCurrentTerm() only queue their write here; sync() commits the queue in one store transaction
        # (one fsync in FULL). The queue is always the tail of the view: every call that changes the view
        # otherwise (deleteEntriesFrom, clear, deleteEntriesTo, snapshots) syncs it first.
        self._batched = False
        self._pend: list[LogEntry] = []
        self._pend_term: tuple[int, str | int | None] | None = None
        self._failed: BaseException | None = None
        self._commits = 0
        self._gate: _DurabilityGate | None = None  # set by _install_gate
        self._entries: list[Entry] = self._load()

    # ------------------------------------------------------------------ properties
    @property
    def store(self) -> NodeStore:
        """The :class:`~raft_sqlite.NodeStore` this journal writes to."""
        return self._store

    @property
    def group(self) -> str:
        """The store group holding this journal."""
        return self._group

    # ------------------------------------------------------------------ open
    def _load(self) -> list[Entry]:
        P = self._log
        entries: list[Entry] = []
        lo = P.first_index
        meta = self._latest_snapshot()
        if meta is not None:
            _fmt, e0, e1 = self._read_header(meta)
            if e1[1] != meta.index or e0[1] != e1[1] - 1:
                raise SnapshotError(f"{self._store.data_dir}: snapshot {meta.id} of group {self._group!r} names "
                                    f"entries {e0[1]}, {e1[1]} but covers index {meta.index}")
            entries = [e for e in (e0, e1) if e[1] < P.first_index]
            lo = max(P.first_index, e0[1])
        self._marker = self._read_marker()
        if self._marker is not None and lo < self._marker <= P.last_index + 1:
            entries = [e for e in entries if e[1] >= self._marker]
            lo = max(lo, self._marker)
        if P.last_index >= lo:
            entries += [(e.data, e.index, e.term) for e in P.entries(lo, P.last_index + 1)]
        for a, b in itertools.pairwise(entries):
            if b[1] != a[1] + 1:
                raise RaftSqliteError(f"{self._store.data_dir}: group {self._group!r}: journal is not contiguous "
                                      f"({a[1]} then {b[1]}); first index {P.first_index}, snapshot index "
                                      f"{P.snapshot_index}")
        return entries

    # ------------------------------------------------------------------ Journal interface: reads
    @overload
    def __getitem__(self, item: int) -> Entry: ...

    @overload
    def __getitem__(self, item: slice) -> list[Entry]: ...

    def __getitem__(self, item: int | slice) -> Entry | list[Entry]:
        """``journal[i]`` -> ``(command, idx, term)``; a slice returns a list of them."""
        return self._entries[item]

    def __len__(self) -> int:
        """Number of entries in PySyncObj's view (never 0 once SyncObj has seeded its no-op)."""
        return len(self._entries)

    def getRaftCommitIndex(self) -> int:
        """The persisted commit index (at least the snapshot index, at least 1), never beyond
        ``journal[-1]``; the last value set in this process if that is higher."""
        c = max(self._meta.commit_index, self._log.snapshot_index, self._pending_commit or 0, 1)
        if self._entries:
            c = min(c, self._entries[-1][1])
        return max(c, 1)

    def getCurrentTerm(self) -> int:
        """The current term (0 at first): the persisted one, or one set and not yet synced (batched mode)."""
        pt = self._pend_term
        return pt[0] if pt is not None else self._meta.current_term

    def getVotedForNodeId(self) -> str | int | None:
        """The node voted for in the current term, or None (including a vote not yet synced)."""
        pt = self._pend_term
        return pt[1] if pt is not None else self._meta.voted_for

    @property
    def batched(self) -> bool:
        """True once a SyncObj's durability gate drives this journal: writes are queued until
        :meth:`sync`, which the gate calls before anything that depends on them leaves the node."""
        return self._batched

    @property
    def healthy(self) -> bool:
        """False once a commit failed (in :meth:`sync` or any other write: the store fail-stops): the journal
        then refuses every write and its gate lets nothing more leave the node."""
        return self._failed is None and self._store.fault is None

    @property
    def pending(self) -> int:
        """Number of writes queued and not yet durable (entries, plus 1 for a term/vote change)."""
        return len(self._pend) + (self._pend_term is not None)

    @property
    def commits(self) -> int:
        """Store commits made by :meth:`sync` so far (each one fsync in FULL mode)."""
        return self._commits

    def sync(self) -> bool:
        """Make every queued write durable now: the queued entries, term/vote and (with them) the
        pending commit index go into **one** store transaction, durable per the store's fsync mode when
        this returns. Returns True if it committed something, False if nothing was queued.

        If the commit fails, the journal is *failed* for good (its view and PySyncObj's memory are ahead
        of the store): this call and every later write raise :class:`~raft_sqlite.RaftSqliteError`, and the
        gate drops everything the node would send. Restart the node (it reopens from what is durable)."""
        with self._lock:
            pend, pt = self._pend, self._pend_term
            if self._closed and not pend and pt is None:
                return False  # closed cleanly (nothing left to commit): nothing to do
            self._check_open()
            if not pend and pt is None:
                return False
            pc = self._pending_commit
            try:
                with self._store.transaction():
                    if pend:
                        self._log.append(pend)
                    if pt is not None:
                        self._meta.set_term_and_vote(*pt)
                    if pc is not None:
                        target = min(pc, pend[-1].index if pend else self._log.last_index)
                        if target > self._meta.commit_index:
                            self._meta.set_commit_index(target)
            except BaseException as e:
                self._failed = e
                log.critical("group %r: could not make %d queued write(s) durable (%s: %s); the journal is failed "
                             "and the node must be restarted", self._group, self.pending, type(e).__name__, e)
                raise
            self._pend, self._pend_term = [], None
            if pc is not None:
                self._pending_commit = None
            self._commits += 1
            return True

    def _enable_batching(self) -> None:
        with self._lock:
            self._batched = True

    # ------------------------------------------------------------------ Journal interface: writes
    def add(self, command: bytes | bytearray | memoryview | str, idx: int, term: int) -> None:
        """Append ``(command, idx, term)``; durable per the store's fsync mode when it returns."""
        command, idx, term = _entry((command, idx, term))
        with self._lock:
            self._check_open()
            if self._entries and idx != self._entries[-1][1] + 1:
                raise LogGapError(f"group {self._group!r}: add(idx={idx}) does not follow the journal's last "
                                  f"index {self._entries[-1][1]}")
            self._persist(command, idx, term)
            if not self._entries and (self._marker is not None or idx != self._log.first_index):
                self.sync()  # the marker is written at once: the entry it points at must be durable first
                self._write_marker(idx)  # the view restarts at idx (after clear(): a dump's entries)
            self._entries.append((command, idx, term))

    def _persist(self, command: bytes, idx: int, term: int) -> None:
        P = self._log
        if self._pend:
            # the queue extends the store's log and is the view's tail, so idx follows it (add() checked)
            if term < self._pend[-1].term:
                raise LogConflictError(f"group {self._group!r}: entry {idx} has term {term}, below the previous "
                                       f"entry's term {self._pend[-1].term}")
            self._pend.append(LogEntry(idx, term, command, _kind(command)))
            return
        if idx < P.first_index:
            # below the store's log: only an entry a durable snapshot covers (PySyncObj re-adds the two
            # entries its dump names); it lives in memory and in that snapshot's header
            if idx > P.snapshot_index:
                raise LogGapError(f"group {self._group!r}: add(idx={idx}) is below the first index "
                                  f"{P.first_index} but above the snapshot index {P.snapshot_index}")
            if idx == P.snapshot_index and P.term(idx) != term:
                raise LogConflictError(f"group {self._group!r}: add(idx={idx}, term={term}) conflicts with the "
                                       f"durable snapshot's term {P.term(idx)}")
            return
        if idx <= P.last_index:
            old = P.get(idx)
            if old.term == term:
                if old.data != command:
                    raise LogConflictError(f"group {self._group!r}: entry {idx} of term {term} is already stored "
                                           "with a different payload")
                return  # already durable
            self._flush_commit()
            P.truncate_after(idx - 1)  # refuses to cut committed entries
        if idx != P.last_index + 1:
            raise LogGapError(f"group {self._group!r}: add(idx={idx}) leaves a gap after the store's last index "
                              f"{P.last_index}")
        entry = LogEntry(idx, term, command, _kind(command))
        if self._batched:
            if term < P.last_term:  # what the store would refuse at sync(): refuse it now, nothing queued
                raise LogConflictError(f"group {self._group!r}: entry {idx} has term {term}, below the last "
                                       f"entry's term {P.last_term}")
            self._pend.append(entry)
            return
        # write-through: its own commit, not sync()'s transaction (measured ~20% faster per add)
        pc = self._pending_commit
        if pc is not None and pc > self._meta.commit_index:
            with self._store.transaction():
                P.append([entry])
                self._meta.set_commit_index(min(pc, P.last_index + 1))
            self._pending_commit = None
        else:
            P.append([entry])

    def clear(self) -> None:
        """Empty the view (PySyncObj then re-adds the entries its dump names)."""
        with self._lock:
            self._check_open()
            self._flush_commit()
            self._entries = []
            self._tail_dirty = True

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        """Drop ``journal[entryFrom:]`` (conflict resolution); committed entries stay in the store."""
        if type(entryFrom) is not int or entryFrom < 0:
            raise ValueError(f"deleteEntriesFrom() takes a list position >= 0, got {entryFrom!r}")
        with self._lock:
            self._check_open()
            if entryFrom >= len(self._entries):
                return
            new_end = self._entries[entryFrom - 1][1] if entryFrom else self._entries[0][1] - 1
            if self._pend and ((self._gate is not None and self._gate.holding())
                               or (self._pending_commit is not None and new_end < self._pending_commit)):
                # a held message (an ack) may promise the queued entries, or the cut reaches below the commit
                # index PySyncObj gave: make them durable first (as write-through has them), the cut then
                # keeps them in the store like any stored entry (below)
                self.sync()
            pend = self._pend
            if pend and new_end >= pend[0].index - 1:
                # only queued entries go (PySyncObj truncates before re-adding what a leader resent), and no
                # message sent or held depends on them: nothing of them was written, nothing is written now
                del pend[new_end - pend[0].index + 1:]
            elif self._batched:
                # Under a SyncObj the store keeps its entries above the cut. PySyncObj cuts from prevLogIdx + 1
                # on every AppendEntries that overlaps the follower's log, even where the entries match the
                # leader's (Raft cuts only at a conflict), then re-adds what the message carries. Cutting the
                # store too would durably remove entries this node has acknowledged, some perhaps committed
                # by a majority counting it, until they are re-added: a crash in between loses them. So the
                # cut stays in the view: a re-added entry with the same term is not written again, one with
                # another term is a real conflict and truncates the store there (in add()), and entries never
                # re-added stay as a tail a follower may hold (they come back into the view on restart).
                self._pend = []  # queued entries above the cut were never durable: drop, do not write them
            else:  # write-through: nothing is ever queued
                self._flush_commit()
                self._truncate_store(new_end)
            del self._entries[entryFrom:]

    def deleteEntriesTo(self, entryTo: int) -> None:
        """Drop ``journal[:entryTo]`` (compaction after a full dump), never beyond what the newest
        durable snapshot covers; the store compacts the same range."""
        if type(entryTo) is not int or entryTo < 0:
            raise ValueError(f"deleteEntriesTo() takes a list position >= 0, got {entryTo!r}")
        with self._lock:
            self._check_open()
            if entryTo == 0 or not self._entries:
                return
            if self.compaction == "off":
                log.debug("group %r: compaction is off; keeping journal[:%d]", self._group, entryTo)
                return
            self.sync()
            P = self._log
            want = self._entries[entryTo][1] if entryTo < len(self._entries) else self._entries[-1][1] + 1
            start = self._entries[0][1]
            if not self._attached:
                # used on its own (no SyncObj): a logical trim, remembered durably; the records stay
                # in the store until a durable snapshot covers them
                self._write_marker(want)
                del self._entries[:entryTo]
                if want - 1 >= P.first_index and P.snapshot_index >= want - 1:
                    P.compact(min(want - 1, P.last_index))
                return
            new_start = min(want, max(P.snapshot_index - 1, start))
            if new_start < want:
                log.warning("group %r: deleteEntriesTo(%d) asks to drop up to index %d but the newest durable "
                            "snapshot covers only %d; keeping entries from %d", self._group, entryTo, want - 1,
                            P.snapshot_index, new_start)
            if new_start <= start:
                return
            del self._entries[:new_start - start]
            if self._marker is not None:
                self._write_marker(new_start)
            if new_start - 1 >= P.first_index:
                P.compact(min(new_start - 1, P.last_index))

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        """Record PySyncObj's commit index (persisted lazily; never decreases in the store)."""
        with self._lock:
            self._check_open()
            if self._entries:
                target = min(int(raftCommitIndex), self._entries[-1][1])
                if target > max(self._meta.commit_index, self._pending_commit or 0):
                    self._pending_commit = target
            if self._tail_dirty:
                self._settle_tail()

    def setCurrentTerm(self, term: int, votedForNodeId: object) -> None:
        """Persist ``term`` and ``votedForNodeId`` atomically: before returning, or in batched mode with
        the next :meth:`sync` (which the gate runs before any vote or message leaves the node). The same
        rules apply either way and a refused change raises at once (see the class docs)."""
        v = votedForNodeId
        # exact types: a bool or a str subclass is stored as its str()
        vote = v if v is None or type(v) is str or type(v) is int else str(v)
        with self._lock:
            self._check_open()
            try:
                if self._batched:
                    t, v = term_arg("term", int(term)), check_vote(vote)
                    if term_vote_changes(self._group, self.getCurrentTerm(), self.getVotedForNodeId(), t, v):
                        self._pend_term = (t, v)
                else:
                    self._meta.set_term_and_vote(int(term), vote)
            except MetadataError:
                log.error("group %r: refused setCurrentTerm(%r, %r) (stored: term %d, vote %r): it would break "
                          "Raft's one-vote-per-term rule", self._group, term, votedForNodeId,
                          self._meta.current_term, self._meta.voted_for)
                raise

    def onOneSecondTimer(self) -> None:
        """Persist a pending commit index and settle a dropped tail (called by SyncObj every second)."""
        with self._lock:
            if self._closed or self._failed is not None:
                return
            self._flush_commit()
            if self._tail_dirty:
                self._settle_tail()

    def flush(self) -> None:
        """Make everything PySyncObj has told the journal durable (entries and votes already are)."""
        self.onOneSecondTimer()

    def _destroy(self) -> None:
        """Flush and close the store (when this journal opened it). Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                if not self._store.kernel.closed and self.healthy:
                    self.onOneSecondTimer()
            finally:
                self._closed = True
                if self._owns:
                    self._store.close()

    close = _destroy

    # ------------------------------------------------------------------ internals
    def _read_marker(self) -> int | None:
        key = self._start_key
        row = self._store.kernel.read(lambda c: c.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone())
        return int(row[0]) if row is not None else None

    def _write_marker(self, start: int) -> None:
        """Durably remember where PySyncObj's view starts (row ``pysyncobj.view_start.<group>`` of the
        store's ``settings`` table), when that is not where the store's log or snapshot says."""
        key = self._start_key

        def write(conn: Any, g: object, _: object) -> None:  # the lead types these with the kernel interface
            conn.execute("INSERT OR REPLACE INTO settings(key, value) VALUES (?,?)", (key, str(int(start))))

        self._store.kernel.run(self._group, lambda g: None, write)
        self._marker = start

    def _check_open(self) -> None:
        if self._closed:
            raise RaftSqliteError(f"journal of group {self._group!r} is closed")
        if self._failed is None and self._store.fault is not None:
            self._failed = self._store.fault  # a commit outside sync() failed: the store is fail-stopped
        if self._failed is not None:
            raise RaftSqliteError(f"journal of group {self._group!r} failed to make writes durable "
                                  f"({type(self._failed).__name__}: {self._failed}); restart the node")

    def _flush_commit(self) -> None:
        if self.sync():
            return  # the pending commit index went with the queued writes
        pc = self._pending_commit
        if pc is None:
            return
        pc = min(pc, self._log.last_index)
        if pc > self._meta.commit_index:
            self._meta.set_commit_index(pc)
        self._pending_commit = None

    def _truncate_store(self, new_end: int) -> None:
        P = self._log
        cut = max(new_end, self._meta.commit_index, P.first_index - 1)
        if cut < P.last_index:
            P.truncate_after(cut)

    def _settle_tail(self) -> None:
        self._tail_dirty = False
        if self._entries:
            self._flush_commit()
            _command, idx, term = self._entries[-1]
            if self._batched and self._store_has(idx, term):
                # the store's log extends the view's last entry (e.g. a snapshot install whose entry the store
                # held: SnapshotManager.install kept what follows it): under a SyncObj those entries may have
                # been acknowledged, so they stay, as after deleteEntriesFrom
                return
            self._truncate_store(idx)

    def _store_has(self, idx: int, term: int) -> bool:
        """True if the store's log (or its newest snapshot) holds index ``idx`` with ``term``."""
        P = self._log
        if not P.snapshot_index <= idx <= P.last_index or idx < 1:
            return False
        return P.term(idx) == term

    # ------------------------------------------------------------------ snapshots (used by RaftSqliteSerializer)
    def _snapshots(self) -> SnapshotManager:
        return self._store.snapshots(self._group)

    def _latest_snapshot(self) -> SnapshotMeta | None:
        if self.compaction != "store":
            return None
        return self._snapshots().latest()

    def _read_header(self, meta: SnapshotMeta) -> tuple[str, Entry, Entry]:
        with contextlib.closing(self._snapshots().open(meta)) as f:
            fmt, e0, e1, _size = self._parse_header(f)
            return fmt, e0, e1

    def _parse_header(self, f: SnapshotReader) -> tuple[str, Entry, Entry, int]:
        head = f.read(len(_MAGIC) + 4)
        if len(head) != len(_MAGIC) + 4 or not head.startswith(_MAGIC):
            raise SnapshotError(f"group {self._group!r}: snapshot is not a PySyncObj dump written by raft_sqlite")
        (n,) = struct.unpack("<I", head[len(_MAGIC):])
        hdr = _stdpickle.loads(f.read(n))
        return hdr["format"], _entry(hdr["prev"]), _entry(hdr["last"]), len(head) + n

    def _read_snapshot(self, meta: SnapshotMeta) -> tuple[str, bytes]:
        with contextlib.closing(self._snapshots().open(meta)) as f:
            fmt = self._parse_header(f)[0]
            return fmt, f.read()

    def _open_dump(self, meta: SnapshotMeta) -> SnapshotReader:
        f = self._snapshots().open(meta)
        try:
            self._parse_header(f)
        except BaseException:
            f.close()
            raise
        return f

    def _write_snapshot(self, e0: Sequence[Any], e1: Sequence[Any], dump: bytes, fmt: str, *,
                        install: bool) -> SnapshotMeta | None:
        """Write a durable store snapshot at ``e1`` holding PySyncObj's dump (with ``e0``, ``e1`` in a
        header). A local one (``SnapshotManager.write``) needs ``e1`` committed in the store (the
        pending commit index is flushed first). ``install`` (a dump received from a leader) goes
        through ``SnapshotManager.install``: the store keeps the log after ``e1`` if it holds ``e1``,
        else discards it, and refuses to discard committed entries that disagree (Raft safety); the
        same snapshot received twice is not written again."""
        e0, e1 = _entry(e0), _entry(e1)
        k, t = e1[1], e1[2]
        with self._lock:
            self._check_open()
            self._flush_commit()
            P = self._log
            mgr = self._snapshots()
            if install and k == P.snapshot_index and t == P.term(k):
                return mgr.latest()
            hdr = _stdpickle.dumps({"format": fmt, "prev": e0, "last": e1}, protocol=4)
            blob = _MAGIC + struct.pack("<I", len(hdr)) + hdr + dump
            w = (mgr.install(k, t) if install else mgr.write(k, t)).begin()
            if w.resumed:  # a partial install left by a crash: its bytes may come from another dump
                w.abort()
                w = mgr.install(k, t).begin()
            try:
                for off in range(0, len(blob), _CHUNK):
                    w.write(blob[off:off + _CHUNK])
                w.finish()
            except BaseException:
                w.abort()
                raise
            log.info("group %r: %s snapshot at index %d (term %d), %d bytes", self._group,
                     "installed" if install else "wrote", k, t, len(blob))
            return w.meta

    def __repr__(self) -> str:
        first = self._entries[0][1] if self._entries else None
        last = self._entries[-1][1] if self._entries else None
        return (f"<RaftSqliteJournal {self._store.data_dir!r} group={self._group!r} view={first}..{last} "
                f"compaction={self.compaction}>")


# the stock class itself (_STOCK_SERIALIZER is the same object; a variable is no base class for mypy), Any to
# mypy as pysyncobj ships no types
class RaftSqliteSerializer(_pso_serializer.Serializer):  # type: ignore[misc]
    """PySyncObj's ``Serializer`` for a SyncObj whose journal is a :class:`RaftSqliteJournal`
    (installed by :func:`patch_pysyncobj` as ``pysyncobj.syncobj.Serializer``).

    SyncObj constructs its Serializer right after its journal, in the same thread; this class picks up
    the journal :func:`create_journal` has just made there. Without one it is the stock Serializer.
    With one, and compaction ``"store"``:

    - ``serialize(data, id)``: builds the dump PySyncObj would write (gzip of its pickle; or the file
      a custom ``SyncObjConf.serializer`` hook writes) **in the calling thread** (never a forked
      child: the store's SQLite connections must not cross a fork) and writes it as a durable store
      snapshot at the last applied entry ``data[1]``; only then does ``checkSerializing()`` report
      SUCCESS, after which SyncObj calls ``deleteEntriesTo``. So the log is never compacted before a
      durable snapshot covers it. A failure reports FAILED and compacts nothing.
    - ``getTransmissionData(node)`` streams the newest durable snapshot's dump to a lagging follower
      (same wire format as stock PySyncObj); ``setTransmissionData`` collects it and, on the last part,
      writes it as a durable store snapshot before returning True (SyncObj then loads it and calls
      ``clear()`` and ``add()`` for its two entries).
    - ``deserialize()`` loads from the store's newest durable snapshot (never from a stray file).
      At construction the dump is written to ``fullDumpFile`` so that SyncObj, which reloads state
      at startup only when that file exists, finds it.

    With compaction ``"off"`` (no snapshot support in the store) ``serialize`` reports SUCCESS without
    dumping anything and the journal keeps every entry (``deleteEntriesTo`` is a no-op), so restarts
    replay the whole log and a leader never needs to send a snapshot; a snapshot received from a
    leader is refused. Custom ``serializeChecker`` (asynchronous) hooks are not supported.
    """

    def __init__(self, fileName: str | None, transmissionBatchSize: int, tryUseFork: bool,
                 serializer: Callable[[str, Any], object] | None, deserializer: Callable[[str], Any] | None,
                 serializeChecker: Callable[[], Any] | None) -> None:
        ref: weakref.ref[RaftSqliteJournal] | None = getattr(_link, "journal", None)
        _link.journal = None
        journal = ref() if ref is not None else None
        self._rs = journal
        if journal is None:
            super().__init__(fileName, transmissionBatchSize, tryUseFork, serializer, deserializer,
                             serializeChecker)
            return
        if serializeChecker is not None:
            raise ValueError("raft_sqlite's PySyncObj integration does not support SyncObjConf.serializeChecker "
                             "(asynchronous custom serializers): dumps must be durable when serialize() returns")
        journal._attached = True
        # a journal exists only for a journalFile, and then the patched SyncObjConf.validate (run by SyncObj
        # before it builds its Serializer) has set fullDumpFile
        assert fileName is not None, "fullDumpFile is set whenever journalFile is (see _validate)"
        self._file = fileName
        self._batch = transmissionBatchSize
        self._user_ser, self._user_deser = serializer, deserializer
        self._result: int | None = None  # a SERIALIZER_STATE
        self._current_id: Any = None  # PySyncObj's id of the dump being written (opaque to the adapter)
        self._tx: dict[object, _Transfer] = {}
        self._incoming: bytearray | None = None
        self._parsed: Any = None  # the state deserialize() returns next (PySyncObj's dump, decoded)
        self._refused_install = False
        if journal.compaction == "store" and self._file:
            self._materialize()

    def _materialize(self) -> None:
        rs = self._rs
        assert rs is not None, "called by __init__ with a journal only"
        meta = rs._latest_snapshot()
        if meta is None:
            if os.path.exists(self._file):
                log.warning("%s exists but the store %s holds no snapshot: it will not be loaded", self._file,
                            rs.store.data_dir)
            return
        _fmt, dump = rs._read_snapshot(meta)
        _write_file_atomic(self._file, dump)

    # -- compaction
    def checkSerializing(self) -> tuple[int, Any]:
        """``(SERIALIZER_STATE, id)`` as PySyncObj expects: SUCCESS/FAILED once after ``serialize``."""
        if self._rs is None:
            stock: tuple[int, Any] = super().checkSerializing()
            return stock
        r, self._result = self._result, None
        if r is None:
            return SERIALIZER_STATE.NOT_SERIALIZING, None
        if r == SERIALIZER_STATE.SUCCESS:
            self._close_all()
        return r, self._current_id

    def serialize(self, data: tuple[Any, ...], id: Any) -> None:
        """Write PySyncObj's full dump ``data`` as a durable store snapshot (synchronously)."""
        if self._rs is None:
            super().serialize(data, id)
            return
        if self._result is not None:
            return
        self._current_id = id
        if self._rs.compaction == "off":
            self._result = SERIALIZER_STATE.SUCCESS
            return
        try:
            if self._user_ser is not None:
                tmp = self._file + ".tmp"
                self._user_ser(tmp, data[1:])
                dump = _read_file(tmp)
                fsio.replace(tmp, self._file)  # as stock PySyncObj: the custom dump lands in fullDumpFile
                fmt = "custom"
            else:
                dump, fmt = _gzip_pickle(data), "gzip-pickle"
            self._rs._write_snapshot(data[2], data[1], dump, fmt, install=False)
            self._result = SERIALIZER_STATE.SUCCESS
        except Exception:
            log.exception("group %r: full dump failed; the log is not compacted", self._rs.group)
            self._result = SERIALIZER_STATE.FAILED

    def deserialize(self) -> Any:
        """The dump of the store's newest durable snapshot, as PySyncObj's ``__loadDumpFile`` wants it."""
        if self._rs is None:
            return super().deserialize()
        if self._parsed is not None:
            parsed, self._parsed = self._parsed, None
            return parsed
        meta = self._rs._latest_snapshot()
        if meta is None:
            raise SnapshotError(f"{self._rs.store.data_dir}: no durable PySyncObj snapshot in the store (compaction "
                                f"{self._rs.compaction!r}); not loading {self._file}")
        fmt, dump = self._rs._read_snapshot(meta)
        return self._decode(fmt, dump)

    def _decode(self, fmt: str, dump: bytes) -> Any:
        if fmt == "custom":
            if self._user_deser is None:
                raise SnapshotError("snapshot was written by a custom SyncObjConf.serializer; configure its deserializer")
            _write_file_atomic(self._file, dump)
            return (None,) + tuple(self._user_deser(self._file))
        return _gunzip_unpickle(dump)

    # -- snapshot transfer to/from other nodes
    def getTransmissionData(self, transmissionID: object) -> tuple[bytes, bool, bool] | bool | None:
        """Next ``(data, isFirst, isLast)`` part of the newest durable snapshot for a follower."""
        if self._rs is None:
            stock: tuple[bytes, bool, bool] | bool | None = super().getTransmissionData(transmissionID)
            return stock
        if self._rs.compaction == "off":
            return None
        if self._result is not None:
            # serialize() has written a snapshot whose SUCCESS SyncObj has not collected yet, so its journal
            # view is not compacted to it: after the last part SyncObj would set the follower's next index
            # from the old view (raftLog[1] + 1) and resend entries the snapshot covers. Stock PySyncObj's
            # Serializer sends nothing while a dump is pending either; the next tick sends it.
            return None
        tx = self._tx.get(transmissionID)
        if tx is None:
            try:
                meta = self._rs._latest_snapshot()
                if meta is None:
                    return None
                tx = self._tx[transmissionID] = {"stream": self._rs._open_dump(meta), "sent": 0}
            except Exception:
                log.exception("group %r: cannot open the snapshot to send", self._rs.group)
                return None
        first = tx["sent"] == 0
        try:
            data = tx["stream"].read(self._batch)
        except Exception:
            log.exception("group %r: error reading the snapshot being sent", self._rs.group)
            self.cancelTransmisstion(transmissionID)
            return False
        tx["sent"] += len(data)
        last = len(data) == 0
        if last:
            self.cancelTransmisstion(transmissionID)
        return data, first, last

    def setTransmissionData(self, data: tuple[Any, bool, bool] | None) -> bool:
        """Collect a snapshot streamed by the leader; on its last part write it as a durable store
        snapshot and return True (False until then, or when it cannot be stored)."""
        if self._rs is None:
            stock: bool = super().setTransmissionData(data)
            return stock
        if data is None:
            return False
        part, first, last = data
        if first:
            self._incoming = bytearray()
        elif self._incoming is None:
            return False
        self._incoming += _pso_pickle.to_bytes(part)
        if not last:
            return False
        dump, self._incoming = bytes(self._incoming), None
        if self._rs.compaction == "off":
            if not self._refused_install:
                log.error("group %r: a leader sent a snapshot but compaction is off (no snapshot support in the "
                          "store); refusing it: run every node with the same raft_sqlite version", self._rs.group)
                self._refused_install = True
            return False
        try:
            fmt = "custom" if self._user_deser is not None else "gzip-pickle"
            parsed = self._decode(fmt, dump)
            self._rs._write_snapshot(parsed[2], parsed[1], dump, fmt, install=True)
        except Exception:
            log.exception("group %r: could not install the snapshot received from the leader", self._rs.group)
            return False
        self._parsed = parsed
        return True

    def cancelTransmisstion(self, id: object) -> None:  # (sic) PySyncObj's spelling
        """Forget the transfer to ``id``."""
        if self._rs is None:
            super().cancelTransmisstion(id)
            return
        tx = self._tx.pop(id, None)
        if tx is not None:
            with contextlib.suppress(Exception):
                tx["stream"].close()

    def _close_all(self) -> None:
        for k in list(self._tx):
            self.cancelTransmisstion(k)


_UNKNOWN_OUTCOME = _pso_syncobj.FAIL_REASON.UNKNOWN_OUTCOME


class _DurabilityGate:
    """Group commit for a SyncObj on a :class:`RaftSqliteJournal`: nothing that depends on a journal write
    leaves the node before that write is durable, and the writes between two exits share one commit.

    Installed on a SyncObj by :func:`patch_pysyncobj` (see :func:`_install_gate`), it puts the journal in
    batched mode (``add``/``setCurrentTerm`` only queue) and takes over the node's two exits:

    - **messages**: the transport's ``send`` holds the message in a queue (any thread), unless nothing is held
      and nothing is queued in the journal: then everything it can depend on is durable and it goes at once;
    - **client callbacks** (of commands submitted while the patch is active): run only after :meth:`sync`.

    The queue is released by :meth:`poll`, which replaces the SyncObj's ``_poller.poll``: PySyncObj calls
    it once per tick, after the tick's work (elections, AppendEntries, the leader appending the queued
    commands) and handles every message received during it, so a release before and after the real poll
    covers everything: ``journal.sync()`` (one commit for all the writes queued since the last one), then
    the held messages in order. A follower thus makes one fsync per poll (every AppendEntries received in
    it), a leader one per tick, a voter one per vote.

    Fail-stop: if ``sync()`` fails, the node must not act on what it holds only in memory. The gate drops
    every held and later message; callbacks of commands already in flight and of commands submitted later
    get ``FAIL_REASON.UNKNOWN_OUTCOME`` (the command may or may not be committed by the rest of the
    cluster); the journal refuses every later write; and a SyncObj with ``autoTick`` is destroyed (its tick
    thread stops, as if the process had crashed). With ``autoTick=False`` every later ``doTick()`` raises.
    Restart the node: it reopens from what is durable.
    """

    def __init__(self, journal: RaftSqliteJournal, send: Callable[[Any, Any], bool],
                 poll: Callable[[float], object], stop: Callable[[], object] | None = None) -> None:
        self.journal = journal
        self._send, self._poll = send, poll
        self._stop = stop  # called once when the gate dies (destroys an autoTick SyncObj)
        # (node, message): PySyncObj's objects, passed through untouched
        self._held: collections.deque[tuple[Any, Any]] = collections.deque()
        self.dead: BaseException | None = None
        self.released = 0  # messages handed to the transport
        self.syncs = 0  # sync() calls that committed something
        # every client callback wrapped by callback() and not answered yet: on fail-stop each is answered
        # from here, including those PySyncObj dropped (a tick that raised after taking commands out of its
        # queue, e.g. a journal write refused because a commit outside sync() failed first)
        self._unanswered: dict[int, _DurableCallback] = {}

    def send(self, node: Any, message: Any) -> bool:
        """The transport's ``send`` while the gate is installed: hold the message until the next release,
        or, when nothing is held and the journal has nothing queued (everything the message can depend on is
        already durable), send it at once. The second case keeps PySyncObj's own pacing where it matters: a
        leader's AppendEntries loop (its entries were committed at the end of the previous tick) is bounded
        by ``appendEntriesPeriod`` including the cost of the sends, as in stock PySyncObj; holding those
        messages too would let one tick queue every entry for every follower and send them all at once,
        long enough to miss a heartbeat (seen: a leader change under load)."""
        if self.dead is not None:
            return True
        journal = self.journal
        if not self._held and not journal.pending and journal.healthy:
            with journal._lock:  # against a write from another thread between the check and the send
                if not self._held and not journal.pending and self.dead is None:
                    self.released += 1
                    return self._send(node, message)
        self._held.append((node, message))
        return True

    def sync(self) -> bool:
        """Commit the journal's queued writes; False (and the gate dead) if that failed."""
        if self.dead is not None:
            return False
        try:
            if self.journal.sync():
                self.syncs += 1
        except BaseException as e:  # noqa: BLE001 - any failure: nothing may leave any more
            self.dead = e
            self._held.clear()
            log.critical("group %r: the node stops (fail-stop): its journal writes could not be made durable: "
                         "%s: %s", self.journal.group, type(e).__name__, e)
            if self._stop is not None:
                with contextlib.suppress(ReferenceError):
                    self._stop()
            self.answer_unanswered()
            return False
        return True

    def answer_unanswered(self) -> None:
        """Answer ``UNKNOWN_OUTCOME`` to every callback of :meth:`callback` not answered yet (fail-stop)."""
        while self._unanswered:
            try:
                cb = self._unanswered.popitem()[1]
            except KeyError:  # emptied by another thread meanwhile
                break
            try:
                cb.answer(None, _UNKNOWN_OUTCOME)
            except Exception:  # noqa: BLE001 - a client's callback must not stop the others from being answered
                log.exception("client callback raised")

    def release(self) -> None:
        """Sync, then hand every held message to the transport, in the order they were sent."""
        if not self.sync():
            return
        held, send = self._held, self._send
        while held:
            node, message = held.popleft()
            self.released += 1
            send(node, message)

    def poll(self, timeout: float) -> object:
        """The SyncObj poller's ``poll``: release, wait for and handle events, release. Once the gate is
        dead it raises instead (so every later ``doTick()`` of a fail-stopped node raises)."""
        if self.dead is not None:
            raise RaftSqliteError(f"group {self.journal.group!r}: the node fail-stopped (its journal writes could "
                                  f"not be made durable: {type(self.dead).__name__}: {self.dead}); restart it")
        self.release()
        try:
            return self._poll(timeout)
        finally:
            self.release()

    def callback(self, fn: _Callback) -> _DurableCallback:
        """``fn`` wrapped to run only once the journal's queued writes are durable, and only once."""
        cb = _DurableCallback(self, fn)
        self._unanswered[id(cb)] = cb
        if self.dead is not None:  # died meanwhile: sync() may have answered the others already
            self.answer_unanswered()
        return cb

    def holding(self) -> bool:
        """True while messages are held (some may depend on the journal's queued writes)."""
        return bool(self._held)


class _DurableCallback:
    """A client callback behind a :class:`_DurabilityGate`: called, it first makes the journal's queued writes
    durable, then answers the client with the result, or with ``UNKNOWN_OUTCOME`` if that commit failed.
    It answers at most once: on fail-stop, :func:`_fail_stop` answers every pending one, and PySyncObj may
    still call the same callback afterwards (e.g. its leader-change loop)."""

    def __init__(self, gate: _DurabilityGate, fn: _Callback) -> None:
        self.gate = gate
        self.fn = fn

    def __call__(self, res: Any, err: Any) -> None:
        if self.gate.sync():
            self.answer(res, err)
        else:
            self.answer(None, _UNKNOWN_OUTCOME)

    def answer(self, res: Any, err: Any) -> None:
        """Call the client's callback with ``(res, err)`` unless it was answered already (any thread)."""
        fn = self.__dict__.pop("fn", None)  # atomic: of two threads, one gets it
        if fn is not None:
            self.gate._unanswered.pop(id(self), None)
            fn(res, err)


def _pso_private(syncobj: object, name: str) -> Any:
    # PySyncObj 0.3.17 keeps its journal and transport in name-mangled attributes and offers no accessor;
    # this is the one place the integration reads them (a PySyncObj without them keeps write-through).
    return getattr(syncobj, f"_SyncObj__{name}", None)


def _gate_of(syncobj: object) -> _DurabilityGate | None:
    journal = _pso_private(syncobj, "raftLog")
    return journal._gate if isinstance(journal, RaftSqliteJournal) else None


def _fail_stop(syncobj: _SyncObj) -> None:
    """What a SyncObj does when its journal cannot make writes durable: every client callback still pending
    (queued commands, commands waiting for their commit or for the leader's reply) is answered
    ``UNKNOWN_OUTCOME`` at once instead of never, and an ``autoTick`` SyncObj is destroyed (``destroy()``
    only flags its tick thread to stop)."""
    _answer_pending(syncobj)
    if syncobj.conf.autoTick:
        syncobj.destroy()


def _answer_pending(syncobj: object) -> None:
    """Answer ``UNKNOWN_OUTCOME`` to every client callback of ``syncobj`` still waiting: commands still queued
    (taken out of the queue: the node will not append them) and commands waiting for their commit or for the
    leader's reply. The last two stay in PySyncObj's dicts (it may be iterating them right now, e.g. in its
    leader-change loop); answering is once-only (:class:`_DurableCallback`), so a later call by PySyncObj is a
    no-op. Callbacks not wrapped by the gate are answered only when taken out of the queue."""
    queued: list[Any] = []  # callbacks: a _DurableCallback, a client's function, None or PySyncObj's tuple
    queue = _pso_private(syncobj, "commandsQueue")
    with contextlib.suppress(Exception):  # the queue's own Empty ends the loop
        while True:
            queued.append(queue.get_nowait()[1])
    waiting = [cb for subs in list((_pso_private(syncobj, "commandsWaitingCommit") or {}).values())
               for _term, cb in list(subs)]
    waiting += list((_pso_private(syncobj, "commandsWaitingReply") or {}).values())
    answers: list[_Callback] = [cb.answer for cb in queued + waiting if isinstance(cb, _DurableCallback)]
    answers += [cb for cb in queued if cb is not None and not isinstance(cb, (tuple, _DurableCallback))]
    for answer in answers:
        try:
            answer(None, _UNKNOWN_OUTCOME)
        except Exception:  # noqa: BLE001 - a client's callback must not stop the others from being answered
            log.exception("client callback raised")


def _install_gate(syncobj: _SyncObj) -> _DurabilityGate | None:
    """Put ``syncobj``'s RaftSqliteJournal behind a :class:`_DurabilityGate` (idempotent; None for a SyncObj
    on another journal). The journal switches to batched mode last: until then every write is committed
    before it returns, so a message that slips out during installation never depends on a queued write."""
    journal = _pso_private(syncobj, "raftLog")
    transport = _pso_private(syncobj, "transport")
    poller = getattr(syncobj, "_poller", None)
    if not isinstance(journal, RaftSqliteJournal):
        return None
    with journal._lock:
        if journal._gate is not None:
            return journal._gate
        if transport is None or poller is None or not callable(getattr(transport, "send", None)):
            log.warning("group %r: this PySyncObj has no transport/poller where 0.3.17 keeps them; the journal "
                        "stays write-through (one commit per write)", journal.group)
            return None
        # held weakly: the tick thread holds its SyncObj through a weakref.proxy too, so that an abandoned
        # SyncObj can be collected
        proxy = syncobj if isinstance(syncobj, weakref.ProxyTypes) else weakref.proxy(syncobj)
        gate = _DurabilityGate(journal, transport.send, poller.poll, lambda: _fail_stop(proxy))
        transport.send = gate.send
        poller.poll = gate.poll
        journal._gate = gate
        journal._enable_batching()
        return gate


@overload
def create_journal(journal_file: None = None, *, node_id: str | None = None, cluster_id: str | None = None,
                   fsync: FsyncMode | str | None = None, group: str | None = None,
                   compaction: str | None = None, vfs: str | None = None) -> Any: ...  # a MemoryJournal


@overload
def create_journal(journal_file: str | os.PathLike[str], *, node_id: str | None = None,
                   cluster_id: str | None = None, fsync: FsyncMode | str | None = None,
                   group: str | None = None, compaction: str | None = None,
                   vfs: str | None = None) -> RaftSqliteJournal: ...


def create_journal(journal_file: str | os.PathLike[str] | None = None, *, node_id: str | None = None,
                   cluster_id: str | None = None, fsync: FsyncMode | str | None = None,
                   group: str | None = None, compaction: str | None = None, vfs: str | None = None) -> Any:
    """PySyncObj's ``createJournal`` contract on raft_sqlite.

    ``journal_file=None`` returns PySyncObj's in-memory ``MemoryJournal`` (as stock). Otherwise
    ``journal_file`` names the node's data_dir (a directory, created if missing; an existing *file*,
    e.g. a stock FileJournal, is refused) and a :class:`RaftSqliteJournal` on a
    :class:`~raft_sqlite.NodeStore` opened there is returned; its ``_destroy()`` closes the store.

    Identity and settings (argument, else environment variable, else default):
    ``node_id`` (``RAFT_SQLITE_NODE_ID``, else the data_dir's base name), ``cluster_id``
    (``RAFT_SQLITE_CLUSTER_ID``, else ``"pysyncobj"``), ``fsync`` (``RAFT_SQLITE_FSYNC``: OFF, NORMAL,
    FULL, EXTRA; else FULL), ``group`` (``RAFT_SQLITE_GROUP``, else ``"pysyncobj"``), ``compaction``
    (``RAFT_SQLITE_PYSYNCOBJ_COMPACTION``: ``store``/``off``, else ``store`` when snapshots are
    available). The store refuses to open a data_dir of another node or cluster
    (:class:`~raft_sqlite.NodeIdentityMismatch`): after restoring a backup into a directory with
    another name, set ``RAFT_SQLITE_NODE_ID``. ``vfs`` names a registered apsw VFS for the store
    (:meth:`NodeStore.open`'s seam for fault-injection tests; default: SQLite's own).
    """
    if journal_file is None:
        _link.journal = None
        return _pso_journal.MemoryJournal()
    data_dir = os.fspath(journal_file)
    if os.path.isfile(data_dir):
        raise RaftSqliteError(f"{data_dir} is a file (a PySyncObj FileJournal?); with raft_sqlite, journalFile names "
                              "the node's data directory")
    node_id = node_id or os.environ.get("RAFT_SQLITE_NODE_ID") or os.path.basename(os.path.abspath(data_dir))
    cluster_id = cluster_id or os.environ.get("RAFT_SQLITE_CLUSTER_ID") or DEFAULT_CLUSTER_ID
    raw = fsync or os.environ.get("RAFT_SQLITE_FSYNC") or "FULL"
    mode = raw if isinstance(raw, FsyncMode) else FsyncMode(str(raw).upper())  # str(FsyncMode.X) is not "X"
    group = group or os.environ.get("RAFT_SQLITE_GROUP") or DEFAULT_GROUP
    store = NodeStore.open(data_dir, node_id, cluster_id=cluster_id, fsync=mode, vfs=vfs)
    try:
        journal = RaftSqliteJournal(store, group, owns_store=True, compaction=compaction)
    except BaseException:
        store.close()
        raise
    _link.journal = weakref.ref(journal)
    return journal


def _syncobj_init(self: _SyncObj, *args: Any, **kwargs: Any) -> None:
    _STOCK_INIT(self, *args, **kwargs)
    # the gate is installed before the constructor returns, so every command a client submits is covered;
    # with autoTick the tick thread may already run (it installs the gate itself before its first tick):
    # installing is idempotent, and safe at any moment (see _install_gate)
    _install_gate(self)


def _auto_tick_thread(self: _SyncObj) -> object:
    # the tick thread, before its first tick: nothing of this node has been sent yet
    _install_gate(self)
    return _STOCK_AUTO_TICK(self)


def _apply_command(self: _SyncObj, command: Any, callback: _Callback | tuple[Any, ...] | None,
                   commandType: int | None = None) -> object:
    gate = _gate_of(self)
    if gate is not None:
        if gate.dead is not None:  # fail-stopped: answer now, never queue (the command would be lost silently)
            if callback is not None and not isinstance(callback, tuple):
                callback(None, _UNKNOWN_OUTCOME)
            return None
        if callback is not None and not isinstance(callback, tuple):
            callback = gate.callback(callback)
    result = _STOCK_APPLY_COMMAND(self, command, callback, commandType)
    if gate is not None and gate.dead is not None:
        _answer_pending(self)  # the node died between the check above and the enqueue: answer it now
    return result


def _validate(self: _SyncObjConf) -> object:
    if self.journalFile is not None and self.fullDumpFile is None:
        self.fullDumpFile = os.path.join(os.fspath(self.journalFile), DUMP_FILE_NAME)
    return _STOCK_VALIDATE(self)


class _Patch:
    """Handle returned by :func:`patch_pysyncobj`; a context manager whose exit calls :meth:`restore`."""

    def __init__(self) -> None:
        self._saved: list[tuple[object, str, object]] = []
        for obj, name, new in (
                (_pso_syncobj, "createJournal", create_journal),
                (pysyncobj, "createJournal", create_journal),
                (_pso_journal, "createJournal", create_journal),
                (_pso_syncobj, "Serializer", RaftSqliteSerializer),
                (_pso_syncobj.SyncObj, "__init__", _syncobj_init),
                (_pso_syncobj.SyncObj, "_autoTickThread", _auto_tick_thread),
                (_pso_syncobj.SyncObj, "_applyCommand", _apply_command),
                (_pso_config.SyncObjConf, "validate", _validate)):
            self._saved.append((obj, name, obj.__dict__[name] if isinstance(obj, type) else getattr(obj, name)))
            setattr(obj, name, new)

    def restore(self) -> None:
        """Put back what was installed before this patch. Idempotent."""
        saved, self._saved = self._saved, []
        for obj, name, old in reversed(saved):
            setattr(obj, name, old)

    def __enter__(self) -> _Patch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def patch_pysyncobj() -> _Patch:
    """Make PySyncObj use raft_sqlite for every SyncObj created afterwards with a ``journalFile``.

    Installs :func:`create_journal` as ``pysyncobj.syncobj.createJournal`` (the name SyncObj calls),
    ``pysyncobj.createJournal`` and ``pysyncobj.journal.createJournal``; :class:`RaftSqliteSerializer`
    as ``pysyncobj.syncobj.Serializer``; and a ``SyncObjConf.validate`` that defaults ``fullDumpFile``
    to ``<journalFile>/pysyncobj-full.dump`` when only ``journalFile`` is set. Use it as a plain call
    (the patch stays) or as a context manager (``with patch_pysyncobj(): ...``) that restores what
    was there before on exit; the returned handle's ``restore()`` does the same. SyncObjs already
    built keep their journal.
    """
    return _Patch()
