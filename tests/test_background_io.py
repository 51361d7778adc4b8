"""Background I/O isolation (issue 13): raft.db's background checkpointer, the paced VFS that syncs
background writers in small pieces, the hot backup's sync pieces and the pauses of compaction. Speed is
measured by ``benchmarks/background.py``; these tests check behaviour: what runs, what it syncs, that
nothing acknowledged is lost, and that no background I/O happens after a fault or a close."""

import os
import threading
import time
from itertools import count

import apsw
import pytest

from raft_sqlite import FsyncMode, HotBackupManager, LogEntry, fsio
from raft_sqlite import governor as governor_mod
from raft_sqlite.checkpointer import Checkpointer
from raft_sqlite.governor import IoGovernor
from raft_sqlite.pacedvfs import paced_vfs
from raft_sqlite.wal import SegmentPolicy
from tests.conftest import open_store
from tests.support.faultvfs import FaultVFS, quiet_injected_faults

_names = count()


def _wait(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.005)
    return pred()


def _threads(prefix):
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


# ------------------------------------------------------------------------------ the checkpointer
@pytest.mark.parametrize("mode", [FsyncMode.FULL, FsyncMode.NORMAL, FsyncMode.EXTRA])
def test_checkpointer_copies_the_wal_off_the_commit_path_and_nothing_is_lost(tmp_path, mode):
    d = tmp_path / "n"
    s = open_store(d, fsync=mode)
    try:
        ck = s.kernel.checkpointer
        assert ck is not None and _threads("raft_sqlite-checkpoint-n1")
        lg = s.log("g")
        blob = os.urandom(4096)
        lg.append([LogEntry(1, 1, blob + (1).to_bytes(4, "big"))])
        salt0 = s.kernel.hwm.current()[0]
        for i in range(2, 601):  # single appends: each commit adds 2-3 WAL frames (> 1,200 in all), 256 wake it
            lg.append([LogEntry(i, 1, blob + i.to_bytes(4, "big"))])
        assert _wait(lambda: ck.checkpoints >= 1), "the background checkpointer never ran"
        assert s.kernel.conn.execute("PRAGMA wal_autocheckpoint").fetchall() == [(0,)]  # commits never copy

        def quiet():  # the thread's own stopping rule: nothing more it would copy or complete
            _, mx, copied = s.kernel.hwm.current()
            return mx - copied < ck.pages and (mx < ck.restart_pages or mx == copied)
        assert _wait(quiet), f"the checkpointer left work undone: {s.kernel.hwm.current()[1:]}"
        for i in range(601, 611):
            lg.append([LogEntry(i, 1, blob + i.to_bytes(4, "big"))])
        # more frames were written than the WAL now holds: it restarted from its beginning (new salts; by
        # the thread's FULL checkpoint or by a commit that found every frame copied: which of the two varies
        # with the machine's load, so neither is asserted alone), and it never grew past its working size
        salt, mx, _ = s.kernel.hwm.current()
        assert salt != salt0 and mx < ck.restart_pages + 50, (mx, ck.checkpoints, ck.restarts)
    finally:
        s.close()
    assert not _threads("raft_sqlite-checkpoint-n1"), "the thread outlived the store"
    s = open_store(d, fsync=mode)
    try:
        got = s.log("g").entries(1, 611)
        assert [e.index for e in got] == list(range(1, 611))
        assert all(e.data == blob + e.index.to_bytes(4, "big") for e in got)
    finally:
        s.close()


