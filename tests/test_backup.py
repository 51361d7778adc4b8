"""Hot backup and restore: point-in-time copies under load, manifests, refusals before any write,
restore modes and their events, SIGKILL during a backup, scheduler and retention."""

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import apsw
import pytest

from raft_sqlite import BackupError, CorruptionError, LogEntry, RecoveryPolicy, fsio, layout
from raft_sqlite import backup as backup_mod
from raft_sqlite.backup import (
    MANIFEST,
    HotBackupManager,
    HotBackupScheduler,
    list_backups,
    restore,
    verify_backup,
)
from tests.conftest import ROOT, open_store, run_py

_REAL_TIME = time.time


def payload(group, i):
    return f"{group}:{i}".encode() * 3


def fill(store, group, n, term=1, start=1):
    store.log(group).append([LogEntry(i, term, payload(group, i)) for i in range(start, start + n)])


def snapshot(store, group, index, term, data):
    with store.snapshots(group).write(index, term) as w:
        w.write(data)
    return w.meta


def state(store):
    """Everything a restore must reproduce, per group."""
    out = {}
    for g in store.groups():
        lg, md = store.log(g), store.metadata(g)
        snap = store.snapshots(g).latest()
        out[g] = {
            "first": lg.first_index, "last": lg.last_index, "last_term": lg.last_term,
            "hard": tuple(md.hard_state),
            "entries": [tuple(e) for e in lg.entries(lg.first_index, lg.last_index + 1)],
            "snapshot": None if snap is None else (snap.index, snap.term, snap.kind,
                                                   store.snapshots(g).open(snap).read()),
        }
    return out


def make_source(path):
    s = open_store(path)
    fill(s, "a", 120)
    s.metadata("a").set_term_and_vote(2, "n2")
    s.log("a").append([LogEntry(121, 2, b"t2")])
    s.metadata("a").set_commit_index(100)
    snapshot(s, "a", 60, 1, os.urandom(200_000))
    s.log("a").compact(60)
    fill(s, "b", 10)
    s.metadata("b").set_term_and_vote(5, 7)
    s.metadata("b").set_commit_index(10)
    return s


def tree(path):
    return sorted(os.listdir(path)) if os.path.exists(path) else None


# ------------------------------------------------------------------------------------------- backup
def test_backup_layout_manifest_and_record(tmp_path):
    s = make_source(tmp_path / "node")
    m = HotBackupManager(s, tmp_path / "bk")
    info = m.backup()
    assert os.path.dirname(info.path) == str(tmp_path / "bk" / "n1")
    assert re.fullmatch(r"\d{8}T\d{6}\.\d{6}Z", os.path.basename(info.path))
    assert stat.S_IMODE(os.stat(info.path).st_mode) == 0o700
    assert sorted(os.listdir(info.path)) == ["chunks.db", "manifest.json", "raft.db"]
    for f in os.listdir(info.path):
        assert stat.S_IMODE(os.stat(os.path.join(info.path, f)).st_mode) == 0o600, f
    man = json.loads(Path(info.path, MANIFEST).read_text())
    assert man == info.manifest
    assert (man["node_id"], man["cluster_id"], man["format_version"]) == ("n1", "c1", 1)
    assert man["library_version"] and man["created_at"].endswith("Z")
    groups = {g["name"]: g for g in man["groups"]}
    assert groups["a"]["term"] == 2 and groups["a"]["voted_for"] == "n2" and groups["a"]["commit_index"] == 100
    assert (groups["a"]["first_index"], groups["a"]["last_index"], groups["a"]["snapshot_index"]) == (61, 121, 60)
    assert groups["a"]["latest_snapshot"]["index"] == 60
    assert groups["b"]["voted_for"] == 7 and groups["b"]["last_index"] == 10
    assert [f["name"] for f in man["files"]] == ["raft.db", "chunks.db"]
    assert verify_backup(info.path) == man  # sizes and sha256 of the files as written
    # the copy is a valid store on its own (no -wal needed) and holds what the manifest says
    c = apsw.Connection(os.path.join(info.path, "raft.db"), flags=apsw.SQLITE_OPEN_READONLY)
    assert c.execute("SELECT max(idx) FROM log_entries").fetchone()[0] == 121
    c.close()
    last = m.last_backup()
    assert last["path"] == info.path and last["size"] == info.size and last["age"] >= 0
    s.close()
    with open_store(tmp_path / "node") as s2:  # the record in the backups table is durable
        assert HotBackupManager(s2, tmp_path / "bk").last_backup()["path"] == info.path
    [listed] = list_backups(tmp_path / "bk")
    assert listed["status"] == "complete" and listed["path"] == info.path and listed["node_id"] == "n1"


def test_backup_under_four_appending_threads_is_one_instant(tmp_path):
    """4 threads append (each append and its commit-index update in one transaction) while backups
    run; thread 0 also appends the same index to groups x and y in one transaction. A point-in-time
    copy shows, per group, a contiguous prefix of the source log with commit_index == last_index, and
    last(x) == last(y)."""
    s = open_store(tmp_path / "node")
    stop = threading.Event()
    errors = []

    def appender(k):
        g = f"g{k}"
        try:
            i = 0
            while not stop.is_set() or i < 50:
                i += 1
                term = 1 + i // 200
                with s.transaction():
                    if i == 1 or i % 200 == 0:  # the term of every entry is the group's current term
                        s.metadata(g).set_term_and_vote(term, f"n{k}")
                    s.log(g).append([LogEntry(i, term, payload(g, i))])
                    s.metadata(g).set_commit_index(i)
                if k == 0:
                    with s.transaction():
                        s.log("x").append([LogEntry(i, 1, payload("x", i))])
                        s.log("y").append([LogEntry(i, 1, payload("y", i))])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=appender, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    m = HotBackupManager(s, tmp_path / "bk", pages_per_step=8, step_pause=0.001)
    infos = []
    deadline = time.monotonic() + 20
    while len(infos) < 3 and time.monotonic() < deadline:
        time.sleep(0.15)
        infos.append(m.backup())
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert len(infos) == 3
    final = {g: s.log(g).last_index for g in s.groups()}
    s.close()
    lasts = []
    for n, info in enumerate(infos):
        r = restore(info.path, tmp_path / f"r{n}")
        man = {g["name"]: g for g in info.manifest["groups"]}
        with open_store(r.data_dir, recovery=RecoveryPolicy.STRICT) as b:
            assert b.log("x").last_index == b.log("y").last_index
            for k in range(4):
                g = f"g{k}"
                lg, md = b.log(g), b.metadata(g)
                last = lg.last_index
                assert 0 < last <= final[g]
                assert md.commit_index == last, (g, md.commit_index, last)
                assert md.current_term == 1 + last // 200 and lg.last_term == md.current_term
                es = lg.entries(1, last + 1)
                assert [e.index for e in es] == list(range(1, last + 1))
                assert all(e.data == payload(g, e.index) for e in es)
                assert (man[g]["last_index"], man[g]["commit_index"], man[g]["term"]) == (last, last, md.current_term)
            lasts.append(b.log("g0").last_index)
    assert lasts == sorted(lasts) and lasts[0] < final["g0"]  # the backups really ran while appends went on


