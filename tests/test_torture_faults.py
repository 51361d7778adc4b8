"""Torture campaign 3: I/O errors and disk full.

For each operation type (group creation, append, append batch, set_term_and_vote, set_commit_index,
truncate_after, transaction) the fault VFS fails the Nth xWrite / xSync / xTruncate the operation makes,
for every N, with SQLITE_IOERR_* and with SQLITE_FULL. Checks: the operation raises a typed
StorageFault whose message names the data_dir and the error; the store is fail-stop (``store.fault``
is set, every later write raises StorageFault and touches no file, and nothing is written or synced
again, not even by SQLite's checkpoint on close); after the fault is gone a reopen holds every
acknowledged write (the failed one may or may not be there: its outcome is unknown). Then a real
disk-full test on a 2 MiB tmpfs (skipped if mounting is not permitted).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time

import pytest

from raft_sqlite import FsyncMode, LogEntry, RaftSqliteError, StorageFault
from tests import torture as T
from tests.support.tmpfs import mounted_tmpfs

KINDS = ("write", "sync", "truncate")
WL = T.Workload(11, ops_per_group=40)
OP_TYPES = ("create", "append", "append_batch", "term_vote", "commit", "truncate", "tx") + (
    ("snapshot", "compact") if WL.snapshots else ())
CHECKPOINT_EVERY = 8  # checkpoints (and their writes/syncs/truncates) inside single operations


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return T.make_template(tmp_path_factory.mktemp("tpl") / "store")


def targets():
    """For each op type, positions in WL.order of up to three operations of that type."""
    out = {t: [] for t in OP_TYPES}
    for pos, (g, k) in enumerate(WL.order):
        kind = WL.ops(g)[k - 1].kind
        if pos > 0 and len(out[kind]) < 3:
            out[kind].append(pos)
    assert all(out.values()), out
    return out


def start(template, tmp_path, name, pos, fsync=FsyncMode.FULL):
    """A store through a fresh fault VFS, with WL.order[:pos] done (acknowledged)."""
    live = T.copy_store(template, str(tmp_path / name))
    vfs = T.new_vfs(live)
    store = T.open_store(live, vfs=vfs.name, fsync=fsync, checkpoint_every=CHECKPOINT_EVERY)
    acked = {g: 0 for g in WL.groups}
    T.run_workload(store, WL, acked, upto=pos)
    return live, vfs, store, acked


def later_writes(store, g):
    """Write attempts of every kind on a faulted store."""
    yield lambda: store.log(g).append([LogEntry(store.log(g).last_index + 1, 99, b"x")])
    yield lambda: store.metadata(g).set_term_and_vote(10_000, None)
    yield lambda: store.metadata(g).set_commit_index(store.metadata(g).commit_index)
    yield lambda: store.log(g).truncate_after(store.log(g).last_index)
    yield lambda: store.log("brand-new-group")

    def tx():
        with store.transaction():
            store.metadata(g).set_term_and_vote(10_001, None)
    yield tx


def inject(template, tmp_path, tally, name, pos, kind, nth, error, sticky=False, fsync=FsyncMode.FULL):
    """One injection; returns True if the fault hit the operation. Asserts every check."""
    live, vfs, store, acked = start(template, tmp_path, name, pos, fsync)
    g, k = WL.order[pos]
    op = WL.ops(g)[k - 1]
    vfs.arm_error(kind, nth=nth, error=error, sticky=sticky)
    try:
        try:
            T.execute(store, op)
        except StorageFault as exc:
            raised = exc
        else:
            raised = None
            acked[g] = k
        if raised is None:  # the op made fewer than nth calls of this kind
            vfs.clear_faults()
            return False
        tally.faults += 1
        msg = str(raised)
        assert live in msg and "storage fault" in msg and ("IOError" in msg or "FullError" in msg), msg
        assert store.fault is not None
        before = dict(vfs.counters)
        for attempt in later_writes(store, g):
            with pytest.raises(StorageFault, match="fail-stop"):
                attempt()
        store.close()  # no checkpoint-on-close: nothing is written or synced again after a fault
        assert vfs.counters == before, f"{op} {kind}#{nth}: I/O after the fault: {before} -> {vfs.counters}"
    finally:
        store.close()
        vfs.clear_faults()
        vfs.unregister()
    v = T.check_store(live, WL, acked)
    tally.add(v, f"{op} {kind}#{nth} {error}{' sticky' if sticky else ''}")
    tally.crash_states += 1
    # ... and the reopened store takes writes again through the (now healthy) fault VFS
    vfs2 = T.new_vfs(live)
    with T.open_store(live, vfs=vfs2.name) as s:
        s.metadata(g).set_term_and_vote(s.metadata(g).current_term + 1, None)
    vfs2.unregister()
    shutil.rmtree(live)
    return True


def calls_made(template, tmp_path, pos, fsync=FsyncMode.FULL):
    """Dry run: {kind: number of calls} the operation at ``pos`` makes."""
    live, vfs, store, _ = start(template, tmp_path, "dry", pos, fsync)
    g, k = WL.order[pos]
    before = dict(vfs.counters)
    T.execute(store, WL.ops(g)[k - 1])
    after = dict(vfs.counters)
    store.close()
    vfs.unregister()
    shutil.rmtree(live)
    return {kind: after[kind + "s"] - before[kind + "s"] for kind in KINDS}


def spread(n: int, cap: int | None) -> list[int]:
    """1..n, or ``cap`` values spread evenly over it (first and last included)."""
    if cap is None or n <= cap:
        return list(range(1, n + 1))
    return sorted({1 + round(i * (n - 1) / (cap - 1)) for i in range(cap)})


def io_error_campaign(template, tmp_path, name, positions_per_type, cap):
    t0 = time.monotonic()
    tally = T.Tally(name)
    per_type, per_kind = {}, dict.fromkeys(KINDS, 0)
    with T.quiet():
        for op_type, positions in targets().items():
            n = 0
            for pos in positions[:positions_per_type]:
                calls = calls_made(template, tmp_path, pos)
                for kind in KINDS:
                    for nth in spread(calls[kind], cap):
                        for error in ("ioerr", "full"):
                            assert inject(template, tmp_path, tally, f"r{tally.faults}", pos, kind, nth, error), \
                                (op_type, pos, kind, nth)
                            n += 1
                            per_kind[kind] += 1
            per_type[op_type] = n
    tally.seconds = time.monotonic() - t0
    tally.notes.append("faults per operation type: " + ", ".join(f"{k} {v}" for k, v in per_type.items()))
    tally.notes.append("faults per call: " + ", ".join(f"x{k.capitalize()} {v}" for k, v in per_kind.items()))
    T.print_table("I/O-error campaign", [tally])
    tally.assert_clean()
    assert all(per_type.values()), per_type
    return tally


def test_io_errors_at_every_call_of_every_operation(template, tmp_path):
    """CI: two operations of each type; the Nth write/sync/truncate for every N (at most 6 values
    of N spread over the calls when an operation makes more, e.g. a snapshot)."""
    tally = io_error_campaign(template, tmp_path, "I/O errors (CI)", 2, 6)
    assert tally.faults >= 200


@pytest.mark.slow
def test_io_errors_at_every_call_of_every_operation_slow(template, tmp_path):
    """Three operations of each type, every N."""
    tally = io_error_campaign(template, tmp_path, "I/O errors (slow)", 3, None)
    # every call is enumerated, so the count is what the operations make: 692 since chunks.db has 64 KiB
    # pages (a snapshot's chunk write makes 16x fewer page writes than with 4 KiB pages)
    assert tally.faults >= 600


@pytest.mark.parametrize("error", ["ioerr", "full"])
def test_sticky_disk_failure_then_reopen(template, tmp_path, error):
    """The disk stays broken (every later write/sync fails) until it is repaired; then a reopen has
    every acknowledged write."""
    tally = T.Tally("sticky")
    with T.quiet():
        pos = targets()["append_batch"][-1]
        for kind in ("write", "sync"):
            assert inject(template, tmp_path, tally, f"s{kind}", pos, kind, 1, error, sticky=True)
    tally.assert_clean()


def test_close_after_failed_fsync_does_not_sync_again(template, tmp_path):
    """Regression (found by this suite): after a failed fsync, close() let SQLite checkpoint on close,
    i.e. write the database and fsync the WAL again: a retried fsync can report success for data the
    kernel dropped after the first failure."""
    with T.quiet():
        live, vfs, store, acked = start(template, tmp_path, "live", 20)
        vfs.arm_error("sync", nth=1)
        g, k = WL.order[20]
        with pytest.raises(StorageFault):
            T.execute(store, WL.ops(g)[k - 1])
        before = dict(vfs.counters)
        store.close()
        assert vfs.counters == before
        vfs.unregister()
    assert T.check_store(live, WL, acked).ok


def test_failed_open_after_io_error_does_not_sync_again(template, tmp_path):
    """A sync failure while opening (recovery writes its event) raises StorageFault and closes the
    connections without another write or sync."""
    live = T.copy_store(template, str(tmp_path / "live"))
    with T.quiet():
        vfs = T.new_vfs(live)
        vfs.arm_error("sync", nth=1)
        with pytest.raises(StorageFault, match="storage fault during open"):
            T.open_store(live, vfs=vfs.name)
        assert vfs.counters["syncs"] == 1
        before = dict(vfs.counters)
        vfs.clear_faults()
        assert vfs.counters == before
        vfs.unregister()
    with T.open_store(live) as s:
        assert s.groups() == []


def test_normal_mode_interval_fsync_failure_is_fail_stop(template, tmp_path, monkeypatch):
    """NORMAL: the background WAL fdatasync fails once -> the store fail-stops, never calls
    fdatasync again (not even at close) and a reopen has everything acknowledged."""
    live = T.copy_store(template, str(tmp_path / "live"))
    calls = []

    def failing(fd):
        calls.append(fd)
        raise OSError(errno.EIO, "injected EIO")

    store = T.open_store(live, fsync=FsyncMode.NORMAL, fsync_interval=0.01)
    acked = {g: 0 for g in WL.groups}
    T.run_workload(store, WL, acked, upto=10)
    monkeypatch.setattr(os, "fdatasync", failing)
    g, k = WL.order[10]
    T.execute(store, WL.ops(g)[k - 1])
    acked[g] = k
    deadline = time.monotonic() + 5
    while store.fault is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(store.fault, OSError) and len(calls) == 1
    with pytest.raises(StorageFault, match="fail-stop.*injected EIO"):
        store.metadata(g).set_term_and_vote(10**6, None)
    store.close()
    assert len(calls) == 1
    monkeypatch.undo()
    assert T.check_store(live, WL, acked).ok


# ---------------------------------------------------------------------------------------------- real disk full
@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs (root only); skipped where mounting is not permitted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    with mounted_tmpfs(mnt, "2m"):
        yield mnt


def fill(path, leave: int) -> int:
    """Fill the filesystem of ``path`` with a file, leaving about ``leave`` bytes free."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    n = max(0, free - leave)
    with open(os.path.join(path, "filler"), "wb") as f:
        f.write(b"\0" * n)
        f.flush()
        os.fsync(f.fileno())
    return n


