"""`raft-sqlite sql --state GROUP` (and the `applied` of `status` / `groups`): the SQL state database of a group
(store.state), read-only, creating nothing beside it, on a stopped node and beside a live one."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from raft_sqlite import LogEntry
from raft_sqlite.sqlstate import state_file
from tests.conftest import open_store
from tests.test_cli import ENV, cli, no_traceback

SCHEMA = ["CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT NOT NULL, blob BLOB)",
          "CREATE INDEX kv_v ON kv(v)"]


def apply(conn, entry):
    k, v = entry.data.decode().split("=", 1)
    conn.execute("INSERT INTO kv(k, v, blob) VALUES (?, ?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                 (k, v, b"\x00\xffraw" + k.encode()))


def add_entries(store, lo, hi, group="g"):
    store.log(group).append([LogEntry(i, 1, f"k{i}=v{i}".encode()) for i in range(lo, hi + 1)])
    store.metadata(group).set_commit_index(hi)


def make_state_store(path, n=5):
    """A stopped store: group 'g' with a state database holding kv rows k1..kn (applied n), group 'plain'
    with a log and no state database."""
    with open_store(path) as s:
        st = s.state("g", schema=SCHEMA, apply=apply)
        add_entries(s, 1, n)
        assert st.catch_up() == n
        if s.log("plain").last_index == 0:
            s.log("plain").append([LogEntry(1, 1, b"x")])
    return path


def state_dir_snapshot(d):
    """Every file of the state folder and its bytes' sha256 (the -shm: only that it is there; readers record
    their read marks in it, as in raft.db's): nothing created, nothing written."""
    folder = os.path.join(d, "state")
    res = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith("-shm"):
            res[name] = "present"
            continue
        with open(os.path.join(folder, name), "rb") as f:
            res[name] = hashlib.sha256(f.read()).hexdigest()
    return res


def gid_of(d, group):
    r = cli("groups", d, "--json")
    return {g["name"]: g["group_id"] for g in json.loads(r.stdout)}[group]


# ---------------------------------------------------------------------------------------------- stopped node
def test_sql_state_reads_the_state_of_a_stopped_node_and_creates_nothing(tmp_path):
    d = make_state_store(tmp_path / "n")
    before = state_dir_snapshot(d)
    db = f"group-{gid_of(d, 'g')}.db"
    assert db in before and db + "-wal" in before  # closed: the WAL file is kept (persistent, like raft.db's)
    r = cli("sql", d, "--state", "g", "SELECT k, v FROM kv ORDER BY k", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"k": f"k{i}", "v": f"v{i}"} for i in range(1, 6)]
    r = cli("sql", d, "--state", "g", "SELECT applied_index, applied_term FROM raft_applied", "--json")
    assert json.loads(r.stdout) == [{"applied_index": 5, "applied_term": 1}]
    r = cli("sql", d, "--state", "g", "SELECT group_name, node_id, cluster_id FROM raft_state_identity")
    assert r.returncode == 0 and "g" in r.stdout and "n1" in r.stdout and "(1 row)" in r.stdout
    r = cli("sql", d, "--state", "g", "SELECT blob FROM kv WHERE k = 'k1'", "--json")  # BLOBs as in raft.db
    assert json.loads(r.stdout)[0]["blob"] == "<7 B> " + b"\x00\xffrawk1".hex()
    r = cli("sql", d, "--state", "g", "--format", "csv", input="SELECT count(*) AS n FROM kv;")  # from stdin
    assert r.returncode == 0 and r.stdout == "n\n5\n"
    r = cli("sql", d, "--state", "g", "PRAGMA integrity_check", "--json")  # reading pragmas still work
    assert r.returncode == 0 and json.loads(r.stdout) == [{"integrity_check": "ok"}]
    assert state_dir_snapshot(d) == before
    # raft.db is the default still
    r = cli("sql", d, "SELECT name FROM groups ORDER BY name", "--json")
    assert [x["name"] for x in json.loads(r.stdout)] == ["g", "plain"]


WRITES = [
    "INSERT INTO kv(k, v) VALUES ('evil', 'x')",
    "DELETE FROM kv",
    "UPDATE raft_applied SET applied_index = 0",
    "WITH a AS (SELECT 1) DELETE FROM kv",
    "DROP TABLE kv",
    "CREATE TABLE evil (x)",
    "PRAGMA journal_mode=delete",
    "PRAGMA query_only=0",
    "PRAGMA wal_checkpoint(TRUNCATE)",
    "ATTACH '{tmp}/evil.db' AS evil",
    "VACUUM",
    "VACUUM INTO '{tmp}/evil.db'",
    "BEGIN IMMEDIATE",
    "SELECT 1; DELETE FROM kv",
]


