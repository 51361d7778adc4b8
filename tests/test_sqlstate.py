"""The SQL state machine (``store.state(group)``, raft_sqlite/sqlstate.py): apply + applied index in one
transaction, exactly-once resume, read isolation, hostile calls, snapshots (FULL by online backup, DELTA by
session changeset) through the structure registry, restore/install, and fail-closed checks at open."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import threading
import zlib

import apsw
import pytest
import sqlalchemy as sa

from raft_sqlite import NodeStore
from raft_sqlite.entry import LogEntry
from raft_sqlite.errors import (
    CorruptionError,
    LogCompactedError,
    LogConflictError,
    LogGapError,
    NodeIdentityMismatch,
    RaftSqliteError,
    RecoveryRefused,
    SnapshotError,
)
from raft_sqlite.snapshot import SnapshotKind
from raft_sqlite.sqlstate import ApplyError, state_file

SCHEMA = ["CREATE TABLE acc(k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID",
          "CREATE TABLE ops(id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL)",
          "INSERT INTO ops VALUES (1, 0)"]


def cmd(i: int) -> bytes:
    """Entry i's command: add i to key k(i % 7); every 5th entry deletes key k3 (non-idempotent mix)."""
    return b"del k3" if i % 5 == 0 else f"add k{i % 7} {i}".encode()


def apply_cmd(conn: apsw.Connection, e: LogEntry) -> None:
    parts = e.data.decode().split()
    if parts[0] == "add":
        conn.execute("INSERT INTO acc VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = v + excluded.v",
                     (parts[1], int(parts[2])))
    else:
        conn.execute("DELETE FROM acc WHERE k=?", (parts[1],))
    conn.execute("UPDATE ops SET n = n + 1")


def expected(upto: int) -> tuple[dict[str, int], int]:
    acc: dict[str, int] = {}
    for i in range(1, upto + 1):
        parts = cmd(i).decode().split()
        if parts[0] == "add":
            acc[parts[1]] = acc.get(parts[1], 0) + int(parts[2])
        else:
            acc.pop(parts[1], None)
    return acc, upto


def state_of(sm) -> tuple[dict[str, int], int]:
    return dict(sm.query("SELECT k, v FROM acc")), sm.query("SELECT n FROM ops")[0][0]


def fill(store: NodeStore, n: int, *, commit: int | None = None, group: str = "g", start: int = 1) -> None:
    lg = store.log(group)
    lg.append([LogEntry(i, 1, cmd(i)) for i in range(start, n + 1)])
    md = store.metadata(group)
    if md.current_term < 1:
        md.set_term_and_vote(1, None)
    md.set_commit_index(n if commit is None else commit)


def open_store(d, node="n1") -> NodeStore:
    return NodeStore.open(str(d), node, cluster_id="c")


def test_apply_records_the_position_in_the_same_transaction_and_resumes_exactly_once(tmp_path):
    d = tmp_path / "n"
    with open_store(d) as st:
        fill(st, 100, commit=60)
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        assert sm.applied == (0, 0)
        assert sm.catch_up(batch=7) == 60
        assert state_of(sm) == expected(60)
        # a replay of entries already applied changes nothing (what a framework does after a restart)
        assert sm.apply([LogEntry(i, 1, cmd(i)) for i in range(1, 61)]) == 0
        assert state_of(sm) == expected(60)
    with open_store(d) as st:
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        assert sm.applied == (60, 1)  # resumes where it stopped: nothing replayed
        st.metadata("g").set_commit_index(100)
        assert sm.catch_up() == 100
        assert state_of(sm) == expected(100)
        assert sm.query("SELECT applied_index, applied_term FROM raft_applied") == [(100, 1)]


def test_a_failing_apply_rolls_the_whole_batch_back(tmp_path):
    with open_store(tmp_path / "n") as st:
        fill(st, 20)
        calls = []

        def flaky(conn, e):
            calls.append(e.index)
            apply_cmd(conn, e)
            if e.index == 15:
                raise ValueError("boom")

        sm = st.state("g", schema=SCHEMA, apply=flaky)
        sm.catch_up(upto=10)
        with pytest.raises(ApplyError) as ei:
            sm.catch_up(batch=100)
        assert ei.value.index == 15 and isinstance(ei.value.__cause__, ValueError)
        assert sm.applied == (10, 1)
        assert state_of(sm) == expected(10)  # entries 11..14 of the failed batch are not there either


@pytest.mark.parametrize("sql", ["COMMIT", "BEGIN", "ROLLBACK", "ATTACH ':memory:' AS x", "PRAGMA journal_mode=DELETE",
                                 "PRAGMA synchronous=OFF", "UPDATE raft_applied SET applied_index=99",
                                 "DELETE FROM raft_state_identity", "DROP TABLE raft_applied"])
def test_apply_cannot_break_its_transaction_or_the_bookkeeping(tmp_path, sql):
    with open_store(tmp_path / "n") as st:
        fill(st, 3)
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        sm.catch_up(upto=1)

        def evil(conn, e):
            apply_cmd(conn, e)
            conn.execute(sql)

        with pytest.raises(ApplyError) as ei:
            sm.apply([LogEntry(2, 1, cmd(2))], evil)
        assert isinstance(ei.value.__cause__, apsw.AuthError)
        assert sm.applied == (1, 1)
        assert state_of(sm) == expected(1)
        assert sm.query("PRAGMA journal_mode") == [("wal",)]
        sm.catch_up()  # the connection is still usable
        assert state_of(sm) == expected(3)


