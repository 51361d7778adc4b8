"""A lost, emptied, truncated or replaced ``raft.db-wal``, a missing or emptied ``raft.db``, and damaged
schema objects (the compaction guard trigger, the views): refused under STRICT, never opened as a store
that silently forgot acknowledged writes. And the other side: clean shutdowns, crashes, checkpoints run
by other connections, WAL restarts and every fsync mode open with every acknowledged entry present.

The writer runs in a subprocess that is SIGKILLed (or closes) after its acknowledged commits, so the WAL
is in the state a crashed node leaves behind."""

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib

import apsw
import pytest

from raft_sqlite import CorruptionError, FsyncMode, LogEntry, RecoveryPolicy, sqlitewal
from raft_sqlite.sqlobjects import GUARD_TRIGGER
from raft_sqlite.verify import verify
from tests.conftest import ROOT, open_store

WRITER = r"""
import os, shutil, signal, sys
import apsw
from raft_sqlite import NodeStore, FsyncMode, LogEntry
d, mode, steps = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
s = NodeStore.open(d, "n1", cluster_id="c1", fsync=FsyncMode(mode), fsync_interval=0.01)
lg, n = s.log("g"), 0
for st in steps:
    if st.startswith("a"):  # a<k>: k appends, one acknowledged commit each
        for _ in range(int(st[1:])):
            n += 1
            lg.append([LogEntry(n, 1, (b"%08d" % n) * 25)])
        s.metadata("g").set_term_and_vote(1, "n1")
    elif st.startswith("ck"):  # ck<MODE>: a checkpoint through a separate connection while the store is live
        c = apsw.Connection(os.path.join(d, "raft.db"))
        c.execute(f"PRAGMA wal_checkpoint({st[2:]})").fetchall()
        c.close()
    elif st.startswith("cp"):  # cp<name>: copy raft.db, the WAL and the mark as they are now, next to data_dir
        for f in ("raft.db", "raft.db-wal", "raft.db-hwm"):  # (as <name>, <name>-wal, <name>-hwm)
            shutil.copy(os.path.join(d, f), os.path.join(os.path.dirname(d), st[2:] + f[7:]))
print(n, flush=True)
if steps[-1] == "close":
    s.close()
else:
    os.kill(os.getpid(), signal.SIGKILL)
"""