def test_a_wal_grown_behind_a_reader_is_copied_in_the_background(tmp_path):
    d = tmp_path / "n"
    s = open_store(d, fsync=FsyncMode.FULL)
    try:
        lg, bulk = s.log("g"), s.log("bulk")
        lg.append([LogEntry(1, 1, b"x")])
        reader = apsw.Connection(s.path)  # a long read (a hot backup's copy holds one like it)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM node").fetchall()
        blob = os.urandom(4096)
        for i in range(1, 2049, 128):
            bulk.append([LogEntry(i + j, 1, blob) for j in range(128)])
        ck = s.kernel.checkpointer
        assert s.kernel.hwm.current()[1] > 2000  # the WAL grew: nothing could be copied past the reader
        time.sleep(0.05)
        # never a FULL checkpoint while the reader holds the WAL: it would hold the write lock waiting
        assert ck.full_attempts == 0
        restarts = ck.restarts
        reader.execute("COMMIT")
        reader.close()
        lg.append([LogEntry(2, 1, b"y")])  # the commit after: wakes the thread, does not copy
        assert _wait(lambda: ck.restarts > restarts), "the grown WAL was never checkpointed"
        for i in range(3, 50):
            lg.append([LogEntry(i, 1, b"z")])
        assert s.kernel.hwm.current()[1] < 1000  # restarted from its beginning
    finally:
        s.close()
    s = open_store(d, fsync=FsyncMode.FULL)
    try:
        assert s.log("g").last_index == 49 and s.log("bulk").last_index == 2048
        assert len(s.log("bulk").entries(1, 2049)) == 2048
    finally:
        s.close()


class _Host:
    """A stand-in kernel for the checkpointer: one WAL database through a fault VFS."""

    def __init__(self, path, vfs):
        self.path, self.vfs = path, vfs
        self.fault = None
        self.closed = False
        self.failed = []
        self.hwm = self
        self.governor = IoGovernor(enabled=False)

    def current(self):  # the -shm header as the checkpointer reads it: many frames waiting
        return b"", 500, 0

    def connect(self, path, *, query_only=False, paced=False):
        return apsw.Connection(path, vfs=self.vfs.name)

    def fail(self, exc):
        self.failed.append(exc)
        self.fault = exc


def _wal_db(tmp_path, vfs):
    path = str(tmp_path / "x.db")
    c = apsw.Connection(path, vfs=vfs.name)
    c.execute("PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(x)").fetchall()
    c.execute("BEGIN")
    c.executemany("INSERT INTO t VALUES (?)", [(os.urandom(1000),) for _ in range(300)])
    c.execute("COMMIT")
    return path, c


def test_a_failed_background_checkpoint_fail_stops_the_store(tmp_path):
    vfs = FaultVFS(f"ckpt{next(_names)}", root=str(tmp_path))
    path, writer = _wal_db(tmp_path, vfs)
    host = _Host(path, vfs)
    ck = Checkpointer(host, pages=10)
    ck.start()
    try:
        vfs.arm_error("write", sticky=True)
        with quiet_injected_faults():
            ck.on_commit(0.0, 1)
            assert _wait(lambda: host.failed), "the checkpoint's I/O error did not fail-stop the host"
        assert isinstance(host.failed[0], apsw.Error) and ck.checkpoints == 0
        vfs.clear_faults()
        writes = vfs.counters["writes"]
        ck.on_commit(0.0, 1)  # fail-stopped: no further checkpoint, no I/O at all
        time.sleep(0.05)
        assert vfs.counters["writes"] == writes and ck.checkpoints == 0
    finally:
        ck.stop()
        writer.close()


def test_no_background_checkpoint_after_a_fault_or_once_stopped(tmp_path):
    vfs = FaultVFS(f"ckpt{next(_names)}", root=str(tmp_path))
    path, writer = _wal_db(tmp_path, vfs)
    host = _Host(path, vfs)
    ck = Checkpointer(host, pages=10)
    ck.start()
    try:
        host.fault = OSError("an earlier fsync failed")
        writes = vfs.counters["writes"]
        ck.on_commit(0.0, 1)
        time.sleep(0.05)
        assert vfs.counters["writes"] == writes and ck.checkpoints == 0
    finally:
        ck.stop()
    assert not ck._thread.is_alive()
    host.fault = None
    ck.on_commit(0.0, 1)  # stopped: a late commit notification does nothing
    assert ck.checkpoints == 0
    writer.close()


def test_off_mode_keeps_sqlites_inline_checkpoints(store):
    assert store.kernel.checkpointer is None  # OFF keeps no high-water mark, whose -shm mapping it reads
    assert store.kernel.conn.execute("PRAGMA wal_autocheckpoint").fetchall() == [(1000,)]
    lg = store.log("g")
    for i in range(1, 301):
        lg.append([LogEntry(i, 1, os.urandom(4096))])
    row = store.kernel.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert row[1] < 1000  # SQLite's inline autocheckpoint restarted the WAL (300 x ~3 frames written)


