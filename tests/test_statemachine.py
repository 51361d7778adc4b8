"""StateMachineSnapshotManager: registered structures, delta chains vs log replay, install checks."""

import json
import logging
import random
import zlib

import apsw
import pytest
from conftest import open_store

from raft_sqlite import CorruptionError, LogEntry, SnapshotError
from raft_sqlite.metadata import group_crc
from raft_sqlite.snapshot import SnapshotKind
from raft_sqlite.statemachine import StateMachineSnapshotManager, StructureMismatchError

G = "g"


class KV:
    """A dict with change tracking: delta() is the changed keys (None value: deleted)."""

    def __init__(self, full_every=None):
        self.d, self.changed, self.full_every, self.n = {}, set(), full_every, 0

    def apply(self, op, k, v=None):
        if op == "set":
            self.d[k] = v
        else:
            self.d.pop(k, None)
        self.changed.add(k)

    def snapshot(self):
        self.changed.clear()
        return json.dumps(self.d, sort_keys=True).encode()

    def restore(self, data):
        self.d = json.loads(data)
        self.changed.clear()

    def delta(self):
        self.n += 1
        if self.full_every and self.n % self.full_every == 0:
            return None  # asks for a full one now and then
        out = {k: self.d.get(k) for k in sorted(self.changed)}
        self.changed.clear()
        return json.dumps(out).encode()

    def apply_delta(self, data):
        for k, v in json.loads(data).items():
            if v is None:
                self.d.pop(k, None)
            else:
                self.d[k] = v
        self.changed.clear()


class Counter:
    """No delta support: always stored whole."""

    def __init__(self):
        self.n = 0

    def apply(self, op, k, v=None):
        self.n += 1

    def snapshot(self):
        return str(self.n).encode()

    def restore(self, data):
        self.n = int(data)


def structures():
    return {"kv": KV(), "kv2": KV(full_every=3), "count": Counter()}


def register(sm, structs):
    for name, s in structs.items():
        sm.register(name, s)
    return structs


def apply_entry(structs, e):
    cmd = json.loads(e.data)
    structs[cmd["s"]].apply(cmd["op"], cmd["k"], cmd.get("v"))
    structs["count"].apply("set", "")


def state(structs):
    return {"kv": structs["kv"].d, "kv2": structs["kv2"].d, "count": structs["count"].n}


def run_commands(store, structs, n, rnd, term=1):
    """Append n commands, commit them, apply them (as a Raft node would)."""
    log = store.log(G)
    es = []
    for i in range(n):
        s = rnd.choice(["kv", "kv2"])
        k = f"k{rnd.randrange(40)}"
        cmd = {"s": s, "op": "del", "k": k} if rnd.random() < 0.2 else {"s": s, "op": "set", "k": k,
                                                                          "v": rnd.randrange(1000)}
        es.append(LogEntry(log.last_index + 1 + i, term, json.dumps(cmd).encode()))
    log.append(es)
    store.metadata(G).set_commit_index(log.last_index)
    for e in es:
        apply_entry(structs, e)
    return log.last_index


def test_delta_chains_of_length_10_restore_equals_log_replay(data_dir):
    rnd = random.Random(5)
    with open_store(data_dir) as s:
        sm = s.state_machine(G)
        assert isinstance(sm, StateMachineSnapshotManager)
        sm.snapshots.max_chain_length = 10
        live = register(sm, structures())
        kinds = []
        for _ in range(12):
            idx = run_commands(s, live, 25, rnd)
            meta = sm.capture(idx, 1)
            kinds.append(meta.kind)
        assert kinds == [SnapshotKind.FULL] + [SnapshotKind.DELTA] * 9 + [SnapshotKind.FULL, SnapshotKind.DELTA]
        # inside a delta snapshot: kv2 is whole every 3rd time, count always whole
        modes = {e["name"]: e["mode"] for e in meta.structures["structures"]}
        assert modes == {"count": "full", "kv": "delta", "kv2": "delta"}
        # the first chain is complete (10 snapshots) and kept by retention
        chains = sm.snapshots.chains()
        assert [len(c) for c in chains] == [2, 10]
        run_commands(s, live, 7, rnd)  # applied after the last snapshot
        full_log = s.log(G).entries(1, s.log(G).last_index + 1)
        s.log(G).compact(meta.index)
        expected = state(live)
    # replaying the whole log from scratch gives the live state
    replay = structures()
    for e in full_log:
        apply_entry(replay, e)
    assert state(replay) == expected
    with open_store(data_dir) as s:
        sm = s.state_machine(G)
        fresh = register(sm, structures())
        got = sm.restore()
        assert got.id == meta.id and got.index == meta.index
        for e in s.log(G).entries(got.index + 1, s.log(G).last_index + 1):
            apply_entry(fresh, e)
        assert state(fresh) == expected
    # restoring exactly the 10-long chain (older head) equals replaying the log up to its index
    with open_store(data_dir) as s:
        sm = s.state_machine(G)
        head10 = sm.snapshots.chains()[1][-1]
        c = apsw.Connection(str(data_dir / "raft.db"))
        c.execute("DELETE FROM snapshots WHERE snapshot_id > ?", (head10.id,))  # simulate: only chain 1
        gid = c.execute("SELECT group_id FROM groups WHERE name=?", (G,)).fetchone()[0]
        c.execute("UPDATE groups SET snapshot_index=?, snapshot_term=?, first_index=1, crc32=?",
                  (head10.index, head10.term, group_crc(gid, G, 1, head10.index, head10.term, 0)))
        c.close()
    with open_store(data_dir) as s:
        sm = s.state_machine(G)
        fresh = register(sm, structures())
        assert len(sm.snapshots.chain()) == 10
        assert sm.restore().id == head10.id
        upto = structures()
        for e in full_log[:head10.index]:
            apply_entry(upto, e)
        assert state(fresh) == state(upto)


