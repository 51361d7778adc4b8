"""Odd characters in data_dir / backup paths: every path is a file name, never a URL or a URI.

A ``?`` in data_dir used to make the schema migration (SQLAlchemy URL ``sqlite:///{path}``) open a
database named by the part before the ``?``, i.e. create a stray file OUTSIDE data_dir, and ``%XX`` was
decoded. Each test lists the directories around the paths before and after and checks that nothing
appeared anywhere but in data_dir / backup_dir / the restore target.
"""

import json
import os
import subprocess
import sys

import pytest

from raft_sqlite import HotBackupManager, LogEntry, layout, list_backups, restore, verify_backup
from raft_sqlite.verify import verify
from tests.conftest import ROOT, open_store

#: one path component per hazard: URL query / fragment / escapes / params, URI prefix, quoting, unicode
ODD = ["q?mode=memory", "pct%41%2F%", "hash#frag", "amp&k=v;x", "two  spaces ", "quote'\"`$(x)",
       "ünïcødé☃", "file:lead", "file:x?mode=ro&cache=shared#f"]


def _listing(*dirs):
    return {str(d): sorted(os.listdir(d)) for d in dirs}


def _write_some(store):
    store.metadata("g").set_term_and_vote(3, "n2")
    store.log("g").append([LogEntry(i, 3, b"x%d" % i) for i in range(1, 21)])
    store.metadata("g").set_commit_index(20)
    with store.snapshots("g").write(10, 3) as w:
        w.write(b"state" * 1000)


def _check(store):
    assert store.metadata("g").hard_state == (3, "n2", 20)
    assert store.log("g").last_index == 20
    assert store.snapshots("g").latest().index == 10
    assert store.log("g").get(15).data == b"x15"


def _assert_only_db_files(d):
    """data_dir holds only the store's own files (raft.db, chunks.db and their -wal/-shm/-hwm companions,
    the lock files, the disk reserve, dot-files)."""
    extra = [n for n in os.listdir(d) if not n.startswith((".", "raft.db", "chunks.db"))
             and n not in (layout.LOCK_FILE, layout.GC_LOCK_FILE, layout.RESERVE_FILE)]
    assert not extra, extra


@pytest.mark.parametrize("odd", ODD)
def test_odd_path_component_open_backup_restore_verify(tmp_path, monkeypatch, odd):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a stray relative file would land here
    parent = tmp_path / odd
    parent.mkdir()
    data_dir, bk, target = parent / odd, parent / "bk", parent / f"restored-{odd}"
    with open_store(data_dir) as s:
        _write_some(s)
    with open_store(data_dir) as s:  # reopen: migrations are current, nothing created again
        _check(s)
        info = HotBackupManager(s, bk).backup()
    assert info.path.startswith(str(bk) + os.sep)
    verify_backup(info.path)
    assert [b["path"] for b in list_backups(bk)] == [info.path]
    assert verify(data_dir).ok
    restore(info.path, target)
    with open_store(target) as r:
        _check(r)
        assert r.restored_from["kind"] == "node_replacement"
    assert verify(target).ok
    assert _listing(tmp_path, parent, cwd) == {
        str(tmp_path): sorted(["cwd", odd]), str(parent): sorted([odd, "bk", f"restored-{odd}"]), str(cwd): []}
    _assert_only_db_files(data_dir)
    _assert_only_db_files(target)


def test_relative_data_dir_starting_with_file_uri_prefix(tmp_path, monkeypatch):
    """A relative 'file:...?mode=memory' data_dir is a directory of that name, not an in-memory database."""
    monkeypatch.chdir(tmp_path)
    rel = "file:node?mode=memory&vfs=unix-none#x"
    with open_store(rel) as s:
        _write_some(s)
    with open_store(rel) as s:
        _check(s)
        info = HotBackupManager(s, "file:bk?x=1").backup()
    restore(info.path, "file:restored?mode=ro")
    with open_store("file:restored?mode=ro") as r:
        _check(r)
    assert verify(rel).ok
    assert sorted(os.listdir(tmp_path)) == sorted([rel, "file:bk?x=1", "file:restored?mode=ro"])
    _assert_only_db_files(tmp_path / rel)


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), COLUMNS="250")
    return subprocess.run([sys.executable, "-m", "raft_sqlite.cli", *map(str, args)], check=False,
                          capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def test_cli_commands_on_an_odd_path(tmp_path):
    odd = "a?b=%41#c&d 'e\" ü;file:z["  # with the next component "]..." the path holds "[/]": rich
    # markup in the CLI's output (a closing tag with nothing to close raised MarkupError)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    parent = tmp_path / odd
    parent.mkdir()
    data_dir, bk, target = parent / "]file:n?x", parent / "]bk?x", parent / "t%20?"
    with open_store(data_dir) as s:
        _write_some(s)
    for args in (("status", data_dir), ("verify", data_dir), ("log", data_dir, "-g", "g"),
                 ("sql", data_dir, "SELECT count(*) AS n FROM chunks.snapshot_chunks")):
        r = _cli(*args, cwd=cwd)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        assert "not attached" not in r.stderr, r.stderr
    r = _cli("backup", data_dir, bk, "--json", "--keep", "1", cwd=cwd)
    assert r.returncode == 0, r.stderr
    path = json.loads(r.stdout)["path"]
    r = _cli("backups", bk, "--json", "--verify", cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert [(b["path"], b["status"]) for b in json.loads(r.stdout)] == [(path, "complete")]
    r = _cli("status", data_dir, cwd=cwd)  # now with a last backup under the odd path
    assert r.returncode == 0 and "bk?x" in r.stdout, r.stderr
    r = _cli("restore", path, target, cwd=cwd)
    assert r.returncode == 0, r.stderr
    with open_store(target) as t:
        _check(t)
    assert _listing(tmp_path, parent, cwd) == {
        str(tmp_path): sorted(["cwd", odd]), str(parent): sorted(["]file:n?x", "]bk?x", "t%20?"]), str(cwd): []}
    _assert_only_db_files(data_dir)
