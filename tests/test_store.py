"""NodeStore: creation, identity, permissions, fsync-mode pragmas, migrations, transactions, group commit."""

import os
import stat
import threading

import apsw
import pytest

from raft_sqlite import (
    FSYNC_MODES,
    FsyncMode,
    LogConflictError,
    LogEntry,
    MetadataError,
    NodeIdentityMismatch,
    NodeStore,
    RaftSqliteError,
    migrate,
    schema,
)
from raft_sqlite.fsync import SYNCHRONOUS_LEVELS, pragmas_for
from tests.conftest import open_store, run_py


def test_create_layout_permissions_and_node_record(data_dir):
    with open_store(data_dir, node_id="n7", cluster_id="prod") as s:
        s.log("g").append([LogEntry(1, 1, b"x")])
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    files = sorted(os.listdir(data_dir))
    assert {"raft.db", "chunks.db"} <= set(files)
    for f in files:
        assert stat.S_IMODE(os.stat(data_dir / f).st_mode) == 0o600, f
    c = apsw.Connection(str(data_dir / "raft.db"))
    assert c.execute("SELECT node_id, cluster_id, format_version FROM node").fetchall() == [
        ("n7", "prod", schema.FORMAT_VERSION)]


def test_foreign_node_or_cluster_refused(data_dir):
    open_store(data_dir, node_id="a", cluster_id="c").close()
    with pytest.raises(NodeIdentityMismatch, match="belongs to node 'a'"):
        open_store(data_dir, node_id="b", cluster_id="c")
    with pytest.raises(NodeIdentityMismatch, match="cluster 'c'"):
        open_store(data_dir, node_id="a", cluster_id="other")
    open_store(data_dir, node_id="a", cluster_id="c").close()


def test_newer_format_refused(data_dir):
    open_store(data_dir).close()
    c = apsw.Connection(str(data_dir / "raft.db"))
    from raft_sqlite.store import node_crc
    nid, cid, created = c.execute("SELECT node_id, cluster_id, created_at FROM node").fetchone()
    c.execute("UPDATE node SET format_version=?, crc32=?", (99, node_crc(nid, cid, 99, created)))
    c.close()
    with pytest.raises(NodeIdentityMismatch, match="newer"):
        open_store(data_dir)


def test_unknown_schema_revision_refused(data_dir):
    open_store(data_dir).close()
    c = apsw.Connection(str(data_dir / "raft.db"))
    c.execute("UPDATE alembic_version SET version_num='9999_from_the_future'")
    c.close()
    with pytest.raises(NodeIdentityMismatch, match="newer than this raft_sqlite knows"):
        open_store(data_dir)


def test_heads_constants_match_migration_scripts():
    assert migrate.heads() == {"main": schema.MAIN_HEAD, "chunks": schema.CHUNKS_HEAD}


def test_older_store_is_upgraded_and_current_open_skips_alembic(data_dir, monkeypatch):
    # an empty (pre-schema) database file is "older": open must create the schema (built by alembic,
    # copied in through the store's VFS by migrate.create)
    os.makedirs(data_dir, mode=0o700)
    apsw.Connection(str(data_dir / "raft.db")).close()
    calls = []
    real_create, real_upgrade = migrate.create, migrate.upgrade
    monkeypatch.setattr(migrate, "create", lambda *a: calls.append(("create", a[1])) or real_create(*a))
    monkeypatch.setattr(migrate, "upgrade", lambda *a: calls.append(("upgrade", a[1])) or real_upgrade(*a))
    open_store(data_dir).close()
    assert [c for c in calls if c[0] == "create"] == [("create", "raft.db"), ("create", "chunks.db")]
    calls.clear()
    open_store(data_dir).close()
    assert calls == []  # already current: alembic is not even imported for this open


