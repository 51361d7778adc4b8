"""Recovery benchmark: open + validate + replay, and `verify` throughput, beside raw reads in the same run,
each with a warm and a cold page cache.

    python benchmarks/recovery.py [--sizes 100000,1000000] [--payload 100] [--rounds 3] [--json FILE] [--quick]

For each size N, a store holds a durable snapshot at index 1000 and N entries past it (all committed).
Measured: NodeStore.open (node/metadata CRCs, sidecar checksums, every record CRC of the replay range),
then store.replay() through a no-op apply; `verify` (full validation incl. PRAGMA integrity_check) in MB/s
of database bytes; and a raw read (read() of every byte) of the same files as the baseline of both.

Each of the three is measured twice, labelled:

* **warm**: every file of the data_dir read once (untimed) just before the timed run, so it is all in
  the page cache (a restart right after the process died, or the figure of a machine with ample RAM);
* **cold**: every file of the data_dir fsynced and dropped from the page cache with
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` just before the timed run, checked with mincore(2) (the run stops
  with BenchmarkError if more than 5% of a file stayed cached): a reboot, e.g. after a power loss.

Rows are measured by the shared round runner (_common.run_rounds: one untimed warm-up per row,
interleaved rounds with the order rotating, medians; ratios are ratios of medians of this run).
``--json FILE`` also writes every row's rounds and medians (``_common.results_json``: open, replay and total
seconds of each open+replay row, seconds and bytes of each raw read and verify), which row is which
(``row_info``: size, what, cache) and the run's date, commit and load (``meta``).

Targets (not asserted): 1M entries open+validate+replay <= 2 s (warm and cold reported; the target was
set on the warm figure); verify >= 200 MB/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    Row,
    data_files,
    md_table,
    print_rounds,
    results_json,
    run_meta,
    run_rounds,
    run_start,
    set_cache,
    target,
    workdir,
    write_json,
)

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


def raw_read(path, cold):
    """Raw read of every file of the data_dir (the baseline); figures: bytes, seconds, resident."""
    files = data_files(path)
    resident = set_cache(files, cold) if cold else None
    t0 = time.perf_counter()
    n = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(1 << 20):
                n += len(chunk)
    return {"bytes": n, "s": time.perf_counter() - t0, "resident": resident}


def open_replay(path, n, cold):
    """NodeStore.open + replay through a no-op apply; figures: open, replay and total seconds."""
    set_cache(data_files(path), cold)
    t0 = time.perf_counter()
    s = NodeStore.open(path, "bench", cluster_id="bench", fsync=FsyncMode.FULL)
    t_open = time.perf_counter() - t0
    t1 = time.perf_counter()
    last = s.replay("g", lambda e: None)
    t_replay = time.perf_counter() - t1
    rep = s.recovery_report
    s.close()
    # a benchmark that stopped validating or replaying would look fast: check it did the work
    if last != SNAP_AT + n or rep.entries_validated != n:
        raise AssertionError(f"replayed to {last}, validated {rep.entries_validated}; expected {SNAP_AT + n}, {n}")
    return {"open": t_open, "replay": t_replay, "total": t_open + t_replay}


def verify_run(path, cold):
    """`verify` of the data_dir; figures: seconds."""
    set_cache(data_files(path), cold)
    t0 = time.perf_counter()
    vr = verify(path)
    dt = time.perf_counter() - t0
    if not vr.ok:
        raise AssertionError(vr.summary())
    return {"s": dt}


CACHES = (("warm", False), ("cold", True))


def main(argv=None):
    """Run the recovery benchmark; prints per-round values and the tables; returns the README markdown."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--payload", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row; the median is kept")
    ap.add_argument("--json", metavar="FILE", help="also write every row's rounds and medians to FILE")
    ap.add_argument("--quick", action="store_true", help="smoke run: sizes 20000,100000, 2 rounds")
    a = ap.parse_args(argv)
    if a.quick:
        a.sizes, a.rounds = "20000,100000", 2
    payload = os.urandom(a.payload)
    sizes = [int(x) for x in a.sizes.split(",")]
    d = workdir()
    start = run_start()
    try:
        rows, info = [], {}
        for n in sizes:
            path = os.path.join(d, f"s{n}")
            build(path, n, payload)
            for label, cold in CACHES:
                rows += [Row(f"{n:,} raw read {label}", lambda p=path, c=cold: raw_read(p, c)),
                         Row(f"{n:,} open+replay {label}", lambda p=path, n=n, c=cold: open_replay(p, n, c)),
                         Row(f"{n:,} verify {label}", lambda p=path, c=cold: verify_run(p, c))]
                for what in ("raw read", "open+replay", "verify"):
                    info[f"{n:,} {what} {label}"] = {"size": n, "what": what, "cache": label}
        t0 = time.perf_counter()
        res = run_rounds(rows, a.rounds)
        elapsed = time.perf_counter() - t0
    finally:
        shutil.rmtree(d, ignore_errors=True)
    sec = lambda v: f"{v:.3f}"  # noqa: E731
    print_rounds(res, [("s", "s", sec), ("total", "total s", sec)])
    worst = max((v for r in res.values() if "resident" in r.rounds[0] for v in r.values("resident")
                 if v is not None), default=None)
    print("\nlargest page-cache residency left by a cold drop (mincore): "
          + ("unavailable" if worst is None else f"{worst:.1%}"))
    rrows, vrows = [], []
    for n in sizes:
        for label, _cold in CACHES:
            raw, rec, ver = (res[f"{n:,} {k} {label}"] for k in ("raw read", "open+replay", "verify"))
            mb = raw.med("bytes") / 1e6
            tot = rec.med("total")
            rrows.append([f"{n:,}", label, f"{rec.med('open'):.2f} s", f"{rec.med('replay'):.2f} s", f"{tot:.2f} s",
                          f"{mb:.0f} MB in {raw.med('s'):.3f} s", f"{rec.ratio('total', raw, 's'):.1f}x",
                          target(tot <= 2, "<= 2 s") if n == 1_000_000 else ""])
            vrate = mb / ver.med("s")
            vrows.append([f"{n:,}", label, f"{mb:.0f} MB", f"{vrate:.0f} MB/s", f"{mb / raw.med('s'):,.0f} MB/s",
                          f"{raw.med('s') / ver.med('s'):.2f}x",
                          target(vrate >= 200, ">= 200 MB/s") if n == 1_000_000 else ""])
    t1 = md_table(["entries past the snapshot", "page cache", "open + validate", "replay (no-op apply)", "total",
                   "raw read of the same files", "total vs raw read", "target"], rrows)
    t2 = md_table(["entries", "page cache", "database", "`verify`", "raw read of the same files", "verify vs raw",
                   "target"], vrows)
    md = (f"{a.payload}-byte entries past a durable snapshot; {a.rounds} interleaved rounds after one warm-up per "
          f"row; median of the rounds ({elapsed:.0f} s); warm = every file read just before, cold = every file "
          f"fsynced and dropped with POSIX_FADV_DONTNEED just before (mincore: at most "
          + ("n/a" if worst is None else f"{worst:.1%}") + f" left cached)\n\n{t1}\n\n{t2}\n")
    print("\n" + md)
    if a.json:
        write_json(a.json, {"meta": run_meta("benchmarks/recovery.py", argv, start), "args": vars(a),
                            "elapsed_s": elapsed, "sizes": sizes, "payload": a.payload, "snapshot_at": SNAP_AT,
                            "row_info": info, "rows": results_json(res)})
    return md


if __name__ == "__main__":
    main()
