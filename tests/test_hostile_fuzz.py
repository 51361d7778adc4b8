"""Hypothesis fuzz of every public write/read method with hostile arguments, interleaved with valid
calls (project issue 11, slice h2). After each hostile call: only TypeError/ValueError/RaftSqliteError
(never StorageFault, OverflowError or an SQLite error) came out, and the next valid write succeeds. A
close+reopen (at random points and at the end of every example) must show exactly the model's state."""

import os
import shutil
import tempfile

import apsw
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from raft_sqlite import (
    EntryKind,
    FsyncMode,
    LogEntry,
    RaftSqliteError,
    SegmentPolicy,
    SnapshotKind,
    StorageFault,
    layout,
)
from tests.conftest import open_store

POLICY = SegmentPolicy(max_entries=5, max_bytes=300)


class UserBoom(Exception):
    """Raised by a user callback (a structure's snapshot()); may come out of the call that ran it."""


class Counter:
    """A tiny registered structure; ``fail`` makes snapshot() raise like a broken user callback."""

    def __init__(self, fail=False):
        self.value, self.fail = b"", fail

    def snapshot(self):
        if self.fail:
            raise UserBoom("snapshot() failed")
        return self.value

    def restore(self, data):
        self.value = bytes(data)


class HugeList(list):
    """A long list with a short repr (for readable failure reports)."""

    def __repr__(self):
        return f"HugeList(len={len(self)})"


INTS = st.sampled_from([0, 1, -1, 2, 2**31 - 1, 2**31, 2**40 - 1, 2**40, 2**40 + 1, 2**63 - 1, 2**63, 2**64,
                        -2**63, -2**63 - 1, 2**70]) | st.integers()
SCALARS = st.one_of(INTS, st.booleans(), st.floats(allow_nan=True, allow_infinity=True), st.none(),
                    st.text(max_size=4), st.binary(max_size=4), st.binary(max_size=4).map(bytearray),
                    st.binary(max_size=4).map(memoryview), st.sampled_from([EntryKind.CONFIG, SnapshotKind.FULL]))
WEIRD = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.just(HugeList([0] * 20_000)), st.just(object()))
ENTRY = st.builds(LogEntry, st.one_of(INTS, WEIRD), st.one_of(INTS, WEIRD), st.one_of(st.binary(max_size=8), WEIRD),
                  st.one_of(st.sampled_from(list(EntryKind)), WEIRD))
ENTRIES = st.one_of(st.lists(ENTRY, max_size=4), WEIRD, st.lists(WEIRD, max_size=3))

OK_ERRORS = (TypeError, ValueError, RaftSqliteError, UserBoom, KeyError)  # KeyError: unregister(unknown name)


def check_transition(old, new, refused: bool) -> None:
    """Assert that a call that took the store from ``old`` to ``new`` (each ``(first, log, term, vote,
    commit)``, log = [(term, data, kind), ...] from ``first``) lost nothing acknowledged. A refused call
    (it raised) must leave everything exactly as it was ("bad input writes nothing"; a transaction that
    raised is rolled back). A call that returned may only do what some valid call does: the term never goes
    back, a vote given in the current term stays, the commit index never goes back nor past the last index,
    the first index only moves up (compaction), and every entry up to the old commit index that is still
    above the first index is unchanged (a ``truncate_after`` or conflicting append only touches the
    uncommitted tail)."""
    if refused:
        assert new == old, f"a refused call changed the store: {_brief(old)} -> {_brief(new)}"
        return
    (f0, log0, t0, v0, c0), (f1, log1, t1, v1, c1) = old, new
    assert t1 >= t0, f"the term went back {t0} -> {t1}"
    assert t1 > t0 or v0 is None or v1 == v0, f"the vote of term {t0} changed {v0!r} -> {v1!r}"
    last1 = f1 + len(log1) - 1
    assert c0 <= c1 <= last1, f"commit index {c0} -> {c1} (last index {last1})"
    assert f1 >= f0, f"first index went back {f0} -> {f1}"
    for i in range(f1, c0 + 1):  # committed entries still in the log
        assert i <= last1, f"committed entry {i} is gone (last index {last1})"
        assert log1[i - f1] == log0[i - f0], f"committed entry {i} changed: {log0[i - f0]!r} -> {log1[i - f1]!r}"


def _brief(st):
    first, log, *rest = st
    return f"(first {first}, {len(log)} entries, term/vote/commit {rest})"


