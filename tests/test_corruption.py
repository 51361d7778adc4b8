"""Corruption campaign: flip random bytes at random offsets (and truncate files) in a store with many
segments and several groups, then open it under each recovery policy. For every case:

* STRICT refuses to open (a typed RaftSqliteError), or opens with *identical* data: every entry, term,
  metadata field and snapshot byte compared with the expected values (a flip in free space or in an
  unused page is harmless, and the comparison proves it);
* TRUNCATE_TAIL / PARTIAL refuse or open with exactly what their documentation promises: each group's log
  is a prefix of the expected log (TRUNCATE_TAIL: never shorter than the commit index), metadata terms are
  never behind, and nothing read differs from what was written;
* no case ever returns a wrong entry ("wrong reads" must be 0), and no case raises anything but a
  RaftSqliteError.

CI runs CASES cases; `-m slow` runs >= 10,000.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest

from raft_sqlite import FsyncMode, LogEntry, RaftSqliteError, RecoveryPolicy, SegmentPolicy
from raft_sqlite import layout
from tests.conftest import open_store

CASES = 300
#: suffix of a mutation that also removed ``raft.db-hwm``: an open that then silently loses what the WAL's
#: tail held is counted as ``lost_no_evidence`` (gone by design: the mark is the only record of the WAL)
NO_EVIDENCE = " + raft.db-hwm removed"
GROUPS = ["alpha", "beta", "gamma"]
POLICY = SegmentPolicy(max_entries=25)


def _payload(rng, g, i):
    return (f"{g}/{i}/".encode() + rng.randbytes(rng.randint(0, 300)))


def build_pristine(root):
    """A store with 3 groups x 300 entries in 25-entry segments, metadata, and a WAL with uncheckpointed
    commits. Returns (data_dir, expected) where expected maps group -> (entries, hard_state)."""
    rng = random.Random(42)
    src = os.path.join(root, "src")
    expected = {}
    with open_store(src, segment_policy=POLICY, fsync=FsyncMode.FULL) as s:
        for g in GROUPS:
            lg = s.log(g)
            es = [LogEntry(i, 1 + i // 40, _payload(rng, g, i)) for i in range(1, 301)]
            for k in range(0, 300, 7):
                lg.append(es[k:k + 7])
            s.metadata(g).set_term_and_vote(9, f"{g}-leader")
            s.metadata(g).set_commit_index(250)
            expected[g] = [es, (9, f"{g}-leader", 250)]
        extras = add_snapshots(s, expected)
    # reopen and append more without closing: the copy then has live WAL frames too
    s = open_store(src, segment_policy=POLICY, fsync=FsyncMode.FULL)
    for g in GROUPS:
        e = LogEntry(301, 8, _payload(rng, g, 301))
        s.log(g).append([e])
        expected[g][0].append(e)
    pristine = os.path.join(root, "pristine")
    shutil.copytree(src, pristine)
    s.close()
    for f in os.listdir(pristine):
        if f.endswith("-shm"):
            os.unlink(os.path.join(pristine, f))
    return pristine, expected, extras


class KV:
    """State-machine structure with deltas: the last payload seen per key (key = payload % 13)."""

    def __init__(self):
        self.d, self.changed = {}, set()

    def apply(self, e):
        k = str(e.data[-1] % 13) if e.data else "empty"
        self.d[k] = e.data.hex()
        self.changed.add(k)

    def snapshot(self):
        self.changed.clear()
        return json.dumps(self.d, sort_keys=True).encode()

    def restore(self, data):
        self.d, self.changed = json.loads(data), set()

    def delta(self):
        out = {k: self.d[k] for k in sorted(self.changed)}
        self.changed.clear()
        return json.dumps(out, sort_keys=True).encode()

    def apply_delta(self, data):
        self.d.update(json.loads(data))


SNAP_GROUP = "alpha"


def add_snapshots(store, expected):
    """A delta chain on group alpha: FULL at 50, DELTAs at 100..250 (state-machine captures). Returns the
    expected snapshots [(index, term, kind, bytes)] and the state at the chain's head."""
    kv = KV()
    sm = store.state_machine(SNAP_GROUP)
    sm.register("kv", kv)
    es = expected[SNAP_GROUP][0]
    for upto in (50, 100, 150, 200, 250):
        for e in es[upto - 50:upto]:
            kv.apply(e)
        sm.capture(upto, es[upto - 1].term)
    snaps = []
    for m in store.snapshots(SNAP_GROUP).list():
        with store.snapshots(SNAP_GROUP).open(m) as r:
            snaps.append((m.index, m.term, str(m.kind), r.read()))
    assert [x[2] for x in snaps].count(str(snaps[0][2])) == 1 and len(snaps) == 5  # one FULL + 4 DELTAs
    return {"snaps": snaps, "state": dict(kv.d)}


