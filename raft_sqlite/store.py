"""NodeStore: one node's data_dir, its connections, group commit and recovery on open."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import logging
import operator
import os
import re
import threading
import time
import zlib
from _thread import allocate_lock as _allocate_lock
from dataclasses import dataclass

import apsw

from . import fsio, hwm, layout, migrate, reserve
from .args import float_arg, text_arg
from .errors import (CompactionError, CorruptionError, DataDirError, LogCompactedError, LogConflictError,
                     NodeIdentityMismatch, RaftSqliteError, StorageFault)
from .lock import DataDirLock, check_data_dir
from .fsync import FSYNC_MODES, FsyncMode, pragmas_for
from .log import PersistentRaftLog
from .metadata import RaftMetadataStore, group_crc, meta_crc
from .recovery import RecoveryPolicy, RecoveryReport
from .wal import BLOB_PAYLOAD, SegmentPolicy, WalCompactor, WalReader, WalWriter

log = logging.getLogger("raft_sqlite.store")

_PAYLOAD = operator.itemgetter(2)

_FAULT_ERRORS = (apsw.IOError, apsw.FullError, apsw.CantOpenError, apsw.CorruptError, apsw.NotADBError,
                 apsw.ProtocolError, apsw.ReadOnlyError, apsw.BusyError, apsw.LockedError, apsw.NoMemError)


def node_crc(node_id: str, cluster_id: str, fmt: int, created_at: float) -> int:
    """CRC32 stored with the node record."""
    return zlib.crc32(f"{node_id}|{cluster_id}|{fmt}|{created_at!r}".encode())


class _Group:
    """In-memory state of one group. Published objects are never mutated: the committer works on
    copies and publishes them after a successful commit."""

    __slots__ = ("gid", "name", "first_index", "last_index", "last_term", "snapshot_index", "snapshot_term",
                 "term", "vote", "commit", "seg", "recovered_partially")

    def __init__(self, gid, name, first_index=1, last_index=0, last_term=0, snapshot_index=0, snapshot_term=0,
                 term=0, vote=None, commit=0, seg=None, recovered_partially=False):
        self.gid, self.name = gid, name
        self.first_index, self.last_index, self.last_term = first_index, last_index, last_term
        self.snapshot_index, self.snapshot_term = snapshot_index, snapshot_term
        self.term, self.vote, self.commit = term, vote, commit
        self.seg, self.recovered_partially = seg, recovered_partially

    def copy(self) -> "_Group":
        seg = self.seg
        return _Group(self.gid, self.name, self.first_index, self.last_index, self.last_term, self.snapshot_index,
                      self.snapshot_term, self.term, self.vote, self.commit, None if seg is None else seg.copy(),
                      self.recovered_partially)


class _Replay(Exception):
    """Internal: drop ``req`` from the batch (its SQL already ran) and replay the rest."""

    def __init__(self, req, error):
        super().__init__(str(error))
        self.req, self.error = req, error


class _Carrier(Exception):
    """Internal: carries the exception ``error`` from the committer's inner steps to ``_execute``."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


class _Unknown(_Carrier):
    """A rollback after ``error`` failed; the outcome of the batch is unknown."""


class _Interrupted(_Carrier):
    """The leader was interrupted (``error``: KeyboardInterrupt, SystemExit...) before COMMIT and the batch
    was rolled back: every live request was answered "nothing written"; re-raise ``error``."""


class _BatchFailed(_Carrier):
    """Inserting the deferred rows of several requests failed (with ``error``); the batch is rolled back
    and replayed with each request's rows inserted with it."""


class _Request:
    __slots__ = ("ops", "done", "result", "error", "wake")

    def __init__(self, ops):
        self.ops = ops  # list of (group name, check, write)
        self.done = False
        self.result = None
        self.error = None
        self.wake = None  # a held lock, created only if the request has to wait behind a leader


@dataclass
class StoreStats:
    """Counters kept by the store (read by metrics and benchmarks)."""

    commits: int = 0
    requests: int = 0
    commit_seconds: float = 0.0
    max_batch: int = 0
    interval_syncs: int = 0


