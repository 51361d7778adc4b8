"""Many Raft groups per node: does a node's cost grow with its number of groups?

    python benchmarks/groups.py [--groups 1,100,1000,10000] [--entries 200000] [--appends 2000]
                                [--writers 8,1000] [--writer-seconds 2] [--rounds 3] [--quick] [--json PATH]

For each G of ``--groups``, a store holds the same ``--entries`` entries of 100 B split over G groups
(``entries / G`` each, a term/vote per group), built once with fsync OFF and closed. Measured, same run:

* **open + validate**: ``NodeStore.open`` of that store (warm page cache; every record's CRC, contiguity
  and sidecar checked, every group's state loaded);
* **append p50 / p99**: FULL single-entry appends, round-robin over the groups (at most ``--appends``
  groups), one thread, on the opened store;
* **memory per idle group**: the growth of the process's RSS (VmRSS) across the open divided by G, and
  the Python heap the open left allocated (``tracemalloc``, in one extra open outside the timed rows)
  divided by G;
* **group commit across W groups**: W threads, each appending single FULL entries to its own group for
  ``--writer-seconds``, on a fresh store: entries/s, for each W of ``--writers``.

Rows go through the shared round runner (one untimed warm-up, interleaved rounds, medians). Targets
(issue 20, printed, not asserted): open of the largest G within 2x the open of 1 group; append p50 at the
largest G within 1.2x of 1 group; group commit across the largest W at least as fast as across the smallest.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import threading
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Row, md_table, pct, print_rounds, print_table, run_rounds, target, us, workdir  # noqa: E402

from raft_sqlite import FsyncMode, LogEntry, NodeStore  # noqa: E402

PAYLOAD = b"x" * 100


def build(path, groups, entries):
    per = max(1, entries // groups)
    with NodeStore.open(path, "bench", cluster_id="bench", fsync=FsyncMode.OFF) as s:
        for g in range(groups):
            lg = s.log(f"g{g}")
            for lo in range(1, per + 1, 10_000):
                lg.append([LogEntry(i, 1, PAYLOAD) for i in range(lo, min(per, lo + 9_999) + 1)])
            s.metadata(f"g{g}").set_term_and_vote(1, "n1")
    return per


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Bench:
    def __init__(self, a):
        self.a = a
        self.d = workdir()
        self.paths = {}
        for g in a.groups:
            p = os.path.join(self.d, f"g{g}")
            t0 = time.perf_counter()
            build(p, g, a.entries)
            print(f"built {g} group(s) in {time.perf_counter() - t0:.1f} s", flush=True)
            self.paths[g] = p

    def open_row(self, g):
        def measure():
            gc.collect()
            r0 = rss_kib()
            t0 = time.perf_counter()
            s = NodeStore.open(self.paths[g], "bench", cluster_id="bench")
            t = time.perf_counter() - t0
            grew = rss_kib() - r0
            s.close()
            return {"s": t, "rss_kib_per_group": grew / g}
        return measure

    def heap_per_group(self, g):
        """Python heap the open leaves allocated per group (tracemalloc: once, outside the timed rows, as
        it slows every allocation down several times)."""
        gc.collect()
        tracemalloc.start()
        s = NodeStore.open(self.paths[g], "bench", cluster_id="bench")
        heap = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        s.close()
        return heap / g

    def append_row(self, g):
        def measure():
            s = NodeStore.open(self.paths[g], "bench", cluster_id="bench", fsync=FsyncMode.FULL)
            try:
                names = [f"g{k}" for k in range(min(g, self.a.appends))]
                logs = [s.log(n) for n in names]
                lat = []
                for k in range(self.a.appends):
                    lg = logs[k % len(logs)]
                    e = [LogEntry(lg.last_index + 1, 1, PAYLOAD)]
                    t0 = time.perf_counter()
                    lg.append(e)
                    lat.append(time.perf_counter() - t0)
                for lg in logs:  # leave the template as it was for the next round
                    lg.truncate_after(lg.last_index - sum(1 for k in range(self.a.appends)
                                                          if logs[k % len(logs)] is lg))
            finally:
                s.close()
            return {"p50": statistics.median(lat), "p99": pct(lat, 99)}
        return measure

    def writers_row(self, w):
        def measure():
            p = os.path.join(self.d, f"w{w}")
            shutil.rmtree(p, ignore_errors=True)
            s = NodeStore.open(p, "bench", cluster_id="bench", fsync=FsyncMode.FULL)
            try:
                logs = [s.log(f"w{k}") for k in range(w)]
                stop, start = threading.Event(), threading.Barrier(w + 1)
                counts = [0] * w

                def run(k):
                    lg, n = logs[k], 0
                    start.wait()
                    while not stop.is_set():
                        n += 1
                        lg.append([LogEntry(n, 1, PAYLOAD)])
                    counts[k] = n
                ts = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(w)]
                for t in ts:
                    t.start()
                start.wait()
                t0 = time.perf_counter()
                time.sleep(self.a.writer_seconds)
                stop.set()
                for t in ts:
                    t.join()
                dt = time.perf_counter() - t0
                commits = s.stats.commits
            finally:
                s.close()
                shutil.rmtree(p, ignore_errors=True)
            total = sum(counts)
            return {"eps": total / dt, "batch": total / max(1, commits)}
        return measure


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", default="1,100,1000,10000")
    ap.add_argument("--entries", type=int, default=200_000)
    ap.add_argument("--appends", type=int, default=2000)
    ap.add_argument("--writers", default="8,1000")
    ap.add_argument("--writer-seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 and 50 groups, 5,000 entries, 1 round")
    a = ap.parse_args(argv)
    if a.quick:
        a.groups, a.entries, a.appends, a.writers, a.writer_seconds, a.rounds = "1,50", 5000, 200, "2,16", 0.3, 1
    a.groups = [int(x) for x in a.groups.split(",")]
    a.writers = [int(x) for x in a.writers.split(",")]
    b = Bench(a)
    try:
        rows = [Row(f"open G={g}", b.open_row(g)) for g in a.groups]
        rows += [Row(f"append G={g}", b.append_row(g)) for g in a.groups]
        rows += [Row(f"writers W={w}", b.writers_row(w)) for w in a.writers]
        res = run_rounds(rows, a.rounds)
        heap = {g: b.heap_per_group(g) for g in a.groups}
    finally:
        shutil.rmtree(b.d, ignore_errors=True)
    print_rounds(res, [("s", "s", lambda v: f"{v:.3f}"), ("p50", "p50 us", us), ("eps", "entries/s", lambda v: f"{v:,.0f}")])
    g1, gmax = a.groups[0], a.groups[-1]
    open1, app1 = res[f"open G={g1}"].med("s"), res[f"append G={g1}"].med("p50")
    table = []
    for g in a.groups:
        o, ap_ = res[f"open G={g}"], res[f"append G={g}"]
        table.append([f"{g:,}", f"{a.entries // g:,}", f"{o.med('s') * 1e3:,.0f} ms", f"{o.med('s') / open1:.2f}x",
                      us(ap_.med("p50")), us(ap_.med("p99")), f"{ap_.med('p50') / app1:.2f}x",
                      f"{o.med('rss_kib_per_group'):.1f}" if g > 1 else "-",
                      f"{heap[g] / 1024:.1f}" if g > 1 else "-"])
    head1 = ["groups", "entries/group", "open + validate", "vs 1 group", "append p50 us", "append p99 us",
             "p50 vs 1 group", "RSS KiB/group", "heap KiB/group"]
    title1 = f"{a.entries:,} entries of 100 B over G groups; {a.rounds} interleaved rounds, medians"
    print_table(title1, head1, table)
    w0, wmax = a.writers[0], a.writers[-1]
    e0 = res[f"writers W={w0}"].med("eps")
    head2 = ["writers (groups)", "entries/s", "vs first", "entries per commit"]
    table2 = [[f"{w:,}", f"{res[f'writers W={w}'].med('eps'):,.0f}", f"{res[f'writers W={w}'].med('eps') / e0:.2f}x",
               f"{res[f'writers W={w}'].med('batch'):.1f}"] for w in a.writers]
    title2 = f"group commit: W threads, one group each, single FULL appends for {a.writer_seconds} s"
    print_table(title2, head2, table2)
    om, am = res[f"open G={gmax}"].med("s") / open1, res[f"append G={gmax}"].med("p50") / app1
    em = res[f"writers W={wmax}"].med("eps") / e0
    targets = (f"targets: {target(om <= 2, f'open at {gmax:,} groups <= 2x one group ({om:.2f}x)')}; "
               f"{target(am <= 1.2, f'append p50 at {gmax:,} groups <= 1.2x ({am:.2f}x)')}; "
               f"{target(em >= 1, f'{wmax:,} writers >= {w0} writers ({em:.2f}x)')}")
    print("\n" + targets)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({name: r.rounds for name, r in res.items()}, f, indent=1)
    return (f"{title1}\n\n{md_table(head1, table)}\n\n{title2}:\n\n{md_table(head2, table2)}\n\n{targets}.\n")


if __name__ == "__main__":
    main()