def test_checkpointer_runs_when_enough_frames_wait(tmp_path):
    vfs = FaultVFS(f"ckpt{next(_names)}", root=str(tmp_path))
    path, writer = _wal_db(tmp_path, vfs)
    host = _Host(path, vfs)
    ck = Checkpointer(host, pages=10)
    ck.start()
    try:
        ck.on_commit(0.0, 1)
        assert _wait(lambda: ck.checkpoints == 1)
        row = writer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert row[1] == row[2], "the background checkpoint left frames uncopied"
    finally:
        ck.stop()
        writer.close()


# ------------------------------------------------------------------------------ the paced VFS (the checkpointer's)
def test_paced_vfs_syncs_every_sync_bytes_even_when_sqlite_would_not(tmp_path):
    vfs = FaultVFS(f"paced{next(_names)}", root=str(tmp_path))
    name = paced_vfs(vfs.name, 64 << 10)
    assert paced_vfs(vfs.name, 64 << 10) == name  # registered once
    c = apsw.Connection(str(tmp_path / "p.db"), vfs=name)
    c.execute("PRAGMA synchronous=OFF; PRAGMA journal_mode=WAL; CREATE TABLE t(x)").fetchall()
    syncs = vfs.counters["syncs"]
    c.execute("INSERT INTO t VALUES (?)", (os.urandom(1 << 20),))  # SQLite itself syncs nothing here
    assert vfs.counters["syncs"] - syncs >= 15  # 1 MiB in pieces of 64 KiB
    c.close()
    plain = apsw.Connection(str(tmp_path / "q.db"), vfs=vfs.name)
    plain.execute("PRAGMA synchronous=OFF; PRAGMA journal_mode=WAL; CREATE TABLE t(x)").fetchall()
    syncs = vfs.counters["syncs"]
    plain.execute("INSERT INTO t VALUES (?)", (os.urandom(1 << 20),))
    assert vfs.counters["syncs"] == syncs  # the base VFS alone: no sync, so the pacing made them
    plain.close()


def test_the_checkpointers_syncs_go_through_pinned_descriptors_without_the_gil(tmp_path, monkeypatch):
    """With SQLite's default VFS, the paced connection syncs raft.db and its WAL with os.fdatasync of the
    store's pinned descriptors (released GIL: a sync through the base VFS from Python holds it and froze every
    thread, 176 ms after an open in the measurement of pacedvfs' docstring); the VFS is gone after close."""
    from raft_sqlite import pacedvfs
    synced = []
    real = os.fdatasync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(pacedvfs.os, "fdatasync", spy)
    d = tmp_path / "n"
    before = set(apsw.vfs_names())
    s = open_store(d, fsync=FsyncMode.FULL)
    try:
        lg = s.log("g")
        for i in range(1, 41):  # ~2.5 MiB of records: several background checkpoints
            lg.append([LogEntry(i, 1, os.urandom(64 << 10))])
        assert _wait(lambda: s.kernel.checkpointer.checkpoints >= 2)
        assert _wait(lambda: any(p.endswith("raft.db") for p in synced))
        assert any(p.endswith("raft.db-wal") for p in synced)
        assert not any(p.endswith(("chunks.db", "chunks.db-wal")) for p in synced)
        added = set(apsw.vfs_names()) - before
        assert len(added) == 1 and next(iter(added)).startswith("raft_sqlite-paced-store-")
    finally:
        s.close()
    assert set(apsw.vfs_names()) - before == set()  # unregistered once the store's connections closed
    with open_store(d, fsync=FsyncMode.FULL) as s:
        assert [e.index for e in s.log("g").entries(1, 41)] == list(range(1, 41))


