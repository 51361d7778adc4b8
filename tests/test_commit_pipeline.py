"""The commit pipeline on its own (raft_sqlite.commit), and the kernel's listener hooks.

The pipeline is tested here without a NodeStore: a bare apsw connection on a scratch database, a
GroupTable and a WalWriter are all it needs (cf. raft-engine's write_barrier.rs and its own tests)."""

import threading
import time

import apsw
import pytest

from raft_sqlite import LogEntry, RaftSqliteError, SegmentPolicy, StorageFault
from raft_sqlite.commit import CommitPipeline
from raft_sqlite.groupstate import GroupTable
from raft_sqlite.wal import WalWriter
from tests.conftest import open_store


@pytest.fixture
def pipeline(tmp_path):
    conn = apsw.Connection(str(tmp_path / "p.db"))
    conn.execute("PRAGMA journal_mode=WAL").fetchall()
    conn.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)")
    p = CommitPipeline(str(tmp_path), GroupTable(), WalWriter())
    p.conn = conn
    p.closed = False
    yield p
    p.closed = True
    conn.close()


def insert(k, v):
    return lambda conn: conn.execute("INSERT INTO t(k, v) VALUES (?,?)", (k, v))


def rows(p):
    return p.conn.execute("SELECT k, v FROM t ORDER BY k").fetchall()


def test_writers_queued_behind_a_leader_share_one_commit(pipeline):
    p = pipeline
    release = threading.Event()
    results, errors = {}, []

    def slow(conn):  # the first leader's op: holds the leader until every follower is queued
        insert(0, "0")(conn)
        assert release.wait(10)
        return 0

    def submit(k, fn):
        try:
            results[k] = p.raw(fn)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    leader = threading.Thread(target=submit, args=(0, slow))
    leader.start()
    while p.queued < 1:
        time.sleep(0.001)
    followers = [threading.Thread(target=submit, args=(k, lambda conn, k=k: (insert(k, str(k))(conn), k)[1]))
                 for k in range(1, 6)]
    for t in followers:
        t.start()
    while p.queued < 6:
        time.sleep(0.001)
    release.set()
    for t in [leader, *followers]:
        t.join()
    assert not errors and results == {k: k for k in range(6)}
    assert rows(p) == [(k, str(k)) for k in range(6)]
    # the leader's batch, then ONE batch of the five followers (the new front leads them all)
    assert p.stats.commits == 2 and p.stats.max_batch == 5 and p.stats.requests == 6
    assert p.queued == 0



def test_a_lone_writer_after_a_big_batch_still_commits(pipeline):
    """After a batch of six, the next leader waits (blocked, for a fraction of a commit's time) for as many
    writers to queue; when none come it commits alone, and so does every later lone writer."""
    test_writers_queued_behind_a_leader_share_one_commit(pipeline)
    p = pipeline
    for k in range(10, 15):
        assert p.raw(lambda conn, k=k: (insert(k, "lone")(conn), k)[1]) == k
    assert p.stats.commits == 2 + 5 and p.queued == 0
    assert [k for k, v in rows(p) if v == "lone"] == list(range(10, 15))


def test_many_writers_each_with_its_own_answer(pipeline):
    """32 threads x 20 writes, every fifth one refused (a duplicate key): each write gets its own answer,
    refused ones write nothing, and the queue drains."""
    p = pipeline
    out, errors = {}, []

    def writer(t):
        for j in range(20):
            k = t * 100 + j
            try:
                if j % 5 == 4:
                    p.raw(insert(k - 1, "dup"))  # k - 1 was written just before by this thread
                    out[k] = "unexpected success"
                else:
                    out[k] = p.raw(lambda conn, k=k: (insert(k, str(k))(conn), k)[1])
            except RaftSqliteError:
                out[k] = "refused"
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and p.fault is None and p.queued == 0
    assert all(out[k] == ("refused" if k % 100 % 5 == 4 else k) for k in out) and len(out) == 32 * 20
    assert rows(p) == sorted((k, str(k)) for k in out if out[k] == k)
    assert p.stats.requests == 32 * 20

def test_a_refused_request_fails_alone_in_its_batch(pipeline):
    p = pipeline
    p.raw(insert(1, "first"))
    release = threading.Event()
    out = {}

    def submit(name, fn):
        try:
            out[name] = ("ok", p.raw(fn))
        except BaseException as exc:
            out[name] = ("error", exc)

    def slow(conn):
        assert release.wait(10)

    threads = [threading.Thread(target=submit, args=("leader", slow))]
    threads[0].start()
    while p.queued < 1:
        time.sleep(0.001)
    for name, fn in (("bad", insert(1, "dup")), ("good", insert(2, "ok"))):
        threads.append(threading.Thread(target=submit, args=(name, fn)))
        threads[-1].start()
        while p.queued < len(threads):
            time.sleep(0.001)
    release.set()
    for t in threads:
        t.join()
    # bad and good shared one batch: the constraint error is pinned on bad, good commits
    assert p.stats.max_batch == 2
    assert out["bad"][0] == "error" and isinstance(out["bad"][1], RaftSqliteError)
    assert out["good"][0] == "ok" and out["leader"][0] == "ok"
    assert rows(p) == [(1, "first"), (2, "ok")]
    assert p.fault is None


