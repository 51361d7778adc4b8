"""Hostile input and exceptions of odd types on the write path (project issue 11, slice h2).

Every test reopens the store after the write path under test and checks what a clean reopen shows."""

import math
import os
import threading

import apsw
import pytest
from conftest import open_store

from raft_sqlite import (
    LogEntry,
    LogUnavailableError,
    NodeStore,
    RaftSqliteError,
    SegmentPolicy,
    SnapshotScheduler,
    StorageFault,
    layout,
)

BIG = [2**40, 2**63, 2**64, 2**70, -2**63 - 1]


def _entries(lo, hi, term=1):
    return [LogEntry(i, term, b"x%d" % i) for i in range(lo, hi + 1)]


def _reopened(path, **kw):
    return open_store(path, **kw)


# ------------------------------------------------------------------ out-of-range integers are refused up front
@pytest.mark.parametrize("term", [2**63, 2**64, -1])
def test_term_out_of_range_does_not_poison_the_writer(data_dir, term):
    with open_store(data_dir) as s:
        meta, lg = s.metadata(), s.log()
        with pytest.raises(ValueError):
            meta.set_term_and_vote(term, None)
        for i in range(1, 6):
            assert lg.append([LogEntry(i, 1, b"e%d" % i)]) == i
        meta.set_term_and_vote(layout.MAX_TERM, layout.MAX_INT_VOTE)
    with _reopened(data_dir) as s:
        assert s.log().last_index == 5
        assert [e.data for e in s.log().entries(1, 6)] == [b"e%d" % i for i in range(1, 6)]
        assert s.metadata().hard_state[:2] == (layout.MAX_TERM, layout.MAX_INT_VOTE)


@pytest.mark.parametrize("vote", [2**63, -2**63 - 1, 2**70, "\ud800"])
def test_vote_out_of_range_is_refused(data_dir, vote):
    with open_store(data_dir) as s:
        with pytest.raises(ValueError):
            s.metadata().set_term_and_vote(3, vote)
        s.log().append(_entries(1, 3))
        s.metadata().set_term_and_vote(3, layout.MIN_INT_VOTE)
    with _reopened(data_dir) as s:
        assert s.log().last_index == 3
        assert s.metadata().hard_state == (3, layout.MIN_INT_VOTE, 0)


@pytest.mark.parametrize("bad", [LogEntry(1, 2**63, b"x"), LogEntry(2**40, 1, b"x"), LogEntry(2**64, 1, b"x")])
def test_append_out_of_range_raises_value_error(data_dir, bad):
    with open_store(data_dir) as s:
        lg = s.log()
        with pytest.raises(ValueError):
            lg.append([bad])
        with pytest.raises(ValueError):  # the fast path for big well-formed batches checks the range too
            lg.append([LogEntry(bad.index + i, bad.term, b"y") for i in range(20)])
        lg.append(_entries(1, 2))
    with _reopened(data_dir) as s:
        assert s.log().last_index == 2


def test_index_at_key_span_cannot_spill_into_next_group(data_dir):
    with open_store(data_dir) as s:
        s.log("a"), s.log("b")
        with pytest.raises(ValueError):
            s.log("a").append([LogEntry(layout.KEY_SPAN, 1, b"spill")])
        s.log("b").append(_entries(1, 2))
    with _reopened(data_dir) as s:  # on main, the store refused to open ("log gap" in group b)
        assert s.log("b").last_index == 2 and s.log("a").last_index == 0


def test_append_next_past_max_index_is_refused(data_dir):
    with open_store(data_dir) as s:
        with s.transaction():
            pass
        lg = s.log()
        lg.append(_entries(1, 1))
        # no way to reach MAX_INDEX legitimately here: a snapshot install just below it
        with s.snapshots().install(layout.MAX_INDEX - 1, 1) as w:
            w.write(b"state")
        assert lg.last_index == layout.MAX_INDEX - 1
        assert lg.append_next(1, [b"last"]) == layout.MAX_INDEX
        with pytest.raises(ValueError):
            lg.append_next(1, [b"one too many"])
    with _reopened(data_dir) as s:
        assert s.log().last_index == layout.MAX_INDEX
        assert s.log().get(layout.MAX_INDEX).data == b"last"


