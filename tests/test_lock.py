"""One process, one store per data_dir: the exclusive data_dir lock, unusable data_dirs, and the
permissions of data_dir and its files."""

import logging
import os
import signal
import socket
import stat
import subprocess
import sys

import pytest

from raft_sqlite import (
    DataDirError,
    DataDirLocked,
    FsyncMode,
    HotBackupManager,
    LogEntry,
    NodeIdentityMismatch,
    NodeStore,
    RaftSqliteError,
    restore,
)
from raft_sqlite import lock as lockmod
from tests.conftest import ROOT, open_store, run_py

ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def fill(s, group="a", n=10, term=5):
    s.metadata(group).set_term_and_vote(term, "n1")
    s.log(group).append([LogEntry(i, term, b"e%d" % i) for i in range(1, n + 1)])
    s.metadata(group).set_commit_index(n)


def assert_state(d, group="a", n=10, term=5):
    with open_store(d) as s:
        assert s.metadata(group).current_term == term
        assert s.metadata(group).commit_index == n
        assert s.log(group).last_index == n


# ---------------------------------------------------------------------------------------------- same process
def test_second_open_in_same_process_is_refused_and_cannot_fork_state(data_dir):
    a = open_store(data_dir)
    try:
        fill(a)
        # the review's scenario: a stale second handle would have written term 3 / commit 0 and truncated
        with pytest.raises(DataDirLocked) as ei:
            open_store(data_dir)
        e = ei.value
        assert isinstance(e, RaftSqliteError)
        assert (e.pid, e.host, e.node_id) == (os.getpid(), socket.gethostname(), "n1")
        assert e.since is not None and f"process {os.getpid()}" in str(e) and str(data_dir) in str(e)
        with pytest.raises(DataDirLocked):  # another node id too: the lock comes before the identity check
            NodeStore.open(data_dir, "other", cluster_id="c1", fsync=FsyncMode.OFF)
        # the refused opens changed nothing and the first handle still works
        a.log("a").append([LogEntry(11, 5, b"e11")])
        a.metadata("a").set_commit_index(11)
    finally:
        a.close()
    assert_state(data_dir, n=11)


def test_lock_is_released_on_close_and_on_failed_open(data_dir):
    with open_store(data_dir) as s:
        fill(s)
    assert lockmod.holder(data_dir) is None
    with pytest.raises(NodeIdentityMismatch):
        NodeStore.open(data_dir, "someone-else", cluster_id="c1", fsync=FsyncMode.OFF)
    assert lockmod.holder(data_dir) is None  # the failed open let go of the lock
    assert_state(data_dir)


def test_refused_open_leaves_the_holders_lock_alone(data_dir):
    with open_store(data_dir) as s:
        for _ in range(3):
            with pytest.raises(DataDirLocked):
                open_store(data_dir)
        h = lockmod.holder(data_dir)
        assert h is not None and h.pid == os.getpid() and h.node_id == "n1"
        fill(s)
    assert lockmod.holder(data_dir) is None
    assert_state(data_dir)