@pytest.mark.parametrize("leave_kib", [64, 512])
def test_real_disk_full_on_small_tmpfs(template, small_fs, leave_kib):
    """The WAL cannot grow: StorageFault (SQLITE_FULL), fail-stop, and once space is freed a reopen
    recovers every acknowledged write."""
    tally = T.Tally(f"disk full ({leave_kib} KiB free)")
    t0 = time.monotonic()
    live = T.copy_store(template, str(small_fs / "node"))
    wl = T.Workload(5, ops_per_group=400)
    acked = {g: 0 for g in wl.groups}
    store = T.open_store(live, fsync=FsyncMode.FULL)
    fill(small_fs, leave_kib * 1024)
    err = None
    try:
        T.run_workload(store, wl, acked)
    except StorageFault as exc:
        err = exc
    assert err is not None, "the workload fit in the free space: make it bigger"
    tally.faults += 1
    assert "FullError" in str(err) or "IOError" in str(err), err
    assert store.fault is not None
    g = wl.groups[0]
    for attempt in later_writes(store, g):
        with pytest.raises(StorageFault, match="fail-stop"):
            attempt()
    store.close()
    os.remove(small_fs / "filler")
    v = T.check_store(live, wl, acked)
    tally.add(v, "disk full")
    tally.crash_states += 1
    tally.seconds = time.monotonic() - t0
    tally.notes.append(f"acked before the disk filled: {acked}; error: {err}")
    T.print_table("Disk-full campaign", [tally])
    tally.assert_clean()
    assert sum(acked.values()) > 0


