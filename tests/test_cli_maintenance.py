"""Operator commands that write a stopped node's store: `vacuum`, `repair`, `--recovery`; `status`'s free
space; piped output without trailing spaces or wrapped lines. Run for real in subprocesses."""

import json
import os
import subprocess
import sys

import apsw
import pytest

from raft_sqlite import LogEntry, SegmentPolicy
from raft_sqlite.errors import StorageFault
from tests.conftest import open_store
from tests.test_cli import ENV, cli, make_store, no_traceback, payload


def corrupt_payload(d, group, idx):
    c = apsw.Connection(str(d / "raft.db"))
    c.execute("UPDATE log_entries SET payload = CAST(x'01' || payload AS BLOB) WHERE idx=? AND group_id = "
              "(SELECT group_id FROM groups WHERE name=?)", (idx, group))
    c.close()


def all_entries(d, groups=("a", "b")):
    with open_store(d) as s:
        return {g: [tuple(e) for e in s.log(g).entries(s.log(g).first_index,
                                                                           s.log(g).last_index + 1)]
                for g in groups}


def compacted_store(d):
    """120 entries of ~1 KiB in 'a' and 'b', then a snapshot of 'a' at 110 and its compaction: free pages."""
    with open_store(d, segment_policy=SegmentPolicy(max_entries=10)) as s:
        for g in ("a", "b"):
            s.log(g).append([LogEntry(i, 1, payload(g, i) * 40) for i in range(1, 121)])
            s.metadata(g).set_commit_index(120)
        with s.snapshots("a").write(110, 1) as w:
            w.write(b"x" * 300_000)
        with s.snapshots("a").write(115, 1) as w:  # retention may drop the first: free chunk pages
            w.write(b"y" * 300_000)
        s.log("a").compact(110)
    return d


def test_status_shows_free_space_and_vacuum_gives_it_back_keeping_every_entry(tmp_path):
    d = compacted_store(tmp_path / "n")
    before = all_entries(d)
    st = json.loads(cli("status", d, "--json").stdout)
    assert st["space"]["raft.db"]["free_bytes"] > 0, st["space"]
    size_before = os.path.getsize(d / "raft.db")
    r = cli("vacuum", d, "--json")
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    main_after = [f for f in rep["after"] if f["name"] == "raft.db"][0]
    assert main_after["free_pages"] == 0 and rep["reclaimed_bytes"] > 0
    assert os.path.getsize(d / "raft.db") < size_before
    # the WAL that carried the rebuilt file was truncated (the clean close then commits once: a few KiB)
    assert os.path.getsize(d / "raft.db-wal") < 64 * 1024
    assert json.loads(cli("status", d, "--json").stdout)["space"]["raft.db"]["free_bytes"] == 0
    # reopen under STRICT (the default): every entry, snapshot and the compaction are as before
    assert all_entries(d) == before
    with open_store(d) as s:
        assert s.log("a").first_index == 111 and s.snapshots("a").latest().index == 115
        with s.snapshots("a").open(s.snapshots("a").latest()) as rd:
            assert rd.read() == b"y" * 300_000
    r = cli("verify", d)
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("vacuum", d)  # human output; a second run finds no free page (only the close's WAL to give back)
    assert r.returncode == 0 and r.stdout.count("(0 B free) -> ") == 2 and "reclaimed " in r.stdout, r.stdout + r.stderr


def test_vacuum_refuses_a_running_node_and_a_damaged_store_and_changes_nothing(tmp_path):
    d = compacted_store(tmp_path / "n")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from raft_sqlite import NodeStore, FsyncMode\n"
        "s = NodeStore.open(sys.argv[1], 'n1', cluster_id='c1', fsync=FsyncMode.OFF)\n"
        "print('open', flush=True); time.sleep(60)"), str(d)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "open"
        size = os.path.getsize(d / "raft.db")
        r = cli("vacuum", d)
        assert r.returncode == 5 and "in use by" in r.stderr, r.stderr
        assert os.path.getsize(d / "raft.db") == size
    finally:
        holder.kill()
        holder.wait()
    corrupt_payload(d, "b", 50)  # a committed entry: STRICT refuses, and VACUUM must not rewrite it
    r = cli("vacuum", d)
    no_traceback(r)
    assert r.returncode == 4 and "CRC" in r.stderr, r.stderr


