"""A disk that fills up during a snapshot, on a real (small tmpfs) file system.

The snapshot's own write fails (StorageFault, the store fail-stops); every later open must succeed
without anyone deleting files by hand: the partial snapshot is dropped and its space given back, every
acknowledged log entry and every DURABLE snapshot is intact, and later snapshots work. Opening while the
disk is still full works through the disk reserve (raft_sqlite.reserve)."""

import os

import pytest
from conftest import open_store

from raft_sqlite import FsyncMode, LogEntry, StorageFault, layout
from tests.support.tmpfs import mounted_tmpfs

G = "g"
MiB = 1 << 20


@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs mounted for this test only (skipped where mounting is not permitted)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted_tmpfs(mnt, "8m"):
        yield mnt


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill_to(path, leave):
    """A filler file taking all but ``leave`` bytes of the file system."""
    filler = os.path.join(path, "filler")
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free_bytes(path) - leave))
    return filler


def payload(i):
    return b"entry-%06d|" % i + bytes([i % 251]) * 200


def setup_node(d):
    """100 acknowledged entries, committed; a DURABLE snapshot at 50."""
    with open_store(d, fsync=FsyncMode.FULL) as s:
        s.log(G).append([LogEntry(i, 1, payload(i)) for i in range(1, 101)])
        s.metadata(G).set_commit_index(100)
        m = s.snapshots(G)
        with m.write(50, 1) as w:
            w.write(b"durable-state@50" * 1000)
        return w.meta


def big_snapshot(s, index, nbytes, commit_bytes):
    m = s.snapshots(G)
    m.commit_bytes = commit_bytes
    rnd = os.urandom(MiB)  # incompressible anyway (tmpfs does not compress); one buffer reused
    with pytest.raises(StorageFault), m.write(index, 1) as w:
        left = nbytes
        while left > 0:
            w.write(rnd[:min(left, MiB)])
            left -= MiB


def check_state(s, durable, extra=()):
    log = s.log(G)
    assert (log.first_index, log.last_index, s.metadata(G).commit_index) == (1, 100 + len(extra), 100 + len(extra))
    got = log.entries(1, log.last_index + 1)
    assert [e.data for e in got] == [payload(i) for i in range(1, 101)] + list(extra)
    metas = s.snapshots(G).list()
    assert [m.status for m in metas] == ["DURABLE"] * len(metas)
    assert metas[0] == durable or metas[0].id == durable.id
    with s.snapshots(G).open(metas[0]) as r:
        assert r.read() == b"durable-state@50" * 1000
    assert s.snapshots(G).pending_install() is None
    return metas


def reopen_and_snapshot_again(d, durable):
    with open_store(d, fsync=FsyncMode.FULL) as s:
        check_state(s, durable)
        with s.snapshots(G).write(100, 1) as w:
            w.write(b"later-state@100" * 1000)
        s.log(G).append([LogEntry(101, 1, b"after")])
        s.metadata(G).set_commit_index(101)
    with open_store(d, fsync=FsyncMode.FULL) as s:
        metas = check_state(s, durable, [b"after"])
        assert metas[-1].index == 100
        with s.snapshots(G).open(metas[-1]) as r:
            assert r.read() == b"later-state@100" * 1000


@pytest.mark.parametrize("commit_bytes", [8 * MiB, 256 * 1024], ids=["batch-uncommitted", "batches-committed"])
def test_snapshot_fills_disk_reopen_while_full_then_after_freeing(small_fs, commit_bytes):
    d = small_fs / "node"
    durable = setup_node(d)
    assert os.path.getsize(d / layout.RESERVE_FILE) == layout.DISK_RESERVE_BYTES
    filler = fill_to(small_fs, 2 * MiB)
    s = open_store(d, fsync=FsyncMode.FULL)
    big_snapshot(s, 100, 6 * MiB, commit_bytes)
    with pytest.raises(StorageFault):  # fail-stop: nothing more is written after the failed write
        s.log(G).append([LogEntry(101, 1, b"x")])
    s.close()
    assert free_bytes(small_fs) < 256 * 1024  # really full
    # reopen with the disk still full: the reserve is given back, the partial snapshot dropped
    with open_store(d, fsync=FsyncMode.FULL) as s:
        check_state(s, durable)
        assert [x["what"] for x in s.recovery_report.dropped] == ["orphan snapshot"]
    with open_store(d, fsync=FsyncMode.FULL) as s:  # and again (no reserve left, nothing to drop)
        check_state(s, durable)
    os.remove(filler)
    reopen_and_snapshot_again(d, durable)
    assert os.path.getsize(d / layout.RESERVE_FILE) == layout.DISK_RESERVE_BYTES  # re-created
    assert os.path.getsize(d / (layout.CHUNKS_DB + "-wal")) < 2 * MiB  # the partial's space is back


def test_snapshot_bigger_than_the_disk(small_fs):
    """No filler: the snapshot itself fills the disk; there is nothing for an operator to delete."""
    d = small_fs / "node"
    durable = setup_node(d)
    s = open_store(d, fsync=FsyncMode.FULL)
    big_snapshot(s, 100, 16 * MiB, 8 * MiB)
    s.close()
    assert free_bytes(small_fs) < 256 * 1024
    with open_store(d, fsync=FsyncMode.FULL) as s:
        check_state(s, durable)
    assert free_bytes(small_fs) > 4 * MiB  # the partial snapshot's WAL frames were given back
    reopen_and_snapshot_again(d, durable)


def test_reserve_helpers(tmp_path):
    """No mount needed: the reserve is created 0600 with real blocks, released once, and a full disk is
    recognised through the exception chain (SQLite's FullError or ENOSPC under a StorageFault)."""
    import errno
    import stat

    import apsw

    from raft_sqlite import reserve

    d = tmp_path / "node"
    with open_store(d):
        pass
    p = d / layout.RESERVE_FILE
    assert os.path.getsize(p) == layout.DISK_RESERVE_BYTES and stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert os.stat(p).st_blocks * 512 >= layout.DISK_RESERVE_BYTES  # allocated, not sparse
    assert reserve.release(str(d)) >= layout.DISK_RESERVE_BYTES and reserve.release(str(d)) == 0
    with open_store(d):
        pass
    assert os.path.getsize(p) == layout.DISK_RESERVE_BYTES  # re-created by the next open
    try:
        try:
            raise apsw.FullError("database or disk is full")
        except apsw.FullError as exc:
            raise StorageFault("x") from exc
    except StorageFault as exc:
        assert reserve.is_disk_full(exc)
    assert reserve.is_disk_full(OSError(errno.ENOSPC, "full"))
    assert not reserve.is_disk_full(StorageFault("x")) and not reserve.is_disk_full(OSError(errno.EIO, "io"))
