"""PersistentRaftLog semantics, each write path checked again after a reopen."""

import apsw
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raft_sqlite import (
    CompactionError,
    EntryKind,
    LogCompactedError,
    LogConflictError,
    LogEntry,
    LogGapError,
    LogUnavailableError,
    SegmentPolicy,
)
from raft_sqlite.log import validate_entries
from tests.conftest import open_store


def E(i, t=1, d=None, k=EntryKind.NORMAL):
    return LogEntry(i, t, d if d is not None else f"e{i}".encode(), k)


def reopen(data_dir, **kw):
    return open_store(data_dir, **kw)


def test_new_log_bounds(store):
    lg = store.log("g")
    assert (lg.first_index, lg.last_index, lg.last_term) == (1, 0, 0)
    assert lg.term(0) == 0
    with pytest.raises(LogUnavailableError):
        lg.get(1)
    assert lg.entries(1, 1) == []


def test_append_get_term_entries_survive_reopen(data_dir):
    with open_store(data_dir) as s:
        lg = s.log("g")
        assert lg.append([E(1), E(2, 1, k=EntryKind.CONFIG)]) == 2
        assert lg.append([E(3, 2, b""), E(4, 2, bytearray(b"ba")), E(5, 3, memoryview(b"mv"))]) == 5
        assert lg.append([]) == 5
    with reopen(data_dir) as s:
        lg = s.log("g")
        assert (lg.first_index, lg.last_index, lg.last_term) == (1, 5, 3)
        assert lg.get(2) == E(2, 1, k=EntryKind.CONFIG) and isinstance(lg.get(2).kind, EntryKind)
        assert [lg.term(i) for i in range(0, 6)] == [0, 1, 1, 2, 2, 3]
        assert [e.data for e in lg.entries(1, 6)] == [b"e1", b"e2", b"", b"ba", b"mv"]
        assert lg.entries(2, 4) == [E(2, 1, k=EntryKind.CONFIG), E(3, 2, b"")]
        with pytest.raises(LogUnavailableError):
            lg.get(6)
        with pytest.raises(LogUnavailableError):
            lg.entries(1, 7)


def test_entries_max_bytes(store):
    lg = store.log("g")
    lg.append([E(i, 1, b"x" * 10) for i in range(1, 11)])
    assert [e.index for e in lg.entries(1, 11, max_bytes=35)] == [1, 2, 3]
    assert [e.index for e in lg.entries(1, 11, max_bytes=0)] == [1]  # at least one entry
    assert [e.index for e in lg.entries(4, 11, max_bytes=10)] == [4]
    assert len(lg.entries(1, 11, max_bytes=10_000)) == 10


@pytest.mark.parametrize("bad, exc", [
    ([E(2)], LogGapError),
    ([E(1), E(3)], LogGapError),
    ([E(1, 2), E(2, 1)], LogConflictError),
    ("not entries", TypeError),
    ([E(1, 1, "str payload")], TypeError),
    ([LogEntry(1, 1, None)], TypeError),
    ([LogEntry("1", 1, b"x")], TypeError),
    ([LogEntry(True, 1, b"x")], TypeError),
    ([E(0)], ValueError),
    ([E(1, -1)], ValueError),
    ([E(1, 1, b"x", 77)], ValueError),
    ([object()], TypeError),
])
def test_bad_input_rejected_and_nothing_written(data_dir, bad, exc):
    with open_store(data_dir) as s, pytest.raises(exc):
        s.log("g").append(bad)
    with reopen(data_dir) as s:
        assert s.log("g").last_index == 0
        assert s.kernel.read(lambda c: c.execute("SELECT count(*) FROM log_entries").fetchone()[0]) == 0


def test_overlap_and_term_decrease_refused(data_dir):
    with open_store(data_dir) as s:
        lg = s.log("g")
        lg.append([E(1, 2), E(2, 3)])
        with pytest.raises(LogConflictError, match="truncate_after"):
            lg.append([E(2, 3)])
        with pytest.raises(LogConflictError):
            lg.append([E(1, 3)])
        with pytest.raises(LogConflictError, match="below the last"):
            lg.append([E(3, 2)])
        with pytest.raises(LogGapError):
            lg.append([E(5, 3)])
    with reopen(data_dir) as s:
        assert [(e.index, e.term) for e in s.log("g").entries(1, 3)] == [(1, 2), (2, 3)]


def test_truncate_after_and_reappend_survive_reopen(data_dir):
    with open_store(data_dir) as s:
        lg, md = s.log("g"), s.metadata("g")
        lg.append([E(i, 1) for i in range(1, 11)])
        md.set_commit_index(4)
        with pytest.raises(LogConflictError, match="committed"):
            lg.truncate_after(3)
        lg.truncate_after(4)
        assert (lg.last_index, lg.last_term) == (4, 1)
        lg.truncate_after(9)  # no-op beyond the end
        lg.append([E(5, 2, b"new5"), E(6, 2, b"new6")])
    with reopen(data_dir) as s:
        lg = s.log("g")
        assert (lg.last_index, lg.last_term) == (6, 2)
        assert [e.data for e in lg.entries(4, 7)] == [b"e4", b"new5", b"new6"]