class HostileMachine(RuleBasedStateMachine):
    fsync = FsyncMode.OFF

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="rsq-hostile-")
        self.path = os.path.join(self.dir, "n")
        self._open()
        self.log, self.term, self.vote, self.commit, self.first = [], 0, None, 0, 1
        self.snapshot = (0, 0)

    def _open(self):
        self.store = open_store(self.path, segment_policy=POLICY, fsync=self.fsync)
        self.sm = self.store.state_machine()
        self.sm.register("c", Counter())

    def teardown(self):
        try:
            self._reopen_and_check()
        finally:
            self.store.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------ model
    @property
    def last(self):
        return self.first + len(self.log) - 1

    def _state(self):
        """What the store shows now: (first, [(term, data, kind)...], term, vote, commit, snapshot point)."""
        lg, hs = self.store.log(), self.store.metadata().hard_state
        log = [(e.term, e.data, e.kind) for e in lg.entries(lg.first_index, lg.last_index + 1)]
        snap = (lg.snapshot_index, lg.term(lg.snapshot_index) if lg.snapshot_index < lg.first_index else None)
        return lg.first_index, log, *hs, snap

    def _sync_model(self, refused: bool):
        """Take the state the store shows as the model, after checking it is one the call may leave behind
        (:func:`check_transition`): a hostile call may have succeeded (a weird but valid value), but no call
        may lose an acknowledged write, and a refused call may change nothing at all."""
        new = self._state()
        check_transition((self.first, self.log, self.term, self.vote, self.commit), new[:5], refused)
        self.first, self.log, self.term, self.vote, self.commit, self.snapshot = new

    def _check(self, s):
        lg = s.log()
        assert s.fault is None
        assert s.metadata().hard_state == (self.term, self.vote, self.commit)
        assert (lg.first_index, lg.last_index) == (self.first, self.last)
        got = [(e.term, e.data, e.kind) for e in lg.entries(lg.first_index, lg.last_index + 1)]
        assert got == self.log

    def _reopen_and_check(self):
        self.store.close()
        self._open()
        self._check(self.store)

    # ------------------------------------------------------------ hostile calls
    def _hostile(self, fn, *args):
        refused = False
        try:
            fn(*args)
        except OK_ERRORS as exc:
            assert not isinstance(exc, StorageFault), exc
            refused = True
        except (OverflowError, apsw.Error) as exc:  # pragma: no cover - the failure we look for
            raise AssertionError(f"{fn.__qualname__}{args!r:.200} raised {type(exc).__name__}: {exc}") from exc
        assert self.store.fault is None
        assert self.store.kernel.conn.getautocommit(), "a transaction was left open"
        self._sync_model(refused)
        self._probe()

    def _probe(self):
        """The next valid write succeeds (and is in the model)."""
        lg = self.store.log()
        if self.last < layout.MAX_INDEX:
            lt = lg.last_term
            assert lg.append_next(lt, [b"probe"]) == self.last + 1
            self.log.append((lt, b"probe", EntryKind.NORMAL))
        else:
            self.store.metadata().set_term_and_vote(self.term + 1, None)
            self.term, self.vote = self.term + 1, None

    @rule(entries=ENTRIES)
    def hostile_append(self, entries):
        self._hostile(self.store.log().append, entries)

    @rule(term=WEIRD, payloads=WEIRD, kind=WEIRD)
    def hostile_append_next(self, term, payloads, kind):
        self._hostile(self.store.log().append_next, term, payloads, kind)

    @rule(name=st.sampled_from(["get", "term", "truncate_after", "compact"]), i=WEIRD)
    def hostile_log_one_arg(self, name, i):
        self._hostile(getattr(self.store.log(), name), i)

    @rule(lo=WEIRD, hi=WEIRD, mb=WEIRD)
    def hostile_entries(self, lo, hi, mb):
        self._hostile(self.store.log().entries, lo, hi, mb)

    @rule(term=WEIRD, vote=WEIRD)
    def hostile_term_and_vote(self, term, vote):
        self._hostile(self.store.metadata().set_term_and_vote, term, vote)

    @rule(i=WEIRD)
    def hostile_commit(self, i):
        self._hostile(self.store.metadata().set_commit_index, i)

    @rule(index=WEIRD, term=WEIRD, data=WEIRD, install=st.booleans())
    def hostile_snapshot(self, index, term, data, install):
        mgr = self.store.snapshots()

        def go():
            w = (mgr.install if install else mgr.write)(index, term)
            with w:
                w.write(data)

        self._hostile(go)

    @rule(name=st.sampled_from(["retain", "open", "verify", "chain"]), arg=WEIRD)
    def hostile_snapshot_query(self, name, arg):
        self._hostile(getattr(self.store.snapshots(), name), arg)

    @rule(index=WEIRD, term=WEIRD, fail=st.booleans())
    def hostile_capture(self, index, term, fail):
        if fail:
            self.sm.register("bad", Counter(fail=True))
        try:
            self._hostile(self.sm.capture, index, term)
        finally:
            if fail:
                self.sm.unregister("bad")

    @rule(name=WEIRD, structure=st.one_of(WEIRD, st.just(Counter())))
    def hostile_register(self, name, structure):
        def go():
            self.sm.register(name, structure)
            self.sm.unregister(name)
        self._hostile(go)

    @rule(index=WEIRD, term=WEIRD, data=WEIRD)
    def hostile_sm_install(self, index, term, data):
        def go():
            with self.sm.install(index, term) as w:
                w.write(data)
        self._hostile(go)

    @rule(calls=st.lists(st.tuples(st.sampled_from(["append", "tv", "commit", "valid"]), WEIRD, WEIRD), max_size=4),
          abort=st.booleans())
    def hostile_transaction(self, calls, abort):
        s = self.store

        def go():
            with s.transaction():
                for what, a, b in calls:
                    try:
                        if what == "append":
                            s.log().append(a)
                        elif what == "tv":
                            s.metadata().set_term_and_vote(a, b)
                        elif what == "commit":
                            s.metadata().set_commit_index(a)
                        else:
                            s.log().append_next(s.log().last_term if s.log().last_index < layout.MAX_INDEX - 10
                                                else -1, [b"tx"])
                    except OK_ERRORS:
                        pass
                if abort:
                    raise ValueError("abort the transaction")

        self._hostile(go)

    # ------------------------------------------------------------ valid calls
    @rule(n=st.integers(1, 4), bump=st.integers(0, 1), data=st.binary(max_size=40))
    def valid_append(self, n, bump, data):
        if self.last + n > layout.MAX_INDEX:
            return
        t = (self.log[-1][0] if self.log else self.store.log().last_term) + bump
        if t > layout.MAX_TERM:  # a hostile call legitimately reached the highest term
            return
        es = [LogEntry(self.last + 1 + i, t, data + bytes([i]), EntryKind(i % 3)) for i in range(n)]
        assert self.store.log().append(es) == self.last + n
        self.log.extend((e.term, e.data, e.kind) for e in es)

    @rule(bump=st.integers(0, 2), vote=st.one_of(st.none(), st.text(max_size=3), st.integers(-5, 5)))
    def valid_term_and_vote(self, bump, vote):
        if (bump == 0 and self.vote is not None) or self.term + bump > layout.MAX_TERM:
            return  # (a hostile call may legitimately have reached the highest term)
        self.store.metadata().set_term_and_vote(self.term + bump, vote)
        self.term, self.vote = self.term + bump, vote

    @rule(data=st.data())
    def valid_commit(self, data):
        i = data.draw(st.integers(self.commit, self.last))
        self.store.metadata().set_commit_index(i)
        self.commit = i

    @rule()
    def valid_capture(self):
        if self.commit >= self.first and self.commit > self.snapshot[0]:
            self.sm.capture(self.commit, self.store.log().term(self.commit))

    @rule()
    def reopen(self):
        self._reopen_and_check()