def test_disk_full_then_open_refuses_cleanly(template, small_fs):
    """Opening a store on a full disk either works or raises a typed error (never a raw apsw error),
    and works once space is freed."""
    live = T.copy_store(template, str(small_fs / "node"))
    fill(small_fs, 0)
    with contextlib.suppress(RaftSqliteError):
        T.open_store(live).close()
    os.remove(small_fs / "filler")
    with T.open_store(live) as s:
        assert s.groups() == []


def snapshot_position():
    return next(pos for pos, (g, k) in enumerate(WL.order) if WL.ops(g)[k - 1].kind == "snapshot")


@pytest.mark.skipif(not WL.snapshots, reason="raft_sqlite.snapshot is not there")
def test_snapshot_chunk_commit_failure_is_fail_stop(template, tmp_path):
    """Regression (found by this suite): a failed chunks.db commit (its fsync) raised StorageFault but
    left the store writable, and the writer's abort then wrote and fsynced chunks.db again (deleting
    the chunks) and replaced the original error with a secondary one."""
    pos = snapshot_position()
    g, k = WL.order[pos]
    for nth in range(1, 20):  # find the first sync of chunks.db in the snapshot's write
        with T.quiet():
            live, vfs, store, acked = start(template, tmp_path, f"live{nth}", pos)
            vfs.arm_error("sync", nth=nth)
            with pytest.raises(StorageFault) as exc:
                T.execute(store, WL.ops(g)[k - 1])
            if "chunks.db" not in str(exc.value):
                store.close()
                vfs.unregister()
                continue
            assert "storage fault during snapshot chunk write (IOError" in str(exc.value)
            assert store.fault is not None
            before = dict(vfs.counters)
            for attempt in later_writes(store, g):
                with pytest.raises(StorageFault, match="fail-stop"):
                    attempt()
            store.close()
            assert vfs.counters == before
            vfs.unregister()
        v = T.check_store(live, WL, acked)
        assert v.ok, v.detail
        return
    pytest.fail("no chunks.db sync in the snapshot write")