def test_lock_file_is_recreated_if_missing_and_locked_by_path(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    with lockmod.DataDirLock.acquire(d, node_id="x") as lk:
        assert lk.held and lk.created
        with pytest.raises(DataDirLocked):
            lockmod.DataDirLock.acquire(d)
    assert not lk.held
    with lockmod.DataDirLock.acquire(d) as lk2:
        assert not lk2.created


# ---------------------------------------------------------------------------------------------- other processes
HOLD = r"""
import sys
from raft_sqlite import NodeStore, LogEntry, FsyncMode
s = NodeStore.open(sys.argv[1], "n1", cluster_id="c1", fsync=FsyncMode.FULL)
s.metadata("a").set_term_and_vote(5, "n1")
s.log("a").append([LogEntry(i, 5, b"e%d" % i) for i in range(1, 11)])
s.metadata("a").set_commit_index(10)
print("ready", flush=True)
sys.stdin.readline()   # hold the store until told to go (or until killed)
s.close()
print("closed", flush=True)
"""


def test_open_refused_while_another_process_holds_it_and_free_after_sigkill(data_dir):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(data_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        with pytest.raises(DataDirLocked) as ei:
            open_store(data_dir)
        assert ei.value.pid == p.pid and ei.value.node_id == "n1" and f"process {p.pid}" in str(ei.value)
        # a third process is refused the same way
        r = run_py("import sys\nfrom raft_sqlite import NodeStore, DataDirLocked\n"
                   "try:\n    NodeStore.open(sys.argv[1], 'n1', cluster_id='c1')\n"
                   "except DataDirLocked as e:\n    print('locked', e.pid)\n", data_dir)
        assert r.stdout.split() == ["locked", str(p.pid)], r.stderr
        p.send_signal(signal.SIGKILL)  # no close(), no cleanup: the kernel drops the lock
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert lockmod.holder(data_dir) is None
    assert (data_dir / "raft.lock").exists()  # the stale file and its stale holder record mean nothing
    assert_state(data_dir)


def test_other_process_refused_while_this_process_holds_it(data_dir):
    with open_store(data_dir) as s:
        fill(s)
        r = run_py("import sys\nfrom raft_sqlite import NodeStore, DataDirLocked\n"
                   "try:\n    NodeStore.open(sys.argv[1], 'n1', cluster_id='c1')\n"
                   "except DataDirLocked as e:\n    print('locked', e.pid, e.node_id)\n", data_dir)
        assert r.stdout.split() == ["locked", str(os.getpid()), "n1"], r.stderr
    assert_state(data_dir)


def test_clean_close_in_other_process_frees_the_lock(data_dir):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(data_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        assert lockmod.holder(data_dir).pid == p.pid
        out, errs = p.communicate("go\n", timeout=60)
        assert "closed" in out, errs
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert lockmod.holder(data_dir) is None
    assert_state(data_dir)


# ---------------------------------------------------------------------------------------------- unusable data_dir
def test_data_dir_that_is_a_regular_file_is_refused_and_nothing_created(tmp_path):
    f = tmp_path / "node"
    f.write_bytes(b"not a directory")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(DataDirError) as ei:
        open_store(f)
    assert str(f) in str(ei.value) and "not a directory" in str(ei.value)
    assert f.read_bytes() == b"not a directory" and sorted(os.listdir(tmp_path)) == before


def test_data_dir_that_is_a_dangling_symlink_is_refused(tmp_path):
    link = tmp_path / "node"
    link.symlink_to(tmp_path / "missing")
    with pytest.raises(DataDirError, match="dangling symlink"):
        open_store(link)
    assert not (tmp_path / "missing").exists()


def test_data_dir_below_a_regular_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"x")
    with pytest.raises(DataDirError):
        open_store(f / "node")
    assert f.read_bytes() == b"x"


# ---------------------------------------------------------------------------------------------- permissions
def mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_new_store_is_0700_with_0600_files(data_dir):
    with open_store(data_dir, fsync=FsyncMode.FULL) as s:
        fill(s)
        names = set(os.listdir(data_dir))
        assert {"raft.db", "chunks.db", "raft.lock"} <= names
        assert mode(data_dir) == 0o700
        for n in names:
            assert mode(data_dir / n) == 0o600, n
    assert_state(data_dir)


def test_loose_modes_are_tightened_on_open_with_a_warning(data_dir, caplog):
    with open_store(data_dir) as s:
        fill(s)
    os.chmod(data_dir, 0o755)
    for n in ("raft.db", "chunks.db", "raft.lock"):
        os.chmod(data_dir / n, 0o644)
    with caplog.at_level(logging.WARNING, logger="raft_sqlite"), open_store(data_dir) as s:
        assert s.metadata("a").current_term == 5
    assert mode(data_dir) == 0o700
    for n in os.listdir(data_dir):
        assert mode(data_dir / n) == 0o600, n
    assert "mode was 0755" in caplog.text and "mode was 0644" in caplog.text and "raft.db" in caplog.text
    assert_state(data_dir)


def test_extra_mode_syncs_data_dir_after_creating_the_lock_file(data_dir, monkeypatch):
    seen = []
    real = NodeStore.sync_dir

    def spy(self):
        seen.append(sorted(os.listdir(self.data_dir)))
        return real(self)

    monkeypatch.setattr(NodeStore, "sync_dir", spy)
    with open_store(data_dir, fsync=FsyncMode.EXTRA) as s:
        fill(s)
    assert seen and "raft.lock" in seen[0] and "raft.db" in seen[0]
    assert_state(data_dir)


# ---------------------------------------------------------------------------------------------- backup / restore
def test_backup_skips_the_lock_and_restore_holds_it(tmp_path):
    src = tmp_path / "src"
    with open_store(src) as s:
        fill(s)
        info = HotBackupManager(s, tmp_path / "bk").backup()
    assert "raft.lock" not in os.listdir(info.path)
    assert all(f["name"] != "raft.lock" for f in info.manifest["files"])
    target = tmp_path / "restored"
    attempts = []

    def progress(phase, done, total):
        if not attempts:  # mid-restore: a store may not open the half-written data_dir
            try:
                NodeStore.open(target, "n1", cluster_id="c1").close()
                attempts.append("opened")
            except DataDirLocked as e:
                attempts.append(e.pid)

    restore(info.path, target, progress=progress)
    assert attempts == [os.getpid()]
    assert lockmod.holder(target) is None
    assert mode(target) == 0o700
    assert_state(target)


def test_restore_into_a_dir_a_live_store_holds_is_refused(tmp_path):
    src = tmp_path / "src"
    with open_store(src) as s:
        fill(s)
        info = HotBackupManager(s, tmp_path / "bk").backup()
    target = tmp_path / "t"
    target.mkdir()
    with lockmod.DataDirLock.acquire(target, node_id="other"):  # e.g. a store that has not created files yet
        with pytest.raises(DataDirLocked) as ei:
            restore(info.path, target)
        assert ei.value.node_id == "other"
        assert os.listdir(target) == ["raft.lock"]  # nothing written, the holder's lock file left alone
    restore(info.path, target)  # once free, the lock file alone does not make the dir "not empty"
    assert_state(target)