def test_snapshot_chunks_reach_the_disk_in_small_commits_and_survive_power_loss(tmp_path):
    vfs = FaultVFS(f"pacedstore{next(_names)}", root=str(tmp_path))
    d = tmp_path / "n"
    s = open_store(d, fsync=FsyncMode.FULL, vfs=vfs.name)
    lg = s.log("g")
    lg.append([LogEntry(1, 1, b"x")])
    s.metadata("g").set_commit_index(1)
    m = s.snapshots("g")
    data = os.urandom(3 << 20)
    syncs = vfs.counters["syncs"]
    with m.write(1, 1) as w:
        w.write(data)
    # 1 MiB commits, each followed by a 1 MiB checkpoint (fsync.CHUNKS_PRAGMAS): synced in pieces, through
    # the fault model
    assert vfs.counters["syncs"] - syncs >= 6
    image = tmp_path / "image"
    vfs.write_crash_image(str(image), mode="lose")  # power cut right after the snapshot was acknowledged
    s.kernel.fail(OSError("power cut"))
    s.close()
    s = open_store(image / "n", fsync=FsyncMode.FULL)
    try:
        meta = s.snapshots("g").latest()
        assert meta is not None and meta.index == 1
        with s.snapshots("g").open(meta) as r:
            assert b"".join(r.chunks()) == data
    finally:
        s.close()


# ------------------------------------------------------------------------------ backup and compaction
class _CountingFS(fsio.OsFileSystem):
    def __init__(self):
        self.fdatasyncs = 0

    def fdatasync(self, fd):
        self.fdatasyncs += 1
        super().fdatasync(fd)


def _filled(path, n=600, size=4000):
    s = open_store(path, fsync=FsyncMode.FULL)
    lg = s.log("g")
    for i in range(1, n + 1, 100):
        lg.append([LogEntry(j, 1, os.urandom(size)) for j in range(i, i + 100)])
    return s


def test_backup_copy_is_synced_in_pieces_of_sync_bytes(tmp_path):
    s = _filled(tmp_path / "n")
    try:
        size = os.path.getsize(s.path)
        counting = _CountingFS()
        with fsio.installed(counting):
            info = HotBackupManager(s, tmp_path / "bk", sync_bytes=256 << 10, step_pause=0).backup()
        assert counting.fdatasyncs >= size // (256 << 10) - 1
        counting = _CountingFS()
        with fsio.installed(counting):
            HotBackupManager(s, tmp_path / "bk2", sync_bytes=0, step_pause=0).backup()
        assert counting.fdatasyncs < size // (256 << 10) // 2  # 0: no pieces (the end's syncs only)
    finally:
        s.close()
    from raft_sqlite import verify_backup
    assert verify_backup(info.path)["node_id"] == "n1"


class _TruncatingFS(fsio.OsFileSystem):
    """Records every ftruncate (the size asked) and the order of truncates and removals."""

    def __init__(self):
        self.events = []

    def ftruncate(self, fd, size):
        self.events.append(("truncate", size))
        super().ftruncate(fd, size)

    def rmtree(self, path, ignore_errors=False):
        self.events.append(("rmtree", os.path.basename(path)))
        super().rmtree(path, ignore_errors)


def test_rmtree_frees_a_big_file_in_small_steps_before_removing_it(tmp_path, monkeypatch):
    # Unlinking a big file frees all its blocks in one journal commit that the node's next fdatasync
    # waits for (a 356 MB backup: 37-100 ms); fsio.rmtree shrinks it from the end in steps first.
    monkeypatch.setattr(fsio, "SHRINK_PAUSE", 0)
    step = fsio.SHRINK_STEP_BYTES
    tree = tmp_path / "bk"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "big").write_bytes(b"x" * (3 * step + 5))
    (tree / "small").write_bytes(b"y" * 10)
    fs = _TruncatingFS()
    with fsio.installed(fs):
        fsio.rmtree(str(tree))
    assert fs.events == [("truncate", 2 * step + 5), ("truncate", step + 5), ("truncate", 5), ("rmtree", "bk")]
    assert not tree.exists()


def test_rmtree_never_shrinks_what_another_name_still_shows(tmp_path, monkeypatch):
    # A hard link (an operator keeping a backup file elsewhere) or a symlink in the tree must keep its data:
    # truncating through it would empty the other name too.
    monkeypatch.setattr(fsio, "SHRINK_PAUSE", 0)
    data = os.urandom(2 * fsio.SHRINK_STEP_BYTES + 1)
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "linked").write_bytes(data)
    (keep / "pointed").write_bytes(data)
    tree = tmp_path / "bk"
    tree.mkdir()
    os.link(keep / "linked", tree / "linked")
    os.symlink(keep / "pointed", tree / "pointed")
    os.symlink(keep, tmp_path / "dirlink")
    fs = _TruncatingFS()
    with fsio.installed(fs):
        fsio.rmtree(str(tree))
        with pytest.raises(OSError):
            fsio.rmtree(str(tmp_path / "dirlink"))  # shutil.rmtree refuses a symlink; nothing shrunk behind it
    assert [e for e in fs.events if e[0] == "truncate"] == []
    assert (keep / "linked").read_bytes() == data and (keep / "pointed").read_bytes() == data
    assert not tree.exists()


