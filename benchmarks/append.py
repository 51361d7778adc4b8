"""Append throughput and latency of raft_sqlite vs baselines measured in the same run.

    python benchmarks/append.py [--seconds 1.5] [--payload 100] [--rounds 3] [--batch-sizes 1,64,1024]
                                [--json FILE] [--quick]

Baselines: the physical limit (4 KiB overwrite + fdatasync loop on a pre-written file: what a WAL commit
does), bare apsw inserting the same rows (executemany, one transaction per batch, WAL + synchronous=FULL),
stdlib sqlite3 committing one row per transaction (WAL + synchronous=FULL), and PySyncObj's FileJournal
(add + flush per entry) if pysyncobj is installed. Then 8 concurrent single-entry writers per mode.

Every row (baselines included) is measured by the shared round runner (_common.run_rounds): one untimed
warm-up call of ``--warmup-seconds``, then ``--rounds`` interleaved rounds of ``--seconds`` each with the
row order rotating per round; each row's loop is preceded by one untimed call on its fresh file; every
figure is the median over the rounds, every ratio a ratio of medians of this run. The concurrency rows'
"vs 1 writer" divides their median rate by the median rate of the single-writer batch-1 row of the same
mode; "mean batch" is entries per commit (the store's stats: requests / commits; in FULL and EXTRA each
commit is one WAL fsync, so 1 / mean batch is the WAL fsyncs per entry); "CPU us/entry" is the process's CPU
time (user + system, every thread) per entry, whose inverse is the rate at which the CPU alone would be the
limit (the Python of the writers is serialised by the GIL).

``--batch-sizes`` (default 1,64,1024; 1 is required: it is the single-entry row every ratio to the
physical limit uses) sets the batches of the bare apsw rows and of every mode's raft_sqlite rows, e.g.
``1,4,16,64,256,1024`` for a throughput-vs-batch-size curve (benchmarks/plots.py). ``--json FILE`` writes
every row's rounds and medians (``_common.results_json``), a compact latency distribution per latency row
and round (``q``: the per-call latency at each of ``quantile_levels`` percent; its median over the rounds
per level is the row's CDF), which row is which (``row_info``: kind, batch, mode) and the run's date,
commit and load (``meta``).

Targets (not asserted): FULL single-entry p50 <= 1.3x the physical limit's; FULL batch-1024 >= 0.5x bare
apsw's rate; 8 concurrent writers (FULL, 1 group) >= 4x one writer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time

import apsw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    QUANTILE_LEVELS,
    Row,
    fsync_loop_baseline,
    latency_figures,
    md_table,
    pct,
    print_rounds,
    quantiles,
    results_json,
    run_meta,
    run_rounds,
    run_start,
    target,
    timed_loop,
    us,
    workdir,
    write_json,
)

from raft_sqlite import FsyncMode, LogEntry, NodeStore  # noqa: E402

BATCHES = (1, 64, 1024)


def bench_store(d, mode, batch, seconds, payload):
    """raft_sqlite appends of ``batch`` entries per call on a fresh store; returns per-call latencies."""
    path = os.path.join(d, f"store-{mode.value}-{batch}")
    with NodeStore.open(path, "bench", cluster_id="bench", fsync=mode) as s:
        lg = s.log("g")
        nxt = [1]

        def one():
            i = nxt[0]
            lg.append([LogEntry(i + k, 1, payload) for k in range(batch)])
            nxt[0] = i + batch

        one()  # untimed first call, as in every row (here: segment row, statement cache)
        lat = timed_loop(one, seconds)
    shutil.rmtree(path)
    return lat


def bench_apsw(d, batch, seconds, payload):
    """Bare apsw: one transaction of ``batch`` rows per call (WAL, synchronous=FULL); latencies."""
    sub = tempfile.mkdtemp(dir=d)
    c = apsw.Connection(os.path.join(sub, f"apsw-{batch}.db"))
    c.execute("PRAGMA journal_mode=WAL").fetchall()
    c.execute("PRAGMA synchronous=FULL")
    c.execute("CREATE TABLE log(key INTEGER PRIMARY KEY, grp INTEGER, idx INTEGER, term INTEGER, kind INTEGER, "
              "payload BLOB, crc32 INTEGER, segment INTEGER)")
    nxt = [1]

    def one():
        i = nxt[0]
        c.execute("BEGIN")
        c.executemany("INSERT INTO log VALUES (?,?,?,?,?,?,?,?)",
                      [(i + k, 1, i + k, 1, 0, payload, 12345, 1) for k in range(batch)])
        c.execute("COMMIT")
        nxt[0] = i + batch

    one()
    lat = timed_loop(one, seconds)
    c.close()
    shutil.rmtree(sub)
    return lat


def bench_sqlite3(d, seconds, payload):
    """stdlib sqlite3, one row per transaction (WAL, synchronous=FULL); latencies."""
    sub = tempfile.mkdtemp(dir=d)
    c = sqlite3.connect(os.path.join(sub, "stdlib.db"), isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL").fetchall()
    c.execute("PRAGMA synchronous=FULL")
    c.execute("CREATE TABLE log(idx INTEGER PRIMARY KEY, term INTEGER, payload BLOB)")
    nxt = [1]

    def one():
        c.execute("BEGIN")
        c.execute("INSERT INTO log VALUES (?,?,?)", (nxt[0], 1, payload))
        c.execute("COMMIT")
        nxt[0] += 1

    one()
    lat = timed_loop(one, seconds)
    c.close()
    shutil.rmtree(sub)
    return lat


def have_pysyncobj():
    """True if pysyncobj is importable (its baseline row is then measured)."""
    try:
        import pysyncobj.journal  # noqa: F401
    except ImportError:
        return False
    return True


def bench_pysyncobj(d, seconds, payload):
    """PySyncObj's FileJournal, add + flush (msync) per entry; latencies."""
    from pysyncobj.journal import FileJournal
    sub = tempfile.mkdtemp(dir=d)
    j = FileJournal(os.path.join(sub, "pso.journal"))
    nxt = [2]
    j.add(b"noop", 1, 0)

    def one():
        j.add(payload, nxt[0], 1)
        j.flush()
        nxt[0] += 1

    one()
    lat = timed_loop(one, seconds)
    j._destroy()  # PySyncObj's own API for closing a journal (no public close)
    shutil.rmtree(sub)
    return lat


