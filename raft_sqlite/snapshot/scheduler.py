"""Background captures: :class:`SnapshotScheduler` runs the user's capture function for one group on
its own thread when enough entries were applied or enough time passed, off the append path."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Self

from .. import layout
from ..args import float_arg, int_arg
from .manager import SnapshotManager
from .manifest import SnapshotMeta

log = logging.getLogger("raft_sqlite.snapshot")


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

    def __init__(self, store: Any, group: str, capture: Callable[[], SnapshotMeta | None], *,
                 every_entries: int | None = 10_000, every_seconds: float | None = None,
                 applied_index: Callable[[], int] | None = None, compact_lag: int | None = None,
                 poll_interval: float = 0.5):  # store: the lead types it as Kernel
        if every_entries is None and every_seconds is None:
            raise ValueError("give every_entries and/or every_seconds")
        if every_entries is not None:
            every_entries = int_arg("every_entries", every_entries, 1, layout.MAX_INDEX)
        if compact_lag is not None:
            compact_lag = int_arg("compact_lag", compact_lag, 0, layout.MAX_INDEX)
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
        self.applied_index: Callable[[], int] = applied_index or (lambda: store.kernel.group(group).commit)
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
        if self.store.kernel.closed:  # a scheduler left running past close: nothing is due, quietly
            return False
        applied = self.applied_index()
        since = applied - self.store.kernel.group(self.group).snapshot_index
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

    def _loop(self) -> None:
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

    def start(self) -> Self:
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

    def __exit__(self, *exc: object) -> None:
        self.stop()

