"""The `raft-sqlite` console script, run for real in subprocesses against real stores."""

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
import zlib

import apsw
import pytest

from raft_sqlite import LogEntry, SegmentPolicy
from raft_sqlite.cli import EXIT_CODES
from tests.conftest import ROOT, open_store

ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), COLUMNS="200")


def cli(*args, input=None, timeout=60):
    """Run `python -m raft_sqlite.cli ARGS` (the console script's entry point) in a subprocess."""
    return subprocess.run([sys.executable, "-m", "raft_sqlite.cli", *map(str, args)], check=False, capture_output=True,
                          text=True, input=input, timeout=timeout, env=ENV)


def payload(g, i):
    return f"{g}-{i}-".encode() * (1 + i % 5)


def make_store(path, n=120, groups=("a", "b"), snapshot_at=None):
    """A closed store with `n` entries per group, commit index n, segments of 25 entries, and
    optionally a durable snapshot of group 'a' at `snapshot_at`."""
    with open_store(path, segment_policy=SegmentPolicy(max_entries=25)) as s:
        for g in groups:
            s.metadata(g).set_term_and_vote(3, "n2")
            s.log(g).append([LogEntry(i, 2 if i < 60 else 3, payload(g, i)) for i in range(1, n + 1)])
            s.metadata(g).set_commit_index(n)
        if snapshot_at is not None:
            with s.snapshots("a").write(snapshot_at, s.log("a").term(snapshot_at)) as w:
                w.write(b"state-machine-bytes " * 100)
    return path