def bench_concurrent(d, mode, groups, seconds, payload, threads=8):
    """``threads`` writers of single-entry appends for ``seconds`` (1 group: ``append_next``, else one
    group per writer modulo ``groups``). Returns the figures: rate, p50, p99, n, mean_batch, max_batch."""
    path = os.path.join(d, f"conc-{mode.value}-{groups}")
    with NodeStore.open(path, "bench", cluster_id="bench", fsync=mode) as s:
        names = [f"g{t % groups}" for t in range(threads)]
        logs = [s.log(n) for n in names]
        for lg in {id(lg): lg for lg in logs}.values():  # untimed first call, as in every row
            lg.append_next(1, [payload])
        c0, q0 = s.stats.commits, s.stats.requests
        counts = [0] * threads
        lats: list[list[float]] = [[] for _ in range(threads)]
        barrier = threading.Barrier(threads + 1)
        stop = [0.0]

        def run(t):
            lg = logs[t]
            k = lg.last_index
            barrier.wait()
            while time.perf_counter() < stop[0]:
                t0 = time.perf_counter()
                if groups == 1:
                    lg.append_next(1, [payload])
                else:
                    k += 1
                    lg.append([LogEntry(k, 1, payload)])
                lats[t].append(time.perf_counter() - t0)
                counts[t] += 1

        ths = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
        for th in ths:
            th.start()
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        stop[0] = t0 + seconds
        barrier.wait()
        for th in ths:
            th.join()
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        commits, requests, maxb = s.stats.commits - c0, s.stats.requests - q0, s.stats.max_batch
    shutil.rmtree(path)
    lat = [x for xs in lats for x in xs]
    # each request is one single-entry append, so requests / commits = entries per commit
    # cpu_us: the process's CPU time (user + system, all threads) per entry: the writers' Python, SQLite and the
    # hand-offs between threads; at 1 / cpu_us entries/s the two cores would be busy with nothing else
    return {"rate": sum(counts) / elapsed, "p50": pct(lat, 50), "p99": pct(lat, 99), "n": len(lat),
            "mean_batch": requests / commits if commits else float("nan"), "max_batch": maxb,
            "cpu_us": cpu / len(lat) * 1e6 if lat else float("nan")}


