"""Background-work isolation: does a snapshot, a hot backup, a prune, a compaction or a checkpoint stall the log?

    python benchmarks/background.py [--snapshot-mib 512] [--backup-mb 300] [--compact-segments 32]
                                    [--checkpoint-mib 128] [--idle-seconds 1] [--conc-seconds 1.5]
                                    [--rounds 3] [--split-fsync] [--shrink-step BYTES] [--json PATH] [--quick]

One table, every figure a same-run ratio. The foreground is one thread of single-entry FULL appends
(``backup.Appender``: the loop of benchmarks/backup.py) on group ``bench`` of a store opened with the
defaults, measured while each of these runs on another thread of the same process:

* **idle**: nothing (``--idle-seconds``); the baseline of every ratio below;
* **snapshot**: ``store.snapshots(g).write(...)`` of ``--snapshot-mib`` MiB with the manager's defaults
  (chunk size, commit bytes), unpaced;
* **backup**: ``HotBackupManager(store, dir).backup()`` (defaults) of a store of ``--backup-mb`` MB (the
  copy is removed after the window);
* **prune**: ``HotBackupManager(store, dir).prune(keep=1)`` removing one older backup of that store (a
  newer one is taken before the window): the removal of a few hundred MB of files next to the node, with
  ``fsio.SHRINK_STEP_BYTES`` (``--shrink-step``; 0: a plain unlink);
* **compaction**: ``log.compact(up_to)`` of another group whose log holds ``--compact-segments`` sealed
  segments of the default SegmentPolicy, all covered by a durable snapshot (the store is a fresh fsynced
  copy of a template built once);
* **checkpoint**: a raft.db WAL of ``--checkpoint-mib`` MiB (appends to another group while a reader held
  every checkpoint back, as a hot backup's copy does) that the store checkpoints itself once the reader
  lets go (``--checkpoint-by store``, the default: the window lasts until the -shm index shows every
  frame copied); or checkpointed by ``NodeStore.checkpoint()`` (``api``) or by
  ``PRAGMA wal_checkpoint(TRUNCATE)`` on a second connection (``pragma``, which holds the writer lock
  for the whole copy: no store does that on its own). The window starts when the reader lets go, so an
  append that runs SQLite's own autocheckpoint of that WAL is counted too.

Between episodes the previous one's files are removed and ``os.sync()`` runs (then 0.2 s of rest), so
that no episode pays for another's leftovers.

An append counts in a window if it overlaps it (one that straddles the end is the stall). Figures per
row: p50, p99, max (worst stall), n (appends in the window, printed); targets: p99 <= 2x idle, max <= 20 ms.
A short work that blocks the writer once (the checkpoint) gives a window of one long append plus however
many others fit around it: there the max is the figure to read, the p99 swings with n.

Evidence, per background row:

* a second foreground row, **raw 4 KiB overwrite + fdatasync** of a file of its own beside the store,
  during the same background work (a row of its own, not concurrent with the appends): the disk's share
  of a stall; its p99 and max are printed beside the appends';
* peak ``Dirty`` and ``Writeback`` of /proc/meminfo and peak size of the store's raft.db-wal, sampled every
  10 ms by a thread during the window (Dirty/Writeback are machine-wide);
* with ``--split-fsync`` (off by default: it routes the store's files through a Python apsw VFS, which
  takes the GIL on every I/O of every thread), the store is opened with a timing VFS (``NodeStore.open``'s
  ``vfs=`` seam) that records every fdatasync of raft.db-wal; each append's time is split into the WAL
  fsyncs overlapping it and the rest (p99 of each).

Then the throughput rows: snapshot write alone vs a raw write + fsync of the same bytes (``snapshot.py``'s
``raw_write``; target >= 0.7x), backup alone vs ``copyfile`` + fsync of the store's files (``backup.py``'s
``raw_copy``; target >= 0.5x), and 8 FULL single-entry writers (``append_next``, one group) vs one writer
(``append.py``'s ``bench_concurrent`` and ``bench_store``; target >= 4x).

Every row is measured by the shared round runner (_common.run_rounds: one untimed warm-up per row,
``--rounds`` interleaved rounds with the order rotating, medians; ratios are ratios of medians).
``--json PATH`` writes every figure and every round's values (``rows``: per row name, e.g. ``appends |
snapshot``, its rounds and medians), ``summary`` (per background kind: p50, p99, max and p99 vs idle of the
appends and of the raw fdatasync probe) and the run's date, commit and load (``meta``).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import shutil
import sys
import threading
import time

import apsw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import append as append_bench  # noqa: E402
import backup as backup_bench  # noqa: E402
import snapshot as snapshot_bench  # noqa: E402
from _common import (  # noqa: E402
    Row,
    fsync_path,
    latency_figures,
    md_table,
    pct,
    print_rounds,
    run_meta,
    run_rounds,
    run_start,
    target,
    us,
    workdir,
    write_json,
)

from raft_sqlite import FsyncMode, HotBackupManager, LogEntry, NodeStore, SegmentPolicy, fsio  # noqa: E402

MiB = 1 << 20
KINDS = ("idle", "snapshot", "backup", "prune", "compaction", "checkpoint")
FG_APP, FG_RAW = "appends", "raw fdatasync"
STALL_TARGET = 0.020
VFS_NAME = "rsq-bench-timing"


# ---------------------------------------------------------------------------------------- evidence
def settle():
    """Between episodes: flush what the previous one left (its files' removal included) so that no
    episode pays for another's leftovers."""
    os.sync()
    time.sleep(0.2)


def wait_backfilled(s, salts0, deadline):
    """Wait until every frame of raft.db's WAL generation ``salts0`` is in raft.db (or a new WAL
    generation began, which SQLite starts only after a complete checkpoint), as read from the -shm index:
    the store's own checkpointing (inline or background) has caught up."""
    while time.perf_counter() < deadline:
        salts, mx, backfilled = s.kernel.hwm.current()
        if backfilled >= mx or salts != salts0:
            return
        time.sleep(0.001)
    raise AssertionError("the store did not checkpoint its WAL within 30 s")


class Sampler:
    """Every ``period`` s until stopped: peak Dirty and Writeback (/proc/meminfo, MiB) and peak size of
    ``wal_path`` (MiB)."""

    def __init__(self, wal_path, period=0.01):
        self.wal_path, self.period = wal_path, period
        self.dirty = self.writeback = self.wal = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        with contextlib.suppress(OSError), open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Dirty:"):
                    self.dirty = max(self.dirty, int(line.split()[1]) / 1024)
                elif line.startswith("Writeback:"):
                    self.writeback = max(self.writeback, int(line.split()[1]) / 1024)
        with contextlib.suppress(OSError):
            self.wal = max(self.wal, os.path.getsize(self.wal_path) / MiB)

    def _run(self):
        self._sample()
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def figures(self):
        return {"dirty_mib": self.dirty, "writeback_mib": self.writeback, "wal_mib": self.wal}


class Prober(threading.Thread):
    """The raw foreground: 4 KiB overwrite + fdatasync of a pre-written file of its own, in a loop (what
    _common.fsync_loop_baseline times); records (start, latency) like backup.Appender."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path = path
        self.samples = []
        self.stop_evt = threading.Event()

    def run(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"\0" * MiB)
            os.fsync(fd)
            buf, i = os.urandom(4096), 0
            while not self.stop_evt.is_set():
                t0 = time.perf_counter()
                os.pwrite(fd, buf, (i % 16) * 4096)
                os.fdatasync(fd)
                self.samples.append((t0, time.perf_counter() - t0))
                i += 1
        finally:
            os.close(fd)
            os.unlink(self.path)


class TimingFile(apsw.VFSFile):
    """A file of the default VFS whose xSync is timed when it is a ``-wal`` file."""

    def __init__(self, vfs, name, flags):
        fn = name.filename() if isinstance(name, apsw.URIFilename) else (name or "")
        self._log = vfs.wal_syncs if fn.endswith("-wal") else None
        super().__init__("", name, flags)

    def xSync(self, flags):  # noqa: N802 - apsw's method name
        t0 = time.perf_counter()
        try:
            super().xSync(flags)
        finally:
            if self._log is not None:
                self._log.append((t0, time.perf_counter()))


class TimingVFS(apsw.VFS):
    """The default VFS with every fdatasync of a WAL file recorded as (start, end) in ``wal_syncs``."""

    def __init__(self):
        self.wal_syncs = []
        super().__init__(VFS_NAME, "")

    def xOpen(self, name, flags):  # noqa: N802 - apsw's method name
        return TimingFile(self, name, flags)


def overlap_split(samples, syncs):
    """For each append (start, latency): the seconds of WAL fsyncs (sorted, non-overlapping (start, end)
    intervals) that overlap it. Returns the list of those seconds, in the samples' order."""
    ends = [e for _, e in syncs]
    out = []
    for t0, lat in samples:
        t1, k, s = t0 + lat, bisect.bisect_right(ends, t0), 0.0
        while k < len(syncs) and syncs[k][0] < t1:
            s += min(t1, syncs[k][1]) - max(t0, syncs[k][0])
            k += 1
        out.append(s)
    return out


def in_window(samples, w0, w1):
    """The (start, latency) samples that overlap [w0, w1] (an append straddling either end counts)."""
    return [(t, lat) for t, lat in list(samples) if t < w1 and t + lat > w0]


# ---------------------------------------------------------------------------------------- episodes
class Bench:
    """The fixtures of one run (templates built once, the long-lived backup store) and one episode per
    (background kind, foreground) call."""

    def __init__(self, a, d):
        self.a, self.d = a, d
        self.vfs = TimingVFS() if a.split_fsync else None
        self.k = 0
        self.snap_size = a.snapshot_mib * MiB
        probe = NodeStore.open(os.path.join(d, "probe"), "bench", cluster_id="bench")
        m = probe.snapshots("snap")
        self.chunk, self.commit = m.chunk_size, m.commit_bytes  # the manager's defaults
        probe.close()
        shutil.rmtree(os.path.join(d, "probe"))
        self.bufs = [os.urandom(self.chunk) for _ in range(4)]
        self.seg_entries = SegmentPolicy().max_entries
        self.compact_upto = a.compact_segments * self.seg_entries
        has_api = callable(getattr(NodeStore, "checkpoint", None))
        if a.checkpoint_by == "api" and not has_api:
            raise SystemExit("--checkpoint-by api: this NodeStore has no checkpoint() method")
        self.checkpoint_api = a.checkpoint_by == "api" or (a.checkpoint_by == "auto" and has_api)
        self.checkpoint_by = a.checkpoint_by
        t0 = time.perf_counter()
        self.backup_src = os.path.join(d, "backup-src")
        backup_bench.build(self.backup_src, a.backup_mb, 4096, 4)
        self.backup_store = self.open(self.backup_src)
        self.backup_dir = os.path.join(d, "backups")
        self.made = []
        HotBackupManager(self.backup_store, self.backup_dir).backup()  # the first one the prune row removes
        self.compact_tpl = os.path.join(d, "compact-template")
        self.build_compaction_template()
        print(f"fixtures built in {time.perf_counter() - t0:.1f} s: backup store "
              f"{sum(os.path.getsize(p) for p in self.backup_files()) / 1e6:,.0f} MB; compaction template "
              f"{self.compact_upto:,} entries of {a.compact_payload} B in {a.compact_segments} sealed segments "
              f"of {self.seg_entries:,}; snapshot chunk {self.chunk >> 10} KiB, commit {self.commit / MiB:g} MiB; "
              f"checkpoint by {self.checkpoint_how()}",
              flush=True)

    def open(self, path):
        return NodeStore.open(path, "bench", cluster_id="bench", fsync=FsyncMode.FULL,
                              vfs=VFS_NAME if self.vfs else None)

    def fresh(self):
        self.k += 1
        return os.path.join(self.d, f"s{self.k}")

    def backup_files(self):
        return [os.path.join(self.backup_src, n) for n in ("raft.db", "chunks.db")]

    def build_compaction_template(self):
        a, n = self.a, self.compact_upto
        blob = os.urandom(a.compact_payload)
        with NodeStore.open(self.compact_tpl, "bench", cluster_id="bench", fsync=FsyncMode.OFF) as s:
            lg = s.log("bulk")
            i = 1
            while i <= n + 100:  # the last 100 entries stay in the open segment
                k = min(4096, n + 100 - i + 1)
                lg.append([LogEntry(i + j, 1, blob) for j in range(k)])
                i += k
            s.metadata("bulk").set_commit_index(n)
            s.log("bench").append([LogEntry(1, 1, b"x")])
        s = NodeStore.open(self.compact_tpl, "bench", cluster_id="bench", fsync=FsyncMode.FULL)
        try:
            with s.snapshots("bulk").write(n, 1) as w:
                w.write(b"state")
        finally:
            s.close()

    def copy_template(self):
        """A fresh copy of the compaction template, every file and the directory fsynced (untimed)."""
        path = self.fresh()
        shutil.copytree(self.compact_tpl, path)
        for name in os.listdir(path):
            p = os.path.join(path, name)
            if os.path.isfile(p):
                fsync_path(p)
        fsync_path(path)  # the directory: the copies' names
        return path

    def checkpoint_how(self):
        if self.checkpoint_by == "store":
            return "the store itself (appends going on)"
        return "NodeStore.checkpoint()" if self.checkpoint_api else "wal_checkpoint(TRUNCATE)"

    def snapshot_write(self, s):
        t, _ = snapshot_bench.snapshot_write(s, self.snap_size, self.chunk, self.commit, self.bufs, None)
        return {"bg_s": t, "bg_bytes": self.snap_size}

    def backup(self):
        t0 = time.perf_counter()
        info = HotBackupManager(self.backup_store, self.backup_dir).backup()
        t = time.perf_counter() - t0
        self.made.append(info.path)  # removed after the window (its removal is the prune row's work)
        return {"bg_s": t, "bg_bytes": info.size}

    def remove_made(self):
        while self.made:
            fsio.rmtree(self.made.pop())
        settle()

    def prune(self):
        """The prune row: a backup is taken before the window (outside it); the window is
        ``prune(keep=1)`` removing the previous one (one backup of the backup store's size)."""
        m = HotBackupManager(self.backup_store, self.backup_dir)
        m.backup()
        settle()
        size = m.list()[-1]["size"]

        def work():
            t0 = time.perf_counter()
            removed = m.prune(keep=1)
            assert len(removed) == 1, removed
            return {"bg_s": time.perf_counter() - t0, "bg_bytes": size}
        return work

    def prepare(self, kind):
        """(store, work, cleanup) of one episode; ``work()`` runs the background work and returns its
        figures."""
        if kind == "backup":
            return self.backup_store, self.backup, self.remove_made
        if kind == "prune":
            return self.backup_store, self.prune(), settle
        if kind == "compaction":
            path = self.copy_template()
            s = self.open(path)
            up = self.compact_upto

            def work():
                t0 = time.perf_counter()
                s.log("bulk").compact(up)
                return {"bg_s": time.perf_counter() - t0, "bg_entries": up}
        else:
            path = self.fresh()
            s = snapshot_bench.setup(path)  # groups "snap" (commit index 1) and "app"; FULL
            if self.vfs:  # reopen through the timing VFS
                s.close()
                s = self.open(path)
            if kind == "idle":
                def work():
                    time.sleep(self.a.idle_seconds)
                    return {"bg_s": self.a.idle_seconds}
            elif kind == "snapshot":
                def work():
                    return self.snapshot_write(s)
            else:  # checkpoint
                reader = apsw.Connection(s.path)
                reader.setbusytimeout(10_000)
                reader.execute("BEGIN")
                reader.execute("SELECT count(*) FROM sqlite_master").fetchall()  # holds every checkpoint back
                lg, blob = s.log("bulk"), os.urandom(4096)
                n = self.a.checkpoint_mib * MiB // 4096
                for i in range(1, n + 1, 256):
                    lg.append([LogEntry(i + j, 1, blob) for j in range(min(256, n - i + 1))])
                wal_before = os.path.getsize(s.path + "-wal")

                def work():
                    salts0 = s.kernel.hwm.current()[0]
                    t0 = time.perf_counter()
                    reader.execute("COMMIT")
                    if self.checkpoint_by == "store":  # the store's own checkpointing, appends going on
                        # one commit of another group: what starts the store's checkpointing when the
                        # foreground is not the store (the raw fdatasync probe row)
                        ap = s.log("app")
                        ap.append([LogEntry(ap.last_index + 1, 1, b"go")])
                        wait_backfilled(s, salts0, t0 + 30)
                    elif self.checkpoint_api:
                        s.checkpoint()
                    else:
                        reader.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                    return {"bg_s": time.perf_counter() - t0, "bg_bytes": wal_before}

                def cleanup():
                    reader.close()
                    s.close()
                    fsio.rmtree(path)
                    settle()
                return s, work, cleanup

        def cleanup():
            s.close()
            fsio.rmtree(path)
            settle()
        return s, work, cleanup

    def episode(self, kind, fg):
        """One measurement: the foreground ``fg`` runs (0.05 s untimed first), the background work of
        ``kind`` runs on this thread; figures of the foreground in the work's window + evidence."""
        s, work, cleanup = self.prepare(kind)
        try:
            if fg == FG_APP:
                th = backup_bench.Appender(s, s.log("bench").last_index + 1)
            else:
                th = Prober(os.path.join(self.d, f"probe-{self.k}.bin"))
            if self.vfs:
                self.vfs.wal_syncs.clear()
            th.start()
            time.sleep(0.05)
            with Sampler(s.path + "-wal") as smp:
                w0 = time.perf_counter()
                f = work()
                w1 = time.perf_counter()
            th.stop_evt.set()
            th.join()
        finally:
            cleanup()
        win = in_window(th.samples, w0, w1)
        lat = [x for _, x in win]
        f.update(p50=pct(lat, 50), p99=pct(lat, 99), max=max(lat, default=float("nan")), n=len(lat),
                 **smp.figures())
        if self.vfs and fg == FG_APP:
            syncs = sorted(self.vfs.wal_syncs)
            sy = overlap_split(win, syncs)
            f.update(sync_p99=pct(sy, 99), rest_p99=pct([x - y for x, y in zip(lat, sy)], 99))
        return f

    # ---------------------------------------------------------------- throughput rows
    def raw_write(self):
        return snapshot_bench.raw_write(self.d, self.snap_size, self.chunk, self.bufs)

    def snapshot_alone(self):
        path = self.fresh()
        s = snapshot_bench.setup(path)
        try:
            return self.snapshot_write(s)
        finally:
            s.close()
            shutil.rmtree(path)

    def raw_copy(self):
        dst = self.fresh()
        n, dt = backup_bench.raw_copy(self.backup_src, dst)
        shutil.rmtree(dst)
        return {"bg_s": dt, "bg_bytes": n}

    def rows(self):
        a, rows = self.a, []
        for kind in KINDS:
            for fg in (FG_APP, FG_RAW):
                rows.append(Row(f"{fg} | {kind}", lambda k=kind, g=fg: self.episode(k, g)))
        rows += [Row("raw write + fsync", self.raw_write), Row("snapshot write alone", self.snapshot_alone),
                 Row("raw copy + fsync", self.raw_copy), Row("backup alone", self.backup)]
        payload = os.urandom(100)
        rows += [Row("1 writer", lambda: latency_figures(
                     append_bench.bench_store(self.d, FsyncMode.FULL, 1, a.conc_seconds, payload)),
                     lambda: append_bench.bench_store(self.d, FsyncMode.FULL, 1, 0.1, payload)),
                 Row("8 writers", lambda: append_bench.bench_concurrent(self.d, FsyncMode.FULL, 1, a.conc_seconds,
                                                                       payload),
                     lambda: append_bench.bench_concurrent(self.d, FsyncMode.FULL, 1, 0.1, payload))]
        return rows

    def close(self):
        self.backup_store.close()
        if self.vfs:
            self.vfs.unregister()


# ---------------------------------------------------------------------------------------- table
def mb(res):
    return res.med("bg_bytes") / res.med("bg_s") / 1e6


def bg_cell(kind, r, b):
    if kind == "idle":
        return f"none ({r.med('bg_s'):g} s window)"
    if kind == "snapshot":
        return f"snapshot {b.a.snapshot_mib} MiB in {r.med('bg_s'):.2f} s ({mb(r):,.0f} MB/s)"
    if kind == "backup":
        return f"backup {r.med('bg_bytes') / 1e6:,.0f} MB in {r.med('bg_s'):.2f} s ({mb(r):,.0f} MB/s)"
    if kind == "prune":
        step = f"in {fsio.SHRINK_STEP_BYTES >> 20} MiB steps" if fsio.SHRINK_STEP_BYTES else "plain unlink"
        return f"prune(keep=1): 1 backup of {r.med('bg_bytes') / 1e6:,.0f} MB removed ({step}) in {r.med('bg_s'):.2f} s"
    if kind == "compaction":
        return (f"compact {b.a.compact_segments} segments ({r.med('bg_entries'):,.0f} entries) in "
                f"{r.med('bg_s'):.2f} s")
    how = b.checkpoint_how()
    return f"{how} of a {r.med('bg_bytes') / MiB:,.0f} MiB WAL in {r.med('bg_s'):.2f} s"


def table(res, b):
    """The one table (markdown) and the summary dict of its figures."""
    split = b.vfs is not None
    idle, ridle = res[f"{FG_APP} | idle"], res[f"{FG_RAW} | idle"]
    rows, summary = [], {}

    def mx(r):
        return f"{us(r.med('max'))} (worst {us(max(r.values('max')))})"

    for kind in KINDS:
        r, raw = res[f"{FG_APP} | {kind}"], res[f"{FG_RAW} | {kind}"]
        q, qr = r.ratio("p99", idle), raw.ratio("p99", ridle)
        stall = r.med("max")
        tg = "" if kind == "idle" else (target(q <= 2, "p99 <= 2x") + "; " + target(stall <= STALL_TARGET, "max <= 20 ms"))
        row = [f"appends during {kind}" if kind != "idle" else "appends idle", us(r.med("p50")), us(r.med("p99")), mx(r),
               "1.00x" if kind == "idle" else f"{q:.2f}x idle p99", tg,
               f"{bg_cell(kind, r, b)}; {r.med('n'):,.0f} appends",
               f"{r.med('dirty_mib'):,.0f} / {r.med('writeback_mib'):,.0f}", f"{r.med('wal_mib'):,.1f}",
               f"{us(raw.med('p99'))} / {mx(raw)}; p99 {qr:.2f}x idle"]
        if split:
            row.append(f"{us(r.med('sync_p99'))} / {us(r.med('rest_p99'))}")
        rows.append(row)
        summary[kind] = {"p50": r.med("p50"), "p99": r.med("p99"), "max": stall, "p99_vs_idle": q,
                         "raw_p99": raw.med("p99"), "raw_max": raw.med("max"), "raw_p99_vs_idle": qr}
    blank = [""] * (4 if split else 3)
    sw, rw = res["snapshot write alone"], res["raw write + fsync"]
    q = mb(sw) / (b.snap_size / rw.med("s") / 1e6)
    rows.append(["snapshot write alone (defaults, unpaced)", "", "", "", f"{q:.2f}x raw write + fsync", target(q >= 0.7, ">= 0.7x"),
                 f"{mb(sw):,.0f} MB/s vs {b.snap_size / rw.med('s') / 1e6:,.0f} MB/s", *blank])
    summary["snapshot_vs_raw"] = q
    bk, rc = res["backup alone"], res["raw copy + fsync"]
    q = mb(bk) / mb(rc)
    rows.append(["HotBackupManager.backup() alone (defaults)", "", "", "", f"{q:.2f}x raw copy + fsync",
                 target(q >= 0.5, ">= 0.5x"), f"{mb(bk):,.0f} MB/s vs {mb(rc):,.0f} MB/s", *blank])
    summary["backup_vs_raw"] = q
    one, eight = res["1 writer"], res["8 writers"]
    q = eight.ratio("rate", one)
    rows.append(["8 FULL single-entry writers (append_next, 1 group)", us(eight.med("p50")), us(eight.med("p99")), "",
                 f"{q:.2f}x 1 writer", target(q >= 4, ">= 4x"),
                 f"{eight.med('rate'):,.0f} vs {one.med('rate'):,.0f} entries/s; mean batch "
                 f"{eight.med('mean_batch'):.1f}", *blank])
    summary["writers8_vs_1"] = q
    header = ["row", "p50 us", "p99 us", "max us", "vs same-run baseline", "target", "work",
              "Dirty / Writeback peak MiB", "raft.db-wal peak MiB", "raw 4 KiB fdatasync p99 / max us, same work"]
    if split:
        header.append("append p99: WAL fdatasync / rest us")
    return md_table(header, rows), summary


def main(argv=None):
    """Run the background-isolation benchmark; prints per-round values and the table; returns markdown."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snapshot-mib", type=int, default=512, help="snapshot size (MiB)")
    ap.add_argument("--backup-mb", type=int, default=300, help="log payload of the backed-up store (MiB)")
    ap.add_argument("--compact-segments", type=int, default=32,
                    help="sealed segments (of the default SegmentPolicy) removed by the compaction")
    ap.add_argument("--compact-payload", type=int, default=100, help="payload bytes of the compacted entries")
    ap.add_argument("--checkpoint-mib", type=int, default=128, help="size of the WAL checkpointed (MiB)")
    ap.add_argument("--checkpoint-by", choices=("store", "auto", "api", "pragma"), default="store",
                    help="how the big WAL is checkpointed: by the store itself while appends go on (store, the "
                    "default), NodeStore.checkpoint() (api), PRAGMA wal_checkpoint(TRUNCATE) on a second connection "
                    "(pragma), or api if the store has it, else pragma (auto)")
    ap.add_argument("--idle-seconds", type=float, default=1.0, help="the idle window")
    ap.add_argument("--conc-seconds", type=float, default=1.5, help="duration of the 1 vs 8 writers rows")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row; the median is kept")
    ap.add_argument("--split-fsync", action="store_true",
                    help="open the stores through a timing VFS and split each append into WAL fdatasync / rest")
    ap.add_argument("--shrink-step", type=int, default=None, metavar="BYTES",
                    help="fsio.SHRINK_STEP_BYTES for this run: big files are truncated in steps of BYTES before they "
                    "are unlinked (default: the library's; 0: a plain unlink, the code before issue 13's prune fix)")
    ap.add_argument("--json", metavar="PATH", help="write every figure and every round's values to PATH")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 32 MiB snapshot, 32 MB backup, 2 segments, 16 MiB WAL, 0.3 s windows, 2 rounds")
    a = ap.parse_args(argv)
    if a.quick:
        a.snapshot_mib, a.backup_mb, a.compact_segments, a.checkpoint_mib = 32, 32, 2, 16
        a.idle_seconds, a.conc_seconds, a.rounds = 0.3, 0.3, 2
    if a.shrink_step is not None:
        fsio.SHRINK_STEP_BYTES = a.shrink_step
    d = workdir()
    b = None
    start = run_start()
    try:
        t0 = time.perf_counter()
        b = Bench(a, d)
        res = run_rounds(b.rows(), a.rounds)
        elapsed = time.perf_counter() - t0
    finally:
        if b is not None:
            b.close()
        shutil.rmtree(d, ignore_errors=True)
    print_rounds(res, [("p99", "p99 us", us), ("max", "max us", us), ("bg_s", "work s", lambda v: f"{v:.2f}"),
                       ("wal_mib", "WAL MiB", lambda v: f"{v:.1f}"), ("rate", "entries/s", lambda v: f"{v:,.0f}"),
                       ("s", "s", lambda v: f"{v:.2f}")])
    t, summary = table(res, b)
    md = (f"single-entry FULL appends (100 B, one thread) on a store opened with the defaults, against each "
          f"background work on another thread; {a.rounds} interleaved rounds after one warm-up per row; median of "
          f"the rounds ({elapsed:.0f} s); max = median of the rounds' worst append (and the worst of any round); "
          f"Dirty/Writeback are machine-wide\n\n{t}\n")
    print("\n" + md)
    if a.json:
        write_json(a.json, {"meta": run_meta("benchmarks/background.py", argv, start), "args": vars(a),
                            "elapsed_s": elapsed, "kinds": list(KINDS), "summary": summary,
                            "rows": {name: {"rounds": r.rounds,
                                            "median": {k: r.med(k) for k in r.rounds[0]
                                                       if all(isinstance(x.get(k), (int, float)) for x in r.rounds)}}
                                     for name, r in res.items()}})
    return md


if __name__ == "__main__":
    main()
