"""SQL state machine (``store.state(group)``): apply throughput, restart time, snapshots of a large state.

    python benchmarks/sqlstate.py [--apply-entries 200000] [--batch1-entries 20000] [--batches 1,64,1024]
                                  [--payload 100] [--log-entries 10000,1000000] [--resume-tail 1000]
                                  [--state-mib 1024] [--delta-pct 1] [--append-seconds 2] [--rounds 3]
                                  [--parts apply,restart,snapshot] [--json FILE] [--quick]

Three parts, each measured by the shared round runner (_common.run_rounds: one untimed warm-up per row,
interleaved rounds with the order rotating, medians; every ratio is a ratio of medians of this run).

**apply**: committed entries of ``--payload`` bytes applied into ``kv(k INTEGER PRIMARY KEY, v BLOB)`` by
``INSERT OR REPLACE`` (one statement per entry), ``b`` entries per transaction, for each ``b`` of
``--batches`` (``--batch1-entries`` entries for b=1, ``--apply-entries`` otherwise). Rows, per ``b``:

* bare apsw (the baseline): the same rows, from memory, into the same table of a WAL database with
  ``synchronous=NORMAL`` (the state database's setting), one ``BEGIN IMMEDIATE``/``COMMIT`` per batch;
* ``state.apply(batch)``: the same entries, from memory (no log read), through the state machine
  (authorizer, checks, the ``raft_applied`` row in the same transaction, session extension on);
* ``state.catch_up(batch=b)``: the entries read from the store's log and applied (what a node runs),
  with the session extension (``deltas=True``, the default) and without (``deltas=False``).

Every row starts from a fresh, empty state database (untimed); the warm-up of every row applies a tenth of
the entries.

**restart**: a log of each size of ``--log-entries`` (built with ``FsyncMode.OFF`` for speed: durability of
the build is not what is measured), all committed and applied (``catch_up``), the store closed cleanly; in
two data_dirs: without a snapshot (the whole log kept), and with a state snapshot (``state.snapshot()``) at
the last index and the log compacted to its last ``--resume-tail`` entries. Timed: ``NodeStore.open``
(FULL) + ``store.state(...)`` + ``catch_up()`` with nothing to apply, and the same when the state is
``--resume-tail`` entries behind (its database put back from a copy, untimed). The open is reported apart
(with the entries it validated): it validates the log's record CRCs, which is the store's recovery, not
the state machine's, and is what grows with the log when nothing is compacted.

**snapshot**: a state database of ``--state-mib`` MiB (rows of 1000 random bytes, 4 per 4 KiB page, loaded
through ``state.apply`` by entries that each insert 4096 rows with a recursive CTE) in a store opened with
``FsyncMode.FULL``. Rows:

* raw copy + fsync of the state database file (the baseline of a FULL snapshot);
* ``store.snapshots(g).write`` of the same bytes (read from the file in chunk-sized pieces) to another group:
  the snapshot store alone, default settings, to tell its cost from the state machine's;
* ``state.snapshot(kind=FULL)`` while another thread appends single entries (FULL) to another group of the
  same store and a third applies one state entry (an UPDATE of 100 rows) every 10 ms: snapshot time,
  append p50/p99 and apply max during the snapshot;
* the same appends with no snapshot for ``--append-seconds`` (idle p50/p99);
* ``state.snapshot(kind=DELTA)`` after applying entries that change ``--delta-pct`` % of the rows (the
  apply untimed, and an untimed DELTA first that takes what the FULL rows' updater applied).

Reported once, outside the rounds: the first FULL snapshot after the load (the session extension holds
every row loaded), its time and the slowest apply during it.

``--json FILE`` writes every row's rounds and medians and the run's date, commit and load (``meta``).
Targets (printed, not asserted): apply with deltas >= 50% of bare apsw at b=1024; resume 1M / 10k <= 2x
(with the snapshot and compaction);
FULL snapshot >= 50% of a raw copy; append p99 during the snapshot <= 2x idle.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import struct
import sys
import threading
import time

import apsw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import backup as backup_bench  # noqa: E402
from _common import (  # noqa: E402
    Row,
    fsync_path,
    md_table,
    pct,
    print_rounds,
    results_json,
    run_meta,
    run_rounds,
    run_start,
    target,
    us,
    workdir,
    write_json,
)

from raft_sqlite import FsyncMode, LogEntry, NodeStore, SnapshotKind  # noqa: E402
from raft_sqlite.sqlstate import state_file  # noqa: E402

MiB = 1 << 20
KV = "CREATE TABLE kv(k INTEGER PRIMARY KEY, v BLOB)"
INSERT = "INSERT OR REPLACE INTO kv VALUES (?, ?)"
NODE, CLUSTER = "bench", "bench"


def kv_apply(conn, e):
    """The apply of the apply and restart parts: one row per entry, key = the entry's index."""
    conn.execute(INSERT, (e.index, e.data))


