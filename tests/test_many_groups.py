"""Many Raft groups on one node (issue 20): the open validates every group's log in set-based passes (one
query per table for all groups, the sealed segments' aggregates of all groups in one parallel pass), and
finds damage in any one of them exactly as a per-group open did."""

import apsw
import pytest

from raft_sqlite import CorruptionError, LogEntry, RecoveryPolicy, SegmentPolicy, logscan
from raft_sqlite.wal import SPAN
from tests.conftest import open_store

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