def test_hostile_calls_are_refused_before_anything_is_written(tmp_path):
    with open_store(tmp_path / "n") as st:
        fill(st, 10, commit=5)
        with pytest.raises(TypeError):
            st.state("g", schema=SCHEMA, apply=42)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            st.state("g", schema=42)
        with pytest.raises(TypeError):
            st.state("g", schema=["CREATE TABLE t(a)", 3])
        assert not os.path.exists(state_file(st.data_dir, 1))
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        with pytest.raises(ValueError):
            st.state("g", schema=SCHEMA, apply=lambda c, e: None)  # a different apply
        assert st.state("g") is sm
        for bad in (0, -1, 1 << 40, "3", 2.5, True):
            with pytest.raises((TypeError, ValueError)):
                sm.catch_up(batch=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            sm.catch_up(upto=6)  # beyond the commit index
        for bad_upto in (-1, 1 << 64, "1"):
            with pytest.raises((TypeError, ValueError)):
                sm.catch_up(upto=bad_upto)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            sm.apply([(1, 1, b"add k1 1")])  # type: ignore[list-item]
        with pytest.raises(LogGapError):
            sm.apply([LogEntry(2, 1, cmd(2))])
        sm.catch_up(upto=2)
        with pytest.raises(LogConflictError):
            sm.apply([LogEntry(2, 5, cmd(2))])  # same index, another term: a fork
        with pytest.raises(LogConflictError):
            sm.apply([LogEntry(3, 0, cmd(3))])  # a term below the last applied one
        for bad_idx in (-1, 1 << 64, None):
            with pytest.raises((TypeError, ValueError)):
                sm.apply_command(bad_idx, 1, lambda c: None)  # type: ignore[arg-type]
        assert sm.applied == (2, 1)
        assert state_of(sm) == expected(2)
        with pytest.raises(RaftSqliteError):
            st.replay("g")  # replay() would bypass the applied index
        with pytest.raises(apsw.ReadOnlyError):
            sm.query("DELETE FROM acc")
        assert state_of(sm) == expected(2)


def test_apply_command_runs_once_per_index(tmp_path):
    with open_store(tmp_path / "n") as st:
        sm = st.state("g", schema=SCHEMA)

        def add(v):
            return lambda conn: conn.execute("INSERT INTO acc VALUES ('x', ?) ON CONFLICT(k) DO UPDATE SET "
                                             "v = v + excluded.v RETURNING v", (v,)).fetchall()[0][0]

        assert sm.apply_command(1, 1, add(5)) == (True, 5)
        assert sm.apply_command(1, 1, add(5)) == (False, None)  # a replay of the same entry
        assert sm.apply_command(2, 2, add(1)) == (True, 6)
        with pytest.raises(TypeError):
            sm.apply([LogEntry(3, 2, b"")])  # no default apply function
        assert sm.query("SELECT v FROM acc") == [(6,)]


def test_apply_command_records_the_engines_own_entries_in_between(tmp_path):
    from raft_sqlite.entry import EntryKind
    with open_store(tmp_path / "n") as st:
        st.log("g").append([LogEntry(1, 1, b"", EntryKind.NOOP), LogEntry(2, 1, b"add k1 2"),
                            LogEntry(3, 2, b"", EntryKind.NOOP), LogEntry(4, 2, b"", EntryKind.CONFIG),
                            LogEntry(5, 2, b"add k1 5"), LogEntry(6, 2, b"add k1 6"), LogEntry(7, 2, b"add k1 7")])
        sm = st.state("g", schema=SCHEMA)

        def add(v):
            return lambda conn: conn.execute("INSERT INTO acc VALUES ('k1', ?) ON CONFLICT(k) DO UPDATE SET "
                                             "v = v + excluded.v", (v,))

        assert sm.apply_command(2, 1, add(2))[0] and sm.applied == (2, 1)  # the no-op at 1 is recorded as applied
        assert sm.apply_command(5, 2, add(5))[0] and sm.applied == (5, 2)  # so are 3 (NOOP) and 4 (CONFIG)
        with pytest.raises(LogGapError, match="NORMAL"):
            sm.apply_command(7, 2, add(7))  # entry 6 is a command that was never applied
        with pytest.raises(LogGapError):
            sm.apply_command(9, 2, add(9))  # beyond what the log holds
        assert sm.applied == (5, 2)
        assert sm.query("SELECT v FROM acc") == [(7,)]


def test_reads_never_see_half_a_batch(tmp_path):
    with open_store(tmp_path / "n") as st:
        fill(st, 40)
        mid, go = threading.Event(), threading.Event()

        def slow(conn, e):
            apply_cmd(conn, e)
            if e.index == 30:
                mid.set()
                assert go.wait(10)

        sm = st.state("g", schema=SCHEMA, apply=slow)
        sm.catch_up(upto=20)
        t = threading.Thread(target=sm.catch_up, kwargs={"batch": 100})
        t.start()
        assert mid.wait(10)
        with sm.read() as conn:  # the batch 21..40 is half applied in the writer's transaction
            seen = dict(conn.execute("SELECT k, v FROM acc").fetchall())
            n = conn.execute("SELECT n FROM ops").fetchall()[0][0]
            pos = conn.execute("SELECT applied_index FROM raft_applied").fetchall()[0][0]
        go.set()
        t.join(10)
        assert (seen, n, pos) == (*expected(20), 20)
        assert state_of(sm) == expected(40)


def test_sqlalchemy_metadata_schema(tmp_path):
    md = sa.MetaData()
    sa.Table("users", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.Text, nullable=False),
             sa.Index("ix_users_name", "name"))
    with open_store(tmp_path / "n") as st:
        st.log("g").append([LogEntry(1, 1, b"ada"), LogEntry(2, 1, b"bob")])
        st.metadata("g").set_term_and_vote(1, None)
        st.metadata("g").set_commit_index(2)
        sm = st.state("g", schema=md, apply=lambda c, e: c.execute("INSERT INTO users(name) VALUES (?)",
                                                                   (e.data.decode(),)))
        sm.catch_up()
        assert sm.query("SELECT id, name FROM users ORDER BY id") == [(1, "ada"), (2, "bob")]
        assert sm.query("SELECT name FROM sqlite_schema WHERE type='index' AND name='ix_users_name'")


def snapshot_cycle(st: NodeStore, sm, upto: int, **kw):
    st.metadata("g").set_commit_index(upto)
    sm.catch_up()
    return sm.snapshot(**kw)


def sql_mode(meta) -> str:
    """How the state database is stored in snapshot ``meta``: "full" or "delta" (a DELTA snapshot stores a
    structure whole when no changeset is possible)."""
    (entry,) = [e for e in meta.structures["structures"] if e["name"] == "sql"]
    return entry["mode"]


