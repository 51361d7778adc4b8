"""Recovery benchmark: open + validate + replay, and `verify` throughput, beside raw reads in the same run.

    python benchmarks/recovery.py [--sizes 100000,1000000] [--payload 100] [--repeat 3]

For each size N, a store holds a durable snapshot at index 1000 and N entries past it (all committed).
Measured: NodeStore.open (node/metadata CRCs, sidecar checksums, every record CRC of the replay range),
then store.replay() through a no-op apply, against a raw read of the same database file (read() of every
byte, cold page cache not forced). `verify` (full validation incl. PRAGMA integrity_check) is reported in
MB/s of database bytes, beside the raw read rate. Targets (not asserted): 1M entries open+validate+replay
<= 2 s; verify >= 200 MB/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import print_table, workdir  # noqa: E402

from raft_sqlite import FsyncMode, LogEntry, NodeStore  # noqa: E402
from raft_sqlite.verify import verify  # noqa: E402

SNAP_AT = 1000


def build(path, n, payload):
    with NodeStore.open(path, "bench", cluster_id="bench", fsync=FsyncMode.OFF) as s:
        lg, md = s.log("g"), s.metadata("g")
        total = SNAP_AT + n
        for lo in range(1, total + 1, 10_000):
            lg.append([LogEntry(i, 1, payload) for i in range(lo, min(total, lo + 9_999) + 1)])
        md.set_commit_index(total)
        with s.snapshots("g").write(SNAP_AT, 1) as w:
            w.write(b"state machine image " * 100)
        lg.compact(SNAP_AT)


def raw_read(path):
    t0 = time.perf_counter()
    n = 0
    for f in sorted(os.listdir(path)):
        if f.endswith(".db") or f.endswith("-wal"):
            with open(os.path.join(path, f), "rb", buffering=0) as fh:
                while chunk := fh.read(1 << 20):
                    n += len(chunk)
    return n, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--payload", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3, help="rounds per size; the best of each figure is kept")
    a = ap.parse_args(argv)
    payload = os.urandom(a.payload)
    d = workdir()
    rows, vrows = [], []
    try:
        for n in [int(x) for x in a.sizes.split(",")]:
            path = os.path.join(d, f"s{n}")
            build(path, n, payload)
            best = None
            for _ in range(a.repeat):  # best of N rounds, baseline included: the machines are noisy
                nbytes, raw_s = raw_read(path)
                t0 = time.perf_counter()
                s = NodeStore.open(path, "bench", cluster_id="bench", fsync=FsyncMode.FULL)
                t_open = time.perf_counter() - t0
                t1 = time.perf_counter()
                last = s.replay("g", lambda e: None)
                t_replay = time.perf_counter() - t1
                rep = s.recovery_report
                s.close()
                assert last == SNAP_AT + n and rep.entries_validated == n, (last, rep)
                t2 = time.perf_counter()
                vr = verify(path)
                t_verify = time.perf_counter() - t2
                assert vr.ok, vr.summary()
                r = (t_open + t_replay, t_open, t_replay, raw_s, t_verify)
                # the round with the best open+replay total; raw read and verify: their own best
                best = r if best is None else (min(best[:3], r[:3]) + (min(best[3], raw_s), min(best[4], t_verify)))
            _, t_open, t_replay, raw_s, t_verify = best
            rows.append([f"{n:,}", f"{t_open:.2f}", f"{t_replay:.2f}", f"{t_open + t_replay:.2f}",
                         f"{nbytes / 1e6:.0f}", f"{raw_s:.2f}", f"{(t_open + t_replay) / raw_s:.1f}x"])
            vrows.append([f"{n:,}", f"{nbytes / 1e6:.0f}", f"{nbytes / 1e6 / t_verify:.0f}",
                          f"{nbytes / 1e6 / raw_s:.0f}", f"{raw_s / t_verify:.2f}x"])
            shutil.rmtree(path)
        print_table(f"open + validate + replay ({a.payload}-byte entries past a snapshot)",
                    ["entries", "open+validate s", "replay s", "total s", "db MB", "raw read s", "total vs raw"],
                    rows)
        print_table("verify (full validation incl. integrity_check)",
                    ["entries", "db MB", "verify MB/s", "raw read MB/s", "verify vs raw"], vrows)
        print("\ntargets: 1M entries open+validate+replay <= 2 s; verify >= 200 MB/s")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
