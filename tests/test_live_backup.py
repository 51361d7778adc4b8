"""Live backups from another process (issue 14): ``raft-sqlite backup DATA_DIR DEST`` on a running node,
and the cross-process gc pin that keeps the two copied files consistent."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from raft_sqlite import BackupError, LogEntry
from raft_sqlite import lock as lock_mod
from raft_sqlite.backup import HotBackupManager, HotBackupScheduler, LiveSource, list_backups, restore
from raft_sqlite.cli import cli
from tests.conftest import ROOT, open_store
from tests.test_backup import fill, snapshot

_NODE = r"""
import os, sys
sys.path.insert(0, sys.argv[2])
from raft_sqlite import NodeStore, FsyncMode
s = NodeStore.open(sys.argv[1], "n1", cluster_id="c1", fsync=FsyncMode.NORMAL)
def payload(g, i):
    return f"{g}:{i}:".encode() * 20
n = 0
while True:
    for g in ("a", "b"):
        lg = s.log(g)
        i = lg.last_index + 1
        with s.transaction():
            lg.append_next(1, [payload(g, i)])
            s.metadata(g).set_commit_index(i)
        if i % 40 == 0:  # a snapshot, then retention deletes the older chains' chunks
            with s.snapshots(g).write(i, 1) as w:
                w.write(os.urandom(300_000))
            s.snapshots(g).retain(1)
            lg.compact(i - 10)
        print("ack", g, i, flush=True)