def test_vacuum_refuses_when_the_disk_cannot_hold_its_copy(tmp_path, monkeypatch):
    from raft_sqlite import maintenance

    d = compacted_store(tmp_path / "n")
    files = {n: (d / n).read_bytes() for n in ("raft.db", "chunks.db")}

    class Tiny:
        free = 4096

    monkeypatch.setattr(maintenance.shutil, "disk_usage", lambda p: Tiny)
    with pytest.raises(StorageFault, match="nothing was changed"):
        maintenance.vacuum(str(d), "n1", cluster_id="c1")
    # nothing written by the refusal beyond what any clean open/close does: the pages are the same
    with open_store(d) as s:
        assert s.log("a").first_index == 111
    for n, data in files.items():
        assert len((d / n).read_bytes()) == len(data)


def test_repair_truncates_a_damaged_tail_after_confirmation_then_strict_opens(tmp_path):
    d = make_store(tmp_path / "n")  # 120 entries per group, commit index 120
    with open_store(d) as s:  # 20 entries past b's commit index (120)
        s.log("b").append([LogEntry(i, 3, payload("b", i)) for i in range(121, 141)])
    corrupt_payload(d, "b", 130)  # above the commit index (120): a damaged tail
    # declined: nothing changes
    r = cli("repair", d, "--recovery", "truncate-tail", input="n\n")
    no_traceback(r)
    assert r.returncode == 5 and "not repaired" in r.stderr, r.stdout + r.stderr
    with pytest.raises(Exception, match="CRC"):
        open_store(d).close()
    # confirmed
    r = cli("repair", d, "--recovery", "truncate-tail", input="y\n")
    no_traceback(r)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "problem(s)" in r.stdout and "recovery truncated" in r.stdout and "dropped:" in r.stdout, r.stdout
    with open_store(d) as s:  # STRICT again
        assert s.log("b").last_index == 129 and s.metadata("b").commit_index == 120
        assert s.log("a").last_index == 120
    r = cli("repair", d, "--recovery", "partial", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"repaired": False, "problems": [], "recovery": None}