class NodeStore:
    """One Raft node's durable storage in ``data_dir`` (see :meth:`open`)."""

    def __init__(self):  # use NodeStore.open()
        self._closed = True

    # ------------------------------------------------------------------ open / close
    @classmethod
    def open(cls, data_dir, node_id: str, *, cluster_id: str, fsync: FsyncMode = FsyncMode.FULL,
             fsync_interval: float = 0.05, recovery: RecoveryPolicy = RecoveryPolicy.STRICT,
             vfs: str | None = None, segment_policy: SegmentPolicy | None = None,
             slow_commit_warning: float = 1.0, lock: DataDirLock | None = None) -> "NodeStore":
        """Open (creating if needed) the store of node ``node_id`` in ``data_dir``.

        First takes the exclusive lock of ``data_dir`` (:class:`~raft_sqlite.lock.DataDirLock`), held
        until :meth:`close` and dropped by the OS if the process dies: a second open of the same
        data_dir, from any process or this one, raises :class:`~raft_sqlite.DataDirLocked` naming the
        holder, before any file is touched. ``lock`` passes a lock the caller already holds on
        ``data_dir`` (:func:`raft_sqlite.restore` does); the store then uses it and leaves it held on
        close. A ``data_dir`` that exists and is not a directory raises
        :class:`~raft_sqlite.DataDirError` (nothing is created).

        Creates ``data_dir`` with mode 0700 and its database files with mode 0600 (an existing data_dir
        or file with looser permissions is tightened to these, with a warning naming the old mode),
        brings the schema to the current version (alembic runs only when needed), writes the node
        record on creation and refuses (:class:`NodeIdentityMismatch`) a data_dir of another node or
        cluster or of a newer format. Then validates the local data under ``recovery`` (see :class:`RecoveryPolicy`) and
        records a recovery event. ``fsync`` picks the durability of every write
        (:data:`raft_sqlite.fsync.FSYNC_MODES`); with ``NORMAL`` the WAL is synced every
        ``fsync_interval`` seconds by a background thread. ``vfs`` names a registered apsw VFS (the
        seam for fault-injection tests). Use as a context manager, or call :meth:`close`.
        """
        # every parameter is checked before anything touches the disk (not even data_dir is created)
        if not isinstance(node_id, str) or not node_id:
            raise TypeError("node_id must be a non-empty str")
        if not isinstance(cluster_id, str) or not cluster_id:
            raise TypeError("cluster_id must be a non-empty str")
        for what, text in (("node_id", node_id), ("cluster_id", cluster_id)):
            text_arg(what, text)
        data_dir = check_data_dir(data_dir)
        if not data_dir:
            raise TypeError(f"data_dir must be a non-empty str or os.PathLike of str, not {data_dir!r}")
        if "\0" in data_dir:
            raise ValueError(f"data_dir contains a NUL character: {data_dir!r}")
        fsync = FsyncMode(fsync)
        fsync_interval = float_arg("fsync_interval", fsync_interval, layout.MIN_FSYNC_INTERVAL,
                                   layout.MAX_FSYNC_INTERVAL)
        recovery = RecoveryPolicy(recovery)
        if vfs is not None and not isinstance(vfs, str):
            raise TypeError(f"vfs must be a str (a registered apsw VFS name) or None, not {type(vfs).__name__}")
        if segment_policy is not None:
            if not isinstance(segment_policy, SegmentPolicy):
                raise TypeError(f"segment_policy must be a SegmentPolicy or None, not {type(segment_policy).__name__}")
            # a private copy, checked: the caller may change (or break) its object later
            segment_policy = dataclasses.replace(segment_policy)
        slow_commit_warning = float_arg("slow_commit_warning", slow_commit_warning, 0.0, 1e9)
        if lock is not None and not isinstance(lock, DataDirLock):
            raise TypeError(f"lock must be a DataDirLock or None, not {type(lock).__name__}")
        self = cls()
        self.data_dir = data_dir
        self.node_id, self.cluster_id = node_id, cluster_id
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.recovery_policy = recovery
        self.vfs = vfs
        self.slow_commit_warning = slow_commit_warning
        self.stats = StoreStats()
        self.on_commit = None  # optional callback(seconds, requests) for metrics
        self._wal = WalWriter(segment_policy)
        self._reader_wal = WalReader()
        self._compactor = WalCompactor()
        self._mu = threading.Lock()
        self._last_batch = 1
        self._commit_ema = 0.0  # exponential moving average of commit seconds
        self._queue: collections.deque[_Request] = collections.deque()
        self._fault: BaseException | None = None
        self._tx = threading.local()
        self._readers: list[apsw.Connection] = []
        self._all_readers: list[apsw.Connection] = []
        self._groups: dict[str, _Group] = {}
        self._views: dict[tuple[str, str], object] = {}
        self._syncer = None
        #: Held by a hot backup while it copies; snapshot retention/orphan removal take it before
        #: deleting chunks, so a backup's chunks.db holds every chunk its raft.db manifests name.
        self.gc_lock = threading.RLock()
        #: Serialises use of ``chunks_conn`` (the snapshot chunk database's write connection).
        self.chunks_lock = threading.RLock()
        self._closed = False
        self._wal_problems: list[str] = []
        self._hwm = None
        self._conn = None
        self.chunks_conn = None
        #: Python-level reads of the live database files go through descriptors closed only after SQLite
        #: closed the files (closing one would drop SQLite's POSIX locks: see hwm.PinnedFiles)
        self._pins = hwm.PinnedFiles()
        self._lock: DataDirLock | None = None
        self._owns_lock = lock is None
        try:
            try:
                created = self._take_dir(lock)
                self._open_files(created)
                try:
                    self._recover()
                except StorageFault as exc:
                    # A full disk (typically a snapshot that filled it) must not make every reopen fail:
                    # give back the reserve so the recovery can commit and drop the partial snapshot.
                    # Not after a failed sync (self._fault set): retrying would sync again, and a retried
                    # fsync can report success for data the kernel dropped (fail-stop).
                    freed = reserve.release(self.data_dir) \
                        if self._fault is None and reserve.is_disk_full(exc) else 0
                    if not freed:
                        raise
                    log.warning("%s: disk full while opening (%s): released the %d-byte disk reserve and "
                                "retrying", self.data_dir, exc.__cause__ or exc, freed)
                    self._recover()
                self._reclaim_orphan_space()
                reserve.ensure(self.data_dir)
            except UnicodeDecodeError as exc:  # a TEXT column (name, vote, manifest) holds bytes that are not UTF-8
                raise CorruptionError(f"{self.data_dir}: a text column holds bytes that are not UTF-8 ({exc}); "
                                      "the database is damaged") from exc
            self._start_hwm()  # only once the store is known good
        except BaseException as exc:
            if isinstance(exc, StorageFault):
                self._fault = exc  # close without SQLite's checkpoint-on-close (see _close_connections)
            self._close_connections(failed_open=True)
            self._release_lock()
            raise
        if FSYNC_MODES[self.fsync]["interval_sync"]:
            self._syncer = _IntervalSyncer(self)
            self._syncer.start()
        return self

    @property
    def path(self) -> str:
        """Path of the main database file (``raft.db``)."""
        return os.path.join(self.data_dir, layout.MAIN_DB)

    @property
    def chunks_path(self) -> str:
        """Path of the snapshot chunk database file (``chunks.db``)."""
        return os.path.join(self.data_dir, layout.CHUNKS_DB)

    def _connect(self, path: str, *, query_only: bool = False) -> apsw.Connection:
        flags = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_NOMUTEX
        conn = apsw.Connection(path, flags=flags, vfs=self.vfs, statementcachesize=64)
        try:
            conn.setbusytimeout(10_000)
            for k, v in pragmas_for(self.fsync).items():
                conn.execute(f"PRAGMA {k}={v}").fetchall()
            if query_only:
                conn.execute("PRAGMA query_only=1")
                # Only the write connection checkpoints on close: a reader that outlives the store (a
                # backup's source) must not checkpoint and delete the WAL after the store recorded its
                # final high-water mark (see hwm.lost_commits).
                conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
            else:
                one = ctypes.c_int(1)  # keep the WAL file across opens: it is reused, never re-created
                conn.file_control("main", apsw.SQLITE_FCNTL_PERSIST_WAL, ctypes.addressof(one))
        except BaseException:
            conn.close()
            raise
        return conn

    def _take_dir(self, lock: DataDirLock | None) -> bool:
        """Create ``data_dir`` if needed, lock it (or adopt the caller's ``lock``), then tighten the
        modes of data_dir (0700) and of its files (0600). Returns True if a file or the directory was
        created (data_dir is then fsynced once its files exist, in every mode but OFF)."""
        created = not os.path.isdir(self.data_dir)
        if created:
            # the new directories' entries are made durable by _sync_new_store_dirs, before the node record
            try:
                fsio.makedirs(self.data_dir, mode=0o700, exist_ok=True)
                os.chmod(self.data_dir, 0o700)
            except OSError as exc:
                check_data_dir(self.data_dir)  # a file appeared there meanwhile: say so
                raise DataDirError(f"cannot create data_dir {self.data_dir}: {exc.strerror or exc}") from exc
        if lock is None:
            self._lock = DataDirLock.acquire(self.data_dir, node_id=self.node_id)
            created = created or self._lock.created
        else:
            if not lock.held or not os.path.samefile(lock.data_dir, self.data_dir):
                raise ValueError(f"lock {lock!r} is not a held lock of {self.data_dir}")
            self._lock = lock
        self._tighten_modes()
        return created

    def _tighten_modes(self) -> None:
        """data_dir 0700 and every regular file in it 0600 (only group/other bits are removed)."""
        try:
            mode = os.stat(self.data_dir).st_mode
            if mode & 0o077:
                log.warning("%s: data_dir mode was %04o; tightened to 0700", self.data_dir, mode & 0o7777)
                os.chmod(self.data_dir, (mode & 0o7700) | 0o700)
            for entry in os.scandir(self.data_dir):
                if entry.is_file(follow_symlinks=False):
                    fmode = entry.stat(follow_symlinks=False).st_mode
                    if fmode & 0o077:
                        log.warning("%s: file mode was %04o; tightened to 0600", entry.path, fmode & 0o7777)
                        os.chmod(entry.path, fmode & 0o7700)
        except OSError as exc:
            raise DataDirError(f"cannot tighten the permissions in {self.data_dir}: {exc}") from exc

    def _release_lock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None and self._owns_lock:
            lock.release()

    def _open_files(self, created: bool) -> None:
        self._refuse_interrupted_restore()
        self._refuse_lost_main_db()
        pre_shm = hwm.read_shm(self.path)  # before SQLite rebuilds it (evidence of a recent checkpoint)
        wal_existed = os.path.exists(self.path + "-wal")
        for name in (layout.MAIN_DB, layout.CHUNKS_DB):
            p = os.path.join(self.data_dir, name)
            if not os.path.exists(p):
                fsio.close(fsio.open(p, os.O_CREAT | os.O_WRONLY, 0o600))
                created = True
        if created and self.fsync is not FsyncMode.OFF:
            # The entries of raft.db and chunks.db: SQLite syncs the directory when it creates a WAL or a
            # journal, never for a database file that already exists (created here). Without this sync a
            # power cut after creation can lose raft.db while its WAL survives (every mode but OFF, whose
            # promise does not cover power loss; found by the creation power-loss campaign).
            self.sync_dir()
        try:
            lost: list[str | None] = [None]

            def check_wal():  # SQLite has opened the WAL, nothing is written yet (not even a migration)
                lost[0] = hwm.lost_commits(self.path, pre_shm, wal_existed, self._pins.open)

            self._conn = self._open_current(self.path, layout.MAIN_DB, check_wal)
            self.chunks_conn = self._open_current(self.chunks_path, layout.CHUNKS_DB)
            # Before anything is written (a write would overwrite the evidence): committed WAL frames
            # that SQLite would silently ignore after a damaged frame are corruption.
            # The scan is skipped only for a store known to write unsynced commits (NORMAL/OFF: several
            # torn transactions are then legitimate). No settings row: the first open's commit (which
            # writes it, and is synced in every mode) is itself in the WAL, maybe damaged: scan.
            row = self._conn.execute("SELECT value FROM settings WHERE key='fsync_mode'").fetchone()
            if row is None or row[0] in (FsyncMode.FULL.value, FsyncMode.EXTRA.value):
                from .validate import wal_lost_commits
                self._wal_problems = [m for m in (wal_lost_commits(self.path, self._pins.open),
                                                  wal_lost_commits(self.chunks_path, self._pins.open)) if m]
            if lost[0] and not self._wal_problems:
                self._wal_problems.append(lost[0])
        except apsw.Error as exc:
            raise self._translate(exc, "open") from exc

    def _refuse_interrupted_restore(self) -> None:
        """A data_dir holding what an interrupted ``restore()`` left (its placeholder ``raft.db``, or only its
        temporary names) is refused under every policy with a message that says what to do: opening it
        would create a brand-new node with this node's identity, one that forgot the terms and votes the
        operator meant to restore (a double vote waiting to happen). The data_dir lock is held here, so no
        restore is running."""
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(layout.RESTORE_PLACEHOLDER))
        except (FileNotFoundError, IsADirectoryError):
            head = b""
        except OSError as exc:
            raise StorageFault(f"{self.path}: cannot read ({exc.strerror or exc})") from exc
        leftovers = sorted(n for n in os.listdir(self.data_dir) if re.match(layout.RESTORE_TEMP_PATTERN, n))
        if leftovers and head.startswith(b"SQLite format 3\0"):
            # raft.db is a real database: a restore's last step (raft.db replacing its placeholder) was done,
            # so these are stale temporaries, not an interrupted restore; never refuse a healthy store for them
            log.warning("%s: ignoring leftovers of a restore that completed: %s", self.data_dir, ", ".join(leftovers))
            leftovers = []
        if head == layout.RESTORE_PLACEHOLDER or leftovers:
            what = "its placeholder raft.db" if head == layout.RESTORE_PLACEHOLDER else ", ".join(leftovers)
            raise CorruptionError(
                f"{self.data_dir} holds an interrupted restore ({what}): run the restore again into the same "
                "data_dir (it removes these leftovers and completes), or move the data_dir away to start afresh")

    def _refuse_lost_main_db(self) -> None:
        """A missing or empty ``raft.db`` beside evidence that this data_dir held a store (a WAL high-water
        mark, or a ``chunks.db`` the migrations have run on: they run on raft.db first) is refused under
        every recovery policy: opening it would create a brand-new node that forgot its terms, votes and
        log. Restore from a backup, or move the data_dir away to start afresh."""
        try:
            size = os.path.getsize(self.path)
        except FileNotFoundError:
            size = None
        if size:
            return
        evidence = []
        if hwm.read_mark(self.path) is not None:
            evidence.append(f"{self.path}-hwm (its WAL high-water mark)")
        if os.path.exists(self.chunks_path):
            with contextlib.suppress(apsw.Error):
                c = apsw.Connection(self.chunks_path, flags=apsw.SQLITE_OPEN_READONLY, vfs=self.vfs)
                try:
                    if c.execute("SELECT 1 FROM sqlite_master WHERE name='alembic_version'").fetchone():
                        evidence.append(f"{self.chunks_path} (its migrated snapshot chunk database)")
                finally:
                    c.close()
        if evidence:
            raise CorruptionError(
                f"{self.path} is {'missing' if size is None else 'empty (0 bytes)'}, but "
                f"{' and '.join(evidence)} show(s) that {self.data_dir} held a store: refusing to create a new "
                "one in its place under any recovery policy (restore from a backup, or move the data_dir away)")

    def _start_hwm(self) -> None:
        """After a successful open: re-anchor the WAL high-water mark (FULL/EXTRA/NORMAL) to the state just
        validated, or remove it (OFF keeps none: its commits are never synced, so a mark would be stale)."""
        try:
            if self.fsync is FsyncMode.OFF:
                with contextlib.suppress(FileNotFoundError):
                    fsio.unlink(self.path + "-hwm")
                return
            self._hwm = hwm.HighWaterMark(self.path)
            self._hwm.anchor()
        except OSError as exc:
            self._fault = exc
            raise StorageFault(f"{self.path}-hwm: cannot record the WAL high-water mark ({exc})") from exc

    def _open_current(self, path: str, db_name: str, check=None) -> apsw.Connection:
        """An apsw connection on ``path`` with the schema at head (alembic runs only if it is not).
        ``check()`` runs once SQLite has opened the file, before a migration could write to it."""
        conn = self._connect(path)
        try:
            if check is not None:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchall()  # SQLite reads the WAL index
                check()
            current = not migrate.needs_upgrade(conn, db_name)
            fresh = not current and migrate.current_revision(conn) is None
        except BaseException as exc:
            conn.close()
            if isinstance(exc, apsw.Error):
                raise self._translate(exc, f"open of {db_name}") from exc
            raise
        if current:
            return conn
        conn.close()  # never let pysqlite (alembic) and apsw hold the same file open at once
        if fresh:  # creation: through apsw and self.vfs only, so that it is inside the fault models
            try:
                # chunks.db: big pages for big blobs (16x fewer WAL frames, page headers and checksums per MiB)
                migrate.create(path, db_name, self.vfs,
                               layout.CHUNKS_PAGE_SIZE if db_name == layout.CHUNKS_DB else None)
            except apsw.Error as exc:
                raise self._translate(exc, f"creation of {db_name}") from exc
            return self._connect(path)
        migrate.upgrade(path, db_name)
        if db_name == layout.MAIN_DB:
            # pysqlite checkpointed everything and removed the WAL: the mark describes a WAL that is gone
            # (nothing is lost); the open re-anchors it once it succeeds
            with contextlib.suppress(FileNotFoundError):
                fsio.unlink(path + "-hwm")
        return self._connect(path)

    def sync_dir(self) -> None:
        """fsync ``data_dir`` itself, so that names created, renamed or removed in it survive a power cut
        (EXTRA mode does this after creating, renaming or removing files). Raises :class:`StorageFault`
        (and the store fail-stops) if the sync fails."""
        try:
            fsio.sync_dir(self.data_dir)
        except OSError as exc:
            self._fault = exc
            raise StorageFault(f"{self.data_dir}: directory sync failed ({exc})") from exc

    def _sync_new_store_dirs(self) -> None:
        """Before the node record of a new store commits: fsync data_dir and every ancestor directory, so that
        the entries of raft.db, chunks.db, data_dir itself and any parent ``makedirs`` created survive a
        power cut (every mode but OFF). Without them a power cut could lose data_dir with every write
        acknowledged since, in every mode (found by the creation power-loss campaign: the syncs of the
        files inside do not make the directory's own entry durable). Keyed on "no node record yet", not on
        "this call created the directory": a first open that died after ``makedirs`` leaves a directory a
        retry did not create, and the retry must sync it all the same (found by an independent review,
        reproduced with the fault model). An ancestor this process may not read (EACCES) is skipped with
        a warning."""
        self.sync_dir()
        d = os.path.abspath(self.data_dir)
        while os.path.dirname(d) != d:
            d = os.path.dirname(d)
            try:
                fsio.sync_dir(d)
            except PermissionError as exc:
                log.warning("%s: cannot fsync ancestor directory %s (%s): its entry may not survive a power cut",
                            self.data_dir, d, exc)
            except OSError as exc:
                self._fault = exc
                raise StorageFault(f"{d}: directory sync failed while creating {self.data_dir} ({exc})") from exc

    def _recover(self) -> None:
        report = RecoveryReport(policy=self.recovery_policy.value)
        self.recovery_report = report
        c = self._conn
        now = time.time()
        row = c.execute("SELECT node_id, cluster_id, format_version, created_at, crc32 FROM node").fetchone()
        new_node = row is None
        if new_node and hwm.read_mark(self.path) is not None:
            # The mark is first written after the node record is committed, so a mark beside a raft.db without
            # one means the record is lost (a lost WAL that held it, or raft.db replaced by a copy taken before
            # it was checkpointed): creating a node here would forget the old one's terms, votes and groups,
            # and no group could be marked recovered_partially, so not even PARTIAL may open it.
            why = self._wal_problems[0] + "; it held the node record too" if self._wal_problems else \
                f"{self.path} holds no node record"
            raise CorruptionError(
                f"{why}, but {self.path}-hwm (its WAL high-water mark) shows that {self.data_dir} held a store: "
                "refusing to create a new node in its place under any recovery policy (restore from a backup, "
                "or move the data_dir away)")
        c.execute("BEGIN IMMEDIATE")
        try:
            if new_node:
                if self.fsync is not FsyncMode.OFF:
                    self._sync_new_store_dirs()
                c.execute("INSERT INTO node(id, node_id, cluster_id, format_version, created_at, crc32) "
                          "VALUES (1,?,?,?,?,?)", (self.node_id, self.cluster_id, layout.FORMAT_VERSION, now,
                                                    node_crc(self.node_id, self.cluster_id, layout.FORMAT_VERSION,
                                                             now)))
                report.outcome = "created"
            else:
                nid, cid, fmt, created_at, crc = row
                if node_crc(nid, cid, fmt, created_at) != crc:
                    raise CorruptionError(f"{self.path}: node record fails its CRC check")
                if fmt > layout.FORMAT_VERSION:
                    raise NodeIdentityMismatch(f"{self.path}: data format {fmt} is newer than this raft_sqlite "
                                               f"supports ({layout.FORMAT_VERSION})")
                if nid != self.node_id or cid != self.cluster_id:
                    raise NodeIdentityMismatch(
                        f"{self.data_dir} belongs to node {nid!r} of cluster {cid!r}, not node {self.node_id!r} "
                        f"of cluster {self.cluster_id!r}")
            settings = {"fsync_mode": self.fsync.value, "fsync_interval": str(self.fsync_interval),
                        "recovery_policy": self.recovery_policy.value,
                        **{f"pragma.{k}": v for k, v in pragmas_for(self.fsync).items()}}
            c.executemany("INSERT OR REPLACE INTO settings(key, value) VALUES (?,?)", list(settings.items()))
            from . import validate
            validate.recover_sql_objects(self, c, report)
            validate.recover_groups(self, c, report)
            report.duration = time.monotonic() - report.started
            c.execute("INSERT INTO recovery_events(at, kind, policy, outcome, duration, details) "
                      "VALUES (?,?,?,?,?,?)", (now, "open", report.policy, report.outcome, report.duration,
                                               report.to_json()))
            c.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(apsw.Error):
                c.execute("ROLLBACK")
            if isinstance(exc, apsw.Error):
                raise self._translate(exc, "open") from exc
            raise
        log.info("%s: %s", self.data_dir, report.summary())
        for d in report.dropped:
            log.warning("%s: dropped %s", self.data_dir, d)
        for d in report.repaired:
            log.warning("%s: repaired %s", self.data_dir, d)
        if FSYNC_MODES[self.fsync]["dir_sync"]:
            self.sync_dir()  # the WAL file now exists
        if self.fsync in (FsyncMode.NORMAL, FsyncMode.OFF):
            # The settings row now names this mode: make it durable before any unsynced commit, so that
            # after a power cut recovery knows the WAL tail was written without syncs (several torn
            # transactions are then expected, not committed data lost).
            try:
                fsio.fdatasync_path(self.path + "-wal")
            except OSError as exc:
                self._fault = exc
                raise StorageFault(f"{self.data_dir}: WAL sync failed while opening ({exc})") from exc

    def _reclaim_orphan_space(self) -> None:
        """After a recovery that dropped an orphan (partial) snapshot, or when the disk reserve is
        missing: checkpoint chunks.db and truncate its WAL, so the disk space the partial snapshot's
        frames took is given back to the file system (a WAL is otherwise reused, never shrunk). Best
        effort: a checkpoint that fails (the disk is still full) leaves the WAL intact and is retried
        at the next open."""
        dropped = any(d.get("what") == "orphan snapshot" for d in self.recovery_report.dropped)
        if not dropped and os.path.exists(reserve.reserve_path(self.data_dir)):
            return
        with self.chunks_lock:
            try:
                c = self.chunks_conn
                # A checkpoint grows chunks.db to the size of its newest committed version. Pages of
                # committed batches of a dropped snapshot are free pages of that version (no
                # auto_vacuum): they stay as room for the next snapshot. A checkpoint that cannot finish
                # would only fill what is left of the disk with them, so it is not started then.
                need = c.execute("PRAGMA page_count").fetchone()[0] * c.execute("PRAGMA page_size").fetchone()[0] \
                    - os.path.getsize(self.chunks_path)
                if need > reserve.free_bytes(self.data_dir) - (64 << 10):
                    log.warning("%s: not enough free disk space (%d bytes needed) to give the space of dropped "
                                "snapshot data back yet", self.chunks_path, need)
                    # nor at close (SQLite's checkpoint-on-close would do just that); the next open retries
                    c.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
                    return
                c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except (apsw.Error, OSError) as exc:
                log.warning("%s: could not give the space of dropped snapshot data back yet (%s)",
                            self.chunks_path, exc)

    def close(self) -> None:
        """Stop background work, close every connection, then release the data_dir lock. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._syncer is not None:
            self._syncer.stop()
        while self._queue:  # let the current leader finish its commit
            time.sleep(0.001)
        self._close_connections()
        self._release_lock()  # only once every connection is closed

    def _close_connections(self, failed_open: bool = False):
        # After a storage fault, never let SQLite checkpoint on close: that writes the database and
        # fsyncs the WAL again, and a retried fsync can report success for data the kernel dropped
        # when the first one failed (fail-stop: no I/O at all until the store is reopened). After a
        # refused open neither: the checkpoint would copy only SQLite's valid WAL prefix into raft.db and
        # reset the WAL, destroying the frames past a damaged one that an operator could still salvage.
        faulted = self._fault is not None or failed_open
        for c in self._all_readers + [self._conn, self.chunks_conn]:
            if c is not None:
                if faulted:
                    with contextlib.suppress(apsw.Error):
                        c.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
                with contextlib.suppress(apsw.Error):
                    c.close()
        self._all_readers.clear()
        self._readers.clear()
        if self._hwm is not None:
            if not faulted:
                # the last close checkpointed the WAL (unless a reader elsewhere held it back): record
                # "checkpointed" so that an emptied WAL (e.g. by a TRUNCATE checkpoint) is known harmless
                try:
                    self._hwm.note()
                except OSError as exc:
                    log.warning("%s: could not record the WAL high-water mark at close: %s", self.data_dir, exc)
            self._hwm.close()
            self._hwm = None
        self._pins.close()  # only now: SQLite has closed the files

    def __enter__(self) -> "NodeStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ groups and views
    def groups(self) -> list[str]:
        """Names of the groups this node hosts."""
        return sorted(self._groups)

    def _ensure_group(self, group) -> str:
        name = group if isinstance(group, str) else None
        if name is None:
            if isinstance(group, int) and not isinstance(group, bool):
                name = str(int(group))
            else:
                raise TypeError(f"group must be a str (or int), not {type(group).__name__}")
        if name in self._groups:
            return name
        if not name:
            raise ValueError("a group name must not be empty")
        text_arg("group name", name)
        self._check_open()
        req = _Request([(name, None, None)])
        self._submit(req)
        return name

    def log(self, group="default") -> PersistentRaftLog:
        """The :class:`PersistentRaftLog` of ``group`` (created on first use)."""
        return self._view("log", group, PersistentRaftLog)

    def metadata(self, group="default") -> RaftMetadataStore:
        """The :class:`RaftMetadataStore` of ``group`` (created on first use)."""
        return self._view("meta", group, RaftMetadataStore)

    def snapshots(self, group="default"):
        """The :class:`~raft_sqlite.snapshot.SnapshotManager` of ``group``."""
        from .snapshot import SnapshotManager
        return self._view("snap", group, SnapshotManager)

    def state_machine(self, group="default"):
        """The :class:`~raft_sqlite.statemachine.StateMachineSnapshotManager` of ``group``."""
        from .statemachine import StateMachineSnapshotManager
        return self._view("sm", group, StateMachineSnapshotManager)

    def _view(self, kind, group, factory):
        name = self._ensure_group(group)
        v = self._views.get((kind, name))
        if v is None:
            v = self._views.setdefault((kind, name), factory(self, name))
        return v

    # ------------------------------------------------------------------ write path
    def _check_open(self):
        if self._closed:
            raise RaftSqliteError("the store is closed")
        if self._fault is not None:
            raise StorageFault(f"{self.data_dir}: the store is fail-stopped after a storage fault "
                               f"({self._fault}); close and reopen it, then reload state from what it shows")

    @contextlib.contextmanager
    def transaction(self):
        """Group writes (log and metadata, any groups) into one atomic commit with one fsync.

        Inside the block, write calls validate at once against the state the transaction has built
        (a bad call raises and is not added) and return as usual, but nothing is durable until the
        block exits; if the block raises, nothing is written. Reads inside the block see the last
        *committed* state. Transactions do not nest.
        """
        if getattr(self._tx, "tx", None) is not None:
            raise RaftSqliteError("store.transaction() does not nest")
        self._check_open()
        tx = _Tx(self)
        self._tx.tx = tx
        try:
            yield tx
        except BaseException:
            self._tx.tx = None
            raise
        self._tx.tx = None
        if tx.ops:
            self._submit(_Request(tx.ops))

    def _pending_group(self, name: str) -> _Group:
        tx = getattr(self._tx, "tx", None)
        return tx.group(name) if tx is not None else self._groups[name]

    def _run(self, name: str, check, write):
        """Run one write op (validate with ``check(g)``, then ``write(conn, g, check_result)``)."""
        tx = getattr(self._tx, "tx", None)
        if tx is not None:
            return tx.add(name, check, write)
        self._check_open()
        req = _Request([(name, check, write)])
        self._submit(req)
        return req.result[0]

    def _submit(self, req: _Request) -> None:
        """Group commit (a writer queue, as in LevelDB): the writer at the front of the queue leads; it
        takes every request queued at that moment, applies them in one transaction, commits once (one
        fsync), then wakes each follower individually and hands leadership to the new front."""
        q = self._queue
        with self._mu:
            lead = not q
            if not lead:
                req.wake = _allocate_lock()
                req.wake.acquire()
            q.append(req)
        interrupt = None
        if not lead:
            while True:  # released when our request is done, or when we are the new front
                try:
                    req.wake.acquire()
                    break
                except BaseException as exc:
                    # An interrupt must not abandon a queued request: the leader would hand the front to
                    # it and every later writer would wait forever. Finish the protocol, then re-raise.
                    interrupt = interrupt or exc
            if req.done:
                if interrupt is not None:
                    raise interrupt
                if req.error is not None:
                    raise req.error
                return
        batch = None
        try:
            target = self._last_batch
            if len(q) < target:
                # Group-commit wait (cf. PostgreSQL's commit_delay/commit_siblings): the previous batch had
                # more writers than are queued now, and they are most likely just being woken; yield the
                # GIL for at most a fraction of one commit's time so that they join this commit.
                deadline = time.perf_counter() + min(0.25 * self._commit_ema, 0.0004)
                while len(q) < target and time.perf_counter() < deadline:
                    time.sleep(0)
            with self._mu:
                batch = list(q)
            self._last_batch = len(batch)
            self._execute(batch)
        finally:
            # whatever happened (even an exception in this thread), the queue moves on: every request
            # of the batch is answered and leadership passes to the next writer
            with self._mu:
                if batch is None:  # interrupted before taking a batch: nothing ran; leave the queue
                    q.popleft()
                    batch = [req]
                else:
                    for _ in batch:
                        q.popleft()
                nxt = q[0] if q else None
            for r in batch:
                if r.result is None and r.error is None and not r.done:
                    r.error = RaftSqliteError("the committing thread was interrupted before this write ran; "
                                              "nothing of it was written")
                if r is not req:
                    r.done = True
                    r.wake.release()
            if nxt is not None:
                nxt.wake.release()
        if interrupt is not None:
            raise interrupt
        if req.error is not None:
            raise req.error

    def _execute(self, batch: list[_Request]) -> None:
        """Leader: apply every request of ``batch`` in one transaction, commit (one fsync), publish.

        Checks run first and write nothing when they refuse. Append rows are not inserted one request at
        a time: they are collected and inserted with one ``executemany`` at commit (or before any other
        statement), and a lone single-row append runs as one autocommit statement. A request that fails
        (with ANY exception) after some of its SQL ran makes the leader roll back and replay the batch
        without it; one that fails before any of its SQL ran is dropped alone. If the batch fails outside
        any one request (the final insert of deferred rows), it is rolled back and replayed once with
        every request's rows inserted at once, so that the failure is pinned on its request.

        Fail-stop: when the outcome is unknown (a storage error, any exception during COMMIT or after
        it, a rollback that did not end the transaction), :attr:`fault` is set, every request of the
        batch gets :class:`StorageFault`, and every later write is refused until the store is
        reopened. A ``KeyboardInterrupt``/``SystemExit`` is re-raised in the leader after that.
        """
        conn = self._conn
        if self._fault is not None or self._closed:
            for r in batch:
                r.error = StorageFault(f"{self.data_dir}: the store is fail-stopped after a storage fault "
                                       f"({self._fault}); reopen it") if not self._closed else \
                    RaftSqliteError("the store is closed")
                r.done = True
            return
        t0 = time.perf_counter()
        live = [r for r in batch if not r.done]
        state = {"eager": False, "committing": False, "autocommit": False}
        try:
            while True:
                try:
                    work = self._apply(conn, live, state)
                    break
                except _Replay as rep:
                    if not self._rollback(conn):
                        raise _Unknown(rep.error) from rep.error
                    exc = rep.error
                    rep.req.error = self._translate(exc, "write") if isinstance(exc, apsw.Error) else exc
                    rep.req.done = True
                    live = [r for r in live if r is not rep.req]
                except _FAULT_ERRORS:
                    raise
                except BaseException as exc:
                    # Outside any one request (the final insert of deferred rows, COMMIT), or an interrupt.
                    # Known outcome only before COMMIT (for an interrupt: before the lone autocommit insert
                    # too, which may have committed) and once rolled back; otherwise fail-stop.
                    interrupt = not isinstance(exc, Exception)
                    if state["committing"] or (interrupt and state["autocommit"]) or not self._rollback(conn):
                        raise
                    if interrupt:  # nothing of the batch was written: answer everyone, re-raise in the leader
                        for r in live:
                            if not r.done:
                                r.error = RaftSqliteError(f"the committing thread was interrupted "
                                                          f"({type(exc).__name__}) before this write committed; "
                                                          "nothing of it was written")
                                r.done = True
                        raise _Interrupted(exc) from exc
                    if state["eager"]:
                        raise  # the eager replay failed too
                    state["eager"] = True  # replay, inserting each request's rows with the request
                    log.warning("%s: batch failed outside any request (%s: %s); replaying it", self.data_dir,
                                type(exc).__name__, exc)
            self._groups.update(work)
        except _Interrupted as exc:
            raise exc.error from None  # the batch was rolled back and answered: the store stays usable
        except BaseException as exc:
            cause = exc.error if isinstance(exc, _Unknown) else exc
            self._fail_stop(conn, batch, cause)
            if not isinstance(cause, Exception):
                raise cause from None
            return
        finally:
            self._wal.before_sql = None
        if self._hwm is not None and self._syncer is None:
            try:
                self._hwm.note()  # the commit's WAL sync returned: record it as durable
            except OSError as exc:  # the commit is durable; the mark (and its sync) failed: fail-stop
                self._fault = exc
                log.error("%s: writing the WAL high-water mark failed, store is now fail-stop: %s",
                          self.data_dir, exc)
        dt = time.perf_counter() - t0
        self._commit_ema = 0.9 * self._commit_ema + 0.1 * dt
        st = self.stats
        st.commits += 1
        st.requests += len(batch)
        st.commit_seconds += dt
        if len(batch) > st.max_batch:
            st.max_batch = len(batch)
        if self._syncer is not None:
            self._syncer.dirty = True
        for r in batch:
            r.done = True
        if dt > self.slow_commit_warning:
            log.warning("%s: slow commit: %.3f s for %d requests", self.data_dir, dt, len(batch))
        if self.on_commit is not None:
            try:
                self.on_commit(dt, len(batch))
            except Exception:  # a metrics callback must never turn a durable write into an error
                log.exception("%s: on_commit callback failed", self.data_dir)

    def _rollback(self, conn) -> bool:
        """Roll back the write connection's open transaction, if any. True when no transaction is open
        afterwards (the outcome of the batch is then known: nothing of it was written)."""
        try:
            if not conn.getautocommit():
                conn.execute("ROLLBACK")
            return bool(conn.getautocommit())
        except BaseException:
            with contextlib.suppress(BaseException):
                return bool(conn.getautocommit())
            return False

    def _fail_stop(self, conn, batch: list[_Request], exc: BaseException) -> None:
        """The outcome of ``batch`` is unknown: make the store fail-stop (as after a failed fsync)."""
        self._fault = exc
        self._rollback(conn)  # best effort; the store writes nothing more until reopened anyway
        if isinstance(exc, apsw.Error):
            err = self._translate(exc, "commit")
            if not isinstance(err, StorageFault):
                err = StorageFault(f"{self.data_dir}: {err}; the outcome of the write is unknown until the store is "
                                   "reopened")
        else:
            err = StorageFault(f"{self.data_dir}: unexpected {type(exc).__name__} on the write path ({exc}); the "
                               "outcome of the write is unknown until the store is reopened")
        err.__cause__ = exc
        log.error("%s: write failed with an unknown outcome, store is now fail-stop: %s: %s", self.data_dir,
                  type(exc).__name__, exc)
        for r in batch:
            if not r.done or r.error is None:
                r.error = err
            r.done = True

    def _apply(self, conn, batch: list[_Request], state: dict) -> dict:
        """Run the requests of ``batch`` and commit; returns the group states to publish. Raises
        :class:`_Replay` when one request must be dropped after SQL ran for it. With
        ``state["eager"]`` every request's deferred rows are inserted at the end of the request;
        ``state["committing"]`` is set once COMMIT is issued (from then on the outcome is unknown if
        anything fails), ``state["autocommit"]`` once the lone autocommit insert is issued (an interrupt
        from then on leaves the outcome unknown)."""
        wal = self._wal
        rows = wal.pending
        rows.clear()
        tx = [False, 0]  # [BEGIN issued, number of times SQL was started]
        eager = state["eager"]

        def sql():
            if not tx[0]:
                conn.execute("BEGIN IMMEDIATE")
                tx[0] = True
            tx[1] += 1
            if rows:
                if eager:  # the pending rows are the current request's own
                    wal.flush(conn)
                    return
                try:  # rows of earlier requests too: a failure cannot be pinned on the current one
                    wal.flush(conn)
                except _FAULT_ERRORS:
                    raise
                except Exception as exc:  # (an interrupt is not a failure of the rows: it propagates)
                    raise _BatchFailed(exc) from exc

        wal.before_sql = sql
        work: dict[str, _Group] = {}
        for r in batch:
            r.error = None
            mine: dict[str, _Group] = {}
            results = []
            mark, touched = len(rows), tx[1]
            try:
                for name, check, write in r.ops:
                    if name is None:  # a raw op on the write connection (no group)
                        sql()
                        results.append(write(conn, None, None))
                        continue
                    g = mine.get(name)
                    if g is None:
                        base = work.get(name) or self._groups.get(name)
                        if base is None:
                            sql()
                            base = self._create_group(conn, name)
                        g = mine[name] = base.copy()
                    if check is None:
                        results.append(None)
                        continue
                    res = check(g)
                    if not getattr(write, "deferred", False):
                        sql()
                    write(conn, g, res)
                    results.append(res)
                if eager and len(rows) > mark:
                    sql()
            except _FAULT_ERRORS + (_BatchFailed,):
                raise  # the disk failed (fail-stop), or the batch's deferred rows (replayed eagerly)
            except Exception as exc:  # any other error: this request alone fails (an interrupt is the
                # leader's, not the request's: it propagates and the whole batch is rolled back)
                if tx[1] != touched:
                    raise _Replay(r, exc) from exc
                del rows[mark:]  # only deferred rows of this request: drop them
                r.error = exc
                continue
            r.result = results
            work.update(mine)
        if tx[0]:
            wal.flush(conn)
            state["committing"] = True
            conn.execute("COMMIT")
        elif len(rows) == 1:
            # one autocommit statement: its own durable transaction. An error raised by it wrote nothing,
            # but an interrupt may arrive just after it committed: then the outcome is unknown
            state["autocommit"] = True
            conn.execute(wal.INSERT, rows[0])
            rows.clear()
        elif rows:
            conn.execute("BEGIN IMMEDIATE")
            wal.flush(conn)
            state["committing"] = True
            conn.execute("COMMIT")
        return work

    def _translate(self, exc: apsw.Error, what: str) -> RaftSqliteError:
        if isinstance(exc, apsw.ConstraintError):
            msg = str(exc)
            if "no durable snapshot" in msg:
                return CompactionError(msg)
            return LogConflictError(f"{what}: constraint failed: {msg}")
        if isinstance(exc, (apsw.CorruptError, apsw.NotADBError)):
            return CorruptionError(f"{self.data_dir}: SQLite reports corruption during {what}: {exc}")
        if not isinstance(exc, _FAULT_ERRORS):  # e.g. TooBigError: SQLite refused this statement, nothing failed
            return RaftSqliteError(f"{self.data_dir}: SQLite refused the {what} ({type(exc).__name__}: {exc})")
        return StorageFault(f"{self.data_dir}: storage fault during {what} ({type(exc).__name__}: {exc}); "
                            "the outcome of the write is unknown until the store is reopened")

    def _create_group(self, conn, name: str) -> _Group:
        conn.execute("INSERT INTO groups(name, created_at) VALUES (?,?)", (name, time.time()))
        gid = conn.last_insert_rowid()
        conn.execute("UPDATE groups SET crc32=? WHERE group_id=?", (group_crc(gid, name, 1, 0, 0, 0), gid))
        conn.execute("INSERT INTO raft_meta(group_id, current_term, voted_for, commit_index, crc32) "
                     "VALUES (?,?,?,?,?)", (gid, 0, None, 0, meta_crc(gid, 0, None, 0)))
        return _Group(gid, name)

    def _write_group(self, conn, g: _Group) -> None:
        """Persist the group row's durable fields (first index, snapshot point, partial flag) with
        their CRC."""
        conn.execute("UPDATE groups SET first_index=?, snapshot_index=?, snapshot_term=?, recovered_partially=?, "
                     "crc32=? WHERE group_id=?",
                     (g.first_index, g.snapshot_index, g.snapshot_term, int(bool(g.recovered_partially)),
                      group_crc(g.gid, g.name, g.first_index, g.snapshot_index, g.snapshot_term,
                                g.recovered_partially), g.gid))

    def _write_meta(self, conn, g: _Group, changed) -> None:
        if changed:
            conn.execute("UPDATE raft_meta SET current_term=?, voted_for=?, commit_index=?, crc32=? WHERE group_id=?",
                         (g.term, g.vote, g.commit, meta_crc(g.gid, g.term, g.vote, g.commit), g.gid))

    def _compact_segments(self, name: str) -> int:
        """Physically delete the sealed segments of ``name`` that lie below ``first_index``, one
        segment per commit so that appends are never stalled for long. Returns records removed."""
        removed = 0
        while True:
            g = self._groups[name]
            segs = self._read(lambda c: self._compactor.removable(c, g.gid, g.first_index - 1))
            if not segs:
                return removed
            box = []

            def write(conn, g, _, seg=segs[0]):
                box.append(self._compactor.remove(conn, g.gid, seg))

            self._run(name, lambda g: None, write)
            removed += box[0] if box else 0

    # ------------------------------------------------------------------ replay (start-up)
    def iter_replay(self, group="default", *, upto: int | None = None, chunk: int = 8192, start: int | None = None):
        """Yield the log entries a state machine must apply at start-up, in index order: those after the
        newest durable snapshot (``snapshot_index + 1``, or ``first_index``; or from ``start``) up to
        ``upto`` (default: the commit index; pass ``log.last_index`` to include uncommitted entries).
        Entries are read ``chunk`` at a time (bounded memory). Their CRCs were verified when the store
        was opened (and entries written since were written by this process), so they are not checked a
        second time. Raises :class:`LogCompactedError` if ``start`` is below ``first_index``."""
        from .log import _KINDS, LogEntry

        name = self._ensure_group(group)
        new, kinds = tuple.__new__, _KINDS
        for rows in self._replay_rows(name, upto, start, chunk):
            for i, t, p, k in rows:
                kind = kinds.get(k)
                if kind is None:
                    raise CorruptionError(f"{self.path}: group {name!r}: log entry {i} has a damaged kind ({k!r})")
                yield new(LogEntry, (i, t, p, kind))

    def _replay_rows(self, name, upto, start, chunk):
        """Rows ``(index, term, payload, kind)`` to replay (see :meth:`iter_replay`), ``chunk`` at a time.
        :meth:`iter_replay` turns them into LogEntry one at a time (a replay of millions of entries must
        not keep batches of new objects alive: the cyclic GC would scan them over and over)."""
        g = self._groups[name]
        hi = g.commit if upto is None else min(int(upto), g.last_index)
        lo = max(g.first_index, g.snapshot_index + 1) if start is None else int(start)
        if lo < g.first_index:
            raise LogCompactedError(f"group {name!r}: replay from {lo} needs compacted entries (first index "
                                    f"{g.first_index})")
        # the index comes from the key (unique, so the count below proves contiguity); a payload that is not
        # a BLOB reads as NULL; CRCs were verified on open and are not checked a second time
        sql = f"SELECT key - ?, term, {BLOB_PAYLOAD}, kind FROM log_entries WHERE key >= ? AND key <= ? ORDER BY key"
        base = g.gid * layout.KEY_SPAN
        while lo <= hi:
            top = min(hi, lo + chunk - 1)
            rows = self._read(lambda c: c.execute(sql, (base, base + lo, base + top)).fetchall())
            if len(rows) != top - lo + 1:
                raise CorruptionError(f"{self.path}: group {name!r}: entries {lo}..{top} are not all present")
            if None in map(_PAYLOAD, rows):
                bad = lo + next(k for k, r in enumerate(rows) if r[2] is None)
                raise CorruptionError(f"{self.path}: group {name!r}: log entry {bad} is not a BLOB")
            yield rows
            lo = top + 1

    def replay(self, group="default", apply=None, *, upto: int | None = None) -> int:
        """Start-up replay for ``group``. If structures are registered with :meth:`state_machine`,
        first load the newest valid snapshot chain into them (``StateMachineSnapshotManager.restore``,
        which falls back to an older chain when the newest is corrupt); then call ``apply(entry)`` for
        every log entry after the restored snapshot up to ``upto`` (default: the commit index), in
        order. Without registered structures, replay starts after the newest durable snapshot (the
        caller loads snapshot bytes itself through :meth:`snapshots`). Returns the index of the last
        entry applied (the snapshot's index when there was nothing to replay). If an older chain had
        to be used and the log no longer holds the entries after it, raises
        :class:`LogCompactedError`."""
        name = self._ensure_group(group)
        sm = self._views.get(("sm", name))
        start = None
        last = self._groups[name].snapshot_index
        if sm is not None and sm.names():
            meta = sm.restore()
            start = (meta.index + 1) if meta is not None else self._groups[name].first_index
            last = meta.index if meta is not None else 0
        for e in self.iter_replay(name, upto=upto, start=start):
            if apply is not None:
                apply(e)
            last = e.index
        return last

    # ------------------------------------------------------------------ read path
    def _read(self, fn):
        """Run ``fn(conn)`` on a pooled read connection (WAL readers never block the writer)."""
        if self._closed:
            raise RaftSqliteError("the store is closed")
        try:
            conn = self._readers.pop()
        except IndexError:
            try:
                conn = self._connect(self.path, query_only=True)
            except apsw.Error as exc:  # e.g. the disk failed: a typed error, like every other read
                raise self._translate(exc, "read") from exc
            self._all_readers.append(conn)
        try:
            return fn(conn)
        except apsw.Error as exc:
            raise self._translate(exc, "read") from exc
        except UnicodeDecodeError as exc:
            raise CorruptionError(f"{self.path}: a text column holds bytes that are not UTF-8 ({exc})") from exc
        finally:
            self._readers.append(conn)

    def pragmas(self) -> dict[str, object]:
        """The pragma values in force on the write connection, read back from SQLite."""
        names = ("journal_mode", "synchronous", "fullfsync", "checkpoint_fullfsync", "wal_autocheckpoint",
                 "journal_size_limit", "cache_size", "page_size")
        return self._raw(lambda conn: {n: conn.execute(f"PRAGMA {n}").fetchone()[0] for n in names})

    def _raw(self, fn):
        """Run ``fn(conn)`` on the write connection inside the committer's next transaction (serialised
        with every write); returns its result."""
        self._check_open()
        req = _Request([(None, None, lambda conn, g, r: fn(conn))])
        self._submit(req)
        return req.result[0]

    @property
    def fault(self) -> BaseException | None:
        """The storage error that made the store fail-stop, or None."""
        return self._fault

    @property
    def restored_from(self) -> dict | None:
        """None unless this data_dir was made by :func:`raft_sqlite.restore`; then the newest restore
        event as a dict: ``kind`` (``"node_replacement"`` | ``"quorum_loss_restore"``), ``at`` (unix time
        of the restore), ``backup_path``, ``backup_created_at`` (the instant the backup describes) and
        ``groups`` {name: {term, voted_for, commit_index, last_index, snapshot_index} at the backup}.
        After a node replacement the node may have voted, after that point, in any term from the
        group's backup ``term`` on: it must not grant votes until it has caught up (see docs/backup.md)."""
        from .backup import read_restore_event
        return self._read(read_restore_event)