@pytest.mark.parametrize("term", [2**63, 2**64])
def test_snapshot_term_out_of_range(data_dir, term):
    with open_store(data_dir) as s:
        s.log().append(_entries(1, 3))
        s.metadata().set_commit_index(3)
        with pytest.raises(ValueError):
            s.snapshots().write(3, term)
        with pytest.raises(ValueError):
            s.snapshots().install(5, term)
        with pytest.raises(ValueError):
            s.snapshots().install(2**40, 1)
        s.log().append(_entries(4, 5))
    with _reopened(data_dir) as s:
        assert s.log().last_index == 5 and s.snapshots().latest() is None


def test_huge_reads_answer_with_the_contract_errors(store):
    lg = store.log()
    lg.append(_entries(1, 3))
    for v in BIG[:-1]:
        with pytest.raises(LogUnavailableError):
            lg.get(v)
        with pytest.raises(LogUnavailableError):
            lg.term(v)
        with pytest.raises(LogUnavailableError):
            lg.entries(1, v)
    assert lg.entries(1, 4, max_bytes=2**70)[-1].index == 3
    with pytest.raises(ValueError):
        lg.entries(1, 4, max_bytes=-1)
    lg.truncate_after(2**70)  # beyond the log: a no-op
    assert lg.last_index == 3


# ------------------------------------------------------------------ open() parameters
@pytest.mark.parametrize("kw, exc", [
    ({"segment_policy": "x"}, TypeError),
    ({"segment_policy": {"max_entries": 3}}, TypeError),
    ({"fsync_interval": 0}, ValueError),
    ({"fsync_interval": -1.0}, ValueError),
    ({"fsync_interval": math.nan}, ValueError),
    ({"fsync_interval": math.inf}, ValueError),
    ({"fsync_interval": 10**400}, ValueError),
    ({"fsync_interval": "0.05"}, TypeError),
    ({"slow_commit_warning": math.nan}, ValueError),
    ({"slow_commit_warning": None}, TypeError),
    ({"fsync": "sometimes"}, ValueError),
    ({"recovery": "maybe"}, ValueError),
    ({"vfs": 3}, TypeError),
    ({"node_id": "\ud800"}, ValueError),
])
def test_open_rejects_bad_parameters_and_writes_nothing(tmp_path, kw, exc):
    path = tmp_path / "never"
    kw = {"node_id": "n1", **kw}
    node_id = kw.pop("node_id")
    with pytest.raises(exc):
        NodeStore.open(path, node_id, cluster_id="c1", **kw)
    assert not os.path.exists(path)


@pytest.mark.parametrize("kw", [{"max_entries": 0}, {"max_entries": 2**40}, {"max_bytes": 0},
                                {"max_age": -1.0}, {"max_age": math.nan}, {"max_entries": 1.5}])
def test_segment_policy_limits_are_checked(kw):
    with pytest.raises((TypeError, ValueError)):
        SegmentPolicy(**kw)


def test_segment_policy_broken_after_construction_is_refused_at_open(tmp_path):
    pol = SegmentPolicy(max_entries=5)
    pol.max_entries = "x"
    with pytest.raises(TypeError):
        NodeStore.open(tmp_path / "d", "n1", cluster_id="c1", segment_policy=pol)
    assert not os.path.exists(tmp_path / "d")


def test_segment_policy_is_copied_at_open(data_dir):
    pol = SegmentPolicy(max_entries=5)
    with open_store(data_dir, segment_policy=pol) as s:
        pol.max_entries = -3  # the store's copy is unaffected
        s.log().append(_entries(1, 12))
    with _reopened(data_dir) as s:
        assert s.log().last_index == 12


