"""Tests of the fault-injecting VFS (tests/support/faultvfs.py) with plain apsw connections."""

from __future__ import annotations

import errno
import itertools
import os
import random
from pathlib import Path

import apsw
import pytest

try:
    from tests.support.faultvfs import SECTOR, FaultVFS, quiet_injected_faults
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from support.faultvfs import SECTOR, FaultVFS, quiet_injected_faults

N_OPS = 12
_names = itertools.count()


@pytest.fixture
def make_vfs():
    """Factory of FaultVFS instances with unique names, unregistered at teardown."""
    made = []

    def make(**kw):
        vfs = FaultVFS(f"faulttest{next(_names)}", **kw)
        made.append(vfs)
        return vfs

    with quiet_injected_faults():
        yield make
    for vfs in made:
        vfs.unregister()


def payload(i: int) -> bytes:
    return random.Random(i).randbytes(300 + (i * 1977) % 6000)  # 0..2 overflow pages


def expected(k: int) -> dict | None:
    """Table content after the first ``k`` operations of ``workload`` returned (None: no table)."""
    if k == 0:
        return None
    rows = {}
    for j in range(1, k):
        rows[j] = payload(j)
        if j % 4 == 0:
            del rows[j - 2]
    return rows


def close_quietly(con) -> None:
    if con is not None:
        try:
            con.close()
        except apsw.Error:
            con.close(force=True)


def workload(db: str, vfs: str, sync: str = "FULL", keep_open: bool = False):
    """Run ``N_OPS`` operations (op 0 creates the table, op j inserts j and every 4th one
    also deletes j-2 in the same transaction). Stops at the first error.
    Returns (number of operations that returned, connection or None)."""
    done, con = 0, None
    try:
        con = apsw.Connection(db, vfs=vfs)
        con.execute(f"PRAGMA synchronous={sync}")
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA wal_autocheckpoint=6")  # several checkpoints and WAL restarts
        con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB NOT NULL)")
        done = 1
        for j in range(1, N_OPS):
            with con:
                con.execute("INSERT INTO t VALUES(?, ?)", (j, payload(j)))
                if j % 4 == 0:
                    con.execute("DELETE FROM t WHERE id = ?", (j - 2,))
            done += 1
    except apsw.Error:
        pass
    if not keep_open:
        close_quietly(con)
        con = None
    return done, con


def read_image(path: str):
    """Open a crash image with the normal VFS: (integrity_check result, table content or None)."""
    con = apsw.Connection(path)
    try:
        check = con.execute("PRAGMA integrity_check").fetchall()
        if not con.execute("SELECT 1 FROM sqlite_schema WHERE name = 't'").fetchall():
            return check, None
        return check, dict(con.execute("SELECT id, v FROM t").fetchall())
    finally:
        con.close()


def count_events(tmp_path, make_vfs, kind: str) -> int:
    """Run the workload without faults; return how many ``kind`` calls it made."""
    vfs = make_vfs()
    (tmp_path / "dry").mkdir()
    done, _ = workload(str(tmp_path / "dry" / "db"), vfs.name)
    assert done == N_OPS and not vfs.crashed
    return vfs.counters[kind + "s"]


def crash_runs(tmp_path, make_vfs, kind: str, points):
    """Crash a fresh workload at each of ``points``; yield (point, vfs, ops done, run dir)."""
    for n in points:
        run = tmp_path / f"{kind}{n}"
        run.mkdir()
        vfs = make_vfs()
        vfs.arm_crash(**{f"at_{kind}": n})
        done, _ = workload(str(run / "db"), vfs.name)
        assert vfs.crashed, f"crash at {kind} {n} never happened"
        yield n, vfs, done, run


def test_lose_at_every_sync_point_keeps_every_returned_commit(tmp_path, make_vfs):
    syncs = count_events(tmp_path, make_vfs, "sync")
    assert syncs >= 2 * N_OPS  # a WAL sync per commit plus checkpoints
    for n, vfs, done, run in crash_runs(tmp_path, make_vfs, "sync", range(1, syncs + 1)):
        vfs.write_crash_image(str(run / "img"), mode="lose")
        assert not (run / "img" / "db-shm").exists()
        check, rows = read_image(str(run / "img" / "db"))
        assert check == [("ok",)], (n, check)
        # The op in flight may be durable although it raised: apsw reports an exception raised
        # in a VFS method even when SQLite ignored that error (e.g. a failing auto-checkpoint
        # after the commit was synced). The architecture treats failed commits as "unknown".
        assert rows in (expected(done), expected(done + 1)), f"sync {n}: not the state after {done} ops"