def test_append_next_assigns_indexes(data_dir):
    with open_store(data_dir) as s:
        lg = s.log("g")
        assert lg.append_next(1, [b"a", b"b"]) == 2
        assert lg.append_next(2, [b"c"]) == 3
        with pytest.raises(LogConflictError):
            lg.append_next(1, [b"old term"])
        with pytest.raises(TypeError):
            lg.append_next(2, ["str"])
    with reopen(data_dir) as s:
        assert [(e.index, e.term, e.data) for e in s.log("g").entries(1, 4)] == [
            (1, 1, b"a"), (2, 1, b"b"), (3, 2, b"c")]



def test_append_next_one_entry_fast_path_and_normalising_path_agree(data_dir):
    """A single bytes payload with an int term and an EntryKind takes the short path; anything else goes
    through validate_entries (normalised or refused) exactly as before."""
    with open_store(data_dir) as s:
        lg = s.log("g")
        assert lg.append_next(1, [b"a"]) == 1  # list: short path
        assert lg.append_next(1, (b"b",)) == 2  # tuple: short path
        assert lg.append_next(1, [bytearray(b"c")], 1) == 3  # normalised: bytes data, EntryKind kind
        assert lg.append_next(2, [memoryview(b"d")], EntryKind.NOOP) == 4
        for bad, exc in (((True, [b"x"]), TypeError), ((-1, [b"x"]), ValueError), ((2, [b"x"], 9), ValueError),
                         ((2, b"x"), TypeError), ((2, ["x"]), TypeError), ((2.0, [b"x"]), TypeError),
                         ((1, [b"x"]), LogConflictError)):
            with pytest.raises(exc):
                lg.append_next(*bad)
        assert lg.last_index == 4
    with reopen(data_dir) as s:
        got = s.log("g").entries(1, 5)
        assert got == [E(1, 1, b"a"), E(2, 1, b"b"), E(3, 1, b"c", EntryKind.CONFIG), E(4, 2, b"d", EntryKind.NOOP)]
        assert all(type(e.data) is bytes and type(e.kind) is EntryKind for e in got)

def test_groups_are_independent(data_dir):
    with open_store(data_dir) as s:
        s.log("a").append([E(1, 1, b"a1")])
        s.log("b").append([E(1, 5, b"b1"), E(2, 5, b"b2")])
        s.log(7).append([E(1, 1, b"seven")])  # int names are their str form
    with reopen(data_dir) as s:
        assert s.groups() == ["7", "a", "b"]
        assert s.log("a").last_index == 1 and s.log("b").last_index == 2
        assert s.log("b").get(1).data == b"b1" and s.log("7").get(1).data == b"seven"


def test_segments_rotate_seal_and_carry_sidecar_checksums(data_dir):
    pol = SegmentPolicy(max_entries=10, max_bytes=1 << 20, max_age=3600)
    with open_store(data_dir, segment_policy=pol) as s:
        lg = s.log("g")
        for i in range(1, 36):
            lg.append([E(i)])
        lg.append([E(i, 1, b"y" * 100) for i in range(36, 61)])  # one batch spanning rotations
    with open_store(data_dir, segment_policy=SegmentPolicy(max_entries=10, max_bytes=250)) as s:
        s.log("g").append([E(61, 1, b"z" * 200), E(62, 1, b"z" * 200)])  # byte-based rotation
    c = apsw.Connection(str(data_dir / "raft.db"))
    segs = c.execute("SELECT first_index, last_index, entry_count, checksum FROM log_segments "
                     "ORDER BY first_index").fetchall()
    assert [(a, b, n) for a, b, n, _ in segs[:6]] == [(1, 10, 10), (11, 20, 10), (21, 30, 10), (31, 40, 10),
                                                      (41, 50, 10), (51, 60, 10)]
    assert segs[-1][1] is None  # the open segment
    from raft_sqlite.wal import chain_crc
    for first, last, _n, cks in segs:
        if last is None:
            continue
        crcs = [r[0] for r in c.execute("SELECT crc32 FROM log_entries WHERE group_id=1 AND idx BETWEEN ? AND ? "
                                        "ORDER BY idx", (first, last))]
        acc = 0
        for x in crcs:
            acc = chain_crc(acc, x)
        assert acc == cks
    assert c.execute("SELECT count(DISTINCT segment) FROM log_entries").fetchone()[0] == len(segs)