def test_capture_after_restore_continues_the_chain(data_dir):
    rnd = random.Random(8)
    with open_store(data_dir) as s:
        sm = s.state_machine(G)
        live = register(sm, structures())
        sm.capture(run_commands(s, live, 10, rnd), 1)
    with open_store(data_dir) as s:
        sm = s.state_machine(G)
        live = register(sm, structures())
        sm.restore()
        # a fresh registry without restore would not know the delta baseline: FULL
        m = sm.capture(run_commands(s, live, 10, rnd), 1)
        assert m.kind is SnapshotKind.DELTA
        expected = state(live)
    with open_store(data_dir) as s:
        sm = s.state_machine(G)
        fresh = register(sm, structures())
        sm.restore()
        assert state(fresh) == expected


def test_new_registry_starts_full_and_failed_capture_forces_full(data_dir):
    rnd = random.Random(1)
    with open_store(data_dir) as s:
        sm = s.state_machine(G)
        live = register(sm, structures())
        assert sm.capture(run_commands(s, live, 5, rnd), 1).kind is SnapshotKind.FULL
        assert sm.capture(run_commands(s, live, 5, rnd), 1).kind is SnapshotKind.DELTA
        orig = live["kv"].delta
        live["kv"].delta = lambda: 42  # not bytes: the capture fails
        with pytest.raises(SnapshotError, match="not bytes"):
            sm.capture(run_commands(s, live, 5, rnd), 1)
        live["kv"].delta = orig
        # the failed capture consumed change tracking: the next one must be FULL
        assert sm.capture(s.log(G).last_index, 1).kind is SnapshotKind.FULL
        assert sm.capture(s.log(G).last_index, 1, kind=SnapshotKind.FULL).kind is SnapshotKind.FULL
        expected = state(live)
    with open_store(data_dir) as s:
        sm = s.state_machine(G)
        fresh = register(sm, structures())
        sm.restore()
        assert state(fresh) == expected


@pytest.mark.parametrize("which", ["missing", "unknown"])
def test_restore_refuses_structure_mismatch(data_dir, which):
    rnd = random.Random(2)
    with open_store(data_dir) as s:
        sm = s.state_machine(G)
        live = register(sm, structures())
        sm.capture(run_commands(s, live, 5, rnd), 1)
    with open_store(data_dir) as s:
        sm = s.state_machine(G)
        st = structures()
        if which == "missing":
            st["extra"] = KV()  # registered but not in the snapshot
        else:
            del st["kv2"]  # in the snapshot but not registered
        register(sm, st)
        with pytest.raises(StructureMismatchError, match=f"{which} \\['(extra|kv2)'\\]"):
            sm.restore()
        assert st["kv"].d == {} and st["count"].n == 0  # nothing was touched


def test_restore_empty_and_registry_validation(store):
    sm = store.state_machine(G)
    assert sm.restore() is None
    with pytest.raises(SnapshotError, match="no structure"):
        sm.capture(1, 1)
    with pytest.raises(TypeError):
        sm.register("x", object())
    with pytest.raises(TypeError):
        sm.register("", KV())

    class Half:
        def snapshot(self):
            return b""

        def restore(self, d):
            pass

        def delta(self):
            return b""

    with pytest.raises(TypeError, match="come together"):
        sm.register("half", Half())
    sm.register("kv", KV())
    with pytest.raises(ValueError):
        sm.register("kv", KV())
    assert sm.names() == ["kv"]
    sm.unregister("kv")
    assert sm.names() == []


