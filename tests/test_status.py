"""raft_sqlite.status: the one reader of per-group status (cli status, metrics, backup manifests)."""

import json
import os

import apsw
from click.testing import CliRunner

from raft_sqlite import LogEntry, SegmentPolicy, layout
from raft_sqlite.cli import cli
from raft_sqlite.status import read_group_status
from raft_sqlite.verify import open_readonly
from tests.conftest import open_store

VIEW_COLUMNS = ("group_id", "name", "current_term", "voted_for", "commit_index", "first_index", "last_index",
                "entries", "stored_bytes", "snapshot_index", "snapshot_term", "recovered_partially", "segments")


def _store(path, n, groups=("a", "b", "empty"), max_entries=25):
    with open_store(path, segment_policy=SegmentPolicy(max_entries=max_entries)) as s:
        for g in groups:
            s.metadata(g).set_term_and_vote(3, "n2")
            if g != "empty":
                s.log(g).append([LogEntry(i, 1, f"{g}{i}".encode() * (1 + i % 3)) for i in range(1, n + 1)])
                s.metadata(g).set_commit_index(n)
        if "a" in groups and n >= 50:
            with s.snapshots("a").write(50, 1) as w:
                w.write(b"state" * 10)
            s.log("a").compact(40)
    return os.path.join(path, layout.MAIN_DB)


def test_read_group_status_agrees_with_the_group_status_view(tmp_path):
    conn = open_readonly(_store(tmp_path / "n", 120))
    try:
        got = read_group_status(conn)
        view = conn.execute(f"SELECT {', '.join(VIEW_COLUMNS)} FROM group_status ORDER BY group_id").fetchall()
        assert [tuple(getattr(g, c) for c in VIEW_COLUMNS) for g in got] == [
            tuple(bool(v) if c == "recovered_partially" else v for c, v in zip(VIEW_COLUMNS, r)) for r in view]
        a, b, empty = got
        # compaction kept the sealed segments holding 1..40's rows up to the first whole segment boundary
        assert (a.first_index, a.last_index, a.entries, a.snapshot_index) == (41, 120, 80, 50)
        assert (empty.first_index, empty.last_index, empty.entries, empty.segments) == (1, 0, 0, 0)
        assert b.stored_entries == 120 and b.sealed_segments == 4 and b.segments == 5
        assert a.newest_snapshot is not None and (a.newest_snapshot.index, a.newest_snapshot.kind) == (50, "FULL")
        assert b.newest_snapshot is None and b.oldest_segment_created_at is not None
        assert [g.name for g in read_group_status(conn, group_id=b.group_id)] == ["b"]
        # inside the caller's transaction it does not open its own (BEGIN would fail)
        conn.execute("BEGIN")
        assert read_group_status(conn) == got
        conn.execute("COMMIT")
    finally:
        conn.close()


def _vm_steps(path, fn):
    """SQLite VM instructions ``fn(conn)`` runs (counted by a progress handler every 100)."""
    conn = open_readonly(path)
    steps = [0]

    def tick():
        steps[0] += 100
        return 0

    try:
        conn.set_progress_handler(tick, 100)
        fn(conn)
    finally:
        conn.close()
    return steps[0]


def test_read_group_status_cost_does_not_grow_with_the_sealed_log(tmp_path):
    """Status is read on every Prometheus scrape: its cost must not grow with the entries stored (the
    view's last_index/entries scan every record of a group; read_group_status seeks the rowid bound)."""
    small = _store(tmp_path / "small", 1000, groups=("a",), max_entries=1000)
    big = _store(tmp_path / "big", 20000, groups=("a",), max_entries=1000)
    cost = [_vm_steps(p, read_group_status) for p in (small, big)]
    assert cost[1] < 1.5 * cost[0] + 1000, cost
    # the check can fail: the view's last_index column does the scan it guards against
    scan = [_vm_steps(p, lambda c: c.execute("SELECT last_index FROM group_status").fetchall()) for p in (small, big)]
    assert scan[1] > 10 * scan[0], scan


def test_cli_log_never_verifies_a_record_with_a_mistyped_field(tmp_path):
    """A record whose field has the wrong type gets record_crc -1; a crc32 column damaged to -1 must not
    make it verify."""
    path = _store(tmp_path / "n", 10, groups=("a",))
    c = apsw.Connection(path)
    c.execute("DROP TRIGGER IF EXISTS log_entries_guard_delete")
    c.execute("UPDATE log_entries SET crc32 = -1, term = 'x' WHERE idx = 4")
    c.close()
    r = CliRunner().invoke(cli, ["log", str(tmp_path / "n"), "-g", "a", "--json"])
    assert r.exit_code == 4, r.output  # a CRC failure in the range
    rows = {e["index"]: e for e in json.loads(r.output[:r.output.rindex("}") + 1])["entries"]}
    assert rows[4]["crc_ok"] is False and rows[3]["crc_ok"] is True


def test_demo_names_still_importable_from_cli():
    from raft_sqlite import cli as cli_mod
    from raft_sqlite import demo

    assert cli_mod.demo_payload is demo.demo_payload and cli_mod.DEMO_NODE == demo.DEMO_NODE
    assert 16 <= len(demo.demo_payload("g0", 7)) <= 1040