def test_age_based_rotation(data_dir):
    with open_store(data_dir, segment_policy=SegmentPolicy(max_age=0.0)) as s:
        lg = s.log("g")
        for i in range(1, 4):
            lg.append([E(i)])
        n = s.kernel.read(lambda c: c.execute("SELECT count(*) FROM log_segments WHERE sealed_at IS NOT NULL")
                    .fetchone()[0])
        assert n == 2


def test_truncate_into_sealed_segment_reopens_it(data_dir):
    pol = SegmentPolicy(max_entries=5)
    with open_store(data_dir, segment_policy=pol) as s:
        lg = s.log("g")
        lg.append([E(i) for i in range(1, 13)])
        lg.truncate_after(7)
        lg.append([E(8, 2, b"x8"), E(9, 2, b"x9"), E(10, 2, b"x10"), E(11, 2, b"x11")])
    with open_store(data_dir, segment_policy=pol) as s:
        lg = s.log("g")
        assert [e.data for e in lg.entries(6, 12)] == [b"e6", b"e7", b"x8", b"x9", b"x10", b"x11"]
        segs = s.kernel.read(lambda c: c.execute("SELECT first_index, last_index FROM log_segments ORDER BY first_index")
                       .fetchall())
        assert segs == [(1, 5), (6, 10), (11, None)]


def test_corrupt_record_detected_on_read_and_open(data_dir):
    with open_store(data_dir) as s:
        s.log("g").append([E(1, 1, b"hello"), E(2, 1, b"world")])
    c = apsw.Connection(str(data_dir / "raft.db"))
    c.execute("UPDATE log_entries SET payload=? WHERE idx=2", (b"w0rld",))
    c.close()
    from raft_sqlite import CorruptionError
    with pytest.raises(CorruptionError, match="group 'g'.*entry 2"):
        open_store(data_dir)


def test_compact_refused_without_durable_snapshot(data_dir):
    with open_store(data_dir) as s:
        lg = s.log("g")
        lg.append([E(i) for i in range(1, 6)])
        s.metadata("g").set_commit_index(5)
        with pytest.raises(CompactionError):
            lg.compact(3)
        lg.compact(0)  # below first_index: no-op
        assert lg.first_index == 1
    # and the database refuses an ad-hoc DELETE of committed entries that no snapshot covers
    c = apsw.Connection(str(data_dir / "raft.db"))
    with pytest.raises(apsw.ConstraintError, match="no durable snapshot"):
        c.execute("DELETE FROM log_entries WHERE idx <= 3")
    with pytest.raises(apsw.ConstraintError, match="no durable snapshot"):
        c.execute("DELETE FROM log_entries WHERE idx = 5")
    assert c.execute("SELECT count(*) FROM log_entries").fetchone()[0] == 5


def test_reads_below_first_index(store):
    lg = store.log("g")
    with pytest.raises(LogCompactedError):
        lg.get(0)
    with pytest.raises(LogCompactedError):
        lg.entries(0, 1)


_DEFECTS = {
    "index": [0, -1, True, 3.0, "4", None, 10**30],  # replaces the index (also breaks contiguity)
    "term": [-1, True, 2.0, None],  # replaces the term; "lower" below makes it decrease
    "data": [bytearray(b"ba"), memoryview(b"mv"), "text", None, 5],
    "kind": [0, 1, 2, 7, True, None, "NOOP"],
}


@st.composite
def _batches(draw):
    """Well-formed contiguous batches (the fast path), often with one single-field defect."""
    n = draw(st.integers(0, 30))
    first, term = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    out = []
    for i in range(n):
        term += draw(st.sampled_from([0, 0, 0, 1]))
        out.append(LogEntry(first + i, term, draw(st.binary(max_size=3)), EntryKind.NORMAL))
    if out and draw(st.booleans()):
        j = draw(st.integers(0, len(out) - 1))
        e = out[j]
        field = draw(st.sampled_from(["index", "term", "data", "kind", "lower", "tuple", "same-index"]))
        if field == "lower":
            e = e._replace(term=e.term - 1)
        elif field == "tuple":
            e = tuple(e)
        elif field == "same-index":
            e = e._replace(index=e.index - 1)
        else:
            e = e._replace(**{field: draw(st.sampled_from(_DEFECTS[field]))})
        out[j] = e
    return out


def _outcome(fn, arg):
    try:
        return ("ok", [(e.index, e.term, e.data, e.kind, type(e.kind), type(e.data)) for e in fn(arg)])
    except (TypeError, ValueError, LogGapError, LogConflictError) as exc:
        return ("error", type(exc))


@settings(max_examples=400, deadline=None)
@given(_batches())
def test_batch_validation_fast_path_agrees_with_per_entry_checks(batch):
    # lists of more than 8 entries go through the C-speed check; a tuple takes the per-entry path
    assert _outcome(validate_entries, batch) == _outcome(validate_entries, tuple(batch))