def test_scheduler_and_snapshot_config_ranges(store):
    mgr = store.snapshots()
    for attr, v in (("chunk_size", 0), ("chunk_size", 2**40), ("commit_bytes", -1), ("max_chain_length", 0),
                    ("keep_chains", 0), ("max_write_rate", math.nan), ("chunk_size", 1.5)):
        with pytest.raises((TypeError, ValueError)):
            setattr(mgr, attr, v)
    assert mgr.chunk_size == 1 << 20
    for kw in ({"every_entries": 0}, {"every_entries": 2**64}, {"compact_lag": -1}, {"every_seconds": math.inf},
               {"poll_interval": 0}):
        with pytest.raises((TypeError, ValueError)):
            SnapshotScheduler(store, "default", lambda: None, **kw)


# ------------------------------------------------------------------ exceptions of any type on the write path
class Boom(BaseException):
    """Not an Exception: nothing may catch it by accident."""


@pytest.mark.parametrize("exc_type", [OverflowError, MemoryError, KeyError, Boom, RuntimeError])
def test_exception_in_check_leaves_no_transaction(data_dir, exc_type):
    with open_store(data_dir) as s:
        lg = s.log()
        lg.append(_entries(1, 2))

        def check(g):
            g.last_index = 999  # half-applied in-memory state: must never be published
            raise exc_type("injected")

        with pytest.raises(exc_type):
            s.kernel.run("default", check, lambda conn, g, r: None)
        assert s.fault is None
        assert lg.last_index == 2
        for i in range(3, 8):
            assert lg.append([LogEntry(i, 1, b"e%d" % i)]) == i
    with _reopened(data_dir) as s:
        assert s.log().last_index == 7


@pytest.mark.parametrize("exc_type", [OverflowError, MemoryError, Boom, ZeroDivisionError])
def test_exception_after_sql_ran_is_rolled_back(data_dir, exc_type):
    with open_store(data_dir) as s:
        lg, meta = s.log(), s.metadata()
        lg.append(_entries(1, 2))

        def write(conn, g, _):
            conn.execute("UPDATE raft_meta SET current_term=77 WHERE group_id=?", (g.gid,))
            g.term = 77
            raise exc_type("injected after SQL")

        with pytest.raises(exc_type):
            s.kernel.run("default", lambda g: None, write)
        assert s.fault is None and meta.current_term == 0
        assert s.kernel.conn.getautocommit()
        for i in range(3, 6):
            lg.append([LogEntry(i, 1, b"e")])
        meta.set_term_and_vote(4, "b")
    with _reopened(data_dir) as s:
        assert s.log().last_index == 5
        assert s.metadata().hard_state == (4, "b", 0)


def test_failure_in_one_request_of_a_batch_spares_the_others(data_dir, monkeypatch):
    """A transaction with a poisoned op fails alone; concurrent writers of the same batch commit."""
    with open_store(data_dir) as s:
        for g in ("a", "b", "c"):
            s.log(g)
        gate = threading.Event()
        errors = []

        def writer(g):
            gate.wait()
            try:
                s.log(g).append(_entries(1, 20))
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(g,)) for g in ("a", "b")]
        for t in threads:
            t.start()

        def write(conn, g, _):
            conn.execute("UPDATE raft_meta SET commit_index=5 WHERE group_id=?", (g.gid,))
            raise OverflowError("poisoned op")

        gate.set()
        with pytest.raises(OverflowError):
            s.kernel.run("c", lambda g: None, write)
        for t in threads:
            t.join()
        assert errors == [] and s.fault is None
    with _reopened(data_dir) as s:
        assert s.log("a").last_index == 20 and s.log("b").last_index == 20
        assert s.metadata("c").commit_index == 0


def _poisoned_conn(conn, exc_type=MemoryError):
    """A proxy of the write connection whose inserts of a b"poison" payload raise ``exc_type``."""

    def poisoned(params):
        rows = params if isinstance(params, list) else [params]
        return any(isinstance(r, tuple) and b"poison" in r for r in rows)

    class Conn:
        def __getattr__(self, name):
            return getattr(conn, name)

        def execute(self, sql, params=None):
            if params is not None and poisoned(params):
                raise exc_type("injected in insert")
            return conn.execute(sql) if params is None else conn.execute(sql, params)

        def executemany(self, sql, rows):
            rows = list(rows)
            if poisoned(rows):
                raise exc_type("injected in insert")
            return conn.executemany(sql, rows)

    return Conn()