def test_backup_excludes_writes_after_its_instant_and_keeps_gc_victims(tmp_path):
    """The copy is taken as of the instant the backup started: a snapshot written and an old snapshot
    deleted by retention while raft.db is being copied change nothing in the backup."""
    s = open_store(tmp_path / "node")
    fill(s, "a", 40)
    s.metadata("a").set_term_and_vote(1, None)
    s.metadata("a").set_commit_index(40)
    old_data = os.urandom(150_000)
    old = snapshot(s, "a", 10, 1, old_data)
    fill(s, "pad", 3000)  # enough pages for several steps
    fired = []

    def progress(phase, done, total):
        if phase == "raft.db" and not fired:
            fired.append(1)
            snapshot(s, "a", 30, 1, b"new" * 1000)
            assert s.snapshots("a").retain(1)  # deletes the old snapshot's manifest and chunks
            fill(s, "a", 5, start=41)

    info = HotBackupManager(s, tmp_path / "bk", pages_per_step=4).backup(progress=progress)
    assert fired
    assert [m.index for m in s.snapshots("a").list()] == [30]
    s.close()
    restore(info.path, tmp_path / "r")
    with open_store(tmp_path / "r") as b:
        assert b.log("a").last_index == 40
        [m] = b.snapshots("a").list()
        assert (m.index, m.id) == (10, old.id)
        assert b.snapshots("a").open(m).read() == old_data


def test_backups_while_snapshots_are_written_and_retained_restore_every_snapshot(tmp_path):
    """A thread writes snapshots (chunks first, then the DURABLE manifest) and runs retention (deleting
    old manifests and chunks under gc_lock) while backups run: every DURABLE snapshot in every backup
    is complete and reads back with its digest after restore (STRICT)."""
    s = open_store(tmp_path / "node")
    fill(s, "pad", 2000)  # a raft.db big enough for many small steps
    stop = threading.Event()
    errors = []

    def snapshotter():
        try:
            i = 0
            while not stop.is_set() or i < 3:
                i += 1
                fill(s, "s", 10, start=10 * (i - 1) + 1)
                s.metadata("s").set_commit_index(10 * i)
                snapshot(s, "s", 10 * i, 1, bytes([i % 256]) * (70_000 + i))
                s.snapshots("s").retain(1)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=snapshotter)
    t.start()
    deadline = time.monotonic() + 10
    while not ("s" in s.groups() and s.snapshots("s").latest()) and time.monotonic() < deadline:
        time.sleep(0.005)
    m = HotBackupManager(s, tmp_path / "bk", pages_per_step=4, step_pause=0.0005)
    infos = [m.backup() for _ in range(3)]
    stop.set()
    t.join()
    assert not errors
    s.close()
    seen = set()
    for n, info in enumerate(infos):
        restore(info.path, tmp_path / f"r{n}")
        with open_store(tmp_path / f"r{n}") as b:
            metas = b.snapshots("s").list()
            assert metas, "every backup holds the newest durable snapshot of its instant"
            assert b.snapshots("s").verify() == len(metas)
            for meta in metas:
                i = meta.index // 10
                assert b.snapshots("s").open(meta).read() == bytes([i % 256]) * (70_000 + i)
                seen.add(meta.index)
            man = {g["name"]: g for g in info.manifest["groups"]}
            assert man["s"]["snapshot_index"] == b.log("s").snapshot_index == max(x.index for x in metas)
    assert len(seen) >= 2  # the snapshots moved on between backups


def test_cancel_and_progress(tmp_path, store):
    fill(store, "pad", 3000)
    cancel = threading.Event()
    phases = set()

    def progress(phase, done, total):
        phases.add(phase)
        assert 0 <= done <= total
        if phase == "raft.db" and done >= total // 4:
            cancel.set()

    from raft_sqlite.backup import BackupCancelled
    m = HotBackupManager(store, tmp_path / "bk", pages_per_step=4)
    with pytest.raises(BackupCancelled):
        m.backup(progress=progress, cancel=cancel)
    assert list_backups(tmp_path / "bk") == [] and m.last_backup() is None
    phases.clear()
    info = m.backup(progress=lambda p, d, t: phases.add(p))
    assert phases == {"raft.db", "chunks.db", "sha256:raft.db", "sha256:chunks.db"}
    assert set(info.phases) == {"copy", "sha256", "fsync", "wait"}
    got = []
    restore(info.path, tmp_path / "r", progress=lambda p, d, t: got.append((p, d, t)))
    assert {p for p, _, _ in got} == {"raft.db", "chunks.db"}
    assert [(d, t) for p, d, t in got if p == "raft.db"][-1][0] == info.manifest["files"][0]["size"]