PHYS = "baseline: 4 KiB overwrite + fdatasync (the physical limit)"
APSW = "baseline: bare apsw executemany (WAL, FULL)"
SQL3 = "baseline: stdlib sqlite3, 1 row/txn (WAL, FULL)"
PSO = "baseline: PySyncObj FileJournal add+flush"


def measured(lat, per_call):
    """A latency row's figures: rate, p50, p99, n, and ``q``, the latency at each of QUANTILE_LEVELS (for
    ``--json``'s CDFs)."""
    return {**latency_figures(lat, per_call), "q": quantiles(lat)}


def build_rows(d, a, payload, modes, batches=BATCHES):
    """The rows of both tables (one run_rounds call: the concurrency rows' ratio needs the single-writer
    rows of the same run), and ``{row name: {kind, batch, mode}}`` (``--json``'s ``row_info``)."""
    rows, info = [], {}

    def add(name, fn, per_call=1, **what):
        rows.append(Row(name, lambda: measured(fn(a.seconds), per_call), lambda: fn(a.warmup_seconds)))
        info[name] = {"batch": per_call, **what}

    add(PHYS, lambda sec: fsync_loop_baseline(d, sec), kind="fsync")
    for b in batches:
        add(f"{APSW} b{b}", lambda sec, b=b: bench_apsw(d, b, sec, payload), b, kind="apsw")
    add(SQL3, lambda sec: bench_sqlite3(d, sec, payload), kind="sqlite3")
    if have_pysyncobj():
        add(PSO, lambda sec: bench_pysyncobj(d, sec, payload), kind="pysyncobj")
    for m in modes:
        for b in batches:
            add(f"raft_sqlite {m.value} b{b}", lambda sec, m=m, b=b: bench_store(d, m, b, sec, payload), b,
                kind="store", mode=m.value)
    for m in modes:
        if m is FsyncMode.OFF:
            continue
        for g in (1, 8):
            rows.append(Row(f"conc {m.value} g{g}", lambda m=m, g=g: bench_concurrent(d, m, g, a.seconds, payload),
                            lambda m=m, g=g: bench_concurrent(d, m, g, a.warmup_seconds, payload)))
            info[f"conc {m.value} g{g}"] = {"kind": "concurrent", "mode": m.value, "groups": g, "writers": 8}
    return rows, info