@pytest.mark.parametrize("mode", list(FsyncMode))
def test_fsync_mode_maps_to_pragmas(data_dir, mode):
    with open_store(data_dir, fsync=mode) as s:
        got = s.pragmas()
        want = FSYNC_MODES[mode]["pragmas"]
        assert got["synchronous"] == SYNCHRONOUS_LEVELS[want["synchronous"]]
        assert got["fullfsync"] == (1 if want["fullfsync"] == "ON" else 0)
        assert got["checkpoint_fullfsync"] == (1 if want["checkpoint_fullfsync"] == "ON" else 0)
        assert got["journal_mode"] == "wal"
        assert got["journal_size_limit"] == -1  # never shrink the WAL below its working size
        # the reader connections get the same mapping
        assert s.kernel.read(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == got["synchronous"]
    c = apsw.Connection(str(data_dir / "raft.db"))
    settings = dict(c.execute("SELECT key, value FROM settings").fetchall())
    assert settings["fsync_mode"] == mode.value
    assert all(settings[f"pragma.{k}"] == v for k, v in pragmas_for(mode).items())


def test_normal_mode_syncs_the_wal_periodically(data_dir):
    with open_store(data_dir, fsync=FsyncMode.NORMAL, fsync_interval=0.02) as s:
        assert s.pragmas()["synchronous"] == 1
        lg = s.log("g")
        for i in range(1, 6):
            lg.append([LogEntry(i, 1, b"x")])
            deadline = __import__("time").time() + 2
            while s.stats.interval_syncs < i and __import__("time").time() < deadline:
                __import__("time").sleep(0.005)
        assert s.stats.interval_syncs >= 5
        n = s.stats.interval_syncs
        __import__("time").sleep(0.1)  # idle: nothing new to sync
        assert s.stats.interval_syncs == n
    with open_store(data_dir, fsync=FsyncMode.FULL) as s:
        assert s.kernel.pipeline.syncer is None


def test_transaction_commits_log_and_metadata_atomically(data_dir):
    with open_store(data_dir) as s:
        lg, md, other = s.log("a"), s.metadata("a"), s.log("b")  # groups are created at first use
        commits = s.stats.commits
        with s.transaction():
            assert lg.append([LogEntry(1, 3, b"x"), LogEntry(2, 3, b"y")]) == 2
            md.set_term_and_vote(3, "n2")
            md.set_commit_index(2)  # validated against the transaction's own state
            other.append([LogEntry(1, 1, b"z")])
            assert lg.last_index == 0  # nothing visible before the block exits
        assert s.stats.commits == commits + 1  # one commit (one fsync) for all of it
        assert (lg.last_index, md.hard_state) == (2, (3, "n2", 2))
    with open_store(data_dir) as s:
        assert [e.data for e in s.log("a").entries(1, 3)] == [b"x", b"y"]
        assert s.metadata("a").hard_state == (3, "n2", 2)
        assert s.log("b").get(1).data == b"z"


def test_transaction_error_writes_nothing(data_dir):
    with open_store(data_dir) as s:
        lg, md = s.log("a"), s.metadata("a")
        with pytest.raises(ZeroDivisionError), s.transaction():
            lg.append([LogEntry(1, 1, b"x")])
            md.set_term_and_vote(1, "me")
            raise ZeroDivisionError("inside the transaction")
        with s.transaction():
            lg.append([LogEntry(1, 1, b"x")])
            with pytest.raises(MetadataError):
                md.set_commit_index(5)  # beyond the transaction's last index: refused, not added
        assert md.commit_index == 0 and lg.last_index == 1
    with open_store(data_dir) as s:
        assert s.log("a").last_index == 1
        assert s.metadata("a").hard_state == (0, None, 0)


def test_transactions_do_not_nest(store):
    with store.transaction(), pytest.raises(RaftSqliteError, match="nest"), store.transaction():
        pass


@pytest.mark.parametrize("groups", [1, 8])
def test_group_commit_eight_writer_threads(data_dir, groups):
    """8 threads append single entries concurrently (to one group through append_next, or one group
    each through append); every acknowledged entry is durable and commits were shared."""
    per_thread = 150
    with open_store(data_dir, fsync=FsyncMode.FULL) as s:
        names = [f"g{t % groups}" for t in range(8)]
        acked = {n: [] for n in names}
        errors = []
        barrier = threading.Barrier(8)

        def writer(t):
            lg = s.log(names[t])
            barrier.wait()
            try:
                for k in range(per_thread):
                    data = f"{t}:{k}".encode()
                    idx = lg.append_next(1, [data]) if groups == 1 else lg.append([LogEntry(k + 1, 1, data)])
                    acked[names[t]].append((idx, data))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert s.stats.max_batch > 1  # appends were coalesced into shared commits
        assert s.stats.commits < 8 * per_thread
    with open_store(data_dir) as s:
        for n in set(names):
            lg = s.log(n)
            assert lg.last_index == names.count(n) * per_thread
            got = {e.index: e.data for e in lg.entries(1, lg.last_index + 1)}
            assert all(got[idx] == data for idx, data in acked[n])
            assert len(acked[n]) == len(got)



def test_group_commit_many_writers_with_failing_requests_among_them(data_dir):
    """12 writer threads share commits on one group; four of them keep sending appends that are refused
    (a term below the log's). Each refused request fails alone in its batch, nothing of it is written, and
    after a reopen the log holds exactly the acknowledged entries, each at the index it was acknowledged at."""
    good_threads, bad_threads, per_thread = 8, 4, 60
    with open_store(data_dir, fsync=FsyncMode.FULL) as s:
        lg = s.log("g")
        lg.append_next(5, [b"first"])
        acked, refused, errors = [], [], []
        barrier = threading.Barrier(good_threads + bad_threads)

        def writer(t):
            barrier.wait()
            try:
                for k in range(per_thread):
                    if t < good_threads:
                        data = f"{t}:{k}".encode()
                        acked.append((lg.append_next(5, [data]), data))
                    else:
                        with pytest.raises(LogConflictError):
                            lg.append_next(4, [f"bad {t}:{k}".encode()])
                        refused.append(t)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(good_threads + bad_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len(refused) == bad_threads * per_thread
        assert s.stats.max_batch > 1
    with open_store(data_dir) as s:
        lg = s.log("g")
        assert lg.last_index == 1 + good_threads * per_thread
        got = {e.index: e.data for e in lg.entries(2, lg.last_index + 1)}
        assert sorted(acked) == sorted(got.items())
        assert not any(d.startswith(b"bad") for d in got.values())

def test_closed_store_refuses(data_dir):
    s = open_store(data_dir)
    lg = s.log("g")
    s.close()
    s.close()  # idempotent
    with pytest.raises(RaftSqliteError, match="closed"):
        lg.append([LogEntry(1, 1, b"x")])
    with pytest.raises(RaftSqliteError, match="closed"):
        lg.get(1)
    with pytest.raises(RaftSqliteError, match="closed"):
        _ = s.metadata("g").current_term


def test_open_argument_types(data_dir):
    with pytest.raises(TypeError):
        NodeStore.open(data_dir, 5, cluster_id="c")
    with pytest.raises(TypeError):
        NodeStore.open(data_dir, "n", cluster_id=None)
    with pytest.raises(ValueError):
        NodeStore.open(data_dir, "n", cluster_id="c", fsync="SOMETIMES")
    assert not os.path.exists(data_dir)  # nothing created on bad input


def test_recovery_event_written_on_every_open(data_dir):
    for _ in range(3):
        open_store(data_dir).close()
    c = apsw.Connection(str(data_dir / "raft.db"))
    rows = c.execute("SELECT kind, policy, outcome FROM recovery_events ORDER BY event_id").fetchall()
    assert rows == [("open", "STRICT", "created"), ("open", "STRICT", "clean"), ("open", "STRICT", "clean")]


def test_creating_and_upgrading_a_store_logs_one_line_not_alembics_narration(tmp_path):
    # Issue 15: creating a store printed 15 alembic INFO lines through the application's logging. A fresh
    # process (alembic not imported yet), logging at INFO: creation says one raft_sqlite line; a real
    # upgrade of an existing file says which revisions, once; alembic's own lines are at DEBUG only.
    code = r'''
import logging, sys
records = []
class H(logging.Handler):
    def emit(self, r): records.append((r.name, r.levelno, r.getMessage()))
logging.basicConfig(level=logging.INFO, handlers=[H()])
import apsw
from raft_sqlite import NodeStore
d = sys.argv[1]
NodeStore.open(d, node_id="n", cluster_id="c").close()
created = list(records); records.clear()
c = apsw.Connection(d + "/raft.db")
c.execute("DROP TABLE close_digests; UPDATE alembic_version SET version_num = '0003_main_segment_content'")
c.close()
NodeStore.open(d, node_id="n", cluster_id="c").close()
for phase, recs in (("created", created), ("upgraded", records)):
    for name, level, msg in recs:
        print(phase, name, level, msg.replace("\n", " "))
'''
    r = run_py(code, tmp_path / "n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert not [ln for ln in lines if " alembic" in ln], lines
    created = [ln for ln in lines if ln.startswith("created ")]
    assert len(created) == 1 and "recovery created" in created[0], lines
    upgraded = [ln for ln in lines if ln.startswith("upgraded raft_sqlite.migrate")]
    assert len(upgraded) == 1 and "from 0003_main_segment_content to 0005_main_close_digest_spans" in upgraded[0], lines