def open_store(path, fsync=FsyncMode.FULL):
    return NodeStore.open(path, NODE, cluster_id=CLUSTER, fsync=fsync)


def build_log(path, group, n, payload, *, fsync=FsyncMode.OFF, step=10_000):
    """Append ``n`` entries of ``payload`` to ``group`` (term 1) in batches of ``step``, all committed."""
    with open_store(path, fsync) as s:
        lg = s.log(group)
        s.metadata(group).set_term_and_vote(1, None)
        for lo in range(1, n + 1, step):
            lg.append([LogEntry(i, 1, payload) for i in range(lo, min(n, lo + step - 1) + 1)])
        s.metadata(group).set_commit_index(n)


def remove_db(path):
    for p in (path, path + "-wal", path + "-shm", path + "-journal"):
        if os.path.exists(p):
            os.unlink(p)


def copy_db(src, dst):
    remove_db(dst)
    for suffix in ("", "-wal"):
        if os.path.exists(src + suffix):
            shutil.copyfile(src + suffix, dst + suffix)


# ---------------------------------------------------------------------------------------- apply
def bare_apply(d, n, b, payload):
    """The baseline: the same rows into the same table of a fresh WAL db (synchronous=NORMAL)."""
    path = os.path.join(d, "bare.db")
    remove_db(path)
    c = apsw.Connection(path)
    c.execute("PRAGMA journal_mode=WAL").fetchall()
    c.execute("PRAGMA synchronous=NORMAL").fetchall()
    c.execute(KV)
    t0 = time.perf_counter()
    for lo in range(1, n + 1, b):
        c.execute("BEGIN IMMEDIATE")
        for i in range(lo, min(n, lo + b - 1) + 1):
            c.execute(INSERT, (i, payload))
        c.execute("COMMIT")
    dt = time.perf_counter() - t0
    got = c.execute("SELECT count(*) FROM kv").fetchone()[0]
    c.close()
    remove_db(path)
    if got != n:
        raise AssertionError(f"bare apsw: {got} rows, expected {n}")
    return {"s": dt, "rate": n / dt}


def state_apply(path, n, b, how, payload):
    """``how``: "apply" (state.apply of in-memory batches, deltas on), "catch_up" (deltas on) or
    "catch_up_nodelta"; from a fresh state database."""
    with open_store(path) as s:
        gid = s.kernel.group(s.kernel.ensure_group("g")).gid
        remove_db(state_file(path, gid))
        st = s.state("g", schema=KV, apply=kv_apply, deltas=how != "catch_up_nodelta")
        if how == "apply":
            batches = [[LogEntry(i, 1, payload) for i in range(lo, min(n, lo + b - 1) + 1)]
                       for lo in range(1, n + 1, b)]
            t0 = time.perf_counter()
            for batch in batches:
                st.apply(batch)
            dt = time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            st.catch_up(upto=n, batch=b)
            dt = time.perf_counter() - t0
        if st.last_applied != n or st.query("SELECT count(*) FROM kv")[0][0] != n:
            raise AssertionError(f"{how}: applied {st.last_applied}, expected {n}")
    return {"s": dt, "rate": n / dt}


APPLY_KINDS = (("bare", "bare apsw"), ("apply", "state.apply (from memory)"),
               ("catch_up", "catch_up, deltas=True"), ("catch_up_nodelta", "catch_up, deltas=False"))