@pytest.mark.parametrize("mode", ["subset", "garble"])
@pytest.mark.parametrize("kind", ["sync", "write"])
def test_torn_images_keep_returned_commits_and_stay_consistent(tmp_path, make_vfs, mode, kind):
    total = count_events(tmp_path, make_vfs, kind)
    points = range(1, total + 1) if kind == "sync" else range(1, total + 1, 3)
    torn = 0
    for n, vfs, done, run in crash_runs(tmp_path, make_vfs, kind, points):
        lose = {p.name: p.read_bytes() for p in map(Path, vfs.write_crash_image(str(run / "lose")))}
        for seed in range(3):
            img = run / f"img{seed}"
            got = {p.name: p.read_bytes() for p in map(Path, vfs.write_crash_image(str(img), mode, seed))}
            torn += got != lose
            check, rows = read_image(str(img / "db"))
            assert check == [("ok",)], (kind, n, seed, check)
            # every returned op is there; the one in flight may or may not be
            assert rows in (expected(done), expected(done + 1)), (kind, n, seed, done)
    assert torn > len(points)  # the images really contain torn/garbled unsynced data


def test_synchronous_off_loses_commits_on_power_loss(tmp_path, make_vfs):
    vfs = make_vfs()
    done, con = workload(str(tmp_path / "db"), vfs.name, sync="OFF", keep_open=True)
    assert done == N_OPS and vfs.counters["syncs"] == 0
    vfs.write_crash_image(str(tmp_path / "img"), mode="lose")
    close_quietly(con)
    check, rows = read_image(str(tmp_path / "img" / "db"))
    assert check == [("ok",)]
    assert rows != expected(done)  # returned commits are gone: nothing was ever synced
    assert rows is None or len(rows) < len(expected(done))


def test_synchronous_full_image_taken_anytime_has_everything(tmp_path, make_vfs):
    vfs = make_vfs()
    done, con = workload(str(tmp_path / "db"), vfs.name, keep_open=True)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "db-shm").write_bytes(b"stale")
    vfs.write_crash_image(str(tmp_path / "img"), mode="lose")
    close_quietly(con)
    assert not (tmp_path / "img" / "db-shm").exists()
    assert read_image(str(tmp_path / "img" / "db")) == ([("ok",)], expected(done))


def raw_file(vfs: FaultVFS, path: str, kind: int = apsw.SQLITE_OPEN_WAL) -> apsw.VFSFile:
    """A file opened through the VFS as SQLite would (a WAL by default: its first sync makes its entry
    durable, so content tests need no directory sync; name it with a dot after its last '-', or beside
    its database, since the unix VFS looks up the database of a WAL it creates)."""
    flags = kind | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_READWRITE
    return apsw.VFSFile(vfs.name, path, [flags, 0])