class _Tx:
    """The state of one ``store.transaction()`` block."""

    def __init__(self, store: NodeStore):
        self.store = store
        self.ops: list = []
        self.view: dict[str, _Group] = {}

    def group(self, name: str) -> _Group:
        g = self.view.get(name)
        if g is None:
            g = self.view[name] = self.store._groups[name].copy()
        return g

    def add(self, name, check, write):
        g = self.group(name)
        trial = g.copy()
        res = check(trial)
        self.view[name] = trial
        self.ops.append((name, check, write))
        return res


class _IntervalSyncer(threading.Thread):
    """NORMAL mode: fdatasync the WAL every ``fsync_interval`` seconds when there were commits."""

    def __init__(self, store: NodeStore):
        super().__init__(name=f"raft_sqlite-sync-{store.node_id}", daemon=True)
        self.store = store
        self.dirty = False
        self._stop_evt = threading.Event()

    def run(self):
        s = self.store
        wal = s.path + "-wal"
        while not self._stop_evt.wait(s.fsync_interval):
            if self.dirty:
                self.sync(wal)

    def sync(self, wal: str) -> None:
        self.dirty = False
        hw = self.store._hwm
        state = hw.current() if hw is not None else None
        try:
            if not fsio.fdatasync_path(wal):
                return
            self.store.stats.interval_syncs += 1
            if hw is not None:
                hw.note(state)  # everything up to the state read before the sync is durable
        except OSError as exc:  # (also a WAL that cannot even be opened: its unsynced commits may never be durable)
            self.store._fault = exc
            log.error("%s: WAL sync failed, store is now fail-stop: %s", self.store.data_dir, exc)

    def stop(self):
        self._stop_evt.set()
        self.join()
        if self.dirty:
            self.sync(self.store.path + "-wal")