def _big_files(folder, *names):
    """Create ``folder`` (and parents) holding a random file of just over two shrink steps per name;
    returns {name: content}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {n: os.urandom(2 * fsio.SHRINK_STEP_BYTES + 1) for n in names}
    for n, d in out.items():
        (folder / n).write_bytes(d)
    return out


class _SwapOnOpen(fsio.OsFileSystem):
    """Runs ``hook(path)`` once, just before the first open of a path matching ``when``: the window
    between shrink_gradually's lstat and its open (or, for the parent-swap case, between two files)."""

    def __init__(self, when, hook):
        self.when, self.hook, self.done = when, hook, False

    def open(self, path, flags, mode=0o600):
        if not self.done and self.when(path):
            self.done = True
            self.hook(path)
        return super().open(path, flags, mode)


def test_rmtree_never_shrinks_a_hard_link_swapped_in_after_the_check(tmp_path, monkeypatch):
    monkeypatch.setattr(fsio, "SHRINK_PAUSE", 0)
    # (found by review) lstat says "regular, one link"; before the open the name is replaced by a hard link
    # to a file outside the tree: the opened file must be checked again (same inode, one link).
    data = os.urandom(2 * fsio.SHRINK_STEP_BYTES + 1)
    outside = tmp_path / "raft.db"
    outside.write_bytes(data)
    tree = tmp_path / "bk"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(2 * fsio.SHRINK_STEP_BYTES + 1))

    def swap(path):
        os.link(outside, str(tree / "tmp"))
        os.replace(str(tree / "tmp"), path)

    with fsio.installed(_SwapOnOpen(lambda p: p.endswith("/big"), swap)):
        fsio.rmtree(str(tree))
    assert not tree.exists()
    assert outside.read_bytes() == data, f"outside file truncated to {outside.stat().st_size} bytes"


def test_rmtree_never_shrinks_through_a_directory_swapped_for_a_symlink(tmp_path, monkeypatch):
    monkeypatch.setattr(fsio, "SHRINK_PAUSE", 0)
    # (found by review) O_NOFOLLOW guards only the last component: once a directory of the tree is replaced
    # by a symlink while its files are being shrunk, a file's path resolves outside the tree.
    keep = tmp_path / "keep" / "deep"
    outside = _big_files(keep, "a", "b")
    tree = tmp_path / "bk"
    deep = tree / "sub" / "deep"
    _big_files(deep, *outside)

    def swap(_path):
        os.rename(str(tree / "sub"), str(tmp_path / "moved"))
        os.symlink(str(tmp_path / "keep"), str(tree / "sub"))

    with fsio.installed(_SwapOnOpen(lambda p: "/deep/" in p, swap)):
        fsio.rmtree(str(tree), ignore_errors=True)
    sizes = {n: (keep / n).stat().st_size for n in outside}
    assert sizes == {n: len(d) for n, d in outside.items()}, f"outside files truncated: {sizes}"


def test_rmtree_does_not_block_on_a_fifo_swapped_in(tmp_path, monkeypatch):
    monkeypatch.setattr(fsio, "SHRINK_PAUSE", 0)
    # (found by review) open(O_WRONLY) without O_NONBLOCK blocks forever on a FIFO with no reader: a prune
    # (holding the backup lock) would hang.
    tree = tmp_path / "bk"
    tree.mkdir()
    (tree / "big").write_bytes(b"x" * (2 * fsio.SHRINK_STEP_BYTES + 1))

    def swap(path):
        os.unlink(path)
        os.mkfifo(path)

    done = threading.Event()

    def run():
        with fsio.installed(_SwapOnOpen(lambda p: p.endswith("/big"), swap)):
            fsio.rmtree(str(tree))
        done.set()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    finished = done.wait(3)
    if not finished:  # unblock the writer so the thread can end
        fd = os.open(str(tree / "big"), os.O_RDONLY | os.O_NONBLOCK)
        th.join(3)
        os.close(fd)
    assert finished, "fsio.rmtree blocked opening a FIFO for writing"


