"""Hot backup speed and its cost to appends, against baselines measured in the same run.

    python benchmarks/backup.py [--size-mb 1024] [--payload 4096] [--groups 4] [--rounds 2]

Builds a store of about ``--size-mb`` MiB of log payload (fsync OFF while building), then, with the
store reopened in FULL mode:

* raw copy baseline: ``shutil.copyfile`` of raft.db and chunks.db + fsync of each copy (MB/s), and the
  same plus a sha256 of each copy (what any checksummed copy pays; for context);
* ``HotBackupManager.backup()`` (online backup API in steps, sha256 of every file, fsync, manifest),
  best of ``--rounds`` (raw copy and backup alternate, so both see the same page-cache state);
* p50/p99 latency of single-entry appends (FULL, 100-byte payload, one thread) while idle and while a
  backup runs, plus the largest size the WAL reached during the backup (the backup's read snapshot
  holds checkpoints back).

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

from _common import pct, print_table, us, workdir

from raft_sqlite import FsyncMode, LogEntry, NodeStore
from raft_sqlite.backup import HotBackupManager


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
        fd = os.open(dst, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
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
            try:
                self.max = max(self.max, os.path.getsize(self.path))
            except OSError:
                pass

    def start(self):
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--payload", type=int, default=4096)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle-seconds", type=float, default=1.0)
    ap.add_argument("--pages-per-step", type=int, default=1024)
    ap.add_argument("--step-pause", type=float, default=0.0005)
    ap.add_argument("--nice", type=int, default=10, help="CPU priority decrease of the backup's threads "
                    "(HotBackupManager's default: 10; 0 = same priority as the appender)")
    args = ap.parse_args()
    d = workdir()
    try:
        path = os.path.join(d, "node")
        t0 = time.perf_counter()
        per_group = build(path, args.size_mb, args.payload, args.groups)
        print(f"built {args.groups} groups x {per_group} entries of {args.payload} B in "
              f"{time.perf_counter() - t0:.1f} s; raft.db = {os.path.getsize(os.path.join(path, 'raft.db')) >> 20} MiB")
        with NodeStore.open(path, "bench", cluster_id="bench", fsync=FsyncMode.FULL) as s:
            mgr = HotBackupManager(s, os.path.join(d, "backups"), pages_per_step=args.pages_per_step,
                                   step_pause=args.step_pause, nice=args.nice)
            raw_rates, rawh_rates, bk_rates, idle, during = [], [], [], [], []
            wal = WalWatcher(os.path.join(path, "raft.db-wal"))
            app = Appender(s, s.log("bench").last_index + 1)
            app.start()
            for r in range(args.rounds):
                i0 = time.perf_counter()  # idle window: appends only
                time.sleep(args.idle_seconds)
                i1 = time.perf_counter()
                n, dt = raw_copy(path, os.path.join(d, f"raw{r}"))  # appends meanwhile are not counted
                raw_rates.append(n / dt / 1e6)
                shutil.rmtree(os.path.join(d, f"raw{r}"))
                n, dt = raw_copy(path, os.path.join(d, f"rawh{r}"), sha256=True)
                rawh_rates.append(n / dt / 1e6)
                shutil.rmtree(os.path.join(d, f"rawh{r}"))
                wal.start()
                b0 = time.perf_counter()
                info = mgr.backup()
                b1 = time.perf_counter()
                wal.stop()
                bk_rates.append(info.size / (b1 - b0) / 1e6)
                print(f"round {r}: raw copy {raw_rates[-1]:.0f} MB/s, raw copy + sha256 {rawh_rates[-1]:.0f} MB/s, backup {bk_rates[-1]:.0f} MB/s ("
                      + ", ".join(f"{k} {v:.2f} s" for k, v in info.phases.items()) + f"; total {b1 - b0:.2f} s)")
                samples = list(app.samples)
                idle.extend(lat for t, lat in samples if i0 <= t and t + lat <= i1)
                during.extend(lat for t, lat in samples if b0 <= t and t + lat <= b1)
                shutil.rmtree(info.path)
            app.stop_evt.set()
            app.join()
        raw, bk = max(raw_rates), max(bk_rates)
        print_table(f"Backup throughput (best of {args.rounds}, {info.size / 1e6:.0f} MB)",
                    ["method", "MB/s", "vs raw copy"], [
            ["raw copy (copyfile + fsync)", f"{raw:.0f}", "1.00x"],
            ["raw copy + sha256 of the copy", f"{max(rawh_rates):.0f}", f"{max(rawh_rates) / raw:.2f}x"],
            ["HotBackupManager.backup()", f"{bk:.0f}", f"{bk / raw:.2f}x (target >= 0.50x)"],
        ])
        print_table("Single-entry FULL appends (100 B), one thread", ["phase", "n", "p50 us", "p99 us", "p99 vs idle"], [
            ["idle", len(idle), us(pct(idle, 50)), us(pct(idle, 99)), "1.00x"],
            ["during backup", len(during), us(pct(during, 50)), us(pct(during, 99)),
             f"{pct(during, 99) / pct(idle, 99):.2f}x (target <= 2x)"],
        ])
        print(f"\nlargest raft.db-wal during backups: {wal.max / 1e6:.1f} MB")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