def _raising_conn(conn, exc, *, when, after=False):
    """A proxy of the write connection whose ``execute(sql, ...)`` raises ``exc`` for the statements
    ``when(sql, params)`` selects: before running them, or with ``after`` once they ran."""

    class Conn:
        def __getattr__(self, name):
            return getattr(conn, name)

        def execute(self, sql, *a):
            hit = when(sql, a[0] if a else None)
            if hit and not after:
                raise exc
            cur = conn.execute(sql, *a)
            if hit:
                raise exc
            return cur

    return Conn()


def test_exception_in_deferred_insert_is_pinned_on_its_request(data_dir):
    """The rows of appends are inserted together at commit (or as one autocommit statement); a failure
    there is replayed with each request's rows inserted with it, so that only the bad request fails
    and the others of the batch commit."""
    with open_store(data_dir) as s:
        lg = s.log()
        lg.append(_entries(1, 1))
        conn = s.kernel.conn
        s.kernel.conn = _poisoned_conn(conn)
        with pytest.raises(MemoryError):  # the lone autocommit insert
            lg.append([LogEntry(2, 1, b"poison")])
        assert s.fault is None and lg.last_index == 1 and conn.getautocommit()
        with pytest.raises(MemoryError), s.transaction():  # the insert at COMMIT of a transaction
            s.log("other").append(_entries(1, 3))
            lg.append([LogEntry(2, 1, b"poison")])
        assert s.fault is None and lg.last_index == 1 and conn.getautocommit()
        # concurrent writers share a batch with a poisoned one: they still commit
        gate, errors = threading.Event(), []

        def writer(g):
            gate.wait()
            try:
                s.log(g).append(_entries(1, 5))
            except BaseException as exc:  # noqa: BLE001 - checked below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(g,)) for g in ("a", "b", "c")]
        for t in threads:
            t.start()
        gate.set()
        for _ in range(20):
            with pytest.raises(MemoryError):
                lg.append([LogEntry(2, 1, b"poison")])
        for t in threads:
            t.join()
        assert errors == [] and s.fault is None
        s.kernel.conn = conn
        lg.append([LogEntry(2, 1, b"ok")])
    with _reopened(data_dir) as s:
        assert s.log().last_index == 2 and s.log().get(2).data == b"ok"
        assert s.log("other").last_index == 0
        assert [s.log(g).last_index for g in "abc"] == [5, 5, 5]


@pytest.mark.parametrize("exc_type", [OverflowError, Boom])
def test_exception_during_commit_fail_stops(data_dir, monkeypatch, exc_type):
    """An exception while COMMIT runs leaves the outcome unknown: fail-stop, exactly as a failed fsync."""
    with open_store(data_dir) as s:
        lg = s.log()
        lg.append(_entries(1, 2))
        conn = s.kernel.conn
        # the write connection, whose COMMIT raises after it ran
        s.kernel.conn = _raising_conn(conn, exc_type("injected during COMMIT"), when=lambda sql, p: sql == "COMMIT",
                                after=True)
        with pytest.raises((StorageFault, Boom)), s.transaction():
            lg.append(_entries(3, 4))
        s.kernel.conn = conn
        assert s.fault is not None
        with pytest.raises(StorageFault):
            lg.append(_entries(5, 5))
        with pytest.raises(StorageFault):
            s.metadata().set_term_and_vote(9, None)
    with _reopened(data_dir) as s:  # the COMMIT did run: the reopen shows the write
        assert s.log().last_index == 4
        s.log().append(_entries(5, 5))
    with _reopened(data_dir) as s:
        assert s.log().last_index == 5


def test_failed_rollback_fail_stops(data_dir):
    with open_store(data_dir) as s:
        lg = s.log()
        lg.append(_entries(1, 2))
        conn = s.kernel.conn

        def write(c, g, _):
            c.execute("UPDATE raft_meta SET commit_index=1 WHERE group_id=?", (g.gid,))
            raise ValueError("after SQL")

        s.kernel.conn = _raising_conn(conn, apsw.IOError("injected: rollback failed"),
                                when=lambda sql, p: sql == "ROLLBACK")
        with pytest.raises((ValueError, StorageFault)):
            s.kernel.run("default", lambda g: None, write)
        s.kernel.conn = conn
        assert s.fault is not None
        with pytest.raises(StorageFault):
            lg.append(_entries(3, 3))
    with _reopened(data_dir) as s:
        assert s.log().last_index == 2 and s.metadata().commit_index == 0