def test_fail_stops_every_later_write(pipeline):
    p = pipeline
    p.raw(insert(1, "a"))
    p.fail(OSError("fsync failed"))
    with pytest.raises(StorageFault, match="fail-stopped"):
        p.raw(insert(2, "b"))
    with pytest.raises(StorageFault):
        p.check_open()
    assert rows(p) == [(1, "a")]


def test_closed_pipeline_refuses(pipeline):
    p = pipeline
    p.closed = True
    with pytest.raises(RaftSqliteError, match="closed"):
        p.raw(insert(1, "a"))
    p.closed = False


class Recorder:
    def __init__(self):
        self.commits, self.appends, self.seals = [], [], []

    def on_commit(self, seconds, requests):
        self.commits.append((seconds, requests))

    def on_append(self, group_id, entries):
        self.appends.append((group_id, [e.index for e in entries]))

    def on_seal(self, group_id, segment_id):
        self.seals.append((group_id, segment_id))


def test_commit_listener_is_called_after_each_commit_and_can_be_removed(pipeline):
    p = pipeline
    rec = Recorder()
    p.add_listener(rec)
    p.raw(insert(1, "a"))
    p.raw(insert(2, "b"))
    assert [r for _, r in rec.commits] == [1, 1] and all(s >= 0 for s, _ in rec.commits)
    p.remove_listener(rec)
    p.raw(insert(3, "c"))
    assert len(rec.commits) == 2


def test_a_failing_listener_never_fails_the_write(pipeline, caplog):
    p = pipeline

    class Boom:
        def on_commit(self, seconds, requests):
            raise RuntimeError("listener bug")

    p.add_listener(Boom())
    p.raw(insert(1, "a"))  # durable: the listener's error is logged, not raised
    assert rows(p) == [(1, "a")]
    assert "listener" in caplog.text and p.fault is None


def test_kernel_record_listener_sees_appends_and_seals(tmp_path):
    with open_store(tmp_path / "n", segment_policy=SegmentPolicy(max_entries=4)) as s:
        lg = s.log("g")  # (creating the group is a commit of its own)
        rec = Recorder()
        s.kernel.add_listener(rec)
        lg.append([LogEntry(i, 1, b"x") for i in range(1, 4)])
        lg.append([LogEntry(i, 1, b"x") for i in range(4, 11)])
        gid = s.kernel.group("g").gid
        assert rec.appends == [(gid, [1, 2, 3]), (gid, list(range(4, 11)))]
        sealed = s.kernel.read(lambda c: c.execute(
            "SELECT segment_id FROM log_segments WHERE group_id=? AND last_index IS NOT NULL ORDER BY segment_id",
            (gid,)).fetchall())
        assert rec.seals == [(gid, sid) for (sid,) in sealed] and len(rec.seals) >= 2
        assert len(rec.commits) == 2
        s.kernel.remove_listener(rec)
        lg.append([LogEntry(11, 1, b"x")])
        assert len(rec.appends) == 2 and len(rec.commits) == 2


def test_interval_syncer_counts_syncs_through_the_pipeline(tmp_path):
    from raft_sqlite import FsyncMode
    with open_store(tmp_path / "n", fsync=FsyncMode.NORMAL, fsync_interval=0.01) as s:
        syncer = s.kernel.pipeline.syncer
        assert syncer is not None and syncer.is_alive()
        s.log("g").append([LogEntry(1, 1, b"x")])
        deadline = time.monotonic() + 5
        while s.stats.interval_syncs == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.stats.interval_syncs >= 1
    assert not syncer.is_alive()  # stopped at close


def test_a_commit_finishing_during_close_never_marks_unsynced_wal_durable(tmp_path):
    """NORMAL: only the interval syncer's fdatasync makes commits durable, so only it may move the WAL
    high-water mark. A commit still running when close() starts must not note the mark itself (found by the
    review of the kernel split: close detached the syncer before draining, the finishing leader then saw no
    syncer and noted its unsynced WAL as durable; a power cut then made the next open refuse)."""
    from raft_sqlite import FsyncMode
    s = open_store(tmp_path / "n", fsync=FsyncMode.NORMAL, fsync_interval=0.05)
    s.log("g").append([LogEntry(1, 1, b"x")])
    mark = s.kernel.hwm
    calls = []
    real_note = mark.note

    def note(*a, **kw):
        calls.append(threading.current_thread().name)
        return real_note(*a, **kw)

    mark.note = note
    entered, release = threading.Event(), threading.Event()

    def slow(conn):
        conn.execute("INSERT INTO settings(key, value) VALUES ('probe', '1')")
        entered.set()
        assert release.wait(10)

    writer = threading.Thread(target=s.kernel.raw, args=(slow,), name="writer")
    writer.start()
    assert entered.wait(10)
    closer = threading.Thread(target=s.close, name="closer")
    closer.start()
    time.sleep(0.2)  # close() has begun: it waits for the commit in flight
    release.set()
    writer.join(10)
    closer.join(10)
    assert not writer.is_alive() and not closer.is_alive()
    assert "writer" not in calls, calls  # the leader never noted its own (unsynced) commit
    assert "closer" in calls  # the syncer's last sync at close, then the close itself, note it