def test_full_then_delta_snapshots_restore_the_exact_state(tmp_path):
    d = tmp_path / "n"
    with open_store(d) as st:
        fill(st, 300, commit=0)
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        metas = [snapshot_cycle(st, sm, n) for n in (100, 180, 250)]
        assert [m.kind for m in metas] == [SnapshotKind.FULL, SnapshotKind.DELTA, SnapshotKind.DELTA]
        assert metas[1].size < metas[0].size
        st.metadata("g").set_commit_index(300)
        sm.catch_up()
        st.log("g").compact(250)
    # the state database is lost: the chain FULL + 2 DELTAs plus the log rebuild it exactly
    for p in os.listdir(d / "state"):
        os.unlink(d / "state" / p)
    with open_store(d) as st:
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        assert sm.applied == (0, 0)
        assert sm.catch_up() == 300
        assert state_of(sm) == expected(300)
        # after a restore the next snapshot may be a DELTA on the restored chain
        fill(st, 320, start=301)
        sm.catch_up()
        assert sm.snapshot().kind is SnapshotKind.DELTA
    for p in os.listdir(d / "state"):
        os.unlink(d / "state" / p)
    with open_store(d) as st:
        st.log("g").compact(320)
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        assert sm.catch_up() == 320
        assert state_of(sm) == expected(320)


def test_a_schema_change_or_a_restart_makes_the_next_snapshot_full(tmp_path):
    d = tmp_path / "n"
    with open_store(d) as st:
        fill(st, 30, commit=0)
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        assert sql_mode(snapshot_cycle(st, sm, 10)) == "full"
        sm.apply_command(11, 1, lambda c: c.execute("CREATE TABLE extra(x INTEGER PRIMARY KEY)"))
        st.metadata("g").set_commit_index(11)
        assert sql_mode(sm.snapshot()) == "full"  # a changeset does not carry DDL
        assert sql_mode(snapshot_cycle(st, sm, 20)) == "delta"
    with open_store(d) as st:
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        meta = snapshot_cycle(st, sm, 30)
        assert meta.kind is SnapshotKind.FULL and sql_mode(meta) == "full"  # no session survives a restart
        before = state_of(sm)  # entry 11 ran the DDL instead of its command
    for p in os.listdir(d / "state"):
        os.unlink(d / "state" / p)
    with open_store(d) as st:  # the chain with a DELTA snapshot holding a whole state restores exactly
        st.log("g").compact(30)
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        assert sm.catch_up() == 30
        assert state_of(sm) == before
        assert sm.query("SELECT count(*) FROM extra") == [(0,)]


def test_deltas_off_gives_full_snapshots(tmp_path):
    with open_store(tmp_path / "n") as st:
        fill(st, 30, commit=0)
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd, deltas=False)
        assert [sql_mode(snapshot_cycle(st, sm, n)) for n in (10, 20)] == ["full", "full"]


def test_a_table_without_a_primary_key_is_always_snapshotted_whole(tmp_path):
    """The session extension cannot record such a table reliably (its rowid mode forgets inserts): the
    state is stored whole at every capture, and the chain restores exactly."""
    d = tmp_path / "n"
    schema = ["CREATE TABLE acc(k TEXT PRIMARY KEY, v INTEGER NOT NULL)", "CREATE TABLE ops(n INTEGER NOT NULL)",
              "INSERT INTO ops VALUES (0)"]
    with open_store(d) as st:
        fill(st, 400, commit=0)
        sm = st.state("g", schema=schema, apply=apply_cmd)
        metas = [snapshot_cycle(st, sm, n) for n in (100, 250, 400)]
        assert [m.kind for m in metas] == [SnapshotKind.FULL, SnapshotKind.DELTA, SnapshotKind.DELTA]
        assert [sql_mode(m) for m in metas] == ["full", "full", "full"]
        st.log("g").compact(400)
    for p in os.listdir(d / "state"):
        os.unlink(d / "state" / p)
    with open_store(d) as st:
        sm = st.state("g", schema=schema, apply=apply_cmd)
        assert sm.catch_up() == 400
        assert state_of(sm) == expected(400)


def test_a_full_capture_does_not_build_a_changeset_and_big_change_sets_stop_being_recorded(tmp_path, monkeypatch):
    from raft_sqlite import sqlstate
    with open_store(tmp_path / "n") as st:
        fill(st, 400, commit=0)
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        built = []
        orig = sqlstate.SqlStateMachine._take_delta
        monkeypatch.setattr(sqlstate.SqlStateMachine, "_take_delta", lambda self: built.append(1) or orig(self))
        snapshot_cycle(st, sm, 100)  # the first capture is FULL: no changeset is written
        assert built == []
        assert sql_mode(snapshot_cycle(st, sm, 200)) == "delta" and built == [1]
        snapshot_cycle(st, sm, 250, kind=SnapshotKind.FULL)
        assert built == [1]
        monkeypatch.setattr(sqlstate, "SESSION_MAX_BYTES", 1)  # the changes outgrow a DELTA's worth
        assert sql_mode(snapshot_cycle(st, sm, 300)) == "full"
        monkeypatch.setattr(sqlstate, "SESSION_MAX_BYTES", 64 << 20)
        assert sql_mode(snapshot_cycle(st, sm, 350)) == "delta"  # recorded again from the last capture on


def test_a_capture_through_the_registry_keeps_later_deltas_right(tmp_path):
    d = tmp_path / "n"
    with open_store(d) as st:
        fill(st, 60, commit=0)
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        snapshot_cycle(st, sm, 10)
        st.metadata("g").set_commit_index(30)
        sm.catch_up()
        with pytest.raises(SnapshotError, match="state is at 30"):
            st.state_machine("g").capture(25, 1)  # a capture must be taken at the state's own position
        # a capture not started by sm.snapshot(): must restart the change tracking at its own point
        assert st.state_machine("g").capture(30, 1, kind=SnapshotKind.FULL).kind is SnapshotKind.FULL
        assert sql_mode(snapshot_cycle(st, sm, 50)) == "delta"
        st.log("g").compact(50)
    for p in os.listdir(d / "state"):
        os.unlink(d / "state" / p)
    with open_store(d) as st:
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        st.metadata("g").set_commit_index(60)
        assert sm.catch_up() == 60
        assert state_of(sm) == expected(60)


