"""Torture campaign: hot backups and restores inside the power-loss model.

The live store, the backup folder and the restore target all sit under one FaultVFS (``root`` = the
run's folder) whose FaultFS is installed as the :mod:`raft_sqlite.fsio` backend, so SQLite's files
*and* the files backup.py writes itself (the copies' fsync, the manifest's temporary name and rename,
the directory syncs, restore's copies, placeholder and renames) follow the same loss/tear model and the
same dir-entry rule. A dry run counts the sync points; one fresh run per point loses power exactly
there, and every crash image ("lose", "subset", "garble") is checked.

* Hot backup (``test_power_loss_during_hot_backup``): the workload runs to its middle, then a backup
  starts; the workload goes on from the backup's progress callback (one operation per copy step, so
  the store commits while the backup copies), then after it. Power is lost at every sync from the
  backup's start to a few syncs after it returned. Each image: the live store holds every acknowledged
  write (``check_store``); every backup whose call returned is complete and restores to exactly the
  state at its start; the interrupted backup's folder is either *incomplete* (listed so; ``verify`` and
  ``restore`` refuse it with BackupError, writing nothing; ``prune`` removes it) or complete and
  restores to exactly the state at its start. A "corrupt" folder (a manifest that does not verify)
  fails the test.
* Restore (``test_power_loss_during_restore``): power is lost at every sync (and some writes) of
  ``restore()`` into a new data_dir (or an existing empty one). Each image's target is either
  untouched (no database file), refuses to open with a typed error (the placeholder raft.db), or opens
  holding exactly the backup's content and its restore event; in the first two cases a repeated
  ``restore()`` into the same target succeeds and is checked the same way. Anything else fails.

``pytest -s`` prints the tally; ``-m slow`` runs more seeds, bigger workloads and every mode.
"""

from __future__ import annotations

import os
import random
import shutil
import time

import pytest

from raft_sqlite import BackupError, RaftSqliteError
from raft_sqlite.backup import HotBackupManager, list_backups, restore, verify_backup
from tests import torture as T

MODES = ("lose", "subset", "garble")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return T.make_template(tmp_path_factory.mktemp("tpl") / "store")


def _fail(tally: T.Tally, where: str, why: str, acked: int = 0) -> None:
    tally.add(T.Verdict(False, lost=1, acked=acked, detail=why), where)


# ---------------------------------------------------------------------------------------------- hot backup
def check_backup_image(img: str, run: T.BackupRun, run_dir: str, wl: T.Workload, tally: T.Tally, where: str,
                       counts: dict) -> None:
    """Check one crash image of a :func:`T.backup_powerloss_run` (see the module docstring)."""
    live, backups = os.path.join(img, "live"), os.path.join(img, "backups")
    tally.crash_states += 1
    tally.add(T.check_store(live, wl, run.acked), f"{where} live store")
    in_image = {os.path.relpath(p, run_dir): at for p, at in run.done}  # acknowledged backups
    listed = list_backups(backups, verify=True)
    if not run.returned and not any(os.path.relpath(e["path"], img) not in in_image for e in listed):
        counts["crash-window folder absent"] += 1  # its name never became durable: nothing to refuse
    for e in listed:
        rel = os.path.relpath(e["path"], img)
        restored = os.path.join(img, f"restored-{len(os.listdir(img))}")
        if e["status"] == "corrupt":
            _fail(tally, where, f"backup {rel} is corrupt after the crash: {e['error']}")
        elif e["status"] == "incomplete":
            if rel in in_image:
                _fail(tally, where, f"acknowledged backup {rel} is incomplete after the crash")
                continue
            counts["incomplete"] += 1
            try:
                verify_backup(e["path"])
                _fail(tally, where, f"incomplete backup {rel} verifies")
            except BackupError:
                pass
            try:
                restore(e["path"], restored)
                _fail(tally, where, f"incomplete backup {rel} was restored")
            except BackupError:
                if os.path.exists(restored):
                    _fail(tally, where, f"refused restore of {rel} left {restored} behind")
        else:
            at = in_image.get(rel, run.at_backup)  # complete but unacknowledged: the crash-window backup
            counts["complete" if rel in in_image else "complete, not acknowledged"] += 1
            tally.add(T.check_restored_copy(e["path"], restored, wl, at), f"{where} backup {rel}")
            tally.backups += 1
    for rel in set(in_image) - {os.path.relpath(e["path"], img) for e in listed}:
        _fail(tally, where, f"acknowledged backup {rel} is missing after the crash")
    # the next backup run cleans up: prune removes every incomplete folder
    try:
        with T.open_store(live) as s:
            HotBackupManager(s, backups).prune()
    except RaftSqliteError:
        return  # the live store did not open: already counted by check_store
    left = [e["path"] for e in list_backups(backups) if e["status"] != "complete"]
    if left:
        _fail(tally, where, f"prune left {left}")