def write(d, steps, mode="FULL"):
    """Run the writer; returns how many entries it had acknowledged when it died (or closed)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", WRITER, str(d), mode, steps], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.stdout.strip(), r.stderr
    assert r.returncode == (0 if steps.endswith("close") else -9), r.stderr
    return int(r.stdout.split()[-1])


def check_all_present(d, n, mode=FsyncMode.FULL, **kw):
    """Open (STRICT unless told) and check every acknowledged entry; then reopen once more."""
    for _ in range(2):
        with open_store(d, fsync=mode, **kw) as s:
            lg = s.log("g")
            assert lg.last_index == n
            assert [e.data for e in lg.entries(1, n + 1)] == [(b"%08d" % i) * 25 for i in range(1, n + 1)]
            assert s.metadata("g").current_term == 1


def refused(d, match, policy=RecoveryPolicy.STRICT):
    with pytest.raises(CorruptionError, match=match):
        open_store(d, fsync=FsyncMode.FULL, recovery=policy)


def rm(path):
    if os.path.exists(path):
        os.unlink(path)


# ---------------------------------------------------------------------------------------------- WAL lost
@pytest.mark.parametrize("shm", ["kept", "deleted"])
def test_deleted_wal_after_acknowledged_commits_is_refused(tmp_path, shm):
    d = tmp_path / "n"
    write(d, "a40")
    rm(d / "raft.db-wal")
    if shm == "deleted":
        rm(d / "raft.db-shm")
    refused(d, r"raft\.db-wal is missing, but \d+ frames of WAL generation [0-9a-f]+ were recorded as durable")
    # TRUNCATE_TAIL cannot drop committed data either (SQLite left an empty WAL file behind: nothing else)
    refused(d, r"raft\.db-wal is empty \(0 bytes\), but \d+ frames", RecoveryPolicy.TRUNCATE_TAIL)
    assert os.path.getsize(d / "raft.db-wal") == 0


def test_wal_truncated_to_zero_is_refused(tmp_path):
    d = tmp_path / "n"
    write(d, "a40")
    os.truncate(d / "raft.db-wal", 0)
    refused(d, r"raft\.db-wal is empty \(0 bytes\), but \d+ frames")


@pytest.mark.parametrize("cut", ["mid-frame", "header-only", "damaged-header"])
def test_truncated_or_damaged_wal_is_refused(tmp_path, cut):
    d = tmp_path / "n"
    write(d, "a40")
    w = d / "raft.db-wal"
    if cut == "mid-frame":
        os.truncate(w, os.path.getsize(w) // 2 + 100)
        refused(d, r"raft\.db-wal: only \d+ valid frames, but \d+ were recorded as durable")
    elif cut == "header-only":
        os.truncate(w, 32)
        refused(d, r"raft\.db-wal: only 0 valid frames")
    else:
        with open(w, "r+b") as f:
            f.seek(20)
            f.write(b"\xff\xff\xff\xff")
        refused(d, r"raft\.db-wal has no valid header, but \d+ frames")


def test_older_copy_of_the_wal_is_refused(tmp_path):
    """The same generation with fewer frames, and an earlier generation (a checkpoint by another
    connection restarted the WAL between the copy and the crash)."""
    d = tmp_path / "n"
    write(d, "a20,cpold,a20")
    shutil.copy(tmp_path / "old-wal", d / "raft.db-wal")
    refused(d, r"only \d+ valid frames, but \d+ were recorded")
    d2 = tmp_path / "n2"
    write(d2, "a20,cpold2,ckRESTART,a20")
    shutil.copy(tmp_path / "old2-wal", d2 / "raft.db-wal")
    refused(d2, r"raft\.db-wal holds an older generation \(1 restarts before\)")


def test_partial_opens_a_lost_wal_as_a_catch_up_follower_and_reanchors_the_mark(tmp_path):
    d = tmp_path / "n"
    write(d, "a20,ckTRUNCATE,a20")  # the first 20 are in raft.db, the next 20 only in the WAL
    rm(d / "raft.db-wal")
    refused(d, r"raft\.db-wal is missing")
    with open_store(d, fsync=FsyncMode.FULL, recovery=RecoveryPolicy.PARTIAL) as s:
        assert s.recovery_report.outcome == "partial"
        assert any("raft.db-wal is empty (0 bytes)" in p for p in s.recovery_report.problems)
        assert s.log("g").last_index == 20  # what only the WAL held is gone
        assert s.metadata("g").recovered_partially  # the node must not vote until it has caught up
        s.log("g").append([LogEntry(21, 1, b"after")])
    # the loss was recorded by that open; the mark was re-anchored, so STRICT opens what PARTIAL kept
    with open_store(d, fsync=FsyncMode.FULL) as s:
        assert s.log("g").last_index == 21 and s.metadata("g").recovered_partially


# ---------------------------------------------------------------------------------------------- raft.db lost
@pytest.mark.parametrize("how", ["deleted", "emptied"])
@pytest.mark.parametrize("mode", ["FULL", "OFF"])
def test_missing_or_empty_raft_db_is_refused_under_every_policy(tmp_path, how, mode):
    d = tmp_path / "n"
    write(d, "a10,close", mode)
    if how == "deleted":
        rm(d / "raft.db")
    else:
        os.truncate(d / "raft.db", 0)
    for policy in RecoveryPolicy:
        with pytest.raises(CorruptionError, match=rf"raft\.db is {'missing' if how == 'deleted' else 'empty'}"):
            open_store(d, fsync=FsyncMode(mode), recovery=policy)
    # nothing was created in its place
    assert not os.path.exists(d / "raft.db") or os.path.getsize(d / "raft.db") == 0


def test_fresh_store_and_empty_data_dir_open(tmp_path):
    d = tmp_path / "n"
    d.mkdir()
    with open_store(d, fsync=FsyncMode.FULL) as s:
        s.log("g").append([LogEntry(1, 1, b"x")])
    with open_store(d, fsync=FsyncMode.FULL) as s:
        assert s.log("g").last_index == 1


# ---------------------------------------------------------------------------------------------- no false positives
@pytest.mark.parametrize("mode", ["FULL", "EXTRA", "NORMAL", "OFF"])
def test_crash_after_acknowledged_commits_opens_with_everything(tmp_path, mode):
    d = tmp_path / "n"
    n = write(d, "a30", mode)
    check_all_present(d, n, FsyncMode(mode))


def test_clean_close_checkpoints_so_a_removed_wal_loses_nothing(tmp_path):
    """After close() the mark says "checkpointed": the WAL holds nothing the database lacks."""
    d = tmp_path / "n"
    n = write(d, "a30,close")
    assert sqlitewal.read_mark(str(d / "raft.db")).checkpointed
    rm(d / "raft.db-wal")
    check_all_present(d, n)


@pytest.mark.parametrize("ck", ["PASSIVE", "FULL", "RESTART", "TRUNCATE"])
@pytest.mark.parametrize("then", ["crash", "more-then-crash", "close"])
def test_checkpoints_by_another_connection_are_not_loss(tmp_path, ck, then):
    d = tmp_path / "n"
    steps = {"crash": f"a20,ck{ck}", "more-then-crash": f"a20,ck{ck},a10,ck{ck},a5",
             "close": f"a20,ck{ck},close"}[then]
    n = write(d, steps)
    check_all_present(d, n)


def test_many_wal_restarts_then_crash(tmp_path):
    d = tmp_path / "n"
    n = write(d, ",".join(["a7,ckRESTART"] * 6 + ["a3,ckTRUNCATE,a2"]))
    check_all_present(d, n)


def test_stale_mark_is_never_a_false_positive(tmp_path):
    """A power cut can lose the mark's last pwrites: an older mark (here: one from before a WAL restart)
    only asks for less than the WAL holds."""
    d = tmp_path / "n"
    n = write(d, "a10,cpold,a10,ckRESTART,a10")
    shutil.copy(tmp_path / "old-hwm", d / "raft.db-hwm")
    check_all_present(d, n)


def test_restored_backup_opens(tmp_path):
    from raft_sqlite import HotBackupManager, restore

    d = tmp_path / "n"
    with open_store(d, fsync=FsyncMode.FULL) as s:
        s.log("g").append([LogEntry(i, 1, b"v") for i in range(1, 21)])
        info = HotBackupManager(s, tmp_path / "bk").backup()
    restore(info.path, tmp_path / "r")
    with open_store(tmp_path / "r", fsync=FsyncMode.FULL) as s:
        assert s.log("g").last_index == 20


# ---------------------------------------------------------------------------------------------- the mark itself
def test_missing_mark_is_no_evidence(tmp_path):
    """Without ``raft.db-hwm`` nothing is known about the WAL: a lost WAL then opens (the evidence is
    gone by design: the mark is the only record of what the WAL held)."""
    d = tmp_path / "n"
    write(d, "a40")
    rm(d / "raft.db-hwm")
    rm(d / "raft.db-wal")
    with open_store(d, fsync=FsyncMode.FULL) as s:
        assert s.log("g").last_index < 40


def test_torn_mark_is_ignored(tmp_path):
    d = tmp_path / "n"
    n = write(d, "a40")
    with open(d / "raft.db-hwm", "r+b") as f:
        f.seek(10)
        f.write(b"\x00\xff")
    assert sqlitewal.read_mark(str(d / "raft.db")) is None
    check_all_present(d, n)


def test_format_1_mark_is_read_as_not_checkpointed(tmp_path):
    d = tmp_path / "n"
    write(d, "a40")
    m = sqlitewal.read_mark(str(d / "raft.db"))
    body = sqlitewal.MAGIC_V1 + struct.pack("<8sI", m.salts, m.mx)
    (d / "raft.db-hwm").write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    assert sqlitewal.read_mark(str(d / "raft.db")) == sqlitewal.Mark(m.salts, m.mx, False)
    rm(d / "raft.db-wal")
    refused(d, r"raft\.db-wal is missing")


def test_mark_copied_from_another_store_is_refused(tmp_path):
    """A mark of an unrelated WAL generation that was not checkpointed: this WAL is not the one the
    mark describes, so STRICT refuses naming the WAL; removing the mark (no evidence) opens."""
    a, b = tmp_path / "a", tmp_path / "b"
    write(a, "a20")
    n = write(b, "a20")
    shutil.copy(a / "raft.db-hwm", b / "raft.db-hwm")
    refused(b, r"raft\.db-wal holds an unrelated generation")
    rm(b / "raft.db-hwm")
    check_all_present(b, n)


def test_generation_step():
    s = bytes.fromhex("ef8dd19bba92825e")
    nxt = bytes.fromhex("ef8dd19c569dee76")  # what SQLite wrote at the next restart (observed)
    assert sqlitewal.generation_step(s, s) == 0
    assert sqlitewal.generation_step(s, nxt) == 1 and sqlitewal.generation_step(nxt, s) == -1
    assert sqlitewal.generation_step(s, bytes.fromhex("0000000100000000")) is None
    assert sqlitewal.generation_step(s, s[:4] + b"\0\0\0\0") is None  # same salt-1, other salt-2: another WAL


# ---------------------------------------------------------------------------------------------- schema objects
ALTERED_GUARD = GUARD_TRIGGER.replace("OLD.idx > COALESCE", "0 AND OLD.idx > COALESCE")


def damage(d, *stmts):
    c = apsw.Connection(str(d / "raft.db"))
    for st in stmts:
        c.execute(st)
    c.close()


def built(tmp_path):
    d = tmp_path / "n"
    with open_store(d) as s:
        s.log("g").append([LogEntry(i, 1, b"e") for i in range(1, 11)])
        s.metadata("g").set_term_and_vote(1, "n1")
        s.metadata("g").set_commit_index(5)
    return d


@pytest.mark.parametrize("how,what", [
    (("DROP TRIGGER log_entries_guard_delete",), "trigger 'log_entries_guard_delete' is missing"),
    (("DROP TRIGGER log_entries_guard_delete", ALTERED_GUARD), "trigger 'log_entries_guard_delete' is altered"),
    (("CREATE TRIGGER sneaky AFTER INSERT ON log_entries BEGIN SELECT 1; END",), "trigger 'sneaky' is unexpected"),
    (("DROP VIEW group_status",), "view 'group_status' is missing"),
])
def test_damaged_schema_objects_are_refused_by_strict_and_verify_and_repaired_loudly(tmp_path, how, what):
    d = built(tmp_path)
    damage(d, *how)
    with pytest.raises(CorruptionError, match=what):
        open_store(d)
    rep = verify(d)
    assert any(p.kind == "schema" and what in p.message for p in rep.problems), rep.problems
    with open_store(d, recovery=RecoveryPolicy.TRUNCATE_TAIL) as s:
        assert s.log("g").last_index == 10
        assert [r["name"] for r in s.recovery_report.repaired] == [what.split("'")[1]]
        assert what in s.recovery_report.problems[0]
    assert verify(d).ok
    with open_store(d) as s:  # STRICT again: repaired
        assert s.log("g").last_index == 10
    # the recreated guard works: ad-hoc SQL cannot delete a committed entry no snapshot covers
    c = apsw.Connection(str(d / "raft.db"))
    with pytest.raises(apsw.ConstraintError, match="no durable snapshot"):
        c.execute("DELETE FROM log_entries WHERE idx = 3")
    events = [json.loads(r[0]) for r in c.execute("SELECT details FROM recovery_events ORDER BY event_id")]
    c.close()
    assert any(e.get("repaired") for e in events)


def test_read_only_inspection_after_a_crash_is_not_loss(tmp_path):
    """``raft-sqlite verify``/``status``/``sql`` read through read-only connections: they never
    checkpoint or remove the WAL, so the store still opens with everything afterwards."""
    d = tmp_path / "n"
    n = write(d, "a30")
    assert verify(d).ok
    r = subprocess.run([sys.executable, "-m", "raft_sqlite.cli", "status", str(d)], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    check_all_present(d, n)


@pytest.mark.parametrize("mode", ["NORMAL", "EXTRA"])
def test_truncate_checkpoint_by_another_connection_then_crash_in_other_modes(tmp_path, mode):
    d = tmp_path / "n"
    n = write(d, "a20,ckTRUNCATE", mode)
    check_all_present(d, n, FsyncMode(mode))


def test_auto_checkpoints_and_restarts_of_a_busy_wal_then_crash(tmp_path):
    """Enough commits for SQLite's own auto-checkpoints (every 1000 pages) and WAL restarts."""
    d = tmp_path / "n"
    n = write(d, "a1300")
    m = sqlitewal.read_mark(str(d / "raft.db"))
    assert m is not None and m.mx > 0
    check_all_present(d, n)