def test_entries_of_sqlite_files_follow_the_unix_vfs(tmp_path):
    """A WAL/journal SQLite creates is durable with its first sync (the unix VFS fsyncs the directory then);
    a database file it creates needs a directory sync; a delete is durable only with ``syncdir`` or the
    directory's next sync (else the deleted file comes back after a power cut)."""
    root = tmp_path / "d"
    root.mkdir()
    vfs = FaultVFS(f"entries{os.getpid()}", root=str(root))
    try:
        db = raw_file(vfs, str(root / "x.db"), apsw.SQLITE_OPEN_MAIN_DB)
        wal = raw_file(vfs, str(root / "x.db-wal"))  # (the unix VFS stats the database of a WAL it opens)
        for f in (db, wal):
            f.xWrite(b"w" * SECTOR, 0)
            f.xSync(0)
        vfs.write_crash_image(str(tmp_path / "i1"), "lose")
        # the WAL's first sync synced the directory, which made x.db's entry (created before it) durable too
        assert sorted(os.listdir(tmp_path / "i1")) == ["x.db", "x.db-wal"]
        db2 = raw_file(vfs, str(root / "y.db"), apsw.SQLITE_OPEN_MAIN_DB)
        db2.xWrite(b"y" * SECTOR, 0)
        db2.xSync(0)
        j = raw_file(vfs, str(root / "y.db-journal"), apsw.SQLITE_OPEN_MAIN_JOURNAL)
        j.xWrite(b"j" * SECTOR, 0)
        j.xSync(0)  # a journal's first sync: the directory (with y.db) is durable
        j.xClose()
        vfs.xDelete(str(root / "y.db-journal"), False)  # FULL: no directory sync after the delete
        vfs.write_crash_image(str(tmp_path / "i2"), "lose")
        assert (tmp_path / "i2" / "y.db-journal").read_bytes() == b"j" * SECTOR  # back after the cut
        vfs.fs.sync_dir(str(root))
        vfs.write_crash_image(str(tmp_path / "i3"), "lose")
        assert not (tmp_path / "i3" / "y.db-journal").exists()
        db3 = raw_file(vfs, str(root / "z.db"), apsw.SQLITE_OPEN_MAIN_DB)
        db3.xWrite(b"z" * SECTOR, 0)
        db3.xSync(0)  # a database file: no directory sync
        vfs.write_crash_image(str(tmp_path / "i4"), "lose")
        assert not (tmp_path / "i4" / "z.db").exists()
        j2 = raw_file(vfs, str(root / "z.db-journal"), apsw.SQLITE_OPEN_MAIN_JOURNAL)
        j2.xWrite(b"j" * SECTOR, 0)
        j2.xSync(0)
        j2.xClose()
        vfs.xDelete(str(root / "z.db-journal"), True)  # EXTRA: delete with a directory sync
        vfs.write_crash_image(str(tmp_path / "i5"), "lose")
        assert (tmp_path / "i5" / "z.db").exists() and not (tmp_path / "i5" / "z.db-journal").exists()
        for f in (wal, db, db2, db3):
            f.xClose()
    finally:
        vfs.unregister()


def test_model_of_unsynced_writes_and_truncates(tmp_path, make_vfs):
    vfs = make_vfs()
    f = raw_file(vfs, str(tmp_path / "f.bin"))
    old = b"a" * (4 * SECTOR)
    f.xWrite(old, 0)
    f.xSync(0)
    f.xWrite(b"b" * 10, SECTOR + 5)  # dirties sector 1 only
    f.xTruncate(3 * SECTOR)  # unsynced shrink
    assert vfs.counters == {"writes": 2, "syncs": 1, "truncates": 1}

    def img(mode, seed):
        return (tmp_path / f"{mode}{seed}" / "f.bin").read_bytes()

    vfs.write_crash_image(str(tmp_path / "lose0"), "lose")
    assert img("lose", 0) == old
    new = (old[: SECTOR + 5] + b"b" * 10 + old[SECTOR + 15 :])[: 3 * SECTOR]
    seen = set()
    for seed in range(40):
        for mode in ("subset", "garble"):
            vfs.write_crash_image(str(tmp_path / f"{mode}{seed}"), mode, seed)
            got = img(mode, seed)
            assert len(got) in (3 * SECTOR, 4 * SECTOR)
            assert got[:SECTOR] == old[:SECTOR] and got[2 * SECTOR : 3 * SECTOR] == old[:SECTOR]
            # only the 10 written bytes of sector 1 can differ from the durable image
            assert got[SECTOR : SECTOR + 5] == b"a" * 5 and got[SECTOR + 15 : 2 * SECTOR] == old[15:SECTOR]
            kind = {b"a" * 10: "old", b"b" * 10: "new"}.get(got[SECTOR + 5 : SECTOR + 15], "garbled")
            assert mode == "garble" or kind != "garbled"
            seen.add((mode, kind, len(got)))
            assert got in (old, old[: 3 * SECTOR], new, new + old[3 * SECTOR :]) or kind == "garbled"
    assert {k for m, k, _ in seen} == {"old", "new", "garbled"}
    assert {n for _, _, n in seen} == {3 * SECTOR, 4 * SECTOR}
    f.xSync(0)
    vfs.write_crash_image(str(tmp_path / "after"), "lose")
    assert (tmp_path / "after" / "f.bin").read_bytes() == new
    f.xClose()