def test_repair_of_committed_damage_needs_partial(tmp_path):
    d = make_store(tmp_path / "n")
    corrupt_payload(d, "a", 40)  # committed: TRUNCATE_TAIL refuses to drop it
    r = cli("repair", d, "--recovery", "truncate-tail", "--yes")
    no_traceback(r)
    assert r.returncode == 5 and "--recovery partial can" in r.stderr, r.stdout + r.stderr
    r = cli("repair", d, "--recovery", "partial", "--yes", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["repaired"] and rep["recovery"]["outcome"] == "partial" and rep["problems"]
    r = cli("status", d, "--json")
    g = {x["name"]: x for x in json.loads(r.stdout)["groups"]}
    assert g["a"]["recovered_partially"] and not g["b"]["recovered_partially"]


def test_write_commands_take_recovery(tmp_path):
    d = make_store(tmp_path / "n", snapshot_at=100)
    with open_store(d) as s:
        s.log("b").append([LogEntry(121, 3, b"tail")])
    corrupt_payload(d, "b", 121)
    r = cli("compact", d, "-g", "a", "--up-to", "100")
    assert r.returncode == 4, r.stderr  # STRICT: the damaged tail of b refuses the open
    r = cli("compact", d, "-g", "a", "--up-to", "100", "--recovery", "truncate-tail", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["first_index"] == 101
    r = cli("remove-group", d, "b", "--yes", "--recovery", "bogus")
    assert r.returncode == 2 and "bogus" in r.stderr


def test_piped_output_has_no_trailing_spaces_and_unwrapped_messages(tmp_path):
    d = make_store(tmp_path / ("n" + "-long" * 30))
    env = dict(ENV, COLUMNS="80")
    for args in (("status", d), ("groups", d), ("log", d, "-g", "a", "--limit", "5"),
                 ("sql", d, "SELECT name, group_id FROM groups")):
        r = subprocess.run([sys.executable, "-m", "raft_sqlite.cli", *map(str, args)], capture_output=True,
                           text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        assert [ln for ln in r.stdout.splitlines() if ln != ln.rstrip()] == [], (args, r.stdout)
    # the data_dir path (~170 characters) stays on one line at 80 columns
    r = subprocess.run([sys.executable, "-m", "raft_sqlite.cli", "status", str(d)], capture_output=True, text=True,
                       env=env, timeout=60)
    assert any(ln.startswith("data_dir") and ln.endswith(str(d)) for ln in r.stdout.splitlines()), r.stdout
    # an error message longer than the terminal is one line
    r = subprocess.run([sys.executable, "-m", "raft_sqlite.cli", "log", str(d), "-g", "nope" * 20],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1 and len(r.stderr) > 80, r.stderr


# ---------------------------------------------------------------------------------------------- sql dot-commands
def sql_script(d, script, **kw):
    return subprocess.run([sys.executable, "-m", "raft_sqlite.cli", "sql", str(d)], input=script, capture_output=True,
                          text=True, env=ENV, timeout=60, **kw)


def rows_of(conn, table):
    return sorted(conn.execute(f'SELECT * FROM "{table}"').fetchall(), key=repr)


def test_sql_dump_loads_into_an_identical_database(tmp_path):
    d = make_store(tmp_path / "n", snapshot_at=100)
    with open_store(d) as s:  # bytes that need quoting: NUL, quotes, non-UTF-8
        s.log("b").append([LogEntry(121, 3, b"\x00'\"\xff;\n--")])
    r = sql_script(d, ".dump\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("PRAGMA foreign_keys=OFF;\nBEGIN TRANSACTION;\n") and r.stdout.endswith("COMMIT;\n")
    copy = apsw.Connection(str(tmp_path / "copy.db"))
    copy.execute(r.stdout)
    src = apsw.Connection(f"file:{d / 'raft.db'}?mode=ro", flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    q = "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name"
    assert copy.execute(q).fetchall() == src.execute(q).fetchall()
    tables = [n for (n,) in src.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert "log_entries" in tables and "sqlite_sequence" in tables
    for t in tables:
        assert rows_of(copy, t) == rows_of(src, t), t
    # one table only
    r = sql_script(d, ".dump groups\n")
    assert r.returncode == 0 and "CREATE TABLE groups" in r.stdout and "log_entries" not in r.stdout


def test_sql_headers_mode_timer_output_and_read(tmp_path):
    d = make_store(tmp_path / "n")
    r = sql_script(d, ".headers off\n.mode csv\nSELECT name FROM groups ORDER BY name;\n")
    assert r.returncode == 0 and r.stdout == "a\nb\n", r.stdout + r.stderr
    r = sql_script(d, ".mode csv\n.timer on\nSELECT count(*) AS n FROM log_entries;\n")
    assert r.stdout == "n\n240\n" and "Run Time: real " in r.stderr, r.stdout + r.stderr
    out_file = tmp_path / "out.txt"
    script = tmp_path / "s.sql"
    script.write_text(f".output {out_file}\nSELECT name, group_id FROM groups ORDER BY name;\n.output\n"
                      "SELECT 'back on stdout' AS x;\n")
    r = sql_script(d, f".read {script}\n")
    assert r.returncode == 0, r.stderr
    text = out_file.read_text()
    assert " a " in text and "(2 rows)" in text and "\x1b[" not in text and "back on stdout" not in text, text
    assert all(ln == ln.rstrip() for ln in text.splitlines())
    assert "back on stdout" in r.stdout and " a " not in r.stdout
    # read-only still: a write inside a .read file is refused, and the script stops there
    script.write_text("SELECT 1;\nDELETE FROM groups;\nSELECT 'not reached';\n")
    r = sql_script(d, f".read {script}\n")
    assert r.returncode == 5 and "not reached" not in r.stdout, r.stdout + r.stderr
    # .output refuses the data_dir, and bad usage is a usage error
    r = sql_script(d, f".output {d / 'raft.db-copy'}\n")
    assert r.returncode == 5 and "inside the data_dir" in r.stderr and not (d / "raft.db-copy").exists()
    for bad in (".headers maybe\n", ".mode yaml\n", ".read\n", ".frobnicate\n", f".read {tmp_path / 'missing'}\n"):
        r = sql_script(d, bad)
        no_traceback(r)
        assert r.returncode == 2, (bad, r.stderr)
    # a file that reads itself stops at a depth limit instead of recursing forever
    script.write_text(f".read {script}\n")
    r = sql_script(d, f".read {script}\n")
    assert r.returncode == 2 and "nested" in r.stderr, r.stderr


@pytest.mark.parametrize("crash_at", ["before_chunks_checkpoint", "at_close"])
def test_a_vacuum_killed_midway_leaves_a_store_that_opens_strict(tmp_path, crash_at):
    # Found by review: vacuum truncated raft.db's WAL behind the high-water mark's back; a crash before the
    # store's close then made every later open (under any policy) report durable WAL frames lost.
    d = compacted_store(tmp_path / "n")
    before = all_entries(d)
    code = f"""
import os, sys
from raft_sqlite import maintenance
from raft_sqlite.store import NodeStore
real = maintenance._checkpoint_back
def crash_before_chunks(store, conn, name):
    if name == "chunks.db":
        os._exit(9)
    return real(store, conn, name)
if {crash_at!r} == "before_chunks_checkpoint":
    maintenance._checkpoint_back = crash_before_chunks
else:
    NodeStore.close = lambda self: os._exit(9)
maintenance.vacuum(sys.argv[1], "n1", cluster_id="c1")
"""
    r = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 9, r.stderr
    assert all_entries(d) == before  # opens under STRICT (the default), every entry there
    r = cli("verify", d)
    assert r.returncode == 0, r.stdout + r.stderr


def test_vacuum_beside_a_reader_says_the_space_is_not_back_yet(tmp_path):
    d = compacted_store(tmp_path / "n")
    reader = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, apsw\n"
        "c = apsw.Connection(sys.argv[1], flags=apsw.SQLITE_OPEN_READONLY)\n"
        "c.execute('BEGIN'); c.execute('SELECT count(*) FROM log_entries').fetchall()\n"
        "print('reading', flush=True); time.sleep(60)"), str(d / "raft.db")], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "reading"
        r = cli("vacuum", d, "--json", timeout=120)
        no_traceback(r)
        assert r.returncode == 5 and "held the WAL of raft.db" in r.stderr, r.stderr
        rep = json.loads(r.stdout)
        assert rep["held_back"] == ["raft.db"]
        main_after = [f for f in rep["after"] if f["name"] == "raft.db"][0]
        assert main_after["file_bytes"] == os.path.getsize(d / "raft.db")  # the truth on disk, not page counts
    finally:
        reader.kill()
        reader.wait()
    assert all_entries(d)["a"][0][0] == 111


def test_repair_does_not_call_a_store_that_will_not_open_clean(tmp_path):
    # verify reads the files only; the open also weighs the WAL high-water mark. A WAL truncated behind the
    # mark's back (then a crash) verifies clean but does not open: repair must say so, not "nothing to repair".
    d = make_store(tmp_path / "n")
    code = """
import os, sys, apsw
from raft_sqlite import NodeStore, LogEntry, FsyncMode
s = NodeStore.open(sys.argv[1], "n1", cluster_id="c1", fsync=FsyncMode.FULL)
s.log("a").append([LogEntry(121, 3, b"x")])
c = apsw.Connection(sys.argv[1] + "/raft.db")
c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
os._exit(9)
"""
    r = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 9, r.stderr
    assert cli("verify", d).returncode == 0
    r = cli("repair", d, "--recovery", "partial", "--yes")
    no_traceback(r)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[open]" in r.stdout and "recovery partial" in r.stdout and "nothing to repair" not in r.stdout, r.stdout
    with open_store(d) as s:  # STRICT again: PARTIAL accepted the lost WAL frames and said so
        assert s.log("b").last_index == 120


def test_repair_that_leaves_problems_says_not_repaired(tmp_path):
    d = make_store(tmp_path / "n", snapshot_at=100)
    c = apsw.Connection(str(d / "chunks.db"))  # a snapshot chunk's bytes damaged: no recovery policy drops it
    c.execute("UPDATE snapshot_chunks SET data = zeroblob(length(data))")
    c.close()
    r = cli("repair", d, "--recovery", "partial", "--yes", "--json")
    no_traceback(r)
    assert r.returncode == 5 and "not repaired" in r.stderr, r.stdout + r.stderr
    assert json.loads(r.stdout)["remaining"]


# ---------------------------------------------------------------------------------------------- review fixes
def test_outputs_never_replace_a_nodes_files(tmp_path):
    # Found by review: `metrics -o DATA_DIR/raft.db` replaced a running node's database with a text file
    d = make_store(tmp_path / "n", snapshot_at=100)
    other = make_store(tmp_path / "other", n=5, groups=("x",))
    digest = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and not p.name.endswith("-shm")}
    sid = 1  # the one snapshot make_store writes
    assert cli("snapshot", "show", d, sid).returncode == 0
    attempts = [("metrics", d, "-o", d / "raft.db"), ("metrics", d, "-o", d / "sub" / "m.prom"),
                ("metrics", d, "-o", other / "chunks.db"), ("snapshot", "export", d, str(sid), d / "chunks.db"),
                ("snapshot", "export", d, str(sid), other / "x.bin")]
    plain_db = tmp_path / "elsewhere.db"
    c = apsw.Connection(str(plain_db))
    c.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    c.close()
    attempts.append(("snapshot", "export", d, str(sid), plain_db))
    for args in attempts:
        r = cli(*args)
        no_traceback(r)
        assert r.returncode == 5 and "refused" in r.stderr, (args, r.stderr)
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and not p.name.endswith("-shm")} == digest
    assert apsw.Connection(str(plain_db)).execute("SELECT x FROM t").fetchall() == [(1,)]
    r = sql_script(d, f".output {plain_db}\n")
    assert r.returncode == 5 and "SQLite database" in r.stderr
    # and outside any data_dir it works, atomically
    assert cli("metrics", d, "-o", tmp_path / "m.prom").returncode == 0
    assert "raft_sqlite_info" in (tmp_path / "m.prom").read_text()


def test_snapshot_export_to_stdout_is_the_verified_file(tmp_path):
    d = make_store(tmp_path / "n", snapshot_at=100)
    assert cli("snapshot", "export", d, "1", tmp_path / "s.bin").returncode == 0
    r = subprocess.run([sys.executable, "-m", "raft_sqlite.cli", "snapshot", "export", str(d), "1", "-"],
                       capture_output=True, env=ENV, timeout=60)
    assert r.returncode == 0 and r.stdout == (tmp_path / "s.bin").read_bytes() and r.stdout


def test_hostile_numbers_and_a_dump_inside_begin(tmp_path):
    d = make_store(tmp_path / "n", snapshot_at=100)
    for args in (("log", d, "-g", "a", "--from", "99999999999999999999"),
                 ("log", d, "-g", "a", "--term", str(2**63)),
                 ("snapshot", "show", d, "99999999999999999999")):
        r = cli(*args)
        no_traceback(r)
        assert r.returncode == 2, (args, r.stderr)
    r = sql_script(d, "BEGIN;\nSELECT 1;\n.dump groups\nCOMMIT;\n")
    assert r.returncode == 0 and "CREATE TABLE groups" in r.stdout, r.stderr


def test_serve_refuses_a_path_datasette_would_misread(tmp_path):
    pytest.importorskip("datasette")
    from raft_sqlite import web

    d = make_store(tmp_path / "q?x")
    with pytest.raises(web.PathRefused, match="SQLite URI"):
        web.build_app(str(d), title="t")
    assert not (tmp_path / "q").exists()  # nothing opened read-write beside it
