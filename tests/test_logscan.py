"""The record codec (raft_sqlite.wal), the truncate helper (wal.cut_after) and the shared record scanner
(raft_sqlite.logscan.RecordScanner) on their own: each check is shown firing on the damage it exists for."""

import struct
import zlib

import apsw
import pytest

from raft_sqlite import CorruptionError, EntryKind, LogEntry, NodeStore, RecoveryPolicy, SegmentPolicy, wal
from raft_sqlite.logscan import FINDING_KINDS, RecordScanner
from raft_sqlite.verify import verify
from raft_sqlite.wal import crc_matches, record_crc
from tests.conftest import open_store

GID = 1  # the first group of a store


def _independent_crc(gid, idx, term, kind, payload):
    """The record CRC as the format defines it, written out without the codec."""
    return zlib.crc32(payload, zlib.crc32(struct.pack("<qqqB", gid, idx, term, kind)))


def test_codec_matches_the_format_definition_one_by_one_and_in_batches():
    recs = [(i, 3 + i // 4, [0, 0, 1, 2][i % 4], bytes([i]) * i) for i in range(1, 13)]
    one = [wal.record_crc(7, i, t, k, d) for i, t, k, d in recs]
    assert one == [_independent_crc(7, i, t, k, d) for i, t, k, d in recs]
    idxs, terms, kinds, datas = zip(*recs)
    assert list(wal.record_crcs(7, idxs, terms, kinds, datas)) == one
    # sidecar: CRC32 over the record CRCs packed <I in index order, folded one at a time or at once
    packed = zlib.crc32(struct.pack(f"<{len(one)}I", *one))
    acc = 0
    for c in one:
        acc = wal.chain_crc(acc, c)
    assert acc == packed == wal.sidecar_checksum(one)
    assert wal.chain_crcs(0, wal.record_crcs(7, idxs, terms, kinds, datas)) == packed
    # content digest: "<term> <kind>\n" + payload per record, the mixed batch and the uniform (one term, NORMAL) one
    text = b"".join(b"%d %d\n" % (t, k) + d for _i, t, k, d in recs)
    acc = 0
    for _i, t, k, d in recs:
        acc = wal.content_crc(acc, t, k, d)
    assert acc == wal.content_crc_batch(0, terms, kinds, datas) == wal.content_digest(text) == zlib.crc32(text)
    uni = [b"a", b"bb", b""]
    assert wal.content_crc_batch(5, [2, 2, 2], [0, 0, 0], uni) == zlib.crc32(b"2 0\na2 0\nbb2 0\n", 5)
    # damage of the field types is a mismatch (-1 is never a CRC), not an exception
    assert wal.record_crc(7, None, 1, 0, b"x") == -1 and wal.record_crc(7, 1, 1, 0, None) == -1
    assert wal.record_crc(7, 1 << 70, 1, 0, b"x") == -1
    with pytest.raises(OverflowError):
        wal.sidecar_checksum([1 << 40])


def _store_with_log(data_dir, n=40, commit=10):
    with open_store(data_dir, segment_policy=SegmentPolicy(max_entries=8)) as s:
        s.log("g").append([LogEntry(i, 1 + i // 10, b"e%d" % i, EntryKind(i % 3)) for i in range(1, n + 1)])
        s.metadata("g").set_commit_index(commit)


def test_cut_after_deletes_through_the_guard_and_clears_the_permit(data_dir):
    _store_with_log(data_dir)
    c = apsw.Connection(str(data_dir / "raft.db"))
    c.execute("BEGIN")
    wal.cut_after(c, GID, 20)
    assert c.execute("SELECT max(idx), count(*) FROM log_entries").fetchone() == (20, 20)
    assert c.execute("SELECT truncate_permit FROM groups").fetchone() == (None,)
    # segment 17..24 holds 20: open again; 25.. gone
    segs = c.execute("SELECT first_index, last_index FROM log_segments ORDER BY first_index").fetchall()
    assert segs[-1] == (17, None)
    # the permit is gone: the guard refuses deleting an uncommitted entry again
    with pytest.raises(apsw.ConstraintError, match="refusing to delete"):
        c.execute("DELETE FROM log_entries WHERE idx = 20")
    # ``permit`` is what the delete runs under: one below the cut lets the guard refuse (16..18 are
    # uncommitted and no snapshot covers them); a snapshot install passes its durable snapshot's index
    with pytest.raises(apsw.ConstraintError, match="refusing to delete"):
        wal.cut_after(c, GID, 15, permit=18)
    wal.cut_after(c, GID, 15, permit=15)
    assert c.execute("SELECT max(idx), truncate_permit FROM log_entries, groups").fetchone() == (15, None)
    c.execute("ROLLBACK")
    c.close()


def _walk(data_dir, lo=1, hi=1 << 40, prev=None):
    c = apsw.Connection(str(data_dir / "raft.db"))
    try:
        sc = RecordScanner(c, GID, prev=prev)
        return sc, [(f.kind, f.idx) for f in sc.walk(lo, hi)]
    finally:
        c.close()


def test_scanner_on_a_clean_log_finds_nothing_and_rebuilds_every_sidecar(data_dir):
    _store_with_log(data_dir)
    sc, found = _walk(data_dir)
    assert found == [] and sc.rows == 40 and sc.prev == 40 and sc.lowest == 1 and sc.last_term == 5
    c = apsw.Connection(str(data_dir / "raft.db"))
    sealed = c.execute("SELECT segment_id, checksum, entry_count, bytes FROM log_segments WHERE last_index IS NOT NULL")
    for sid, cks, cnt, nbytes in sealed.fetchall():
        assert sc.sidecar(sid) == (cks, cnt, nbytes)
    c.close()


@pytest.mark.parametrize("damage, kind, idx", [
    ("UPDATE log_entries SET payload = x'00' WHERE idx = 13", "crc", 13),
    ("UPDATE log_entries SET payload = CAST(payload AS TEXT) WHERE idx = 13", "crc", 13),
    ("UPDATE log_entries SET idx = 99 WHERE idx = 13", "index", 13),
    ("UPDATE log_entries SET term = 0, crc32 = {crc0} WHERE idx = 13", "term", 13),
    ("UPDATE log_entries SET segment = segment + 1 WHERE idx = 13", "not_own", 13),
    ("UPDATE log_entries SET segment = 999 WHERE idx = 13", "unknown_segment", 13),
    ("UPDATE log_entries SET key = key + 100 WHERE idx = 40", "gap", 140),
])
def test_scanner_reports_each_kind_of_damage(data_dir, damage, kind, idx):
    _store_with_log(data_dir)
    c = apsw.Connection(str(data_dir / "raft.db"))
    c.execute("PRAGMA ignore_check_constraints=1")  # the damage of a bad disk, not of an SQL client
    c.execute(damage.format(crc0=wal.record_crc(GID, 13, 0, 13 % 3, b"e13")))
    c.close()
    _sc, found = _walk(data_dir)
    assert kind in FINDING_KINDS
    assert (kind, idx) in found, found


def test_scanner_stops_where_the_caller_stops(data_dir):
    """Open-time recovery stops at the first finding: the record is not accepted (counted, folded)."""
    _store_with_log(data_dir)
    c = apsw.Connection(str(data_dir / "raft.db"))
    c.execute("UPDATE log_entries SET payload = x'00' WHERE idx = 5")
    sc = RecordScanner(c, GID, prev=0)
    first = next(iter(sc.walk(1, 40)))
    assert first.kind == "crc" and first.idx == 5 and sc.prev == 4 and sc.rows == 4
    c.close()


def test_open_refuses_a_record_moved_to_another_key(data_dir):
    """A record whose key no longer matches its idx column (the idx column still contiguous) is a gap on
    open, as the sealed-segment aggregate and verify already said; before the shared scanner, the
    open-time record walk compared only the idx column and opened such a log."""
    _store_with_log(data_dir)
    c = apsw.Connection(str(data_dir / "raft.db"))
    c.execute("PRAGMA ignore_check_constraints=1")  # the damage of a bad disk, not of an SQL client
    c.execute("UPDATE log_entries SET key = key + 1 WHERE idx = 40")  # in the open segment (33..40)
    c.close()
    with pytest.raises(CorruptionError, match="log gap: index 40 is missing"):
        open_store(data_dir)
    rep = verify(data_dir)
    assert {p.kind for p in rep.problems} >= {"record_crc", "gap"}
    with open_store(data_dir, recovery=RecoveryPolicy.TRUNCATE_TAIL) as s:
        assert s.log("g").last_index == 39


@pytest.mark.parametrize("column", ["term", "kind"])
def test_a_mistyped_record_with_crc_minus_one_never_verifies(tmp_path, column):
    """record_crc() answers -1 (never a CRC) for a field of the wrong type: a crc32 column damaged to -1 too
    must not make the record verify (found by the review of the shared scanner: open then crashed with a raw
    struct.error under every policy). STRICT refuses typed; TRUNCATE_TAIL and PARTIAL drop the record."""
    d = tmp_path / "s"
    with NodeStore.open(str(d), "n1", cluster_id="c") as s:
        for i in range(5):
            s.log().append_next(1, [b"p%d" % i])
    c = apsw.Connection(str(d / "raft.db"))
    trig = list(c.execute("SELECT name, sql FROM sqlite_master WHERE type='trigger'"))
    for n, _ in trig:
        c.execute(f'DROP TRIGGER "{n}"')
    c.execute(f"UPDATE log_entries SET {column}='x', crc32=-1 WHERE key=(1<<40)+5")
    for _, sql in trig:
        c.execute(sql)
    c.close()
    assert not crc_matches(record_crc(1, 5, "x", 0, b"p4"), -1)
    with pytest.raises(CorruptionError, match="entry 5"):
        NodeStore.open(str(d), "n1", cluster_id="c")
    report = verify(str(d))
    assert any(p.kind == "record_crc" and p.index == 5 for p in report.problems), [str(p) for p in report.problems]
    for policy in (RecoveryPolicy.TRUNCATE_TAIL, RecoveryPolicy.PARTIAL):
        with NodeStore.open(str(d), "n1", cluster_id="c", recovery=policy) as s:
            assert s.log().last_index == 4
            assert [e.data for e in s.log().entries(1, 5)] == [b"p0", b"p1", b"p2", b"p3"]