class FullHostileMachine(HostileMachine):
    fsync = FsyncMode.FULL


def test_hostile_fuzz():
    run_state_machine_as_test(HostileMachine, settings=settings(
        max_examples=60, stateful_step_count=40, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]))


@pytest.mark.slow
def test_hostile_fuzz_long():
    run_state_machine_as_test(FullHostileMachine, settings=settings(
        max_examples=400, stateful_step_count=60, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]))




def test_transition_check_fires_on_loss():
    """The model check cannot be satisfied by a store that loses or rewrites acknowledged data."""
    e = [(1, b"a", EntryKind.NORMAL), (1, b"b", EntryKind.NORMAL), (2, b"c", EntryKind.NORMAL)]
    old = (1, e, 2, "n1", 2)
    check_transition(old, old, refused=True)
    check_transition(old, (1, e[:2] + [(3, b"x", EntryKind.NORMAL)], 3, None, 2), refused=False)  # tail replaced
    check_transition(old, (3, e[2:], 2, "n1", 2), refused=False)  # compaction
    for bad in [(1, e[:1], 2, "n1", 1),  # a committed entry and the commit index gone
                (1, e[:1] + [(1, b"B", EntryKind.NORMAL)] + e[2:], 2, "n1", 2),  # a committed entry rewritten
                (1, e, 1, "n1", 2),  # the term went back
                (1, e, 2, "n2", 2),  # a second vote in the term
                (1, e, 2, "n1", 1)]:  # the commit index went back
        with pytest.raises(AssertionError):
            check_transition(old, bad, refused=False)
    with pytest.raises(AssertionError, match="a refused call changed"):
        check_transition(old, (1, e + [(2, b"d", EntryKind.NORMAL)], 2, "n1", 2), refused=True)


def test_a_refused_call_that_wrote_anyway_fails_the_fuzz():
    """The machine itself: a hostile call that writes and then raises (as a store that does not validate
    first would) fails the run, where the old model sync adopted whatever the store showed."""
    m = HostileMachine()
    try:
        m.valid_append(3, 0, b"v")
        m.valid_term_and_vote(1, "n1")

        def writes_then_raises():
            m.store.metadata().set_term_and_vote(m.term + 1, None)
            raise ValueError("bad argument")

        with pytest.raises(AssertionError, match="a refused call changed the store"):
            m._hostile(writes_then_raises)
    finally:
        m.store.close()
        shutil.rmtree(m.dir, ignore_errors=True)
