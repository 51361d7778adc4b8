"""Backups to object storage (issue 14): a real S3 HTTP endpoint on loopback (moto's server, started and
stopped here) and ``file://`` URLs, through fsspec. Every path is checked by reopening what it wrote."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import apsw
import pytest
from click.testing import CliRunner

from raft_sqlite import BackupCancelled, BackupCorrupt, BackupError, LogEntry, NodeIdentityMismatch
from raft_sqlite import objectstore as objectstore_mod
from raft_sqlite.backup import HotBackupManager, list_backups, restore
from raft_sqlite.cli import cli
from raft_sqlite.objectstore import ObjectSink, PageStream, Remote
from tests.conftest import ROOT, open_store
from tests.test_backup import fill, make_source, snapshot, state

pytest.importorskip("s3fs")
pytest.importorskip("moto")


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1, for the tests of this module; stopped at the end."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3(s3_endpoint, monkeypatch, tmp_path):
    """Credentials and endpoint the standard way (AWS_* environment variables) and a fresh bucket; returns
    the bucket's URL."""
    import s3fs

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": s3_endpoint,
                 "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"bk-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(bucket)
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(params=["s3", "file"])
def root(request, tmp_path):
    """A backup root URL: on the S3 server, or a file:// URL."""
    if request.param == "s3":
        return request.getfixturevalue("s3") + "/backups"
    return f"file://{tmp_path}/remote"


def _fs(url):
    r = Remote(url)
    return r.fs, r


def _source_with_snapshot(path, n=400, big=False):
    s = make_source(path)
    if big:  # incompressible bytes: an upload of several parts
        s.log("b").append([LogEntry(i, 1, os.urandom(64 << 10)) for i in range(11, 11 + n)])
    return s


# ------------------------------------------------------------------------------------------- round trip
def test_backup_list_restore_round_trip(root, tmp_path):
    s = _source_with_snapshot(tmp_path / "node")
    want = state(s)
    info = HotBackupManager(s, root).backup()
    assert info.path.startswith(root.rstrip("/") + "/n1/") and not info.skipped
    man = info.manifest
    assert [f["name"] for f in man["files"]] == ["raft.db", "chunks.db"]
    for f in man["files"]:
        assert f["object"] == f["name"] + ".zst" and f["compression"] == "zstd" and f["layout"] == "page1-last"
        assert f["size"] % f["page_size"] == 0 and 0 < f["object_size"] < f["size"]
    fs, r = _fs(info.path)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(r.root, detail=False)) == [
        "chunks.db.zst", "manifest.json", "raft.db.zst"]
    assert json.loads(fs.cat_file(r.root + "/manifest.json")) == man
    rows = list_backups(root, verify=True)
    assert [(b["path"], b["status"], b["seq"], b["node_id"]) for b in rows] == [(info.path, "complete", 1, "n1")]
    assert rows[0]["size"] == info.size and rows[0]["stored_size"] < info.size
    assert HotBackupManager(s, root).last_backup()["path"] == info.path
    s.log("a").append([LogEntry(122, 2, b"after the backup")])  # not in the backup
    s.close()

    r1 = restore(info.path, tmp_path / "r1")
    assert r1.backup_path == info.path and r1.kind == "node_replacement"
    assert not [n for n in os.listdir(tmp_path) if ".fetch-" in n], "the download folder is removed"
    s2 = open_store(tmp_path / "r1")
    try:
        assert state(s2) == want
        assert s2.restored_from["backup_path"] == info.path
    finally:
        s2.close()


