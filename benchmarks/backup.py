"""Hot backup speed and its cost to appends, against baselines measured in the same run.

    python benchmarks/backup.py [--size-mb 1024] [--payload 4096] [--groups 4] [--rounds 3] [--quick]

Builds a store of about ``--size-mb`` MiB of log payload (fsync OFF while building), then, with the
store reopened in FULL mode:

* raw copy baseline: ``shutil.copyfile`` of raft.db and chunks.db + fsync of each copy (MB/s), and the
  same plus a sha256 of each copy (what any checksummed copy pays; for context);
* ``HotBackupManager.backup()`` (online backup API in steps, sha256 of every file, fsync, manifest);
* p50/p99 latency of single-entry appends (FULL, 100-byte payload, one thread running throughout) in an
  idle window of ``--idle-seconds`` and while a backup runs, plus the largest size the WAL reached during
  the backups (the backup's read snapshot holds checkpoints back).

The four rows (raw copy, raw copy + sha256, backup, idle window) are measured by the shared round runner
(_common.run_rounds: one untimed warm-up each, ``--rounds`` interleaved rounds with the order rotating,
medians; ratios are ratios of medians). The source store is read as the build left it in the page cache
(not dropped: all three copy rows see the same state).

Targets (not asserted): backup >= 50% of raw copy speed; append p99 during backup <= 2x idle.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import contextlib

from _common import Row, fsync_path, md_table, pct, print_rounds, run_rounds, target, us, workdir  # noqa: E402

from raft_sqlite import FsyncMode, LogEntry, NodeStore  # noqa: E402
from raft_sqlite.backup import HotBackupManager  # noqa: E402


def build(path, size_mb, payload, groups):
    """Fill a store with ~size_mb MiB of payload across ``groups`` groups; returns entries per group."""
    per_group = max(1, (size_mb << 20) // payload // groups)
    batch = 256
    blob = os.urandom(payload)
    with NodeStore.open(path, "bench", cluster_id="bench", fsync=FsyncMode.OFF) as s:
        for g in range(groups):
            lg = s.log(f"g{g}")
            i = 1
            while i <= per_group:
                n = min(batch, per_group - i + 1)
                lg.append([LogEntry(i + k, 1, blob) for k in range(n)])
                i += n
    return per_group


def raw_copy(src_dir, dst_dir, *, sha256=False):
    """Copy raft.db and chunks.db with shutil.copyfile (in-kernel copy) and fsync each; with ``sha256``
    also hash each copy (what any checksummed backup must pay). Returns (bytes, seconds)."""
    os.makedirs(dst_dir)
    total = 0
    t0 = time.perf_counter()
    for name in ("raft.db", "chunks.db"):
        dst = os.path.join(dst_dir, name)
        shutil.copyfile(os.path.join(src_dir, name), dst)
        if sha256:
            h = hashlib.sha256()
            with open(dst, "rb", buffering=0) as f:
                while b := f.read(4 << 20):
                    h.update(b)
        fsync_path(dst)
        total += os.path.getsize(dst)
    return total, time.perf_counter() - t0


class Appender(threading.Thread):
    """Single-entry FULL appends in a loop on group ``bench``; records (start time, latency)."""

    def __init__(self, store, start_index):
        super().__init__(daemon=True)
        self.lg = store.log("bench")
        self.nxt = start_index
        self.samples = []
        self.stop_evt = threading.Event()

    def run(self):
        data = b"x" * 100
        while not self.stop_evt.is_set():
            t0 = time.perf_counter()
            self.lg.append([LogEntry(self.nxt, 1, data)])
            self.samples.append((t0, time.perf_counter() - t0))
            self.nxt += 1


class WalWatcher:
    """Samples the size of the store's WAL file every 10 ms between start() and stop()."""

    def __init__(self, path):
        self.path, self.max = path, 0
        self._stop = threading.Event()
        self._thread = None

    def _run(self):
        while not self._stop.wait(0.01):
            with contextlib.suppress(OSError):
                self.max = max(self.max, os.path.getsize(self.path))

    def start(self):
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()


def window(app, t0, t1):
    """Latencies of the appends that started and ended within [t0, t1]."""
    return [lat for t, lat in list(app.samples) if t0 <= t and t + lat <= t1]


def lat_figures(lat):
    """p50/p99/n of a latency window (NaN when the window saw no append)."""
    return {"p50": pct(lat, 50), "p99": pct(lat, 99), "n": len(lat)}