def test_restore_falls_back_to_older_valid_chain(data_dir, caplog):
    rnd = random.Random(3)
    with open_store(data_dir) as s:
        sm = s.state_machine(G)
        live = register(sm, structures())
        first = sm.capture(run_commands(s, live, 5, rnd), 1, kind=SnapshotKind.FULL)
        older = state(live)
        older = json.loads(json.dumps(older))
        newest = sm.capture(run_commands(s, live, 5, rnd), 1, kind=SnapshotKind.FULL)
    c = apsw.Connection(str(data_dir / "chunks.db"))
    data = c.execute("SELECT data FROM snapshot_chunks WHERE snapshot_id=? AND seq=0", (newest.id,)).fetchone()[0]
    bad = bytes([data[0] ^ 0xFF]) + data[1:]  # same size, the stored CRC no longer matches
    assert zlib.crc32(bad) != zlib.crc32(data)
    c.execute("UPDATE snapshot_chunks SET data=? WHERE snapshot_id=? AND seq=0", (bad, newest.id))
    c.close()
    with open_store(data_dir) as s:
        sm = s.state_machine(G)
        fresh = register(sm, structures())
        with caplog.at_level(logging.WARNING, logger="raft_sqlite.statemachine"):
            got = sm.restore()
        assert got.id == first.id and json.loads(json.dumps(state(fresh))) == older
        assert "unusable" in caplog.text and "older snapshot chain" in caplog.text
        with pytest.raises(CorruptionError):
            sm.snapshots.verify(newest)


def _stream(leader_store, meta, writer, piece=3000):
    with leader_store.snapshots(G).open(meta) as r:
        while True:
            b = r.read(piece)
            if not b:
                break
            writer.write(b, offset=writer.offset)


def test_install_from_leader(tmp_path):
    rnd = random.Random(4)
    with open_store(tmp_path / "leader") as a, open_store(tmp_path / "follower") as b:
        sa = a.state_machine(G)
        la = register(sa, structures())
        idx = run_commands(a, la, 30, rnd, term=2)
        sa.capture(idx, 2)
        idx = run_commands(a, la, 30, rnd, term=2)
        sa.capture(idx, 2)  # a DELTA: not installable as such
        full = sa.capture(idx, 2, kind=SnapshotKind.FULL)
        b.log(G).append([LogEntry(1, 1, b"stale")])
        sb = b.state_machine(G)
        lb = register(sb, structures())
        with sb.install(full.index, full.term) as w:
            _stream(a, full, w)
        assert state(lb) == state(la)
        log = b.log(G)
        assert (log.first_index, log.last_index, log.term(idx)) == (idx + 1, idx, 2)
    with open_store(tmp_path / "follower") as b:
        sb = b.state_machine(G)
        lb2 = register(sb, structures())
        assert sb.restore().index == idx and state(lb2) == state(lb)


@pytest.mark.parametrize("which", ["missing", "unknown", "delta"])
def test_install_refuses_structure_mismatch_and_keeps_nothing(tmp_path, which):
    rnd = random.Random(6)
    with open_store(tmp_path / "leader") as a, open_store(tmp_path / "follower") as b:
        sa = a.state_machine(G)
        la = register(sa, structures())
        idx = run_commands(a, la, 20, rnd)
        meta = sa.capture(idx, 1, kind=SnapshotKind.FULL)
        if which == "delta":
            idx = run_commands(a, la, 5, rnd)
            meta = sa.capture(idx, 1)
            assert meta.kind is SnapshotKind.DELTA
        b.log(G).append([LogEntry(1, 1, b"x"), LogEntry(2, 1, b"y")])
        b.metadata(G).set_commit_index(1)
        sb = b.state_machine(G)
        st = structures()
        if which == "missing":
            st["extra"] = KV()
        elif which == "unknown":
            del st["count"]
        register(sb, st)
        with pytest.raises(SnapshotError, match={"missing": "missing \\['extra'\\]", "unknown": "unknown \\['count'\\]",
                                                 "delta": "only a FULL"}[which]), \
                sb.install(meta.index, meta.term) as w:
            _stream(a, meta, w)
        assert st["kv"].d == {}
        assert b.snapshots(G).latest() is None and b.snapshots(G).pending_install() is None
        assert (b.log(G).first_index, b.log(G).last_index) == (1, 2)
    c = apsw.Connection(str(tmp_path / "follower" / "chunks.db"))
    assert c.execute("SELECT count(*) FROM snapshot_chunks").fetchone()[0] == 0
    c.close()
    with open_store(tmp_path / "follower") as b:
        assert b.snapshots(G).latest() is None and b.log(G).last_index == 2