def test_streamed_copy_is_a_valid_database_for_any_page_size(tmp_path):
    """The page-ordered stream, reassembled, is the same database: integrity_check passes and every row is
    there, for small and large pages and for a file whose cache spills early."""
    for page_size in (1024, 4096, 65536):
        src_path = str(tmp_path / f"src{page_size}.db")
        src = apsw.Connection(src_path)
        src.execute(f"PRAGMA page_size={page_size}").fetchall()
        src.execute("PRAGMA journal_mode=WAL").fetchall()
        src.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB); CREATE INDEX tv ON t(v)")
        with src:
            for i in range(3000):
                src.execute("INSERT INTO t(v) VALUES (?)", (os.urandom(10 + (i * 37) % 5000),))
        src.execute("DELETE FROM t WHERE k % 7 = 0")
        reader = apsw.Connection(src_path, flags=apsw.SQLITE_OPEN_READONLY)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM t").fetchall()
        chunks = []

        class Sink:
            def write(self, data):
                chunks.append(data)

        size, got_page_size = objectstore_mod.stream_online_backup(reader, "x.db", Sink(), pages_per_step=7,
                                                                   progress=None, check_cancel=lambda: None)
        raw = b"".join(chunks)
        assert len(raw) == size and size % page_size == 0 and got_page_size == page_size
        out = tmp_path / f"out{page_size}.db"
        out.write_bytes(raw[-page_size:] + raw[:-page_size])
        c = apsw.Connection(str(out))
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert (list(c.execute("SELECT k, v FROM t ORDER BY k"))
                == list(reader.execute("SELECT k, v FROM t ORDER BY k")))
        c.close()
        reader.close()
        src.close()


def test_page_stream_refuses_what_it_cannot_stream():
    got = []

    class Sink:
        def write(self, data):
            got.append(data)

    st = PageStream("raft.db", 4096, Sink())
    st.xWrite(b"\0" * 4096, 4096)
    with pytest.raises(BackupError, match="offset 12288 written while offset 8192"):
        st.xWrite(b"\0" * 4096, 12288)
    st2 = PageStream("raft.db", 4096, Sink())
    st2.xWrite(b"\0" * 4096, 4096)
    with pytest.raises(BackupError, match="already streamed"):
        st2.xRead(4096, 4096)
    st4 = PageStream("raft.db", 4096, Sink())
    st4.xWrite(b"\0" * 4096, 4096)
    with pytest.raises(BackupError, match="truncate"):
        st4.xTruncate(0)
    with pytest.raises(BackupError, match="page 1 was never written"):
        PageStream("raft.db", 4096, Sink()).finish()
    st3 = PageStream("raft.db", 4096, Sink())
    with pytest.raises(BackupError, match="write of 100 bytes"):
        st3.xWrite(b"\0" * 100, 0)
    with pytest.raises(BackupError):  # the first error is kept
        st3.finish()


# ------------------------------------------------------------------------------------------- refusals
def test_corrupted_remote_objects_are_refused_and_nothing_is_written(root, tmp_path):
    s = _source_with_snapshot(tmp_path / "node")
    info = HotBackupManager(s, root).backup()
    s.close()
    fs, r = _fs(info.path)
    obj = r.root + "/raft.db.zst"
    good = fs.cat_file(obj)
    # same size, one byte flipped: found by the sha256 checks (listing with --verify, restore)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x40
    fs.pipe_file(obj, bytes(bad))
    assert list_backups(root)[0]["status"] == "complete"  # sizes only
    row = list_backups(root, verify=True)[0]
    assert row["status"] == "corrupt" and "raft.db" in row["error"]
    with pytest.raises(BackupError, match="raft.db"):
        restore(info.path, tmp_path / "r")
    assert not os.path.exists(tmp_path / "r")
    assert not [n for n in os.listdir(tmp_path) if ".fetch-" in n]
    # truncated: found by the size check alone
    fs.pipe_file(obj, good[:-10])
    row = list_backups(root)[0]
    assert row["status"] == "corrupt" and "bytes" in row["error"]
    with pytest.raises(BackupError, match="bytes"):
        restore(info.path, tmp_path / "r")
    # a manifest edited to match other data: refused by the data check
    fs.pipe_file(obj, good)
    man = json.loads(fs.cat_file(r.root + "/manifest.json"))
    man["groups"][0]["term"] += 1
    fs.pipe_file(r.root + "/manifest.json", json.dumps(man).encode())
    with pytest.raises(BackupError, match="term"):
        restore(info.path, tmp_path / "r")
    assert not os.path.exists(tmp_path / "r")