def test_never_synced_file_is_absent_and_crash_at_write(tmp_path, make_vfs):
    vfs = make_vfs()
    f = raw_file(vfs, str(tmp_path / "f.bin"))
    f.xWrite(b"x" * 100, 0)
    assert vfs.write_crash_image(str(tmp_path / "img"), "subset") == []
    f.xSync(0)
    vfs.arm_crash(at_write=2)
    f.xWrite(b"y" * 100, 0)
    with pytest.raises(apsw.IOError):
        f.xWrite(b"z" * 100, 0)
    assert vfs.crashed
    for call in (lambda: f.xRead(10, 0), lambda: f.xSync(0), lambda: f.xTruncate(0)):
        with pytest.raises(apsw.IOError):
            call()
    for seed in range(10):  # the write that hit the power loss never reaches the image
        (path,) = vfs.write_crash_image(str(tmp_path / f"img{seed}"), "subset", seed)
        assert Path(path).read_bytes() in (b"x" * 100, b"y" * 100)
    vfs.clear_faults()
    assert not vfs.crashed and f.xRead(3, 0) == b"yyy"
    f.xClose()


def open_wal(db: str, vfs: str) -> apsw.Connection:
    con = apsw.Connection(db, vfs=vfs)
    con.execute("PRAGMA synchronous=FULL")
    assert con.execute("PRAGMA journal_mode=WAL").get == "wal"
    con.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v)")
    return con


def test_sync_ioerr_fails_the_commit(tmp_path, make_vfs):
    vfs = make_vfs()
    con = open_wal(str(tmp_path / "db"), vfs.name)
    con.execute("INSERT INTO t VALUES(1, 'a')")
    vfs.arm_error("sync", nth=1, error="ioerr")
    with pytest.raises(apsw.IOError) as exc:
        con.execute("INSERT INTO t VALUES(2, 'b')")
    assert exc.value.extendedresult == apsw.SQLITE_IOERR_FSYNC
    con.execute("INSERT INTO t VALUES(3, 'c')")  # not sticky: later syncs work
    close_quietly(con)
    con = apsw.Connection(str(tmp_path / "db"))
    ids = [r[0] for r in con.execute("SELECT id FROM t")]
    assert 1 in ids and 3 in ids  # 2's outcome is unknown (its frames may have been written)
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    con.close()


def test_write_full_raises_full_error(tmp_path, make_vfs):
    vfs = make_vfs()
    con = open_wal(str(tmp_path / "db"), vfs.name)
    vfs.arm_error("write", nth=1, error="full")
    with pytest.raises(apsw.FullError):
        con.execute("INSERT INTO t VALUES(1, 'a')")
    con.execute("INSERT INTO t VALUES(2, 'b')")
    assert [r[0] for r in con.execute("SELECT id FROM t")] == [2]
    close_quietly(con)


def test_sticky_errors_until_cleared_and_truncate_errors(tmp_path, make_vfs):
    vfs = make_vfs()
    con = open_wal(str(tmp_path / "db"), vfs.name)
    vfs.arm_error("sync", nth=2, error="ioerr", sticky=True)
    con.execute("INSERT INTO t VALUES(1, 'a')")
    for i in (2, 3):
        with pytest.raises(apsw.IOError):
            con.execute("INSERT INTO t VALUES(?, 'b')", (i,))
    vfs.clear_faults()
    con.execute("INSERT INTO t VALUES(4, 'c')")
    vfs.arm_error("truncate", nth=1, error="ioerr")
    with pytest.raises(apsw.IOError) as exc:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    assert exc.value.extendedresult == apsw.SQLITE_IOERR_TRUNCATE
    assert vfs.counters["truncates"] == 1
    close_quietly(con)


def test_root_filter(tmp_path, make_vfs):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    vfs = make_vfs(root=str(tmp_path / "in"))
    vfs.arm_error("write", nth=1, error="full", sticky=True)
    con = open_wal(str(tmp_path / "out" / "db"), vfs.name)  # untracked: no faults
    con.execute("INSERT INTO t VALUES(1, 'a')")
    close_quietly(con)
    assert vfs.counters == {"writes": 0, "syncs": 0, "truncates": 0}
    con = apsw.Connection(str(tmp_path / "in" / "db"), vfs=vfs.name)
    with pytest.raises(apsw.FullError):
        con.execute("CREATE TABLE t(x)")
    close_quietly(con)