@pytest.mark.parametrize("stmt", WRITES)
def test_sql_state_refuses_writes(tmp_path, stmt):
    d = make_state_store(tmp_path / "n")
    before = state_dir_snapshot(d)
    r = cli("sql", d, "--state", "g", stmt.format(tmp=tmp_path))
    assert r.returncode == 5, (stmt, r.stdout, r.stderr)
    assert "read-only" in r.stderr
    no_traceback(r)
    assert state_dir_snapshot(d) == before
    assert not (tmp_path / "evil.db").exists()
    with open_store(d) as s:  # and the state is whole
        st = s.state("g", schema=SCHEMA, apply=apply)
        assert st.last_applied == 5 and st.query("SELECT count(*) FROM kv") == [(5,)]


def test_sql_state_unknown_group_and_group_without_state(tmp_path):
    d = make_state_store(tmp_path / "n")
    before = state_dir_snapshot(d)
    r = cli("sql", d, "--state", "nope", "SELECT 1")
    assert r.returncode == 3 and "no group 'nope' in this store (groups: g, plain)" in r.stderr, r.stderr
    no_traceback(r)
    r = cli("sql", d, "--state", "plain", "SELECT 1")
    path = state_file(str(d), gid_of(d, "plain"))
    assert r.returncode == 3, r.stderr
    assert f"group 'plain' has no state database ({path} does not exist" in r.stderr
    no_traceback(r)
    assert state_dir_snapshot(d) == before  # nothing created for 'plain'
    r = cli("sql", tmp_path / "missing", "--state", "g", "SELECT 1")
    assert r.returncode == 3 and "does not exist" in r.stderr
    assert not (tmp_path / "missing").exists()


def test_sql_state_without_state_folder(tmp_path):
    d = tmp_path / "n"
    with open_store(d) as s:
        s.log("a").append([LogEntry(1, 1, b"x")])
    r = cli("sql", d, "--state", "a", "SELECT 1")
    assert r.returncode == 3 and "has no state database" in r.stderr
    assert not (d / "state").exists() or os.listdir(d / "state") == []


def test_sql_state_damaged_or_foreign_file(tmp_path):
    d = make_state_store(tmp_path / "n")
    path = state_file(str(d), gid_of(d, "plain"))
    with open(path, "wb") as f:
        f.write(b"not a database " * 300)
    r = cli("sql", d, "--state", "plain", "SELECT 1")
    assert r.returncode == 4 and "not readable as a SQLite database" in r.stderr, r.stderr
    no_traceback(r)
    r = cli("groups", d, "--json")  # the listing still works, the damaged state is named
    assert r.returncode == 0, r.stderr
    plain = {g["name"]: g for g in json.loads(r.stdout)}["plain"]
    assert plain["applied"] is None and "unreadable" in plain["state_error"]
    assert "?" in cli("groups", d).stdout
    os.unlink(path)
    import apsw

    c = apsw.Connection(path)  # a SQLite file, but not a state database
    c.execute("CREATE TABLE t (x)")
    c.close()
    r = cli("sql", d, "--state", "plain", "SELECT 1")
    assert r.returncode == 4 and "not a raft_sqlite state database" in r.stderr, r.stderr