def test_restore_refuses_a_non_empty_target_before_downloading(s3, tmp_path, monkeypatch):
    s = _source_with_snapshot(tmp_path / "node")
    info = HotBackupManager(s, s3 + "/b").backup()
    s.close()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("operator data")
    fetched = []
    monkeypatch.setattr(objectstore_mod, "fetch_file", lambda *a, **k: fetched.append(a))
    with pytest.raises(BackupError, match="not empty"):
        restore(info.path, tmp_path / "busy")
    assert fetched == [] and os.listdir(tmp_path / "busy") == ["keep.txt"]


def test_missing_credentials_give_a_clear_error(s3_endpoint, monkeypatch, tmp_path):
    import s3fs

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    s = open_store(tmp_path / "node")
    fill(s, "a", 5)
    try:
        with pytest.raises(BackupError, match="credentials.*AWS_ACCESS_KEY_ID"):
            HotBackupManager(s, "s3://nobucket/x").backup()
        with pytest.raises(BackupError, match="credentials"):
            list_backups("s3://nobucket/x")
    finally:
        s.close()
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_missing_backend_package_names_the_extra(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_fsspec(name, *a, **k):
        if name == "fsspec" or name.startswith("fsspec."):
            raise ImportError("No module named 'fsspec'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_fsspec)
    with pytest.raises(BackupError, match=r"raft_sqlite\[s3\]"):
        Remote("s3://b/p")


def test_hostile_arguments_are_refused_before_anything_is_written(tmp_path, s3):
    s = open_store(tmp_path / "node")
    fill(s, "a", 3)
    try:
        for kw, exc in (({"compression": "lz4"}, ValueError), ({"max_upload_rate": 0}, ValueError),
                        ({"part_size": 1 << 20}, ValueError), ({"stale_after": -1}, ValueError),
                        ({"max_upload_rate": float("nan")}, ValueError), ({"part_size": "8M"}, TypeError),
                        ({"compression_level": 0}, ValueError), ({"compression_level": 20}, ValueError)):
            with pytest.raises(exc):
                HotBackupManager(s, s3 + "/x", **kw)
        with pytest.raises(ValueError, match="URL"):
            HotBackupManager(s, tmp_path / "bk", storage_options={"anon": True})
        assert list_backups(s3 + "/x") == []
    finally:
        s.close()
    with pytest.raises(ValueError, match="node="):
        restore(s3 + "/x", tmp_path / "r", latest=True)
    with pytest.raises(ValueError, match="latest"):
        restore(s3 + "/x", tmp_path / "r", node="n1")
    for bad, exc in (("", ValueError), (" n2", ValueError), ("a\0b", ValueError), (7, TypeError)):
        with pytest.raises(exc):
            restore(s3 + "/x", tmp_path / "r", node_id=bad)
    with pytest.raises(BackupError, match="no backup of node 'n1'"):
        restore(s3 + "/x", tmp_path / "r", latest=True, node="n1")
    assert not os.path.exists(tmp_path / "r")


# ------------------------------------------------------------------------------------------- lifecycle
def test_skip_unchanged_uploads_nothing_and_keeps_the_age_fresh(root, tmp_path):
    s = _source_with_snapshot(tmp_path / "node")
    m = HotBackupManager(s, root, skip_unchanged=True)
    first = m.backup()
    recorded = m.last_backup()
    time.sleep(0.05)
    again = m.backup()
    assert again.skipped and again.path == first.path and again.manifest == first.manifest
    assert [b["path"] for b in list_backups(root)] == [first.path]
    assert m.last_backup()["created_at"] > recorded["created_at"]  # the age metric restarts from the check
    # any change of what a backup holds makes the next one real
    for change in (lambda: s.log("a").append([LogEntry(122, 2, b"x")]),
                   lambda: s.metadata("b").set_term_and_vote(6, None),
                   lambda: s.log("a").truncate_after(121),
                   lambda: snapshot(s, "a", 100, 1, os.urandom(5000)),
                   lambda: s.log("a").compact(90)):
        change()
        nxt = m.backup()
        assert not nxt.skipped, change
        assert m.backup().skipped
    assert [b["seq"] for b in list_backups(root)] == [6, 5, 4, 3, 2, 1]
    s.close()


def test_remote_retention_keeps_the_newest(root, tmp_path):
    s = _source_with_snapshot(tmp_path / "node")
    m = HotBackupManager(s, root)
    paths = []
    for i in range(4):
        s.log("a").append([LogEntry(122 + i, 2, b"x")])
        paths.append(m.backup().path)
    assert sorted(m.prune(keep=2)) == paths[:2]
    assert [b["path"] for b in list_backups(root)] == paths[:1:-1]
    assert m.prune(max_age=1e-6) == [paths[2]]  # the newest is always kept
    assert [b["path"] for b in m.list()] == [paths[3]]
    s.close()


def test_latest_takes_the_newest_backup_that_verifies_and_reidentifies(root, tmp_path, caplog):
    s = _source_with_snapshot(tmp_path / "node")
    m = HotBackupManager(s, root)
    old = m.backup()
    want_old = state(s)
    s.log("a").append([LogEntry(122, 2, b"newer")])
    new = m.backup()
    s.close()
    fs, r = _fs(new.path)
    blob = bytearray(fs.cat_file(r.root + "/chunks.db.zst"))
    blob[len(blob) // 2] ^= 1
    fs.pipe_file(r.root + "/chunks.db.zst", bytes(blob))
    with caplog.at_level(logging.WARNING, logger="raft_sqlite.backup"):
        info = restore(root, tmp_path / "r", latest=True, node="n1", node_id="n9")
    assert info.backup_path == old.path
    assert any(new.path in rec.getMessage() and "trying the next older" in rec.getMessage() for rec in caplog.records)
    assert info.event["reidentified_from"] == "n1" and info.event["node_id"] == "n9"
    with pytest.raises(NodeIdentityMismatch):
        open_store(tmp_path / "r", node_id="n1")
    s2 = open_store(tmp_path / "r", node_id="n9")
    try:
        assert state(s2) == want_old
        assert s2.restored_from["reidentified_from"] == "n1"
    finally:
        s2.close()


def test_restore_latest_from_a_local_root_with_a_new_identity(tmp_path):
    s = _source_with_snapshot(tmp_path / "node")
    want = state(s)
    HotBackupManager(s, tmp_path / "bk").backup()
    s.close()
    info = restore(tmp_path / "bk", tmp_path / "r", latest=True, node="n1", node_id="n2")
    assert info.event["reidentified_from"] == "n1"
    s2 = open_store(tmp_path / "r", node_id="n2")
    try:
        assert state(s2) == want
    finally:
        s2.close()


# ------------------------------------------------------------------------------------------- failures
def test_a_failed_upload_is_aborted_and_never_listed(s3, tmp_path, monkeypatch):
    s = _source_with_snapshot(tmp_path / "node", n=200, big=True)
    real_write = None
    sent = []

    def failing_open(self, path, mode, **kw):
        f = real_open(self, path, mode, **kw)
        nonlocal real_write
        real_write = f.write

        def write(data):
            sent.append(len(data))
            if sum(sent) > 6 << 20:
                raise OSError("connection reset by peer")
            return real_write(data)

        f.write = write
        return f

    import s3fs

    real_open = s3fs.S3FileSystem.open
    monkeypatch.setattr(s3fs.S3FileSystem, "open", failing_open)
    with pytest.raises(BackupError, match="connection reset"):
        HotBackupManager(s, s3 + "/b", compression="none").backup()
    monkeypatch.undo()
    fs = s3fs.S3FileSystem()
    bucket = s3.split("://")[1]
    assert fs.list_multipart_uploads(bucket) == []  # aborted, not left to be billed
    assert list_backups(s3 + "/b") == []
    assert HotBackupManager(s, s3 + "/b").backup().manifest["seq"] == 1  # and the next one works
    s.close()


_KILLED_UPLOAD = r"""
import os, sys
sys.path.insert(0, sys.argv[3])
from raft_sqlite import LogEntry, NodeStore, FsyncMode
from raft_sqlite.backup import HotBackupManager
s = NodeStore.open(sys.argv[1], "n1", cluster_id="c1", fsync=FsyncMode.OFF)
s.log("a").append([LogEntry(i, 1, os.urandom(64 << 10)) for i in range(1, 321)])
def progress(phase, done, total):
    if done > (8 << 20):
        print("uploading", flush=True)
HotBackupManager(s, sys.argv[2], compression="none", max_upload_rate=2 << 20).backup(progress=progress)
print("finished", flush=True)
"""


def test_an_upload_killed_halfway_is_never_a_backup_and_prune_cleans_it(s3, tmp_path):
    import s3fs

    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-c", _KILLED_UPLOAD, str(tmp_path / "node"), s3 + "/b", ROOT],
                         stdout=subprocess.PIPE, text=True, env=env)
    bucket = s3.split("://")[1]
    fs = s3fs.S3FileSystem()
    try:
        assert p.stdout.readline().strip() == "uploading"
        deadline = time.monotonic() + 30
        while not fs.list_multipart_uploads(bucket) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fs.list_multipart_uploads(bucket), "a multipart upload is in progress"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert [b["status"] for b in list_backups(s3 + "/b")] in ([], ["incomplete"])
    with pytest.raises(BackupError, match="no backup of node 'n1'"):
        restore(s3 + "/b", tmp_path / "r", latest=True, node="n1")
    s = open_store(tmp_path / "node")
    try:
        m = HotBackupManager(s, s3 + "/b")
        # younger than stale_after: left alone, another machine might still be uploading (moto dates every
        # upload in 2010, hence the long stale_after that makes this one young)
        assert HotBackupManager(s, s3 + "/b", stale_after=1e10).prune() == []
        assert fs.list_multipart_uploads(bucket)
        removed = HotBackupManager(s, s3 + "/b", stale_after=0).prune()
        assert any("unfinished upload" in r for r in removed)
        assert fs.list_multipart_uploads(bucket) == []
        assert list_backups(s3 + "/b") == []
        info = m.backup()
        assert [b["path"] for b in list_backups(s3 + "/b", verify=True)] == [info.path]
    finally:
        s.close()


def test_object_sink_bounds_memory_and_paces(tmp_path):
    """The queue blocks the producer (bounded memory) and max_rate paces the upload."""
    r = Remote(f"file://{tmp_path}/o")
    r.make_folder(r.root)
    sink = ObjectSink(r, r.path("x.bin"), compression="none", queue_bytes=2 << 20, max_rate=8 << 20)
    t = time.monotonic()
    for _ in range(24):
        sink.write(os.urandom(1 << 20))
        assert sink._q.qsize() <= 2
    stats = sink.finish()
    took = time.monotonic() - t
    assert stats["size"] == stats["object_size"] == 24 << 20
    assert took >= 24 / 8 * 0.9, took  # paced: 24 MiB at 8 MiB/s
    assert os.path.getsize(tmp_path / "o" / "x.bin") == 24 << 20


# ------------------------------------------------------------------------------------------- CLI
def test_cli_backup_backups_restore_with_urls(s3, tmp_path):
    s = _source_with_snapshot(tmp_path / "node")
    want = state(s)
    s.close()
    runner = CliRunner()
    res = runner.invoke(cli, ["backup", str(tmp_path / "node"), s3 + "/c", "--json", "--skip-unchanged"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["path"].startswith(s3 + "/c/n1/") and out["stored_size"] < out["size"] and not out["skipped"]
    res = runner.invoke(cli, ["backup", str(tmp_path / "node"), s3 + "/c", "--skip-unchanged"])
    assert res.exit_code == 0 and "nothing changed" in res.output, res.output
    res = runner.invoke(cli, ["backups", s3 + "/c", "--verify", "--json"])
    assert res.exit_code == 0, res.output
    assert [(b["status"], b["path"]) for b in json.loads(res.output)] == [("complete", out["path"])]
    res = runner.invoke(cli, ["restore", s3 + "/c", str(tmp_path / "r"), "--latest", "--node", "n1",
                              "--node-id", "n5"])
    assert res.exit_code == 0, res.output
    assert "re-identified as n5" in res.output
    s2 = open_store(tmp_path / "r", node_id="n5")
    try:
        assert state(s2) == want
    finally:
        s2.close()
    res = runner.invoke(cli, ["restore", s3 + "/c", str(tmp_path / "r2"), "--latest"])
    assert res.exit_code == 2 and "--latest and --node" in res.output
    res = runner.invoke(cli, ["backup", str(tmp_path / "node"), str(tmp_path / "bk"), "--storage-option", "a=b"])
    assert res.exit_code == 2 and "URL destinations only" in res.output
    res = runner.invoke(cli, ["backups", s3 + "/c", "--storage-option", "novalue"])
    assert res.exit_code == 2 and "KEY=VALUE" in res.output


# ------------------------------------------------------------------------------------------- review regressions
def test_the_unwritten_lock_byte_page_of_a_file_over_1gib_streams_as_zeros():
    got = []

    class Sink:
        def write(self, data):
            got.append(data)

    ps = 65536
    st = PageStream("chunks.db", ps, Sink())
    st.next = st.lock_page  # pages 2.. up to the one holding byte 2**30 were streamed
    assert st.lock_page == 1 << 30
    st.xWrite(b"\x07" * ps, st.lock_page + ps)  # SQLite skips the lock-byte page
    assert got == [bytes(ps), b"\x07" * ps] and st.next == st.lock_page + 2 * ps
    with pytest.raises(BackupError, match="expected next"):  # any other gap is still refused
        PageStream("raft.db", ps, Sink()).xWrite(b"\0" * ps, 3 * ps)


@pytest.mark.slow
def test_a_database_over_1gib_backs_up_and_restores_through_a_url(tmp_path):
    s = open_store(tmp_path / "node")
    for k in range(11):
        s.log("a").append([LogEntry(k * 100 + i, 1, os.urandom(1 << 20)) for i in range(1, 101)])
    last = s.log("a").last_index
    info = HotBackupManager(s, f"file://{tmp_path}/remote", compression="none").backup()
    s.close()
    assert info.manifest["files"][0]["size"] > 1 << 30
    restore(info.path, tmp_path / "r")
    s2 = open_store(tmp_path / "r")
    try:
        assert s2.log("a").last_index == last
        c = apsw.Connection(str(tmp_path / "r" / "raft.db"), flags=apsw.SQLITE_OPEN_READONLY)
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        c.close()
    finally:
        s2.close()


def _two_backups(tmp_path, url):
    s = _source_with_snapshot(tmp_path / "node")
    m = HotBackupManager(s, url)
    old = m.backup()
    s.log("a").append([LogEntry(122 + i, 2, os.urandom(64 << 10)) for i in range(80)])
    new = m.backup()
    s.close()
    return old, new


def test_latest_never_falls_back_because_of_the_local_disk(root, tmp_path, monkeypatch):
    import errno

    old, new = _two_backups(tmp_path, root)
    real = objectstore_mod.fsio.pwrite

    def pwrite(fd, data, off):
        if off + len(data) > (2 << 20):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, off)

    monkeypatch.setattr(objectstore_mod.fsio, "pwrite", pwrite)
    with pytest.raises(BackupError, match="No space left"):
        restore(root, tmp_path / "r", latest=True, node="n1")
    assert not os.path.exists(tmp_path / "r")
    assert not [n for n in os.listdir(tmp_path) if ".fetch-" in n]
    monkeypatch.undo()
    assert restore(root, tmp_path / "r", latest=True, node="n1").backup_path == new.path


def test_latest_never_falls_back_because_of_the_network(s3, tmp_path, monkeypatch):
    old, new = _two_backups(tmp_path, s3 + "/b")
    real, failed = objectstore_mod.Remote.read, []

    def read(self, path, limit):
        if new.path.split("://")[1] in path and not failed:
            failed.append(path)
            raise ConnectionError("Connection reset by peer")
        return real(self, path, limit)

    monkeypatch.setattr(objectstore_mod.Remote, "read", read)
    with pytest.raises(BackupError, match="Connection reset") as ei:
        restore(s3 + "/b", tmp_path / "r", latest=True, node="n1")
    assert not isinstance(ei.value, BackupCorrupt)
    assert not os.path.exists(tmp_path / "r")


def test_a_network_error_during_the_upload_is_a_backup_error(s3, tmp_path, monkeypatch):
    s = _source_with_snapshot(tmp_path / "node", n=120, big=True)

    class EndpointConnectionError(Exception):  # what botocore raises when the server goes away
        pass

    def boom(self, piece):
        raise EndpointConnectionError("Could not connect to the endpoint URL")

    import s3fs

    monkeypatch.setattr(s3fs.core.S3File, "write", boom)
    with pytest.raises(BackupError, match="Could not connect"):
        HotBackupManager(s, s3 + "/b", compression="none").backup()
    monkeypatch.undo()
    assert list_backups(s3 + "/b") == []
    s.close()


def test_list_uses_the_managers_storage_options(s3_endpoint, s3, tmp_path, monkeypatch):
    import s3fs

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    opts = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}
    s = _source_with_snapshot(tmp_path / "node")
    try:
        m = HotBackupManager(s, s3 + "/o", storage_options=opts)
        info = m.backup()
        assert [b["path"] for b in m.list()] == [info.path]
        assert [b["path"] for b in list_backups(s3 + "/o", storage_options=opts)] == [info.path]
    finally:
        s.close()
    assert restore(info.path, tmp_path / "r", storage_options=opts).backup_path == info.path


def test_cancel_is_prompt_even_while_a_paced_upload_drains(tmp_path):
    s = _source_with_snapshot(tmp_path / "node", n=190, big=True)  # ~12 MiB of incompressible bytes
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    m = HotBackupManager(s, f"file://{tmp_path}/remote", compression="none", max_upload_rate=1 << 20)
    t = time.monotonic()
    with pytest.raises(BackupCancelled):
        m.backup(cancel=cancel)
    took = time.monotonic() - t
    assert took < 6, f"{took:.1f} s after a cancel at 1 s (unpaced by the cancel it takes ~12 s)"
    assert list_backups(f"file://{tmp_path}/remote") == []
    s.close()


def test_an_abort_whose_discard_fails_never_completes_the_upload(s3, tmp_path, monkeypatch):
    import gc

    import s3fs

    s = _source_with_snapshot(tmp_path / "node", n=200, big=True)
    real_write = s3fs.core.S3File.write
    sent = []

    def write(self, data):
        sent.append(len(data))
        if sum(sent) > 7 << 20:
            raise OSError("connection reset by peer")
        return real_write(self, data)

    def bad_discard(self):
        raise RuntimeError("abort failed")

    monkeypatch.setattr(s3fs.core.S3File, "write", write)
    monkeypatch.setattr(s3fs.core.S3File, "discard", bad_discard)
    with pytest.raises(BackupError):
        HotBackupManager(s, s3 + "/b", compression="none").backup()
    monkeypatch.undo()
    gc.collect()
    fs = s3fs.S3FileSystem()
    assert [p for p in fs.find(s3.split("://")[1]) if p.endswith("raft.db")] == []
    s.close()


def test_a_killed_restores_download_folder_is_removed_by_the_next(s3, tmp_path):
    import fcntl

    s = _source_with_snapshot(tmp_path / "node")
    info = HotBackupManager(s, s3 + "/b").backup()
    s.close()
    abandoned = tmp_path / ".r.fetch-abc12345"
    abandoned.mkdir()
    (abandoned / ".backup.lock").write_bytes(b"")
    (abandoned / "raft.db").write_bytes(b"x" * 1000)
    busy = tmp_path / ".r.fetch-busy0000"
    busy.mkdir()
    (busy / ".backup.lock").write_bytes(b"")
    fd = os.open(busy / ".backup.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a restore still running
    try:
        restore(info.path, tmp_path / "r")
    finally:
        os.close(fd)
    assert not abandoned.exists() and busy.exists()


def test_a_missing_bucket_is_not_found_not_empty(s3, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["backups", "s3://no-such-bucket-here/x"])
    assert res.exit_code == 3 and "does not exist" in res.output, res.output
    with pytest.raises(BackupError, match="does not exist"):
        restore("s3://no-such-bucket-here/x", tmp_path / "r", latest=True, node="n1")


def test_stale_uploads_are_matched_by_node_prefix(s3, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = s3.split("://")[1]
    for key in ("b/n1/x/raft.db", "b/n10/x/raft.db"):
        fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    s = open_store(tmp_path / "node")
    fill(s, "a", 3)
    try:
        removed = HotBackupManager(s, s3 + "/b", stale_after=0).prune()
    finally:
        s.close()
    assert len(removed) == 1 and "/b/n1/x/raft.db" in removed[0]
    assert [u["Key"] for u in fs.list_multipart_uploads(bucket)] == ["b/n10/x/raft.db"]


# ------------------------------------------------------------------------------------------- restore drill
def _older_and_newest_backup(root, tmp_path):
    """A source store (open) with two backups at ``root``: (store, manager, the newest BackupInfo)."""
    s = _source_with_snapshot(tmp_path / "node")
    m = HotBackupManager(s, root)
    m.backup()
    s.log("a").append([LogEntry(122, 2, b"newest")])
    return s, m, m.backup()


def test_drill_restores_opens_and_verifies_the_newest_backup(root, tmp_path):
    s, m, newest = _older_and_newest_backup(root, tmp_path)
    rep = m.drill(scratch_dir=tmp_path / "scratch")
    assert rep.ok and rep.error is None and rep.backup_path == newest.path
    assert rep.size == newest.size and rep.backup_age is not None and rep.backup_age >= 0
    assert rep.verify["entries_checked"] > 0 and rep.verify["problems"] == []
    assert os.listdir(tmp_path / "scratch") == []  # the drill's restore is removed
    from raft_sqlite.metrics import render_data_dir

    s.close()
    text = render_data_dir(tmp_path / "node")  # recorded in the store: the metrics show it
    assert 'raft_sqlite_restore_drill_success{node_id="n1"} 1.0' in text
    assert "raft_sqlite_restore_drill_backup_age_seconds" in text


def test_a_corrupt_newest_backup_fails_the_drill_and_is_not_passed_over(root, tmp_path):
    s, m, newest = _older_and_newest_backup(root, tmp_path)
    fs, r = _fs(newest.path)
    blob = bytearray(fs.cat_file(r.root + "/raft.db.zst"))
    blob[100] ^= 0xFF
    fs.pipe_file(r.root + "/raft.db.zst", bytes(blob))
    rep = m.drill()
    assert not rep.ok and rep.backup_path == newest.path and "raft.db" in rep.error
    s.close()
    from raft_sqlite.metrics import render_data_dir

    assert 'raft_sqlite_restore_drill_success{node_id="n1"} 0.0' in render_data_dir(tmp_path / "node")
    runner = CliRunner()
    res = runner.invoke(cli, ["drill", root, "--node", "n1", "--metrics-file", str(tmp_path / "drill.prom")])
    assert res.exit_code == 1 and "FAILED" in res.output, res.output
    assert 'raft_sqlite_restore_drill_success{node_id="n1"} 0.0' in (tmp_path / "drill.prom").read_text()
    res = runner.invoke(cli, ["drill", root, "--node", "nobody", "--json"])
    assert res.exit_code == 1 and "no backup of node 'nobody'" in json.loads(res.stdout)["error"]


def test_the_scheduler_drills_every_n_backups(tmp_path):
    from raft_sqlite.backup import HotBackupScheduler

    s = _source_with_snapshot(tmp_path / "node")
    sched = HotBackupScheduler(s, f"file://{tmp_path}/remote", interval=3600, drill_every=2)
    try:
        sched.run_once()
        assert sched.last_drill is None
        s.log("a").append([LogEntry(122, 2, b"x")])
        sched.run_once()
        assert sched.last_drill is not None and sched.last_drill.ok, sched.last_drill
        assert sched.last_drill.backup_path == sched.last_backup.path
        res = CliRunner().invoke(cli, ["drill", f"file://{tmp_path}/remote", "--node", "n1", "--json"])
        assert res.exit_code == 0 and json.loads(res.stdout)["ok"], res.output
    finally:
        sched.stop()
        s.close()
