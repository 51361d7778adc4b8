"""Hypothesis stateful tests: the log, metadata and snapshots of several groups against an in-memory model.

Two machines share every operation rule:

* :class:`StoreMachine`: fsync OFF, clean reopens (fast; many steps).
* :class:`CrashMachine`: FULL mode through a fault-injecting VFS; besides clean reopens it cuts the power
  (at one of the next few syncs during an operation, or right after acknowledged operations), writes what
  reached the disk ("lose" or "subset"), reopens that image with the normal VFS under STRICT recovery and
  runs ``verify``: every acknowledged operation must be there; the one in flight may or may not be.

Rules: valid appends (``append``/``append_next``), invalid batches (gaps, repeated indexes, term drops inside
or against the log, out-of-range or wrongly typed fields, anywhere in the batch; alone or inside a
transaction), ``truncate_after``, term/vote and commit index, local snapshots, compaction, InstallSnapshot
(keeping or discarding the log), multi-group transactions that succeed or fail half-way (an invalid write to
a later group, a user exception, a snapshot attempted inside the transaction), and reopens. After every step
the store must equal the model, including reads below ``first_index`` and above ``last_index``.

CI runs ``test_stateful_against_model`` (60 x 50 steps) and ``test_stateful_crash`` (FULL, 16 x 25 steps);
``-m slow`` runs many more of both. Each run prints how often every rule, failure kind and crash outcome ran
and asserts that each new rule ran at least once; deterministic tests run every invalid batch kind and every
way a transaction ends, and others show that the model and crash checks fail on a store that misbehaves.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import itertools
import os
import shutil
import tempfile

import apsw
import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from raft_sqlite import (
    CompactionError,
    EntryKind,
    FsyncMode,
    LogCompactedError,
    LogConflictError,
    LogEntry,
    LogGapError,
    LogUnavailableError,
    MetadataError,
    RaftSqliteError,
    RecoveryPolicy,
    SegmentPolicy,
    SnapshotError,
    fsio,
)
from raft_sqlite.layout import MAX_INDEX, MAX_TERM
from raft_sqlite.verify import verify
from tests.conftest import open_store
from tests.support.faultvfs import FaultVFS, quiet_injected_faults

GROUPS = ["a", "b", "c"]
POLICY = SegmentPolicy(max_entries=7, max_bytes=200)  # small segments: compaction deletes whole ones
#: how often each rule / failure kind / crash outcome ran (printed and checked by the tests)
STATS: collections.Counter = collections.Counter()

#: invalid batch kinds and the error each must raise (nothing of the batch may be written)
INVALID_BATCHES = {
    "gap_inside": LogGapError, "repeat_inside": LogGapError, "term_drop_inside": LogConflictError,
    "gap_at_start": LogGapError, "overlap_at_start": LogConflictError, "term_below_log": LogConflictError,
    "index_zero": ValueError, "index_too_big": ValueError, "term_negative": ValueError,
    "term_too_big": ValueError, "index_not_int": TypeError, "data_not_bytes": TypeError,
    "kind_unknown": ValueError, "not_an_entry": TypeError, "entry_not_in_a_list": TypeError,
}
#: how a multi-group transaction ends: committed, or aborted by the error raised inside it
TX_ENDS = ("commit", "user_error", "bad_append", "bad_term", "bad_commit", "bad_type", "snapshot_inside",
           "caught_bad_write")


class GroupModel:
    """What one group must hold: entries ``first..last`` (index -> (term, data, kind)), the last term (the
    snapshot's when the log was discarded by an install), the newest snapshot and the hard state."""

    def __init__(self):
        self.first, self.last, self.last_term = 1, 0, 0
        self.ents: dict[int, tuple] = {}
        self.snap, self.snap_data = (0, 0), None
        self.term, self.vote, self.commit = 0, None, 0

    def term_at(self, i: int) -> int:
        if i == self.snap[0] and i < self.first:
            return self.snap[1]
        return self.ents[i][0]

    def append(self, es) -> None:
        for e in es:
            self.ents[e.index] = (e.term, e.data, EntryKind(e.kind))
        self.last, self.last_term = es[-1].index, es[-1].term

    def truncate_after(self, i: int) -> None:
        for k in range(i + 1, self.last + 1):
            del self.ents[k]
        self.last, self.last_term = i, self.term_at(i) if i >= 1 else 0

    def compact(self, up_to: int) -> None:
        for k in range(self.first, up_to + 1):
            del self.ents[k]
        self.first = up_to + 1

    def state(self) -> tuple:
        return (self.first, self.last, self.last_term, self.snap, self.snap_data, (self.term, self.vote, self.commit),
                sorted(self.ents.items()))


def store_state(store, g: str) -> tuple:
    """The same tuple as :meth:`GroupModel.state`, read from the store's public API."""
    lg, md, mgr = store.log(g), store.metadata(g), store.snapshots(g)
    meta = mgr.latest()
    snap, data = (0, 0), None
    if meta is not None:
        snap = (meta.index, meta.term)
        with mgr.open(meta) as r:
            data = r.read()
    ents = lg.entries(lg.first_index, lg.last_index + 1)
    return (lg.first_index, lg.last_index, lg.last_term, snap, data, tuple(md.hard_state),
            [(e.index, (e.term, e.data, e.kind)) for e in ents])


def _entries(start: int, terms, payloads) -> list[LogEntry]:
    return [LogEntry(start + i, t, p, EntryKind(i % 3)) for i, (t, p) in enumerate(zip(terms, payloads))]


class Base(RuleBasedStateMachine):
    """Every operation rule. Valid operations build the expected model first (``self.pending``), then call
    the store, then adopt it: an operation cut by a crash leaves ``pending`` as the "it was durable" outcome."""

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="rsq-stateful-")
        self.models = {g: GroupModel() for g in GROUPS}
        self.pending: dict | None = None
        self.store = self._open_first()

    # hooks of the two machines
    def _open_first(self):
        raise NotImplementedError

    def _release_vfs(self):
        """Uninstall the VFS's file-system backend and unregister the VFS (idempotent)."""
        fs, self._fs = getattr(self, "_fs", None), None
        if fs is not None:
            fs.__exit__(None, None, None)
        self.vfs.unregister()

    def _clean_reopen(self):
        """Close the store and open it again (no crash)."""
        raise NotImplementedError

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _expect(self) -> dict:
        """A copy of the models to mutate into the expected outcome of the operation about to run."""
        self.pending = copy.deepcopy(self.models)
        return self.pending

    def _done(self) -> None:
        self.models, self.pending = self.pending, None

    # ------------------------------------------------------------------ log writes
    def op_append(self, g, bump, terms, payloads):
        new = self._expect()
        m = new[g]
        t0 = m.last_term + bump
        es = _entries(m.last + 1, sorted(t0 + t for t in terms), payloads)
        m.append(es)
        assert self.store.log(g).append(es) == m.last
        self._done()

    @rule(g=st.sampled_from(GROUPS), n=st.integers(1, 12), bump=st.integers(0, 2), data=st.data())
    def append(self, g, n, bump, data):
        STATS["append"] += 1
        terms = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
        payloads = data.draw(st.lists(st.binary(max_size=60), min_size=n, max_size=n))
        self.op_append(g, bump, terms, payloads)

    @rule(g=st.sampled_from(GROUPS), payloads=st.lists(st.binary(max_size=20), min_size=1, max_size=4))
    def append_next(self, g, payloads):
        STATS["append_next"] += 1
        new = self._expect()
        m = new[g]
        t = m.last_term
        m.append(_entries(m.last + 1, [t] * len(payloads), payloads))
        for i in range(m.last - len(payloads) + 1, m.last + 1):  # append_next writes NORMAL entries
            m.ents[i] = (t, m.ents[i][1], EntryKind.NORMAL)
        assert self.store.log(g).append_next(t, payloads) == m.last
        self._done()

    def _invalid_batch(self, m: GroupModel, kind: str, n: int, pos: int):
        """A batch that would follow the log, broken as ``kind`` says (at ``pos`` when it is inside)."""
        t0 = m.last_term + 1
        es = _entries(m.last + 1, [t0] * n, [b"x%d" % i for i in range(n)])
        pos = pos % n
        inner = max(pos, 1)  # an error "inside" needs a predecessor
        if kind in ("gap_inside", "repeat_inside", "term_drop_inside") and n < 2:
            es.append(LogEntry(es[-1].index + 1, t0, b"y"))
        if kind == "gap_inside":
            es = es[:inner] + [e._replace(index=e.index + 1) for e in es[inner:]]
        elif kind == "repeat_inside":
            es = es[:inner] + [e._replace(index=e.index - 1) for e in es[inner:]]
        elif kind == "term_drop_inside":
            es = es[:inner] + [e._replace(term=t0 - 1) for e in es[inner:]]
        elif kind == "gap_at_start":
            es = [e._replace(index=e.index + 1 + pos) for e in es]
        elif kind == "overlap_at_start":
            back = 1 + pos % max(m.last, 1)
            if m.last < 1:
                return None
            es = [e._replace(index=e.index - back) for e in es]
        elif kind == "term_below_log":
            if m.last_term < 1:
                return None
            es = [e._replace(term=m.last_term - 1) for e in es]
        elif kind == "index_zero":
            es[0] = es[0]._replace(index=0)
        elif kind == "index_too_big":
            es[pos] = es[pos]._replace(index=MAX_INDEX + 1 + pos)
        elif kind == "term_negative":
            es[pos] = es[pos]._replace(term=-1)
        elif kind == "term_too_big":
            es[pos] = es[pos]._replace(term=MAX_TERM + 1)
        elif kind == "index_not_int":
            es[pos] = es[pos]._replace(index=float(es[pos].index))
        elif kind == "data_not_bytes":
            es[pos] = es[pos]._replace(data="text")
        elif kind == "kind_unknown":
            es[pos] = es[pos]._replace(kind=7)
        elif kind == "not_an_entry":
            es[pos] = {"index": es[pos].index, "term": t0}
        elif kind == "entry_not_in_a_list":
            es = es[0]
        return es

    @rule(g=st.sampled_from(GROUPS), kind=st.sampled_from(sorted(INVALID_BATCHES)), n=st.integers(1, 12),
          pos=st.integers(0, 11), in_tx=st.booleans(), reopen=st.sampled_from([False, False, True]))
    def invalid_batch(self, g, kind, n, pos, in_tx, reopen):
        """The typed error, and nothing of the batch written (the invariant compares, after a reopen too)."""
        es = self._invalid_batch(self.models[g], kind, n, pos)
        if es is None:
            return
        STATS["invalid_batch"] += 1
        STATS[f"invalid_batch:{kind}"] += 1
        with pytest.raises(INVALID_BATCHES[kind]):
            if in_tx:
                with self.store.transaction():
                    self.store.log(g).append(es)
            else:
                self.store.log(g).append(es)
        if reopen:
            self._clean_reopen()

    @rule(g=st.sampled_from(GROUPS), bad=st.sampled_from(["term_below", "not_bytes", "kind"]))
    def invalid_append_next(self, g, bad):
        m = self.models[g]
        if bad == "term_below" and m.last_term < 1:
            return
        STATS["invalid_append_next"] += 1
        lg = self.store.log(g)
        if bad == "term_below":
            with pytest.raises(LogConflictError):
                lg.append_next(m.last_term - 1, [b"p"])
        elif bad == "not_bytes":
            with pytest.raises(TypeError):
                lg.append_next(m.last_term, [b"ok", 5])
        else:
            with pytest.raises(ValueError):
                lg.append_next(m.last_term, [b"p"], kind=9)

    @rule(g=st.sampled_from(GROUPS), back=st.integers(0, 8))
    def truncate_after(self, g, back):
        m = self.models[g]
        idx = max(0, m.last - back)
        STATS["truncate_after"] += 1
        if idx < m.commit and idx < m.last:
            STATS["truncate_after:refused"] += 1
            with pytest.raises(LogConflictError):
                self.store.log(g).truncate_after(idx)
            return
        new = self._expect()
        if idx < new[g].last:
            new[g].truncate_after(idx)
        self.store.log(g).truncate_after(idx)
        self._done()

    # ------------------------------------------------------------------ metadata
    @staticmethod
    def _vote_ok(m: GroupModel, term: int, vote) -> bool:
        return term > m.term or (term == m.term and (m.vote is None or (vote == m.vote and type(vote) is type(m.vote))))

    def op_term_and_vote(self, g, term, vote):
        new = self._expect()
        m = new[g]
        if term > m.term or m.vote is None:
            m.term, m.vote = term, vote
        self.store.metadata(g).set_term_and_vote(term, vote)
        self._done()

    @rule(g=st.sampled_from(GROUPS), dterm=st.integers(-1, 2), vote=st.sampled_from([None, "n1", "n2", 3]))
    def term_and_vote(self, g, dterm, vote):
        STATS["term_and_vote"] += 1
        m = self.models[g]
        term = max(0, m.term + dterm)
        if term < m.term or not self._vote_ok(m, term, vote):
            STATS["term_and_vote:refused"] += 1
            with pytest.raises(MetadataError):
                self.store.metadata(g).set_term_and_vote(term, vote)
        else:
            self.op_term_and_vote(g, term, vote)

    def op_commit(self, g, idx):
        new = self._expect()
        new[g].commit = idx
        self.store.metadata(g).set_commit_index(idx)
        self._done()

    @rule(g=st.sampled_from(GROUPS), delta=st.integers(-2, 6))
    def commit(self, g, delta):
        STATS["commit"] += 1
        m = self.models[g]
        idx = max(0, m.commit + delta)
        if idx < m.commit or idx > m.last:
            STATS["commit:refused"] += 1
            with pytest.raises(MetadataError):
                self.store.metadata(g).set_commit_index(idx)
        else:
            self.op_commit(g, idx)

    # ------------------------------------------------------------------ snapshots and compaction
    @staticmethod
    def _snapshot_points(m: GroupModel) -> list[int]:
        """Indexes a local snapshot may be taken at: committed, held (or the snapshot's own), not older."""
        pts = [i for i in range(max(m.snap[0], m.first), m.commit + 1) if i >= 1]
        if m.snap[0] >= 1 and m.snap[0] < m.first:
            pts.insert(0, m.snap[0])
        return pts

    def op_snapshot(self, g, i, payload):
        new = self._expect()
        m = new[g]
        m.snap, m.snap_data = (i, m.term_at(i)), payload
        with self.store.snapshots(g).write(i, m.snap[1]) as w:
            w.write(payload)
        self._done()

    @rule(g=st.sampled_from(GROUPS), pick=st.integers(0, 1000), payload=st.binary(max_size=300))
    def snapshot(self, g, pick, payload):
        pts = self._snapshot_points(self.models[g])
        if not pts:
            return
        STATS["snapshot"] += 1
        self.op_snapshot(g, pts[-1 - pick % min(len(pts), 4)], payload)  # mostly near the commit index

    @rule(g=st.sampled_from(GROUPS), bad=st.sampled_from(["uncommitted", "wrong_term", "older"]))
    def invalid_snapshot(self, g, bad):
        m = self.models[g]
        if bad == "uncommitted":
            i, t = m.commit + 1, m.last_term
        elif bad == "wrong_term":
            pts = self._snapshot_points(m)
            if not pts:
                return
            i = pts[-1]
            t = m.term_at(i) + 1
        else:  # below the newest snapshot (compacted or not)
            if m.snap[0] < 2:
                return
            i = m.snap[0] - 1
            t = m.term_at(i) if i >= m.first else 0
        STATS["invalid_snapshot"] += 1
        STATS[f"invalid_snapshot:{bad}"] += 1
        with pytest.raises(SnapshotError):  # noqa: SIM117 (the machine's source seeds derandomize: keep it)
            with self.store.snapshots(g).write(i, t) as w:
                w.write(b"never")

    def op_compact(self, g, up_to):
        new = self._expect()
        if up_to >= new[g].first:
            new[g].compact(up_to)
        self.store.log(g).compact(up_to)
        self._done()

    @rule(g=st.sampled_from(GROUPS), back=st.integers(0, 5), beyond=st.sampled_from([0, 0, 0, 1, 3]))
    def compact(self, g, back, beyond):
        m = self.models[g]
        if beyond:
            up_to = max(m.snap[0], m.first - 1) + beyond  # not covered by a durable snapshot
            STATS["compact:refused"] += 1
            with pytest.raises(CompactionError):
                self.store.log(g).compact(up_to)
            return
        STATS["compact"] += 1
        self.op_compact(g, max(0, m.snap[0] - back))

    def _install_outcome(self, m: GroupModel, i: int, t: int) -> str:
        if i <= m.snap[0]:
            return "refused_older"
        at = m.term_at(i) if m.first <= i <= m.last else None
        if at == t:
            return "keep_suffix"
        return "refused_committed" if i < m.commit else "discard_log"

    def op_install(self, g, i, t, payload):
        new = self._expect()
        m = new[g]
        keep = self._install_outcome(m, i, t) == "keep_suffix"
        m.snap, m.snap_data = (i, t), payload
        m.commit = max(m.commit, i)
        if keep:
            m.compact(i)
        else:
            m.ents, m.first, m.last, m.last_term = {}, i + 1, i, t
        with self.store.snapshots(g).install(i, t) as w:
            w.write(payload, offset=0)
        self._done()

    @rule(g=st.sampled_from(GROUPS), near=st.sampled_from(["last", "commit"]), rel=st.integers(-3, 4),
          same_term=st.booleans(), dterm=st.integers(0, 2), payload=st.binary(max_size=200))
    def install(self, g, near, rel, same_term, dterm, payload):
        """A leader's InstallSnapshot around the end of the log or the commit index: keeps the log after a
        matching entry, discards it otherwise; refused below the newest snapshot or against committed entries."""
        m = self.models[g]
        i = max(1, (m.last if near == "last" else m.commit) + rel)
        t = m.term_at(i) if same_term and m.first <= i <= m.last else m.last_term + dterm
        out = self._install_outcome(m, i, t)
        STATS["install"] += 1
        STATS[f"install:{out}"] += 1
        if out.startswith("refused"):
            with pytest.raises(SnapshotError):  # noqa: SIM117 (as above)
                with self.store.snapshots(g).install(i, t) as w:
                    w.write(payload, offset=0)
            return
        self.op_install(g, i, t, payload)

    # ------------------------------------------------------------------ transactions
    def op_transaction(self, gs, payloads, end, user_error=KeyError):
        """One transaction over groups ``gs``: each gets one entry of a new term, that term with a vote and
        its commit index moved to the new entry; ``end`` decides how it finishes (see TX_ENDS)."""
        s = self.store
        new = self._expect()
        for g, p in zip(gs, payloads):
            m = new[g]
            t = max(m.term, m.last_term) + 1
            m.append([LogEntry(m.last + 1, t, p)])
            m.term, m.vote, m.commit = t, "leader", m.last
        aborts = end not in ("commit", "caught_bad_write")
        last = gs[-1]  # the failure comes after every valid write, in the last group touched

        def bad_write():
            m = new[last]
            if end in ("bad_append", "caught_bad_write"):
                s.log(last).append([LogEntry(m.last + 2, m.last_term, b"gap")])
            elif end == "bad_term":
                s.metadata(last).set_term_and_vote(m.term - 1, None)
            elif end == "bad_commit":
                s.metadata(last).set_commit_index(m.last + 1)
            elif end == "bad_type":
                s.log(last).append([LogEntry(m.last + 1, m.last_term, "not bytes")])
            elif end == "snapshot_inside":
                s.snapshots(last).write(m.commit, m.last_term).begin()
            else:
                raise user_error("abort")

        expected = {"bad_append": LogGapError, "caught_bad_write": LogGapError, "bad_term": MetadataError,
                    "bad_commit": MetadataError, "bad_type": TypeError, "snapshot_inside": SnapshotError,
                    "user_error": user_error}.get(end)
        def run():
            with s.transaction():
                for g, p in zip(gs, payloads):
                    m = self.models[g]
                    t = new[g].term
                    s.log(g).append([LogEntry(m.last + 1, t, p)])
                    s.metadata(g).set_term_and_vote(t, "leader")
                    s.metadata(g).set_commit_index(m.last + 1)
                if end == "caught_bad_write":
                    with pytest.raises(LogGapError):  # the bad call is refused and not added; the rest commits
                        bad_write()
                elif aborts:
                    bad_write()

        if aborts:
            with pytest.raises(expected):
                run()
            self.pending = None  # nothing of it was written: the models stay as they are
            return
        run()
        self._done()

    @rule(gs=st.lists(st.sampled_from(GROUPS), min_size=1, max_size=3, unique=True),
          payloads=st.lists(st.binary(max_size=30), min_size=3, max_size=3), end=st.sampled_from(TX_ENDS),
          reopen=st.sampled_from([False, False, True]))
    def transaction(self, gs, payloads, end, reopen):
        STATS["transaction"] += 1
        STATS[f"transaction:{end}"] += 1
        if len(gs) > 1:
            STATS["transaction:multi:" + ("commit" if end in ("commit", "caught_bad_write") else "abort")] += 1
        self.op_transaction(gs, payloads, end)
        if reopen:
            self._clean_reopen()

    # ------------------------------------------------------------------ checks
    @invariant()
    def matches_model(self):
        STATS["checks"] += 1
        for g, m in self.models.items():
            assert store_state(self.store, g) == m.state(), g
            lg = self.store.log(g)
            # reads outside first..last answer with the contract's errors
            assert lg.term(m.snap[0]) == m.snap[1]
            if m.first > 1:
                with pytest.raises(LogCompactedError):
                    lg.get(m.first - 1)
                with pytest.raises(LogCompactedError):
                    lg.entries(m.first - 1, m.last + 1)
                if m.first - 1 != m.snap[0]:
                    with pytest.raises(LogCompactedError):
                        lg.term(m.first - 1)
            with pytest.raises(LogUnavailableError):
                lg.get(m.last + 1)
            with pytest.raises(LogUnavailableError):
                lg.entries(m.first, m.last + 2)


