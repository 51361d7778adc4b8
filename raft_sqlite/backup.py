"""Hot backups of a live store and restore from them.

A backup is a folder ``backup_dir/<node_id>/<UTC timestamp>/`` holding a copy of every database file of
the node (``raft.db``, ``chunks.db``) and ``manifest.json``, written last and atomically. A folder
without a valid manifest is *incomplete* (the backup was interrupted) and is never restored.

Point in time. The copy runs through SQLite's online backup API (``apsw.Connection.backup``) in steps,
from two private read-only connections, one per file, each holding an open *read transaction* for the
whole copy. In WAL mode a read transaction pins one committed snapshot of its file: commits made
meanwhile by the store's write connection go to the WAL and are invisible to it, and the backup never
restarts (it restarts only when the source connection observes a change, which a pinned snapshot
never does). Both read transactions are opened back to back while holding ``store.gc_lock``, so:

* ``raft.db`` is copied exactly as it was at instant T1 (one committed transaction boundary: per
  group a contiguous log prefix consistent with its term/vote/commit metadata);
* ``chunks.db`` is copied as it was at T2 >= T1, and no snapshot chunk was deleted between T1 and T2
  (deleting chunks requires ``gc_lock``). A snapshot's chunks are committed before its manifest is
  committed DURABLE in ``raft.db``, so every DURABLE snapshot in the copied ``raft.db`` finds all its
  chunks in the copied ``chunks.db`` (checked on the copy before the manifest is written). Extra chunks
  (snapshots that became DURABLE after T1, or WRITING leftovers) are orphans that opening the restored
  store ignores or removes.

The cost: while a read transaction is open, checkpoints cannot pass its snapshot, so the store's WAL
grows by whatever is committed during the copy and is reset by the first checkpoint after it.

Restore (:func:`restore`) verifies the whole backup (manifest, names, sizes, sha256) before writing
anything, copies into a fresh ``data_dir``, records a ``node_replacement`` or ``quorum_loss_restore``
event in the restored ``raft.db`` and opens the result with STRICT recovery as a check. See
``docs/backup.md`` for the two restore modes and the double-vote hazard.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, Self, TypedDict, TypeVar, Unpack

import apsw

from . import fsio, layout, objectstore
from .args import float_arg, int_arg
from .errors import BackupCorrupt, BackupError, RaftSqliteError
from .lock import GC_PIN_WAIT, DataDirLock, gc_pin
from .recovery import (  # noqa: F401 (re-exported)
    NODE_REPLACEMENT,
    QUORUM_LOSS_RESTORE,
    RESTORE_EVENT_KINDS,
    RecoveryPolicy,
    read_restore_event,
)
from .restorestate import is_placeholder, read_restore_state
from .status import read_group_status
from .store import NodeStore, node_crc
from .threadprio import Priority, lower_current_thread, priority_arg
from .verify import verify as run_verify
from .version import __version__

log = logging.getLogger("raft_sqlite.backup")

#: The manifest file of a backup folder; written last (temp file, fsync, rename, fsync dir).
MANIFEST = "manifest.json"
#: Version of the manifest layout itself.
MANIFEST_VERSION = 1
#: Database files a backup holds (in copy order) and the only names a manifest may list.
DB_FILES = (layout.MAIN_DB, layout.CHUNKS_DB)
#: Keys a manifest must have (restore refuses a manifest without them).
REQUIRED_KEYS = ("manifest_version", "node_id", "cluster_id", "format_version", "library_version",
                 "created_at", "created_at_unix", "groups", "files")

#: ``settings`` key in raft.db holding the highest backup sequence number this store handed out.
SEQ_SETTING = "backup_seq"

_TS_FORMAT = "%Y%m%dT%H%M%S.%fZ"
_TS_RE = re.compile(r"^\d{8}T\d{6}\.\d{6}Z(-\d+)?$")
_LOCK_NAME = ".backup.lock"
_MAX_MANIFEST_BYTES = 16 << 20
_BUF = 4 << 20

_T = TypeVar("_T")
#: A path argument: a str or an os.PathLike of str.
_Path = str | os.PathLike[str]
#: A manifest, a listing row or an event's details: JSON objects (their values are arbitrary JSON).
_Json = dict[str, Any]

QUORUM_LOSS_EXPLANATION = (
    "a quorum-loss restore re-bootstraps the cluster from this backup: the Raft layer will force a new "
    "membership with this node as its only voter, and every entry committed after the backup point is "
    "lost for good. Run it only when a majority of the group's members is permanently gone; pass "
    "allow_quorum_loss=True (CLI: --quorum-loss) to state that this is the case. If a majority is still "
    "alive, restore without it: that is a node replacement (the node rejoins and catches up)")


@dataclasses.dataclass(frozen=True)
class BackupInfo:
    """A complete backup: ``path`` of its folder and its parsed ``manifest`` (see :data:`REQUIRED_KEYS`);
    ``size`` is the sum of the copied files' sizes, ``duration`` the seconds the backup took."""

    path: str
    manifest: _Json
    size: int = 0
    duration: float = 0.0
    #: seconds per phase: ``copy`` (online backup steps), ``sha256`` and ``fsync`` (run on helper threads,
    #: overlapping the copy of the next file and each other), ``wait`` (for them after the last copy)
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    #: True when ``skip_unchanged`` found nothing new since the newest backup (``path``/``manifest``
    #: are that backup's; nothing was written but the store's record of the check)
    skipped: bool = False


@dataclasses.dataclass(frozen=True)
class RestoreInfo:
    """The outcome of :func:`restore`: the restored ``data_dir``, the ``backup_path`` it came from,
    ``kind`` (``"node_replacement"`` or ``"quorum_loss_restore"``), the backup's ``manifest``, the
    ``event`` details recorded in the restored store, and ``duration`` in seconds."""

    data_dir: str
    backup_path: str
    kind: str
    manifest: _Json
    event: _Json
    duration: float = 0.0


ProgressFn = Callable[[str, int, int], None]


class BackupBusy(BackupError):
    """Another backup or prune of the same node is running (in this or another process)."""


class BackupCancelled(BackupError):
    """The backup was cancelled through its ``cancel`` event (its partial folder was removed)."""


# ---------------------------------------------------------------------------------------------- helpers
def _fsync_file(path: str) -> None:
    """fsync the content of the file ``path`` (through :mod:`raft_sqlite.fsio`)."""
    fd = fsio.open(path, os.O_RDONLY)
    try:
        fsio.fsync(fd)
    finally:
        fsio.close(fd)


def _make_dirs(path: str) -> None:
    """Create the directory ``path`` (0700) and its missing parents durably (:func:`fsio.make_dirs`; the
    syncs go through this module's ``fsio``, which the power-loss campaign's sabotage test replaces)."""
    fsio.make_dirs(path, 0o700, sync=fsio.sync_dir)


def _sha256_file(path: str, progress: ProgressFn | None = None, phase: str = "sha256") -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    total = os.path.getsize(path)
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(_BUF)
            if not b:
                break
            h.update(b)
            n += len(b)
            if progress is not None:
                progress(phase, n, total)
    return n, h.hexdigest()