def test_install_of_non_statemachine_stream_refused(tmp_path):
    with open_store(tmp_path / "f") as b:
        sb = b.state_machine(G)
        sb.register("kv", KV())
        with pytest.raises(SnapshotError, match="not a state-machine snapshot"), sb.install(10, 1) as w:
            w.write(b"just some bytes that are not a snapshot")
        assert b.snapshots(G).latest() is None


# ------------------------------------------------------------------------------------------ scheduler
def test_scheduler_with_documented_capture_lambda_does_not_deadlock(data_dir):
    """README/docs show ``SnapshotScheduler(store, "g", lambda: sm.capture(...))``: the scheduler holds
    the group's capture lock while it calls the lambda, and sm.capture takes it again. It used to hang
    forever (a plain Lock); the scheduler's own thread now joins the capture it owns."""
    import threading
    import time

    from raft_sqlite import SnapshotScheduler

    class App:
        applied = 0

    app = App()
    with open_store(data_dir) as store:
        structs = register(store.state_machine(G), structures())
        sm, log = store.state_machine(G), store.log(G)
        app.applied = run_commands(store, structs, 30, random.Random(7))
        # verbatim from README.md / docs/snapshots.md
        sched = SnapshotScheduler(store, "g", lambda: sm.capture(app.applied, log.term(app.applied)),
                                  every_entries=10_000, every_seconds=300, compact_lag=1_000).start()
        try:
            sched.trigger()
            deadline = time.monotonic() + 30  # a liveness bound, not a speed assertion
            while sched.runs + sched.failures == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sched.failures == 0 and sched.runs == 1, sched.last_error
            assert sched.last_meta.index == app.applied == store.log(G).snapshot_index
            # the lock is free again: a manual capture on this thread neither blocks nor is refused
            app.applied = run_commands(store, structs, 5, random.Random(8))
            got = []
            t = threading.Thread(target=lambda: got.append(sm.capture(app.applied, log.term(app.applied))))
            t.start()
            t.join(30)
            assert got and got[0].kind is SnapshotKind.DELTA and got[0].index == app.applied
        finally:
            sched.stop(timeout=5)
        want = state(structs)
    with open_store(data_dir) as store:
        structs = register(store.state_machine(G), structures())
        assert store.state_machine(G).restore().index == app.applied
        assert state(structs) == want


def test_scheduler_skips_while_a_manual_capture_runs_then_catches_up(data_dir):
    """A trigger while another thread's capture holds the lock is skipped, not lost: the scheduler
    runs once the lock is free (the forced trigger stays pending)."""
    import threading
    import time

    from raft_sqlite import SnapshotScheduler

    with open_store(data_dir) as store:
        structs = register(store.state_machine(G), structures())
        sm, log = store.state_machine(G), store.log(G)
        applied = run_commands(store, structs, 10, random.Random(9))
        inside, release = threading.Event(), threading.Event()
        orig = structs["count"].snapshot

        def slow_snapshot():
            inside.set()
            release.wait(30)
            return orig()

        structs["count"].snapshot = slow_snapshot
        t = threading.Thread(target=lambda: sm.capture(applied, log.term(applied)))
        t.start()
        assert inside.wait(30)
        structs["count"].snapshot = orig
        sched = SnapshotScheduler(store, G, lambda: sm.capture(applied, log.term(applied), kind=SnapshotKind.FULL),
                                  every_entries=None, every_seconds=3600, poll_interval=0.01)
        assert sched.run_once() is None and sched.skipped == 1  # busy: skipped, not blocked
        sched.start()
        try:
            sched.trigger()
            release.set()
            t.join(30)
            deadline = time.monotonic() + 30
            while sched.runs == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sched.runs == 1 and sched.failures == 0, sched.last_error
        finally:
            sched.stop(timeout=5)
        assert [m.kind for m in store.snapshots(G).list()][-1] is SnapshotKind.FULL
    with open_store(data_dir) as store:
        structs2 = register(store.state_machine(G), structures())
        assert store.state_machine(G).restore().index == applied
        assert state(structs2) == state(structs)