def test_concurrent_backup_of_same_node_refused(tmp_path, store):
    fill(store, "a", 5)
    m1, m2 = HotBackupManager(store, tmp_path / "bk"), HotBackupManager(store, tmp_path / "bk")
    with m1._exclusive(), pytest.raises(BackupError, match="another backup"):
        m2.backup()
    assert m2.backup().manifest["groups"][0]["last_index"] == 5


def test_backup_of_closed_store_refused(tmp_path, store):
    store.close()
    with pytest.raises(Exception, match="closed"):
        HotBackupManager(store, tmp_path / "bk").backup()


# ------------------------------------------------------------------------------------------- restore
def test_restore_round_trip_equals_source(tmp_path):
    s = make_source(tmp_path / "node")
    info = HotBackupManager(s, tmp_path / "bk").backup()
    before = state(s)
    s.close()
    target = tmp_path / "new" / "node"
    r = restore(info.path, target)
    assert (r.kind, r.data_dir, r.backup_path) == ("node_replacement", str(target), info.path)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o700
    for f in os.listdir(target):
        assert stat.S_IMODE(os.stat(target / f).st_mode) == 0o600, f
    with open_store(target) as b:
        assert state(b) == before
        rf = b.restored_from
        assert rf["kind"] == "node_replacement" and rf["backup_path"] == info.path
        assert rf["backup_created_at"] == info.manifest["created_at"]
        assert rf["groups"]["a"]["term"] == 2 and rf["groups"]["b"]["voted_for"] == 7
        b.log("b").append([LogEntry(11, 5, b"after")])  # the restored store takes writes
    with open_store(target) as b:  # ... and they survive a reopen
        assert b.log("b").get(11).data == b"after"
        assert b.restored_from["kind"] == "node_replacement"
    with open_store(tmp_path / "node") as src:
        assert src.restored_from is None


def test_restore_into_existing_empty_dir(tmp_path, store):
    fill(store, "a", 3)
    info = HotBackupManager(store, tmp_path / "bk").backup()
    (tmp_path / "empty").mkdir()
    restore(info.path, tmp_path / "empty")
    assert stat.S_IMODE(os.stat(tmp_path / "empty").st_mode) == 0o700
    with open_store(tmp_path / "empty") as b:
        assert b.log("a").last_index == 3


@pytest.fixture
def backup(tmp_path):
    with make_source(tmp_path / "node") as s:
        return HotBackupManager(s, tmp_path / "bk").backup()


def _edit_manifest(info, fn):
    p = os.path.join(info.path, MANIFEST)
    m = json.loads(Path(p).read_text())
    fn(m)
    with open(p, "w") as f:
        json.dump(m, f)


