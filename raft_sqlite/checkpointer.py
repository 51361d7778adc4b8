"""Checkpoints of raft.db's WAL off the commit path: :class:`Checkpointer`.

Why: SQLite checkpoints in the connection that commits (``wal_autocheckpoint``): every ~1000 WAL pages
the commit that crossed the line also copies 4 MiB into raft.db and fsyncs it, and every append queued
behind that commit waits for it (measured: batches of 1024 entries had a p99 ten times their p50).
Here a thread with its own connection runs a PASSIVE checkpoint as soon as :data:`CHECKPOINT_PAGES`
frames wait to be copied, while the committer goes on: the copy reaches the disk in small pieces, and
the commit path only sees it as disk traffic.

SQLite's own autocheckpoint stays on the write connection (``fsync.COMMON_PRAGMAS``) as the backstop:
a PASSIVE checkpoint copies only what was committed when it started, so under a steady stream of
commits it never quite catches up, and the WAL restarts from its beginning (rather than growing, each
commit then extending the file, which makes its fdatasync dearer) only after a *complete* checkpoint.
When the WAL reaches the autocheckpoint size, the committer completes the checkpoint itself, copying
only the few frames the background one had not reached yet.

Contract: the thread never runs a checkpoint once the store is fail-stopped (the fail-stop rule: no I/O
after a storage fault) or closing; a checkpoint that fails fail-stops the store, as it does when it
runs inside a commit. It syncs the WAL before copying and raft.db after (the connection has the store's
pragmas), so the high-water mark's rules hold whoever checkpointed (see ``sqlitewal``).
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

import apsw

from .fsync import COMMON_PRAGMAS
from .sqlitewal import HighWaterMark

log = logging.getLogger("raft_sqlite")

#: Frames (4 KiB pages of raft.db) waiting to be copied that start a background checkpoint: 1 MiB, so a
#: checkpoint sends at most about that much to the disk at once (``wal_autocheckpoint`` is 1000).
CHECKPOINT_PAGES = 256


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

    def connect(self, path: str, *, query_only: bool = False, paced: bool = False) -> apsw.Connection: ...

    def fail(self, exc: BaseException) -> None: ...


class Checkpointer:
    """A thread that checkpoints raft.db's WAL whenever ``pages`` frames are waiting (a
    :class:`~raft_sqlite.commit.CommitListener`: each commit checks the WAL index, which costs a read of
    the mapped -shm header). Counters: :attr:`checkpoints`, :attr:`seconds` (time spent in them)."""

    def __init__(self, host: CheckpointHost, *, pages: int = CHECKPOINT_PAGES, name: str = "raft_sqlite-checkpoint"):
        self.host = host
        self.pages = pages
        #: SQLite's own autocheckpoint size on the write connection (frames)
        self.inline_pages = int(COMMON_PRAGMAS["wal_autocheckpoint"])
        self.checkpoints = 0
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
        self._thread.start()

    def on_commit(self, seconds: float, requests: int) -> None:
        """After each commit (on the committing thread): wake the thread if enough frames wait."""
        hw = self.host.hwm
        if hw is None or self._wake.is_set():
            return
        _, mx, backfilled = hw.current()
        # past the autocheckpoint size the committer completes the checkpoint itself (see the module doc);
        # a background checkpoint then would only make SQLite's inline one give up (SQLITE_BUSY) and the
        # WAL grow on (seen in NORMAL mode, where commits come fast enough to keep this thread busy)
        if mx - backfilled >= self.pages and mx < self.inline_pages:
            self._wake.set()

    def _run(self) -> None:
        import time

        conn = self._conn
        assert conn is not None, "set by start()"
        while True:
            self._wake.wait()
            self._wake.clear()
            host = self.host
            if self._stop or host.closed or host.fault is not None:
                return
            t = time.perf_counter()
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except apsw.Error as exc:
                host.fail(exc)
                log.error("%s: background checkpoint failed, store is now fail-stop: %s", host.path, exc)
                return
            self.checkpoints += 1
            self.seconds += time.perf_counter() - t

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