class StoreMachine(Base):
    """fsync OFF, clean reopens under STRICT recovery."""

    def _open_first(self):
        return open_store(os.path.join(self.dir, "n"), segment_policy=POLICY, recovery=RecoveryPolicy.STRICT)

    def _clean_reopen(self):
        STATS["reopen"] += 1
        self.store.close()
        self.store = self._open_first()

    @rule()
    def reopen(self):
        self._clean_reopen()


# ---------------------------------------------------------------------------------------------- crashes
_vfs_names = itertools.count()
_TEMPLATE: dict[str, str] = {}


def _template() -> str:
    """A freshly created store, closed (creation runs alembic outside any apsw VFS: copies of this one are
    what the fault VFS opens)."""
    if "path" not in _TEMPLATE:
        path = os.path.join(tempfile.mkdtemp(prefix="rsq-stateful-tmpl-"), "n")
        open_store(path, fsync=FsyncMode.FULL).close()
        _TEMPLATE["path"] = path
    return _TEMPLATE["path"]


#: operations that may be cut by a crash (valid ones only: their outcome is known if they return)
CRASH_OPS = ("append", "commit", "term_and_vote", "transaction", "snapshot", "compact", "install")


class CrashMachine(Base):
    """FULL mode through a FaultVFS; crashes instead of clean reopens."""

    FSYNC = FsyncMode.FULL
    KEEP_MARK = True  # whether a crash image may keep the live raft.db-hwm (drawn per crash)
    MODES = ("lose", "subset")  # what reached the disk (see FaultVFS.write_crash_image)

    def _open_live(self, path):
        self.live = path
        self.vfs = FaultVFS(f"stateful{os.getpid()}_{next(_vfs_names)}", root=path)
        # the files the library writes itself (raft.db-hwm, directory syncs) go through the same model
        self._fs = fsio.installed(self.vfs.fs)
        self._fs.__enter__()
        return open_store(path, fsync=self.FSYNC, vfs=self.vfs.name, segment_policy=POLICY,
                          recovery=RecoveryPolicy.STRICT)

    def _open_first(self):
        self.generation = 0
        return self._open_live(shutil.copytree(_template(), os.path.join(self.dir, "g0")))

    def _clean_reopen(self):
        STATS["reopen"] += 1
        self.store.close()
        self._release_vfs()
        self.store = self._open_live(self.live)  # a fresh FaultVFS: what exists now counts as durable

    def teardown(self):
        # after a failure the store may be closed or fail-stopped and the VFS gone: clean up what is left
        with quiet_injected_faults(), contextlib.suppress(Exception):
            self.store.close()
        with contextlib.suppress(Exception):
            self._release_vfs()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _run_crash_op(self, op, g, data, arm):
        """Run one valid operation ``op`` on group ``g`` (arguments drawn from ``data``); ``arm()`` arms the
        crash just before it. A compaction first gets (unarmed, acknowledged) entries enough for a whole
        segment, a commit index and a snapshot to compact to: its first commit moves ``first_index``, the
        next ones delete whole segments, so a cut at its second sync or later finds it durable though it
        never returned (the in-flight operation's "it happened" outcome)."""
        if op == "compact":
            if self.models[g].last - self.models[g].first < 2 * POLICY.max_entries:
                self.op_append(g, 0, [0] * 2 * POLICY.max_entries, [b"s"] * 2 * POLICY.max_entries)
            if self.models[g].commit < self.models[g].last:
                self.op_commit(g, self.models[g].last)
            pts = self._snapshot_points(self.models[g])
            if pts and pts[-1] > self.models[g].snap[0]:
                self.op_snapshot(g, pts[-1], b"to compact to")
        arm()
        m = self.models[g]
        if op == "append":
            n = data.draw(st.integers(1, 10))
            self.op_append(g, data.draw(st.integers(0, 1)), [0] * n, [b"c%d" % i for i in range(n)])
        elif op == "commit":
            self.op_commit(g, m.last)
        elif op == "term_and_vote":
            self.op_term_and_vote(g, m.term + 1, data.draw(st.sampled_from([None, "n2"])))
        elif op == "transaction":
            gs = data.draw(st.lists(st.sampled_from(GROUPS), min_size=1, max_size=3, unique=True))
            self.op_transaction(gs, [b"t1", b"t2", b"t3"], "commit")
        elif op == "snapshot":
            pts = self._snapshot_points(m)
            if pts:
                self.op_snapshot(g, pts[-1], data.draw(st.binary(min_size=1, max_size=300)))
        elif op == "compact":
            self.op_compact(g, m.snap[0])
        elif op == "install":
            i = m.last + data.draw(st.integers(1, 3))
            self.op_install(g, i, m.last_term + 1, b"installed")

    @rule(at_sync=st.sampled_from([1, 1, 2, 3, 5]), op=st.sampled_from(CRASH_OPS), g=st.sampled_from(GROUPS),
          mode=st.integers(0, 1), seed=st.integers(0, 2 ** 16), keep_mark=st.booleans(), data=st.data())
    def crash_during(self, at_sync, op, g, mode, seed, keep_mark, data):
        self.crash("during", at_sync, op, g, mode, seed, keep_mark, data)

    @rule(op=st.sampled_from(CRASH_OPS), g=st.sampled_from(GROUPS), mode=st.integers(0, 1),
          seed=st.integers(0, 2 ** 16), keep_mark=st.booleans(), data=st.data())
    def crash_after(self, op, g, mode, seed, keep_mark, data):
        self.crash("after", 0, op, g, mode, seed, keep_mark, data)

    def crash(self, when, at_sync, op, g, mode, seed, keep_mark, data):
        """Power cut during ``op`` (at its ``at_sync``-th sync, if it syncs that often) or right after it:
        every acknowledged operation must be in the image; ``op`` itself may be there only if it did not
        return. STRICT open and ``verify`` must accept the image."""
        STATS["crash"] += 1
        STATS[f"crash:{when}:{op}"] += 1
        STATS[f"crash:{op}"] += 1

        def arm():
            if when == "during":
                self.vfs.arm_crash(at_sync=at_sync)
        inflight = None
        with quiet_injected_faults():
            try:
                self._run_crash_op(op, g, data, arm)
            except (RaftSqliteError, apsw.Error):
                if not self.vfs.crashed:
                    raise
                inflight = self.pending
            self.pending = None
            STATS["crash:cut_in_op" if self.vfs.crashed else "crash:cut_after_acks"] += 1
            self.generation += 1
            img = os.path.join(self.dir, f"g{self.generation}")
            os.makedirs(img, mode=0o700)
            mode = self.MODES[mode % len(self.MODES)]
            keep_mark = keep_mark and self.KEEP_MARK
            STATS[f"crash:image:{mode}" + (":mark" if keep_mark else "")] += 1
            written = self.vfs.write_crash_image(img, mode=mode, seed=seed)
            # raft.db-hwm goes through fsio, so the image holds it as the model says (durable, lost or torn);
            # "no mark" additionally removes it (the evidence gone: FULL must still have lost nothing)
            mark = os.path.join(img, "raft.db-hwm")
            if not keep_mark and os.path.exists(mark):
                os.unlink(mark)
                written = [f for f in written if os.path.abspath(f) != os.path.abspath(mark)]
            for f in written:  # the store's own modes (else every open warns that it tightened them)
                os.chmod(f, 0o600)
            try:  # noqa: SIM105 (as above)
                self.store.close()
            except (RaftSqliteError, apsw.Error):
                pass  # a crashed store may fail to close; the image is already written
        self._release_vfs()
        shutil.rmtree(self.live, ignore_errors=True)
        s = open_store(img, fsync=self.FSYNC, segment_policy=POLICY, recovery=RecoveryPolicy.STRICT)
        try:
            got = {g2: store_state(s, g2) for g2 in GROUPS}
        finally:
            s.close()
        acked = {g2: m.state() for g2, m in self.models.items()}
        if got != acked:
            assert inflight is not None, f"acknowledged writes lost or changed: {got} != {acked}"
            assert got == {g2: m.state() for g2, m in inflight.items()}, "neither before nor after the cut op"
            self.models = inflight
            STATS["crash:inflight_durable"] += 1
        elif inflight is not None:
            STATS["crash:inflight_lost"] += 1
        rep = verify(img)
        assert rep.ok, [str(p) for p in rep.problems]
        self.store = self._open_live(img)