class _SwapAfterOpen(fsio.OsFileSystem):
    """Runs ``hook()`` once, right after the first open of a path matching ``when`` (an attacker who times
    the swap while the first big file is being shrunk: SHRINK_PAUSE x steps gives a wide window)."""

    def __init__(self, when, hook):
        self.when, self.hook, self.done = when, hook, False

    def open(self, path, flags, mode=0o600):
        fd = super().open(path, flags, mode)
        if not self.done and self.when(path):
            self.done = True
            self.hook()
        return fd


def test_abandoned_drill_folders_planted_in_a_shared_tmp_cannot_reach_a_live_node(tmp_path, monkeypatch):
    monkeypatch.setattr(fsio, "SHRINK_PAUSE", 0)
    # (found by review) drill()'s scratch parent defaults to the temporary directory (world-writable), where
    # _remove_abandoned_downloads removes ".raft_sqlite-drill-*" folders nobody locks. One planted there
    # (here by this user: folders of other users are skipped anyway) whose directory is swapped for a
    # symlink to a live node's parent while its first big file is shrunk must not reach the node's files.
    from raft_sqlite import backup


    shared = tmp_path / "tmp"  # stands for /tmp
    shared.mkdir()
    node_parent = tmp_path / "var-lib-raft"
    data_dir = node_parent / "node1"
    live = _big_files(data_dir, "raft.db", "chunks.db")
    evil = shared / ".raft_sqlite-drill-evil"
    _big_files(evil / "sub" / "node1", *live)
    (evil / backup._LOCK_NAME).write_bytes(b"")

    def swap():
        os.rename(str(evil / "sub"), str(shared / "elsewhere"))
        os.symlink(str(node_parent), str(evil / "sub"))

    with fsio.installed(_SwapAfterOpen(lambda p: "/sub/node1/" in p, swap)):
        backup._remove_abandoned_downloads(str(shared), backup._DRILL_PREFIX)
    sizes = {n: (data_dir / n).stat().st_size for n in live}
    assert sizes == {n: len(d) for n, d in live.items()}, f"the live node's files were truncated: {sizes}"


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root to chown")
def test_abandoned_download_folders_of_other_users_are_left_alone(tmp_path):
    from raft_sqlite import backup

    theirs = tmp_path / (backup._DRILL_PREFIX + "theirs")
    theirs.mkdir()
    (theirs / backup._LOCK_NAME).write_bytes(b"")
    os.chown(theirs, 65534, 65534)
    ours = tmp_path / (backup._DRILL_PREFIX + "ours")
    ours.mkdir()
    (ours / backup._LOCK_NAME).write_bytes(b"")
    backup._remove_abandoned_downloads(str(tmp_path), backup._DRILL_PREFIX)
    assert theirs.exists() and not ours.exists()


def test_rmtree_takes_a_path_object_like_shutil(tmp_path, monkeypatch):
    monkeypatch.setattr(fsio, "SHRINK_PAUSE", 0)
    tree = tmp_path / "bk"
    tree.mkdir()
    (tree / "big").write_bytes(b"x" * (fsio.SHRINK_STEP_BYTES + 1))
    fsio.rmtree(tree)  # (found by review) a pathlib.Path, as shutil.rmtree takes
    assert not tree.exists()


def test_a_new_scratch_folder_is_never_taken_for_an_abandoned_one(tmp_path, monkeypatch):
    # (found by review) between creating its lock file and locking it, another restore starting in the same
    # parent took the new folder for a killed restore's and removed it
    import fcntl

    from raft_sqlite import backup

    real_flock = fcntl.flock
    raced = []

    def flock(fd, op):
        if not raced and op == fcntl.LOCK_EX:
            raced.append(1)
            backup._remove_abandoned_downloads(str(tmp_path), "dl-")  # another restore starting
        return real_flock(fd, op)

    monkeypatch.setattr(backup.fcntl, "flock", flock)
    with backup._locked_scratch(str(tmp_path), "dl-") as folder:
        assert raced and os.path.isdir(folder), "the scratch folder of a running restore was removed"
    assert not os.path.exists(folder)