def test_on_commit_callback_error_does_not_fail_the_write(data_dir):
    with open_store(data_dir) as s:
        def bad(dt, n):
            raise RuntimeError("metrics broke")

        s.on_commit = bad
        assert s.log().append(_entries(1, 3)) == 3
        assert s.fault is None
    with _reopened(data_dir) as s:
        assert s.log().last_index == 3


def test_errors_are_typed(store):
    with pytest.raises(RaftSqliteError):
        store.log().append([LogEntry(5, 1, b"gap")])


@pytest.mark.parametrize("kw, err", [
    (dict(pages_per_step=0), ValueError), (dict(pages_per_step=2**63), ValueError),
    (dict(pages_per_step=1.5), TypeError), (dict(pages_per_step=True), TypeError),
    (dict(step_pause=float("nan")), ValueError), (dict(step_pause=-1), ValueError),
    (dict(step_pause="0"), TypeError), (dict(nice=-1), ValueError), (dict(nice=2**70), ValueError),
])
def test_backup_manager_arguments_are_checked(tmp_path, kw, err):
    """Hostile HotBackupManager settings are refused up front; nothing is created in the backup folder."""
    from raft_sqlite import HotBackupManager

    with open_store(tmp_path / "node") as s, pytest.raises(err):
        HotBackupManager(s, tmp_path / "bk", **kw)
    assert not (tmp_path / "bk").exists()


@pytest.mark.parametrize("kw, err", [
    (dict(interval=0), ValueError), (dict(interval=float("inf")), ValueError), (dict(interval=None), TypeError),
    (dict(interval=1, keep=0), ValueError), (dict(interval=1, keep=1.0), TypeError),
    (dict(interval=1, max_age=float("nan")), ValueError), (dict(interval=1, max_age=0), ValueError),
])
def test_backup_scheduler_and_prune_arguments_are_checked(tmp_path, kw, err):
    """HotBackupScheduler and prune() refuse nan/inf/zero intervals and ages and non-int counts."""
    from raft_sqlite import HotBackupManager, HotBackupScheduler

    with open_store(tmp_path / "node") as s:
        with pytest.raises(err):
            HotBackupScheduler(s, tmp_path / "bk", **kw)
        m = HotBackupManager(s, tmp_path / "bk")
        m.backup()
        prune_kw = {k: v for k, v in kw.items() if k in ("keep", "max_age")}
        if prune_kw:
            with pytest.raises(err):
                m.prune(**prune_kw)
        assert len([n for n in os.listdir(m.node_dir) if not n.startswith(".")]) == 1  # nothing pruned