def tables(res, a, modes, batches=BATCHES):
    """The README tables (markdown) from the run's results, plus the raw rows for the console."""
    phys = res[PHYS]
    rows = []

    def lat_row(name, r, batch, ratio_cell, tgt=""):
        rows.append([name, batch, f"{r.med('rate'):,.0f}", us(r.med("p50")), us(r.med("p99")), ratio_cell, tgt])

    lat_row(PHYS, phys, 1, "1.00x")
    for b in batches:
        r = res[f"{APSW} b{b}"]
        lat_row(APSW, r, b, f"{r.ratio('p50', phys):.2f}x" if b == 1 else "")
    lat_row(SQL3, res[SQL3], 1, f"{res[SQL3].ratio('p50', phys):.2f}x")
    if PSO in res:
        lat_row(PSO, res[PSO], 1, f"{res[PSO].ratio('p50', phys):.2f}x")
    for m in modes:
        for b in batches:
            r = res[f"raft_sqlite {m.value} b{b}"]
            if b == 1:
                q = r.ratio("p50", phys)
                tgt = target(q <= 1.3, "<= 1.3x") if m is FsyncMode.FULL else ""
                lat_row(f"raft_sqlite {m.value}", r, b, f"{q:.2f}x", tgt)
            else:
                q = r.ratio("rate", res[f"{APSW} b{b}"])
                tgt = target(q >= 0.5, ">= 0.5x") if (m is FsyncMode.FULL and b == 1024) else ""
                lat_row(f"raft_sqlite {m.value}", r, b, f"{q:.2f}x", tgt)
    t1 = md_table(["what", "batch", "entries/s", "p50 us", "p99 us", "p50 vs fsync (batch 1) / rate vs bare apsw",
                   "target"], rows)
    crow = []
    for m in modes:
        if m is FsyncMode.OFF:
            continue
        single = res[f"raft_sqlite {m.value} b1"]
        for g in (1, 8):
            r = res[f"conc {m.value} g{g}"]
            q = r.ratio("rate", single)
            tgt = target(q >= 4, ">= 4x") if (m is FsyncMode.FULL and g == 1) else ""
            crow.append([f"{m.value}, {g} group{'s' if g > 1 else ''}" + (" (`append_next`)" if g == 1 else ""),
                         f"{r.med('rate'):,.0f}", us(r.med("p50")), us(r.med("p99")), f"{q:.1f}x", tgt,
                         f"{r.med('mean_batch'):.1f}", f"{max(r.values('max_batch'))}", f"{r.med('cpu_us'):.0f}"])
    t2 = md_table(["8 concurrent single-entry writers", "entries/s", "p50 us", "p99 us", "vs 1 writer (same mode)",
                   "target", "mean batch (entries/commit)", "max batch", "CPU us/entry (all threads)"], crow)
    return t1, t2


def main(argv=None):
    """Run the append benchmark; prints per-round values and the tables; returns the README markdown."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=1.5, help="duration of each timed measurement")
    ap.add_argument("--warmup-seconds", type=float, default=0.3, help="duration of each row's warm-up call")
    ap.add_argument("--payload", type=int, default=100, help="payload bytes per entry")
    ap.add_argument("--modes", default="OFF,NORMAL,FULL,EXTRA")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row; the median is kept")
    ap.add_argument("--batch-sizes", default=",".join(map(str, BATCHES)),
                    help="entries per append call of the bare apsw and raft_sqlite rows (must include 1)")
    ap.add_argument("--json", metavar="FILE", help="also write every row's rounds, medians and latency quantiles")
    ap.add_argument("--quick", action="store_true", help="smoke run: 0.2 s per row, 0.05 s warm-up, 2 rounds")
    a = ap.parse_args(argv)
    if a.quick:
        a.seconds, a.warmup_seconds, a.rounds = 0.2, 0.05, 2
    batches = sorted({int(x) for x in a.batch_sizes.split(",")})
    if 1 not in batches or batches[0] < 1:
        ap.error("--batch-sizes must include 1 and be positive")
    payload = os.urandom(a.payload)
    modes = [FsyncMode(x) for x in a.modes.split(",")]
    d = workdir()
    start = run_start()
    try:
        t0 = time.perf_counter()
        rows, info = build_rows(d, a, payload, modes, batches)
        res = run_rounds(rows, a.rounds)
        elapsed = time.perf_counter() - t0
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print_rounds(res, [("rate", "entries/s", lambda v: f"{v:,.0f}"), ("p50", "p50 us", us),
                       ("mean_batch", "mean batch", lambda v: f"{v:.1f}")])
    t1, t2 = tables(res, a, modes, batches)
    md = (f"{a.payload}-byte entries; {a.rounds} interleaved rounds of {a.seconds:g} s per row after one "
          f"{a.warmup_seconds:g} s warm-up per row; median of the rounds ({elapsed:.0f} s)\n\n{t1}\n\n{t2}\n")
    print("\n" + md)
    if a.json:
        write_json(a.json, {"meta": run_meta("benchmarks/append.py", argv, start), "args": vars(a),
                            "elapsed_s": elapsed, "batch_sizes": batches, "modes": [m.value for m in modes],
                            "quantile_levels": QUANTILE_LEVELS, "row_info": info, "rows": results_json(res)})
    return md


if __name__ == "__main__":
    main()
