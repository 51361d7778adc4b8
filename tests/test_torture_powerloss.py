"""Torture campaign 1: simulated power loss.

The deterministic workload of :mod:`tests.torture` runs on a store opened through the fault VFS, with
the fault model's ``fsio`` backend installed (the WAL mark ``raft.db-hwm``, NORMAL's interval syncs and
the files and directory entries made at creation are in the same model: lost, torn, or a name missing
without its directory sync). A dry run counts the sync calls (open, every commit, checkpoints, mark
syncs, close); then one fresh run per sync point
loses power exactly there (plus runs crashed at random xWrite points). Each crash leaves three images
of what reached the disk ("lose": unsynced writes gone; "subset": a random subset of unsynced sectors
and sizes kept; "garble": as subset, with a third of those sectors garbled), each reopened with the
normal VFS under STRICT recovery. FULL/EXTRA: the store opens and every group is exactly in its model
state after its acknowledged operations (or one more: the operation in flight). NORMAL: every write
acknowledged before the last completed interval sync is there. OFF: the image opens. Store creation
(``creation_campaign``): crashes inside ``NodeStore.open`` on an empty data_dir and the first writes; the
data_dir opens (fresh or with every promised write) or, after one typed refusal, on the second open.

``pytest -s`` prints the summary table; ``-m slow`` runs the long enumeration (>= 2,000 states).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import time

import pytest

from raft_sqlite import BackupError, FsyncMode, NodeStore, RaftSqliteError, StorageFault, fsio
from tests import torture as T

MODES = ("lose", "subset", "garble")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return T.make_template(tmp_path_factory.mktemp("tpl") / "store")


def check_images(res: T.RunResult, run_dir: str, wl: T.Workload, tally: T.Tally, where: str, *, fsync,
                 modes=MODES, seed=0, floor=None, require_open=True):
    """Write and check one crash image per mode."""
    for mode in modes:
        img = res.image(os.path.join(run_dir, f"img-{mode}"), mode, seed=seed)
        v = T.check_store(img, wl, res.acked, floor=floor, fsync=fsync)
        if res.crashed:
            tally.crash_states += 1
        else:  # the run ended before its crash point: its image is checked, but it is no crash state
            tally.not_reached += 1
        if require_open:
            tally.add(v, f"{where} {mode}")
        elif v.unopenable:
            tally.notes.append(f"{where} {mode}: {v.detail}")


def enumerate_crashes(template, tmp, wl: T.Workload, tally: T.Tally, *, fsync=FsyncMode.FULL, write_points=20,
                      sync_stride=1, modes=MODES, seed=0, checkpoint_every=40, backup_every=None):
    """Crash ``wl`` at every ``sync_stride``-th sync point and ``write_points`` random write points.
    With ``backup_every``, hot backups are taken during the workload and every backup that completed
    before the crash is restored and checked (exactly the model state at its point)."""
    def backups(run_dir):
        return T.Backups(os.path.join(run_dir, "backups"), backup_every) if backup_every else None

    with T.quiet():
        dry = T.powerloss_run(template, os.path.join(tmp, "dry"), wl, fsync=fsync, checkpoint_every=checkpoint_every,
                              backups=backups(os.path.join(tmp, "dry")))
        dry.vfs.unregister()
    assert dry.error is None and dry.acked == {g: len(wl.ops(g)) for g in wl.groups}, dry.error
    shutil.rmtree(os.path.join(tmp, "dry"))
    rng = random.Random(f"{wl.seed}/{fsync}")
    syncs, writes = dry.counters["syncs"], dry.counters["writes"]
    points = [{"at_sync": n} for n in range(1, syncs + 1, sync_stride)]
    points += [{"at_write": n} for n in sorted(rng.sample(range(1, writes + 1), min(write_points, writes)))]
    missed = 0
    for i, crash in enumerate(points):
        run_dir = os.path.join(tmp, f"run{i}")
        bk = backups(run_dir)
        with T.quiet():
            res = T.powerloss_run(template, run_dir, wl, fsync=fsync, crash=crash,
                                  checkpoint_every=checkpoint_every, backups=bk)
        try:
            if not res.crashed:  # I/O counts can differ by a few between runs (e.g. checkpoint timing)
                missed += 1
                tally.not_reached += 1
                continue
            # a crash surfaces as a typed StorageFault (or nothing, when it hit the checkpoint on close;
            # a BackupError naming the fault when it hit a hot backup's copy)
            assert res.error is None or isinstance(res.error, (StorageFault, BackupError)), (crash, repr(res.error))
            check_images(res, run_dir, wl, tally, f"seed {wl.seed} {crash}", fsync=fsync, modes=modes,
                         seed=seed + i)
            for b, (path, at) in enumerate(bk.done if bk else ()):
                tally.add(T.check_backup(path, os.path.join(run_dir, f"restored{b}"), wl, at), f"backup {path}")
                tally.backups += 1
        finally:
            res.vfs.unregister()
            shutil.rmtree(run_dir)
    assert missed <= len(points) // 20, f"{missed} of {len(points)} crash points were never reached"
    return syncs, writes


def test_checker_can_fail(template, tmp_path):
    """The check is not vacuous: an image missing acknowledged writes is reported lost, and a
    garbled committed entry makes the store refuse to open (STRICT)."""
    wl = T.Workload(3, ops_per_group=10)
    with T.quiet():
        res = T.powerloss_run(template, str(tmp_path / "r"), wl, crash={"at_sync": 20})
    assert res.crashed
    res.vfs.write_crash_image(str(tmp_path / "img"), "lose")
    res.vfs.unregister()
    everything = {g: len(wl.ops(g)) for g in wl.groups}
    v = T.check_store(str(tmp_path / "img"), wl, everything)
    assert not v.ok and v.lost >= 1 and "matches no model state" in v.detail
    # flip one payload byte of a committed entry in the database file itself
    d = tmp_path / "full"
    with T.quiet():
        res = T.powerloss_run(template, str(d), wl)
    res.vfs.unregister()
    live = d / "live"
    with T.open_store(live) as s:  # checkpoint everything into raft.db
        s.kernel.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    (live / "raft.db-hwm").unlink()  # the WAL was truncated behind the store's back: drop its mark
    g = wl.groups[0]
    marker = next(e for e in wl.states(g)[-1].entries if len(e[2]) > 40)[2][:40]
    raw = bytearray((live / "raft.db").read_bytes())
    at = raw.find(marker)
    assert at > 0
    while at >= 0:  # every copy (b-tree splits leave stale copies in free pages)
        raw[at + 30] ^= 0xFF
        at = raw.find(marker, at + 1)
    (live / "raft.db").write_bytes(bytes(raw))
    v = T.check_store(str(live), wl, everything)
    assert v.unopenable and "CorruptionError" in v.detail and "CRC" in v.detail


def test_powerloss_full_every_sync_point(template, tmp_path):
    t0 = time.monotonic()
    tally = T.Tally("power loss FULL")
    for seed in (1, 2):
        s, w = enumerate_crashes(template, str(tmp_path), T.Workload(seed, ops_per_group=12), tally, seed=seed * 1000)
        tally.notes.append(f"seed {seed}: {s} sync points, {w} write points")
    tally.seconds += time.monotonic() - t0
    T.print_table("Power-loss campaign (CI)", [tally])
    tally.assert_clean()
    assert tally.crash_states >= 300


def test_powerloss_extra_every_sync_point(template, tmp_path):
    t0 = time.monotonic()
    tally = T.Tally("power loss EXTRA")
    s, w = enumerate_crashes(template, str(tmp_path), T.Workload(7, ops_per_group=10), tally, fsync=FsyncMode.EXTRA,
                             write_points=10, checkpoint_every=15)
    tally.notes.append(f"{s} sync points, {w} write points")
    tally.seconds += time.monotonic() - t0
    T.print_table("Power-loss campaign (CI)", [tally])
    tally.assert_clean()
    assert tally.crash_states >= 100


@pytest.mark.skipif(not T.have_module("backup"), reason="raft_sqlite.backup is not there")
def test_powerloss_with_hot_backups(template, tmp_path):
    """Hot backups every 6 operations; power lost at every sync point (including inside backups).
    Every crash image holds every acknowledged write, and every backup that completed restores to
    exactly the state at its point."""
    t0 = time.monotonic()
    tally = T.Tally("power loss FULL + backups")
    s, w = enumerate_crashes(template, str(tmp_path), T.Workload(9, ops_per_group=10), tally, write_points=10,
                             backup_every=6, modes=("lose", "garble"))
    tally.notes.append(f"{s} sync points, {w} write points; {tally.backups} completed backups restored and checked")
    tally.seconds += time.monotonic() - t0
    T.print_table("Power-loss campaign (CI)", [tally])
    tally.assert_clean()
    assert tally.backups >= 50


def test_powerloss_threaded_group_commit(template, tmp_path):
    """One thread per group: commits coalesce; crash at random sync/write points."""
    t0 = time.monotonic()
    tally = T.Tally("power loss FULL threaded")
    wl = T.Workload(4, ops_per_group=12)
    rng = random.Random(4)
    for i in range(40):
        crash = {"at_sync": rng.randint(1, 40)} if i % 2 else {"at_write": rng.randint(1, 250)}
        run_dir = str(tmp_path / f"run{i}")
        with T.quiet():
            res = T.powerloss_run(template, run_dir, wl, crash=crash, threaded=True)
        try:
            if res.crashed:
                assert res.error is None or isinstance(res.error, StorageFault), repr(res.error)
            check_images(res, run_dir, wl, tally, f"threaded {crash}", fsync=FsyncMode.FULL, seed=i)
        finally:
            res.vfs.unregister()
            shutil.rmtree(run_dir)
    tally.seconds += time.monotonic() - t0
    T.print_table("Power-loss campaign (CI)", [tally])
    tally.assert_clean()


def test_powerloss_during_recovery(template, tmp_path):
    """Power fails again while the crashed store is being reopened (recovery writes its event and
    may checkpoint): the second image must still hold every acknowledged write."""
    t0 = time.monotonic()
    tally = T.Tally("power loss during recovery")
    wl = T.Workload(5, ops_per_group=12)
    rng = random.Random(5)
    for i in range(12):
        run_dir = str(tmp_path / f"run{i}")
        with T.quiet():
            res = T.powerloss_run(template, run_dir, wl, crash={"at_sync": rng.randint(5, 60)})
        mode1 = rng.choice(MODES)
        res.vfs.write_crash_image(os.path.join(run_dir, "img1"), mode1, seed=i)
        res.vfs.unregister()
        img1 = os.path.join(run_dir, "img1")
        # count the reopen's syncs, then crash it at each
        probe = T.copy_store(img1, os.path.join(run_dir, "probe"))
        vfs = T.new_vfs(probe)
        with T.quiet(), fsio.installed(vfs.fs):
            T.open_store(probe, vfs=vfs.name).close()
        n_sync = vfs.counters["syncs"]
        vfs.unregister()
        for at in range(1, n_sync + 1):
            again = T.copy_store(img1, os.path.join(run_dir, f"again{at}"))
            vfs = T.new_vfs(again)
            vfs.arm_crash(at_sync=at)
            with T.quiet(), fsio.installed(vfs.fs), contextlib.suppress(StorageFault):
                T.open_store(again, vfs=vfs.name).close()
            for mode in MODES:
                img2 = os.path.join(run_dir, f"img2-{at}-{mode}")
                vfs.write_crash_image(img2, mode, seed=at)
                v = T.check_store(img2, wl, res.acked)
                tally.count_run(vfs.crashed)
                tally.add(v, f"run {i} reopen crash at sync {at} {mode}")
            vfs.unregister()
        shutil.rmtree(run_dir)
    tally.seconds += time.monotonic() - t0
    T.print_table("Power-loss campaign (CI)", [tally])
    tally.assert_clean()
    assert tally.crash_states >= 30


def normal_campaign(template, tmp_path, tally, runs: int, seed: int = 6):
    t0 = time.monotonic()
    wl = T.Workload(seed, ops_per_group=10)
    rng = random.Random(seed)
    floors = 0
    for i in range(runs):
        run_dir = str(tmp_path / f"run{i}")
        with T.quiet():
            res = T.powerloss_run(template, run_dir, wl, fsync=FsyncMode.NORMAL,
                                  crash={"at_write": rng.randint(1, 180)}, slow_ops=0.001)
        try:
            floors += sum(res.floor.values())
            check_images(res, run_dir, wl, tally, f"NORMAL run {i}", fsync=FsyncMode.NORMAL, floor=res.floor, seed=i)
        finally:
            res.vfs.unregister()
            shutil.rmtree(run_dir)
    tally.seconds += time.monotonic() - t0
    tally.notes.append(f"acknowledged writes inside the synced floor (must survive): {floors}")
    assert floors > 0, "no interval sync ever completed: the NORMAL check was vacuous"


def test_powerloss_normal_loss_window(template, tmp_path):
    """NORMAL: commits are not fsynced, the WAL is fdatasynced every fsync_interval (2 ms here, the
    workload acks slowly enough for syncs to land in between). Every write acknowledged before the
    last completed interval sync must survive; the store must open."""
    tally = T.Tally("power loss NORMAL")
    normal_campaign(template, tmp_path, tally, 40)
    T.print_table("Power-loss campaign (CI)", [tally])
    tally.assert_clean()


def test_powerloss_off_opens(template, tmp_path):
    """OFF (tests only): power loss may lose anything acknowledged; the "lose" image (nothing ever
    synced) must still open."""
    tally = T.Tally("power loss OFF")
    wl = T.Workload(8, ops_per_group=10)
    for i in range(8):
        run_dir = str(tmp_path / f"run{i}")
        with T.quiet():
            res = T.powerloss_run(template, run_dir, wl, fsync=FsyncMode.OFF, crash={"at_write": 20 + 25 * i})
        try:
            img = os.path.join(run_dir, "img")
            res.vfs.write_crash_image(img, "lose")
            with T.open_store(img) as s:
                assert s.groups() == []  # nothing was ever synced
            tally.count_run(res.crashed)
        finally:
            res.vfs.unregister()
            shutil.rmtree(run_dir)
    T.print_table("Power-loss campaign (CI)", [tally])


# ---------------------------------------------------------------------------------------------- creation
def check_created(res: T.RunResult, img: str, wl: T.Workload, tally: T.Tally, where: str, fsync) -> None:
    """The creation rule: the data_dir in the image opens (fresh, or with every write the mode promises),
    or its first open fails with a typed error (RaftSqliteError) and a second open succeeds. Never an
    untyped error, never a store that opens with wrong content, never one that stays unopenable."""
    first = None
    try:
        T.open_store(img, fsync=fsync).close()
    except RaftSqliteError as exc:
        first = exc
    except Exception as exc:  # noqa: BLE001 - an untyped failure is a finding
        tally.add(T.Verdict(False, unopenable=True, detail=f"untyped error on open: {type(exc).__name__}: {exc}"),
                  where)
        return
    v = T.check_store(img, wl, res.acked, floor=res.floor if fsync is FsyncMode.NORMAL else None, fsync=fsync)
    if first is not None:
        tally.retried += 1
        if len(tally.notes) < 5:
            tally.notes.append(f"{where}: first open refused ({type(first).__name__}: {first}); "
                               f"second open {'succeeded' if v.ok else 'failed'}")
    tally.add(v, where)


def creation_campaign(tmp, tally: T.Tally, fsync, seeds, *, sync_stride=1, write_points=10, modes=MODES,
                      rotate_modes=False, ops_per_group=3) -> None:
    """Power lost at every ``sync_stride``-th sync point and ``write_points`` random write points of
    ``NodeStore.open`` on an *empty* data_dir followed by a few operations (store creation is inside
    the model: data_dir, raft.db, chunks.db, the schema copy, the first commits, the mark)."""
    for seed in seeds:
        wl = T.Workload(seed, ops_per_group=ops_per_group, snapshots=False)
        with T.quiet():
            dry = T.powerloss_run(None, os.path.join(tmp, f"dry{seed}"), wl, fsync=fsync, checkpoint_every=None,
                                  slow_ops=0.003 if fsync is FsyncMode.NORMAL else 0.0)
            dry.vfs.unregister()
        assert dry.error is None and dry.acked == {g: len(wl.ops(g)) for g in wl.groups}, dry.error
        rng = random.Random(f"creation/{seed}/{fsync}")
        syncs, writes = dry.counters["syncs"], dry.counters["writes"]
        points = [{"at_sync": n} for n in range(1 + seed % sync_stride, syncs + 1, sync_stride)]
        points += [{"at_write": n} for n in sorted(rng.sample(range(1, writes + 1), min(write_points, writes)))]
        tally.notes.append(f"{fsync.value} seed {seed}: {syncs} sync points, {writes} write points from an empty "
                           "data_dir")
        for i, crash in enumerate(points):
            run_dir = os.path.join(tmp, f"c{seed}-{i}")
            with T.quiet():
                res = T.powerloss_run(None, run_dir, wl, fsync=fsync, crash=crash, checkpoint_every=None,
                                      slow_ops=0.003 if fsync is FsyncMode.NORMAL else 0.0)
            try:
                assert res.error is None or isinstance(res.error, RaftSqliteError), (crash, repr(res.error))
                for mode in (modes[i % len(modes)],) if rotate_modes else modes:
                    img = res.image(os.path.join(run_dir, f"img-{mode}"), mode, seed=seed * 1000 + i)
                    with T.quiet():
                        check_created(res, img, wl, tally, f"creation {fsync.value} seed {seed} {crash} {mode}", fsync)
                    tally.count_run(res.crashed)
            finally:
                res.vfs.unregister()
                shutil.rmtree(run_dir)


def test_powerloss_store_creation(tmp_path):
    """Quick version: store creation (and the first writes) of FULL, EXTRA and NORMAL crashed at every
    third sync point and a few write points, one image mode per point."""
    tallies = []
    for fsync in (FsyncMode.FULL, FsyncMode.EXTRA, FsyncMode.NORMAL):
        t0 = time.monotonic()
        tally = T.Tally(f"power loss creation {fsync.value}")
        creation_campaign(str(tmp_path / fsync.value), tally, fsync, (11,), sync_stride=3, write_points=3,
                          rotate_modes=True, ops_per_group=2)
        tally.seconds += time.monotonic() - t0
        tallies.append(tally)
    T.print_table("Power-loss campaign (CI): store creation", tallies)
    for t in tallies:
        t.assert_clean()
        assert t.crash_states >= 8 and t.acked_checked > 0


@pytest.mark.parametrize("removed", ["parent sync"])
def test_creation_campaign_sees_missing_directory_syncs(tmp_path, monkeypatch, removed):
    """The creation check can fail: without the sync of data_dir's parent (data_dir's own entry), an image
    taken after a clean run loses acknowledged writes. (Removing the store's own syncs of data_dir is not
    seen since the model follows the unix VFS exactly: SQLite fsyncs the directory when it creates each
    WAL, which makes raft.db's and chunks.db's entries durable too; see the EXTRA test below.)"""
    real = T.faultvfs.FaultFS.sync_dir
    skip = "live" if removed == "data_dir syncs" else ""
    monkeypatch.setattr(T.faultvfs.FaultFS, "sync_dir", lambda self, p: None
                        if os.path.realpath(p) == os.path.join(self.vfs.root, skip).rstrip("/") else real(self, p))
    wl = T.Workload(12, ops_per_group=2, snapshots=False)
    with T.quiet():
        res = T.powerloss_run(None, str(tmp_path / "r"), wl, checkpoint_every=None)
    try:
        assert res.error is None and sum(res.acked.values()) == 6
        tally = T.Tally("proof")
        check_created(res, res.image(str(tmp_path / "img"), "lose"), wl, tally, removed, FsyncMode.FULL)
        assert tally.lost >= 1, tally.failures
    finally:
        res.vfs.unregister()


def test_creation_without_the_stores_own_dir_syncs_still_loses_nothing(tmp_path, monkeypatch):
    """What the store's own data_dir syncs (EXTRA's, and the one at creation every mode has) protect, as
    measured: nothing the model can see, because SQLite fsyncs the directory when it creates a WAL (the
    unix VFS's syncDir), which makes every entry in it durable, raft.db's and chunks.db's included. They
    stay, so that durability does not rest on that SQLite internal. (Under the earlier, stricter model,
    where SQLite's directory sync made only the WAL's own entry durable, removing them let a crash keep
    chunks.db without raft.db, a data_dir refused for good.) Crash points 24-29 (counted with the store's
    own data_dir syncs removed): the end of chunks.db's schema copy, then the syncs of data_dir's
    ancestors before the node record."""
    monkeypatch.setattr(NodeStore, "sync_dir", lambda self: None)
    tally, checked = T.Tally("no own dir syncs"), 0
    wl = T.Workload(11, ops_per_group=3, snapshots=False)
    for at in range(24, 30):  # the end of chunks.db's schema copy, then the ancestors' syncs
        with T.quiet():
            res = T.powerloss_run(None, str(tmp_path / f"r{at}"), wl, fsync=FsyncMode.EXTRA, crash={"at_sync": at},
                                  checkpoint_every=None)
        try:
            for seed in range(12):
                img = res.image(str(tmp_path / f"img{at}-{seed}"), "subset", seed=seed)
                with T.quiet():
                    check_created(res, img, wl, tally, f"at_sync {at} seed {seed}", FsyncMode.EXTRA)
                checked += 1
        finally:
            res.vfs.unregister()
    tally.assert_clean()
    assert len(tally.failures) == 0 and checked == 6 * 12


# ---------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_powerloss_slow_enumeration(template, tmp_path):
    """>= 2,000 crash states: several seeds and bigger workloads, every sync point, FULL and EXTRA,
    with hot backups, and the NORMAL loss window."""
    tallies = []
    for fsync, seeds, every in ((FsyncMode.FULL, range(100, 108), None), (FsyncMode.EXTRA, range(200, 203), None),
                                (FsyncMode.FULL, range(300, 302), 7)):
        t0 = time.monotonic()
        tally = T.Tally(f"power loss {fsync.value}{' + backups' if every else ''} (slow)")
        for seed in seeds:
            enumerate_crashes(template, str(tmp_path), T.Workload(seed, ops_per_group=25), tally, fsync=fsync,
                              write_points=60, seed=seed * 1000, checkpoint_every=30 + seed % 20,
                              backup_every=every if T.have_module("backup") else None)
        tally.seconds += time.monotonic() - t0
        tallies.append(tally)
        T.print_table("Power-loss campaign (slow, so far)", [tally])
    tally = T.Tally("power loss NORMAL (slow)")
    for seed in (400, 401, 402):
        normal_campaign(template, tmp_path / f"n{seed}", tally, 100, seed)
    tallies.append(tally)
    T.print_table("Power-loss campaign (slow)", tallies)
    for t in tallies:
        t.assert_clean()
    assert sum(t.crash_states for t in tallies) >= 2000


@pytest.mark.slow
def test_powerloss_store_creation_slow(tmp_path):
    """Store creation of FULL, EXTRA and NORMAL crashed at every sync point and 30 write points, every
    image mode, two seeds each."""
    tallies = []
    for fsync in (FsyncMode.FULL, FsyncMode.EXTRA, FsyncMode.NORMAL):
        t0 = time.monotonic()
        tally = T.Tally(f"power loss creation {fsync.value} (slow)")
        creation_campaign(str(tmp_path / fsync.value), tally, fsync, (500, 501), write_points=30)
        tally.seconds += time.monotonic() - t0
        tallies.append(tally)
        T.print_table("Power-loss campaign (slow, so far): store creation", [tally])
    T.print_table("Power-loss campaign (slow): store creation", tallies)
    for t in tallies:
        t.assert_clean()
    assert sum(t.crash_states for t in tallies) >= 600


# ---------------------------------------------------------------------------------------------- regressions
def crashed_in_flight_commit(template, tmp_path, checkpoint_first: bool):
    """Crash at the WAL sync of a multi-frame commit; returns (vfs, run dir, acked, wal path in the
    VFS, workload). ``checkpoint_first``: backfill the whole WAL first, so the commit restarts it."""
    wl = T.Workload(21, ops_per_group=30)
    live = T.copy_store(template, str(tmp_path / "live"))
    vfs = T.new_vfs(live)
    acked = {g: 0 for g in wl.groups}
    pos = next(i for i, (g, k) in enumerate(wl.order)
               if i > 10 and wl.ops(g)[k - 1].kind == "append_batch"
               and sum(len(e.data) for e in wl.ops(g)[k - 1].args[0]) > 9000)
    with T.quiet():
        store = T.open_store(live, vfs=vfs.name)
        T.run_workload(store, wl, acked, upto=pos)
        if checkpoint_first:
            store.kernel.conn.execute("PRAGMA wal_checkpoint(FULL)").fetchall()
        vfs.arm_crash(at_sync=1)
        g, k = wl.order[pos]
        with pytest.raises(StorageFault):
            T.execute(store, wl.ops(g)[k - 1])
        store.close()
    return vfs, live, acked, wl


def image_with(vfs, live, img, edit):
    """The "lose" image, plus every unsynced WAL write applied and then ``edit(wal_bytes)``."""
    vfs.write_crash_image(img, "lose")
    data = bytearray(T.faultvfs.apply_pending(*vfs.file_state(os.path.join(live, "raft.db-wal"))))
    edit(data)
    with open(os.path.join(img, "raft.db-wal"), "wb") as f:
        f.write(data)
    shutil.copy2(os.path.join(live, "raft.db-hwm"), os.path.join(img, "raft.db-hwm"))


def test_torn_commit_field_in_last_transaction_is_not_corruption(template, tmp_path):
    """Regression (found by this suite): a power cut tore the header of a frame in the middle of the
    last (unsynced) transaction; its commit field held random bytes, and the WAL frame scan took it
    for a commit followed by later transactions: STRICT refused a store that lost nothing."""
    vfs, live, acked, wl = crashed_in_flight_commit(template, tmp_path, False)
    page = 4096

    def tear(data):
        size = len(data)
        nframes = (size - 32) // (24 + page)
        mid = nframes - 2  # a non-commit frame of the in-flight transaction (which has >= 3 frames)
        off = 32 + mid * (24 + page)
        data[off:off + 8] = bytes.fromhex("a9c8b7d6e5f40312")  # random pgno and commit fields

    img = str(tmp_path / "img")
    image_with(vfs, live, img, tear)
    vfs.unregister()
    v = T.check_store(img, wl, acked)
    assert v.ok, v.detail


def test_torn_header_of_restarted_wal_is_not_corruption(template, tmp_path):
    """Regression (found by this suite): the WAL was fully checkpointed, the next commit restarted it
    and a power cut tore the new (unsynced) WAL header. SQLite then ignores the WAL, which is right:
    every frame of the previous generation is in the database file; the high-water mark and the
    frame scan reported those frames lost and STRICT refused to open."""
    vfs, live, acked, wl = crashed_in_flight_commit(template, tmp_path, True)

    def tear(data):
        data[0:32] = bytes(range(100, 132))

    img = str(tmp_path / "img")
    image_with(vfs, live, img, tear)
    vfs.unregister()
    v = T.check_store(img, wl, acked)
    assert v.ok, v.detail


def test_switch_to_normal_then_power_cut_is_not_corruption(template, tmp_path):
    """Regression (found by the slow NORMAL campaign): a store used in FULL mode is reopened in
    NORMAL mode; several unsynced transactions follow and a power cut tears an early one. The
    settings row naming NORMAL was itself unsynced, so recovery believed the WAL had been written
    in FULL mode and reported the torn tail as committed frames lost: STRICT refused to open."""
    wl = T.Workload(23, ops_per_group=12, snapshots=False)
    live = T.copy_store(template, str(tmp_path / "live"))
    acked = {g: 0 for g in wl.groups}
    with T.open_store(live) as s:  # FULL
        T.run_workload(s, wl, acked, upto=12)
    floor = dict(acked)
    vfs = T.new_vfs(live)
    with T.quiet(), fsio.installed(vfs.fs):
        s = T.open_store(live, vfs=vfs.name, fsync=FsyncMode.NORMAL, fsync_interval=3600)
        T.run_workload(s, wl, acked, start=12)  # no interval sync happens: nothing below is durable
        vfs.arm_crash(at_write=1)
        with pytest.raises(StorageFault):
            s.metadata("a").set_term_and_vote(10**6, None)
        s.close()
    durable, pending = vfs.file_state(os.path.join(live, "raft.db-wal"))
    first_new = min(off for off, data in pending if data is not None and off >= len(durable) - 4120)

    def tear(data):  # the first unsynced frame is lost (old bytes), everything after it reached the disk
        data[first_new + 24:first_new + 200] = bytes(176)

    img = str(tmp_path / "img")
    image_with(vfs, live, img, tear)
    vfs.unregister()
    v = T.check_store(img, wl, acked, floor=floor, fsync=FsyncMode.NORMAL)
    assert v.ok, v.detail


def test_retried_creation_after_a_failed_parent_sync_keeps_acknowledged_writes(tmp_path):
    """A first open that died after creating data_dir but before syncing its parent (here: the sync fails)
    leaves a directory the retry did not create; the retry must still make data_dir's entry durable before
    anything is acknowledged (found by the independent review: the retry skipped the parent sync, and a
    power cut then lost data_dir with every acknowledged write)."""
    run = tmp_path / "r"
    run.mkdir()
    vfs = T.new_vfs(str(run))
    live = str(run / "live")
    real = T.faultvfs.FaultFS.sync_dir
    failed = []

    def sync_dir(self, p):
        if os.path.realpath(p) == str(run) and not failed:
            failed.append(p)
            raise OSError(errno.EIO, "injected: parent sync fails once")
        return real(self, p)

    try:
        with fsio.installed(vfs.fs), T.quiet():
            T.faultvfs.FaultFS.sync_dir = sync_dir
            try:
                with pytest.raises(RaftSqliteError):
                    T.open_store(live, fsync=FsyncMode.FULL, vfs=vfs.name)
                assert failed and os.path.isdir(live)
                with T.open_store(live, fsync=FsyncMode.FULL, vfs=vfs.name) as s:
                    s.log("a").append_next(1, [b"acked"])
                    img = str(tmp_path / "img")
                    os.makedirs(img)
                    vfs.write_crash_image(img, "lose")
            finally:
                T.faultvfs.FaultFS.sync_dir = real
        with T.open_store(os.path.join(img, "live"), fsync=FsyncMode.FULL) as s:
            assert [e.data for e in s.log("a").entries(1, 2)] == [b"acked"]
    finally:
        vfs.unregister()