# ------------------------------------------------------------------ interrupts (found in review)
def test_interrupt_in_the_leader_is_raised_there_and_rolls_back_the_whole_batch(data_dir):
    """A KeyboardInterrupt while a leader runs a batch (here: inside another writer's op, after SQL ran)
    belongs to the leader's thread, not to the request it happened in: the leader rolls the whole batch
    back, answers every request "nothing written" and re-raises the interrupt itself. The store stays
    usable (no fail-stop: the outcome is known)."""
    with open_store(data_dir) as s:
        s.log("a"), s.log("b"), s.log("c")
        in_first, release = threading.Event(), threading.Event()
        results = {}

        def run(name, fn):
            try:
                results[name] = fn()
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertions below
                results[name] = exc

        def slow_check(g):  # batch 1 (thread L) holds the queue until F1 and F2 are queued behind it
            in_first.set()
            release.wait(10)

        def term_write(conn, g, _):
            conn.execute("UPDATE raft_meta SET current_term=5 WHERE group_id=?", (g.gid,))

        def interrupting_write(conn, g, _):
            conn.execute("UPDATE raft_meta SET current_term=9 WHERE group_id=?", (g.gid,))
            raise KeyboardInterrupt

        def wait_queue(n):
            while s.kernel.pipeline.queued < n:
                threading.Event().wait(0.001)

        threads = [threading.Thread(target=run, args=("L", lambda: s.kernel.run("c", slow_check, lambda c, g, r: None)))]
        threads[0].start()
        in_first.wait(10)
        threads.append(threading.Thread(target=run, args=("F1", lambda: s.kernel.run("a", lambda g: None, term_write))))
        threads[1].start()
        wait_queue(2)
        threads.append(threading.Thread(target=run, args=("F2", lambda: s.kernel.run("b", lambda g: None,
                                                                             interrupting_write))))
        threads[2].start()
        wait_queue(3)
        release.set()
        for t in threads:
            t.join(10)
            assert not t.is_alive()
        assert results["L"] is None
        assert isinstance(results["F1"], KeyboardInterrupt), results  # F1 led batch 2: the interrupt is its
        assert isinstance(results["F2"], RaftSqliteError) and "nothing of it was written" in str(results["F2"])
        assert s.fault is None and s.kernel.conn.getautocommit()
        assert s.metadata("a").current_term == 0 and s.metadata("b").current_term == 0
        s.log("a").append(_entries(1, 2))
    with _reopened(data_dir) as s:
        assert s.log("a").last_index == 2
        assert s.metadata("a").current_term == 0 and s.metadata("b").current_term == 0


def test_follower_interrupted_while_waiting_does_not_stall_the_queue(data_dir, monkeypatch):
    """A follower whose wait is interrupted (KeyboardInterrupt in lock.acquire) must not leave its
    request in the queue unserved: it finishes the protocol (leads when handed the front), then
    re-raises the interrupt; every later writer proceeds."""
    import raft_sqlite.commit as store_mod

    real = store_mod._allocate_lock

    class InterruptOnce:
        def __init__(self):
            self.lock, self.calls = real(), 0

        def acquire(self, *a, **kw):
            self.calls += 1
            if self.calls == 2:  # the follower's blocking wait (the first acquire is made under the mutex)
                raise KeyboardInterrupt
            return self.lock.acquire(*a, **kw)

        def release(self):
            self.lock.release()

    with open_store(data_dir) as s:
        s.log("a"), s.log("b")
        in_leader, release = threading.Event(), threading.Event()

        def slow_check(g):
            in_leader.set()
            release.wait(10)

        results = {}

        def run(name, fn):
            try:
                results[name] = fn()
            except BaseException as exc:  # noqa: BLE001
                results[name] = exc

        lt = threading.Thread(target=run, args=("leader", lambda: s.kernel.run("a", slow_check, lambda c, g, r: None)))
        lt.start()
        in_leader.wait(10)
        monkeypatch.setattr(store_mod, "_allocate_lock", InterruptOnce)
        ft = threading.Thread(target=run, args=("follower", lambda: s.log("b").append(_entries(1, 2))))
        ft.start()
        while s.kernel.pipeline.queued < 2:
            threading.Event().wait(0.001)
        monkeypatch.setattr(store_mod, "_allocate_lock", real)
        release.set()
        lt.join(10)
        ft.join(10)
        assert not lt.is_alive() and not ft.is_alive()
        assert isinstance(results["follower"], KeyboardInterrupt), results
        later = threading.Thread(target=run, args=("later", lambda: s.log("a").append(_entries(1, 3))))
        later.start()
        later.join(10)
        assert not later.is_alive(), "the queue stalled behind the interrupted follower"
        assert results["later"] == 3 and s.fault is None
        assert s.log("b").last_index == 2  # the follower's write ran (its caller saw the interrupt)
    with _reopened(data_dir) as s:
        assert s.log("a").last_index == 3 and s.log("b").last_index == 2