# ---------------------------------------------------------------------------------------------- runs
#: Health checks: none is suppressed. (The old test suppressed all of them; none fires at these sizes.)
def _run(machine, examples, steps, **kw):
    """Run ``machine``; returns the STATS of the run (also printed). The CI tests pass ``derandomize``: the
    same examples every run, so the "every rule ran" assertions cannot flake; the slow ones explore anew."""
    STATS.clear()
    run_state_machine_as_test(machine, settings=settings(max_examples=examples, stateful_step_count=steps,
                                                         deadline=None, **kw))
    print(f"\n{machine.__name__}: " + ", ".join(f"{k}={v}" for k, v in sorted(STATS.items())))
    return STATS.copy()


NEW_RULES = ["invalid_batch", "invalid_append_next", "snapshot", "invalid_snapshot", "compact", "compact:refused",
             "install", "install:keep_suffix", "install:discard_log", "transaction"]


def test_stateful_against_model():
    # the invariant runs after every step (and once at the start of each example)
    stats = _run(StoreMachine, 60, 50, derandomize=True)
    assert stats["checks"] >= 2000
    # every kind of invalid batch and every transaction end also runs in the deterministic tests below
    for name in NEW_RULES + ["reopen", "transaction:multi:commit", "transaction:multi:abort"]:
        assert stats[name] >= 1, f"{name} never ran"