def main(argv=None):
    """Run the backup benchmark; prints per-round values and the tables; returns the README markdown."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--payload", type=int, default=4096)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row; the median is kept")
    ap.add_argument("--idle-seconds", type=float, default=1.0)
    ap.add_argument("--pages-per-step", type=int, default=1024)
    ap.add_argument("--step-pause", type=float, default=0.0005)
    ap.add_argument("--nice", type=int, default=10, help="CPU priority decrease of the backup's threads "
                    "(HotBackupManager's default: 10; 0 = same priority as the appender)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 MB, 0.5 s idle windows, 2 rounds")
    args = ap.parse_args(argv)
    if args.quick:
        args.size_mb, args.idle_seconds, args.rounds = 64, 0.5, 2
    d = workdir()
    try:
        path = os.path.join(d, "node")
        t0 = time.perf_counter()
        per_group = build(path, args.size_mb, args.payload, args.groups)
        db_mib = os.path.getsize(os.path.join(path, "raft.db")) >> 20
        print(f"built {args.groups} groups x {per_group} entries of {args.payload} B in "
              f"{time.perf_counter() - t0:.1f} s; raft.db = {db_mib} MiB")
        with NodeStore.open(path, "bench", cluster_id="bench", fsync=FsyncMode.FULL) as s:
            mgr = HotBackupManager(s, os.path.join(d, "backups"), pages_per_step=args.pages_per_step,
                                   step_pause=args.step_pause, nice=args.nice)
            wal = WalWatcher(os.path.join(path, "raft.db-wal"))
            app = Appender(s, s.log("bench").last_index + 1)
            app.start()
            k = [0]

            def raw_row(sha):
                k[0] += 1
                dst = os.path.join(d, f"raw{k[0]}")
                n, dt = raw_copy(path, dst, sha256=sha)
                shutil.rmtree(dst)
                return {"mbps": n / dt / 1e6}

            def idle_row():
                i0 = time.perf_counter()
                time.sleep(args.idle_seconds)
                return lat_figures(window(app, i0, time.perf_counter()))

            def backup_row():
                wal.start()
                b0 = time.perf_counter()
                info = mgr.backup()
                b1 = time.perf_counter()
                wal.stop()
                shutil.rmtree(info.path)
                print("  backup: " + ", ".join(f"{k} {v:.2f} s" for k, v in info.phases.items())
                      + f"; total {b1 - b0:.2f} s")
                return {"mbps": info.size / (b1 - b0) / 1e6, "size": info.size, **lat_figures(window(app, b0, b1)),
                        **{f"phase_{k}": v for k, v in info.phases.items()}}

            rows = [Row("raw copy (copyfile + fsync)", lambda: raw_row(False)),
                    Row("raw copy + sha256 of the copy", lambda: raw_row(True)),
                    Row("HotBackupManager.backup()", backup_row),
                    Row("appends idle", idle_row)]
            t0 = time.perf_counter()
            res = run_rounds(rows, args.rounds)
            elapsed = time.perf_counter() - t0
            app.stop_evt.set()
            app.join()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print_rounds(res, [("mbps", "MB/s", lambda v: f"{v:,.0f}"), ("p99", "append p99 us", us)])
    raw, rawh, bk, idle = (res[r.name] for r in rows)
    q = bk.ratio("mbps", raw)
    t1 = md_table(["method", "MB/s", "vs raw copy", "target"], [
        ["raw copy (`copyfile` + fsync)", f"{raw.med('mbps'):,.0f}", "1.00x", ""],
        ["raw copy + sha256 of the copy", f"{rawh.med('mbps'):,.0f}", f"{rawh.ratio('mbps', raw):.2f}x", ""],
        ["`HotBackupManager.backup()`", f"{bk.med('mbps'):,.0f}", f"{q:.2f}x", target(q >= 0.5, ">= 0.5x")]])
    q = bk.ratio("p99", idle)
    t2 = md_table(["single-entry FULL appends, one thread", "p50 us", "p99 us", "p99 vs idle", "target"], [
        ["idle", us(idle.med("p50")), us(idle.med("p99")), "1.00x", ""],
        ["during backup", us(bk.med("p50")), us(bk.med("p99")), f"{q:.2f}x", target(q <= 2, "<= 2x")]])
    phases = ", ".join(f"{k[6:]} {bk.med(k):.2f} s" + (f" ({bk.med('size') / bk.med(k) / 1e6:,.0f} MB/s)"
                                                       if k in ("phase_copy", "phase_sha256") and bk.med(k) else "")
                       for k in bk.rounds[0] if k.startswith("phase_"))
    md = (f"{args.groups} groups x {per_group:,} entries of {args.payload} B: raft.db {db_mib:,} MiB, backup "
          f"{bk.med('size') / 1e6:,.0f} MB; {args.rounds} interleaved rounds after one warm-up per row; median of "
          f"the rounds ({elapsed:.0f} s); source as the build left it in the page cache; largest raft.db-wal "
          f"during the backups: {wal.max / 1e6:.1f} MB; backup phases (medians; see HotBackupManager): {phases}"
          f"\n\n{t1}\n\n{t2}\n")
    print("\n" + md)
    return md


if __name__ == "__main__":
    main()