@pytest.mark.parametrize("when", ["instead_of_acquire", "after_acquire", "after_passing_on"])
def test_followers_are_woken_in_a_chain_even_past_an_interrupted_one(data_dir, monkeypatch, when):
    """The leader wakes the first follower of its batch, each woken follower the next. A follower in the
    middle of the chain whose wait is interrupted still passes the wake-up on: every follower returns, each
    with its own answer, and the interrupted one re-raises the interrupt after its write committed. The
    interrupt may land instead of the wait, just after the wait returned (the lock taken: found by review,
    the follower then blocked forever on its own lock and stranded the rest of the chain), or just after
    the follower woke the next one (f3's lock raises in f2's thread once released)."""
    import raft_sqlite.commit as store_mod

    real = store_mod._allocate_lock

    class InterruptOnce:
        def __init__(self):
            self.lock, self.calls = real(), 0

        def acquire(self, *a, **kw):
            self.calls += 1
            if self.calls == 2 and when == "instead_of_acquire":  # the follower's blocking wait (the first
                raise KeyboardInterrupt                           # acquire is made under the mutex)
            got = self.lock.acquire(*a, **kw)
            if self.calls == 2 and when == "after_acquire":
                raise KeyboardInterrupt
            return got

        def release(self):
            self.lock.release()
            self.releases = getattr(self, "releases", 0) + 1
            if when == "after_passing_on" and self.releases == 1:  # once
                raise KeyboardInterrupt

        def locked(self):
            return self.lock.locked()

    with open_store(data_dir) as s:
        for n in ("lead", "f0", "f1", "f2", "f3", "f4"):
            s.log(n)
        in_leader, release = threading.Event(), threading.Event()

        def slow_check(g):
            in_leader.set()
            release.wait(10)

        results = {}

        def run(name, fn):
            try:
                results[name] = fn()
            except BaseException as exc:  # noqa: BLE001
                results[name] = exc

        lt = threading.Thread(target=run, args=("lead", lambda: s.kernel.run("lead", slow_check, lambda c, g, r: None)))
        lt.start()
        in_leader.wait(10)
        threads = []
        target = 3 if when == "after_passing_on" else 2  # the lock that interrupts (f2's thread either way)
        for k in range(5):  # queued one at a time: f0..f4 in this order, f2 gets the interrupted wait
            monkeypatch.setattr(store_mod, "_allocate_lock", InterruptOnce if k == target else real)
            name = f"f{k}"
            threads.append(threading.Thread(target=run, args=(name, lambda name=name: s.log(name).append(
                _entries(1, 2)))))
            threads[-1].start()
            while s.kernel.pipeline.queued < k + 2:
                threading.Event().wait(0.001)
        monkeypatch.setattr(store_mod, "_allocate_lock", real)
        release.set()
        for t in [lt, *threads]:
            t.join(10)
            assert not t.is_alive(), "a follower was never woken"
        assert isinstance(results.pop("f2"), KeyboardInterrupt)
        assert results == {"lead": None, "f0": 2, "f1": 2, "f3": 2, "f4": 2}
        assert s.kernel.pipeline.queued == 0 and s.fault is None
        assert s.stats.max_batch == 5  # f0..f4 shared the commit after the leader's
    with _reopened(data_dir) as s:
        assert all(s.log(f"f{k}").last_index == 2 for k in range(5))

def test_interrupt_just_after_a_lone_autocommit_insert_fail_stops(data_dir):
    """A lone single-row append is one autocommit statement: an interrupt arriving just after it
    returned finds the row committed. The outcome is unknown to the store, so it must fail-stop (not
    claim "nothing written", not replay the row); the reopen shows the truth."""
    with open_store(data_dir) as s:
        lg = s.log()
        lg.append(_entries(1, 1))
        conn = s.kernel.conn
        # an interrupt delivered right after the insert committed
        s.kernel.conn = _raising_conn(conn, KeyboardInterrupt(), after=True,
                                when=lambda sql, p: p is not None and sql.lstrip().upper().startswith("INSERT"))
        with pytest.raises(KeyboardInterrupt):
            lg.append([LogEntry(2, 1, b"committed")])
        assert s.fault is not None
        with pytest.raises(StorageFault):
            lg.append([LogEntry(3, 1, b"refused")])
        s.kernel.conn = conn
    with _reopened(data_dir) as s:
        assert s.log().last_index == 2 and s.log().get(2).data == b"committed"