def test_stateful_crash():
    stats = _run(CrashMachine, 24, 25, derandomize=True)
    assert stats["checks"] >= 250
    # "crash:inflight_durable" (a crash after an op's data became durable, before it returned) is required by
    # test_stateful_crash_long only: since the commit path stopped syncing for checkpoints (issue 13) this
    # short run reaches it when run alone (15 times) but not inside the whole suite, whose history diverges
    # for a reason not found yet (see the issue-13 note)
    for name in ["crash", "crash:cut_in_op", "crash:cut_after_acks", "crash:inflight_lost",
                 "crash:image:lose", "crash:image:subset", "crash:image:subset:mark", "snapshot", "compact",
                 "install", "transaction", "invalid_batch"] + [f"crash:{op}" for op in CRASH_OPS]:
        assert stats[name] >= 1, f"{name} never ran"


@pytest.mark.slow
def test_stateful_long():
    assert _run(StoreMachine, 600, 100)["checks"] >= 20000


@pytest.mark.slow
def test_stateful_crash_long():
    stats = _run(CrashMachine, 150, 50)
    assert stats["crash"] >= 300 and stats["crash:inflight_durable"] >= 1 and stats["crash:inflight_lost"] >= 1


@pytest.mark.parametrize("kind", sorted(INVALID_BATCHES))
def test_every_invalid_batch_kind(kind):
    """Each kind, in a short batch (checked entry by entry) and a long one (the fast path first), at the start,
    in the middle and at the end, alone and in a transaction: the typed error, and nothing written (also after
    a reopen). The stateful test mixes the same kinds into random histories."""
    m = StoreMachine()
    try:
        m.op_append("a", 1, [0, 1, 1], [b"1", b"2", b"3"])
        for n, pos, in_tx in itertools.product((3, 10), (0, 1, 9), (False, True)):
            m.invalid_batch("a", kind, n, pos, in_tx, reopen=pos == 9)
            m.matches_model()
    finally:
        m.teardown()