def check_snapshots(s, extras):
    """Every snapshot byte as written, and the state machine restored from the chain; returns False
    when snapshots are missing (a documented PARTIAL drop)."""
    got = []
    for m in s.snapshots(SNAP_GROUP).list():
        with s.snapshots(SNAP_GROUP).open(m) as r:
            got.append((m.index, m.term, str(m.kind), r.read()))
    assert got == extras["snaps"][:len(got)], "snapshot bytes differ from what was written"
    if not got:
        return False
    kv = KV()
    s.state_machine(SNAP_GROUP).register("kv", kv)
    head = s.state_machine(SNAP_GROUP).restore()
    if head.index == extras["snaps"][-1][0]:
        assert kv.d == extras["state"], "restored state differs"
    return len(got) == len(extras["snaps"])


def read_everything(s):
    """Everything a Raft node could read back: per group the log, terms and metadata."""
    out = {}
    for g in s.groups():
        lg, md = s.log(g), s.metadata(g)
        es = lg.entries(lg.first_index, lg.last_index + 1) if lg.last_index >= lg.first_index else []
        out[g] = {"first": lg.first_index, "last": lg.last_index, "last_term": lg.last_term,
                  "snap_term": lg.term(lg.snapshot_index) if lg.snapshot_index < lg.first_index else None,
                  "entries": es, "hard": md.hard_state, "partial": md.recovered_partially}
    return out


def classify(data_dir, expected, policy, extras=None):
    """Open ``data_dir`` under ``policy``; returns 'detected', 'harmless', 'dropped' (a documented drop),
    'lost' (opened without acknowledged data: a log tail under STRICT, snapshots under STRICT or
    TRUNCATE_TAIL) or raises AssertionError for a wrong read."""
    try:
        s = open_store(data_dir, recovery=policy, segment_policy=POLICY, fsync=FsyncMode.FULL)
    except RaftSqliteError:
        return "detected"
    try:
        try:
            got = read_everything(s)
            snaps_complete = check_snapshots(s, extras) if extras else True
        except RaftSqliteError:
            return "detected"  # caught when read, never returned
        # snapshots missing after a non-PARTIAL open: acknowledged data lost without a refusal
        lost = not snaps_complete and policy is not RecoveryPolicy.PARTIAL
        dropped = False
        if policy is RecoveryPolicy.PARTIAL and s.recovery_report.outcome == "partial" and set(got) < set(expected):
            dropped = True  # documented: a damaged WAL can take whole groups' creation with it
        else:
            assert sorted(got) == sorted(expected), f"groups differ: {sorted(got)}"
        for g, (es, hard) in expected.items():
            if g not in got:
                continue
            r = got[g]
            n = len(r["entries"])
            assert r["first"] == 1 and r["snap_term"] in (None, 0)
            assert r["entries"] == es[:n], f"{g}: entries differ from what was written"
            assert r["last"] == n and r["last_term"] == (es[n - 1].term if n else 0)
            term, vote, commit = r["hard"]
            if policy is RecoveryPolicy.PARTIAL and r["partial"]:
                # documented: metadata may be older; the node must not vote until it has caught up
                assert term <= hard[0] and vote in (None, hard[1]) and commit <= min(hard[2], n)
                if n < len(es) or (vote, commit) != hard[1:] or term != hard[0]:
                    dropped = True
                continue
            assert term == hard[0], f"{g}: term changed {hard[0]} -> {term}"
            if n < len(es) or (vote, commit) != hard[1:]:
                if policy is RecoveryPolicy.STRICT and n < len(es) and (vote, commit) == hard[1:]:
                    return "lost"
                assert policy is not RecoveryPolicy.STRICT, f"{g}: STRICT opened with data missing"
                dropped = True
                if policy is RecoveryPolicy.TRUNCATE_TAIL:
                    assert n >= hard[2] and (vote, commit) == hard[1:], f"{g}: TRUNCATE_TAIL lost committed data"
                else:
                    assert vote in (None, hard[1]) and commit == min(hard[2], n)
                    assert r["partial"] or (n >= hard[2] and vote == hard[1])
            else:
                assert not r["partial"]
        if lost:
            return "lost"
        return "dropped" if dropped or not snaps_complete else "harmless"
    finally:
        s.close()