def test_damaged_header_of_a_fully_checkpointed_wal_is_not_loss(tmp_path):
    """What a power cut tearing a restarted WAL's new header looks like: the header is invalid, but
    every frame of the marked generation still in the file is already in raft.db: nothing is lost."""
    d = tmp_path / "n"
    n = write(d, "a20,ckFULL")
    with open(d / "raft.db-wal", "r+b") as f:
        f.write(b"\0" * 8)  # magic and version: SQLite ignores the WAL
    check_all_present(d, n)


# ---------------------------------------------------------------------------------------------- found in review
def test_connection_outliving_the_store_checkpoints_and_deletes_the_wal_is_not_loss(tmp_path):
    """A read-write connection of another program (the sqlite3 shell) that is still open when the store
    closes keeps the store's close from checkpointing (the mark says "not checkpointed"); when it closes
    last, SQLite completes the checkpoint and deletes the WAL and -shm. Nothing is lost: the open must
    accept it (raft.db was written after the mark), and every entry is there."""
    d = tmp_path / "node"
    with open_store(d, fsync=FsyncMode.FULL) as s:
        s.log("g").append([LogEntry(i, 1, (b"%08d" % i) * 25) for i in range(1, 41)])
        s.metadata("g").set_term_and_vote(1, "n1")
        other = apsw.Connection(str(d / "raft.db"))  # default flags: read-write, checkpoints on close
        other.execute("SELECT count(*) FROM log_entries").fetchall()
    assert os.path.getsize(d / "raft.db-wal") > 0  # the store's close could not checkpoint it away
    # file timestamps are coarse (one kernel tick): a checkpoint in the same tick as the store's last mark
    # is indistinguishable from no checkpoint (a documented false alarm); a shell closes much later
    time.sleep(0.05)
    other.close()
    assert not os.path.exists(d / "raft.db-wal")  # the last connection checkpointed and deleted it
    check_all_present(d, 40)