def test_restore_into_non_empty_dir_refused(tmp_path, backup):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(BackupError, match="not empty"):
        restore(backup.path, target)
    assert tree(target) == ["keep.txt"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BackupError, match="not a directory"):
        restore(backup.path, tmp_path / "afile")


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
@pytest.mark.parametrize("name", ["raft.db", "chunks.db"])
def test_corrupted_backup_file_refused_before_writing(tmp_path, backup, name, damage):
    p = os.path.join(backup.path, name)
    data = bytearray(Path(p).read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        data = data[:-4096]
    else:
        data += b"\0" * 10
    Path(p).write_bytes(bytes(data))
    with pytest.raises(BackupError, match="sha256|bytes, the manifest says"):
        restore(backup.path, tmp_path / "target")
    assert tree(tmp_path / "target") is None
    assert [b["status"] for b in list_backups(tmp_path / "bk", verify=True)] == ["corrupt"]


@pytest.mark.parametrize("how,match", [
    ("not json", "not valid JSON"),
    ("list", "not a JSON object"),
    ("missing key", "lacks required keys: files"),
    ("bad sha", "sha256 must be"),
    ("newer format", "newer than this raft_sqlite"),
    ("manifest version", "manifest version"),
    ("missing file entry", "files must be exactly"),
    ("duplicate", "listed twice"),
    ("bad size", "size must be"),
])
def test_corrupt_manifest_refused_before_writing(tmp_path, backup, how, match):
    p = os.path.join(backup.path, MANIFEST)
    if how == "not json":
        Path(p).write_text('{"node_id": "n1", ')
    elif how == "list":
        Path(p).write_text("[]")
    else:
        def fn(m):
            if how == "missing key":
                del m["files"]
            elif how == "bad sha":
                m["files"][0]["sha256"] = "zz"
            elif how == "newer format":
                m["format_version"] = 99
            elif how == "manifest version":
                m["manifest_version"] = 2
            elif how == "missing file entry":
                m["files"].pop()
            elif how == "duplicate":
                m["files"][1] = dict(m["files"][0])
            elif how == "bad size":
                m["files"][0]["size"] = -1
        _edit_manifest(backup, fn)
    target = tmp_path / "empty"
    target.mkdir()
    with pytest.raises(BackupError, match=match):
        restore(backup.path, target)
    assert tree(target) == []


def _set_group(name, field, value):
    def fn(m):
        [g] = [g for g in m["groups"] if g["name"] == name]
        g[field] = value
    return fn


@pytest.mark.parametrize("edit,match", [
    (_set_group("a", "term", 3), "group 'a': term is 3 in the manifest but 2"),
    (_set_group("a", "voted_for", "n3"), "group 'a': voted_for is 'n3' in the manifest but 'n2'"),
    (_set_group("b", "voted_for", "7"), "group 'b': voted_for is '7' in the manifest but 7"),
    (_set_group("b", "term", 5.0), "group 'b': term is 5.0"),
    (_set_group("a", "commit_index", 121), "group 'a': commit_index is 121"),
    (_set_group("a", "first_index", 1), "group 'a': first_index is 1"),
    (_set_group("a", "last_index", 200), "group 'a': last_index is 200"),
    (_set_group("b", "snapshot_index", 5), "group 'b': snapshot_index is 5"),
    (_set_group("a", "snapshot_term", 2), "group 'a': snapshot_term is 2"),
    (_set_group("a", "latest_snapshot", None), "group 'a': latest_snapshot is None"),
    (lambda m: m["groups"][0].pop("commit_index"), "group 'a' lacks commit_index"),
    (lambda m: m["groups"].pop(), "group 'b' is in the backup's raft.db but not in the manifest"),
    (lambda m: m["groups"].append({**m["groups"][0], "name": "c"}), "group 'c' is in the manifest but not"),
    (lambda m: m["groups"].append(m["groups"][0]), "group 'a' is listed twice"),
    (lambda m: m.__setitem__("node_id", "n9"), "node_id is 'n9' but the backup's raft.db holds 'n1'"),
    (lambda m: m.__setitem__("cluster_id", "c9"), "cluster_id is 'c9'"),
], ids=["term", "vote", "vote-type", "term-type", "commit", "first", "last", "snapshot", "snapshot-term",
        "latest-snapshot", "field-missing", "group-missing", "group-extra", "group-twice", "node", "cluster"])
def test_manifest_disagreeing_with_the_data_refused_before_writing(tmp_path, backup, edit, match):
    """Every file's sha256 still matches: only the manifest's account of the data is wrong."""
    _edit_manifest(backup, edit)
    with pytest.raises(BackupError, match=re.escape(match)):
        restore(backup.path, tmp_path / "target", allow_quorum_loss=True)
    assert tree(tmp_path / "target") is None
    verify_backup(backup.path, checksums=False)  # the shape is fine; the data check needs the checksums
    with pytest.raises(BackupError, match=re.escape(match)):
        verify_backup(backup.path)
    [listed] = list_backups(tmp_path / "bk", verify=True)
    assert listed["status"] == "corrupt" and match in listed["error"]


def test_restored_from_reports_the_restored_data(tmp_path, backup):
    before = {n: Path(backup.path, n).read_bytes() for n in tree(backup.path)}
    restore(backup.path, tmp_path / "target")
    assert {n: Path(backup.path, n).read_bytes() for n in tree(backup.path)} == before  # read, never written
    with open_store(tmp_path / "target") as s:
        got = s.restored_from["groups"]
        assert set(got) == {"a", "b"}
        for g in ("a", "b"):
            term, vote, commit = s.metadata(g).hard_state
            lg = s.log(g)
            assert got[g] == {"term": term, "voted_for": vote, "commit_index": commit,
                              "last_index": lg.last_index, "snapshot_index": lg.snapshot_index}
        assert got["a"] == {"term": 2, "voted_for": "n2", "commit_index": 100, "last_index": 121,
                            "snapshot_index": 60}


@pytest.mark.parametrize("name,match", [
    ("../raft.db", "escapes the backup folder"),
    ("../../etc/passwd", "escapes the backup folder"),
    ("/etc/passwd", "absolute"),
    ("sub/raft.db", "not a plain file name"),
    ("evil.db", "not a database file"),
])
def test_path_traversal_in_manifest_refused(tmp_path, backup, name, match):
    outside = tmp_path / "raft.db"
    outside.write_bytes(Path(backup.path, "raft.db").read_bytes())
    _edit_manifest(backup, lambda m: m["files"][0].update(name=name))
    with pytest.raises(BackupError, match=match):
        restore(backup.path, tmp_path / "target")
    assert tree(tmp_path / "target") is None


def test_symlinked_backup_file_refused(tmp_path, backup):
    p = os.path.join(backup.path, "raft.db")
    os.rename(p, tmp_path / "elsewhere.db")
    os.symlink(tmp_path / "elsewhere.db", p)  # same bytes, so only the link check can catch it
    with pytest.raises(BackupError, match="symlink"):
        restore(backup.path, tmp_path / "target")
    assert tree(tmp_path / "target") is None


def test_incomplete_backup_never_used(tmp_path, backup):
    os.remove(os.path.join(backup.path, MANIFEST))
    with pytest.raises(BackupError, match="incomplete"):
        restore(backup.path, tmp_path / "target")
    assert tree(tmp_path / "target") is None
    assert [b["status"] for b in list_backups(tmp_path / "bk")] == ["incomplete"]


def test_quorum_loss_restore_requires_the_flag(tmp_path, backup):
    with pytest.raises(BackupError, match="allow_quorum_loss=True") as ei:
        restore(backup.path, tmp_path / "t", mode="quorum_loss")
    assert "majority" in str(ei.value) and "node replacement" in str(ei.value)
    assert tree(tmp_path / "t") is None
    with pytest.raises(ValueError, match="contradicts"):
        restore(backup.path, tmp_path / "t", mode="node_replacement", allow_quorum_loss=True)
    with pytest.raises(ValueError, match="unknown restore mode"):
        restore(backup.path, tmp_path / "t", mode="yolo")
    assert tree(tmp_path / "t") is None
    r = restore(backup.path, tmp_path / "t", mode="quorum_loss", allow_quorum_loss=True)
    assert r.kind == "quorum_loss_restore"
    r2 = restore(backup.path, tmp_path / "t2", allow_quorum_loss=True)  # the flag alone means quorum loss
    assert r2.kind == "quorum_loss_restore"
    with open_store(tmp_path / "t") as b:
        rf = b.restored_from
        assert rf["kind"] == "quorum_loss_restore" and sorted(rf["groups"]) == ["a", "b"]
        assert "re-bootstrap" in rf["action"]
    c = apsw.Connection(str(tmp_path / "t" / "raft.db"))
    kinds = [k for (k,) in c.execute("SELECT kind FROM recovery_events ORDER BY event_id")]
    c.close()
    assert kinds.count("quorum_loss_restore") == 1 and "node_replacement" not in kinds
    assert kinds[-1] == "open"  # the STRICT check-open after the event


def test_restore_that_fails_the_strict_open_leaves_nothing(tmp_path, store):
    fill(store, "a", 20)
    info = HotBackupManager(store, tmp_path / "bk").backup()
    # Damage a log entry inside the copy *and* re-sign the manifest: only STRICT recovery can notice.
    p = os.path.join(info.path, "raft.db")
    c = apsw.Connection(p)
    c.execute("UPDATE log_entries SET payload = X'00' WHERE idx = 7")
    c.close()
    from raft_sqlite.backup import _sha256_file
    size, digest = _sha256_file(p)
    _edit_manifest(info, lambda m: m["files"][0].update(size=size, sha256=digest))
    with pytest.raises(BackupError, match="STRICT"):
        restore(info.path, tmp_path / "t")
    assert tree(tmp_path / "t") is None


# ------------------------------------------------------------------------------------------- death at every file operation
class _DiesAt(fsio.OsFileSystem):
    """The OS file system until the ``n``-th changing call (open, write, sync, rename, unlink, mkdir,
    ...), which fails with EIO and so does every later one: the process "died" there, its clean-up
    cannot run. ``close`` always works (no descriptor leaks). ``calls`` counts the changing calls."""

    def __init__(self, n=None):
        self.n, self.calls = n, 0

    def _step(self):
        self.calls += 1
        if self.n is not None and self.calls >= self.n:
            raise OSError(errno.EIO, f"died at file operation {self.calls}")


def _dying(orig):
    def call(self, *a, **kw):
        self._step()
        return orig(self, *a, **kw)
    return call


for _name in ("open", "write", "pwrite", "ftruncate", "fsync", "fdatasync", "sync_dir", "rename", "replace",
              "unlink", "mkdir", "makedirs", "rmtree"):
    setattr(_DiesAt, _name, _dying(getattr(fsio.OsFileSystem, _name)))


def _small_source(path):
    s = open_store(path)
    fill(s, "a", 30)
    s.metadata("a").set_term_and_vote(3, "n2")
    s.metadata("a").set_commit_index(25)
    snapshot(s, "a", 20, 1, os.urandom(70_000))
    return s


def _classify_restore_target(target, expected, backup_path):
    """After a restore died: 'untouched' (no database file there), 'refused' (raft.db is the placeholder
    and opening fails with CorruptionError) or 'complete' (opens holding exactly the backup and its restore
    event). Anything else fails the test."""
    names = tree(target) or []
    if "raft.db" not in names:
        assert "chunks.db" not in names, f"chunks.db without raft.db: {names}"
        if any(re.match(layout.RESTORE_TEMP_PATTERN, os.path.basename(n)) for n in names):
            # only the restore's temporaries: opening must not create a brand-new node beside them
            with pytest.raises(CorruptionError, match="interrupted restore"):
                open_store(target).close()
            return "refused"
        return "untouched"
    if Path(target, "raft.db").read_bytes().startswith(backup_mod.RESTORE_PLACEHOLDER):
        with pytest.raises(CorruptionError, match="interrupted restore"):
            open_store(target).close()
        return "refused"
    with open_store(target) as s:
        assert state(s) == expected
        assert s.restored_from["kind"] == "node_replacement" and s.restored_from["backup_path"] == backup_path
    return "complete"


def test_restore_dying_at_every_file_operation_never_leaves_a_half_restored_store(tmp_path):
    """The process dies at each file operation of restore() in turn (no clean-up runs). The target then
    is untouched, refuses to open (placeholder raft.db), or is the complete restored store; in the first
    two cases a repeated restore() succeeds. Fails if the placeholder is not written first or raft.db is
    not the last name to appear (see test_restore_check_sees_a_missing_placeholder)."""
    with _small_source(tmp_path / "node") as s:
        info = HotBackupManager(s, tmp_path / "bk").backup()
        expected = state(s)
    dry = _DiesAt()
    with fsio.installed(dry):
        restore(info.path, tmp_path / "dry")
    seen = {}
    for k in range(1, dry.calls + 1):
        target = tmp_path / f"t{k}"
        returned = False
        with fsio.installed(_DiesAt(k)):
            try:
                restore(info.path, target)
                returned = True  # the failed call was one the store tolerates (e.g. its disk reserve)
            except BackupError:
                pass
        outcome = _classify_restore_target(target, expected, info.path)
        assert outcome == "complete" or not returned, (k, outcome)
        seen[outcome] = seen.get(outcome, 0) + 1
        if outcome != "complete":
            restore(info.path, target)  # removes the leftovers and restores afresh
            with open_store(target) as s2:
                assert state(s2) == expected and s2.restored_from["kind"] == "node_replacement"
    assert seen.get("refused", 0) >= 5 and seen.get("untouched", 0) >= 1, seen


def test_restore_check_sees_a_missing_placeholder(tmp_path, monkeypatch):
    """The check above can fail: without the placeholder, a restore that died after chunks.db got its name
    leaves a data_dir that a repeated restore refuses as not empty."""
    with _small_source(tmp_path / "node") as s:
        info = HotBackupManager(s, tmp_path / "bk").backup()
    real = backup_mod._write_file_atomically
    monkeypatch.setattr(backup_mod, "_write_file_atomically",
                        lambda folder, name, data: None if data == backup_mod.RESTORE_PLACEHOLDER
                        else real(folder, name, data))
    dry = _DiesAt()
    with fsio.installed(dry):
        restore(info.path, tmp_path / "dry")
    failures = 0
    for k in range(1, dry.calls + 1):
        target = tmp_path / f"t{k}"
        with fsio.installed(_DiesAt(k)), contextlib.suppress(BackupError):
            restore(info.path, target)
        if "chunks.db" in (tree(target) or []) and "raft.db" not in tree(target):
            with pytest.raises(BackupError, match="not empty"):
                restore(info.path, target)
            failures += 1
    assert failures >= 1


def test_restore_removes_the_leftovers_of_an_interrupted_restore_only(tmp_path, backup):
    target = tmp_path / "t"
    target.mkdir()
    (target / "raft.db").write_bytes(backup_mod.RESTORE_PLACEHOLDER)
    (target / ".raft.db.restoring").write_bytes(b"partial")
    (target / "chunks.db").write_bytes(b"from a failed open")
    restore(backup.path, target)
    with open_store(target) as s:
        assert s.restored_from["kind"] == "node_replacement"
    only_temps = tmp_path / "t2"
    only_temps.mkdir()
    (only_temps / ".chunks.db.restoring").write_bytes(b"partial")
    restore(backup.path, only_temps)
    other = tmp_path / "t3"
    other.mkdir()
    (other / "raft.db").write_bytes(b"SQLite format 3\0" + bytes(100))  # not ours: never removed
    (other / ".raft.db.restoring").write_bytes(b"partial")
    with pytest.raises(BackupError, match="not empty"):
        restore(backup.path, other)
    assert tree(other) == [".raft.db.restoring", "raft.db"]


def test_backup_dying_at_every_file_operation_leaves_an_incomplete_or_complete_backup(tmp_path):
    """The process dies at each file operation of backup() in turn: the folder is either incomplete
    (listed so, refused by verify and restore with BackupError, removed by the next prune) or complete
    (restores to the store's state); the store keeps serving and the next backup succeeds."""
    s = _small_source(tmp_path / "node")
    try:
        expected = state(s)
        dry = _DiesAt()
        with fsio.installed(dry):
            HotBackupManager(s, tmp_path / "dry").backup()
        seen = {"incomplete": 0, "complete": 0}
        for k in range(1, dry.calls + 1):
            bk = tmp_path / f"bk{k}"
            with fsio.installed(_DiesAt(k)), pytest.raises(BackupError):
                HotBackupManager(s, bk).backup()
            for e in list_backups(bk, verify=True):
                assert e["status"] in ("incomplete", "complete"), e
                seen[e["status"]] += 1
                if e["status"] == "incomplete":
                    with pytest.raises(BackupError, match="incomplete"):
                        verify_backup(e["path"])
                    with pytest.raises(BackupError, match="incomplete"):
                        restore(e["path"], tmp_path / f"r{k}")
                    assert tree(tmp_path / f"r{k}") is None
                else:
                    restore(e["path"], tmp_path / f"r{k}")
                    with open_store(tmp_path / f"r{k}") as r:
                        assert state(r) == expected
            mgr = HotBackupManager(s, bk)
            mgr.prune()
            assert all(e["status"] == "complete" for e in list_backups(bk))
            mgr.backup()
        assert seen["incomplete"] >= 5, seen
    finally:
        s.close()


# ------------------------------------------------------------------------------------------- crash
KILL_CODE = r"""
import sys
from raft_sqlite import FsyncMode, LogEntry, NodeStore
from raft_sqlite.backup import HotBackupManager
s = NodeStore.open(sys.argv[1], "n1", cluster_id="c1", fsync=FsyncMode.OFF)
blob = b"z" * 4000
for start in range(1, 4001, 500):
    s.log("a").append([LogEntry(i, 1, blob) for i in range(start, start + 500)])
def progress(phase, done, total):
    if phase == "raft.db":
        print("copying", done, total, flush=True)
HotBackupManager(s, sys.argv[2], pages_per_step=16, step_pause=0.01).backup(progress=progress)
print("finished", flush=True)
"""


def test_sigkill_during_backup_leaves_no_manifest_and_next_backup_succeeds(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-c", KILL_CODE, str(tmp_path / "node"), str(tmp_path / "bk")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        seen = 0
        for line in p.stdout:
            if line.startswith("copying"):
                seen += 1
                if seen == 5:
                    break
        assert seen == 5, p.stderr.read()
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(30)
    assert p.returncode == -signal.SIGKILL
    [folder] = [e for e in os.listdir(tmp_path / "bk" / "n1") if not e.startswith(".")]
    folder = tmp_path / "bk" / "n1" / folder
    assert MANIFEST not in os.listdir(folder) and not any(f.endswith(".tmp") for f in os.listdir(folder))
    assert [b["status"] for b in list_backups(tmp_path / "bk")] == ["incomplete"]
    with pytest.raises(BackupError, match="incomplete"):
        restore(folder, tmp_path / "t")
    with open_store(tmp_path / "node") as s:  # the source is intact, and the next backup succeeds
        assert s.log("a").last_index == 4000
        m = HotBackupManager(s, tmp_path / "bk")
        info = m.backup()
        assert sorted(b["status"] for b in list_backups(tmp_path / "bk")) == ["complete", "incomplete"]
        assert m.prune() == [str(folder)]  # the dead folder goes; the lock proves it is not in progress
    assert [b["path"] for b in list_backups(tmp_path / "bk")] == [info.path]
    restore(info.path, tmp_path / "t")
    with open_store(tmp_path / "t") as b:
        assert b.log("a").last_index == 4000 and b.log("a").get(4000).data == b"z" * 4000


# ------------------------------------------------------------------------------------------- retention
def test_prune_by_count_and_age_keeps_the_newest(tmp_path, store):
    fill(store, "a", 3)
    m = HotBackupManager(store, tmp_path / "bk")
    infos = [m.backup() for _ in range(4)]
    with pytest.raises(ValueError):
        m.prune(keep=0)
    assert m.prune(keep=2) == [infos[1].path, infos[0].path]
    assert [b["path"] for b in m.list()] == [infos[3].path, infos[2].path]
    time.sleep(0.05)
    assert m.prune(max_age=0.01) == [infos[2].path]  # all too old, but the newest stays
    assert [b["path"] for b in m.list()] == [infos[3].path]
    assert m.prune(keep=1, max_age=3600) == []


# Retention must not trust the wall clock: the order is the manifest's seq, ages use the boot-time clock.
DAY = 86400.0


def _shift_clock(monkeypatch, seconds):
    """Move the wall clock (time.time, as raft_sqlite.backup reads it) by ``seconds`` from the real one."""
    real = _REAL_TIME
    monkeypatch.setattr(backup_mod.time, "time", lambda: real() + seconds)


def test_prune_keep_follows_the_backup_order_when_the_clock_moves_back(tmp_path, store, monkeypatch):
    fill(store, "a", 3)
    m = HotBackupManager(store, tmp_path / "bk")
    a = m.backup()
    _shift_clock(monkeypatch, -DAY)  # the clock is set back a day: later backups get earlier timestamps
    fill(store, "a", 2, start=4)
    b = m.backup()
    c = m.backup()
    assert [x.manifest["seq"] for x in (a, b, c)] == [1, 2, 3]
    assert c.manifest["created_at_unix"] < a.manifest["created_at_unix"]
    assert [e["path"] for e in m.list()] == [c.path, b.path, a.path]
    assert all(e["age"] >= 0 for e in m.list())
    assert m.last_backup()["path"] == c.path  # the last recorded, not the one with the latest timestamp
    monkeypatch.undo()
    _shift_clock(monkeypatch, -2 * DAY)
    assert m.last_backup()["age"] == 0.0  # never negative
    _shift_clock(monkeypatch, -DAY)
    assert m.prune(max_age=3600) == []  # nothing is a day old, whatever the timestamps say
    assert m.prune(keep=1) == [b.path, a.path]  # the old code deleted c, the newest
    [left] = m.list()
    assert left["path"] == c.path and left["seq"] == 3
    restore(c.path, tmp_path / "r")
    with open_store(tmp_path / "r") as r:
        assert r.log("a").last_index == 5
    monkeypatch.undo()
    assert m.backup().manifest["seq"] == 4


def test_max_age_is_not_fooled_by_a_clock_jump_forward(tmp_path, store, monkeypatch):
    fill(store, "a", 3)
    m = HotBackupManager(store, tmp_path / "bk")
    a = m.backup()
    _shift_clock(monkeypatch, 30 * DAY)
    b = m.backup()
    assert m.prune(max_age=3600) == []  # a is seconds old on the boot-time clock (the old code removed it)
    assert [e["path"] for e in m.list()] == [b.path, a.path]
    assert max(e["age"] for e in m.list()) < 3600
    _shift_clock(monkeypatch, -30 * DAY)
    assert m.prune(max_age=3600) == [] and len(m.list()) == 2


def test_ages_across_a_reboot_use_the_wall_clock_and_a_step_back_counts_zero(tmp_path, store, monkeypatch):
    fill(store, "a", 3)
    m = HotBackupManager(store, tmp_path / "bk")
    a = m.backup()
    b = m.backup()
    monkeypatch.setattr(backup_mod, "_boot_clock", lambda: ("another-boot", 1.0))  # "after a reboot"
    _shift_clock(monkeypatch, -DAY)
    assert m.prune(max_age=60) == []
    assert [e["age"] for e in m.list()][0] == 0.0
    _shift_clock(monkeypatch, 2 * 3600)
    assert m.prune(max_age=3600) == [a.path]  # two hours by the wall clock: a goes, the newest stays
    _shift_clock(monkeypatch, 10 * DAY)
    assert m.prune(max_age=3600) == [] and [e["path"] for e in m.list()] == [b.path]


def test_manifests_without_seq_are_older_than_every_numbered_backup(tmp_path):
    with open_store(tmp_path / "old") as s:
        fill(s, "a", 3)
        m = HotBackupManager(s, tmp_path / "bk")
        old = [m.backup(), m.backup()]
    for info in old:  # as written by a raft_sqlite that did not record seq/clock
        _edit_manifest(info, lambda man: (man.pop("seq"), man.pop("clock")))
        verify_backup(info.path)
    with open_store(tmp_path / "new") as s2:  # same node id, a store that never counted backups
        m2 = HotBackupManager(s2, tmp_path / "bk")
        assert [e["seq"] for e in m2.list()] == [None, None]
        assert [e["path"] for e in m2.list()] == [old[1].path, old[0].path]  # by timestamp among themselves
        new = m2.backup()
        assert new.manifest["seq"] == 1
        assert [e["path"] for e in m2.list()] == [new.path, old[1].path, old[0].path]
        assert m2.prune(keep=1) == [old[1].path, old[0].path]
        assert m2.backup().manifest["seq"] == 2
    _edit_manifest(new, lambda man: man.__setitem__("seq", "7"))
    with pytest.raises(BackupError, match="seq must be a positive integer"):
        verify_backup(new.path)


def test_store_counter_keeps_seq_increasing_when_the_backup_folder_is_emptied(tmp_path, store):
    fill(store, "a", 3)
    m = HotBackupManager(store, tmp_path / "bk")
    m.backup()
    m.backup()
    store.close()
    shutil.rmtree(tmp_path / "bk")
    with open_store(store.data_dir) as s:
        assert HotBackupManager(s, tmp_path / "bk").backup().manifest["seq"] == 3


def test_scheduler_and_cli_retention_keep_the_newest_when_the_clock_moves_back(tmp_path, store, monkeypatch):
    fill(store, "a", 3)
    sched = HotBackupScheduler(store, tmp_path / "bk", interval=3600, keep=1)
    first = sched.run_once()
    _shift_clock(monkeypatch, -DAY)
    second = sched.run_once()
    assert sched.failures == 0 and [e["path"] for e in sched.manager.list()] == [second.path]
    assert first.path != second.path
    store.close()
    code = (
        "import sys, time\n"
        "real = time.time\n"
        "time.time = lambda: real() - 2 * 86400\n"
        "from raft_sqlite.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    r = run_py(code, "backup", store.data_dir, tmp_path / "bk", "--keep", "1", "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["manifest"]["seq"] == 3 and made["pruned"] == [second.path]
    r = cli("backups", tmp_path / "bk", "--json")
    assert [(e["path"], e["seq"]) for e in json.loads(r.stdout)] == [(made["path"], 3)]


def test_scheduler_backs_up_periodically_with_retention(tmp_path, store):
    fill(store, "a", 3)
    sched = HotBackupScheduler(store, tmp_path / "bk", interval=0.05, keep=2, run_at_start=True).start()
    deadline = time.monotonic() + 20
    while sched.successes < 4 and time.monotonic() < deadline:
        fill(store, "a", 1, start=store.log("a").last_index + 1)
        time.sleep(0.02)
    sched.stop()
    assert sched.successes >= 4 and sched.failures == 0
    listed = list_backups(tmp_path / "bk")
    assert [b["status"] for b in listed] == ["complete", "complete"]
    assert listed[0]["path"] == sched.last_backup.path
    assert HotBackupManager(store, tmp_path / "bk").last_backup()["path"] == sched.last_backup.path
    n = sched.successes
    time.sleep(0.15)
    assert sched.successes == n  # stopped means stopped


def test_scheduler_counts_and_logs_failures_without_raising(tmp_path, store, caplog):
    (tmp_path / "bk").write_text("a file, not a folder")
    sched = HotBackupScheduler(store, tmp_path / "bk", interval=0.02, run_at_start=True)
    with caplog.at_level(logging.ERROR, logger="raft_sqlite.backup"):
        sched.start()
        deadline = time.monotonic() + 10
        while sched.failures < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        sched.stop()
    assert sched.failures >= 2 and sched.successes == 0
    assert isinstance(sched.last_error, BackupError)
    assert any("scheduled backup" in r.getMessage() for r in caplog.records)


def test_scheduler_skips_a_tick_while_another_backup_runs(tmp_path, store):
    fill(store, "a", 3)
    sched = HotBackupScheduler(store, tmp_path / "bk", interval=3600)
    with HotBackupManager(store, tmp_path / "bk")._exclusive():
        assert sched.run_once() is None
    assert (sched.skipped, sched.failures) == (1, 0)
    assert sched.run_once() is not None and sched.successes == 1


def test_scheduler_stop_cancels_a_running_backup(tmp_path, store):
    fill(store, "pad", 3000)
    sched = HotBackupScheduler(store, tmp_path / "bk", interval=0.01, run_at_start=True, pages_per_step=1,
                               step_pause=0.01)
    sched.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    sched.stop()
    assert time.monotonic() - t0 < 2
    assert sched.failures == 0
    assert [b for b in list_backups(tmp_path / "bk")] == []  # the cancelled copy was removed


# ------------------------------------------------------------------------------------------- CLI
def cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), COLUMNS="250")
    return subprocess.run([sys.executable, "-m", "raft_sqlite.cli", *map(str, args)], check=False, capture_output=True,
                          text=True, timeout=120, env=env)


def test_cli_backup_backups_restore(tmp_path):
    make_source(tmp_path / "node").close()
    r = cli("backup", tmp_path / "node", tmp_path / "bk", "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert os.path.exists(os.path.join(made["path"], MANIFEST)) and made["manifest"]["node_id"] == "n1"
    r = cli("backup", tmp_path / "node", tmp_path / "bk", "--keep", "1")
    assert r.returncode == 0, r.stderr
    assert "pruned" in r.stdout and "group a: term 2, commit 100, log 61..121" in r.stdout
    r = cli("backups", tmp_path / "bk", "--json")
    assert r.returncode == 0, r.stderr
    [listed] = json.loads(r.stdout)
    assert listed["status"] == "complete" and listed["age"] >= 0
    os.mkdir(tmp_path / "bk" / "n1" / "20200101T000000.000000Z")  # an interrupted one
    r = cli("backups", tmp_path / "bk", "--verify")
    assert r.returncode == 0 and "complete" in r.stdout and "incomplete" in r.stdout, r.stdout
    path = listed["path"]
    r = cli("restore", path, tmp_path / "t", "--mode", "quorum-loss")
    assert r.returncode == 5 and "--quorum-loss" in r.stderr and "majority" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "t")
    r = cli("restore", path, tmp_path / "t")
    assert r.returncode == 0 and "node_replacement" in r.stdout, r.stderr
    r = cli("restore", path, tmp_path / "t")
    assert r.returncode == 5 and "not empty" in r.stderr
    r = cli("restore", path, tmp_path / "t2", "--quorum-loss", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kind"] == "quorum_loss_restore"
    r = cli("restore", tmp_path / "nope", tmp_path / "t3")
    assert r.returncode == 3
    with open_store(tmp_path / "t2") as b:
        assert b.restored_from["kind"] == "quorum_loss_restore"
        assert b.log("a").last_index == 121


@pytest.mark.parametrize("leftover", ["placeholder", ".raft.db.restoring", ".chunks.db.tmp"])
def test_open_refuses_an_interrupted_restore_and_a_repeated_restore_completes(tmp_path, leftover):
    """NodeStore.open on a data_dir an interrupted restore left behind is refused with a message that says
    to run the restore again (opening it would create a brand-new node with this node's identity), under
    every policy; the repeated restore then succeeds."""
    with open_store(tmp_path / "n1") as s:
        s.log("a").append_next(1, [b"x", b"y"])
        info = HotBackupManager(s, str(tmp_path / "bk")).backup()
    target = tmp_path / "target"
    target.mkdir()
    if leftover == "placeholder":
        (target / "raft.db").write_bytes(layout.RESTORE_PLACEHOLDER)
    else:
        (target / leftover).write_bytes(b"half a copy")
    for policy in RecoveryPolicy:
        with pytest.raises(CorruptionError, match="interrupted restore.*run the restore again"):
            open_store(target, recovery=policy).close()
    assert not (target / "raft.db-wal").exists() and not (target / "chunks.db").exists()  # nothing written
    restore(info.path, str(target))
    with open_store(target) as s:
        assert [e.data for e in s.log("a").entries(1, 3)] == [b"x", b"y"]


def test_stale_restore_temporaries_beside_a_real_store_are_ignored_with_a_warning(tmp_path, caplog):
    """A restore temporary next to a real raft.db (the restore's last step was done; a power cut kept a
    name it had removed) must not make a healthy store refuse to open: it opens, with a warning naming it."""
    d = tmp_path / "n1"
    with open_store(d) as s:
        s.log("a").append_next(1, [b"x"])
    (d / ".raft.db.restoring").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="raft_sqlite.store"), open_store(d) as s:
        assert [e.data for e in s.log("a").entries(1, 2)] == [b"x"]
    assert any("leftovers of a restore that completed" in r.getMessage() for r in caplog.records)