@pytest.mark.parametrize("end", TX_ENDS)
def test_every_transaction_end(end):
    """Each way a transaction ends, over one group and over three (the failure in the last one): committed
    in full, or nothing of any group written (also after a reopen)."""
    m = StoreMachine()
    try:
        m.op_append("b", 0, [1], [b"x"])
        for gs in (["c"], ["a", "b", "c"]):
            m.transaction(gs, [b"p", b"q", b"r"], end, reopen=True)
            m.matches_model()
    finally:
        m.teardown()


# ---------------------------------------------------------------------------------------------- the checks can fail
class _LossyCrashMachine(CrashMachine):
    """A store that acknowledges writes it never syncs (fsync OFF under the power-loss model): the crash
    rule must report lost acknowledged writes. (Whole writes lost, no mark: with a torn WAL or the mark,
    STRICT recovery would refuse the image instead, which fails the rule as well, but less specifically.)"""

    FSYNC = FsyncMode.OFF
    KEEP_MARK = False
    MODES = ("lose",)


def test_crash_check_fires_on_a_store_that_loses_acknowledged_writes():
    with pytest.raises(AssertionError, match="acknowledged writes lost"):
        _run(_LossyCrashMachine, 20, 25, phases=[Phase.generate], report_multiple_bugs=False)


@pytest.mark.parametrize("sabotage", ["entry", "commit", "vote", "snapshot", "compact", "truncate"])
def test_model_check_fires_on_unmodelled_changes(sabotage):
    """A write the model does not know about (as if an aborted transaction or a refused batch had leaked
    into the store) makes the invariant fail."""
    m = StoreMachine()
    try:
        m.op_append("a", 1, [0, 0, 1, 1], [b"1", b"2", b"3", b"4"])
        m.op_commit("a", 3)
        m.op_snapshot("a", 2, b"snap")
        m.matches_model()
        s = m.store
        if sabotage == "entry":
            s.log("b").append([LogEntry(1, 1, b"leaked")])
        elif sabotage == "commit":
            s.metadata("a").set_commit_index(4)
        elif sabotage == "vote":
            s.metadata("c").set_term_and_vote(1, "n9")
        elif sabotage == "snapshot":
            with s.snapshots("a").write(3, 2) as w:
                w.write(b"other")
        elif sabotage == "compact":
            s.log("a").compact(2)
        else:
            s.log("a").truncate_after(3)
        with pytest.raises(AssertionError):
            m.matches_model()
    finally:
        m.teardown()