def apply_part(d, a, payload):
    batches = [int(x) for x in a.batches.split(",")]
    nmax = max(a.apply_entries if b > 1 else a.batch1_entries for b in batches)
    path = os.path.join(d, "apply")
    build_log(path, "g", nmax, payload)
    rows, sizes = [], {}
    for b in batches:
        n = a.batch1_entries if b == 1 else a.apply_entries
        sizes[b] = n
        for kind, label in APPLY_KINDS:
            if kind == "bare":
                f = lambda n, b=b: bare_apply(d, n, b, payload)  # noqa: E731
            else:
                f = lambda n, b=b, k=kind: state_apply(path, n, b, k, payload)  # noqa: E731
            rows.append(Row(f"b={b} {label}", lambda f=f, n=n: f(n), lambda f=f, n=n, b=b: f(max(b, n // 10))))
    t0 = time.perf_counter()
    res = run_rounds(rows, a.rounds)
    elapsed = time.perf_counter() - t0
    shutil.rmtree(path, ignore_errors=True)
    out = []
    for b in batches:
        base = res[f"b={b} bare apsw"]
        for _kind, label in APPLY_KINDS:
            r = res[f"b={b} {label}"]
            out.append([f"{b:,}", f"{sizes[b]:,}", label, f"{r.med('rate'):,.0f}", f"{r.ratio('rate', base):.2f}x"])
    table = md_table(["entries / txn", "entries", "applied by", "entries/s", "vs bare apsw"], out)
    md = (f"**Apply throughput.** {a.payload}-byte entries, one `INSERT OR REPLACE` into `kv(k INTEGER PRIMARY "
          f"KEY, v BLOB)` each, one transaction per batch; every row from a fresh state database; "
          f"{a.rounds} interleaved rounds after one warm-up per row, medians ({elapsed:.0f} s)\n\n{table}\n")
    return res, md, elapsed


# ---------------------------------------------------------------------------------------- restart
def restart_build(d, n, tail, payload):
    """Two data_dirs with ``n`` committed entries all applied (clean close), the second also with a state
    snapshot at the last index (``state.snapshot()``) and the log compacted to its last ``tail`` entries; and a copy of the state database
    when it was ``tail`` entries behind. Returns ``{snapshot?: (path, state db)}``, the copy behind."""
    path = os.path.join(d, f"log{n}")
    build_log(path, "g", n, payload)
    behind = os.path.join(d, f"state{n}-behind.db")
    with open_store(path) as s:
        st = s.state("g", schema=KV, apply=kv_apply)
        st.catch_up(upto=max(0, n - tail), batch=8192)
        src = st.path
    copy_db(src, behind)  # closed cleanly: the database is checkpointed, its WAL gone
    with open_store(path) as s:
        s.state("g", schema=KV, apply=kv_apply).catch_up(batch=8192)
    snap = path + "-snap"
    shutil.copytree(path, snap)
    with open_store(snap) as s:
        st = s.state("g", schema=KV, apply=kv_apply)
        st.snapshot()
        s.log("g").compact(max(0, n - tail))
        snap_db = st.path
    return {False: (path, src), True: (snap, snap_db)}, behind


def resume(path, n, state_db=None, behind=None):
    """Open + state() + catch_up(); figures: open, state, catch_up, total seconds, validated entries."""
    if behind is not None:
        copy_db(behind, state_db)
    t0 = time.perf_counter()
    s = open_store(path)
    t1 = time.perf_counter()
    try:
        st = s.state("g", schema=KV, apply=kv_apply)
        t2 = time.perf_counter()
        st.catch_up()
        t3 = time.perf_counter()
        if st.last_applied != n:
            raise AssertionError(f"resumed to {st.last_applied}, expected {n}")
        validated = s.recovery_report.entries_validated
    finally:
        s.close()
    return {"open": t1 - t0, "state": t2 - t1, "catch_up": t3 - t2, "total": t3 - t0,
            "validated": validated}


SNAP_LABEL = {False: "no snapshot, whole log", True: "snapshot at the last index, log compacted to the tail"}


def restart_part(d, a, payload):
    sizes = [int(x) for x in a.log_entries.split(",")]
    rows, built = [], {}
    t0 = time.perf_counter()
    for n in sizes:
        built[n] = restart_build(d, n, a.resume_tail, payload)
    build_s = time.perf_counter() - t0
    whats = ("up to date", f"{a.resume_tail:,} behind")
    for n in sizes:
        dirs, behind = built[n]
        for snap, (path, db) in dirs.items():
            rows += [Row(f"{n:,} snap={snap} {whats[0]}", lambda p=path, n=n: resume(p, n)),
                     Row(f"{n:,} snap={snap} {whats[1]}", lambda p=path, n=n, db=db, b=behind: resume(p, n, db, b))]
    t0 = time.perf_counter()
    res = run_rounds(rows, a.rounds)
    elapsed = time.perf_counter() - t0
    for n in sizes:
        for path, _db in built[n][0].values():
            shutil.rmtree(path, ignore_errors=True)
        remove_db(built[n][1])
    small, big = min(sizes), max(sizes)
    out = []
    for snap in (False, True):
        for what in whats:
            for n in sizes:
                r = res[f"{n:,} snap={snap} {what}"]
                ratio = r.ratio("total", res[f"{small:,} snap={snap} {what}"])
                out.append([f"{n:,}", SNAP_LABEL[snap], what, f"{r.med('open') * 1e3:,.1f} ms",
                            f"{r.med('validated'):,.0f}", f"{r.med('state') * 1e3:,.1f} ms",
                            f"{r.med('catch_up') * 1e3:,.1f} ms", f"{r.med('total') * 1e3:,.1f} ms",
                            f"{ratio:.2f}x" if n != small else "1x",
                            target(ratio <= 2, "near-constant (<= 2x)") if n == big and n != small and snap
                            else ""])
    table = md_table(["log entries", "store", "state", "NodeStore.open", "entries validated by open",
                      "store.state()", "catch_up()", "total", f"total vs {small:,}", "target"], out)
    md = (f"**Restart.** Logs of {', '.join(f'{n:,}' for n in sizes)} {a.payload}-byte entries (built with "
          f"FsyncMode.OFF; fixtures {build_s:.0f} s), all committed and applied, store closed cleanly: without "
          f"a snapshot (the whole log kept), or with a state snapshot (`state.snapshot()`) at the last index and "
          f"the log compacted to its last {a.resume_tail:,} entries (`log.compact`: whole sealed segments go); then `NodeStore.open` "
          f"(FULL) + `store.state(...)` + `catch_up()`, with the state up to date or {a.resume_tail:,} entries "
          f"behind (its database put back from a copy); page cache warm; {a.rounds} interleaved rounds after "
          f"one warm-up per row, medians ({elapsed:.0f} s)\n\n{table}\n")
    return res, md, elapsed


# ---------------------------------------------------------------------------------------- snapshot
ROW_BYTES = 1000  # 4 rows per 4 KiB page
ROWS_PER_BULK = 4096  # rows inserted by one bulk entry (4 MiB)
ROWS_PER_UPDATE = 100  # rows changed by one update entry
BULK = struct.Struct("<cqq")


def snap_apply(conn, e):
    """Bulk entries insert ROWS_PER_BULK rows; update entries rewrite ROWS_PER_UPDATE rows."""
    op, lo, hi = BULK.unpack(e.data)
    if op == b"B":
        conn.execute("INSERT INTO kv(k, v) WITH RECURSIVE s(x) AS (SELECT ? UNION ALL SELECT x + 1 FROM s "
                     "WHERE x < ?) SELECT x, randomblob(?) FROM s", (lo, hi, ROW_BYTES))
    else:
        conn.execute("UPDATE kv SET v = randomblob(?) WHERE k BETWEEN ? AND ?", (ROW_BYTES, lo, hi))


@contextlib.contextmanager
def appending(s):
    """Single-entry appends (FULL) to group ``bench`` in a thread for the block (``backup.Appender``, the loop
    the other benchmarks measure with); yields it: its ``samples`` are (start time, latency)."""
    ap = backup_bench.Appender(s, s.log("bench").last_index + 1)
    ap.start()
    try:
        yield ap
    finally:
        ap.stop_evt.set()
        ap.join()


class Updater:
    """Applies one update entry of the state every 10 ms (latency of each ``catch_up``)."""

    def __init__(self, st, limit):
        self.st, self.limit, self.lat = st, limit, []
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.wait(0.01) and self.st.last_applied < self.limit:
            t0 = time.perf_counter()
            self.st.catch_up(upto=self.st.last_applied + 1)
            self.lat.append(time.perf_counter() - t0)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()


class SnapFixture:
    """The store of the snapshot part: group ``state`` holds the state database, group ``bench`` the appends."""

    def __init__(self, d, a):
        self.path = os.path.join(d, "snap")
        self.rows = a.state_mib * MiB // 4096 * 4
        nbulk = -(-self.rows // ROWS_PER_BULK)
        self.delta_entries = max(1, round(self.rows * a.delta_pct / 100 / ROWS_PER_UPDATE))
        # enough update entries for every DELTA row and every updater (one per 10 ms of every snapshot)
        nupd = 20_000 + 2 * self.delta_entries * (a.rounds + 1)
        self.s = s = open_store(self.path)
        s.metadata("state").set_term_and_vote(1, None)
        s.metadata("bench").set_term_and_vote(1, None)
        ents = [LogEntry(k + 1, 1, BULK.pack(b"B", k * ROWS_PER_BULK + 1, min(self.rows, (k + 1) * ROWS_PER_BULK)))
                for k in range(nbulk)]
        span = max(1, self.rows - ROWS_PER_UPDATE)
        for j in range(nupd):
            lo = 1 + (j * 7919 * ROWS_PER_UPDATE) % span
            ents.append(LogEntry(nbulk + j + 1, 1, BULK.pack(b"U", lo, lo + ROWS_PER_UPDATE - 1)))
        for lo in range(0, len(ents), 10_000):
            s.log("state").append(ents[lo:lo + 10_000])
        s.metadata("state").set_commit_index(len(ents))
        s.log("bench").append([LogEntry(1, 1, b"x")])
        self.last = len(ents)
        t0 = time.perf_counter()
        self.st = s.state("state", schema=KV, apply=snap_apply)
        self.st.catch_up(upto=nbulk, batch=16)
        self.load_s = time.perf_counter() - t0
        self.db_bytes = os.path.getsize(self.st.path) + (os.path.getsize(self.st.path + "-wal")
                                                          if os.path.exists(self.st.path + "-wal") else 0)
        # the first snapshot after the load: the session extension holds every inserted row
        with Updater(self.st, self.last) as up:
            time.sleep(0.05)
            t0 = time.perf_counter()
            self.st.snapshot(kind=SnapshotKind.FULL)
            self.first_snapshot_s = time.perf_counter() - t0
        self.first_apply_max = max(up.lat, default=float("nan"))
        s.metadata("blob").set_term_and_vote(1, None)
        s.log("blob").append([LogEntry(1, 1, b"x")])
        s.metadata("blob").set_commit_index(1)

    def raw_copy(self):
        dst = os.path.join(os.path.dirname(self.path), "raw-copy.db")
        t0 = time.perf_counter()
        shutil.copyfile(self.st.path, dst)
        fsync_path(dst)
        dt = time.perf_counter() - t0
        n = os.path.getsize(dst)
        os.unlink(dst)
        return {"s": dt, "bytes": n}

    def store_write(self):
        """The snapshot store alone: the state database's bytes (read in chunk-sized pieces) written as a
        snapshot of group ``blob`` (``store.snapshots(g).write``: CRC32 per chunk, sha256, fsync)."""
        mgr = self.s.snapshots("blob")
        cs = mgr.chunk_size
        t0 = time.perf_counter()
        with open(self.st.path, "rb", buffering=0) as f, mgr.write(1, 1) as w:
            while piece := f.read(cs):
                w.write(piece)
        dt = time.perf_counter() - t0
        return {"s": dt, "bytes": w.meta.size}

    def full(self):
        with appending(self.s) as ap, Updater(self.st, self.last) as up:
            time.sleep(0.05)
            t0 = time.perf_counter()
            meta = self.st.snapshot(kind=SnapshotKind.FULL)
            t1 = time.perf_counter()
        lat = [x for st, x in ap.samples if st >= t0 and st <= t1]
        if meta.kind is not SnapshotKind.FULL:
            raise AssertionError(f"asked for FULL, got {meta.kind}")
        return {"s": t1 - t0, "bytes": meta.size, "p50": pct(lat, 50), "p99": pct(lat, 99), "n": len(lat),
                "apply_max": max(up.lat, default=float("nan")), "applies": len(up.lat)}

    def idle(self, seconds):
        with appending(self.s) as ap:
            time.sleep(seconds)
        lat = [x for _, x in ap.samples]
        return {"p50": pct(lat, 50), "p99": pct(lat, 99), "n": len(lat)}

    def delta(self):
        hi = self.st.last_applied + self.delta_entries
        if hi > self.last:
            raise AssertionError("out of update entries; raise nupd")
        # untimed: a DELTA that takes what the updater of the FULL rows applied, so the timed one holds
        # exactly the changes below
        self.st.snapshot(kind=SnapshotKind.DELTA)
        self.st.catch_up(upto=hi, batch=64)
        t0 = time.perf_counter()
        meta = self.st.snapshot(kind=SnapshotKind.DELTA)
        dt = time.perf_counter() - t0
        return {"s": dt, "bytes": meta.size, "rows": self.delta_entries * ROWS_PER_UPDATE}

    def close(self):
        self.s.close()


def snapshot_part(d, a):
    t0 = time.perf_counter()
    fx = SnapFixture(d, a)
    build_s = time.perf_counter() - t0
    try:
        rows = [Row("raw copy + fsync", fx.raw_copy),
                Row("snapshot store write of the same bytes", fx.store_write),
                Row("FULL snapshot (appends + applies running)", fx.full),
                Row("appends, no snapshot", lambda: fx.idle(a.append_seconds)),
                Row(f"DELTA snapshot after {a.delta_pct:g}% of rows changed", fx.delta)]
        t0 = time.perf_counter()
        res = run_rounds(rows, a.rounds)
        elapsed = time.perf_counter() - t0
        state_bytes = os.path.getsize(fx.st.path)
    finally:
        fx.close()
        shutil.rmtree(fx.path, ignore_errors=True)
    raw, sw, full, idle, delta = (res[r.name] for r in rows)
    mb = lambda x: f"{x / MiB:,.0f} MiB"  # noqa: E731
    t1 = md_table(
        ["what", "bytes", "time", "MiB/s", "vs raw copy + fsync"],
        [["raw copy + fsync of the state db", mb(raw.med("bytes")), f"{raw.med('s'):.2f} s",
          f"{raw.med('bytes') / MiB / raw.med('s'):,.0f}", "1x"],
         ["`store.snapshots(g).write` of the same bytes (no state machine)", mb(sw.med("bytes")),
          f"{sw.med('s'):.2f} s", f"{sw.med('bytes') / MiB / sw.med('s'):,.0f}", f"{raw.med('s') / sw.med('s'):.2f}x"],
         ["`state.snapshot(kind=FULL)`", mb(full.med("bytes")), f"{full.med('s'):.2f} s",
          f"{full.med('bytes') / MiB / full.med('s'):,.0f}", f"{raw.med('s') / full.med('s'):.2f}x"],
         [f"`state.snapshot(kind=DELTA)`, {delta.med('rows'):,.0f} rows changed", f"{delta.med('bytes') / MiB:,.1f} MiB",
          f"{delta.med('s'):.3f} s", "", f"{delta.ratio('s', full):.3f} of FULL's time"]])
    t2 = md_table(
        ["appends (FULL, another group)", "appends", "p50 (µs)", "p99 (µs)", "p99 vs idle"],
        [["idle", f"{idle.med('n'):,.0f}", us(idle.med("p50")), us(idle.med("p99")), "1x"],
         ["during the FULL snapshot", f"{full.med('n'):,.0f}", us(full.med("p50")), us(full.med("p99")),
          f"{full.ratio('p99', idle):.2f}x"]])
    md = (f"**Snapshots of a {state_bytes / MiB:,.0f} MiB state database.** {fx.rows:,} rows of {ROW_BYTES} random "
          f"bytes loaded through `state.apply` in {fx.load_s:.0f} s (fixture {build_s:.0f} s, FsyncMode.FULL; "
          f"the first FULL snapshot after the load took {fx.first_snapshot_s:.1f} s and held an apply for "
          f"{fx.first_apply_max:.2f} s); during each FULL snapshot "
          f"another thread applied one state entry (100 rows updated) every 10 ms: slowest apply "
          f"{full.med('apply_max') * 1e3:,.0f} ms (median over the rounds of each round's slowest); "
          f"{a.rounds} interleaved rounds after one warm-up per row, medians ({elapsed:.0f} s)\n\n{t1}\n\n{t2}\n")
    return res, md, elapsed, {"first_snapshot_s": fx.first_snapshot_s, "first_apply_max_s": fx.first_apply_max, "load_s": fx.load_s,
                              "state_bytes": state_bytes, "db_bytes_after_load": fx.db_bytes}


PARTS = ("apply", "restart", "snapshot")


def parser():
    """The command line of the script (README arguments are its defaults spelled out)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--apply-entries", type=int, default=200_000)
    ap.add_argument("--batch1-entries", type=int, default=20_000, help="entries of the b=1 rows")
    ap.add_argument("--batches", default="1,64,1024")
    ap.add_argument("--payload", type=int, default=100)
    ap.add_argument("--log-entries", default="10000,1000000")
    ap.add_argument("--resume-tail", type=int, default=1000)
    ap.add_argument("--state-mib", type=int, default=1024)
    ap.add_argument("--delta-pct", type=float, default=1.0)
    ap.add_argument("--append-seconds", type=float, default=2.0, help="idle appends per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row; the median is kept")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    ap.add_argument("--json", metavar="FILE", help="also write every row's rounds and medians to FILE")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 1 round")
    return ap


def main(argv=None):
    """Run the benchmark; prints per-round values and the tables; returns the README markdown."""
    ap = parser()
    a = ap.parse_args(argv)
    if a.quick:
        a.apply_entries, a.batch1_entries, a.log_entries, a.resume_tail = 2000, 200, "500,2000", 100
        a.state_mib, a.append_seconds, a.rounds = 4, 0.1, 1
    parts = a.parts.split(",")
    if set(parts) - set(PARTS):
        ap.error(f"unknown part(s): {sorted(set(parts) - set(PARTS))}")
    payload = os.urandom(a.payload)
    d = workdir()
    start = run_start()
    mds, doc = [], {"meta": None, "args": vars(a)}
    sec = lambda v: f"{v:.3f}"  # noqa: E731
    try:
        if "apply" in parts:
            res, md, el = apply_part(d, a, payload)
            print_rounds(res, [("rate", "entries/s", lambda v: f"{v:,.0f}")], "apply: per-round values")
            mds.append(md)
            doc["apply"] = {"elapsed_s": el, "rows": results_json(res)}
        if "restart" in parts:
            res, md, el = restart_part(d, a, payload)
            print_rounds(res, [("open", "open s", sec), ("total", "total s", sec)], "restart: per-round values")
            mds.append(md)
            doc["restart"] = {"elapsed_s": el, "rows": results_json(res)}
        if "snapshot" in parts:
            res, md, el, extra = snapshot_part(d, a)
            print_rounds(res, [("s", "s", sec), ("p99", "p99 s", lambda v: f"{v:.4f}"),
                               ("apply_max", "apply max s", sec)], "snapshot: per-round values")
            mds.append(md)
            doc["snapshot"] = {"elapsed_s": el, **extra, "rows": results_json(res)}
    finally:
        shutil.rmtree(d, ignore_errors=True)
    md = "\n".join(mds)
    print("\n" + md)
    if a.json:
        doc["meta"] = run_meta("benchmarks/sqlstate.py", argv, start)
        write_json(a.json, doc)
    return md


if __name__ == "__main__":
    main()