def test_prune_removes_the_manifest_first_so_a_killed_prune_leaves_an_incomplete_folder(tmp_path):
    s = _filled(tmp_path / "n", n=100)
    try:
        m = HotBackupManager(s, tmp_path / "bk")
        old, new = m.backup(), m.backup()

        class _Killed(fsio.OsFileSystem):  # the prune dies as its folder removal starts
            def rmtree(self, path, ignore_errors=False):
                raise KeyboardInterrupt

        with fsio.installed(_Killed()), pytest.raises(KeyboardInterrupt):
            m.prune(keep=1)
        # not "complete" (restore --latest would try it) nor "corrupt" (left for the operator forever)
        assert {b["path"]: b["status"] for b in m.list()} == {new.path: "complete", old.path: "incomplete"}
        assert m.prune(keep=1) == [old.path]
        assert [b["path"] for b in m.list()] == [new.path] and not os.path.exists(old.path)
    finally:
        s.close()


@pytest.mark.parametrize("kw, exc", [({"sync_bytes": -1}, ValueError), ({"sync_bytes": "1"}, TypeError),
                                     ({"sync_bytes": 1.5}, TypeError), ({"pages_per_step": 0}, ValueError)])
def test_backup_sync_bytes_is_checked(tmp_path, store, kw, exc):
    with pytest.raises(exc):
        HotBackupManager(store, tmp_path / "bk", **kw)
    assert not (tmp_path / "bk").exists()


@pytest.mark.parametrize("busy", [False, True])
def test_compaction_pauses_between_segments_while_the_log_is_busy_and_removes_them_all(tmp_path, monkeypatch, busy):
    import raft_sqlite.kernel as kernel_mod

    s = open_store(tmp_path / "n", segment_policy=SegmentPolicy(max_entries=100))
    try:
        lg = s.log("g")
        lg.append([LogEntry(i, 1, b"p" * 50) for i in range(1, 1001)])
        s.metadata("g").set_commit_index(1000)
        with s.snapshots("g").write(900, 1) as w:
            w.write(b"state")
        pauses = []
        real_sleep = time.sleep
        other = s.log("other")

        class _Time:  # the kernel's view of the time module: sleeps are recorded
            def __getattr__(self, name):
                return getattr(time, name)

            @staticmethod
            def sleep(t):
                pauses.append(t)
                real_sleep(t)

        if busy:  # another group's commit lands between every two segments
            real_read = s.kernel.read

            def read(fn):
                other.append_next(1, [b"x"])
                return real_read(fn)

            monkeypatch.setattr(s.kernel, "read", read)
        monkeypatch.setattr(kernel_mod, "time", _Time())
        lg.compact(900)
        assert lg.first_index == 901
        gid = s.kernel.group("g").gid
        left = s.kernel.read(lambda c: c.execute("SELECT min(idx), count(*) FROM log_entries WHERE group_id=?",
                                                 (gid,)).fetchone())
        assert left == (901, 100)
        if busy:
            # nine segments removed (1..900), one commit each: a pause before each but the first, each
            # COMPACTION_PAUSE_FACTOR times the commit before it, capped
            assert len(pauses) == 8
            assert all(0 < p <= kernel_mod.COMPACTION_PAUSE_MAX for p in pauses)
        else:
            assert pauses == []  # a quiet log: full speed
    finally:
        s.close()


def test_default_segment_policy_keeps_compaction_commits_small():
    assert SegmentPolicy().max_entries == 4096


# ------------------------------------------------------------------------------ the governor
class _Clock:
    def __init__(self):
        self.now = 1000.0
        self.slept = []

    def monotonic(self):
        return self.now

    def sleep(self, t):
        self.slept.append(t)
        self.now += t


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(governor_mod, "time", c)
    return c


def test_governor_full_speed_while_the_log_is_quiet_or_fast(clock):
    g = IoGovernor(enabled=True)
    assert g.pace() == 0.0  # no commit yet
    for _ in range(20):
        g.on_commit(0.0002, 1)
        clock.now += 0.001
        assert g.pace() == 0.0  # commits at their baseline
    g.on_commit(0.010, 1)  # one slow commit, then the log goes quiet
    clock.now += 1.0
    assert not g.slow() and g.pace() == 0.0
    assert clock.slept == [] and g.pauses == 0