def test_install_on_a_follower_replaces_its_state_and_keeps_its_identity(tmp_path):
    with open_store(tmp_path / "leader", "L") as lead, open_store(tmp_path / "follower", "F") as fol:
        fill(lead, 80)
        lsm = lead.state("g", schema=SCHEMA, apply=apply_cmd)
        lsm.catch_up()
        meta = lsm.snapshot(kind=SnapshotKind.FULL)
        fill(fol, 10)
        fsm = fol.state("g", schema=SCHEMA, apply=apply_cmd)
        fsm.catch_up()
        with fsm.read() as held:  # a reader keeps its view while the state is replaced
            before = held.execute("SELECT n FROM ops").fetchall()
            with lead.snapshots("g").open(meta) as r, fol.state_machine("g").install(meta.index, meta.term) as w:
                for chunk in r.chunks():
                    w.write(chunk)
            assert held.execute("SELECT n FROM ops").fetchall() == before == [(10,)]
        assert fsm.applied == (80, 1)
        assert state_of(fsm) == expected(80)
        assert fsm.query("SELECT node_id FROM raft_state_identity") == [("F",)]
        fol.log("g").append([LogEntry(i, 1, cmd(i)) for i in range(81, 91)])
        fol.metadata("g").set_commit_index(90)
        assert fsm.catch_up() == 90
        assert state_of(fsm) == expected(90)
        fsm.verify()


def test_a_damaged_snapshot_never_reaches_the_state(tmp_path):
    d = tmp_path / "n"
    with open_store(d) as st:
        fill(st, 100, commit=0)
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        snapshot_cycle(st, sm, 40)
        newest = snapshot_cycle(st, sm, 80, kind=SnapshotKind.FULL)  # a second chain
        st.metadata("g").set_commit_index(100)
        sm.catch_up()
        st.log("g").compact(40)
    # damage the newest chain's blob and keep its CRC consistent: only the sha256 catches it
    with sqlite3.connect(d / "chunks.db") as c:
        key, data = c.execute("SELECT key, data FROM snapshot_chunks WHERE snapshot_id=? ORDER BY key LIMIT 1",
                              (newest.id,)).fetchone()
        bad = bytearray(data)
        bad[20] ^= 0xFF
        c.execute("UPDATE snapshot_chunks SET data=?, crc32=? WHERE key=?", (bytes(bad), zlib.crc32(bad), key))
    for p in os.listdir(d / "state"):
        os.unlink(d / "state" / p)
    with open_store(d) as st:
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        # the damaged chain is skipped for the older one (FULL at 40), then the log gives the rest
        assert sm.catch_up() == 100
        assert state_of(sm) == expected(100)


def test_state_ahead_of_the_log_or_forked_is_refused(tmp_path):
    d = tmp_path / "n"
    with open_store(d) as st:
        fill(st, 20)
        st.state("g", schema=SCHEMA, apply=apply_cmd).catch_up()
    saved = tmp_path / "state-at-20.db"
    shutil.copy(d / "state" / "group-1.db", saved)
    # a log restored from an older point: the state holds entries the log lacks
    shutil.rmtree(d)
    with open_store(d) as st:
        fill(st, 12)
    os.makedirs(d / "state", exist_ok=True)
    shutil.copy(saved, d / "state" / "group-1.db")
    with open_store(d) as st, pytest.raises(RecoveryRefused, match="lost entries"):
        st.state("g", schema=SCHEMA, apply=apply_cmd)
    # a log with another term at the applied index: a fork
    shutil.rmtree(d)
    with open_store(d) as st:
        st.log("g").append([LogEntry(i, 1 if i < 20 else 2, cmd(i)) for i in range(1, 21)])
        st.metadata("g").set_term_and_vote(2, None)
        st.metadata("g").set_commit_index(20)
    os.makedirs(d / "state", exist_ok=True)
    shutil.copy(saved, d / "state" / "group-1.db")
    with open_store(d) as st, pytest.raises(RecoveryRefused, match="forked"):
        st.state("g", schema=SCHEMA, apply=apply_cmd)


def test_a_foreign_or_damaged_state_database_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with open_store(a, "A") as st:
        fill(st, 5)
        st.state("g", schema=SCHEMA, apply=apply_cmd).catch_up()
    with open_store(b, "B") as st:
        fill(st, 5)
    os.makedirs(b / "state")
    shutil.copy(a / "state" / "group-1.db", b / "state" / "group-1.db")
    with open_store(b, "B") as st, pytest.raises(NodeIdentityMismatch):
        st.state("g", schema=SCHEMA, apply=apply_cmd)
    with sqlite3.connect(a / "state" / "group-1.db") as c:
        c.execute("UPDATE raft_applied SET applied_index=4")  # CRC no longer matches
    with open_store(a, "A") as st, pytest.raises(CorruptionError, match="CRC32"):
        st.state("g", schema=SCHEMA, apply=apply_cmd)
    # another SQLite database in its place is never adopted (nor written)
    os.unlink(a / "state" / "group-1.db")
    with sqlite3.connect(a / "state" / "group-1.db") as c:
        c.execute("CREATE TABLE acc(k TEXT PRIMARY KEY, v INTEGER)")
    c.close()
    before = (a / "state" / "group-1.db").read_bytes()
    with open_store(a, "A") as st, pytest.raises(CorruptionError, match="not a raft_sqlite state database"):
        st.state("g", schema=SCHEMA, apply=apply_cmd)
    assert (a / "state" / "group-1.db").read_bytes() == before
    # not a database at all
    (a / "state" / "group-1.db").write_bytes(b"garbage" * 1000)
    with open_store(a, "A") as st, pytest.raises(CorruptionError, match="damaged"):
        st.state("g", schema=SCHEMA, apply=apply_cmd)
    # the database file lost but its WAL present: refused rather than replaying the WAL into a new file
    os.unlink(a / "state" / "group-1.db")
    with open(a / "state" / "group-1.db-wal", "wb") as f:
        f.write(b"\0" * 4096)
    with open_store(a, "A") as st, pytest.raises(CorruptionError, match="WAL"):
        st.state("g", schema=SCHEMA, apply=apply_cmd)
    assert not os.path.exists(a / "state" / "group-1.db")


