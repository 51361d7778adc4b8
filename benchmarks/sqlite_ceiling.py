"""How fast can SQLite itself store big blobs and copy a database, before raft_sqlite adds anything?

    python benchmarks/sqlite_ceiling.py [--size-mib 256] [--backup-mb 300] [--rounds 3] [--quick]

Issue 13 asks for snapshot writes >= 0.7x a raw write + fsync and backups >= 0.5x a raw copy + fsync.
This script measures the ceiling SQLite puts on both, on the same file system and in the same run, with
no raft_sqlite code in the timed path:

* **raw write + fsync**: ``--size-mib`` of 1 MiB random buffers written to a fresh plain file, one fsync;
* **blob INSERTs** of the same 1 MiB buffers (one row and one transaction per MiB, a CRC32 column, as
  chunks.db holds them) into a fresh WAL database with chunks.db's 64 KiB pages, a final TRUNCATE
  checkpoint and fsync of the database, under several (synchronous, wal_autocheckpoint) settings: from
  ``OFF`` with no checkpoint until the end (no sync at all: SQLite's own ceiling) to ``FULL`` every
  1 MiB (what the store does, for a bounded stall: see README, "Background work and the log's tail");
* **raw copy + fsync** of a plain file of ``--backup-mb`` and **SQLite's online backup API** copying a
  4 KiB-page database of the same size (steps of 1 MiB, no sleeps, no syncs until one fsync at the end).

Every row is measured by the shared round runner (one untimed warm-up, interleaved rounds, medians).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import zlib

import apsw

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Row, fsync_path, print_rounds, print_table, run_rounds, workdir  # noqa: E402

MiB = 1 << 20


class Ceiling:
    def __init__(self, size_mib, backup_mb):
        self.d = workdir()
        self.n = size_mib
        self.bufs = [os.urandom(MiB) for _ in range(4)]
        self.src_db = os.path.join(self.d, "src.db")
        self._build_source(backup_mb)

    def _build_source(self, mb):
        c = apsw.Connection(self.src_db)
        c.execute("PRAGMA journal_mode=WAL").fetchall()
        c.execute("PRAGMA synchronous=OFF")
        c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, data BLOB)")
        blob = os.urandom(1000)
        with c:
            for i in range(mb * 1000):
                c.execute("INSERT INTO t VALUES(?, ?)", (i, blob))
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        c.close()
        fsync_path(self.src_db)
        self.src_bytes = os.path.getsize(self.src_db)

    def raw_write(self):
        p = os.path.join(self.d, "raw.bin")
        t0 = time.perf_counter()
        with open(p, "wb", buffering=0) as f:
            for i in range(self.n):
                f.write(self.bufs[i % 4])
            os.fsync(f.fileno())
        t = time.perf_counter() - t0
        os.unlink(p)
        return {"s": t, "bytes": self.n * MiB}

    def blob_inserts(self, synchronous, autocheckpoint):
        def measure():
            p = os.path.join(self.d, "c.db")
            c = apsw.Connection(p)
            c.execute("PRAGMA page_size=65536")
            c.execute("PRAGMA journal_mode=WAL").fetchall()
            c.execute(f"PRAGMA synchronous={synchronous}")
            c.execute(f"PRAGMA wal_autocheckpoint={autocheckpoint}")
            c.execute("PRAGMA cache_size=-2048")
            c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, crc INTEGER, data BLOB)")
            t0 = time.perf_counter()
            for i in range(self.n):
                b = self.bufs[i % 4]
                with c:
                    c.execute("INSERT INTO t VALUES(?, ?, ?)", (i, zlib.crc32(b), b))
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            fsync_path(p)
            t = time.perf_counter() - t0
            c.close()
            for f in (p, p + "-wal", p + "-shm"):
                if os.path.exists(f):
                    os.unlink(f)
            return {"s": t, "bytes": self.n * MiB}
        return measure

    def raw_copy(self):
        dst = os.path.join(self.d, "copy.bin")
        t0 = time.perf_counter()
        shutil.copyfile(self.src_db, dst)
        fsync_path(dst)
        t = time.perf_counter() - t0
        os.unlink(dst)
        return {"s": t, "bytes": self.src_bytes}

    def backup_api(self):
        dst = os.path.join(self.d, "copy.db")
        src = apsw.Connection(self.src_db)
        dest = apsw.Connection(dst)
        dest.execute("PRAGMA synchronous=OFF")
        dest.execute("PRAGMA journal_mode=OFF").fetchall()
        t0 = time.perf_counter()
        with dest.backup("main", src, "main") as b:
            while not b.done:
                b.step(256)
        dest.close()
        fsync_path(dst)
        t = time.perf_counter() - t0
        src.close()
        os.unlink(dst)
        return {"s": t, "bytes": self.src_bytes}


SETTINGS = [("OFF", 1_000_000), ("NORMAL", 1000), ("NORMAL", 16), ("FULL", 16)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--backup-mb", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 MiB, 16 MB, 1 round")
    a = ap.parse_args(argv)
    if a.quick:
        a.size_mib, a.backup_mb, a.rounds = 16, 16, 1
    b = Ceiling(a.size_mib, a.backup_mb)
    try:
        rows = [Row("raw write + fsync", b.raw_write)]
        rows += [Row(f"blob INSERTs, synchronous={s}, wal_autocheckpoint={ck}", b.blob_inserts(s, ck))
                 for s, ck in SETTINGS]
        rows += [Row("raw copy + fsync", b.raw_copy), Row("online backup API (no syncs)", b.backup_api)]
        res = run_rounds(rows, a.rounds)
    finally:
        shutil.rmtree(b.d, ignore_errors=True)
    print_rounds(res, [("s", "s", lambda v: f"{v:.2f}")])

    def mbs(r):
        return r.med("bytes") / r.med("s") / 1e6

    raw_w, raw_c = mbs(res["raw write + fsync"]), mbs(res["raw copy + fsync"])
    table = []
    for name, r in res.items():
        base = raw_c if "copy" in name or "backup" in name else raw_w
        what = "raw copy + fsync" if base is raw_c else "raw write + fsync"
        table.append([name, f"{mbs(r):,.0f}", f"{mbs(r) / base:.2f}x {what}"])
    print_table(f"SQLite's ceiling: {a.size_mib} MiB of 1 MiB blobs, a {b.src_bytes / 1e6:,.0f} MB database copied; "
                f"{a.rounds} interleaved rounds, medians", ["row", "MB/s", "vs same-run raw"], table)


if __name__ == "__main__":
    main()