def test_governor_backs_off_while_commits_are_slow_then_recovers(clock):
    g = IoGovernor(enabled=True)
    for _ in range(10):
        g.on_commit(0.0002, 1)
        clock.now += 0.0005
    pauses = []
    for _ in range(10):  # background work makes every commit 5x slower
        g.on_commit(0.001, 1)
        clock.now += 0.0005
        pauses.append(g.pace())
    assert pauses[0] == governor_mod.MIN_PAUSE
    assert all(b == min(2 * a, governor_mod.MAX_PAUSE) for a, b in zip(pauses, pauses[1:]))
    assert max(pauses) == governor_mod.MAX_PAUSE
    after = []
    for _ in range(12):  # the commits are fast again: the pause halves down to none
        for _ in range(5):
            g.on_commit(0.0002, 1)
        clock.now += 0.0005
        after.append(g.pace())
    assert after[-1] == 0.0 and after[0] < governor_mod.MAX_PAUSE
    assert g.pauses == sum(1 for p in pauses + after if p) and g.paused_seconds == pytest.approx(sum(pauses + after))


def test_governor_disabled_never_pauses(clock):
    g = IoGovernor(enabled=False)
    g.on_commit(0.0001, 1)
    for _ in range(5):
        g.on_commit(0.01, 1)
    assert g.slow() and g.pace() == 0.0 and clock.slept == []


def test_every_store_has_a_governor_listening_to_its_commits(store):
    g = store.governor
    assert g is store.kernel.governor and not g.enabled  # opt-in
    before = g.commits
    store.log("g").append([LogEntry(1, 1, b"x")])
    store.log("g").append([LogEntry(2, 1, b"y")])
    assert g.commits >= before + 2


def test_snapshot_writer_asks_the_governor_before_each_commit(store):
    calls = []
    store.governor.pace = lambda: calls.append(1) or 0.0  # instance attribute: this store only
    store.log("g").append([LogEntry(1, 1, b"x")])
    store.metadata("g").set_commit_index(1)
    with store.snapshots("g").write(1, 1) as w:
        w.write(os.urandom(3 << 20))
    assert len(calls) >= 3  # 1 MiB commits: one pace() before each


def test_a_lost_wal_is_not_excused_by_the_background_checkpointers_writes(tmp_path):
    """Found by review: the open accepts a missing WAL when raft.db was written after the high-water mark
    (another connection completed a checkpoint and deleted the WAL). The background checkpointer's partial
    passes write raft.db after the mark too: the mark now says so (BACKGROUND), and the loss is reported."""
    import shutil

    from raft_sqlite import CorruptionError
    from raft_sqlite.sqlitewal import read_mark

    d = tmp_path / "n"
    s = open_store(d, fsync=FsyncMode.FULL)
    try:
        lg = s.log("g")
        lg.append([LogEntry(1, 1, b"x" * 5000)])
        reader = apsw.Connection(s.path)  # a reader: the background pass can copy only what precedes it
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM node").fetchall()
        blob = os.urandom(4096)
        for i in range(2, 200):
            lg.append([LogEntry(i, 1, blob)])
        ck = s.kernel.checkpointer
        assert _wait(lambda: ck.checkpoints >= 1)
        assert read_mark(s.path).background
        img = tmp_path / "img"
        img.mkdir(mode=0o700)
        for name in ("raft.db", "raft.db-hwm", "chunks.db", "chunks.db-wal"):  # the crash image, WAL lost
            shutil.copy2(d / name, img / name)
        mark_ns = os.stat(img / "raft.db-hwm").st_mtime_ns
        os.utime(img / "raft.db", ns=(mark_ns + 10**9, mark_ns + 10**9))  # written after the mark
        reader.execute("COMMIT")
        reader.close()
    finally:
        s.close()
    assert not read_mark(s.path).background  # a clean close clears it: mtime is evidence again
    with pytest.raises(CorruptionError, match="never as checkpointed"):
        open_store(img, fsync=FsyncMode.FULL)