def _utc_stamp(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime(_TS_FORMAT)


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _folder_names(t: float, n: int) -> Iterator[str]:
    """The ``n`` names a backup started at ``t`` tries, in order: its UTC stamp, then ``stamp-1``, ``-2``..."""
    base = _utc_stamp(t)
    for i in range(n):
        yield base if i == 0 else f"{base}-{i}"


def _stamp_time(name: str) -> float | None:
    if not _TS_RE.match(name):
        return None
    return _dt.datetime.strptime(name.split("-")[0], _TS_FORMAT).replace(tzinfo=_dt.UTC).timestamp()


def _boot_clock() -> tuple[str | None, float]:
    """``(boot_id, seconds)`` of a clock that never jumps while the machine stays up and counts time spent
    suspended (Linux ``CLOCK_BOOTTIME``; its readings compare only within the same ``boot_id``). The
    boot id is None where the kernel does not expose one: readings are then never compared."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip() or None
    except OSError:
        boot_id = None
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    if clock is None:
        return None, time.monotonic()
    return boot_id, time.clock_gettime(clock)


def manifest_seq(manifest: _Json) -> int | None:
    """The backup sequence number of a manifest (``seq``: 1, 2, ... per node in the order the backups
    were taken), or None for a manifest written before raft_sqlite recorded it."""
    seq = manifest.get("seq")
    return seq if type(seq) is int and seq >= 1 else None


def _read_seq(folder: str) -> int | None:
    """``seq`` of the manifest in ``folder`` if it is readable JSON at all (even a backup that fails
    verification took its number), else None."""
    try:
        with open(os.path.join(folder, MANIFEST), "rb") as f:
            m = json.loads(f.read(_MAX_MANIFEST_BYTES).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return manifest_seq(m) if isinstance(m, dict) else None


def _order_key(e: _Json) -> tuple[bool, int, float, str]:
    """Sort key, oldest first, of a listed backup: by ``seq`` (clock-independent); backups without one
    (older manifests) come before every backup with one and are ordered by their timestamp."""
    return (e.get("seq") is not None, e.get("seq") or 0, e["created_at"] or 0.0, e["path"])


def _ages(complete: list[_Json], now: float, boot: tuple[str | None, float]) -> list[float]:
    """Age in seconds of each backup of ``complete`` (newest first, by :func:`_order_key`), measured so
    that a wall-clock change cannot shorten it.

    Walking from now back to the oldest backup, each step (now -> newest, newer -> older) is measured on
    the boot-time clock when both ends were read in the same boot, and only otherwise (across a reboot,
    or a manifest without ``clock``) on the wall clock, where a negative step counts as 0. So setting the
    clock back never makes a backup look younger than a newer one, and a jump forward within a boot does
    not age anything; only across a reboot can a wall-clock jump forward make backups look older.
    """
    ages = []
    ref_clock: _Json
    age, ref_wall, ref_clock = 0.0, now, {"boot_id": boot[0], "seconds": boot[1]}
    for e in complete:
        c = e.get("clock") or {}
        if ref_clock.get("boot_id") is not None and c.get("boot_id") == ref_clock["boot_id"]:
            step = ref_clock["seconds"] - c["seconds"]
        else:
            step = ref_wall - e["created_at"]
        age += max(0.0, step)
        ages.append(age)
        ref_wall, ref_clock = e["created_at"], c
    return ages


def _safe_component(node_id: str) -> str:
    if (not node_id or node_id in (".", "..") or "/" in node_id or "\\" in node_id or "\0" in node_id
            or node_id.startswith(".")):
        raise BackupError(f"node_id {node_id!r} cannot be used as a backup folder name")
    return node_id


def _write_file_atomically(folder: str, name: str, data: bytes) -> None:
    """:func:`fsio.write_file_atomically` (a name of its own here: the restore campaign's sabotage test
    replaces it)."""
    fsio.write_file_atomically(folder, name, data)


def _manifest_bytes(obj: _Json) -> bytes:
    """A manifest as written (and as its sha256 in the store's ``backups`` table is taken)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _write_json_atomically(folder: str, name: str, obj: _Json) -> bytes:
    data = _manifest_bytes(obj)
    _write_file_atomically(folder, name, data)
    return data


# ---------------------------------------------------------------------------------------------- sources
class BackupSource(Protocol):
    """What :class:`HotBackupManager` backs up: an open store in this process (:class:`_StoreSource`) or a
    running node's data_dir read from another process (:class:`LiveSource`)."""

    node_id: str
    cluster_id: str
    data_dir: str
    path: str
    chunks_path: str
    vfs: str | None

    def check_open(self) -> None:
        """Raise if the source can no longer be backed up (a closed store)."""

    def connect(self, path: str) -> apsw.Connection:
        """A read-only connection on ``path`` that never checkpoints (a backup's pinned source)."""

    def gc_pin(self) -> contextlib.AbstractContextManager[object]:
        """Held while both read snapshots are pinned: no snapshot chunk is deleted meanwhile."""

    def translate(self, exc: apsw.Error) -> BaseException:
        """The error a backup raises for an SQLite error of the source."""

    def record(self, write: Callable[[apsw.Connection], None]) -> bool:
        """Run ``write`` in a transaction of the store (recording a backup); False if the source cannot."""

    def read(self, fn: Callable[[apsw.Connection], _T]) -> _T:
        """Run ``fn`` on a read connection of the store."""


class _StoreSource:
    """:class:`BackupSource` of an open :class:`~raft_sqlite.NodeStore` of this process."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.node_id, self.cluster_id = store.node_id, store.cluster_id
        self.data_dir, self.path, self.chunks_path, self.vfs = store.data_dir, store.path, store.chunks_path, store.vfs

    def check_open(self) -> None:
        self.store.kernel.check_open()

    def connect(self, path: str) -> apsw.Connection:
        return self.store.kernel.connect(path, query_only=True)  # type: ignore[no-any-return]

    def gc_pin(self) -> contextlib.AbstractContextManager[object]:
        return self.store.gc_lock  # type: ignore[no-any-return]

    def translate(self, exc: apsw.Error) -> BaseException:
        return self.store.kernel.translate(exc, "backup")  # type: ignore[no-any-return]

    def record(self, write: Callable[[apsw.Connection], None]) -> bool:
        self.store.kernel.raw(write)
        return True

    def read(self, fn: Callable[[apsw.Connection], _T]) -> _T:
        return self.store.kernel.read(fn)  # type: ignore[no-any-return]


class LiveSource:
    """A running node's ``data_dir``, backed up from *another* process without stopping or blocking the
    node (``raft-sqlite backup DATA_DIR DEST`` on a running node; ``HotBackupManager(LiveSource(d), dest)``).

    The copy reads both database files through read-only connections that never checkpoint and never
    delete a WAL (the node owns them), each holding a WAL read transaction for its copy: the node's
    writers are never blocked. The two snapshots are pinned while holding the node's gc pin
    (:func:`raft_sqlite.lock.gc_pin`, an flock the node also takes to delete snapshot chunks), so the
    copied chunks.db holds every chunk the copied raft.db names; that is also checked on the copy, so a
    node that does not honour the pin (an older library, a pin wait that timed out) makes the backup
    fail, never wrong. The backup cannot be recorded in the node's ``backups`` table (the node owns the
    store): it is listed from the backup folder, and its ``seq`` continues the folder's and the store's
    counters."""

    vfs: str | None = None

    def __init__(self, data_dir: _Path) -> None:
        self.data_dir = os.path.abspath(os.fspath(data_dir))
        self.path = os.path.join(self.data_dir, layout.MAIN_DB)
        self.chunks_path = os.path.join(self.data_dir, layout.CHUNKS_DB)
        for p in (self.path, self.chunks_path):
            if not os.path.isfile(p):
                raise BackupError(f"{self.data_dir} is not a node's data_dir: {os.path.basename(p)} is missing")
        row = self.read(lambda c: c.execute("SELECT node_id, cluster_id FROM node").fetchone())
        if row is None:
            raise BackupError(f"{self.path} has no node record")
        self.node_id, self.cluster_id = str(row[0]), str(row[1])

    def check_open(self) -> None:
        return None

    def connect(self, path: str) -> apsw.Connection:
        conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_NOMUTEX)
        try:
            # never checkpoint on close: if the node dies meanwhile, this connection may be the last one,
            # and must not copy or delete the node's WAL behind its high-water mark (see sqlitewal)
            conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
            conn.setbusytimeout(10_000)
            conn.execute("PRAGMA query_only=1").fetchall()
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def gc_pin(self) -> Iterator[object]:
        try:
            with gc_pin(self.data_dir):
                yield self
        except TimeoutError:
            raise BackupBusy(f"{self.data_dir}: the node held its gc pin (deleting snapshot chunks) for more than "
                             f"{GC_PIN_WAIT} s; try again") from None

    def translate(self, exc: apsw.Error) -> BaseException:
        return BackupError(f"backup of the running node in {self.data_dir} failed: SQLite: "
                           f"{type(exc).__name__}: {exc}")

    def record(self, write: Callable[[apsw.Connection], None]) -> bool:
        return False

    def read(self, fn: Callable[[apsw.Connection], _T]) -> _T:
        conn = self.connect(self.path)
        try:
            return fn(conn)
        finally:
            conn.close()


# ---------------------------------------------------------------------------------------------- backup
class HotBackupManager:
    """Point-in-time backups of one open :class:`~raft_sqlite.NodeStore` into ``backup_dir``.

    ``backup()`` writes ``backup_dir/<node_id>/<UTC timestamp>/`` while the store keeps serving (see
    the module docstring for why the copy is one instant); ``prune()`` applies retention; ``list()``
    lists this node's backups. The copy is fdatasync'ed every ``sync_bytes`` copied (default 1 MiB; 0:
    only once at the end, as before): the store's commits sync their WAL on the same disk, and each of
    them would otherwise wait for all the copy's data still in the cache (see README, "Background work
    and the log's tail"). ``pages_per_step`` pages are copied per backup step (default: ``sync_bytes``
    worth of pages of each file) and the copier sleeps ``step_pause`` seconds between steps, leaving the
    disk and the CPU to the store's committer. The copy, checksum and fsync run on worker threads whose
    scheduling priority is lowered by ``nice`` (Linux: per-thread ``setpriority`` to the process's nice value
    plus ``nice``; 0 disables; ``"idle"``: the ``SCHED_IDLE`` class, preempted at once by any normal thread that
    wakes, see :mod:`raft_sqlite.threadprio`), so the node's own threads win the CPU.

    At most one backup of a node runs at a time, across threads and processes (an ``flock`` on
    ``backup_dir/<node_id>/.backup.lock``); a second concurrent ``backup()`` raises :class:`BackupError`
    at once instead of waiting.
    """

    def __init__(self, store: Any, backup_dir: _Path, *,  # store: the lead types this as Kernel
                 pages_per_step: int | None = None, step_pause: float = 0.0005, nice: Priority = 10,
                 sync_bytes: int = 1 << 20, skip_unchanged: bool = False, compression: str = "zstd",
                 storage_options: dict[str, Any] | None = None, max_upload_rate: float | None = None,
                 part_size: int = objectstore.PART_SIZE, stale_after: float = 3600.0,
                 compression_level: int = objectstore.ZSTD_LEVEL) -> None:
        if pages_per_step is not None:
            pages_per_step = int_arg("pages_per_step", pages_per_step, 1, 2**31 - 1)
        self.sync_bytes = int_arg("sync_bytes", sync_bytes, 0, layout.MAX_SIZE)
        step_pause = float_arg("step_pause", step_pause, 0.0, 60.0)
        self.nice = priority_arg("nice", nice)
        if max_upload_rate is not None:
            max_upload_rate = float_arg("max_upload_rate", max_upload_rate, 0.0, 1e15, lo_open=True)
        #: bytes per uploaded part (S3 multipart parts are at least 5 MiB)
        self.part_size = int_arg("part_size", part_size, 5 << 20, 5 << 30)
        #: seconds after which prune treats an unfinished remote upload (no manifest) as dead
        self.stale_after = float_arg("stale_after", stale_after, 0.0, 1e12)
        self.skip_unchanged = bool(skip_unchanged)
        self.compression = objectstore.compression_arg(compression)
        #: zstd level of URL backups (1 = fastest, 19 = smallest; see objectstore.ZSTD_LEVEL)
        self.compression_level = int_arg("compression_level", compression_level, 1, 19)
        self.max_upload_rate = max_upload_rate
        self.store = store
        #: what is backed up: the open store, or a :class:`LiveSource` (a running node's data_dir, read from
        #: this process)
        self.source: BackupSource = store if isinstance(store, LiveSource) else _StoreSource(store)
        node = _safe_component(store.node_id)
        #: the object-store destination when ``backup_dir`` is a URL (see :mod:`raft_sqlite.objectstore`)
        self.remote: objectstore.Remote | None = None
        self.storage_options = storage_options
        if objectstore.is_url(backup_dir):
            self.remote = objectstore.Remote(str(backup_dir), storage_options)
            self.backup_dir = self.remote.url
            self.node_dir = self.remote.path(node)
        else:
            if storage_options is not None:
                raise ValueError("storage_options apply to URL destinations only")
            self.backup_dir = os.path.abspath(os.fspath(backup_dir))
            self.node_dir = os.path.join(self.backup_dir, node)
        self.pages_per_step = pages_per_step
        self.step_pause = step_pause

    # -------------------------------------------------------------- exclusion
    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        try:
            if self.remote is None:
                _make_dirs(self.node_dir)
                lock_path = os.path.join(self.node_dir, _LOCK_NAME)
            else:
                # an object store has no locks: backups of one node to one URL exclude each other on this
                # machine (a scheduler and a cron job); see docs/backup.md for several machines
                key = hashlib.sha256(f"{self.backup_dir}\0{self.store.node_id}".encode()).hexdigest()[:32]
                lock_path = os.path.join(tempfile.gettempdir(), f"raft_sqlite-backup-{os.getuid()}-{key}.lock")
            fd = fsio.open(lock_path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise BackupError(f"cannot create backup folder {self.node_dir}: {exc}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise BackupBusy(f"another backup or prune of node {self.store.node_id!r} is running "
                                      f"in {self.node_dir}") from None
                raise
            yield
        finally:
            with contextlib.suppress(OSError):
                fsio.close(fd)  # releases the flock

    # -------------------------------------------------------------- backup
    def backup(self, *, progress: ProgressFn | None = None, cancel: threading.Event | None = None) -> BackupInfo:
        """Take a point-in-time backup of the store and return its :class:`BackupInfo`.

        Copies ``raft.db`` then ``chunks.db`` through the online backup API into a new folder
        ``backup_dir/<node_id>/<UTC timestamp>/`` (files 0600, folders 0700), checks on the copy that
        every DURABLE snapshot has all its chunks, fsyncs the files, then writes ``manifest.json`` last
        and atomically: node_id, cluster_id, format_version, library_version, created_at (the instant
        the copy describes, ISO 8601 UTC, and ``created_at_unix``), per group term / voted_for /
        commit_index / first_index / last_index / snapshot index and latest snapshot (read from the
        copy itself) and ``files`` ``[{name, size, sha256}]``. Finally records the backup in the
        store's ``backups`` table (a failure there is logged, the backup stays valid).

        ``progress(phase, done_bytes, total_bytes)`` is called as the copy advances (phase is the file
        name; ``"sha256:<file>"`` while checksumming; called from worker threads). Setting ``cancel``
        aborts between steps (:class:`BackupCancelled`); a concurrent backup or prune of the same node
        raises :class:`BackupBusy` at once.
        On any failure (including cancel) the partial folder is removed and :class:`BackupError` (or
        the store's :class:`~raft_sqlite.StorageFault`) is raised; a crash leaves a folder without
        manifest, which is never used and which the next :meth:`prune` removes.
        """
        t0 = time.monotonic()
        self.source.check_open()
        with self._exclusive():
            if self.remote is not None:
                return self._backup_remote(t0, progress, cancel)
            seen = self._highest_seq()
            newest = _newest_fingerprinted(self._scan(verify=False)) if self.skip_unchanged else None
            try:
                folder = self._new_folder()
            except OSError as exc:
                raise BackupError(f"cannot create a backup folder in {self.node_dir}: {exc}") from exc
            try:
                phases = {"copy": 0.0, "sha256": 0.0, "fsync": 0.0, "wait": 0.0}
                copied = self._on_worker(
                    lambda stop: self._copy(folder, progress, (cancel, stop), phases, seen, newest))
            except BaseException as exc:
                with contextlib.suppress(OSError):  # best effort: the disk may be failing (or gone)
                    fsio.rmtree(folder, ignore_errors=True)
                raise self._backup_error(exc, folder) from exc
            if copied is None:  # nothing new since the newest backup
                fsio.rmtree(folder, ignore_errors=True)
                assert newest is not None, "only skipped when there is a newest backup"
                return self._skipped(newest, t0)
            manifest, size = copied
            try:
                fsio.sync_dir(self.node_dir)  # the folder's name: from here on the backup survives power loss
            except OSError as exc:
                raise BackupError(f"backup into {folder} failed: cannot sync {self.node_dir}: {exc}") from exc
        duration = time.monotonic() - t0
        info = BackupInfo(folder, manifest, size, duration, phases)
        self._record(info)
        log.info("%s: backup %s done: %d bytes in %.2f s", self.source.data_dir, folder, size, duration)
        return info

    def _backup_error(self, exc: BaseException, where: str) -> BaseException:
        """What a failed backup raises: our own errors and interrupts as they are, SQLite's translated by
        the store, OS errors as :class:`BackupError`."""
        if isinstance(exc, (RaftSqliteError, KeyboardInterrupt, SystemExit)):
            return exc
        if isinstance(exc, apsw.Error):
            return self.source.translate(exc)
        if isinstance(exc, OSError):
            return BackupError(f"backup into {where} failed: {exc}")
        return exc

    def _skipped(self, newest: tuple[str, _Json], t0: float) -> BackupInfo:
        path, manifest = newest
        info = BackupInfo(path, manifest, 0, time.monotonic() - t0, {}, skipped=True)
        self._record(info, at=time.time())
        log.info("%s: nothing new since backup %s: skipped", self.source.data_dir, path)
        return info

    def _scan(self, *, verify: bool) -> builtins.list[_Json]:
        if self.remote is not None:
            with self.remote.errors(f"cannot list the backups in {self.remote.url_of(self.node_dir)}"):
                return _scan_remote_node(self.remote, self.node_dir, verify=verify)
        return _scan_node_dir(self.node_dir, verify=verify)

    def _on_worker(self, fn: Callable[[threading.Event], _T]) -> _T:
        """Run ``fn(stop_event)`` on a low-priority worker thread and return its result (re-raising its
        error). An interrupt of the caller (KeyboardInterrupt) cancels the worker and waits for it."""
        stop = threading.Event()
        result: builtins.list[_T] = []
        error: builtins.list[BaseException] = []

        def target() -> None:
            lower_current_thread(self.nice)
            try:
                result.append(fn(stop))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                error.append(exc)

        th = threading.Thread(target=target, name=f"raft_sqlite-backup-{self.store.node_id}", daemon=True)
        th.start()
        try:
            th.join()
        except BaseException:
            stop.set()
            th.join()
            raise
        if error:
            raise error[0]
        return result[0]

    def _highest_seq(self) -> int:
        """The highest backup sequence number in this node's backup folder (0 if none); called under the
        backup lock. The next backup takes one above it and above the store's own counter (``settings``
        key :data:`SEQ_SETTING`, read from the copy): the store's counter keeps counting if the folder is
        emptied, the folder's keeps counting after the store was restored from an older backup."""
        seqs = [_read_seq(os.path.join(self.node_dir, n)) for n in os.listdir(self.node_dir) if not n.startswith(".")]
        return max((q for q in seqs if q is not None), default=0)

    def _new_folder(self) -> str:
        for name in _folder_names(time.time(), 1000):
            p = os.path.join(self.node_dir, name)
            try:
                fsio.mkdir(p, 0o700)
            except FileExistsError:
                continue
            os.chmod(p, 0o700)
            return p
        raise BackupError(f"cannot find a free folder name under {self.node_dir}")

    def _pin(self, sources: builtins.list[apsw.Connection]) -> tuple[apsw.Connection, apsw.Connection, float,
                                                                    tuple[str | None, float]]:
        """Open a read-only connection to each file (appended to ``sources``, closed by the caller) and pin
        one committed snapshot of each (a WAL read transaction) while no chunk can be deleted: raft.db at
        T1, chunks.db at T2 >= T1, nothing garbage-collected in between. Returns both connections, the
        wall-clock instant and the boot clock (:func:`_boot_clock`) of the pin."""
        src = self.source
        main_src = src.connect(src.path)
        sources.append(main_src)
        chunks_src = src.connect(src.chunks_path)
        sources.append(chunks_src)
        for conn in sources:  # each page is read once: no cache worth its memory
            conn.execute(f"PRAGMA cache_size=-{objectstore.COPY_CACHE_KIB}").fetchall()
        with src.gc_pin():
            main_src.execute("BEGIN")
            main_src.execute("SELECT count(*) FROM node").fetchall()
            chunks_src.execute("BEGIN")
            chunks_src.execute("SELECT count(*) FROM sqlite_master").fetchall()
            return main_src, chunks_src, time.time(), _boot_clock()

    def _copy(self, folder: str, progress: ProgressFn | None, cancel: tuple[threading.Event | None, ...],
              phases: dict[str, float], seen: int, newest: tuple[str, _Json] | None) -> tuple[_Json, int] | None:
        store = self.store
        sources: list[apsw.Connection] = []
        checks: list[_FileCheck] = []
        try:
            main_src, chunks_src, at, (boot_id, boot_seconds) = self._pin(sources)
            fingerprint = _fingerprint(main_src)
            if newest is not None and newest[1].get("fingerprint") == fingerprint:
                return None
            facts: _Facts | None = None
            chunk_counts: dict[int, int] | None = None
            for name, src in ((layout.MAIN_DB, main_src), (layout.CHUNKS_DB, chunks_src)):
                dest_path = os.path.join(folder, name)
                t = time.perf_counter()
                self._online_copy(src, dest_path, name, progress, cancel)
                src.execute("COMMIT")  # release the snapshot: the store's checkpoints may proceed
                phases["copy"] += time.perf_counter() - t
                dest = apsw.Connection(dest_path, flags=apsw.SQLITE_OPEN_READONLY, vfs=self.source.vfs)
                try:
                    if name == layout.MAIN_DB:
                        facts = _describe(dest)
                        row = dest.execute("SELECT value FROM settings WHERE key=?", (SEQ_SETTING,)).fetchone()
                        if row is not None and str(row[0]).isdigit():
                            seen = max(seen, int(row[0]))
                    else:
                        chunk_counts = dict(dest.execute(
                            "SELECT snapshot_id, count(*) FROM snapshot_chunks GROUP BY snapshot_id"))
                finally:
                    dest.close()
                for extra in (dest_path + "-journal", dest_path + "-wal", dest_path + "-shm"):
                    if os.path.exists(extra):
                        raise BackupError(f"backup copy left {extra} behind")
                # checksum + fsync of this file run on helper threads while the next file is copied
                checks.append(_FileCheck(dest_path, name, progress, self.nice))
            files = []
            t = time.perf_counter()
            for c in checks:
                files.append(c.result())
            phases["sha256"] += max((c.hash_seconds for c in checks), default=0.0)
            phases["fsync"] += max((c.sync_seconds for c in checks), default=0.0)
            phases["wait"] = time.perf_counter() - t
            total = sum(f["size"] for f in files)
        except BaseException:
            for c in checks:  # let the helpers finish before the caller removes the folder
                with contextlib.suppress(BaseException):
                    c.result()
            raise
        finally:
            for conn in sources:
                with contextlib.suppress(apsw.Error):
                    conn.close()
        assert facts is not None and chunk_counts is not None, "both read by the loop above (or it raised)"
        node_id, cluster_id, fmt, groups, durable = facts
        if node_id != store.node_id or cluster_id != store.cluster_id:
            raise BackupError(f"copied raft.db names node {node_id!r}/{cluster_id!r}, not the store's")
        for sid, need in durable:
            have = chunk_counts.get(sid, 0)
            if have < need:
                raise BackupError(f"backup copy is inconsistent: DURABLE snapshot {sid} has {have} of its {need} "
                                  "chunks in the copied chunks.db")
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "node_id": node_id,
            "cluster_id": cluster_id,
            "format_version": fmt,
            "library_version": __version__,
            "created_at": _iso(at),
            "created_at_unix": at,
            "seq": seen + 1,
            "clock": {"boot_id": boot_id, "seconds": boot_seconds},
            "source_data_dir": os.path.abspath(self.source.data_dir),
            "fingerprint": fingerprint,
            "groups": groups,
            "files": files,
        }
        fsio.sync_dir(folder)  # the copies' names, before the manifest that makes them a backup
        _write_json_atomically(folder, MANIFEST, manifest)
        return manifest, total

    # -------------------------------------------------------------- object-store destination
    def _backup_remote(self, t0: float, progress: ProgressFn | None, cancel: threading.Event | None) -> BackupInfo:
        """:meth:`backup` to a URL (called under the backup lock): each file streamed into one compressed
        object (:mod:`raft_sqlite.objectstore`), then the manifest, written last."""
        remote = self.remote
        assert remote is not None, "only called for URL destinations"
        with remote.errors(f"cannot list the backups in {remote.url_of(self.node_dir)}"):
            entries = _scan_remote_node(remote, self.node_dir, verify=False)
        seen = max((e["seq"] for e in entries if e.get("seq") is not None), default=0)
        newest = _newest_fingerprinted(entries) if self.skip_unchanged else None
        names = {e["path"].rsplit("/", 1)[-1] for e in entries}
        name = next(n for n in _folder_names(time.time(), len(names) + 1) if n not in names)
        folder = f"{self.node_dir}/{name}"
        url = remote.url_of(folder)
        phases = {"copy": 0.0, "finish": 0.0}
        try:
            with remote.errors(f"cannot create {url}"):
                remote.make_folder(folder)
            copied = self._on_worker(
                lambda stop: self._copy_remote(folder, progress, (cancel, stop), phases, seen, newest))
        except BaseException as exc:
            with contextlib.suppress(Exception):
                remote.remove(folder)
            raise self._backup_error(exc, url) from exc
        if copied is None:
            with contextlib.suppress(Exception):
                remote.remove(folder)
            assert newest is not None, "only skipped when there is a newest backup"
            return self._skipped(newest, t0)
        manifest, size = copied
        info = BackupInfo(url, manifest, size, time.monotonic() - t0, phases)
        self._record(info)
        stored = sum(f["object_size"] for f in manifest["files"])
        log.info("%s: backup %s done: %d bytes (%d stored) in %.2f s", self.source.data_dir, url, size, stored,
                 info.duration)
        return info

    def _copy_remote(self, folder: str, progress: ProgressFn | None, cancel: tuple[threading.Event | None, ...],
                     phases: dict[str, float], seen: int,
                     newest: tuple[str, _Json] | None) -> tuple[_Json, int] | None:
        remote = self.remote
        assert remote is not None, "only called for URL destinations"
        store = self.store
        sources: list[apsw.Connection] = []
        sinks: list[objectstore.ObjectSink] = []
        suffix = objectstore.COMPRESSIONS[self.compression]
        files: list[_Json] = []
        check_cancel = _cancel_check(cancel)
        try:
            main_src, chunks_src, at, (boot_id, boot_seconds) = self._pin(sources)
            fingerprint = _fingerprint(main_src)
            if newest is not None and newest[1].get("fingerprint") == fingerprint:
                return None
            # what the manifest says, read from the pinned snapshots themselves (what is copied)
            node_id, cluster_id, fmt, groups, durable = _describe(main_src)
            row = main_src.execute("SELECT value FROM settings WHERE key=?", (SEQ_SETTING,)).fetchone()
            if row is not None and str(row[0]).isdigit():
                seen = max(seen, int(row[0]))
            for sid, need in durable:
                have = chunks_src.execute("SELECT count(*) FROM snapshot_chunks WHERE key >= ? AND key < ?",
                                          (sid * layout.CHUNK_SEQ_SPAN, (sid + 1) * layout.CHUNK_SEQ_SPAN)).fetchone()
                if have is None or have[0] < need:
                    raise BackupError(f"backup is inconsistent: DURABLE snapshot {sid} has {have and have[0]} of its "
                                      f"{need} chunks in the pinned chunks.db")
            for name, src in ((layout.MAIN_DB, main_src), (layout.CHUNKS_DB, chunks_src)):
                obj = name + suffix
                t = time.perf_counter()
                sink = objectstore.ObjectSink(remote, f"{folder}/{obj}", compression=self.compression,
                                              level=self.compression_level, part_size=self.part_size,
                                              max_rate=self.max_upload_rate,
                                              check_cancel=check_cancel)
                sinks.append(sink)
                size, page_size = objectstore.stream_online_backup(
                    src, name, sink, pages_per_step=self.pages_per_step, progress=progress, check_cancel=check_cancel)
                src.execute("COMMIT")  # release the snapshot: the store's checkpoints may proceed
                phases["copy"] += time.perf_counter() - t
                t = time.perf_counter()
                stats = sink.finish()
                phases["finish"] += time.perf_counter() - t
                if stats["size"] != size:
                    raise BackupError(f"{name}: {stats['size']} bytes streamed for a {size}-byte file")
                files.append({"name": name, "object": obj, "compression": self.compression,
                              "layout": objectstore.LAYOUT_PAGE1_LAST, "page_size": page_size, **stats})
            # completeness, checked where the backup lives: every object present with the size uploaded
            with remote.errors(f"cannot list {remote.url_of(folder)}"):
                present = {n: sz for n, kind, sz in remote.children(folder) if kind == "file"}
            for f in files:
                have = present.get(f["object"])
                if have != f["object_size"]:
                    what = "missing" if have is None else f"{have} bytes"
                    raise BackupError(f"{remote.url_of(folder)}: {f['object']} is {what} after its upload of "
                                      f"{f['object_size']} bytes")
        except BaseException:
            for sink in sinks:
                sink.abort()
            raise
        finally:
            for conn in sources:
                with contextlib.suppress(apsw.Error):
                    conn.close()
        if node_id != store.node_id or cluster_id != store.cluster_id:
            raise BackupError(f"raft.db names node {node_id!r}/{cluster_id!r}, not the store's")
        manifest = {
            "manifest_version": MANIFEST_VERSION, "node_id": node_id, "cluster_id": cluster_id,
            "format_version": fmt, "library_version": __version__, "created_at": _iso(at), "created_at_unix": at,
            "seq": seen + 1, "clock": {"boot_id": boot_id, "seconds": boot_seconds},
            "source_data_dir": os.path.abspath(self.source.data_dir), "fingerprint": fingerprint, "groups": groups,
            "files": files,
        }
        with remote.errors(f"cannot write the manifest of {remote.url_of(folder)}"):
            remote.write_small(folder, MANIFEST, _manifest_bytes(manifest))
        return manifest, sum(f["size"] for f in files)

    def _online_copy(self, src: apsw.Connection, dest_path: str, name: str, progress: ProgressFn | None,
                     cancel: tuple[threading.Event | None, ...]) -> None:
        fsio.close(fsio.open(dest_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        dest = apsw.Connection(dest_path, vfs=self.source.vfs)
        try:
            # No journal, no syncs while copying: an interrupted copy is an incomplete backup anyway (no
            # manifest), and the finished file gets one fsync.
            dest.execute("PRAGMA synchronous=OFF").fetchall()
            dest.execute("PRAGMA journal_mode=OFF").fetchall()
            dest.execute(f"PRAGMA cache_size=-{objectstore.COPY_CACHE_KIB}").fetchall()
            row = src.execute("PRAGMA page_size").fetchone()
            assert row is not None, "PRAGMA page_size always returns one row"
            page_size = row[0]
            step = self.pages_per_step or max(1, (self.sync_bytes or _DEFAULT_STEP_BYTES) // page_size)
            wfd = fsio.open(dest_path, os.O_RDONLY)
            unsynced = 0
            check_cancel = _cancel_check(cancel)
            try:
                with dest.backup("main", src, "main") as b:
                    # no IoGovernor pacing here (unlike snapshots): the copy holds a read snapshot, so every
                    # pause grows the WAL behind it (measured: a 300 MB backup under a busy log took 18-20 s
                    # instead of 2.7-2.9 s and the WAL reached 345-404 MiB, whose checkpoint then stalled)
                    while not b.done:
                        b.step(step)
                        unsynced += step * page_size
                        if self.sync_bytes and unsynced >= self.sync_bytes:
                            # the copy reaches the disk in pieces of sync_bytes: a commit of the store
                            # never finds more than that ahead of its own fdatasync (see sync_bytes)
                            fsio.fdatasync(wfd)
                            unsynced = 0
                        else:
                            _start_writeback(wfd)
                        if progress is not None:
                            progress(name, (b.pagecount - b.remaining) * page_size, b.pagecount * page_size)
                        check_cancel()
                        if self.step_pause and not b.done:
                            time.sleep(self.step_pause)
            finally:
                fsio.close(wfd)
            # The copied header says WAL (bytes 18/19 = 2); make the copy a self-contained rollback-journal
            # file so it can be read (and hashed) without a -wal/-shm. Opening it as a store turns WAL on.
            dest.execute("PRAGMA journal_mode=DELETE").fetchall()
        finally:
            dest.close()

    def _record(self, info: BackupInfo, at: float | None = None) -> None:
        """Record ``info`` in the store's ``backups`` table (the age metric and ``status`` read it) and raise
        the store's backup counter. ``at`` (a skipped backup: the instant the newest backup was found to
        still describe the store) replaces the backup's own instant."""
        digest = hashlib.sha256(_manifest_bytes(info.manifest)).hexdigest()
        created = info.manifest["created_at_unix"] if at is None else at
        row = (info.path, created, info.size, info.duration, digest)

        seq = info.manifest["seq"]

        def write(conn: apsw.Connection) -> None:
            conn.execute("INSERT INTO backups(path, created_at, size, duration, manifest_sha256) VALUES (?,?,?,?,?)",
                         row)
            old = conn.execute("SELECT value FROM settings WHERE key=?", (SEQ_SETTING,)).fetchone()
            if old is None or not str(old[0]).isdigit() or int(old[0]) < seq:
                conn.execute("INSERT OR REPLACE INTO settings(key, value) VALUES (?,?)", (SEQ_SETTING, str(seq)))
        try:
            if not self.source.record(write):
                log.info("%s: backup %s is complete; the running node owns its store, so the backup is recorded "
                         "only in the backup folder", self.source.data_dir, info.path)
        except RaftSqliteError as exc:
            log.warning("%s: backup %s is complete but could not be recorded in the store: %s",
                        self.source.data_dir, info.path, exc)

    # -------------------------------------------------------------- restore drill
    def drill(self, *, scratch_dir: _Path | None = None, progress: ProgressFn | None = None) -> DrillReport:
        """Run :func:`drill` on this node's newest backup and record the result in the store (``settings``
        key :data:`DRILL_SETTING`, read by the metrics ``raft_sqlite_restore_drill_*``; a live source
        cannot record)."""
        report = drill(self.backup_dir, self.store.node_id, storage_options=self.storage_options,
                       scratch_dir=scratch_dir, progress=progress)
        data = json.dumps(report.to_dict(), sort_keys=True)

        def write(conn: apsw.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO settings(key, value) VALUES (?,?)", (DRILL_SETTING, data))
        try:
            self.source.record(write)
        except RaftSqliteError as exc:
            log.warning("%s: restore drill done but not recorded in the store: %s", self.source.data_dir, exc)
        return report

    # -------------------------------------------------------------- listing and retention
    def list(self, *, verify: bool = False) -> builtins.list[_Json]:
        """This node's backups, newest first (see :func:`list_backups`)."""
        if self.remote is not None:  # through the manager's own file system (its storage_options)
            return [b for b in _listed(self._scan(verify=verify)) if b["node_id"] == self.store.node_id]
        return [b for b in list_backups(self.backup_dir, verify=verify) if b["node_id"] == self.store.node_id]

    def last_backup(self) -> _Json | None:
        """The newest backup recorded in the store's ``backups`` table (the last one recorded, whatever the
        clock said) as ``{path, created_at, age, size, duration}``, or None."""
        row = self.source.read(lambda c: c.execute(
            "SELECT path, created_at, size, duration FROM backups ORDER BY backup_id DESC LIMIT 1").fetchone())
        if row is None:
            return None
        return {"path": row[0], "created_at": row[1], "age": max(0.0, time.time() - row[1]), "size": row[2],
                "duration": row[3]}

    def prune(self, *, keep: int | None = None, max_age: float | None = None) -> builtins.list[str]:
        """Apply retention to this node's backups and return the folders removed.

        Complete backups beyond the ``keep`` newest, and complete backups older than ``max_age``
        seconds, are removed, but the newest complete backup is always kept (retention never leaves a
        node without a backup). "Newest" is by the manifest's ``seq`` (the order the backups were
        taken), never by the wall clock; backups from before ``seq`` existed count as older than every
        backup with one and are ordered by timestamp. Ages are measured as :func:`_ages` says: on the
        kernel's boot-time clock between backups of the same boot, so setting the wall clock back or
        forward neither deletes the newest backup nor ages any backup; only across a reboot does the
        wall clock count (a step back counts as 0). Incomplete folders (no manifest: interrupted backups)
        are always removed locally: prune holds the same lock as :meth:`backup`, so none of them is in
        progress. At a URL (where another machine may be uploading) they are removed once ``stale_after``
        seconds old, and so are the unfinished multipart uploads under the node's prefix (S3), which no
        listing shows and which are billed until aborted; their keys are returned too. Folders whose
        manifest is unreadable (*corrupt*) are left for the operator and logged. A folder's manifest is
        removed first (durably), so a prune killed half-way leaves an incomplete folder, and its big files
        are shrunk in steps before they are unlinked (:func:`fsio.rmtree`), so that the removal does not
        stall the node's commits.
        """
        keep, max_age = _retention_args(keep, max_age)
        removed: builtins.list[str] = []
        remote = self.remote
        with self._exclusive():
            entries = self._scan(verify=False)
            complete = sorted((e for e in entries if e["status"] == "complete"), key=_order_key, reverse=True)
            # locally, the lock proves that no folder is being written; an object store has no lock (another
            # machine may be uploading), so an unfinished upload is removed once it is stale_after old
            doomed = [e for e in entries if e["status"] == "incomplete"
                      and (remote is None or e["age"] >= self.stale_after)]
            ages = _ages(complete, time.time(), _boot_clock())
            for i, e in enumerate(complete):
                if i == 0:
                    continue
                if (keep is not None and i >= keep) or (max_age is not None and ages[i] > max_age):
                    doomed.append(e)
            for e in entries:
                if e["status"] == "corrupt":
                    log.warning("backup %s is corrupt (%s); prune leaves it for the operator", e["path"], e["error"])
            for e in doomed:
                # The manifest goes first (and durably): a prune killed half-way through a folder then
                # leaves an incomplete folder, which the next prune removes, never a backup whose listing
                # says complete (or corrupt, left for the operator) while its files are half gone.
                if remote is None:
                    manifest = os.path.join(e["path"], MANIFEST)
                    if os.path.lexists(manifest):
                        fsio.unlink(manifest)
                        fsio.sync_dir(e["path"])
                    fsio.rmtree(e["path"])
                else:
                    folder = f"{self.node_dir}/{e['path'].rsplit('/', 1)[-1]}"
                    with remote.errors(f"cannot remove {e['path']}"):
                        if e["status"] != "incomplete":
                            remote.remove(f"{folder}/{MANIFEST}")
                        remote.remove(folder)
                removed.append(e["path"])
                log.info("pruned %s backup %s", e["status"], e["path"])
            if remote is None:
                if removed:
                    fsio.sync_dir(self.node_dir)
            else:
                # multipart uploads a killed backup left behind: invisible in listings, but billed
                with remote.errors(f"cannot list the unfinished uploads under {remote.url_of(self.node_dir)}"):
                    for key, upload_id in remote.stale_uploads(self.node_dir + "/", self.stale_after):
                        remote.abort_upload(key, upload_id)
                        removed.append(f"{remote.url_of(key)} (unfinished upload {upload_id})")
                        log.info("aborted the unfinished upload %s of %s", upload_id, remote.url_of(key))
        return removed


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        import ctypes
        import ctypes.util

        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range()
#: Bytes per backup step when neither ``pages_per_step`` nor ``sync_bytes`` says.
_DEFAULT_STEP_BYTES = objectstore.STEP_BYTES


def _start_writeback(fd: int) -> None:
    """Start (not wait for) writeback of the copy's dirty pages (Linux ``sync_file_range(WRITE)``; used
    when ``sync_bytes`` is 0). A no-op where unavailable."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE; errors only mean "not started"


class _FileCheck:
    """sha256 and fsync of one finished copy, each on its own thread (hashlib and fsync release the
    GIL), so that they overlap each other and the copy of the next file."""

    def __init__(self, path: str, name: str, progress: ProgressFn | None, nice: Priority) -> None:
        self.path, self.name, self._nice = path, name, nice
        self.hash_seconds = self.sync_seconds = 0.0
        self._out: dict[str, Any] = {}  # "hash": (size, sha256), "sync": None, or the error either raised
        self._threads = [threading.Thread(target=self._guard, args=(k, fn), daemon=True)
                         for k, fn in (("hash", self._hash), ("sync", self._sync))]
        self._progress = progress
        for th in self._threads:
            th.start()

    def _guard(self, key: str, fn: Callable[[], object]) -> None:
        lower_current_thread(self._nice)
        try:
            self._out[key] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by result()
            self._out[key] = exc

    def _hash(self) -> tuple[int, str]:
        t = time.perf_counter()
        r = _sha256_file(self.path, self._progress, f"sha256:{self.name}")
        self.hash_seconds = time.perf_counter() - t
        return r

    def _sync(self) -> None:
        t = time.perf_counter()
        _fsync_file(self.path)
        self.sync_seconds = time.perf_counter() - t

    def result(self) -> _Json:
        """``{name, size, sha256}`` once both threads are done (re-raises their error)."""
        for th in self._threads:
            th.join()
        for k in ("hash", "sync"):
            if isinstance(self._out.get(k), BaseException):
                raise self._out[k]
        size, digest = self._out["hash"]
        return {"name": self.name, "size": size, "sha256": digest}


#: What :func:`_describe` reads: node_id, cluster_id, format_version, the groups (manifest shape) and
#: (snapshot_id, chunk_count) of every DURABLE snapshot.
_Facts = tuple[str, str, int, list[_Json], list[tuple[int, int]]]


def _fingerprint(conn: apsw.Connection) -> str:
    """sha256 over what changes when a node writes anything a backup holds: the node record, every
    group's row and hard state, every group's last log record (key, term, CRC: an append, a truncation
    and a rewrite change it; compaction changes ``first_index``), every snapshot manifest and the
    settings (the backup counter aside). Two backups with the same fingerprint hold the same Raft
    state: a backup with ``skip_unchanged`` is skipped when the newest one has its fingerprint."""
    span = layout.KEY_SPAN
    queries = (
        "SELECT node_id, cluster_id, format_version, created_at FROM node",
        "SELECT group_id, name, first_index, snapshot_index, snapshot_term, recovered_partially FROM groups "
        "ORDER BY group_id",
        "SELECT group_id, current_term, typeof(voted_for), voted_for, commit_index FROM raft_meta ORDER BY group_id",
        f"SELECT g.group_id, (SELECT key || ' ' || term || ' ' || crc32 FROM log_entries WHERE key BETWEEN "
        f"g.group_id * {span} AND g.group_id * {span} + {span - 1} ORDER BY key DESC LIMIT 1) FROM groups g "
        "ORDER BY g.group_id",
        "SELECT snapshot_id, group_id, idx, term, kind, parent_id, status, size, chunk_count, checksum, structures "
        "FROM snapshots ORDER BY snapshot_id",
        f"SELECT key, value FROM settings WHERE key NOT IN ('{SEQ_SETTING}', '{DRILL_SETTING}') ORDER BY key",
    )
    h = hashlib.sha256()
    for q in queries:
        for row in conn.execute(q):
            h.update(repr(row).encode())
        h.update(b"\0")
    return h.hexdigest()


def _describe(conn: apsw.Connection) -> _Facts:
    """Facts a manifest records, read from a (copied) raft.db."""
    node = conn.execute("SELECT node_id, cluster_id, format_version FROM node").fetchone()
    if node is None:
        # TypeError, as unpacking the missing row raised before: check_backup_data reports it as unreadable
        raise TypeError("raft.db has no node record")
    node_id, cluster_id, fmt = node
    groups: list[_Json] = []
    for g in read_group_status(conn):
        snap = g.newest_snapshot
        groups.append({
            "name": g.name, "group_id": g.group_id, "term": g.current_term, "voted_for": g.voted_for,
            "commit_index": g.commit_index, "first_index": g.first_index, "last_index": g.last_index,
            "snapshot_index": g.snapshot_index, "snapshot_term": g.snapshot_term,
            "latest_snapshot": None if snap is None else {"id": snap.snapshot_id, "index": snap.index,
                                                          "term": snap.term, "kind": snap.kind, "size": snap.size},
        })
    durable = list(conn.execute("SELECT snapshot_id, chunk_count FROM snapshots WHERE status='DURABLE'"))
    return node_id, cluster_id, fmt, groups, durable


# ---------------------------------------------------------------------------------------------- scheduler
def _cancel_check(cancel: tuple[threading.Event | None, ...]) -> Callable[[], None]:
    """A function that raises :class:`BackupCancelled` once any of the ``cancel`` events is set (checked
    between backup steps, while an upload queue drains and while pacing waits)."""
    def check() -> None:
        if any(c is not None and c.is_set() for c in cancel):
            raise BackupCancelled("backup cancelled")
    return check


def _retention_args(keep: int | None, max_age: float | None) -> tuple[int | None, float | None]:
    """Checked retention settings: ``keep`` an int >= 1 (the newest backup is always kept) or None,
    ``max_age`` a finite number of seconds > 0 or None."""
    if keep is not None:
        keep = int_arg("keep", keep, 1, layout.MAX_INT64)
    if max_age is not None:
        max_age = float_arg("max_age", max_age, 0.0, 1e12, lo_open=True)
    return keep, max_age


class _ManagerOptions(TypedDict, total=False):
    """The :class:`HotBackupManager` options a :class:`HotBackupScheduler` passes on."""

    pages_per_step: int | None
    step_pause: float
    nice: Priority
    sync_bytes: int
    skip_unchanged: bool
    compression: str
    storage_options: dict[str, Any] | None
    max_upload_rate: float | None
    part_size: int
    stale_after: float
    compression_level: int


class HotBackupScheduler:
    """Periodic hot backups of ``store`` on a background thread, with retention.

    Every ``interval`` seconds (first one after ``interval``, or at once with ``run_at_start=True``)
    the thread takes a backup with a :class:`HotBackupManager` and then prunes with ``keep`` /
    ``max_age`` (see :meth:`HotBackupManager.prune`). Backups never overlap: a tick that finds another
    backup of the node running is skipped and counted in ``skipped``. Failures are logged on
    ``raft_sqlite.backup`` and counted in ``failures`` (``last_error`` keeps the latest); they are
    never raised into other threads. ``stop()`` cancels a backup in progress (between steps) and joins.
    """

    def __init__(self, store: Any, backup_dir: _Path, interval: float, *,  # store: the lead types this as Kernel
                 keep: int | None = None, max_age: float | None = None, run_at_start: bool = False,
                 drill_every: int | None = None, drill_scratch_dir: _Path | None = None,
                 **manager_kw: Unpack[_ManagerOptions]) -> None:
        interval = float_arg("interval", interval, 0.0, 365 * 86400.0, lo_open=True)
        keep, max_age = _retention_args(keep, max_age)
        #: run a restore drill (:func:`drill`) after every this many backups taken (None: never)
        self.drill_every = None if drill_every is None else int_arg("drill_every", drill_every, 1, layout.MAX_INT64)
        self.drill_scratch_dir = drill_scratch_dir
        #: the newest drill's :class:`DrillReport` (also recorded in the store for the metrics)
        self.last_drill: DrillReport | None = None
        self.manager = HotBackupManager(store, backup_dir, **manager_kw)
        self.interval = interval
        self.keep, self.max_age = keep, max_age
        self.run_at_start = run_at_start
        self.successes = 0
        #: backups actually taken (``successes`` minus those skipped as unchanged): what ``drill_every`` counts
        self.taken = 0
        self.failures = 0
        self.skipped = 0
        self.last_error: BaseException | None = None
        self.last_backup: BackupInfo | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Start the background thread (once). Returns self."""
        if self._thread is not None:
            raise RuntimeError("scheduler already started")
        self._thread = threading.Thread(target=self._loop, name=f"raft_sqlite-backup-{self.manager.store.node_id}",
                                        daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        if not self.run_at_start and self._stop.wait(self.interval):
            return
        while not self._stop.is_set():
            self.run_once()
            if self._stop.wait(self.interval):
                return

    def run_once(self) -> BackupInfo | None:
        """One tick: backup then prune. Returns the new backup, or None when it failed or was skipped."""
        try:
            info = self.manager.backup(cancel=self._stop)
        except BackupBusy as exc:
            self.skipped += 1
            log.info("scheduled backup skipped: %s", exc)
            return None
        except Exception as exc:  # noqa: BLE001 - never raised into the caller's thread
            self._failed(exc)
            return None
        self.successes += 1
        self.last_backup = info
        try:
            self.manager.prune(keep=self.keep, max_age=self.max_age)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc, what="prune")
        if not info.skipped:
            self.taken += 1
        if self.drill_every is not None and not info.skipped and self.taken % self.drill_every == 0:
            try:
                self.last_drill = self.manager.drill(scratch_dir=self.drill_scratch_dir)
            except Exception as exc:  # noqa: BLE001
                self._failed(exc, what="restore drill")
            else:
                if not self.last_drill.ok:
                    log.error("restore drill of node %r failed: %s", self.manager.store.node_id,
                              self.last_drill.error)
        return info

    def _failed(self, exc: BaseException, what: str = "backup") -> None:
        if self._stop.is_set() and isinstance(exc, BackupCancelled):
            return
        self.failures += 1
        self.last_error = exc
        log.error("scheduled %s of node %r failed (%d failures so far): %s", what, self.manager.store.node_id,
                  self.failures, exc, exc_info=exc)
        return

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread, cancelling a backup in progress, and wait for it. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------- listing
def _scan_node_dir(node_dir: str, *, verify: bool) -> list[_Json]:
    """The backups in the local folder ``node_dir``, newest first (the rows of :func:`list_backups`; each
    complete one also carries its parsed ``manifest``, which :func:`_listed` drops)."""
    out: list[_Json] = []
    try:
        names = sorted(os.listdir(node_dir))
    except FileNotFoundError:
        return out
    node_id = os.path.basename(node_dir)
    now = time.time()
    for name in names:
        p = os.path.join(node_dir, name)
        if name.startswith(".") or not os.path.isdir(p) or os.path.islink(p):
            continue
        e: _Json = {"path": p, "node_id": node_id, "created_at": _stamp_time(name), "status": "incomplete",
             "size": None, "error": None, "seq": None, "clock": None}
        if os.path.exists(os.path.join(p, MANIFEST)):
            try:
                m = verify_backup(p, checksums=verify)
            except BackupError as exc:
                e.update(status="corrupt", error=str(exc), seq=_read_seq(p))
            else:
                e.update(status="complete", created_at=m["created_at_unix"], node_id=m["node_id"],
                         cluster_id=m["cluster_id"], size=sum(f["size"] for f in m["files"]),
                         groups=len(m["groups"]), seq=manifest_seq(m), clock=_clock_of(m), manifest=m)
        elif e["created_at"] is None:
            continue  # not a backup folder
        if e["created_at"] is None:
            e["created_at"] = os.stat(p).st_mtime
        e["age"] = now - e["created_at"]
        out.append(e)
    return _ordered(out, now)


def _newest_fingerprinted(entries: list[_Json]) -> tuple[str, _Json] | None:
    """``(path, manifest)`` of the newest complete backup of a node's listing (newest first) if its manifest
    has a fingerprint (see :func:`_fingerprint`), else None."""
    for e in entries:
        if e["status"] == "complete":
            m = e["manifest"]
            return (e["path"], m) if isinstance(m.get("fingerprint"), str) else None
    return None


def _listed(entries: list[_Json]) -> list[_Json]:
    """A scan's entries as :func:`list_backups` returns them (without the parsed manifests)."""
    for e in entries:
        e.pop("manifest", None)
    return entries


def _ordered(out: list[_Json], now: float) -> list[_Json]:
    """A node's listing, newest first, each complete backup's age measured as :func:`_ages` says."""
    out.sort(key=_order_key, reverse=True)
    complete = [e for e in out if e["status"] == "complete"]
    for e, age in zip(complete, _ages(complete, now, _boot_clock()), strict=True):
        e["age"] = age
    return out


def _scan_remote_node(remote: objectstore.Remote, node_dir: str, *, verify: bool) -> list[_Json]:
    """:func:`_scan_node_dir` at a URL: the backups under ``node_dir`` (a path on ``remote.fs``). Each
    complete or corrupt entry also carries the parsed ``manifest`` (None if unreadable)."""
    out: list[_Json] = []
    node_id = node_dir.rsplit("/", 1)[-1]
    now = time.time()
    for name, kind, _ in remote.children(node_dir):
        created = _stamp_time(name)
        if kind != "directory" or name.startswith(".") or created is None:
            continue
        folder = f"{node_dir}/{name}"
        present = {n: size for n, k, size in remote.children(folder) if k == "file"}
        e: _Json = {"path": remote.url_of(folder), "node_id": node_id, "created_at": created, "status": "incomplete",
                    "size": None, "error": None, "seq": None, "clock": None, "manifest": None}
        if MANIFEST in present:
            m: Any = None
            try:
                m = _read_remote_manifest(remote, folder)
                _verify_remote(remote, folder, m, checksums=verify, present=present)
            except BackupCorrupt as exc:
                e.update(status="corrupt", error=str(exc), manifest=m if isinstance(m, dict) else None,
                         seq=manifest_seq(m) if isinstance(m, dict) else None)
            else:
                e.update(status="complete", created_at=m["created_at_unix"], node_id=m["node_id"],
                         cluster_id=m["cluster_id"], size=sum(f["size"] for f in m["files"]),
                         stored_size=sum(f["object_size"] for f in m["files"]), groups=len(m["groups"]),
                         seq=manifest_seq(m), clock=_clock_of(m), manifest=m)
        e["age"] = now - e["created_at"]
        out.append(e)
    return _ordered(out, now)


def _read_remote_manifest(remote: objectstore.Remote, folder: str) -> Any:
    mpath = f"{folder}/{MANIFEST}"
    try:
        data = remote.read(mpath, _MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise BackupCorrupt(f"{remote.url_of(folder)}: no {MANIFEST}: the backup is incomplete (interrupted) and "
                          "cannot be used") from None
    except BackupError:
        raise
    except Exception as exc:  # noqa: BLE001 - the backend's own errors (network, permissions): not the backup's
        raise BackupError(f"cannot read {remote.url_of(mpath)}: {objectstore.describe_error(remote.url, exc)}") from exc
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BackupCorrupt(f"{remote.url_of(mpath)} is not valid JSON: {exc}") from None


def _check_object_files(mpath: str, files: Any) -> None:
    """Check the ``files`` of a URL backup's manifest (:func:`_check_files_list`): each with its object name
    (the file name plus the compression's suffix), compression, layout, page size, sizes and sha256 digests
    of the raw stream and of the object."""
    def entry(f: _Json) -> None:
        name = f["name"]
        comp = f.get("compression")
        if not isinstance(comp, str) or comp not in objectstore.COMPRESSIONS:
            raise BackupCorrupt(f"{mpath}: file {name!r}: unknown compression {comp!r}")
        if f.get("object") != name + objectstore.COMPRESSIONS[comp]:
            raise BackupCorrupt(f"{mpath}: file {name!r}: object must be {name + objectstore.COMPRESSIONS[comp]!r}, "
                                f"not {f.get('object')!r}")
        if f.get("layout") != objectstore.LAYOUT_PAGE1_LAST:
            raise BackupCorrupt(f"{mpath}: file {name!r}: unknown layout {f.get('layout')!r}")
        ps = f.get("page_size")
        if type(ps) is not int or ps < 512 or ps > 65536 or ps & (ps - 1):
            raise BackupCorrupt(f"{mpath}: file {name!r}: page_size must be a power of two in 512..65536")
        for k in ("size", "object_size"):
            if type(f.get(k)) is not int or f[k] < 0:
                raise BackupCorrupt(f"{mpath}: file {name!r}: {k} must be a non-negative integer")
        for k in ("stream_sha256", "object_sha256"):
            if not isinstance(f.get(k), str) or not re.fullmatch(r"[0-9a-f]{64}", f[k]):
                raise BackupCorrupt(f"{mpath}: file {name!r}: {k} must be 64 lowercase hex digits")
    _check_files_list(mpath, files, entry)


def _verify_remote(remote: objectstore.Remote, folder: str, manifest: Any, *, checksums: bool,
                   present: dict[str, int] | None = None, scratch_dir: str | None = None) -> list[_Json] | None:
    """:func:`verify_backup` for the backup ``folder`` at a URL, whose parsed manifest is ``manifest``:
    the manifest's shape, every object present with its recorded size and, with ``checksums``, every
    object downloaded (into a temporary folder in ``scratch_dir``) and checked as a restore checks it
    (object and data sha256, then :func:`check_backup_data`). Returns the groups read from the data
    (None without checksums)."""
    mpath = remote.url_of(f"{folder}/{MANIFEST}")
    _check_manifest_header(mpath, manifest)
    _check_object_files(mpath, manifest["files"])
    if present is None:
        with remote.errors(f"cannot list {remote.url_of(folder)}"):
            present = {n: size for n, k, size in remote.children(folder) if k == "file"}
    for f in manifest["files"]:
        if f["object"] not in present:
            raise BackupCorrupt(f"{remote.url_of(folder)}: {f['object']} is missing")
        if present[f["object"]] != f["object_size"]:
            raise BackupCorrupt(f"{remote.url_of(folder)}: {f['object']} has {present[f['object']]} bytes, the manifest "
                              f"says {f['object_size']}")
    if not checksums:
        return None
    try:
        with tempfile.TemporaryDirectory(prefix=".raft_sqlite-verify-", dir=scratch_dir) as tmp:
            local = _fetch_backup(remote, folder, manifest, tmp, None)
            return check_backup_data(tmp, local)
    except OSError as exc:  # the local scratch space: not the backup's fault
        raise BackupError(f"cannot verify {remote.url_of(folder)}: local download folder: {exc}") from exc


def _fetch_backup(remote: objectstore.Remote, folder: str, manifest: _Json, dest_dir: str,
                  progress: ProgressFn | None) -> _Json:
    """Download the backup ``folder`` (manifest checked by :func:`_verify_remote`) into the empty local
    folder ``dest_dir`` as a local backup folder (its files, then its manifest, whose ``files`` now give
    each file's own size and sha256, and whose ``origin`` is the URL). Returns that manifest."""
    files = []
    for f in manifest["files"]:
        digest = objectstore.fetch_file(remote, f"{folder}/{f['object']}", os.path.join(dest_dir, f["name"]), f,
                                        progress)
        files.append({"name": f["name"], "size": f["size"], "sha256": digest})
    local = dict(manifest, files=files, origin=remote.url_of(folder))
    _write_json_atomically(dest_dir, MANIFEST, local)
    return local


def _clock_of(manifest: _Json) -> _Json | None:
    c = manifest.get("clock")
    if (isinstance(c, dict) and isinstance(c.get("boot_id"), str) and isinstance(c.get("seconds"), (int, float))
            and not isinstance(c["seconds"], bool)):
        return {"boot_id": c["boot_id"], "seconds": float(c["seconds"])}
    return None


def list_backups(backup_dir: _Path, *, verify: bool = False,
                 storage_options: dict[str, Any] | None = None) -> list[_Json]:
    """Every backup under ``backup_dir``: node by node (sorted by node_id), each node's newest first.

    Newest is by the manifest's ``seq``, not by the wall clock (see :meth:`HotBackupManager.prune`).
    Each is a dict with ``path``, ``node_id``, ``seq`` (None for older manifests and incomplete
    folders), ``created_at`` (unix seconds), ``age`` (seconds; for complete backups measured as prune
    measures it, so never negative; an incomplete folder's age is by the wall clock),
    ``size`` (bytes, complete backups), ``status`` and ``error``. ``status`` is ``"complete"`` (manifest
    valid, every file present with its recorded size; with ``verify=True`` also its sha256),
    ``"incomplete"`` (no manifest: interrupted, never restorable) or ``"corrupt"`` (a manifest that does
    not verify; ``error`` says why). A missing ``backup_dir`` lists as empty.

    ``backup_dir`` may be a URL (``s3://bucket/prefix``...; ``storage_options`` go to fsspec): the same
    listing of the backups written there, each also with ``stored_size`` (bytes of its compressed
    objects); ``verify=True`` then downloads and checks every backup.
    """
    if objectstore.is_url(backup_dir):
        remote = objectstore.Remote(str(backup_dir), storage_options)
        out = []
        with remote.errors(f"cannot list the backups in {remote.url}"):
            for name, kind, _ in sorted(remote.children(remote.root)):
                if kind == "directory" and not name.startswith("."):
                    out.extend(_scan_remote_node(remote, remote.path(name), verify=verify))
        return _listed(out)
    root = os.path.abspath(os.fspath(backup_dir))
    out = []
    try:
        nodes = sorted(os.listdir(root))
    except FileNotFoundError:
        return out
    for n in nodes:
        p = os.path.join(root, n)
        if not n.startswith(".") and os.path.isdir(p) and not os.path.islink(p):
            out.extend(_scan_node_dir(p, verify=verify))
    return _listed(out)


# ---------------------------------------------------------------------------------------------- drill
#: ``settings`` key in raft.db holding the newest restore drill's :meth:`DrillReport.to_dict` (JSON).
DRILL_SETTING = "restore_drill"


@dataclasses.dataclass(frozen=True)
class DrillReport:
    """The outcome of a restore drill (:func:`drill`): ``ok``, the drilled backup (``backup_path``,
    ``backup_created_at`` and its ``backup_age`` when drilled; None if there was none), ``size`` (bytes
    restored), ``duration`` (seconds), ``at`` (when the drill ended, unix seconds), ``error`` (why it
    failed) and ``verify`` (the full verify's counts and problems)."""

    ok: bool
    node_id: str
    backup_path: str | None
    backup_created_at: float | None
    backup_age: float | None
    size: int
    duration: float
    at: float
    error: str | None = None
    verify: _Json | None = None

    def to_dict(self) -> _Json:
        return dataclasses.asdict(self)

    def metrics_text(self) -> str:
        """The report as Prometheus text (for node_exporter's textfile collector): the same
        ``raft_sqlite_restore_drill_*`` gauges the store's metrics export."""
        label = self.node_id.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return "".join(f'# HELP {name} {doc}\n# TYPE {name} gauge\n{name}{{node_id="{label}"}} {value!r}\n'
                       for name, doc, value in drill_gauges(self.to_dict()))


def drill_gauges(report: _Json) -> list[tuple[str, str, float]]:
    """``(name, help, value)`` of the ``raft_sqlite_restore_drill_*`` gauges for a drill report (as
    :meth:`DrillReport.to_dict` gives it)."""
    out = [("raft_sqlite_restore_drill_success", "1 if the newest restore drill restored, opened (STRICT) and "
            "verified the newest backup, else 0.", 1.0 if report.get("ok") else 0.0),
           ("raft_sqlite_restore_drill_timestamp_seconds", "When the newest restore drill ended (unix time).",
            float(report.get("at") or 0.0)),
           ("raft_sqlite_restore_drill_duration_seconds", "Duration of the newest restore drill.",
            float(report.get("duration") or 0.0)),
           ("raft_sqlite_restore_drill_bytes", "Bytes the newest restore drill restored.",
            float(report.get("size") or 0))]
    if report.get("backup_age") is not None:
        out.append(("raft_sqlite_restore_drill_backup_age_seconds", "Age of the drilled backup when it was drilled.",
                    float(report["backup_age"])))
    return out


def drill(backup_root: _Path, node_id: str, *, storage_options: dict[str, Any] | None = None,
          scratch_dir: _Path | None = None, progress: ProgressFn | None = None) -> DrillReport:
    """Prove that the newest backup of ``node_id`` under ``backup_root`` (a folder or a URL) restores:
    restore it (the same verification as :func:`restore`) into a new folder in ``scratch_dir`` (default:
    the system's temporary directory), which opens it under STRICT recovery, run the full
    :func:`raft_sqlite.verify.verify` on the result, remove the folder and report. Never raises for a
    backup that fails: the :class:`DrillReport` says why (``ok=False``). The newest backup is the newest
    by ``seq`` that is complete *or corrupt*: a corrupt newest backup fails the drill (it is not passed
    over for an older one: that is what the drill is for)."""
    t0 = time.monotonic()
    node = _safe_component(node_id)

    def report(ok: bool, entry: _Json | None, size: int = 0, error: str | None = None,
               verified: _Json | None = None) -> DrillReport:
        now = time.time()
        return DrillReport(ok, node, None if entry is None else entry["path"],
                           None if entry is None else entry["created_at"],
                           None if entry is None else entry["age"], size, time.monotonic() - t0, now, error, verified)

    try:
        rows = [b for b in list_backups(backup_root, storage_options=storage_options)
                if b["node_id"] == node and b["status"] in ("complete", "corrupt")]
    except (BackupError, OSError) as exc:
        return report(False, None, error=f"cannot list the backups in {backup_root}: {exc}")
    if not rows:
        return report(False, None, error=f"no backup of node {node!r} in {backup_root}")
    newest = _newest_for_drill(rows)
    if newest["status"] == "corrupt":
        return report(False, newest, error=f"the newest backup is corrupt: {newest['error']}")
    parent = tempfile.gettempdir() if scratch_dir is None else os.path.abspath(os.fspath(scratch_dir))
    try:
        with _locked_scratch(parent, _DRILL_PREFIX) as scratch:  # (also removes those of killed drills)
            target = os.path.join(scratch, node)
            try:
                info = restore(newest["path"], target, storage_options=storage_options, scratch_dir=scratch,
                               progress=progress)
                rep = run_verify(target)
            except (RaftSqliteError, OSError) as exc:
                return report(False, newest, error=f"{type(exc).__name__}: {exc}")
            size = sum(f["size"] for f in info.manifest["files"])
            summary = {k: v for k, v in rep.to_dict().items() if k != "data_dir"}
            if not rep.ok:
                problems = "; ".join(f"{p.kind}: {p.message}" for p in rep.problems[:5])
                return report(False, newest, size, f"the restored store fails verify: {problems}", summary)
            return report(True, newest, size, None, summary)
    except BackupError as exc:  # the scratch folder could not be made (the body returns its own errors)
        return report(False, newest, error=str(exc))


_DRILL_PREFIX = ".raft_sqlite-drill-"


def _newest_for_drill(rows: list[_Json]) -> _Json:
    """The newest of a node's complete and corrupt backups: by ``seq`` where both have one; a corrupt
    backup whose manifest gives no ``seq`` counts as newer than the newest complete one if its folder is
    newer (its name is its start time): a drill must not pass over a damaged newest backup."""
    complete = [r for r in rows if r["status"] == "complete"]
    if not complete:
        return rows[0]
    best = complete[0]
    for r in rows:
        if r["status"] != "corrupt":
            continue
        if r.get("seq") is not None and best.get("seq") is not None:
            newer = r["seq"] > best["seq"]
        else:
            stamp = _stamp_time(r["path"].rstrip("/").rsplit("/", 1)[-1])
            newer = stamp is not None and stamp > (best["created_at"] or 0.0)
        if newer:
            return r
    return best


# ---------------------------------------------------------------------------------------------- restore
def _file_name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not name:
        return f"file name {name!r} is not a non-empty string"
    if "\0" in name:
        return f"file name {name!r} contains NUL"
    if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return f"file name {name!r} is absolute: it escapes the backup folder"
    parts = re.split(r"[\\/]", name)
    if ".." in parts:
        return f"file name {name!r} contains '..': it escapes the backup folder"
    if len(parts) > 1 or name in (".",):
        return f"file name {name!r} is not a plain file name in the backup folder"
    if name not in DB_FILES:
        return f"file name {name!r} is not a database file of a node ({', '.join(DB_FILES)})"
    return None


def verify_backup(backup_path: _Path, *, checksums: bool = True) -> _Json:
    """Validate the backup folder ``backup_path`` and return its manifest; write nothing.

    Checks: ``manifest.json`` exists (else the backup is incomplete), is a JSON object of at most 16 MiB
    with every key of :data:`REQUIRED_KEYS` and sane types, a ``format_version`` this code can open; its
    ``files`` name exactly ``raft.db`` and ``chunks.db``, each as a plain name inside the folder (absolute
    names, ``..``, sub-paths and symlinks are refused: they would escape the backup), each a regular
    file of the recorded size and (with ``checksums``, the default) sha256, and then (also only with
    ``checksums``) that the data holds what the manifest says (:func:`check_backup_data`). Raises
    :class:`BackupError` naming the problem.
    """
    return _verify_backup(backup_path, checksums)[0]


def _verify_backup(backup_path: _Path, checksums: bool) -> tuple[_Json, list[_Json] | None]:
    """:func:`verify_backup`, also returning the groups read from the data (None without checksums)."""
    folder = os.path.abspath(os.fspath(backup_path))
    if not os.path.isdir(folder):
        raise BackupCorrupt(f"{folder} is not a backup folder")
    mpath = os.path.join(folder, MANIFEST)
    manifest = _read_manifest(folder, mpath)
    _check_manifest_header(mpath, manifest)
    files = manifest["files"]
    _check_manifest_files(mpath, files)
    _check_backup_files(folder, files)
    if checksums:
        _check_backup_sha256(folder, files)
        return manifest, check_backup_data(folder, manifest)
    return manifest, None


def _read_manifest(folder: str, mpath: str) -> Any:
    """The parsed JSON of the manifest ``mpath`` of the backup ``folder`` (any JSON value: checked by
    :func:`_check_manifest_header`); raises :class:`BackupError` when it is missing, not a regular file,
    implausibly large or not JSON."""
    try:
        st = os.lstat(mpath)
    except FileNotFoundError:
        raise BackupCorrupt(f"{folder}: no {MANIFEST}: the backup is incomplete (interrupted) and cannot be "
                          "used") from None
    if not stat.S_ISREG(st.st_mode):
        raise BackupCorrupt(f"{mpath} is not a regular file")
    if st.st_size > _MAX_MANIFEST_BYTES:
        raise BackupCorrupt(f"{mpath} is implausibly large ({st.st_size} bytes)")
    try:
        with open(mpath, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BackupCorrupt(f"{mpath} is not valid JSON: {exc}") from None


def _check_manifest_header(mpath: str, manifest: Any) -> None:
    """Check that ``manifest`` is an object with every key of :data:`REQUIRED_KEYS`, a supported manifest
    and data format version and sane types of its top-level fields (``files`` aside)."""
    if not isinstance(manifest, dict):
        raise BackupCorrupt(f"{mpath} is not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BackupCorrupt(f"{mpath} lacks required keys: {', '.join(missing)}")
    if manifest["manifest_version"] != MANIFEST_VERSION:
        raise BackupCorrupt(f"{mpath}: manifest version {manifest['manifest_version']!r} is not supported "
                          f"(this raft_sqlite reads {MANIFEST_VERSION})")
    for k in ("node_id", "cluster_id"):
        if not isinstance(manifest[k], str) or not manifest[k]:
            raise BackupCorrupt(f"{mpath}: {k} must be a non-empty string")
    fmt = manifest["format_version"]
    if type(fmt) is not int:
        raise BackupCorrupt(f"{mpath}: format_version must be an integer")
    if fmt > layout.FORMAT_VERSION:
        raise BackupCorrupt(f"{mpath}: data format {fmt} is newer than this raft_sqlite supports "
                          f"({layout.FORMAT_VERSION}); restore with a newer raft_sqlite")
    if not isinstance(manifest["created_at_unix"], (int, float)) or not isinstance(manifest["groups"], list):
        raise BackupCorrupt(f"{mpath}: created_at_unix must be a number and groups a list")
    if "seq" in manifest and manifest_seq(manifest) is None:
        raise BackupCorrupt(f"{mpath}: seq must be a positive integer (got {manifest['seq']!r})")


def _check_files_list(mpath: str, files: Any, check_entry: Callable[[_Json], None]) -> None:
    """Check a manifest's ``files``: a list of objects naming exactly :data:`DB_FILES`, each once, as a
    plain file name (:func:`_file_name_problem`); ``check_entry`` checks the rest of each entry."""
    if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
        raise BackupCorrupt(f"{mpath}: files must be a list of objects")
    seen = set()
    for f in files:
        problem = _file_name_problem(f.get("name"))
        if problem:
            raise BackupCorrupt(f"{mpath}: {problem}")
        if f["name"] in seen:
            raise BackupCorrupt(f"{mpath}: file {f['name']!r} is listed twice")
        seen.add(f["name"])
        check_entry(f)
    if seen != set(DB_FILES):
        raise BackupCorrupt(f"{mpath}: files must be exactly {', '.join(DB_FILES)}; got {', '.join(sorted(seen))}")


def _check_manifest_files(mpath: str, files: Any) -> None:
    """Check the local manifest's ``files`` (:func:`_check_files_list`): each with a non-negative integer
    size and a sha256 in hex."""
    def entry(f: _Json) -> None:
        if type(f.get("size")) is not int or f["size"] < 0:
            raise BackupCorrupt(f"{mpath}: file {f['name']!r}: size must be a non-negative integer")
        if not isinstance(f.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", f["sha256"]):
            raise BackupCorrupt(f"{mpath}: file {f['name']!r}: sha256 must be 64 lowercase hex digits")
    _check_files_list(mpath, files, entry)


def _check_backup_files(folder: str, files: list[_Json]) -> None:
    """Check that every file the manifest lists (``files``, checked by :func:`_check_manifest_files`) is a
    regular file directly in ``folder`` (no symlink, nothing resolving elsewhere) of the recorded size."""
    real_folder = os.path.realpath(folder)
    for f in files:
        p = os.path.join(folder, f["name"])
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            raise BackupCorrupt(f"{folder}: {f['name']} is missing") from None
        if stat.S_ISLNK(st.st_mode):
            raise BackupCorrupt(f"{folder}: {f['name']} is a symlink: it may escape the backup folder")
        if not stat.S_ISREG(st.st_mode):
            raise BackupCorrupt(f"{folder}: {f['name']} is not a regular file")
        if os.path.dirname(os.path.realpath(p)) != real_folder:
            raise BackupCorrupt(f"{folder}: {f['name']} resolves outside the backup folder")
        if st.st_size != f["size"]:
            raise BackupCorrupt(f"{folder}: {f['name']} has {st.st_size} bytes, the manifest says {f['size']}")


def _check_backup_sha256(folder: str, files: list[_Json]) -> None:
    """Check every listed file of ``folder`` against the sha256 the manifest records for it."""
    for f in files:
        _, digest = _sha256_file(os.path.join(folder, f["name"]))
        if digest != f["sha256"]:
            raise BackupCorrupt(f"{folder}: {f['name']} fails its sha256 check (corrupted backup file)")


#: Per-group manifest fields that must equal the backup's raft.db (the Raft hard state and indexes a
#: restore exposes); the rest of a group entry is compared when present.
GROUP_FIELDS = ("term", "voted_for", "commit_index", "first_index", "last_index", "snapshot_index")
_OPTIONAL_GROUP_FIELDS = ("group_id", "snapshot_term", "latest_snapshot")


def _same(a: object, b: object) -> bool:
    """Equal as JSON values (so ``True`` is not ``1`` and ``1.0`` is not ``1``)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def check_backup_data(backup_path: _Path, manifest: _Json) -> list[_Json]:
    """Read the backup's ``raft.db`` (read-only, writing nothing) and check that it holds what
    ``manifest`` says: node_id, cluster_id, format_version, the same set of groups and, per group, every
    field of :data:`GROUP_FIELDS` (and ``group_id``, ``snapshot_term``, ``latest_snapshot`` when the
    manifest has them). Returns the groups as read from the data (the shape of ``manifest["groups"]``).
    Raises :class:`BackupError` naming the group and the field on the first disagreement: a manifest
    edited or paired with other data must not be what a restored node believes about its past votes.
    :func:`verify_backup` calls it once the files' sha256 are checked."""
    folder = os.path.abspath(os.fspath(backup_path))
    path = os.path.join(folder, layout.MAIN_DB)
    mpath = os.path.join(folder, MANIFEST)
    try:
        conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
        try:
            conn.execute("PRAGMA query_only=1")
            node_id, cluster_id, fmt, groups, _ = _describe(conn)
        finally:
            conn.close()
    except (apsw.Error, TypeError) as exc:
        raise BackupCorrupt(f"{path}: cannot read the backup's raft.db to check it against {MANIFEST}: {exc}") from None
    for key, have in (("node_id", node_id), ("cluster_id", cluster_id), ("format_version", fmt)):
        if not _same(manifest[key], have):
            raise BackupCorrupt(f"{mpath}: {key} is {manifest[key]!r} but the backup's raft.db holds {have!r}")
    listed: dict[str, _Json] = {}
    for g in manifest["groups"]:
        if not isinstance(g, dict) or not isinstance(g.get("name"), str):
            raise BackupCorrupt(f"{mpath}: every entry of groups must be an object with a string name; got {g!r}")
        if g["name"] in listed:
            raise BackupCorrupt(f"{mpath}: group {g['name']!r} is listed twice")
        listed[g["name"]] = g
    actual = {g["name"]: g for g in groups}
    for name in sorted(set(listed) | set(actual)):
        if name not in actual:
            raise BackupCorrupt(f"{mpath}: group {name!r} is in the manifest but not in the backup's raft.db")
        if name not in listed:
            raise BackupCorrupt(f"{mpath}: group {name!r} is in the backup's raft.db but not in the manifest")
        m, a = listed[name], actual[name]
        for field in GROUP_FIELDS + _OPTIONAL_GROUP_FIELDS:
            if field not in m:
                if field in GROUP_FIELDS:
                    raise BackupCorrupt(f"{mpath}: group {name!r} lacks {field}")
                continue
            if not _same(m[field], a[field]):
                raise BackupCorrupt(f"{mpath}: group {name!r}: {field} is {m[field]!r} in the manifest but "
                                  f"{a[field]!r} in the backup's raft.db")
    return groups


def _restore_kind(mode: str | None, allow_quorum_loss: bool) -> str:
    if mode is None:
        return QUORUM_LOSS_RESTORE if allow_quorum_loss else NODE_REPLACEMENT
    if mode in ("quorum_loss", "quorum-loss", QUORUM_LOSS_RESTORE):
        if not allow_quorum_loss:
            raise BackupError(f"quorum-loss restore refused without allow_quorum_loss=True: "
                              f"{QUORUM_LOSS_EXPLANATION}")
        return QUORUM_LOSS_RESTORE
    if mode in ("node_replacement", "node-replacement"):
        if allow_quorum_loss:
            raise ValueError("mode='node_replacement' contradicts allow_quorum_loss=True")
        return NODE_REPLACEMENT
    raise ValueError(f"unknown restore mode {mode!r} (node_replacement | quorum_loss)")


#: The placeholder ``raft.db`` a restore writes first (see :data:`raft_sqlite.layout.RESTORE_PLACEHOLDER`).
RESTORE_PLACEHOLDER = layout.RESTORE_PLACEHOLDER


def _remove_names(target: str, names: Iterable[str]) -> None:
    for name in names:
        p = os.path.join(target, name)
        with contextlib.suppress(FileNotFoundError):
            if os.path.isdir(p) and not os.path.islink(p):
                fsio.rmtree(p)
            else:
                fsio.unlink(p)


def restore(backup_path: _Path, data_dir: _Path, *, allow_quorum_loss: bool = False, mode: str | None = None,
            progress: ProgressFn | None = None, vfs: str | None = None, latest: bool = False,
            node: str | None = None, node_id: str | None = None, storage_options: dict[str, Any] | None = None,
            scratch_dir: _Path | None = None) -> RestoreInfo:
    """Restore the backup folder ``backup_path`` into a fresh ``data_dir`` and return a :class:`RestoreInfo`.

    Where from. ``backup_path`` is one backup: a local folder, or the URL of a backup written to object
    storage (``s3://bucket/prefix/n1/20261203T101500.000000Z``; ``storage_options`` go to fsspec). With
    ``latest=True`` it is instead a backup root (the path or URL given to the backups) and ``node`` names
    the node: its newest backup that verifies is restored (a newer one that does not is logged and
    skipped). A URL backup is downloaded into a private folder in ``scratch_dir`` (default: the parent
    of ``data_dir``) and verified there whole, every object's and every file's sha256, before step (3);
    its files are then moved into place. ``node_id`` re-identifies the restored node (a replacement
    joining under a new identity): the node record gets that id, and the restore event records the old
    one (``reidentified_from``); open the result with the new id.

    Order of work: (1) ``data_dir`` must not exist or be an empty directory (or hold the leftovers of an
    interrupted restore, which are removed), else :class:`BackupError`;
    (2) the whole backup is verified (:func:`verify_backup` with checksums) and the manifest is checked
    against the data (:func:`check_backup_data`: node, groups, per-group term / vote / commit / first /
    last / snapshot index) before anything is written;
    (3) ``data_dir`` is created 0700 (its name synced into its parent) and locked like a store
    (:class:`~raft_sqlite.lock.DataDirLock`, held to the end: :class:`~raft_sqlite.DataDirLocked` if a
    store has it open), and a placeholder ``raft.db`` that is not a database
    (:data:`RESTORE_PLACEHOLDER`) is written durably first; (4) each file is copied to a temporary name
    (0600), checksummed again while copying and fsynced; (5) a restore event is recorded in the copied
    ``raft.db`` (still under its temporary name); (6) ``chunks.db`` is renamed into place, the directory
    fsynced, then ``raft.db`` replaces the placeholder and the directory is fsynced again; (7) the result
    is opened with ``RecoveryPolicy.STRICT`` as a check. If (3)-(7) fail, everything written is removed
    (``data_dir`` is left as it was) and :class:`BackupError` raised.

    Power loss. Until step (6) completes, ``data_dir`` holds no store that opens: the placeholder makes
    ``NodeStore.open`` fail with :class:`~raft_sqlite.CorruptionError` ("not a database"), and running
    ``restore`` again into the same ``data_dir`` removes the leftovers and restores afresh. From (6) on
    it holds the complete restored store (data and restore event). A crash before the placeholder is
    durable leaves ``data_dir`` as it was (absent or empty). ``vfs`` names a registered apsw VFS for the
    SQLite work on the target (the restore event and the check-open; the seam for fault-injection
    tests); the other file operations go through :mod:`raft_sqlite.fsio`.

    Modes. ``allow_quorum_loss`` is the operator's statement about the cluster, which only the operator
    knows. Without it (default, ``mode="node_replacement"``) the restore is a *node replacement*: the
    same node rejoins a cluster whose majority survived and catches up from the leader; the event
    ``node_replacement`` records the backup's point and per-group term/vote, exposed after opening as
    :attr:`NodeStore.restored_from` so the Raft layer avoids voting in terms it may already have voted
    in after the backup. With ``allow_quorum_loss=True`` (or ``mode="quorum_loss"`` plus the flag) it is a
    *quorum-loss restore*: event ``quorum_loss_restore`` marks every group so the Raft layer re-bootstraps
    the membership from this node. Asking for ``mode="quorum_loss"`` without the flag is refused with a
    :class:`BackupError` explaining the flag.
    """
    t0 = time.monotonic()
    kind = _restore_kind(mode, bool(allow_quorum_loss))
    if vfs is not None and not isinstance(vfs, str):
        raise TypeError(f"vfs must be a str (a registered apsw VFS name) or None, not {type(vfs).__name__}")
    new_id = None if node_id is None else _checked_node_id(node_id)
    if latest and node is None:
        raise ValueError("latest=True needs node= (the node_id whose newest backup is restored)")
    if node is not None and not latest:
        raise ValueError("node= names the node for latest=True; without it backup_path is one backup")
    target = os.path.abspath(os.fspath(data_dir))
    _refuse_target(target)  # before anything is read or downloaded
    if objectstore.is_url(backup_path):
        remote = objectstore.Remote(str(backup_path), storage_options)
        return _restore_remote(remote, target, kind, node if latest else None, progress, vfs, new_id, scratch_dir,
                               t0)
    if storage_options is not None:
        raise ValueError("storage_options apply to URL backups only")
    src = os.path.abspath(os.fspath(backup_path))
    verified = None
    if latest:
        assert node is not None, "checked above"
        src, verified = _latest_local(src, node)
    return _restore_folder(src, target, kind, progress, vfs, new_id, src, False, verified, t0)


def _checked_node_id(node_id: object) -> str:
    if not isinstance(node_id, str):
        raise TypeError(f"node_id must be a str, not {type(node_id).__name__}")
    if not node_id or "\0" in node_id or node_id != node_id.strip() or len(node_id) > 1024:
        raise ValueError(f"node_id must be a non-empty string without NUL or surrounding spaces, not {node_id!r}")
    return node_id


def _refuse_target(target: str) -> None:
    """Refuse a restore target that exists and is not a directory, or holds anything but the leftovers
    of an interrupted restore (never restore over data)."""
    if os.path.lexists(target):
        if os.path.islink(target) or not os.path.isdir(target):
            raise BackupError(f"restore target {target} exists and is not a directory")
        _restore_leftovers(target)


def _restore_leftovers(target: str) -> list[str]:
    """The names an interrupted restore left in the directory ``target`` (the same reading as
    ``NodeStore.open``'s refusal, :mod:`raft_sqlite.restorestate`); refuses anything else."""
    names = read_restore_state(target).restore_leftovers()
    if names is None:
        raise BackupError(f"restore target {target} is not empty: restore only into a new or empty data_dir "
                          "(move the old data away first)")
    return names


def _latest_local(root: str, node: str) -> tuple[str, tuple[_Json, list[_Json] | None]]:
    """The newest backup of ``node`` under the local backup root ``root`` that verifies (with checksums),
    and its verification; older ones are tried when a newer one does not verify (logged)."""
    problems = []
    for e in _scan_node_dir(os.path.join(root, _safe_component(node)), verify=False):
        if e["status"] != "complete":
            continue
        try:
            return e["path"], _verify_backup(e["path"], checksums=True)
        except BackupCorrupt as exc:
            log.warning("backup %s does not verify (%s); trying the next older one", e["path"], exc)
            problems.append(f"{e['path']}: {exc}")
    raise _none_verifies(node, root, problems, " (there is none)")


def _restore_remote(remote: objectstore.Remote, target: str, kind: str, node: str | None,
                    progress: ProgressFn | None, vfs: str | None, new_id: str | None, scratch_dir: _Path | None,
                    t0: float) -> RestoreInfo:
    """:func:`restore` from a URL: ``remote.url`` is one backup, or with ``node`` the backup root whose
    newest backup of ``node`` that verifies is taken. Each candidate is downloaded into a private scratch
    folder (in ``scratch_dir``, default the target's parent: the same file system, so that the verified
    files are moved into place, not copied) and verified whole there before the target is touched."""
    if node is None:
        candidates = [remote.root]
    else:
        node_dir = remote.path(_safe_component(node))
        with remote.errors(f"cannot list the backups of node {node!r} in {remote.url}"):
            candidates = [f"{node_dir}/{e['path'].rsplit('/', 1)[-1]}"
                          for e in _scan_remote_node(remote, node_dir, verify=False) if e["status"] == "complete"]
    parent = os.path.abspath(os.fspath(scratch_dir)) if scratch_dir is not None else os.path.dirname(target)
    prefix = f".{os.path.basename(target)}.fetch-"
    problems = []
    for folder in candidates:
        with _locked_scratch(parent, prefix) as scratch:
            try:
                manifest = _read_remote_manifest(remote, folder)
                _verify_remote(remote, folder, manifest, checksums=False)
                local = _fetch_backup(remote, folder, manifest, scratch, progress)
                # the files' sha256 were just computed from what was written (fetch_file): check the rest
                _verify_backup(scratch, checksums=False)
                verified = (local, check_backup_data(scratch, local))
            except OSError as exc:  # the local disk: never a reason to take an older backup
                raise BackupError(f"cannot download {remote.url_of(folder)} into {scratch}: {exc}") from exc
            except BackupCorrupt as exc:  # only the backup's own fault makes the next older one the answer
                if node is None:
                    raise
                log.warning("backup %s does not verify (%s); trying the next older one", remote.url_of(folder), exc)
                problems.append(f"{remote.url_of(folder)}: {exc}")
                continue
            return _restore_folder(scratch, target, kind, progress, vfs, new_id, remote.url_of(folder), True,
                                   verified, t0)
    none = " (there is none)" if remote.exists() else f" ({remote.url} does not exist)"
    raise _none_verifies(node, remote.url, problems, none)


def _none_verifies(node: str | None, root: str, problems: list[str], none: str) -> BackupError:
    """The refusal of ``restore(latest=True)`` when no backup of ``node`` in ``root`` verifies: each
    candidate's problem, or ``none`` when there was no candidate."""
    return BackupError(f"no backup of node {node!r} in {root} verifies" + (": " + "; ".join(problems) if problems
                                                                         else none))


@contextlib.contextmanager
def _locked_scratch(parent: str, prefix: str) -> Iterator[str]:
    """A new private folder ``parent/prefix<random>`` (0700; ``parent`` created if missing), removed at the
    end. A lock file inside is held meanwhile, so that a later call removes the folders that calls killed
    mid-way left behind (:func:`_remove_abandoned_downloads`), never one in use. A folder that cannot
    be made raises :class:`BackupError`."""
    folder = None
    lock_fd = None
    try:
        _make_dirs(parent)
        _remove_abandoned_downloads(parent, prefix)
        folder = tempfile.mkdtemp(prefix=prefix, dir=parent)
        # the lock file gets the name other calls look for only once it is locked: between a plain
        # create and the flock, another call could take it for a killed call's folder and remove it
        new_lock = os.path.join(folder, _LOCK_NAME + ".new")
        lock_fd = fsio.open(new_lock, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        fsio.rename(new_lock, os.path.join(folder, _LOCK_NAME))
    except OSError as exc:
        if lock_fd is not None:
            fsio.close(lock_fd)
        if folder is not None:
            fsio.rmtree(folder, ignore_errors=True)
        raise BackupError(f"cannot create a scratch folder in {parent}: {exc}") from exc
    try:
        yield folder
    finally:
        fsio.rmtree(folder, ignore_errors=True)
        fsio.close(lock_fd)


def _remove_abandoned_downloads(parent: str, prefix: str) -> None:
    """Remove the download folders (``prefix`` + random) that restores killed mid-download left in
    ``parent``: those whose lock nobody holds (a running restore holds its own), and only folders this
    user owns (``parent`` may be a shared temporary directory where anyone can make such a name)."""
    for name in os.listdir(parent):
        p = os.path.join(parent, name)
        if not name.startswith(prefix):
            continue
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            continue
        try:
            fd = fsio.open(os.path.join(p, _LOCK_NAME), os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue  # not one of ours (or just being created): left alone
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # in use by a running restore
        finally:
            fsio.close(fd)
        fsio.rmtree(p, ignore_errors=True)
        log.info("removed %s, the download folder of a restore that did not finish", p)


def _restore_folder(src: str, target: str, kind: str, progress: ProgressFn | None, vfs: str | None,
                    new_id: str | None, origin: str, consume: bool,
                    verified: tuple[_Json, list[_Json] | None] | None, t0: float) -> RestoreInfo:
    """:func:`restore` of the local backup folder ``src`` into ``target`` (its steps (1)-(7)). ``origin``
    is what the restore event names as the backup; ``consume`` moves the files out of ``src`` (a private
    download folder) instead of copying them; ``verified`` is ``src``'s verification if already made."""
    _refuse_target(target)  # again: a download may have taken long
    manifest, groups = verified if verified is not None else _verify_backup(src, checksums=True)
    final_id = manifest["node_id"] if new_id is None else new_id
    created_dir = not os.path.exists(target)
    if created_dir:
        try:
            _make_dirs(target)
        except OSError as exc:
            raise BackupError(f"cannot create restore target {target}: {exc}") from exc
    # Held until the end, so that no NodeStore.open (or second restore) can use the half-written
    # data_dir; DataDirLocked (naming the holder) if a store has it open already.
    lock = DataDirLock.acquire(target, node_id=final_id)
    try:
        stale = _restore_leftovers(target)  # again, now that nobody else can write into it
    except BaseException:
        lock.release()
        raise
    main_db = os.path.join(target, layout.MAIN_DB)
    try:
        os.chmod(target, 0o700)
        if stale:
            # an interrupted restore's leftovers: its placeholder raft.db stays (it is rewritten below),
            # so that a crash while removing them leaves a target that still refuses to open
            _remove_names(target, [n for n in stale if n != layout.MAIN_DB])
            fsio.sync_dir(target)
            log.info("%s: removed the leftovers of an interrupted restore: %s", target, ", ".join(sorted(stale)))
        # From here on (once durable) the target refuses to open until the restored raft.db replaces this.
        _write_file_atomically(target, layout.MAIN_DB, RESTORE_PLACEHOLDER)
        tmps: dict[str, str] = {}
        for f in manifest["files"]:
            tmp = os.path.join(target, f".{f['name']}.restoring")
            if consume:
                _move_verified(os.path.join(src, f["name"]), tmp, f, progress)
            else:
                _copy_verified(os.path.join(src, f["name"]), tmp, f, progress)
            tmps[f["name"]] = tmp
        # The event is committed (SQLite syncs it) before the file gets its real name: a restored store
        # never opens without it (the Raft layer must learn it was restored, or it may vote twice).
        assert groups is not None, "_verify_backup with checksums reads them"
        event = _record_restore_event(tmps[layout.MAIN_DB], kind, origin, manifest, groups, vfs,
                                      None if final_id == manifest["node_id"] else final_id)
        fsio.rename(tmps[layout.CHUNKS_DB], os.path.join(target, layout.CHUNKS_DB))
        fsio.sync_dir(target)
        fsio.replace(tmps[layout.MAIN_DB], main_db)  # the restored store appears in one step
        fsio.sync_dir(target)
        try:
            NodeStore.open(target, final_id, cluster_id=manifest["cluster_id"],
                           recovery=RecoveryPolicy.STRICT, lock=lock, vfs=vfs).close()
        except RaftSqliteError as exc:
            raise BackupError(f"restored data in {target} does not open under STRICT recovery: {exc}") from exc
    except BaseException as exc:
        # data_dir was empty or absent when we started (or held our own leftovers): everything in it now
        # is ours (the copies, their temporaries, whatever the check-open created next to them, and the
        # lock file, which is safe to remove while we hold it: DataDirLock.acquire re-checks the path
        # after locking). raft.db goes last (see above). Best effort: after an I/O error or a power
        # cut these may fail too, and the placeholder then tells the next restore what happened.
        with contextlib.suppress(OSError):
            if os.path.isdir(target) and os.path.exists(main_db) and not is_placeholder(main_db):
                # the restored raft.db is already in place (the check-open failed): put the placeholder back
                # durably first, so that dying during the removals below never leaves a restored raft.db
                # without its chunks.db, which would not carry the placeholder's protection
                _write_file_atomically(target, layout.MAIN_DB, RESTORE_PLACEHOLDER)
            names = os.listdir(target) if os.path.isdir(target) else []
            _remove_names(target, sorted(names, key=lambda n: n == layout.MAIN_DB))
            if created_dir and not os.listdir(target):
                fsio.rmtree(target)
        if isinstance(exc, OSError):
            raise BackupError(f"restore into {target} failed: {exc}") from exc
        if isinstance(exc, apsw.Error):
            raise BackupError(f"restore into {target} failed: SQLite: {type(exc).__name__}: {exc}") from exc
        raise
    finally:
        lock.release()
    info = RestoreInfo(target, origin, kind, manifest, event, time.monotonic() - t0)
    log.info("%s restored from backup %s (created %s) as a %s", target, origin, manifest["created_at"], kind)
    return info


def _move_verified(src: str, dst: str, f: _Json, progress: ProgressFn | None) -> None:
    """Move the verified (and fsynced) download ``src`` to ``dst``; copy it (checking it again) when the two
    are on different file systems."""
    try:
        fsio.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_verified(src, dst, f, progress)
        return
    if progress is not None:
        progress(f["name"], f["size"], f["size"])


def _copy_verified(src: str, dst: str, f: _Json, progress: ProgressFn | None) -> None:
    h = hashlib.sha256()
    n = 0
    fd = fsio.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with open(src, "rb", buffering=0) as fin:
            while True:
                b = fin.read(_BUF)
                if not b:
                    break
                h.update(b)
                fsio.write_all(fd, b)
                n += len(b)
                if progress is not None:
                    progress(f["name"], n, f["size"])
        fsio.fsync(fd)
    finally:
        fsio.close(fd)
    if n != f["size"] or h.hexdigest() != f["sha256"]:
        raise BackupError(f"{src} changed while it was being restored (size/sha256 no longer match the manifest)")


def _record_restore_event(raft_db: str, kind: str, backup_path: str, manifest: _Json, groups: list[_Json],
                          vfs: str | None = None, new_id: str | None = None) -> _Json:
    """Record the restore in the restored raft.db. Per-group values come from ``groups``, read from the
    restored data itself (:func:`check_backup_data`), so :attr:`NodeStore.restored_from` reports what
    was restored, not what a manifest claims. With ``new_id`` the node record is given that node_id (its
    CRC recomputed) in the same transaction, and the event records the identity it had."""
    details = {
        "backup_path": backup_path,
        "backup_created_at": manifest["created_at"],
        "backup_created_at_unix": manifest["created_at_unix"],
        "library_version": manifest["library_version"],
        "groups": {g["name"]: {k: g[k] for k in ("term", "voted_for", "commit_index", "last_index", "snapshot_index")}
                   for g in groups},
    }
    if kind == QUORUM_LOSS_RESTORE:
        details["action"] = ("re-bootstrap every group's membership from this node: entries committed after "
                             "the backup point are lost")
    else:
        details["action"] = ("rejoin as the same node and catch up from the leader; do not vote in any term "
                             "that may have been voted in after the backup point")
    if new_id is not None:
        details["node_id"] = new_id
        details["reidentified_from"] = manifest["node_id"]
        details["action"] = (f"join the cluster as the new member {new_id!r} (a membership change adds it; remove "
                             f"{manifest['node_id']!r}); it has cast no vote under its new identity")
    conn = apsw.Connection(raft_db, vfs=vfs)
    try:
        conn.execute("PRAGMA synchronous=FULL").fetchall()
        with conn:
            if new_id is not None:
                row = conn.execute("SELECT cluster_id, format_version, created_at FROM node WHERE id=1").fetchone()
                if row is None:
                    raise BackupError(f"{raft_db} has no node record to re-identify")
                conn.execute("UPDATE node SET node_id=?, crc32=? WHERE id=1",
                             (new_id, node_crc(new_id, row[0], row[1], row[2])))
            conn.execute("INSERT INTO recovery_events(at, kind, policy, outcome, duration, details) "
                         "VALUES (?,?,?,?,?,?)",
                         (time.time(), kind, None, "restored", None, json.dumps(details, sort_keys=True)))
    finally:
        conn.close()
    return details