def hot_backup_campaign(template, tmp, tally: T.Tally, seeds, *, ops_per_group: int, modes=MODES, after: int = 4,
                        write_points: int = 0, pages_per_step: int = 2, only_after_return: bool = False,
                        alternate: bool = False) -> dict:
    """Crash at every sync from the backup's start to ``after`` syncs after it returned (with
    ``only_after_return``: only those after it returned) and ``write_points`` random writes; check the
    image of every mode (``alternate``: of one mode per crash point, in turn). Returns the outcome counts."""
    counts = {"incomplete": 0, "complete": 0, "complete, not acknowledged": 0, "crash-window folder absent": 0,
              "runs past the crash point": 0}
    for seed in seeds:
        wl = T.Workload(seed, ops_per_group=ops_per_group)
        before, earlier = len(wl) // 2, seed % 2 == 1
        with T.quiet():
            dry = T.backup_powerloss_run(template, os.path.join(tmp, "dry"), wl, before=before,
                                         earlier_backup=earlier, pages_per_step=pages_per_step)
        dry.vfs.unregister()
        assert dry.error is None and len(dry.done) == 1 + earlier, dry.error
        shutil.rmtree(os.path.join(tmp, "dry"))
        first = dry.syncs_in_backup + 1 if only_after_return else 1
        points = [{"at_sync": n} for n in range(first, dry.syncs_in_backup + after + 1)]
        rng = random.Random(seed)
        points += [{"at_write": rng.randint(1, 200)} for _ in range(write_points)]
        tally.notes.append(f"seed {seed}: {dry.syncs_in_backup} syncs in the backup, {len(points)} crash points"
                           f"{' (after an earlier backup)' if earlier else ''}")
        for i, crash in enumerate(points):
            run_dir = os.path.join(tmp, f"run{seed}-{i}")
            with T.quiet():
                run = T.backup_powerloss_run(template, run_dir, wl, before=before, crash=crash,
                                             earlier_backup=earlier, pages_per_step=pages_per_step)
            try:
                if not run.crashed:
                    counts["runs past the crash point"] += 1
                    tally.not_reached += 1
                    continue
                assert run.error is None or isinstance(run.error, RaftSqliteError), (crash, repr(run.error))
                for mode in (modes[i % len(modes)],) if alternate else modes:
                    img = os.path.join(run_dir, f"img-{mode}")
                    run.vfs.write_crash_image(img, mode, seed=seed * 1000 + i)
                    check_backup_image(img, run, run_dir, wl, tally, f"seed {seed} {crash} {mode}", counts)
            finally:
                run.vfs.unregister()
                shutil.rmtree(run_dir)
    tally.notes.append(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return counts


# ---------------------------------------------------------------------------------------------- restore
@pytest.fixture(scope="module")
def source_backup(template, tmp_path_factory):
    """A store that ran a workload (snapshots and compaction included) and a backup of it (normal file
    system): (workload, acked at the backup, backup folder)."""
    d = tmp_path_factory.mktemp("src")
    wl = T.Workload(41, ops_per_group=14)
    acked = {g: 0 for g in wl.groups}
    live = T.copy_store(template, str(d / "live"))
    with T.open_store(live) as s:
        T.run_workload(s, wl, acked)
        info = HotBackupManager(s, str(d / "bk")).backup()
    return wl, acked, info.path


def check_restore_image(img: str, run: T.RestoreRun, run_dir: str, wl, at: dict, tally: T.Tally, where: str,
                        counts: dict) -> None:
    target = os.path.join(img, os.path.relpath(run.target, run_dir))
    tally.crash_states += 1
    outcome, why = T.restore_target_outcome(target)
    counts[outcome] = counts.get(outcome, 0) + 1
    if outcome == "bad":
        _fail(tally, where, f"restore target after the crash: {why}")
        return
    if outcome == "opens":
        tally.add(T.check_restored(target, wl, at, run.backup), f"{where} restored store")
        tally.backups += 1
        return
    if run.error is None:  # restore() returned before the power cut: it must have been complete
        _fail(tally, where, f"restore() returned, but after the crash the target is {outcome} ({why})")
    # untouched or refused: a repeated restore into the same target must succeed (from the run's backup
    # folder: restore only reads it, and reads stay outside the model, so the image has no copy of it)
    bk = run.backup
    try:
        restore(bk, target)
    except Exception as exc:  # noqa: BLE001 - a refused retry is the finding
        _fail(tally, where, f"{outcome} target ({why}); the repeated restore failed: {type(exc).__name__}: {exc}")
        return
    v = T.check_restored(target, wl, at, bk)
    tally.add(v, f"{where} repeated restore")
    tally.backups += 1
    tally.retried += v.ok  # "opened on retry": the repeated restore gave the complete store


def restore_campaign(backup, tmp, tally: T.Tally, *, modes=MODES, stride: int = 1, write_points: int = 0,
                     existing=(False, True), alternate: bool = False, until_in_place: bool = False,
                     open_stride: int = 1) -> dict:
    """Crash at every ``stride``-th sync up to the directory sync after raft.db got its final name, then at
    every ``open_stride``-th sync of the check-open (none with ``until_in_place``), and at
    ``write_points`` random writes of restore() into a new target (and an existing empty one); check the
    image of every mode (``alternate``: of one mode per crash point, in turn). Returns the outcome counts."""
    wl, at, folder = backup
    counts: dict = {"runs past the crash point": 0}
    for existing_dir in existing:
        with T.quiet():
            dry = T.restore_powerloss_run(folder, os.path.join(tmp, "dry"), existing_dir=existing_dir)
        dry.vfs.unregister()
        assert dry.error is None, repr(dry.error)
        shutil.rmtree(os.path.join(tmp, "dry"))
        rng = random.Random(41 + existing_dir)
        in_place = dry.syncs_at_raft_db + 1
        points = [{"at_sync": n} for n in range(1, in_place + 1, stride)]
        if not until_in_place:
            points += [{"at_sync": n} for n in range(in_place + 1, dry.syncs + 1, open_stride)]
        points += [{"at_write": rng.randint(1, dry.writes)} for _ in range(write_points)]
        tally.notes.append(f"target {'existing empty dir' if existing_dir else 'new'}: {dry.syncs} syncs "
                           f"({in_place} until the restored raft.db is in place), {dry.writes} writes in a restore, "
                           f"{len(points)} crash points")
        for i, crash in enumerate(points):
            run_dir = os.path.join(tmp, f"run{int(existing_dir)}-{i}")
            with T.quiet():
                run = T.restore_powerloss_run(folder, run_dir, crash=crash, existing_dir=existing_dir)
            try:
                if not run.crashed:
                    counts["runs past the crash point"] += 1
                    tally.not_reached += 1
                    continue
                if run.error is not None and not isinstance(run.error, RaftSqliteError):
                    _fail(tally, f"{crash}", f"restore() raised {run.error!r}, not a typed error")
                if run.error is None:  # the power cut hit the check-open's close, which absorbs it
                    counts["restore returned, then power lost"] = counts.get("restore returned, then power lost", 0) + 1
                for mode in (modes[i % len(modes)],) if alternate else modes:
                    img = os.path.join(run_dir, f"img-{mode}")
                    run.vfs.write_crash_image(img, mode, seed=i)
                    check_restore_image(img, run, run_dir, wl, at, tally, f"{crash} {mode}", counts)
            finally:
                run.vfs.unregister()
                shutil.rmtree(run_dir)
    tally.notes.append(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return counts


# ---------------------------------------------------------------------------------------------- tests
def test_power_loss_during_hot_backup(template, tmp_path):
    t0 = time.monotonic()
    tally = T.Tally("power loss during hot backup")
    # one mode per crash point, in turn: "lose" images rarely hold the interrupted folder (its name is
    # synced only once the backup is complete), "subset"/"garble" ones often hold part of it
    counts = hot_backup_campaign(template, str(tmp_path), tally, (2,), ops_per_group=8,
                                 modes=("garble", "lose", "subset"), pages_per_step=16, alternate=True)
    tally.seconds = time.monotonic() - t0
    T.print_table("Backup power-loss campaign (CI)", [tally])
    tally.assert_clean()
    assert counts["incomplete"] > 0 and counts["complete"] > 0, counts  # both outcomes were exercised


def test_power_loss_during_restore(source_backup, tmp_path):
    t0 = time.monotonic()
    tally = T.Tally("power loss during restore")
    counts = restore_campaign(source_backup, str(tmp_path), tally, modes=("lose", "subset"), existing=(False,),
                              alternate=True, open_stride=4)
    tally.seconds = time.monotonic() - t0
    T.print_table("Backup power-loss campaign (CI)", [tally])
    tally.assert_clean()
    assert counts.get("refused", 0) > 0 and counts.get("opens", 0) > 0, counts  # both outcomes were exercised


class _SkipSyncDir:
    """Stands for the ``fsio`` module inside raft_sqlite.backup, dropping ``sync_dir`` calls that
    ``skip(path)`` selects (the sabotage of the tests below)."""

    def __init__(self, skip):
        from raft_sqlite import fsio
        self._fsio, self._skip = fsio, skip

    def __getattr__(self, name):
        return getattr(self._fsio, name)

    def sync_dir(self, path):
        if not self._skip(path):
            self._fsio.sync_dir(path)


def _node_folder(p):  # backups/<node_id>, synced once a backup's manifest is in place
    return os.path.basename(p) == T.NODE


def _new_parents(p):  # the run folder and backups/, synced when backups/ and backups/<node_id> are created
    return os.path.basename(p) != T.NODE and os.path.basename(os.path.dirname(p)) != T.NODE


@pytest.mark.parametrize("skip", [_node_folder, _new_parents])
def test_backup_campaign_sees_an_acknowledged_backup_lost(template, tmp_path, monkeypatch, skip):
    """The hot-backup check can fail: without the sync of the node's backup folder after the manifest,
    or of the parents of the folders the first backup creates, a backup whose call returned vanishes in
    "lose" images of a later power cut."""
    from raft_sqlite import backup as backup_mod
    monkeypatch.setattr(backup_mod, "fsio", _SkipSyncDir(skip))
    tally = T.Tally("sabotaged backup")
    hot_backup_campaign(template, str(tmp_path), tally, (2,), ops_per_group=8, modes=("lose",), pages_per_step=16,
                        after=2, only_after_return=True)
    assert tally.lost > 0 and any("acknowledged backup" in f and "missing" in f for f in tally.failures), \
        tally.failures


def test_restore_campaign_sees_a_half_restored_target(source_backup, tmp_path, monkeypatch):
    """The restore check can fail: without the placeholder raft.db a crash leaves chunks.db without
    raft.db, which the campaign reports (and a repeated restore refuses as not empty)."""
    from raft_sqlite import backup as backup_mod
    real = backup_mod._write_file_atomically
    monkeypatch.setattr(backup_mod, "_write_file_atomically",
                        lambda folder, name, data: None if data == backup_mod.RESTORE_PLACEHOLDER
                        else real(folder, name, data))
    tally = T.Tally("sabotaged restore")
    restore_campaign(source_backup, str(tmp_path), tally, modes=("lose",), existing=(False,), until_in_place=True)
    assert tally.lost > 0 and any("chunks.db without raft.db" in f for f in tally.failures), tally.failures


@pytest.mark.slow
def test_power_loss_during_backup_and_restore_slow(template, source_backup, tmp_path):
    tallies = []
    t0 = time.monotonic()
    tally = T.Tally("power loss during hot backup (slow)")
    hot_backup_campaign(template, str(tmp_path / "b"), tally, range(10, 14), ops_per_group=16, write_points=10)
    tally.seconds = time.monotonic() - t0
    tallies.append(tally)
    t0 = time.monotonic()
    tally = T.Tally("power loss during restore (slow)")
    restore_campaign(source_backup, str(tmp_path / "r"), tally, write_points=15)
    tally.seconds = time.monotonic() - t0
    tallies.append(tally)
    T.print_table("Backup power-loss campaign (slow)", tallies)
    for t in tallies:
        t.assert_clean()