def test_compacted_log_without_a_snapshot_is_refused(tmp_path):
    d = tmp_path / "n"
    with open_store(d) as st:
        fill(st, 50)
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        sm.catch_up()
        sm.snapshot()
        st.log("g").compact(50)
        assert st.snapshots("g").latest() is not None
    # the only snapshot chain damaged and the log compacted: nothing can rebuild entries 1..50
    for p in os.listdir(d / "state"):
        os.unlink(d / "state" / p)
    with sqlite3.connect(d / "chunks.db") as c:
        c.execute("UPDATE snapshot_chunks SET data=zeroblob(length(data))")
    with open_store(d) as st:
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        with pytest.raises((SnapshotError, LogCompactedError, CorruptionError)):
            sm.catch_up()
        assert sm.applied == (0, 0)


def test_remove_group_deletes_the_state_and_a_crash_leftover_is_swept(tmp_path):
    d = tmp_path / "n"
    with open_store(d) as st:
        fill(st, 5)
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        sm.catch_up()
        path = sm.path
        assert st.remove_group("g")
        assert not os.path.exists(path)
        with pytest.raises(RaftSqliteError):
            sm.query("SELECT 1")
        fill(st, 3, group="g2")
        sm2 = st.state("g2", schema=SCHEMA, apply=apply_cmd)
        sm2.catch_up()
        assert state_of(sm2) == expected(3)  # a new group (maybe given the freed id) starts from an empty state
        kept = sm2.path
    # a removed group's file left by a crash (its id no longer exists) is deleted at the next open
    leftover = state_file(str(d), 99)
    shutil.copy(kept, leftover)
    with open_store(d):
        assert not os.path.exists(leftover)
        assert os.path.exists(kept)


def test_closed_store_closes_the_state(tmp_path):
    st = open_store(tmp_path / "n")
    fill(st, 3)
    sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
    sm.catch_up()
    st.close()
    with pytest.raises(RaftSqliteError):
        sm.catch_up()
    with pytest.raises(RaftSqliteError):
        sm.query("SELECT 1")


# ---------------------------------------------------------------------------------------------- faults
try:
    import torture as T
except ImportError:  # run from the repository root
    from tests import torture as T

from raft_sqlite import fsio  # noqa: E402
from raft_sqlite.errors import StorageFault  # noqa: E402


def state_workload(st: NodeStore, sm, rng) -> None:
    """Apply 60 entries in random batches, snapshotting and compacting on the way."""
    while sm.last_applied < 60:
        sm.catch_up(upto=min(60, sm.last_applied + rng.randint(1, 12)), batch=rng.randint(1, 8))
        if rng.random() < 0.4:
            meta = sm.snapshot()
            st.log("g").compact(meta.index)


