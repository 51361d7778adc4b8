"""Recovery on open: validation before replay, policies, reports, events, logs, start-up replay."""

import json
import logging

import apsw
import pytest

from raft_sqlite import (
    CorruptionError,
    EntryKind,
    LogEntry,
    RecoveryPolicy,
    RecoveryRefused,
    SegmentPolicy,
    layout,
)
from raft_sqlite.metadata import group_crc, meta_crc
from raft_sqlite.sqlobjects import GUARD_TRIGGER
from tests.conftest import open_store

N = 40


def build(data_dir, commit=30, **kw):
    with open_store(data_dir, segment_policy=SegmentPolicy(max_entries=8), **kw) as s:
        lg = s.log("g")
        lg.append([LogEntry(i, 1 + i // 10, f"entry {i}".encode()) for i in range(1, N + 1)])
        s.metadata("g").set_term_and_vote(4, "n2")
        s.metadata("g").set_commit_index(commit)


def corrupt_payload(data_dir, idx, as_text=False):
    c = apsw.Connection(str(data_dir / "raft.db"))
    if as_text == "utf8":  # SQLite's || yields TEXT: a payload of the wrong type must be caught too
        c.execute("UPDATE log_entries SET payload = x'00' || payload WHERE idx=?", (idx,))
    elif as_text == "bad-utf8":  # TEXT that is not even valid UTF-8
        c.execute("UPDATE log_entries SET payload = CAST(x'ff' || payload AS TEXT) WHERE idx=?", (idx,))
    elif as_text == "same-bytes":  # the same bytes, but TEXT: the CRC would match, the type must not
        c.execute("UPDATE log_entries SET payload = CAST(payload AS TEXT) WHERE idx=?", (idx,))
    else:
        c.execute("UPDATE log_entries SET payload = CAST(x'01' || payload AS BLOB) WHERE idx=?", (idx,))
    c.close()


def sql(data_dir, *stmts):
    c = apsw.Connection(str(data_dir / "raft.db"))
    for st in stmts:
        c.execute(st)
    c.close()


def events(data_dir):
    c = apsw.Connection(str(data_dir / "raft.db"))
    rows = c.execute("SELECT kind, policy, outcome, details FROM recovery_events ORDER BY event_id").fetchall()
    c.close()
    return rows


def test_replay_after_snapshot_index_up_to_commit(data_dir):
    build(data_dir, commit=30)
    with open_store(data_dir) as s:
        seen = []
        assert s.replay("g", seen.append) == 30
        assert [e.index for e in seen] == list(range(1, 31))
        assert seen[4] == s.log("g").get(5)
        assert [e.index for e in s.iter_replay("g", upto=N, chunk=7)] == list(range(1, N + 1))
        assert s.replay("empty", seen.append) == 0


@pytest.mark.parametrize("as_text", [False, "utf8", "bad-utf8", "same-bytes"])
def test_strict_refuses_corrupt_tail_naming_file_group_index(data_dir, as_text):
    build(data_dir)
    corrupt_payload(data_dir, 35, as_text)
    with pytest.raises(CorruptionError) as ei:
        open_store(data_dir)
    with open_store(data_dir, recovery=RecoveryPolicy.TRUNCATE_TAIL) as s:  # and reads never see it
        assert s.log("g").last_index == 34
    msg = str(ei.value)
    assert "raft.db" in msg and "group 'g'" in msg and "entry 35" in msg and "STRICT" in msg


def test_truncate_tail_drops_corrupt_tail_above_commit(data_dir, caplog):
    build(data_dir, commit=30)
    corrupt_payload(data_dir, 35)
    with caplog.at_level(logging.INFO, logger="raft_sqlite"), \
            open_store(data_dir, recovery=RecoveryPolicy.TRUNCATE_TAIL) as s:
        lg = s.log("g")
        assert (lg.last_index, lg.last_term) == (34, 4)
        assert [e.data for e in lg.entries(1, 35)] == [f"entry {i}".encode() for i in range(1, 35)]
        r = s.recovery_report
        assert r.outcome == "truncated"
        assert r.dropped == [{"group": "g", "what": "log tail", "from_index": 35, "to_index": N}]
        assert not s.metadata("g").recovered_partially
        lg.append([LogEntry(35, 5, b"fresh")])  # the log is usable again
    assert any("dropped log entries 35..40" in m for m in caplog.messages)
    assert any(m.startswith(f"{data_dir}: recovery truncated policy=TRUNCATE_TAIL") for m in caplog.messages)
    kind, policy, outcome, details = events(data_dir)[-1]
    assert (kind, policy, outcome) == ("open", "TRUNCATE_TAIL", "truncated")
    assert json.loads(details)["dropped"][0]["from_index"] == 35
    with open_store(data_dir) as s:  # and STRICT is happy afterwards
        assert s.log("g").last_index == 35


def test_truncate_tail_refuses_corruption_at_or_below_commit(data_dir):
    build(data_dir, commit=30)
    corrupt_payload(data_dir, 12)
    with pytest.raises(CorruptionError, match="entry 12"):
        open_store(data_dir, recovery=RecoveryPolicy.TRUNCATE_TAIL)
    with open_store(data_dir, recovery=RecoveryPolicy.PARTIAL) as s:
        lg, md = s.log("g"), s.metadata("g")
        assert lg.last_index == 11
        assert md.commit_index == 11 and md.recovered_partially
        assert md.current_term == 4  # the term is kept: a node never goes back in terms
        assert s.recovery_report.outcome == "partial"
    with open_store(data_dir) as s:
        md = s.metadata("g")
        assert md.recovered_partially  # persists until the Raft layer has caught up
        md.clear_recovered_partially()
    with open_store(data_dir) as s:
        assert not s.metadata("g").recovered_partially


def test_sidecar_checksum_mismatch_detected(data_dir):
    build(data_dir)
    sql(data_dir, "UPDATE log_segments SET checksum = checksum + 1 WHERE first_index = 9")
    with pytest.raises(CorruptionError, match="segment .* sidecar checksum"):
        open_store(data_dir)


def test_log_gap_is_a_shape_error(data_dir):
    build(data_dir, commit=10)
    # the guard is put back after the damage (a missing guard is refused by itself: see test_wal_loss.py)
    sql(data_dir, "DROP TRIGGER log_entries_guard_delete", "DELETE FROM log_entries WHERE idx = 20", GUARD_TRIGGER)
    with pytest.raises(CorruptionError, match="log gap: index 20"):
        open_store(data_dir)
    with open_store(data_dir, recovery=RecoveryPolicy.TRUNCATE_TAIL) as s:
        assert s.log("g").last_index == 19


def test_commit_beyond_log_is_a_shape_error(data_dir):
    build(data_dir)
    sql(data_dir, f"UPDATE raft_meta SET commit_index=99, crc32={meta_crc(1, 4, 'n2', 99)}")
    with pytest.raises(RecoveryRefused, match="commit index 99 is beyond the last index 40"):
        open_store(data_dir)
    with pytest.raises(RecoveryRefused):
        open_store(data_dir, recovery=RecoveryPolicy.TRUNCATE_TAIL)
    with open_store(data_dir, recovery=RecoveryPolicy.PARTIAL) as s:
        assert s.metadata("g").commit_index == 40 and s.metadata("g").recovered_partially


def test_first_index_without_covering_snapshot_is_a_shape_error(data_dir):
    build(data_dir)
    sql(data_dir, f"UPDATE groups SET first_index=5, crc32={group_crc(1, 'g', 5, 0, 0, 0)}")
    with pytest.raises(RecoveryRefused, match="no durable snapshot covers 4"):
        open_store(data_dir, recovery=RecoveryPolicy.PARTIAL)


@pytest.mark.parametrize("change", ["first_index=2", "snapshot_term=7", "name='h'", "recovered_partially=1"])
def test_group_row_crc_checked_on_open(data_dir, change):
    build(data_dir)
    sql(data_dir, f"UPDATE groups SET {change}")
    for policy in RecoveryPolicy:
        with pytest.raises(CorruptionError, match="group row 1 .* fails its CRC check"):
            open_store(data_dir, recovery=policy)


def test_metadata_corruption_partial_drops_vote(data_dir):
    build(data_dir)
    sql(data_dir, "UPDATE raft_meta SET voted_for='n9'")
    with pytest.raises(CorruptionError, match="metadata"):
        open_store(data_dir, recovery=RecoveryPolicy.TRUNCATE_TAIL)
    with open_store(data_dir, recovery=RecoveryPolicy.PARTIAL) as s:
        md = s.metadata("g")
        assert md.voted_for is None and md.recovered_partially and md.current_term == 4


def test_report_counts_and_event_per_open(data_dir):
    build(data_dir)
    with open_store(data_dir) as s:
        r = s.recovery_report
        assert (r.policy, r.outcome, r.groups, r.entries_validated) == ("STRICT", "clean", 1, N)
        assert r.bytes_validated == sum(len(f"entry {i}") for i in range(1, N + 1))
        assert r.segments_validated == (N - 1) // 8 and r.duration > 0  # the last segment is open
    assert [e[:3] for e in events(data_dir)] == [("open", "STRICT", "created"), ("open", "STRICT", "clean")]


class KV:
    """A tiny state machine structure: applies 'k=v' commands."""

    def __init__(self):
        self.d = {}

    def apply(self, e):
        k, v = e.data.decode().split("=")
        self.d[k] = v

    def snapshot(self):
        return json.dumps(self.d, sort_keys=True).encode()

    def restore(self, data):
        self.d = json.loads(data)


def test_replay_yields_typed_entries_across_chunks_and_kinds(data_dir):
    kinds = [EntryKind.NORMAL, EntryKind.CONFIG, EntryKind.NOOP]
    want = [LogEntry(i, 1 + i // 9, f"p{i}".encode(), kinds[i % 3] if 10 <= i < 14 else EntryKind.NORMAL)
            for i in range(1, 31)]
    with open_store(data_dir) as s:
        s.log("g").append(want)
        s.metadata("g").set_commit_index(30)
    with open_store(data_dir) as s:
        for chunk in (1, 7, 8192):  # chunks holding only NORMAL entries, mixed ones, and all of them
            got = list(s.iter_replay("g", chunk=chunk))
            assert got == want and all(type(e) is LogEntry and type(e.kind) is EntryKind for e in got)
        seen = []
        assert s.replay("g", seen.append) == 30 and seen == want
        assert [e.index for e in s.iter_replay("g", start=25)] == list(range(25, 31))
        # damage that appears after open (another connection): replay refuses instead of yielding it
        corrupt_payload(data_dir, 17, as_text="same-bytes")
        with pytest.raises(CorruptionError, match="log entry 17 is not a BLOB"):
            s.replay("g", lambda e: None)
        sql(data_dir, "DROP TRIGGER log_entries_guard_delete", "DELETE FROM log_entries WHERE idx = 5")
        with pytest.raises(CorruptionError, match="not all present"):
            list(s.iter_replay("g"))


def test_replay_restores_snapshot_then_applies_the_rest(data_dir):
    with open_store(data_dir) as s:
        lg, md = s.log("kv"), s.metadata("kv")
        live = KV()
        s.state_machine("kv").register("kv", live)
        for i in range(1, 51):
            e = LogEntry(i, 1, f"k{i % 7}={i}".encode())
            lg.append([e])
            md.set_commit_index(i)
            live.apply(e)
            if i == 30:
                s.state_machine("kv").capture(30, 1)
                lg.compact(30)
        lg.append([LogEntry(51, 1, b"k0=uncommitted")])
        expected = dict(live.d)
    with open_store(data_dir) as s:
        fresh = KV()
        s.state_machine("kv").register("kv", fresh)
        applied = []
        last = s.replay("kv", lambda e: (applied.append(e.index), fresh.apply(e)))
        assert last == 50 and applied == list(range(31, 51))  # snapshot covers 1..30, 51 is not committed
        assert fresh.d == expected


@pytest.mark.parametrize("damage", ["bad-revision", "no-version-table", "truncated"])
@pytest.mark.parametrize("policy", list(RecoveryPolicy))
def test_damaged_schema_revision_is_corruption_not_a_fresh_file(data_dir, damage, policy):
    # Found by the corruption campaign: a chunks.db whose alembic_version row read as NULL was taken for
    # a fresh file, so open ran the migrations on the damaged file and leaked sqlalchemy's DatabaseError.
    build(data_dir)
    c = apsw.Connection(str(data_dir / "chunks.db"))
    if damage == "bad-revision":
        c.execute("UPDATE alembic_version SET version_num = x''")  # not a revision name
    elif damage == "no-version-table":
        c.execute("DROP TABLE alembic_version")
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()
    if damage == "truncated":  # keep page 1 (the schema) only: every other page reads past the end
        with open(data_dir / "chunks.db", "r+b") as f:
            f.truncate(65536 + 100)
    before = {p.name: p.read_bytes() for p in data_dir.iterdir() if p.name.endswith(".db")}
    with pytest.raises(CorruptionError, match="chunks.db" if damage != "truncated" else None):
        open_store(data_dir, recovery=policy)
    assert {p.name: p.read_bytes() for p in data_dir.iterdir() if p.name.endswith(".db")} == before


def _sealed(data_dir):
    c = apsw.Connection(str(data_dir / "raft.db"))
    rows = c.execute("SELECT segment_id, group_id, first_index, last_index, entry_count, bytes, checksum, content_crc "
                     "FROM log_segments WHERE last_index IS NOT NULL ORDER BY group_id, first_index").fetchall()
    return c, rows


def test_segment_content_digest_written_by_every_append_path_matches_sqlite(data_dir):
    # the writer keeps the digest running in Python; recovery recomputes it inside SQLite: they must agree
    # for single appends, batches, batches that rotate mid-way, append_next, every kind, empty and binary
    # payloads, and a segment re-opened by truncate_after and sealed again
    from raft_sqlite.logscan import check_sealed_segment
    kinds = [EntryKind.NORMAL, EntryKind.CONFIG, EntryKind.NOOP]
    with open_store(data_dir, segment_policy=SegmentPolicy(max_entries=7)) as s:
        lg = s.log("g")
        for i in range(1, 6):
            lg.append([LogEntry(i, 1, bytes([i]) * i, kinds[i % 3])])
        lg.append([LogEntry(i, 2, bytes(range(256))[i % 50:], kinds[i % 3]) for i in range(6, 40)])
        lg.truncate_after(17)  # re-opens the segment holding 17
        lg.append([LogEntry(i, 3, b"" if i % 4 == 0 else b"\x00\xff" * i) for i in range(18, 30)])
        lg.append_next(3, [b"next-%d" % k for k in range(9)])
        s.log("h").append([LogEntry(i, 1 + i // 5, b"h%d" % i) for i in range(1, 23)])
    c, rows = _sealed(data_dir)
    assert len(rows) >= 6 and all(r[7] is not None for r in rows)
    for sid, gid, lo, hi, cnt, nbytes, cks, content in rows:
        assert check_sealed_segment(c, gid << 40, sid, lo, hi, cnt, nbytes, cks, content) is not None, sid
    c.close()
    with open_store(data_dir) as s:  # and the open validates through the aggregate path
        rep = s.recovery_report
        assert rep.outcome == "clean" and rep.segments_validated == len(rows)
        assert s.log("g").last_index == 38


@pytest.mark.parametrize("policy", list(RecoveryPolicy))
def test_damaged_content_digest_fails_closed(data_dir, policy):
    build(data_dir, commit=10)  # 8-entry segments: 1..8, 9..16, 17..24, 25..32 sealed, 33..40 open
    sql(data_dir, "UPDATE log_segments SET content_crc = content_crc + 1 WHERE first_index = 25")
    if policy is RecoveryPolicy.STRICT:
        with pytest.raises(CorruptionError, match=r"segment \d+ \(25\.\.32\) fails its content digest"):
            open_store(data_dir, recovery=policy)
        return
    with open_store(data_dir, recovery=policy) as s:
        # every record checks out one by one: the damaged segment (above the commit index) and what follows
        # it are dropped, as for a failed sidecar checksum
        assert s.log("g").last_index == 24 and s.metadata("g").commit_index == 10
        assert s.recovery_report.outcome == "truncated"
        assert "fails its content digest" in s.recovery_report.problems[-1]


def test_store_from_before_segment_digests_is_upgraded_and_checked_record_by_record(data_dir):
    build(data_dir, commit=10)
    # turn it into a revision-0002 store: no content_crc column
    sql(data_dir, "DROP VIEW segments", "ALTER TABLE log_segments DROP COLUMN content_crc",
        "UPDATE alembic_version SET version_num = '0002_main_views'")
    from raft_sqlite import schema
    sql(data_dir, f"CREATE VIEW segments AS {schema.VIEWS['segments']}")
    corrupt_payload(data_dir, 12)  # inside a sealed segment that has no digest: caught record by record
    with pytest.raises(CorruptionError, match="CRC mismatch in log entry 12"):
        open_store(data_dir)
    with open_store(data_dir, recovery=RecoveryPolicy.PARTIAL) as s:
        assert s.log("g").last_index == 11
    c = apsw.Connection(str(data_dir / "raft.db"))
    assert c.execute("SELECT version_num FROM alembic_version").fetchone()[0] == layout.MAIN_HEAD
    assert "content_crc" in {r[1] for r in c.execute("PRAGMA table_info(log_segments)")}
    c.close()


@pytest.mark.parametrize("column", ["idx", "term", "kind", "crc32", "segment"])
def test_log_column_turned_into_invalid_utf8_text_is_corruption(data_dir, column):
    # Found by the 10,000-case corruption campaign: a flipped record header turned a log entry's idx into
    # TEXT that is not UTF-8, and open died with UnicodeDecodeError (apsw cannot decode it) instead of
    # treating it as a damaged record.
    for idx in (12, 36):  # inside a sealed segment (aggregate check) and inside the open segment
        d = data_dir.parent / f"{column}-{idx}"
        build(d, commit=8)  # 8-entry segments: the damage is above the commit index, in segment 9..16 or 33..40
        sql(d, "PRAGMA ignore_check_constraints = ON",  # (the log_key CHECK would refuse a damaged idx)
            f"UPDATE log_entries SET {column} = CAST(x'ff' || randomblob(3) AS TEXT) WHERE key = 1099511627776 + {idx}")
        for policy in (RecoveryPolicy.STRICT, RecoveryPolicy.TRUNCATE_TAIL, RecoveryPolicy.PARTIAL):
            if policy is RecoveryPolicy.STRICT:
                with pytest.raises(CorruptionError):
                    open_store(d, recovery=policy)
                continue
            with open_store(d, recovery=policy) as s:
                lg = s.log("g")
                # the damaged record and everything after it is dropped, and not one entry more (before: any
                # last index in 8..idx-1 passed): what stays is exactly what was written, and the open says
                # what it dropped
                keep = idx - 1
                assert lg.last_index == keep, (column, idx, policy, lg.last_index)
                assert [e.data for e in lg.entries(1, keep + 1)] == [f"entry {i}".encode() for i in range(1, keep + 1)]
                rep = s.recovery_report
                if policy is RecoveryPolicy.PARTIAL:  # opens what TRUNCATE_TAIL already cut: nothing more to say
                    assert rep.outcome == "clean" and not rep.dropped, rep
                    continue
                assert rep.outcome == "truncated" and {"group": "g", "what": "log tail", "from_index": keep + 1,
                                                       "to_index": N} in rep.dropped, rep


def test_group_name_or_vote_turned_into_invalid_utf8_is_corruption_not_a_crash(data_dir):
    from raft_sqlite.verify import verify
    for i, stmt in enumerate(["UPDATE groups SET name = CAST(x'ff41' AS TEXT)",
                              "UPDATE raft_meta SET voted_for = CAST(x'fe42' AS TEXT)"]):
        d = data_dir.parent / f"text{i}"
        build(d, commit=10)
        sql(d, stmt)
        for policy in RecoveryPolicy:
            with pytest.raises(CorruptionError, match="not UTF-8"):
                open_store(d, recovery=policy)
        rep = verify(d)
        assert not rep.ok and any("not UTF-8" in p.message for p in rep.problems)