def files_digest(d):
    out = {}
    for name in sorted(os.listdir(d)):
        p = os.path.join(d, name)
        if os.path.isfile(p) and not name.endswith("-shm"):
            with open(p, "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def no_traceback(r):
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr


# ---------------------------------------------------------------------------------------------- help / errors
def test_help_everywhere_and_exit_codes_documented():
    r = cli("--help")
    assert r.returncode == 0
    for cmd in ("status", "sql", "log", "compact", "verify", "metrics", "demo", "backup", "backups", "restore"):
        assert cmd in r.stdout
        sub = cli(cmd, "--help")
        assert sub.returncode == 0 and "Usage:" in sub.stdout, (cmd, sub.stderr)
    for code in EXIT_CODES:
        assert f"{code} " in r.stdout


@pytest.mark.parametrize("args", [("status",), ("sql", "SELECT 1"), ("log",), ("verify",), ("metrics",),
                                  ("compact", "--up-to", "1")])
def test_missing_data_dir_is_a_friendly_error(tmp_path, args):
    missing = tmp_path / "nope"
    r = cli(args[0], missing, *args[1:])
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "does not exist" in r.stderr
    no_traceback(r)
    assert not missing.exists()  # nothing was created


def test_directory_without_store(tmp_path):
    r = cli("status", tmp_path)
    assert r.returncode == 3 and "not a raft_sqlite data_dir" in r.stderr
    no_traceback(r)
    assert os.listdir(tmp_path) == []


def test_garbage_database_file_is_reported_as_corrupt(tmp_path):
    d = make_store(tmp_path / "n")
    with open(d / "raft.db", "r+b") as f:
        f.write(os.urandom(4096))  # clobber the header page
    for f in ("raft.db-wal", "raft.db-shm"):
        if (d / f).exists():
            os.unlink(d / f)
    r = cli("status", d)
    assert r.returncode == 4, (r.stdout, r.stderr)
    assert "corrupt" in r.stderr
    no_traceback(r)
    r = cli("verify", d, "--json")
    assert r.returncode == 1
    rep = json.loads(r.stdout)
    assert not rep["ok"] and rep["problems"][0]["kind"] == "integrity"
    no_traceback(r)


def test_node_record_tampered(tmp_path):
    d = make_store(tmp_path / "n")
    c = apsw.Connection(str(d / "raft.db"))
    c.execute("UPDATE node SET node_id='someone-else'")
    c.close()
    r = cli("status", d)
    assert r.returncode == 4 and "node record fails its CRC" in r.stderr
    no_traceback(r)


# ---------------------------------------------------------------------------------------------- status
def test_status_json_and_table(tmp_path):
    d = make_store(tmp_path / "n", snapshot_at=50)
    r = cli("status", d, "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["node"]["node_id"] == "n1" and st["node"]["cluster_id"] == "c1"
    assert st["fsync_mode"] == "OFF" and st["recovery_policy"] == "STRICT"
    assert st["in_use_by_pid"] is None
    g = {x["name"]: x for x in st["groups"]}
    assert g["a"]["term"] == 3 and g["a"]["voted_for"] == "n2" and g["a"]["commit_index"] == 120
    assert (g["a"]["first_index"], g["a"]["last_index"], g["a"]["entries"]) == (1, 120, 120)
    assert g["b"]["stored_bytes"] == sum(len(payload("b", i)) for i in range(1, 121))
    assert g["a"]["segments"]["count"] == 5 and g["a"]["segments"]["sealed"] == 4
    snap = g["a"]["snapshot"]
    assert snap["newest_index"] == 50 and snap["deltas"] == 0 and snap["chain_ok"] and snap["kind"] == "FULL"
    assert g["b"]["snapshot"] is None
    assert st["last_recovery"]["outcome"] == "created" and st["last_backup"] is None
    r = cli("status", d)
    assert r.returncode == 0 and "n1 / c1" in r.stdout and "#" in r.stdout
    # the read-only commands wrote nothing
    before = files_digest(d)
    for args in (("status", d), ("sql", d, "SELECT * FROM group_status"), ("log", d, "-g", "a"), ("verify", d),
                 ("metrics", d)):
        assert cli(*args).returncode == 0, args
    assert files_digest(d) == before


WRITER = r"""
import os, sys, time
from raft_sqlite import NodeStore, LogEntry, FsyncMode
s = NodeStore.open(sys.argv[1], "n1", cluster_id="c1", fsync=FsyncMode.FULL)
log = s.log("a")
print("ready", flush=True)
i = 0
stop = sys.argv[2]
deadline = time.monotonic() + 120  # safety net; the test creates the stop file
while not os.path.exists(stop) and time.monotonic() < deadline:
    i += 1
    log.append([LogEntry(i, 1, b"x" * 100)])
    s.metadata("a").set_commit_index(i)
s.close()
print("done", i, flush=True)
"""


def test_status_and_sql_while_another_process_appends(tmp_path):
    d = tmp_path / "n"
    stop = tmp_path / "stop"
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(d), str(stop)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert p.stdout.readline().strip() == "ready"
        seen = []
        for _ in range(3):
            r = cli("status", d, "--json")
            assert r.returncode == 0, r.stderr
            st = json.loads(r.stdout)
            assert st["in_use_by_pid"] == p.pid
            assert st["in_use_by"]["pid"] == p.pid and st["in_use_by"]["node_id"] == "n1"
            (g,) = st["groups"]
            assert g["commit_index"] <= g["last_index"]
            seen.append(g["last_index"])
            r = cli("sql", d, "SELECT count(*) AS n, max(idx) AS last FROM log_entries", "--json")
            assert r.returncode == 0, r.stderr
            row = json.loads(r.stdout)[0]
            assert row["n"] == row["last"]  # a consistent snapshot: no gaps seen mid-write
            time.sleep(0.3)
        # the other read-only commands work beside the live node too
        r = cli("log", d, "-g", "a", "--limit", "5", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["crc_failures"] == 0, r.stderr
        r = cli("verify", d, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["ok"], r.stdout + r.stderr
        r = cli("sql", d, "PRAGMA wal_checkpoint")  # a checkpoint attempt beside a live node: a clean refusal
        assert r.returncode == 5 and "read-only" in r.stderr
        no_traceback(r)
        # compaction (a write) is refused while the node runs, naming it
        r = cli("compact", d, "--up-to", "1")
        assert r.returncode == 5 and f"process {p.pid}" in r.stderr
        # a backup is a live one, read-only beside the node (naming it), and restores
        r = cli("backup", d, tmp_path / "bk", "--json")
        assert r.returncode == 0 and f"process {p.pid}" in r.stderr and "live backup" in r.stderr, r.stderr
        assert json.loads(r.stdout)["live"] is True
        assert cli("restore", json.loads(r.stdout)["path"], tmp_path / "restored").returncode == 0
        stop.touch()
        out, errs = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, errs
    total = int(out.split()[-1])
    assert seen == sorted(seen) and seen[-1] > 0
    st = json.loads(cli("status", d, "--json").stdout)
    assert st["groups"][0]["last_index"] == total and st["in_use_by_pid"] is None


# ---------------------------------------------------------------------------------------------- sql
@pytest.mark.parametrize("stmt", [
    "DELETE FROM log_entries",
    "INSERT INTO settings(key, value) VALUES ('x', 'y')",
    "UPDATE raft_meta SET current_term = 99",
    "DROP TABLE backups",
    "CREATE TABLE t(x)",
    "CREATE TEMP TABLE t(x)",
    "PRAGMA query_only=0; DELETE FROM log_entries",
    "PRAGMA journal_mode=DELETE",
    "ATTACH DATABASE '{tmp}/evil.db' AS evil",
    "VACUUM",
    "SELECT 1; DELETE FROM node",
    "PRAGMA wal_checkpoint",
    "PRAGMA wal_checkpoint(TRUNCATE)",
    "PRAGMA main.wal_checkpoint",
    "PRAGMA user_version=5",
    "PRAGMA journal_mode=WAL",
    "PRAGMA optimize",
    "PRAGMA incremental_vacuum",
    "ANALYZE",
    "REINDEX",
    "BEGIN IMMEDIATE",
    "VACUUM INTO '{tmp}/evil.db'",
    "SELECT 1; PRAGMA wal_checkpoint",
])
def test_sql_refuses_writes(tmp_path, stmt):
    d = make_store(tmp_path / "n", n=10, groups=("a",))
    before = files_digest(d)
    r = cli("sql", d, stmt.format(tmp=tmp_path))
    assert r.returncode == 5, (stmt, r.stdout, r.stderr)
    assert "read-only" in r.stderr
    no_traceback(r)
    assert files_digest(d) == before
    assert not (tmp_path / "evil.db").exists()
    with open_store(d) as s:  # and the store still holds everything
        assert s.log("a").last_index == 10 and s.metadata("a").current_term == 3


@pytest.mark.parametrize("stmt, column", [
    ("PRAGMA table_info(log_entries)", "name"),
    ("SELECT name FROM pragma_table_info('node')", "name"),
    ("PRAGMA integrity_check", "integrity_check"),
    ("PRAGMA quick_check", "quick_check"),
    ("PRAGMA journal_mode", "journal_mode"),
    ("PRAGMA user_version", "user_version"),
    ("BEGIN; SELECT count(*) AS n FROM log_entries; COMMIT", "n"),
])
def test_sql_read_pragmas_still_work(tmp_path, stmt, column):
    d = make_store(tmp_path / "n", n=10, groups=("a",))
    before = files_digest(d)
    r = cli("sql", d, stmt, "--json")
    assert r.returncode == 0, (stmt, r.stderr)
    rows = json.loads(r.stdout)
    assert rows and column in rows[0]
    assert files_digest(d) == before


def test_write_commands_refuse_a_store_open_in_this_process(tmp_path):
    d = make_store(tmp_path / "n", n=10, groups=("a",), snapshot_at=5)
    with open_store(d):
        before = files_digest(d)
        r = cli("compact", d, "--up-to", "5")
        assert r.returncode == 5 and f"process {os.getpid()}" in r.stderr and "in use by" in r.stderr, r.stderr
        no_traceback(r)
        r = cli("status", d, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["in_use_by"]["pid"] == os.getpid()
        assert files_digest(d) == before
    with open_store(d) as s:
        assert s.log("a").first_index == 1 and s.log("a").last_index == 10


def test_sql_formats_payloads_and_views(tmp_path):
    d = make_store(tmp_path / "n", n=30, groups=("a",), snapshot_at=20)
    q = "SELECT idx, term, payload FROM log_entries WHERE idx = 7"
    r = cli("sql", d, q, "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    p = payload("a", 7)
    assert row["idx"] == 7 and row["payload"].startswith(f"<{len(p)} B> {p[:16].hex()}")
    r = cli("sql", d, q, "--json", "--raw-payload")
    assert json.loads(r.stdout)[0]["payload"] == p.hex()
    r = cli("sql", d, q, "--format", "csv")
    assert r.stdout.splitlines()[0] == "idx,term,payload"
    r = cli("sql", d, q)
    assert "(1 row)" in r.stdout
    r = cli("sql", d, input="SELECT count(*) AS n FROM log_entries;")  # query from stdin
    assert r.returncode == 0 and "30" in r.stdout
    views = {}
    for v in ("group_status", "snapshot_chain", "segments", "backup_history", "recovery_log"):
        r = cli("sql", d, f"SELECT * FROM {v}", "--json")
        assert r.returncode == 0, (v, r.stderr)
        views[v] = json.loads(r.stdout)
    (gs,) = views["group_status"]
    assert (gs["name"], gs["last_index"], gs["entries"], gs["commit_index"], gs["snapshot_index"]) == ("a", 30, 30, 30, 20)
    assert gs["stored_bytes"] == sum(len(payload("a", i)) for i in range(1, 31)) and gs["segments"] == 2
    (sc,) = views["snapshot_chain"]
    assert sc["idx"] == 20 and sc["base_id"] == sc["snapshot_id"] and sc["chain_depth"] == 0 and sc["is_newest"] == 1
    assert [(s["state"], s["entry_count"]) for s in views["segments"]] == [("sealed", 25), ("open", 5)]
    assert views["backup_history"] == []
    assert [e["outcome"] for e in views["recovery_log"]] == ["created"] and views["recovery_log"][0]["groups"] == 0
    # chunks.db is attached read-only as `chunks`
    r = cli("sql", d, "SELECT count(*) AS n, sum(length(data)) AS b FROM chunks.snapshot_chunks", "--json")
    assert json.loads(r.stdout)[0]["b"] == len(b"state-machine-bytes " * 100)
    r = cli("sql", d, "SELEC nonsense")
    assert r.returncode == 2 and "SQL error" in r.stderr


# ---------------------------------------------------------------------------------------------- log
def test_log_shows_entries_and_flags_bad_crc(tmp_path):
    d = make_store(tmp_path / "n", n=40, groups=("a", "b"))
    r = cli("log", d, "-g", "b", "--from", "5", "--to", "9", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [e["index"] for e in doc["entries"]] == [5, 6, 7, 8, 9]
    assert all(e["crc_ok"] for e in doc["entries"]) and doc["entries"][0]["size"] == len(payload("b", 5))
    r = cli("log", d, "-g", "a", "--limit", "3", "--json")
    assert [e["index"] for e in json.loads(r.stdout)["entries"]] == [38, 39, 40]
    r = cli("log", d)  # two groups: must choose
    assert r.returncode == 2 and "--group" in r.stderr
    r = cli("log", d, "-g", "zzz")
    assert r.returncode == 3 and "no group 'zzz'" in r.stderr
    c = apsw.Connection(str(d / "raft.db"))
    c.execute("UPDATE log_entries SET payload = x'00' WHERE group_id = 2 AND idx = 7")
    c.close()
    r = cli("log", d, "-g", "b", "--from", "5", "--to", "9")
    assert r.returncode == 4 and "BAD" in r.stdout and "CRC" in r.stderr
    no_traceback(r)
    c = apsw.Connection(str(d / "raft.db"))
    c.execute("UPDATE log_entries SET payload = substr(payload, 1, 3) || x'ff' WHERE group_id = 2 AND idx = 8")
    c.close()
    r = cli("log", d, "-g", "b", "--from", "8", "--to", "8", "--json")
    assert r.returncode == 4 and json.loads(r.stdout)["entries"][0]["crc_ok"] is False
    r = cli("sql", d, "SELECT payload FROM log_entries WHERE group_id = 2 AND idx = 8")
    assert r.returncode == 4 and "CAST(column AS BLOB)" in r.stderr
    no_traceback(r)


# ---------------------------------------------------------------------------------------------- compact
def test_compact_guarded_and_reopened(tmp_path):
    d = make_store(tmp_path / "n", n=120, groups=("a", "b"), snapshot_at=60)
    r = cli("compact", d, "-g", "a", "--up-to", "61")
    assert r.returncode == 5 and "refused" in r.stderr
    r = cli("compact", d, "-g", "b", "--up-to", "10")
    assert r.returncode == 5
    r = cli("compact", d, "-g", "a", "--up-to", "60", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["first_index"] == 61 and res["segments_removed"] == 2  # segments 1..25 and 26..50
    with open_store(d) as s:
        log = s.log("a")
        assert log.first_index == 61 and log.last_index == 120
        assert log.get(61).data == payload("a", 61)
        assert s.log("b").first_index == 1
    r = cli("verify", d)
    assert r.returncode == 0, r.stdout


def test_groups_lists_every_group_and_remove_group_removes_one(tmp_path):
    d = make_store(tmp_path / "n", n=120, groups=("a", "b", "c"), snapshot_at=60)
    r = cli("groups", d, "--json")
    assert r.returncode == 0, r.stderr
    got = {g["name"]: g for g in json.loads(r.stdout)}
    assert sorted(got) == ["a", "b", "c"]
    assert got["a"]["first_index"] == 1 and got["a"]["last_index"] == 120 and got["a"]["snapshot_index"] == 60
    assert got["b"]["term"] == 3 and got["b"]["voted_for"] == "n2" and got["b"]["commit_index"] == 120
    r = cli("groups", d)
    assert r.returncode == 0 and "3 group(s)" in r.stdout and "1..120" in r.stdout
    # destructive: asks first; "no" (or no terminal answer) removes nothing
    r = cli("remove-group", d, "a", input="n\n")
    assert r.returncode == 5 and "not removed" in r.stderr
    r = cli("remove-group", d, "zz", "--yes")
    assert r.returncode == 3 and "no group 'zz'" in r.stderr
    assert sorted(g["name"] for g in json.loads(cli("groups", d, "--json").stdout)) == ["a", "b", "c"]
    r = cli("remove-group", d, "a", input="y\n")
    assert r.returncode == 0, r.stderr
    assert "removed group 'a': log 1..120" in r.stdout and "1 snapshot(s)" in r.stdout
    r = cli("remove-group", d, "b", "--yes", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["removed"] == "b"
    with open_store(d) as s:
        assert s.groups() == ["c"] and s.log("c").last_index == 120
    assert cli("verify", d).returncode == 0


def test_remove_group_refused_while_the_node_runs(tmp_path):
    d = make_store(tmp_path / "n", n=10, groups=("a",))
    with open_store(d):
        r = cli("remove-group", d, "a", "--yes")
        assert r.returncode == 5 and "in use" in r.stderr
    with open_store(d) as s:
        assert s.groups() == ["a"]


# ---------------------------------------------------------------------------------------------- verify
def test_verify_clean_store_with_snapshot(tmp_path):
    d = make_store(tmp_path / "n", n=80, snapshot_at=40)
    r = cli("verify", d, "--json")
    assert r.returncode == 0, r.stdout
    rep = json.loads(r.stdout)
    assert rep["ok"] and rep["entries_checked"] == 160 and rep["segments_checked"] == 6
    assert rep["snapshots_checked"] == 1 and rep["chunks_checked"] >= 1
    assert rep["integrity"] == {"raft.db": "ok", "chunks.db": "ok"}


@pytest.mark.parametrize("what,kind", [
    ("UPDATE log_entries SET payload = x'0102' WHERE group_id = 1 AND idx = 3", "record_crc"),
    # `||` on a BLOB yields TEXT: the row now holds invalid UTF-8 text where a BLOB belongs
    ("UPDATE log_entries SET payload = substr(payload, 1, 3) || x'ff' WHERE group_id = 1 AND idx = 4", "record_crc"),
    ("UPDATE log_segments SET checksum = checksum + 1 WHERE segment_id = 1", "sidecar"),
    ("UPDATE log_segments SET content_crc = content_crc + 1 WHERE segment_id = 1", "sidecar"),
    # a kind changed and its record CRC and the segment's sidecar re-signed: only the content digest knows
    ("resign", "sidecar"),
    ("UPDATE log_entries SET segment = 99 WHERE group_id = 1 AND idx = 5", "segment"),
    ("UPDATE raft_meta SET commit_index = 5 WHERE group_id = 2", "metadata"),
    ("UPDATE groups SET snapshot_term = 4 WHERE group_id = 2", "group"),
    ("DELETE FROM log_entries WHERE group_id = 2 AND idx = 70", "gap"),
    ("chunk", "snapshot_chunk"),
])
def test_verify_finds_corruption(tmp_path, what, kind):
    d = make_store(tmp_path / "n", n=80, snapshot_at=40)
    if what == "chunk":
        c = apsw.Connection(str(d / "chunks.db"))
        c.execute("UPDATE snapshot_chunks SET data = zeroblob(length(data)) WHERE seq = (SELECT min(seq) FROM "
                  "snapshot_chunks)")
    elif what == "resign":
        from raft_sqlite.wal import record_crc
        c = apsw.Connection(str(d / "raft.db"))
        gid, term, data = c.execute("SELECT group_id, term, payload FROM log_entries WHERE group_id = 1 AND idx = 6"
                                    ).fetchone()
        c.execute("UPDATE log_entries SET kind = 2, crc32 = ? WHERE group_id = 1 AND idx = 6",
                  (record_crc(gid, 6, term, 2, data),))
        crcs = [r[0] for r in c.execute("SELECT crc32 FROM log_entries WHERE segment = 1 ORDER BY key")]
        c.execute("UPDATE log_segments SET checksum = ? WHERE segment_id = 1",
                  (zlib.crc32(struct.pack(f"<{len(crcs)}I", *crcs)),))
    else:
        c = apsw.Connection(str(d / "raft.db"))
        c.execute("DROP TRIGGER IF EXISTS log_entries_guard_delete")  # simulate damage the guard would refuse
        c.execute(what)
    c.close()
    r = cli("verify", d, "--json")
    assert r.returncode == 1, r.stdout
    rep = json.loads(r.stdout)
    assert kind in {p["kind"] for p in rep["problems"]}, rep["problems"]
    r = cli("verify", d)
    assert r.returncode == 1 and "PROBLEM" in r.stdout
    no_traceback(r)


# ---------------------------------------------------------------------------------------------- demo
def test_demo_kills_a_node_and_finds_every_acknowledged_entry(tmp_path):
    t0 = time.monotonic()
    r = cli("demo", "--data-dir", tmp_path / "demo", "--seed", "7", "--min-run", "0.5", "--max-run", "1.0",
            "--json", timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    res = json.loads(r.stdout)
    assert res["ok"] and res["lost"] == 0 and res["acked"] > 0
    assert all(g["intact"] == g["acked"] and g["commit_index"] >= g["acked"] for g in res["groups"])
    assert "recovery" in res["recovery"]
    assert time.monotonic() - t0 < 60
    with open_store(tmp_path / "demo", node_id="demo-node", cluster_id="demo-cluster") as s:
        assert sorted(s.groups()) == ["g0", "g1", "g2"]


def test_interactive_prompt(tmp_path, monkeypatch, capsys):
    from raft_sqlite import cli as cli_mod

    d = make_store(tmp_path / "n", n=12, groups=("a",))
    lines = iter([".help", "SELECT count(*) AS n", "FROM log_entries;", ".mode json", "SELECT 41 + 1 AS answer;",
                  "DELETE FROM node;", ".tables", ".schema settings", ".bogus", "SELECT 'dropped'", KeyboardInterrupt,
                  ".timer on", ".mode csv", ".headers off", "SELECT 'x' || 'y';", ".quit"])
    prompts = []

    def fake_input(prompt=""):
        prompts.append(prompt)
        line = next(lines)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    monkeypatch.setattr("builtins.input", fake_input)
    conn = cli_mod.open_sql_connection(str(d))
    shell = cli_mod.SqlShell(conn, "table", False)
    try:
        shell.run(cli_mod._prompt_lines(), bail=False)
    finally:
        shell.close()
        conn.close()
    o = capsys.readouterr()
    assert "12" in o.out and '"answer": 42' in o.out and "group_status" in o.out and "CREATE TABLE settings" in o.out
    assert "read-only" in o.err and "unknown command '.bogus'" in o.err and ".dump" in o.err
    assert "dropped" not in o.out and o.out.endswith("xy\n") and "Run Time: real" in o.err  # Ctrl-C dropped it
    assert prompts[2].strip() == "...>" and prompts[10].strip() == "...>" and prompts[11] == "raft-sqlite> "
    with open_store(d) as s:
        assert s.log("a").last_index == 12


def test_schema_tables_and_views_from_a_notebook_with_sqlalchemy(tmp_path):
    """The documented notebook path: SQLAlchemy (stdlib sqlite3) on a read-only URI, the public table
    objects of raft_sqlite.schema, and a view reflected like a table. Run in a subprocess: the test
    process uses apsw on the same files."""
    d = make_store(tmp_path / "n", n=30, groups=("a", "b"))
    code = """
import sys
from sqlalchemy import MetaData, Table, create_engine, func, select
from raft_sqlite import schema
eng = create_engine(f"sqlite:///file:{sys.argv[1]}/raft.db?mode=ro&uri=true")
with eng.connect() as c:
    e = schema.log_entries
    print(c.execute(select(e.c.group_id, func.count(), func.sum(func.length(e.c.payload)))
                    .group_by(e.c.group_id)).all())
    gs = Table("group_status", MetaData(), autoload_with=c)
    print(c.execute(select(gs.c.name, gs.c.commit_index, gs.c.entries)).all())
"""
    before = files_digest(d)
    r = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, env=ENV, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    nbytes = {g: sum(len(payload(g, i)) for i in range(1, 31)) for g in ("a", "b")}
    assert r.stdout.splitlines() == [f"[(1, 30, {nbytes['a']}), (2, 30, {nbytes['b']})]",
                                     "[('a', 30, 30), ('b', 30, 30)]"]
    assert files_digest(d) == before


def test_verify_api_reports_progress_and_writes_nothing(tmp_path):
    from raft_sqlite.verify import NotAStoreError, verify

    d = make_store(tmp_path / "n", n=3000, groups=("a", "b"), snapshot_at=100)
    before = files_digest(d)
    calls = []
    rep = verify(d, progress=lambda stage, done, total: calls.append((stage, done, total)))
    assert rep.ok and rep.entries_checked == 6000 and rep.chunks_checked == 1
    total = 6000 + 1 + 2  # records + chunks + two integrity checks
    # integrity_check runs on a helper thread beside the record checks and is counted when it finishes
    assert ("integrity", total, total) in calls and calls[-1] == ("done", total, total)
    assert any(stage == "log" for stage, _, _ in calls)
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)
    assert files_digest(d) == before
    with pytest.raises(NotAStoreError):
        verify(tmp_path / "missing")


def test_partial_recovery_is_shown_by_status_and_verify(tmp_path):
    from raft_sqlite import RecoveryPolicy

    d = make_store(tmp_path / "n", n=20, groups=("a",))
    c = apsw.Connection(str(d / "raft.db"))
    c.execute("UPDATE log_entries SET payload = x'00' WHERE idx = 15")  # at or below the commit index (20)
    c.close()
    r = cli("verify", d, "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["problems"][0]["index"] == 15
    with open_store(d, recovery=RecoveryPolicy.PARTIAL) as s:
        assert s.log("a").last_index == 14
    st = json.loads(cli("status", d, "--json").stdout)
    assert st["groups"][0]["recovered_partially"] is True and st["last_recovery"]["outcome"] == "partial"
    assert st["last_recovery"]["dropped"][0]["from_index"] == 15
    assert "recovered_partially" in cli("status", d).stdout
    r = cli("verify", d, "--json")
    rep = json.loads(r.stdout)
    assert r.returncode == 0 and any("PARTIAL" in w for w in rep["warnings"])