@pytest.mark.parametrize("durable", [False, True])
def test_power_loss_at_every_sync_keeps_the_state_exactly_once(tmp_path, durable):
    """Power fails at each sync of a workload of applies, snapshots and compactions (state database,
    log and chunks in the fault model); every crash image, in every mode, reopens to the exact state of
    applying the 60 committed entries once."""
    import random
    template = str(tmp_path / "template")
    with open_store(template) as st:
        fill(st, 60)
    probe = T.copy_store(template, str(tmp_path / "probe"))
    vfs = T.new_vfs(probe)
    with T.quiet(), fsio.installed(vfs.fs), NodeStore.open(probe, "n1", cluster_id="c", vfs=vfs.name) as st:
        state_workload(st, st.state("g", schema=SCHEMA, apply=apply_cmd, durable=durable), random.Random(1))
    n_sync = vfs.counters["syncs"]
    vfs.unregister()
    images = crashed = 0
    for at in range(1, n_sync + 1, max(1, n_sync // 25)):
        run = T.copy_store(template, str(tmp_path / f"run{at}"))
        vfs = T.new_vfs(run)
        try:
            with T.quiet(), fsio.installed(vfs.fs):
                st = NodeStore.open(run, "n1", cluster_id="c", vfs=vfs.name)
                vfs.arm_crash(at_sync=at)
                try:
                    state_workload(st, st.state("g", schema=SCHEMA, apply=apply_cmd, durable=durable),
                                   random.Random(1))
                except (StorageFault, apsw.Error, OSError, RaftSqliteError):
                    pass
                finally:
                    with contextlib.suppress(Exception):
                        st.close()
            crashed += vfs.crashed
            for mode in ("lose", "subset", "garble"):
                img = str(tmp_path / f"img{at}-{mode}")
                vfs.write_crash_image(img, mode, seed=at)
                with open_store(img) as st2:
                    sm = st2.state("g", schema=SCHEMA, apply=apply_cmd, durable=durable)
                    assert sm.catch_up() == 60, (at, mode)
                    assert state_of(sm) == expected(60), (at, mode)
                    sm.verify()
                images += 1
                shutil.rmtree(img)
        finally:
            vfs.unregister()
            shutil.rmtree(run)
    assert crashed >= 10 and images >= 30, (crashed, images)


def test_an_io_error_in_apply_stops_the_state_machine_until_reopened(tmp_path):
    d = str(tmp_path / "n")
    with open_store(d) as st:
        fill(st, 30)
    vfs = T.new_vfs(d)
    try:
        with T.quiet(), fsio.installed(vfs.fs), NodeStore.open(d, "n1", cluster_id="c", vfs=vfs.name) as st:
            sm = st.state("g", schema=SCHEMA, apply=apply_cmd, durable=True)
            sm.catch_up(upto=10)
            vfs.arm_error("sync", 1)
            with pytest.raises((apsw.IOError, ApplyError)):
                sm.catch_up(upto=20)
            with pytest.raises(StorageFault):
                sm.catch_up()
            with pytest.raises(StorageFault):
                sm.query("SELECT 1")
    finally:
        vfs.unregister()
    with open_store(d) as st:
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        assert sm.last_applied in (10, 20)
        assert sm.catch_up() == 30
        assert state_of(sm) == expected(30)


def test_apply_goes_on_while_a_full_snapshot_is_written(tmp_path, monkeypatch):
    """The FULL copy is written from a pinned read transaction: while it is being written (held here in
    the middle of the stream), batches apply and commit, and the snapshot still holds the pinned state."""
    from raft_sqlite.snapshot import SnapshotWriter
    d = tmp_path / "n"
    with open_store(d) as st:
        fill(st, 200, commit=100)
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        sm.catch_up()
        inside, release = threading.Event(), threading.Event()
        orig = SnapshotWriter.write

        def held_write(self, data, offset=None):
            if not inside.is_set():
                inside.set()
                assert release.wait(20)
            return orig(self, data, offset)

        monkeypatch.setattr(SnapshotWriter, "write", held_write)
        out = []
        t = threading.Thread(target=lambda: out.append(sm.snapshot()))
        t.start()
        assert inside.wait(20)
        st.metadata("g").set_commit_index(200)
        assert sm.catch_up(batch=10) == 200  # ten commits while the copy is held mid-stream
        release.set()
        t.join(20)
        monkeypatch.undo()
        assert out and out[0].index == 100
        st.log("g").compact(100)
    for p in os.listdir(d / "state"):
        os.unlink(d / "state" / p)
    with open_store(d) as st:
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        sm.restore_snapshot()
        assert state_of(sm) == expected(100)  # the pinned state, not what was applied during the copy
        assert sm.catch_up() == 200
        assert state_of(sm) == expected(200)


def test_verify_checks_the_state_databases(tmp_path):
    from raft_sqlite.verify import verify
    d = tmp_path / "n"
    with open_store(d) as st:
        fill(st, 20)
        st.state("g", schema=SCHEMA, apply=apply_cmd).catch_up()
        fill(st, 5, group="h")
        st.state("h", schema=SCHEMA, apply=apply_cmd).catch_up()
    rep = verify(d)
    assert rep.ok, rep.problems
    with sqlite3.connect(d / "state" / "group-2.db") as c:
        c.execute("UPDATE raft_applied SET applied_term=7")
    c.close()
    shutil.copy(d / "state" / "group-1.db", d / "state" / "group-9.db")
    rep = verify(d)
    assert [(p.kind, p.group) for p in rep.problems] == [("state", "h")], rep.problems
    assert "CRC32" in rep.problems[0].message
    assert any("group-9.db" in w for w in rep.warnings)


def test_a_group_whose_snapshots_belong_to_another_writer_refuses_state_snapshots(tmp_path):
    with open_store(tmp_path / "n") as st:
        fill(st, 10)
        with st.snapshots("g").write(5, 1) as w:  # e.g. the PySyncObj journal's dump
            w.write(b"someone else's bytes")
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        sm.catch_up()
        with pytest.raises(SnapshotError, match="another user"):
            sm.snapshot()
        assert [m.index for m in st.snapshots("g").list()] == [5]


# ---------------------------------------------------------------------------------------------- review findings
def sql_apply(conn: apsw.Connection, e: LogEntry) -> None:
    """Each entry's data: SQL statements separated by ';;'."""
    for stmt in e.data.decode().split(";;"):
        if stmt.strip():
            conn.execute(stmt)


def sql_fill(st: NodeStore, cmds: list[str], start: int) -> None:
    st.log("g").append([LogEntry(start + i, 1, c.encode()) for i, c in enumerate(cmds)])
    if st.metadata("g").current_term < 1:
        st.metadata("g").set_term_and_vote(1, None)
    st.metadata("g").set_commit_index(start + len(cmds) - 1)


def whole_state(sm) -> dict:
    """Every row of every table (sqlite_sequence too) and the header values a DELTA could miss."""
    tables = [r[0] for r in sm.query("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")]
    out = {t: sorted(sm.query(f'SELECT * FROM "{t}"'), key=repr) for t in tables if t != "raft_state_identity"}
    out["user_version"] = sm.query("PRAGMA user_version")
    return out


#: schema, commands before the first snapshot, commands between the two (each schema once made a DELTA that
#: restored a wrong state or could not be restored)
DELTA_CASES = {
    "fk_cascade": (["CREATE TABLE p(id INTEGER PRIMARY KEY, v)",
                    "CREATE TABLE c(id INTEGER PRIMARY KEY, pid REFERENCES p(id) ON DELETE CASCADE)"],
                   ["INSERT INTO p VALUES (1,'a');;INSERT INTO p VALUES (2,'b')", "INSERT INTO c VALUES (10,1)"],
                   ["INSERT INTO c VALUES (11,1)", "DELETE FROM p WHERE id=1"]),
    "fk_set_null": (["CREATE TABLE p(id INTEGER PRIMARY KEY, v)",
                     "CREATE TABLE c(id INTEGER PRIMARY KEY, pid REFERENCES p(id) ON DELETE SET NULL)"],
                    ["INSERT INTO p VALUES (1,'a');;INSERT INTO c VALUES (10,1)"],
                    ["UPDATE p SET v='q';;DELETE FROM p WHERE id=1"]),
    "trigger": (["CREATE TABLE a(id INTEGER PRIMARY KEY, v)", "CREATE TABLE audit(n INTEGER PRIMARY KEY, what)",
                 "CREATE TRIGGER ta AFTER INSERT ON a BEGIN INSERT INTO audit(what) VALUES ('ins ' || new.id); END"],
                ["INSERT INTO a VALUES (1,'x')"], ["INSERT INTO a VALUES (2,'y')", "INSERT INTO a VALUES (3,'z')"]),
    "autoincrement": (["CREATE TABLE ev(id INTEGER PRIMARY KEY AUTOINCREMENT, what TEXT)"],
                      ["INSERT INTO ev(what) VALUES ('a')"],
                      ["INSERT INTO ev(what) VALUES ('b');;INSERT INTO ev(what) VALUES ('c')",
                       "DELETE FROM ev WHERE what IN ('b','c')"]),
    "null_in_text_key": (["CREATE TABLE n(k TEXT PRIMARY KEY, v)"], ["INSERT INTO n VALUES (NULL,1)"],
                         ["INSERT INTO n VALUES (NULL,2);;UPDATE n SET v=3 WHERE k IS NULL"]),
    "nocase_key": (["CREATE TABLE t(k TEXT PRIMARY KEY COLLATE NOCASE, v)"], ["INSERT INTO t VALUES ('a',1)"],
                   ["DELETE FROM t WHERE k='A';;INSERT INTO t VALUES ('A',2)"]),
    "drop_and_recreate": (["CREATE TABLE t(id INTEGER PRIMARY KEY, v)"],
                          ["INSERT INTO t VALUES (1,'a');;INSERT INTO t VALUES (2,'b')"],
                          ["DROP TABLE t;;CREATE TABLE t(id INTEGER PRIMARY KEY, v)", "INSERT INTO t VALUES (3,'c')"]),
    "integer_key_desc_with_nulls": (["CREATE TABLE t(id INTEGER PRIMARY KEY DESC, v)"], ["INSERT INTO t VALUES (1,'a')"],
                                    ["INSERT INTO t VALUES (NULL,'b');;INSERT INTO t VALUES (NULL,'c')"]),
    "rowid_of_a_text_key": (["CREATE TABLE t(k TEXT PRIMARY KEY, v)", "CREATE TABLE seen(n INTEGER PRIMARY KEY, r)"],
                            ["INSERT INTO t VALUES ('z',1)"],
                            ["INSERT INTO t VALUES ('a',2);;INSERT INTO t VALUES ('q',3);;DELETE FROM t WHERE k='z'",
                             "INSERT OR REPLACE INTO t VALUES ('a',9)"]),
    "without_rowid_and_generated": (["CREATE TABLE w(a TEXT, b INT, v, PRIMARY KEY(a,b)) WITHOUT ROWID",
                                     "CREATE TABLE g(id INTEGER PRIMARY KEY, v, s AS (v*2) STORED)"],
                                    ["INSERT INTO w VALUES ('x',1,1);;INSERT INTO g(id,v) VALUES (1,1)"],
                                    ["INSERT INTO w VALUES ('y',2,2);;UPDATE w SET v=9 WHERE a='x';;"
                                     "UPDATE g SET v=7 WHERE id=1"]),
}


@pytest.mark.parametrize("case", sorted(DELTA_CASES))
def test_a_delta_chain_restores_exactly_the_live_state(tmp_path, case):
    schema, first, second = DELTA_CASES[case]
    d = tmp_path / "n"
    with open_store(d) as st:
        sm = st.state("g", schema=schema, apply=sql_apply)
        sql_fill(st, first, 1)
        sm.catch_up()
        sm.snapshot()
        sql_fill(st, second, len(first) + 1)
        sm.catch_up()
        meta = sm.snapshot()
        assert meta.kind is SnapshotKind.DELTA
        live = whole_state(sm)
        st.log("g").compact(meta.index)
    for p in os.listdir(d / "state"):
        os.unlink(d / "state" / p)
    with open_store(d) as st:
        sm = st.state("g", schema=schema, apply=sql_apply)
        assert sm.catch_up() == meta.index
        assert whole_state(sm) == live
        if case in ("without_rowid_and_generated",):
            assert sql_mode(meta) == "delta"  # a schema a changeset carries keeps its deltas


@pytest.mark.parametrize("ddl, mode", [("CREATE TABLE t(k TEXT PRIMARY KEY, v)", "full"),
                                       ("CREATE TABLE t(k INTEGER PRIMARY KEY DESC, v)", "full"),
                                       ("CREATE TABLE t(k INTEGER PRIMARY KEY, v)", "delta"),
                                       ("CREATE TABLE t(k TEXT PRIMARY KEY, v) WITHOUT ROWID", "delta")])
def test_only_tables_keyed_by_their_rowid_or_without_rowid_keep_deltas(tmp_path, ddl, mode):
    """A changeset does not carry the hidden rowid of a rowid table keyed otherwise: a restored replica would
    number rows differently, and later entries reading rowid or scanning in rowid order would differ."""
    with open_store(tmp_path / "n") as st:
        sm = st.state("g", schema=[ddl], apply=sql_apply)
        sql_fill(st, ["INSERT INTO t VALUES (1, 'a')"], 1)
        sm.catch_up()
        sm.snapshot()
        sql_fill(st, ["INSERT INTO t VALUES (2, 'b')"], 2)
        sm.catch_up()
        assert sql_mode(sm.snapshot()) == mode


@pytest.mark.parametrize("sql", ["ANALYZE", "PRAGMA optimize", "PRAGMA user_version=7", "PRAGMA application_id=7", "PRAGMA recursive_triggers=1",
                                 "CREATE TEMP TRIGGER tt AFTER INSERT ON t BEGIN SELECT 1; END",
                                 "CREATE TEMP TABLE x(a)",
                                 "CREATE TRIGGER tb AFTER UPDATE ON raft_applied BEGIN SELECT 1; END",
                                 "CREATE INDEX ib ON raft_applied(applied_term)"])
def test_apply_cannot_change_what_a_replica_or_a_restart_would_not_have(tmp_path, sql):
    with open_store(tmp_path / "n") as st:
        sm = st.state("g", schema=["CREATE TABLE t(id INTEGER PRIMARY KEY)"], apply=sql_apply)
        sql_fill(st, ["INSERT INTO t VALUES (1)", sql], 1)
        with pytest.raises(ApplyError) as ei:
            sm.catch_up(batch=1)
        assert isinstance(ei.value.__cause__, apsw.AuthError) and ei.value.index == 2
        assert sm.applied == (1, 1)
    with open_store(tmp_path / "n") as st:
        sm = st.state("g", schema=["CREATE TABLE t(id INTEGER PRIMARY KEY)"], apply=sql_apply)
        # reading those pragmas stays allowed
        assert sm.apply_command(2, 1, lambda c: c.execute("PRAGMA user_version").fetchall()) == (True, [(0,)])


def test_writes_after_a_statement_that_rolls_the_batch_back_do_not_escape(tmp_path):
    with open_store(tmp_path / "n") as st:
        sm = st.state("g", schema=["CREATE TABLE t(id INTEGER PRIMARY KEY ON CONFLICT ROLLBACK, v)"])
        kept = []

        def fn(conn):
            kept.append(conn)
            conn.execute("INSERT INTO t VALUES (1, 'a')")
            with contextlib.suppress(apsw.ConstraintError):
                conn.execute("INSERT INTO t VALUES (1, 'again')")  # rolls the whole transaction back
            conn.execute("INSERT INTO t VALUES (2, 'escaped?')")  # would autocommit

        for _ in range(3):
            with pytest.raises((ApplyError, apsw.Error)):
                sm.apply_command(1, 1, fn)
        assert sm.query("SELECT * FROM t") == [] and sm.applied == (0, 0)
        with pytest.raises(apsw.ConstraintError):  # a connection kept for later cannot commit either
            kept[0].execute("INSERT INTO t VALUES (3, 'later')")
        assert sm.query("SELECT * FROM t") == []


def interrupt_after_commits(monkeypatch) -> None:
    """Make every commit of the state machine return into a KeyboardInterrupt (one landing right after COMMIT)."""
    from raft_sqlite import sqlstate
    orig = sqlstate.SqlStateMachine._committing

    @contextlib.contextmanager
    def interrupted(self):
        with orig(self):
            yield
        raise KeyboardInterrupt

    monkeypatch.setattr(sqlstate.SqlStateMachine, "_committing", interrupted)


def test_an_interrupt_after_the_commit_keeps_the_position_right(tmp_path, monkeypatch):
    """KeyboardInterrupt (any async exception) landing after COMMIT returned: the batch is applied, and the
    next call must not apply it again; one landing after BEGIN must not leave the transaction open."""
    with open_store(tmp_path / "n") as st:
        fill(st, 20)
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        interrupt_after_commits(monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            sm.catch_up(upto=10)
        monkeypatch.undo()
        assert sm.applied == (10, 1)
        assert sm.catch_up() == 20
        assert state_of(sm) == expected(20)

        def interrupt(conn, e):
            raise KeyboardInterrupt

        fill(st, 25, start=21)
        with pytest.raises(KeyboardInterrupt):
            sm.apply([LogEntry(21, 1, cmd(21))], interrupt)
        assert sm.applied == (20, 1)
        assert sm.catch_up() == 25 and state_of(sm) == expected(25)


def test_snapshot_or_restore_from_inside_apply_is_refused(tmp_path):
    with open_store(tmp_path / "n") as st:
        fill(st, 10)
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        sm.catch_up(upto=5)
        sm.snapshot()
        with pytest.raises(ApplyError) as ei:
            sm.apply_command(6, 1, lambda c: sm.snapshot())
        assert isinstance(ei.value.__cause__, SnapshotError)
        with pytest.raises(ApplyError):
            sm.apply_command(6, 1, lambda c: sm.restore_snapshot(force=True))
        assert sm.applied == (5, 1)


def test_a_restore_between_a_captures_pin_and_its_write_makes_the_next_capture_full(tmp_path):
    d = tmp_path / "n"
    with open_store(d) as st:
        fill(st, 40, commit=10)
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        sm.catch_up()
        sm.snapshot()
        st.metadata("g").set_commit_index(20)
        sm.catch_up()
        reg = st.state_machine("g")
        orig = reg.capture

        def capture(*a, **k):  # another thread restores the state after the pin (an install's restore does)
            t = threading.Thread(target=reg.restore)
            t.start()
            t.join()
            assert sm.applied == (10, 1)
            return orig(*a, **k)

        reg.capture = capture
        sm.snapshot()  # at 20, from its pin
        reg.capture = orig
        st.metadata("g").set_commit_index(30)
        sm.catch_up()  # 11..30 from the restored state at 10
        meta = sm.snapshot()
        assert sql_mode(meta) == "full"  # the changes since the restore are not relative to the capture at 20
        st.log("g").compact(30)
    for p in os.listdir(d / "state"):
        os.unlink(d / "state" / p)
    with open_store(d) as st:
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        assert sm.catch_up() == 30 and state_of(sm) == expected(30)


def test_restore_snapshot_goes_forward_only_unless_forced(tmp_path):
    with open_store(tmp_path / "n") as st:
        fill(st, 20, commit=10)
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        sm.catch_up()
        sm.snapshot()
        st.metadata("g").set_commit_index(20)
        sm.catch_up()
        assert sm.restore_snapshot() is None and sm.applied == (20, 1)
        assert sm.restore_snapshot(force=True).index == 10 and sm.applied == (10, 1)
        assert sm.catch_up() == 20 and state_of(sm) == expected(20)


def test_apply_command_checks_the_term_the_log_has(tmp_path):
    with open_store(tmp_path / "n") as st:
        fill(st, 3)
        sm = st.state("g", schema=SCHEMA)
        with pytest.raises(LogConflictError):
            sm.apply_command(1, 2, lambda c: None)
        assert sm.apply_command(1, 1, lambda c: None) == (True, None)


def test_state_arguments_given_again_must_match_and_readers_cannot_attach(tmp_path):
    with open_store(tmp_path / "n") as st:
        sm = st.state("g", schema=SCHEMA, durable=True)
        assert st.state("g") is sm and st.state("g", durable=True) is sm
        with pytest.raises(ValueError):
            st.state("g", durable=False)
        with pytest.raises(ValueError):
            st.state("g", deltas=False)
        with pytest.raises(apsw.AuthError):
            sm.query(f"ATTACH '{tmp_path / 'x.db'}' AS x")
        assert [r[1] for r in sm.query("PRAGMA database_list")] == ["main"]


def test_a_second_interrupt_in_the_error_path_cannot_make_an_entry_apply_twice(tmp_path, monkeypatch):
    """An interrupt after COMMIT, then another before the position is read back: the next apply reads the
    position inside its own transaction, so nothing is applied twice."""
    from raft_sqlite import sqlstate
    with open_store(tmp_path / "n") as st:
        fill(st, 20)
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)

        def resync(self):
            raise KeyboardInterrupt  # the second interrupt, before the position is read back

        interrupt_after_commits(monkeypatch)
        monkeypatch.setattr(sqlstate.SqlStateMachine, "_resync_applied", resync)
        with pytest.raises(KeyboardInterrupt):
            sm.catch_up(upto=10)
        monkeypatch.undo()
        assert sm.catch_up() == 20
        assert state_of(sm) == expected(20)


def test_a_session_left_in_an_error_state_costs_one_delta_not_every_snapshot(tmp_path):
    with open_store(tmp_path / "n") as st:
        fill(st, 30, commit=10)
        sm = st.state("g", schema=SCHEMA, apply=apply_cmd)
        sm.catch_up()
        sm.snapshot()
        st.metadata("g").set_commit_index(20)
        sm.catch_up()

        class Broken:
            def changeset_stream(self, out):
                raise apsw.AuthError("authorization denied")

            def close(self):
                pass

        with sm._lock:
            sm._session.close()
            sm._session = Broken()
        assert sql_mode(sm.snapshot()) == "full"  # this capture stores the state whole ...
        st.metadata("g").set_commit_index(30)
        sm.catch_up()
        assert sql_mode(sm.snapshot()) == "delta"  # ... and recording started again