def test_reading_the_wal_state_on_open_keeps_sqlites_shm_lock(tmp_path):
    """The WAL checks on open read -shm while SQLite has it open. Closing a descriptor of a file drops
    every POSIX lock the process holds on it, so a plain open()/close() dropped SQLite's dead-man-switch
    lock on -shm (byte 128), and another process opening the database read-write could then truncate
    the wal-index under the live writer. The lock must still be held after a reopen with a mark."""
    import fcntl

    d = tmp_path / "node"
    n = write(d, "a10")  # crash: the reopen below has a mark and a WAL to check
    with open_store(d, fsync=FsyncMode.FULL) as s:
        assert s.log("g").last_index == n
        probe = r"""
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fmt = "@hhqqi4x"
res = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(fmt, fcntl.F_WRLCK, os.SEEK_SET, 128, 1, 0))
print(struct.unpack(fmt, res)[0], struct.unpack(fmt, res)[4])
"""
        r = subprocess.run([sys.executable, "-c", probe, str(d / "raft.db-shm")], capture_output=True, text=True,
                           timeout=60)
        l_type, pid = map(int, r.stdout.split())
        assert l_type != fcntl.F_UNLCK and pid == os.getpid(), (r.stdout, r.stderr)


def test_a_refused_open_writes_nothing(tmp_path):
    """A refused open (here: the wrong node id) must not let SQLite checkpoint on close: that would copy
    the WAL into raft.db and reset it, destroying evidence an operator may need. Every file is left
    byte-identical."""
    import hashlib

    d = tmp_path / "node"
    n = write(d, "a20")
    names = ("raft.db", "raft.db-wal", "chunks.db", "raft.db-hwm")

    def digests():
        return {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in names if (d / f).exists()}

    before = digests()
    from raft_sqlite import NodeIdentityMismatch
    with pytest.raises(NodeIdentityMismatch):
        open_store(d, node_id="someone-else", fsync=FsyncMode.FULL)
    assert digests() == before
    check_all_present(d, n)


def test_damaged_first_transaction_of_the_wal_is_refused_without_the_mark(tmp_path):
    """Found by the slow corruption campaign: when the *first* transaction of a WAL generation is damaged,
    SQLite finds no valid commit at all and its index header then has no page size; the frame scan gave
    up there, so without the mark (deleted) the store opened without every later commit. The scan takes
    the page size from the WAL header instead and refuses."""
    d = tmp_path / "node"
    write(d, "a30")
    os.unlink(d / "raft.db-hwm")  # only the frame scan is left as evidence
    with open(d / "raft.db-wal", "r+b") as f:
        f.seek(32 + 24 + 100)  # inside frame 1's page image
        b = f.read(1)
        f.seek(32 + 24 + 100)
        f.write(bytes([b[0] ^ 0x55]))
    refused(d, "later transaction")