def mutate(rng, src, dst):
    shutil.copytree(src, dst)
    files = [f for f in sorted(os.listdir(dst)) if os.path.getsize(os.path.join(dst, f)) > 0
             and f != layout.RESERVE_FILE]  # holds no data: mutating it tests nothing
    f = rng.choices(files, weights=[os.path.getsize(os.path.join(dst, x)) for x in files])[0]
    if rng.random() < 0.05:  # the WAL lost as a whole: SQLite then opens silently without its commits
        f = "raft.db-wal"
        path = os.path.join(dst, f)
        if rng.random() < 0.5:
            os.unlink(path)
            return f"{f}: deleted"
        os.truncate(path, 0)
        return f"{f}: truncated to 0"
    path = os.path.join(dst, f)
    size = os.path.getsize(path)
    extra = ""
    if f == "raft.db-wal" and rng.random() < 0.1:
        # the WAL's evidence destroyed too: without its high-water mark nobody knows what the WAL held
        os.unlink(os.path.join(dst, "raft.db-hwm"))
        extra = NO_EVIDENCE
    if rng.random() < 0.1:
        cut = rng.randrange(size)
        os.truncate(path, cut)
        return f"{f}: truncated {size} -> {cut}{extra}"
    with open(path, "r+b") as fh:
        flips = []
        for _ in range(rng.choice([1, 1, 1, 2, 8])):
            off = rng.randrange(size)
            fh.seek(off)
            b = fh.read(1)[0]
            fh.seek(off)
            fh.write(bytes([b ^ rng.randint(1, 255)]))
            flips.append(off)
    return f"{f}: flipped bytes at {flips}{extra}"


def run_campaign(tmp_path, cases, seed):
    pristine, expected, extras = build_pristine(str(tmp_path))
    exp = {g: (v[0], v[1]) for g, v in expected.items()}
    # the unmutated store is intact (checked on a copy: opening and closing the pristine store itself would
    # checkpoint its live WAL frames into raft.db, and every case would then start from a checkpointed WAL)
    shutil.copytree(pristine, os.path.join(str(tmp_path), "sanity"))
    assert classify(os.path.join(str(tmp_path), "sanity"), exp, RecoveryPolicy.STRICT, extras) == "harmless"
    counts = {p: {"detected": 0, "harmless": 0, "dropped": 0, "lost_no_evidence": 0} for p in RecoveryPolicy}
    lost = []
    for case in range(cases):
        what = None
        for p in RecoveryPolicy:
            d = os.path.join(str(tmp_path), f"case-{p.value}")
            crng = random.Random(f"{seed}/{case}")  # the same mutation for every policy
            what = mutate(crng, pristine, d)
            try:
                res = classify(d, exp, p, extras)
                if res == "lost":
                    # opened with acknowledged data missing: a failure, unless the evidence was destroyed
                    # with the data (then counted apart, never mixed with "harmless")
                    assert what.endswith(NO_EVIDENCE), "silently lost acknowledged data (log tail or snapshots)"
                    res = "lost_no_evidence"
                    lost.append(what)
                counts[p][res] += 1
            except AssertionError as e:
                raise AssertionError(f"case {case} ({what}) under {p.value}: wrong read: {e}") from e
            except RaftSqliteError:
                raise
            finally:
                shutil.rmtree(d, ignore_errors=True)
    print(f"\ncorruption campaign: {cases} cases x {len(RecoveryPolicy)} policies")
    print("| policy | cases | detected (refused or raised) | harmless (identical data) | documented drop "
          "| lost, evidence removed too | wrong reads |")
    print("|---|---|---|---|---|---|---|")
    for p, c in counts.items():
        print(f"| {p.value} | {cases} | {c['detected']} | {c['harmless']} | {c['dropped']} | {c['lost_no_evidence']} "
              "| 0 |")
    print("lost tails with their evidence removed:", lost)
    return counts


def test_corruption_campaign(tmp_path):
    counts = run_campaign(tmp_path, CASES, seed=2026)
    strict = counts[RecoveryPolicy.STRICT]
    assert strict["dropped"] == 0
    assert strict["detected"] > 0 and strict["harmless"] > 0  # the campaign really hits both kinds


@pytest.mark.slow
def test_corruption_campaign_long(tmp_path):
    run_campaign(tmp_path, 10_000, seed=7)
