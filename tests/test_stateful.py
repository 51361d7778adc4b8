"""Hypothesis stateful test: log + metadata of several groups against an in-memory model, with random
reopens. CI runs >= 2,000 steps (STEPS x EXAMPLES); `-m slow` runs many more."""

import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from raft_sqlite import (EntryKind, LogConflictError, LogEntry, LogGapError, MetadataError, SegmentPolicy)
from tests.conftest import open_store

GROUPS = ["a", "b", "c"]
STATS = {"checks": 0}
POLICY = SegmentPolicy(max_entries=7, max_bytes=200)


class Model:
    def __init__(self):
        self.log = []  # list of (term, data, kind); index = position + 1
        self.term, self.vote, self.commit = 0, None, 0

    @property
    def last_term(self):
        return self.log[-1][0] if self.log else 0


class StoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="rsq-stateful-")
        self.store = open_store(os.path.join(self.dir, "n"), segment_policy=POLICY)
        self.models = {g: Model() for g in GROUPS}
        self.steps = 0

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _entries(self, g, start, terms, payloads):
        return [LogEntry(start + i, t, p, EntryKind(i % 3)) for i, (t, p) in enumerate(zip(terms, payloads))]

    @rule(g=st.sampled_from(GROUPS), n=st.integers(1, 6), bump=st.integers(0, 2), data=st.data())
    def append(self, g, n, bump, data):
        m = self.models[g]
        t0 = m.last_term + bump
        terms = sorted(data.draw(st.lists(st.integers(t0, t0 + 2), min_size=n, max_size=n)))
        payloads = data.draw(st.lists(st.binary(max_size=60), min_size=n, max_size=n))
        es = self._entries(g, len(m.log) + 1, terms, payloads)
        assert self.store.log(g).append(es) == len(m.log) + n
        m.log.extend((e.term, e.data, e.kind) for e in es)

    @rule(g=st.sampled_from(GROUPS), payloads=st.lists(st.binary(max_size=20), min_size=1, max_size=4))
    def append_next(self, g, payloads):
        m = self.models[g]
        assert self.store.log(g).append_next(m.last_term, payloads) == len(m.log) + len(payloads)
        m.log.extend((m.last_term, p, EntryKind.NORMAL) for p in payloads)

    @rule(g=st.sampled_from(GROUPS), offset=st.integers(-3, 3))
    def append_bad_index(self, g, offset):
        m = self.models[g]
        start = len(m.log) + 1 + offset
        if offset == 0 or start < 1:
            return
        exc = LogGapError if offset > 0 else LogConflictError
        with pytest.raises(exc):
            self.store.log(g).append([LogEntry(start, m.last_term + 1, b"bad")])

    @rule(g=st.sampled_from(GROUPS))
    def append_lower_term(self, g):
        m = self.models[g]
        if m.last_term == 0:
            return
        with pytest.raises(LogConflictError):
            self.store.log(g).append([LogEntry(len(m.log) + 1, m.last_term - 1, b"old")])

    @rule(g=st.sampled_from(GROUPS), back=st.integers(0, 8))
    def truncate_after(self, g, back):
        m = self.models[g]
        idx = max(0, len(m.log) - back)
        if idx < m.commit and idx < len(m.log):
            with pytest.raises(LogConflictError):
                self.store.log(g).truncate_after(idx)
        else:
            self.store.log(g).truncate_after(idx)
            del m.log[idx:]

    @rule(g=st.sampled_from(GROUPS), dterm=st.integers(-1, 2), vote=st.sampled_from([None, "n1", "n2", 3]))
    def term_and_vote(self, g, dterm, vote):
        m = self.models[g]
        term = max(0, m.term + dterm)
        md = self.store.metadata(g)
        ok = term > m.term or (term == m.term and (m.vote is None or (vote == m.vote and type(vote) is type(m.vote))))
        if term < m.term or not ok:
            with pytest.raises(MetadataError):
                md.set_term_and_vote(term, vote)
        else:
            md.set_term_and_vote(term, vote)
            if term > m.term or m.vote is None:
                m.term, m.vote = term, vote

    @rule(g=st.sampled_from(GROUPS), delta=st.integers(-2, 4))
    def commit(self, g, delta):
        m = self.models[g]
        idx = max(0, m.commit + delta)
        md = self.store.metadata(g)
        if idx < m.commit or idx > len(m.log):
            with pytest.raises(MetadataError):
                md.set_commit_index(idx)
        else:
            md.set_commit_index(idx)
            m.commit = idx

    @rule(g=st.sampled_from(GROUPS), payload=st.binary(max_size=30), fail=st.booleans())
    def transaction(self, g, payload, fail):
        m = self.models[g]
        s = self.store
        term = max(m.term, m.last_term) + 1
        try:
            with s.transaction():
                s.log(g).append([LogEntry(len(m.log) + 1, term, payload)])
                s.metadata(g).set_term_and_vote(term, "leader")
                s.metadata(g).set_commit_index(len(m.log) + 1)
                if fail:
                    raise KeyError("abort")
        except KeyError:
            return
        m.log.append((term, payload, EntryKind.NORMAL))
        m.term, m.vote, m.commit = term, "leader", len(m.log)

    @rule()
    def reopen(self):
        self.store.close()
        self.store = open_store(os.path.join(self.dir, "n"), segment_policy=POLICY)

    @invariant()
    def matches_model(self):
        STATS["checks"] += 1
        for g, m in self.models.items():
            lg, md = self.store.log(g), self.store.metadata(g)
            assert (lg.first_index, lg.last_index, lg.last_term) == (1, len(m.log), m.last_term)
            assert md.hard_state == (m.term, m.vote, m.commit)
            got = lg.entries(1, len(m.log) + 1)
            assert [(e.term, e.data, e.kind) for e in got] == m.log


def _run(examples, steps):
    from hypothesis.stateful import run_state_machine_as_test
    STATS["checks"] = 0
    run_state_machine_as_test(StoreMachine, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, suppress_health_check=list(HealthCheck)))
    return STATS["checks"]


def test_stateful_against_model():
    # the invariant runs after every step (and once at the start of each example)
    checks = _run(60, 50)
    print(f"stateful: {checks} model comparisons")
    assert checks >= 2000


@pytest.mark.slow
def test_stateful_long():
    assert _run(600, 100) >= 20000