def test_sql_state_dot_commands(tmp_path):
    d = make_state_store(tmp_path / "n")
    before = state_dir_snapshot(d)
    r = cli("sql", d, "--state", "g", input=".tables\n")
    assert r.returncode == 0, r.stderr
    for name in ("kv", "raft_applied", "raft_state_identity"):
        assert f"table   {name}" in r.stdout, r.stdout
    assert "chunks." not in r.stdout and "log_entries" not in r.stdout
    r = cli("sql", d, "--state", "g", input=".dump kv\n")
    assert r.returncode == 0, r.stderr
    assert "CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT NOT NULL, blob BLOB);" in r.stdout
    assert "INSERT INTO \"kv\" VALUES('k3','v3',X'" + b"\x00\xffrawk3".hex().upper() + "');" in r.stdout
    assert "CREATE INDEX kv_v ON kv(v);" in r.stdout and r.stdout.rstrip().endswith("COMMIT;")
    r = cli("sql", d, "--state", "g", input=".schema raft_applied\n.mode csv\n.headers off\nSELECT k FROM kv "
                                            "ORDER BY k LIMIT 2;\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("CREATE TABLE raft_applied(") and r.stdout.endswith("k1\nk2\n")
    r = cli("sql", d, "--state", "g", input=".mode csv\nSELECT 1;\nDELETE FROM kv;\nSELECT 2;\n")  # a script bails
    assert r.returncode == 5 and r.stdout == "1\n1\n" and "read-only" in r.stderr
    r = cli("sql", d, "--state", "g", input=".nope\n")
    assert r.returncode == 2 and "unknown command" in r.stderr
    # the whole dump loads into a new database: the same rows
    r = cli("sql", d, "--state", "g", input=".dump\n")
    import apsw

    c = apsw.Connection(":memory:")
    c.execute(r.stdout)
    assert c.execute("SELECT k, v FROM kv ORDER BY k").fetchall() == [(f"k{i}", f"v{i}") for i in range(1, 6)]
    assert c.execute("SELECT applied_index FROM raft_applied").fetchall() == [(5,)]
    assert state_dir_snapshot(d) == before


def test_status_and_groups_show_the_applied_index(tmp_path):
    d = tmp_path / "n"
    with open_store(d) as s:
        s.log("plain").append([LogEntry(1, 1, b"x")])
    r = cli("groups", d)  # no state database anywhere: no column
    assert r.returncode == 0 and "applied" not in r.stdout
    assert json.loads(cli("groups", d, "--json").stdout)[0]["applied"] is None
    assert "applied" not in cli("status", d).stdout
    make_state_store(d, n=7)
    before = state_dir_snapshot(d)
    r = cli("groups", d, "--json")
    assert r.returncode == 0, r.stderr
    got = {g["name"]: g for g in json.loads(r.stdout)}
    assert got["g"]["applied"] == 7 and got["plain"]["applied"] is None and "state_error" not in got["g"]
    r = cli("groups", d)
    head, g_line = r.stdout.splitlines()[1], next(ln for ln in r.stdout.splitlines() if ln.startswith(" g "))
    assert head.split()[-1] == "applied" and g_line.split()[-1] == "7", r.stdout
    r = cli("status", d, "--json")
    got = {g["name"]: g for g in json.loads(r.stdout)["groups"]}
    assert got["g"]["applied"] == 7 and got["plain"]["applied"] is None
    r = cli("status", d)
    assert "applied" in r.stdout
    assert state_dir_snapshot(d) == before


# ---------------------------------------------------------------------------------------------- live node
def test_sql_state_beside_a_store_open_in_this_process(tmp_path):
    d = make_state_store(tmp_path / "n")
    with open_store(d) as s:
        st = s.state("g", schema=SCHEMA, apply=apply)
        assert os.path.exists(st.path + "-wal")  # open: the WAL is read like raft.db's
        add_entries(s, 6, 9)
        st.catch_up()
        r = cli("sql", d, "--state", "g", "SELECT count(*) AS n, max(applied_index) AS a FROM kv, raft_applied",
                "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == [{"n": 9, "a": 9}]  # the applied rows still in the WAL are seen
        wal = os.path.getsize(st.path + "-wal")
        for stmt in ("DELETE FROM kv", "PRAGMA wal_checkpoint(TRUNCATE)", "PRAGMA journal_mode=delete"):
            r = cli("sql", d, "--state", "g", stmt)
            assert r.returncode == 5 and "read-only" in r.stderr, (stmt, r.stderr)
        assert os.path.getsize(st.path + "-wal") == wal
        assert st.query("SELECT count(*) FROM kv") == [(9,)]
        add_entries(s, 10, 10)
        st.catch_up()  # the state machine still writes (no lock left behind)
        r = cli("sql", d, "--state", "g", "SELECT v FROM kv WHERE k = 'k10'", "--json")
        assert json.loads(r.stdout) == [{"v": "v10"}]
        r = cli("groups", d, "--json")
        assert {g["name"]: g["applied"] for g in json.loads(r.stdout)} == {"g": 10, "plain": None}


WRITER = r"""
import os, sys
from raft_sqlite import LogEntry
from tests.conftest import open_store
from tests.test_cli_state import SCHEMA, apply

s = open_store(sys.argv[1])
st = s.state("g", schema=SCHEMA, apply=apply)
log = s.log("g")
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    i = log.last_index + 1
    # every entry adds one row: count(kv) == applied_index in every consistent state
    log.append([LogEntry(i, 1, f"k{i}=v{i}".encode())])
    s.metadata("g").set_commit_index(i)
    st.catch_up()
s.close()
print("done", flush=True)
"""


def test_sql_state_beside_a_node_applying_in_another_process(tmp_path):
    d = make_state_store(tmp_path / "n")
    stop = tmp_path / "stop"
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(d), str(stop)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        seen = []
        for _ in range(4):
            r = cli("sql", d, "--state", "g", "SELECT (SELECT count(*) FROM kv) AS n, applied_index AS a "
                    "FROM raft_applied", "--json")
            assert r.returncode == 0, r.stderr
            (row,) = json.loads(r.stdout)
            assert row["n"] == row["a"]  # one read transaction: a whole applied batch, never half of one
            seen.append(row["a"])
        r = cli("sql", d, "--state", "g", "DELETE FROM kv")
        assert r.returncode == 5 and "read-only" in r.stderr
        r = cli("groups", d, "--json")
        assert {g["name"]: g["applied"] for g in json.loads(r.stdout)}["g"] >= seen[-1]
    finally:
        stop.touch()
        assert p.wait(timeout=60) == 0, p.stderr.read()
    assert seen == sorted(seen) and seen[-1] > 5
    with open_store(d) as s:
        st = s.state("g", schema=SCHEMA, apply=apply)
        n = st.last_applied
        assert st.query("SELECT count(*) FROM kv") == [(n,)] and n >= seen[-1]