"""


def _payload(g, i):
    return f"{g}:{i}:".encode() * 20


def _check_restored(path, node_id="n1"):
    s = open_store(path, node_id=node_id)
    try:
        out = {}
        for g in ("a", "b"):
            lg, md = s.log(g), s.metadata(g)
            assert md.commit_index <= lg.last_index
            for e in lg.entries(lg.first_index, lg.last_index + 1):
                assert e.data == _payload(g, e.index)
            snap = s.snapshots(g).latest()
            if snap is not None:
                s.snapshots(g).verify(snap)  # raises unless every chunk is there and checks out
                assert len(s.snapshots(g).open(snap).read()) == snap.size
                assert lg.first_index <= snap.index + 1
            out[g] = lg.last_index
        return out
    finally:
        s.close()


def test_cli_backup_of_a_running_node_in_another_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    node = subprocess.Popen([sys.executable, "-c", _NODE, str(tmp_path / "node"), ROOT], stdout=subprocess.PIPE,
                            text=True, env=env)
    acked = {"a": 0, "b": 0}
    lock = threading.Lock()

    odd = []

    def read_acks():  # "ack g i" lines; the last one may be cut short by the kill (no newline: ignored)
        for line in node.stdout:
            parts = line.split()
            if not line.endswith("\n") or len(parts) != 3 or parts[0] != "ack" or parts[1] not in acked:
                odd.append(line)
                continue
            with lock:
                acked[parts[1]] = max(acked[parts[1]], int(parts[2]))

    reader = threading.Thread(target=read_acks, daemon=True)
    reader.start()
    runner = CliRunner()
    results = []
    try:
        deadline = time.monotonic() + 60
        while min(acked.values()) < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        for k in range(5):
            before = dict(acked)
            dest = str(tmp_path / "bk") if k % 2 == 0 else f"file://{tmp_path}/remote"
            res = runner.invoke(cli, ["backup", str(tmp_path / "node"), dest, "--json"])
            assert res.exit_code == 0, res.output
            results.append((dest, json.loads(res.stdout)))
            time.sleep(0.05)
            with lock:
                assert acked != before, "the node kept acknowledging appends while the backup ran"
        res = runner.invoke(cli, ["backup", str(tmp_path / "node"), str(tmp_path / "bk")])
        assert res.exit_code == 0 and "live backup" in res.output, res.output
    finally:
        node.send_signal(signal.SIGKILL)
        node.wait()
        reader.join(timeout=10)
    assert not reader.is_alive()
    assert all(not line.endswith("\n") for line in odd), f"the node printed something else than acks: {odd!r}"
    seqs = [b["seq"] for b in list_backups(tmp_path / "bk")]
    assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == len(seqs) == 4
    last = {"a": 0, "b": 0}
    for k, (_dest, out) in enumerate(results):
        restore(out["path"], tmp_path / f"r{k}")
        got = _check_restored(tmp_path / f"r{k}")
        assert all(got[g] >= last[g] for g in got), "each backup is a later point in time"
        last = got
    # the node's own store lost nothing it acknowledged: the live backups' connections never checkpointed
    # or deleted its WAL, even when the node died while one was open
    s = open_store(tmp_path / "node")
    try:
        for g, i in acked.items():
            lg = s.log(g)
            assert lg.last_index >= i
            assert lg.get(i).data == _payload(g, i)
        assert HotBackupManager(s, tmp_path / "bk").last_backup() is None  # live backups are not recorded
    finally:
        s.close()


def test_the_gc_pin_of_another_process_holds_chunk_deletion(tmp_path, caplog):
    s = open_store(tmp_path / "node")
    try:
        fill(s, "a", 50)
        s.metadata("a").set_commit_index(50)
        for i in (10, 20, 30):
            snapshot(s, "a", i, 1, os.urandom(100_000))
        done = threading.Event()

        def retain():
            s.snapshots("a").retain(1)
            done.set()

        # a separate open file description, as another process has: flock conflicts with the store's
        with lock_mod.gc_pin(str(tmp_path / "node")):
            th = threading.Thread(target=retain)
            th.start()
            assert not done.wait(0.3), "retention waits while the pin is held"
        assert done.wait(10)
        th.join()
        assert [m.index for m in s.snapshots("a").list()] == [30]
    finally:
        s.close()


def test_a_pin_held_too_long_never_stalls_the_node(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(lock_mod, "GC_PIN_WAIT", 0.2)
    s = open_store(tmp_path / "node")
    try:
        fill(s, "a", 50)
        s.metadata("a").set_commit_index(50)
        for i in (10, 20):
            snapshot(s, "a", i, 1, os.urandom(10_000))
        with lock_mod.gc_pin(str(tmp_path / "node")), caplog.at_level(logging.WARNING, logger="raft_sqlite.lock"):
            t = time.monotonic()
            s.snapshots("a").retain(1)  # goes on without the pin
            assert time.monotonic() - t < 5
        assert any("going on without it" in r.getMessage() for r in caplog.records)
        assert [m.index for m in s.snapshots("a").list()] == [20]
        # and a live backup waiting for a pin the node holds gives up with BackupBusy, writing nothing
        from raft_sqlite.backup import BackupBusy

        with s.gc_lock, pytest.raises(BackupBusy, match="gc pin"):
            HotBackupManager(LiveSource(tmp_path / "node"), tmp_path / "bk").backup()
        assert list_backups(tmp_path / "bk") == []
    finally:
        s.close()


def test_live_source_refuses_what_is_not_a_data_dir(tmp_path):
    from raft_sqlite import BackupError

    (tmp_path / "empty").mkdir()
    with pytest.raises(BackupError, match="raft.db is missing"):
        LiveSource(tmp_path / "empty")
    assert os.listdir(tmp_path / "empty") == []


# ------------------------------------------------------------------------------------------- review regressions
def _small_store(p):
    s = open_store(p)
    s.log("a").append([LogEntry(i, 1, b"x" * 100) for i in range(1, 50)])
    s.metadata("a").set_commit_index(49)
    return s


@pytest.mark.parametrize("damage", ["truncate_raft_db", "bad_manifest_json"])
def test_drill_does_not_pass_over_a_corrupt_newest_local_backup(tmp_path, damage):
    s = _small_store(tmp_path / "node")
    m = HotBackupManager(s, tmp_path / "bk")
    m.backup()
    s.log("a").append([LogEntry(50, 1, b"newest")])
    new = m.backup()
    if damage == "truncate_raft_db":
        os.truncate(os.path.join(new.path, "raft.db"), 4096)
    else:
        with open(os.path.join(new.path, "manifest.json"), "w") as f:
            f.write('{"trunc')
    rep = m.drill()
    s.close()
    assert rep.backup_path == new.path and not rep.ok


def test_drill_every_counts_backups_taken_not_skipped(tmp_path):
    s = _small_store(tmp_path / "node")
    lg = s.log("a")
    sched = HotBackupScheduler(s, tmp_path / "bk", interval=3600, drill_every=2, skip_unchanged=True)
    try:
        for tick in range(8):
            if tick % 2 == 0:
                lg.append([LogEntry(lg.last_index + 1, 1, b"x")])
            sched.run_once()
        assert sched.taken == 4 and sched.last_drill is not None and sched.last_drill.ok
    finally:
        s.close()


def test_a_drill_does_not_defeat_skip_unchanged(tmp_path):
    s = _small_store(tmp_path / "node")
    m = HotBackupManager(s, tmp_path / "bk", skip_unchanged=True)
    try:
        m.backup()
        assert m.backup().skipped
        assert m.drill().ok
        assert m.backup().skipped
    finally:
        s.close()


def test_an_interrupt_while_waiting_for_the_pin_leaves_the_gc_lock_free(tmp_path):
    s = _small_store(tmp_path / "node")
    try:
        for i in (10, 20):
            snapshot(s, "a", i, 1, os.urandom(1000))
        with lock_mod.gc_pin(str(tmp_path / "node")):
            threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
            with pytest.raises(KeyboardInterrupt):
                s.snapshots("a").retain(1)
        got = threading.Event()

        def take():
            with s.gc_lock:
                got.set()

        threading.Thread(target=take, daemon=True).start()
        assert got.wait(5), "the gc lock was left held by the interrupted thread"
    finally:
        s.close()


def test_the_gc_pin_works_through_a_read_only_view(tmp_path, monkeypatch):
    import errno

    s = _small_store(tmp_path / "node")
    s.close()
    real_open = os.open

    def ro_open(path, flags, *a):
        if str(path).endswith("raft.gc.lock") and flags & (os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *a)

    monkeypatch.setattr(lock_mod.os, "open", ro_open)
    info = HotBackupManager(LiveSource(tmp_path / "node"), tmp_path / "bk").backup()
    monkeypatch.undo()
    restore(info.path, tmp_path / "r")


def test_a_killed_drills_scratch_folder_is_removed_by_the_next(tmp_path):
    s = _small_store(tmp_path / "node")
    m = HotBackupManager(s, tmp_path / "bk")
    m.backup()
    abandoned = tmp_path / "scratch" / ".raft_sqlite-drill-abcd1234"
    abandoned.mkdir(parents=True)
    (abandoned / ".backup.lock").write_bytes(b"")
    (abandoned / "big").write_bytes(b"x" * 10000)
    try:
        assert m.drill(scratch_dir=tmp_path / "scratch").ok
    finally:
        s.close()
    assert os.listdir(tmp_path / "scratch") == []


def test_a_live_backups_reader_does_not_hold_up_the_nodes_next_open(tmp_path):
    import apsw

    s = _small_store(tmp_path / "node")
    snapshot(s, "a", 10, 1, os.urandom(200_000))
    s.close()
    reader = apsw.Connection(str(tmp_path / "node" / "chunks.db"), flags=apsw.SQLITE_OPEN_READONLY)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM snapshot_chunks").fetchall()  # a pinned snapshot, as a backup holds
    try:
        os.unlink(tmp_path / "node" / "disk-reserve")  # the open then reclaims chunks.db's WAL space
        t = time.monotonic()
        open_store(tmp_path / "node").close()
        assert time.monotonic() - t < 5, "the best-effort checkpoint waited out its busy timeout (10 s)"
    finally:
        reader.close()


def test_drill_reports_a_listing_failure_as_a_failed_drill(tmp_path, monkeypatch):
    from raft_sqlite import backup as backup_mod

    def boom(*a, **k):
        raise BackupError("cannot reach s3://b/p: EndpointConnectionError")

    monkeypatch.setattr(backup_mod, "list_backups", boom)
    rep = backup_mod.drill("s3://b/p", "n1")
    assert not rep.ok and "cannot reach" in rep.error
    res = CliRunner().invoke(cli, ["drill", "s3://b/p", "--node", "n1", "--json", "--metrics-file",
                                   str(tmp_path / "d.prom")])
    assert res.exit_code == 1 and json.loads(res.stdout)["ok"] is False
    assert 'raft_sqlite_restore_drill_success{node_id="n1"} 0.0' in (tmp_path / "d.prom").read_text()