def test_bad_arguments(make_vfs):
    vfs = make_vfs()
    with pytest.raises(ValueError):
        vfs.arm_crash()
    with pytest.raises(ValueError):
        vfs.arm_crash(at_sync=1, at_write=1)
    with pytest.raises(ValueError):
        vfs.arm_error("read")
    with pytest.raises(ValueError):
        vfs.write_crash_image("/nonexistent", mode="shred")


# ---------------------------------------------------------------------------------------------- FaultFS
def fs_write(fs, path: str, data: bytes, sync: bool = False, offset: int = 0) -> None:
    fd = fs.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fs.pwrite(fd, data, offset)
        if sync:
            fs.fdatasync(fd)
    finally:
        fs.close(fd)


def test_fs_unsynced_raw_write_is_lost_or_torn(tmp_path, make_vfs):
    (tmp_path / "d").mkdir()
    vfs = make_vfs(root=str(tmp_path / "d"))
    fs, f = vfs.fs, str(tmp_path / "d" / "f")
    old = b"a" * (3 * SECTOR)
    fs_write(fs, f, old, sync=True)
    fs.sync_dir(str(tmp_path / "d"))
    fs_write(fs, f, b"b" * (2 * SECTOR), offset=SECTOR // 2)  # dirties sectors 0..2, unsynced
    assert vfs.counters == {"writes": 2, "syncs": 2, "truncates": 0}
    assert Path(f).read_bytes() != old  # the real file has the new bytes (page cache)
    (img,) = vfs.write_crash_image(str(tmp_path / "lose"), "lose")
    assert Path(img).read_bytes() == old
    new = old[: SECTOR // 2] + b"b" * (2 * SECTOR) + old[SECTOR // 2 + 2 * SECTOR:]
    seen = set()
    for seed in range(20):
        (img,) = vfs.write_crash_image(str(tmp_path / f"s{seed}"), "subset", seed)
        got = Path(img).read_bytes()
        sectors = tuple(got[i:i + SECTOR] == new[i:i + SECTOR] for i in range(0, len(got), SECTOR))
        for i in range(0, len(got), SECTOR):  # every sector is entirely old or entirely new
            assert got[i:i + SECTOR] in (old[i:i + SECTOR], new[i:i + SECTOR])
        seen.add(sectors)
    assert len(seen) > 2  # torn: mixes of old and new sectors, not only all-old / all-new


def test_fs_new_name_needs_sync_dir(tmp_path, make_vfs):
    (tmp_path / "d").mkdir()
    vfs = make_vfs(root=str(tmp_path / "d"))
    fs, d = vfs.fs, str(tmp_path / "d")
    fs_write(fs, os.path.join(d, "new"), b"x" * 100, sync=True)  # content synced, entry not
    assert vfs.write_crash_image(str(tmp_path / "i0"), "lose") == []
    fs.sync_dir(d)
    (img,) = vfs.write_crash_image(str(tmp_path / "i1"), "lose")
    assert Path(img).read_bytes() == b"x" * 100
    # rename without sync_dir: the old name survives a power cut; unlink likewise
    fs.rename(os.path.join(d, "new"), os.path.join(d, "renamed"))
    assert [Path(p).name for p in vfs.write_crash_image(str(tmp_path / "i2"), "lose")] == ["new"]
    names = {tuple(sorted(Path(p).name for p in vfs.write_crash_image(str(tmp_path / f"r{s}"), "subset", s)))
             for s in range(16)}
    assert names == {(), ("new",), ("renamed",), ("new", "renamed")}  # each entry old or new at random
    fs.sync_dir(d)
    assert [Path(p).name for p in vfs.write_crash_image(str(tmp_path / "i3"), "lose")] == ["renamed"]
    fs.unlink(os.path.join(d, "renamed"))
    assert [Path(p).name for p in vfs.write_crash_image(str(tmp_path / "i4"), "lose")] == ["renamed"]
    fs.mkdir(os.path.join(d, "e"))  # an empty directory: in the image once its entry is durable
    vfs.write_crash_image(str(tmp_path / "i5"), "lose")
    assert not (tmp_path / "i5" / "e").exists()
    fs.sync_dir(d)
    assert vfs.write_crash_image(str(tmp_path / "i6"), "lose") == []
    assert not (tmp_path / "i6" / "renamed").exists() and (tmp_path / "i6" / "e").is_dir()


def test_fs_renamed_directory_carries_its_entries(tmp_path, make_vfs):
    (tmp_path / "d").mkdir()
    vfs = make_vfs(root=str(tmp_path / "d"))
    fs, d = vfs.fs, str(tmp_path / "d")
    fs.mkdir(os.path.join(d, "tmp"))
    fs_write(fs, os.path.join(d, "tmp", "m"), b"m" * 10, sync=True)
    fs.sync_dir(os.path.join(d, "tmp"))
    fs.rename(os.path.join(d, "tmp"), os.path.join(d, "final"))
    assert vfs.write_crash_image(str(tmp_path / "i0"), "lose") == []  # tmp itself was never durable
    fs.sync_dir(d)
    (img,) = vfs.write_crash_image(str(tmp_path / "i1"), "lose")
    assert os.path.relpath(img, tmp_path / "i1") == os.path.join("final", "m")


def test_fs_syncs_and_writes_are_crash_points(tmp_path, make_vfs):
    """at_sync counts fsio syncs (fdatasync and sync_dir) with SQLite's; after the crash every fsio call
    on a tracked path raises EIO, and untracked paths pass through."""
    (tmp_path / "d").mkdir()
    vfs = make_vfs(root=str(tmp_path / "d"))
    fs, d = vfs.fs, str(tmp_path / "d")
    con = open_wal(os.path.join(d, "db"), vfs.name)
    fs_write(fs, os.path.join(d, "side"), b"1" * 24, sync=True)  # fsio sync 1
    fs.sync_dir(d)  # fsio sync 2
    vfs.arm_crash(at_sync=3)
    con.execute("INSERT INTO t VALUES(1, 'a')")  # SQLite sync (WAL commit)
    fs_write(fs, os.path.join(d, "side"), b"2" * 24, sync=True)  # fsio sync
    with pytest.raises(OSError) as exc:
        fs.sync_dir(d)  # the 3rd sync from arming: the crash
    assert exc.value.errno == errno.EIO and vfs.crashed
    for call in (lambda: fs.open(os.path.join(d, "side"), os.O_RDONLY), lambda: fs.unlink(os.path.join(d, "side")),
                 lambda: fs.rename(os.path.join(d, "side"), os.path.join(d, "x")), lambda: fs.mkdir(os.path.join(d, "e"))):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EIO
    fs_write(fs, str(tmp_path / "outside"), b"ok")  # not under root: untouched by the fault
    close_quietly(con)
    files = {Path(p).name: Path(p).read_bytes() for p in vfs.write_crash_image(str(tmp_path / "img"), "lose")}
    assert files["side"] == b"2" * 24
    con = apsw.Connection(str(tmp_path / "img" / "db"))
    assert [r[0] for r in con.execute("SELECT id FROM t")] == [1]
    con.close()

    # the same sequence with the crash one sync earlier: the second fsio sync never happened
    (tmp_path / "d2").mkdir()
    vfs2 = make_vfs(root=str(tmp_path / "d2"))
    fs2, d2 = vfs2.fs, str(tmp_path / "d2")
    fs_write(fs2, os.path.join(d2, "side"), b"1" * 24, sync=True)
    fs2.sync_dir(d2)
    vfs2.arm_crash(at_write=2)
    fs_write(fs2, os.path.join(d2, "side"), b"2" * 24)  # write 1
    with pytest.raises(OSError):
        fs_write(fs2, os.path.join(d2, "side"), b"3" * 24)  # write 2: the crash
    assert vfs2.counters["writes"] == 3
    for seed in range(8):
        (img,) = vfs2.write_crash_image(str(tmp_path / f"w{seed}"), "subset", seed)
        assert Path(img).read_bytes() in (b"1" * 24, b"2" * 24)  # the crashing write never lands
