"""Many Raft groups on one node (issue 20): the open validates every group's log in set-based passes (one
query per table for all groups, the sealed segments' aggregates of all groups in one parallel pass), and
finds damage in any one of them exactly as a per-group open did."""

import shutil
import signal
import threading
import time

import apsw
import pytest

from raft_sqlite import (
    CorruptionError,
    FsyncMode,
    GroupNotFoundError,
    LogEntry,
    RaftSqliteError,
    RecoveryPolicy,
    SegmentPolicy,
    SnapshotError,
    fsio,
    logscan,
)
from raft_sqlite.verify import verify
from raft_sqlite.wal import SPAN, record_crc
from tests.conftest import open_store, run_py
from tests.support import faultvfs

GROUPS = 12
PER_GROUP = 20  # 2 sealed segments of 8 and an open one of 4 per group
POLICY = SegmentPolicy(max_entries=8)


def build(data_dir):
    with open_store(data_dir, segment_policy=POLICY) as s:
        for g in range(GROUPS):
            s.log(f"g{g}").append([LogEntry(i, 1 + i // 7, f"g{g} entry {i}".encode()) for i in range(1, PER_GROUP + 1)])
            s.metadata(f"g{g}").set_term_and_vote(3, "n1")
            s.metadata(f"g{g}").set_commit_index(5)


def damage(data_dir, group, idx):
    c = apsw.Connection(str(data_dir / "raft.db"))
    gid = c.execute("SELECT group_id FROM groups WHERE name=?", (group,)).fetchone()[0]
    c.execute("UPDATE log_entries SET payload = CAST(x'01' || payload AS BLOB) WHERE key=?", (gid * SPAN + idx,))
    assert c.changes() == 1
    c.close()


def test_many_groups_open_intact_with_every_entry(data_dir):
    build(data_dir)
    with open_store(data_dir, segment_policy=POLICY) as s:
        rep = s.recovery_report
        assert rep.groups == GROUPS and rep.outcome == "clean"
        assert rep.segments_validated == GROUPS * 2
        assert rep.entries_validated == GROUPS * PER_GROUP
        for g in range(GROUPS):
            lg = s.log(f"g{g}")
            assert (lg.first_index, lg.last_index, lg.last_term) == (1, PER_GROUP, 1 + PER_GROUP // 7)
            assert lg.get(13).data == f"g{g} entry 13".encode()
        # the open segment state was rebuilt per group: the next append seals at 24 as before
        s.log("g3").append([LogEntry(i, 9, b"x") for i in range(PER_GROUP + 1, PER_GROUP + 6)])
    with open_store(data_dir, segment_policy=POLICY) as s:
        assert s.log("g3").last_index == PER_GROUP + 5 and s.recovery_report.outcome == "clean"


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("idx", [3, 12, 18])  # first sealed segment, second sealed segment, open segment
def test_damage_in_one_of_many_groups_is_found_and_named(data_dir, monkeypatch, threads, idx):
    monkeypatch.setattr(logscan, "CHECK_THREADS", threads)
    build(data_dir)
    damage(data_dir, "g7", idx)
    with pytest.raises(CorruptionError, match=rf"group 'g7'.*CRC mismatch in log entry {idx}"):
        open_store(data_dir, segment_policy=POLICY)
    with open_store(data_dir, segment_policy=POLICY, recovery=RecoveryPolicy.PARTIAL) as s:
        rep = s.recovery_report
        assert [d["group"] for d in rep.dropped] == ["g7"]
        assert rep.dropped[0]["from_index"] == idx
        assert s.log("g7").last_index == idx - 1
        for g in range(GROUPS):
            if g != 7:
                assert s.log(f"g{g}").last_index == PER_GROUP


def test_a_group_row_with_a_damaged_first_index_fails_closed_not_with_a_type_error(data_dir):
    build(data_dir)
    c = apsw.Connection(str(data_dir / "raft.db"))
    c.execute("UPDATE groups SET first_index = 'ten' WHERE name='g4'")
    c.close()
    for policy in RecoveryPolicy:
        with pytest.raises(CorruptionError, match="group row .* fails its CRC check"):
            open_store(data_dir, segment_policy=POLICY, recovery=policy)


# ---------------------------------------------------------------------------------------------- group removal
def chunk_rows(data_dir):
    c = apsw.Connection(str(data_dir / "chunks.db"))
    n = c.execute("SELECT count(*) FROM snapshot_chunks").fetchone()[0]
    c.close()
    return n


def fill(s, names=("a", "b", "c"), n=30):
    """Groups with a log, hard state and (for "b") two durable snapshots."""
    for name in names:
        s.log(name).append([LogEntry(i, 2, f"{name}{i}".encode()) for i in range(1, n + 1)])
        s.metadata(name).set_term_and_vote(2, "n1")
        s.metadata(name).set_commit_index(n)
    for at in (10, 20) if "b" in names else ():
        with s.snapshots("b").write(at, 2) as w:
            w.write(b"state of b " * 5000)


def group_state(s, name):
    lg, md = s.log(name), s.metadata(name)
    return (lg.first_index, lg.last_index, lg.last_term, [e.data for e in lg.entries(lg.first_index, lg.last_index + 1)]
            if lg.last_index >= lg.first_index else [], md.current_term, md.voted_for, md.commit_index,
            [m.index for m in s.snapshots(name).list()])


def test_remove_group_removes_everything_and_survives_reopen(data_dir):
    with open_store(data_dir, segment_policy=POLICY) as s:
        fill(s)
        keep = {g: group_state(s, g) for g in ("a", "c")}
        assert chunk_rows(data_dir) > 0
        log_b = s.log("b")
        assert s.remove_group("b") is True
        assert s.groups() == ["a", "c"]
        assert chunk_rows(data_dir) == 0  # deleted right after the commit
        with pytest.raises(GroupNotFoundError, match="'b'"):
            log_b.last_index  # noqa: B018 - a read through a handle taken before
        assert s.remove_group("b") is False  # gone: nothing to do
        assert {g: group_state(s, g) for g in ("a", "c")} == keep
    with open_store(data_dir, segment_policy=POLICY) as s:
        assert s.groups() == ["a", "c"] and s.recovery_report.outcome == "clean"
        assert {g: group_state(s, g) for g in ("a", "c")} == keep
        assert verify(str(data_dir)).ok
        c = apsw.Connection(str(data_dir / "raft.db"))
        for table in ("log_entries", "log_segments", "snapshots", "raft_meta"):
            assert c.execute(f"SELECT count(*) FROM {table} WHERE group_id NOT IN (SELECT group_id FROM groups)"
                             ).fetchone()[0] == 0, table
        c.close()
        # the name is free again: a new, empty group
        assert group_state(s, "b") == (1, 0, 0, [], 0, None, 0, [])
        s.log("b").append([LogEntry(1, 1, b"new b")])
    with open_store(data_dir, segment_policy=POLICY) as s:
        assert s.log("b").get(1).data == b"new b" and s.groups() == ["a", "b", "c"]


def test_remove_group_hostile_arguments_and_refusals(data_dir):
    with open_store(data_dir, segment_policy=POLICY) as s:
        fill(s, names=("a", "b"))
        before = {g: group_state(s, g) for g in ("a", "b")}
        for bad, exc in [(None, TypeError), (1.5, TypeError), (True, TypeError), (b"a", TypeError), ("", ValueError),
                         ("a\udc80", ValueError)]:
            with pytest.raises(exc):
                s.remove_group(bad)
        assert s.remove_group("zzz") is False and s.remove_group(7) is False
        with s.transaction(), pytest.raises(RaftSqliteError, match="transaction"):
            s.remove_group("a")
        reader = s.snapshots("b").open(s.snapshots("b").latest())
        with pytest.raises(SnapshotError, match="being written or read"):
            s.remove_group("b")
        reader.close()
        assert {g: group_state(s, g) for g in ("a", "b")} == before and s.groups() == ["a", "b"]
        assert s.remove_group("b") is True
    with pytest.raises(RaftSqliteError, match="closed"):
        s.remove_group("a")


def test_remove_group_then_write_in_one_batch_is_refused_not_resurrected(data_dir):
    """The removal and a later write on the same name (through a view taken before) coalesced into one
    group commit: the write must fail with GroupNotFoundError (it found the removed state in the batch),
    neither writing into the old group's rows nor bringing the group back; asking the store for the name
    again then creates a new, empty group."""
    with open_store(data_dir, segment_policy=POLICY) as s:
        fill(s, names=("a", "z"))
        log_a, k = s.log("a"), s.kernel
        release, errs = threading.Event(), []

        def hold(conn):  # the first leader's op: holds the leader until both followers are queued
            assert release.wait(10)

        def run(fn):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - reported below
                errs.append(e)
        ts = [threading.Thread(target=run, args=(lambda: k.raw(hold),))]
        ts[0].start()
        while k.pipeline.queued < 1:
            time.sleep(0.001)
        for n, fn in enumerate([lambda: s.remove_group("a"), lambda: log_a.append([LogEntry(1, 5, b"fresh")])]):
            ts.append(threading.Thread(target=run, args=(fn,)))
            ts[-1].start()
            while k.pipeline.queued < n + 2:
                time.sleep(0.001)
        commits = s.stats.commits
        release.set()
        for t in ts:
            t.join()
        assert len(errs) == 1 and isinstance(errs[0], GroupNotFoundError), errs
        assert s.stats.commits == commits + 2  # the holder's batch, then one batch: removal + append
        assert s.groups() == ["z"]
        with pytest.raises(GroupNotFoundError):
            log_a.append([LogEntry(1, 5, b"again")])
        with pytest.raises(GroupNotFoundError):
            s.metadata("z") and log_a.compact(0)
        s.log("a").append([LogEntry(1, 5, b"fresh")])  # asked for again: a new group
        assert group_state(s, "a")[:4] == (1, 1, 5, [b"fresh"])
    with open_store(data_dir, segment_policy=POLICY) as s:
        assert group_state(s, "a") == (1, 1, 5, [b"fresh"], 0, None, 0, [])
        assert s.log("z").last_index == 30
        assert verify(str(data_dir)).ok


def test_remove_group_under_power_loss_at_every_sync(tmp_path):
    """Power lost at each sync of a removal (the fault VFS; the image keeps only what was synced, or a
    random subset of the unsynced writes): reopened under STRICT, the group is whole or gone, never
    partial, the others are untouched, and verify passes (orphan chunks removed by the open)."""
    template = tmp_path / "template"
    with open_store(template, segment_policy=POLICY, fsync=FsyncMode.FULL) as s:
        fill(s)
        want = {g: group_state(s, g) for g in ("a", "b", "c")}
    outcomes = {"whole": 0, "gone": 0}
    n = 0
    while True:
        n += 1
        live = tmp_path / f"live{n}"
        shutil.copytree(template, live)
        vfs = faultvfs.FaultVFS(f"rmgroup{n}", root=str(live))
        vfs.arm_crash(at_sync=n)
        with fsio.installed(vfs.fs):
            s = None
            try:
                s = open_store(live, segment_policy=POLICY, fsync=FsyncMode.FULL, vfs=vfs.name)
                s.remove_group("b")
            except (RaftSqliteError, apsw.Error):
                assert vfs.crashed
            finally:
                if s is not None:
                    s.close()
        crashed = vfs.crashed
        for mode in ("lose", "subset"):
            img = tmp_path / f"img{n}{mode}"
            vfs.write_crash_image(str(img), mode, seed=n)
            with open_store(img, segment_policy=POLICY, fsync=FsyncMode.FULL) as s2:
                got = {g: group_state(s2, g) for g in s2.groups()}
            assert got.get("a") == want["a"] and got.get("c") == want["c"]
            if "b" in got:
                assert got["b"] == want["b"], f"sync {n} {mode}: group b partly removed: {got['b']}"
                outcomes["whole"] += 1
            else:
                outcomes["gone"] += 1
            assert verify(str(img)).ok, f"sync {n} {mode}"
            shutil.rmtree(img)
        vfs.unregister()
        shutil.rmtree(live)
        if not crashed:
            break
    print(f"\nremove_group under power loss: {n} sync points x 2 image modes: {outcomes}")
    assert n > 3  # the removal's commit, its chunk deletion and the close each sync
    assert outcomes["whole"] > 0 and outcomes["gone"] > 0, outcomes


def test_remove_group_killed_between_its_commit_and_the_chunk_deletion(data_dir):
    """SIGKILL after the raft.db commit, before the chunks are deleted: the group is gone on reopen and the
    open removes its orphan chunks."""
    with open_store(data_dir, segment_policy=POLICY, fsync=FsyncMode.FULL) as s:
        fill(s)
    code = (
        "import os, signal, sys\n"
        "from raft_sqlite import NodeStore, FsyncMode, SnapshotStore\n"
        "SnapshotStore.delete_chunks = lambda self, ids: os.kill(os.getpid(), signal.SIGKILL)\n"
        "s = NodeStore.open(sys.argv[1], 'n1', cluster_id='c1', fsync=FsyncMode.FULL)\n"
        "s.remove_group('b')\n")
    r = run_py(code, data_dir)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert chunk_rows(data_dir) > 0  # the kill came before the chunks were deleted
    with open_store(data_dir, segment_policy=POLICY) as s:
        assert s.groups() == ["a", "c"]
    assert chunk_rows(data_dir) == 0
    assert verify(str(data_dir)).ok


# ---------------------------------------------------------------------------------------------- the open segment's fast check
OPEN_DAMAGE = [  # group g5's open segment holds 17..20
    "UPDATE log_entries SET payload = CAST(x'01' || payload AS BLOB) WHERE key = {b} + 19",
    "UPDATE log_entries SET payload = CAST(payload AS TEXT) WHERE key = {b} + 18",
    "UPDATE log_entries SET payload = 5 WHERE key = {b} + 17",
    "UPDATE log_entries SET term = 1 WHERE key = {b} + 20",  # a term decrease (CRC fails too)
    "UPDATE log_entries SET term = CAST(x'ff' AS TEXT) WHERE key = {b} + 18",
    "UPDATE log_entries SET kind = 300 WHERE key = {b} + 18",
    "UPDATE log_entries SET crc32 = -5 WHERE key = {b} + 19",
    "UPDATE log_entries SET crc32 = 'x' WHERE key = {b} + 19",
    "PRAGMA ignore_check_constraints=1; UPDATE log_entries SET idx = 99 WHERE key = {b} + 18",
    "UPDATE log_entries SET segment = 1 WHERE key = {b} + 20",
    # (a truncate permit lets the guard trigger pass; it is cleared again)
    "UPDATE groups SET truncate_permit = 0 WHERE group_id = {g}; DELETE FROM log_entries WHERE key = {b} + 18; "
    "UPDATE groups SET truncate_permit = NULL WHERE group_id = {g}",
    "UPDATE groups SET truncate_permit = 0 WHERE group_id = {g}; DELETE FROM log_entries WHERE key = {b} + 17; "
    "UPDATE groups SET truncate_permit = NULL WHERE group_id = {g}",
    "INSERT INTO log_entries SELECT key + 5, group_id, idx + 5, term, kind, payload, crc32, segment FROM log_entries "
    "WHERE key = {b} + 20",  # a record after a gap
    "UPDATE log_segments SET first_index = 18 WHERE group_id = {g} AND last_index IS NULL",
    "INSERT INTO log_segments(group_id, first_index, created_at) VALUES ({g}, 19, 0)",  # a second open segment
    "resign-term",  # entry 20's term lowered below 19's and its record CRC recomputed: only the order tells
]


def outcome(data_dir, policy):
    """What an open under ``policy`` gives, as text with data_dir's path taken out (compared across copies)."""
    return repr(_outcome(data_dir, policy)).replace(str(data_dir), "DIR")


def _outcome(data_dir, policy):
    try:
        with open_store(data_dir, segment_policy=POLICY, recovery=policy) as s:
            rep = s.recovery_report
            return ("opened", rep.outcome, rep.dropped, rep.problems,
                    {g: (s.log(g).last_index, s.log(g).last_term) for g in s.groups()},
                    [e.data for e in s.log("g5").entries(1, s.log("g5").last_index + 1)])
    except RaftSqliteError as e:
        return ("refused", type(e).__name__, str(e))


@pytest.mark.parametrize("sql", OPEN_DAMAGE)
def test_open_segment_damage_same_verdict_with_and_without_the_fast_check(tmp_path, monkeypatch, sql):
    """Every damage to an open segment gives the same verdict (refusal and its message, or what is dropped
    and kept) whether the open segment is checked as a whole first or only walked record by record."""
    build(tmp_path / "pristine")
    c = apsw.Connection(str(tmp_path / "pristine" / "raft.db"))
    gid = c.execute("SELECT group_id FROM groups WHERE name='g5'").fetchone()[0]
    if sql == "resign-term":
        term, kind, payload = c.execute("SELECT term, kind, payload FROM log_entries WHERE key=?",
                                        (gid * SPAN + 20,)).fetchone()
        assert term > 1
        c.execute("UPDATE log_entries SET term=1, crc32=? WHERE key=?",
                  (record_crc(gid, 20, 1, kind, payload), gid * SPAN + 20))
    else:
        c.execute(sql.format(b=gid * SPAN, g=gid))
    c.close()
    calls = []
    real = logscan.check_open_segment

    def counted(*a):
        calls.append(a)
        return real(*a)
    for policy in RecoveryPolicy:
        fast, slow = tmp_path / f"fast-{policy.value}", tmp_path / f"slow-{policy.value}"
        shutil.copytree(tmp_path / "pristine", fast)
        shutil.copytree(tmp_path / "pristine", slow)
        monkeypatch.setattr("raft_sqlite.recovery.check_open_segment", counted)
        got_fast = outcome(fast, policy)
        monkeypatch.setattr("raft_sqlite.recovery.check_open_segment", lambda *a: None)
        got_slow = outcome(slow, policy)
        assert got_fast == got_slow, policy
    assert calls  # the fast check ran (and, for g5, refused the damaged segment: the verdicts are equal)


def test_nothing_started_before_a_removal_brings_the_group_back(data_dir):
    """Views taken before remove_group(): every write through them fails with GroupNotFoundError and
    creates nothing (found by review: a compaction or a snapshot write racing the removal re-created the
    group, empty, because any op on a missing name created it)."""
    with open_store(data_dir, segment_policy=POLICY) as s:
        fill(s)
        lg, md, sm = s.log("b"), s.metadata("b"), s.snapshots("b")
        assert s.remove_group("b")
        for op in (lambda: lg.append([LogEntry(31, 2, b"x")]), lambda: lg.append_next(2, [b"x"]),
                   lambda: lg.truncate_after(5), lambda: lg.compact(20), lambda: md.set_term_and_vote(9, "n1"),
                   lambda: md.set_commit_index(1), lambda: sm.write(20, 2).begin(), lambda: sm.retain(1),
                   lambda: sm.install(40, 2).begin()):
            with pytest.raises(GroupNotFoundError):
                op()
            assert s.groups() == ["a", "c"]
        with pytest.raises(GroupNotFoundError), s.transaction():
            lg.append([LogEntry(31, 2, b"x")])
        assert s.groups() == ["a", "c"]
    with open_store(data_dir, segment_policy=POLICY) as s:
        assert s.groups() == ["a", "c"]
        assert verify(str(data_dir)).ok


@pytest.mark.parametrize("sql", [
    "UPDATE log_segments SET created_at = CAST(x'ff' AS TEXT) WHERE group_id = {g} AND last_index IS NOT NULL",
    "INSERT INTO log_segments(group_id, first_index, created_at) VALUES (999, 1, CAST(x'ff' AS TEXT))",
    "INSERT INTO log_segments(group_id, first_index, created_at) VALUES (999, CAST(x'ff' AS TEXT), 0)",
])
def test_damage_the_open_never_read_does_not_fail_it(tmp_path, sql):
    """Found by review: the all-groups pre-read fetched columns and rows a per-group open never looked at
    (a sealed segment's created_at, segment rows of no group) and failed on text that is not UTF-8."""
    build(tmp_path)
    c = apsw.Connection(str(tmp_path / "raft.db"))
    c.execute(sql.format(g=c.execute("SELECT group_id FROM groups WHERE name='g5'").fetchone()[0]))
    c.close()
    for policy in RecoveryPolicy:
        d = tmp_path.parent / f"{tmp_path.name}-{policy.value}"
        shutil.copytree(tmp_path, d)
        with open_store(d, segment_policy=POLICY, recovery=policy) as s:
            assert s.recovery_report.outcome == "clean"
            assert all(s.log(f"g{g}").last_index == PER_GROUP for g in range(GROUPS))


@pytest.mark.parametrize("column,where", [("first_index", "last_index IS NULL"), ("last_index", "first_index = 9"),
                                          ("first_index", "first_index = 9")])
def test_a_segment_bound_of_the_wrong_type_is_a_typed_refusal(tmp_path, column, where):
    """A text bound in a segment row made the open raise TypeError (before and after the all-groups open):
    it is a CorruptionError now, under every policy."""
    build(tmp_path)
    c = apsw.Connection(str(tmp_path / "raft.db"))
    gid = c.execute("SELECT group_id FROM groups WHERE name='g5'").fetchone()[0]
    c.execute(f"UPDATE log_segments SET {column} = 'abc' WHERE group_id = ? AND {where}", (gid,))
    assert c.changes() == 1
    c.close()
    for policy in RecoveryPolicy:  # each on its own copy (an open that drops a tail repairs the store)
        shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-{policy.value}")
        outcome_ = _outcome(tmp_path.parent / f"{tmp_path.name}-{policy.value}", policy)
        if outcome_[0] == "opened":  # a documented drop of the damaged group's tail, reported (uncommitted
            # entries under TRUNCATE_TAIL: the commit index is 5)
            assert policy is not RecoveryPolicy.STRICT and outcome_[1] in ("partial", "truncated"), outcome_
            assert [d["group"] for d in outcome_[2]] == ["g5"]
        else:
            assert outcome_[:2] == ("refused", "CorruptionError"), (policy, outcome_)


def test_an_open_segment_overlapping_a_sealed_one_is_rebuilt_from_its_records(tmp_path, monkeypatch):
    """Found by review: with the open segment's first index moved onto a sealed segment (damage), the
    walk folds only the records after that sealed segment; the open segment's state must then be read
    from its records (as before the all-groups open), not taken from the partial fold."""
    build(tmp_path)
    c = apsw.Connection(str(tmp_path / "raft.db"))
    gid = c.execute("SELECT group_id FROM groups WHERE name='g5'").fetchone()[0]
    c.execute("UPDATE log_segments SET first_index = 9 WHERE group_id = ? AND last_index IS NULL", (gid,))
    c.close()
    with open_store(tmp_path, segment_policy=POLICY) as s:
        seg = s.kernel.group("g5").seg
        assert (seg.first_index, seg.count) == (9, 12)  # records 9..20, as a re-read counts them