def test_failed_frame_write_after_wal_restart_reopens(template, tmp_path):
    """A checkpoint backfilled the whole WAL; the next commit restarts the WAL (new header, new salts)
    and its first frame write fails (or the process dies right there). Every frame of the previous
    generation is in the database file: the store must reopen with everything acknowledged."""
    with T.quiet():
        for nth in (1, 2, 3):
            live, vfs, store, acked = start(template, tmp_path, f"live{nth}", 1)
            store.kernel.conn.execute("PRAGMA wal_checkpoint(FULL)").fetchall()
            vfs.arm_error("write", nth=nth)
            g, k = WL.order[1]
            with pytest.raises(StorageFault):
                T.execute(store, WL.ops(g)[k - 1])
            store.close()
            vfs.clear_faults()
            vfs.unregister()
            v = T.check_store(live, WL, acked)
            assert v.ok, (nth, v.detail)


def test_read_needing_a_new_connection_after_power_loss_is_a_storage_fault(template, tmp_path):
    """Regression (found by the threaded power-loss campaign): a read that had to open a new pooled
    connection after the disk had gone (here: after a simulated power cut) leaked apsw's IOError
    instead of raising StorageFault, for log reads and for snapshot chunk reads alike."""
    live, vfs, store, acked = start(template, tmp_path, "live", 5)
    try:
        with T.quiet():
            g = WL.groups[0]
            lg = store.log(g)
            lg.append([LogEntry(lg.last_index + 1, 99, b"acked")])
            vfs.arm_crash(at_sync=1)
            with pytest.raises(StorageFault):
                store.log(g).append([LogEntry(store.log(g).last_index + 1, 99, b"x")])
            assert vfs.crashed
            # empty both read pools so the next reads must open connections on the dead disk
            store.kernel._readers.clear()
            sstore = store.snapshots(g)._sstore
            sstore._readers.clear()
            with pytest.raises(StorageFault, match="IOError"):
                lg.entries(lg.last_index, lg.last_index + 1)
    finally:
        store.close()
        vfs.unregister()
    # the disk goes away while the store is idle (not fail-stopped): a chunk read needing a new connection
    live, vfs, store, acked = start(template, tmp_path, "live2", 5)
    try:
        with T.quiet():
            sstore = store.snapshots(WL.groups[0])._sstore
            sstore._readers.clear()
            vfs.crashed = True
            with pytest.raises(StorageFault, match="IOError"):
                sstore.chunk_shape(1)
    finally:
        store.close()
        vfs.unregister()
