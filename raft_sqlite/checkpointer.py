"""Checkpoints of raft.db's WAL off the commit path: :class:`Checkpointer`.

Why: SQLite checkpoints in the connection that commits (``wal_autocheckpoint``): every ~1000 WAL pages
the commit that crossed the line also copies 4 MiB into raft.db and fsyncs it, and every append queued
behind that commit waits for it; after a reader held the WAL back (a hot backup's copy), the first
commit copies the whole grown WAL (measured: one append stalled 41 ms behind an 18 MiB WAL, 336 ms
behind 147 MiB). With the checkpointer, the write connection never checkpoints (``wal_autocheckpoint=0``
from :meth:`Kernel.start_checkpointer <raft_sqlite.kernel.Kernel.start_checkpointer>` on) and a thread
with its own connection does, in two steps:

1. a PASSIVE checkpoint as soon as :data:`CHECKPOINT_PAGES` frames wait to be copied: the bulk of the
   copy, while the committer goes on (writers are never blocked by it), written through the paced VFS
   (:mod:`raft_sqlite.pacedvfs`) so that it reaches the disk in 1 MiB pieces;
2. once the WAL holds :data:`RESTART_PAGES` frames and step 1 left at most :data:`CHECKPOINT_PAGES` of them
   uncopied, a FULL checkpoint: it takes the write lock (waiting at most :data:`RESTART_WAIT_MS` for a gap
   between two commits, without blocking anyone while it waits), copies the few frames committed during
   step 1 and syncs raft.db, so that the next commit restarts the WAL from its beginning. A PASSIVE
   checkpoint alone never quite catches up under a steady stream of commits, and a WAL that never
   restarts grows, each commit then extending the file (an fdatasync that extends a file costs about
   1.5x one that overwrites). Never while a reader holds the WAL back (a hot backup's copy): step 1 then
   leaves a big backlog, and a FULL checkpoint would hold the write lock waiting for that reader (measured
   with a RESTART checkpoint doing so: appends stalled 0.4 s during a backup).

Contract: the thread never starts a checkpoint once the store is fail-stopped (the fail-stop rule: no
I/O after a storage fault) or closing (one already running when the fault happens completes: SQLite adds
a commit's frames to the WAL index only after its sync succeeded, so it copies nothing unsynced); a
checkpoint that fails fail-stops the store, as it does when it runs inside a commit. While the thread
runs, every high-water mark says BACKGROUND (``sqlitewal``): its partial checkpoints write raft.db after
the mark, so raft.db's mtime is no evidence that another connection completed a checkpoint. It syncs the WAL before copying and raft.db after (the connection has the store's pragmas),
so the high-water mark's rules hold whoever checkpointed (see ``sqlitewal``); SQLite's checkpoint when
the write connection closes is unchanged.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

import apsw

from .governor import IoGovernor
from .sqlitewal import HighWaterMark

log = logging.getLogger("raft_sqlite.checkpointer")

#: Frames (4 KiB pages of raft.db) waiting to be copied that start a background checkpoint: 1 MiB.
CHECKPOINT_PAGES = 256
#: WAL size (frames) from which the thread also completes the checkpoint (FULL): SQLite's default
#: autocheckpoint size. The WAL's working size is then about what it was before when the log is not
#: saturated; under many saturating writers the FULL step misses some gaps between commits (a review
#: measured 70 of 111 attempts succeeding with 8 FULL writers) and the WAL grew to ~3,600 frames (22 MiB).
RESTART_PAGES = 1000
#: How long the completing FULL checkpoint waits for the write lock (ms): a gap between two commits.
RESTART_WAIT_MS = 2
_BUSY_MS = 10_000  # the store's busy timeout (kernel.connect)
_IDLE_PAUSE = 0.01  # after a pass that could copy nothing (a reader holds the WAL back)


class CheckpointHost(Protocol):
    """What the checkpointer needs from the kernel."""

    @property
    def path(self) -> str: ...

    @property
    def hwm(self) -> HighWaterMark | None: ...

    @property
    def fault(self) -> BaseException | None: ...

    @property
    def closed(self) -> bool: ...

    @property
    def governor(self) -> IoGovernor: ...

    def connect(self, path: str, *, query_only: bool = False, paced: bool = False) -> apsw.Connection: ...

    def fail(self, exc: BaseException) -> None: ...


class Checkpointer:
    """A thread that checkpoints raft.db's WAL whenever ``pages`` frames are waiting (a
    :class:`~raft_sqlite.commit.CommitListener`: each commit checks the WAL index, which costs a read of
    the mapped -shm header). Counters: :attr:`checkpoints`, :attr:`seconds` (time spent in them)."""

    def __init__(self, host: CheckpointHost, *, pages: int = CHECKPOINT_PAGES, restart_pages: int = RESTART_PAGES,
                 name: str = "raft_sqlite-checkpoint"):
        self.host = host
        self.pages = pages
        self.restart_pages = restart_pages
        #: checkpoints run (PASSIVE and FULL), FULL ones that completed (and tried), seconds spent in all
        self.checkpoints = 0
        self.restarts = 0
        self.full_attempts = 0
        self.seconds = 0.0
        self._wake = threading.Event()
        self._stop = False
        self._conn: apsw.Connection | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Open the checkpoint connection and start the thread."""
        conn = self.host.connect(self.host.path, paced=True)
        # a checkpoint on close is the write connection's job (and never after a fault: see NodeStore.close)
        conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
        self._conn = conn
        try:
            self._thread.start()
        except BaseException:  # (e.g. "can't start new thread"): the connection must not outlive the failed open
            self._conn = None
            conn.close()
            raise

    def on_commit(self, seconds: float, requests: int) -> None:
        """After each commit (on the committing thread): wake the thread if frames wait to be copied or
        the WAL is due to restart."""
        hw = self.host.hwm
        if hw is None or self._wake.is_set():
            return
        _, mx, backfilled = hw.current()
        if mx - backfilled >= self.pages or mx >= self.restart_pages:
            self._wake.set()

    def _alive(self) -> bool:
        host = self.host
        return not (self._stop or host.closed or host.fault is not None)

    def _checkpoint(self, conn: apsw.Connection, mode: str) -> tuple[int, int, int]:
        t = time.perf_counter()
        busy, frames, copied = (int(v) for v in conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()[0])  # type: ignore[arg-type]  # three integers
        self.checkpoints += 1
        self.seconds += time.perf_counter() - t
        return busy, frames, copied

    def _run(self) -> None:
        conn = self._conn
        assert conn is not None, "set by start()"
        last_copied = -1
        while True:
            self._wake.wait()
            self._wake.clear()
            if not self._alive():
                return
            self.host.governor.pace()  # the bulk copy yields to the log's commits
            if not self._alive():
                return
            try:
                _, frames, copied = self._checkpoint(conn, "PASSIVE")
                if frames >= self.restart_pages and frames - copied <= self.pages and self._alive():
                    self.full_attempts += 1
                    conn.setbusytimeout(RESTART_WAIT_MS)
                    try:
                        busy, frames, copied = self._checkpoint(conn, "FULL")
                    finally:
                        conn.setbusytimeout(_BUSY_MS)
                    if not busy:
                        self.restarts += 1
            except Exception as exc:  # apsw.Error, and an OSError from the paced VFS's own syncs (EIO): SQLite
                # may have written raft.db partly; a thread that died silently would leave the WAL growing
                self.host.fail(exc)
                log.error("%s: background checkpoint failed, store is now fail-stop: %s", self.host.path, exc)
                return
            if copied == last_copied and frames > copied:  # nothing more could be copied: a reader holds
                time.sleep(_IDLE_PAUSE)                    # the WAL back
            last_copied = copied
            # work left (a burst outran this pass, or the WAL is due to restart): go on without waiting for
            # another commit, which may never come (found by CI: after a burst of NORMAL commits the WAL
            # stayed unrestarted until the next commit)
            if frames - copied >= self.pages or (frames >= self.restart_pages and copied < frames):
                self._wake.set()

    def stop(self) -> None:
        """Stop the thread (waiting for a checkpoint in progress) and close its connection."""
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._conn is not None:
            try:
                self._conn.close()
            except apsw.Error as exc:  # closing only releases memory and locks here
                log.warning("%s: closing the checkpoint connection failed: %s", self.host.path, exc)
            self._conn = None
