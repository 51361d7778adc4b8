"""PySyncObj journal append throughput: raft_sqlite's adapter vs PySyncObj's stock FileJournal, same run.

    python benchmarks/pysyncobj_journal.py [--seconds 2] [--payload 100] [--rounds 3] [--quick]

PySyncObj calls ``journal.add(command, idx, term)`` once per entry from its tick thread (leader: per
command; follower: per entry of an AppendEntries, answered right after). Measured per configuration:

- ``RaftSqliteJournal`` with the store in FULL (survives power loss when ``add`` returns), NORMAL
  (survives a process crash; the WAL is synced every 50 ms) and OFF (reference only).
- PySyncObj 0.3.17 ``FileJournal`` with ``flush()`` after every ``add`` (an msync of its mmap: its only
  configuration that writes entries to disk before PySyncObj acts on them; its term/vote file is still
  never fsynced) and without (the stock behaviour: the OS writes the mmap back whenever it likes).

A second table measures ``setCurrentTerm(term, vote)`` (a vote must be durable before it is sent):
raft_sqlite FULL vs FileJournal (pickle + rename, no fsync). Ratios are ops/s relative to
FileJournal+flush.

Every configuration is measured by the shared round runner (_common.run_rounds): one untimed warm-up
call of ``--warmup-seconds`` per configuration, then ``--rounds`` interleaved rounds (order rotating per
round) on a fresh journal each; each timed loop is preceded by one untimed call; figures are medians over
the rounds and ratios are ratios of those medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Row, latency_figures, md_table, print_rounds, run_rounds, timed_loop, us, workdir  # noqa: E402
from pysyncobj.journal import FileJournal  # noqa: E402

from raft_sqlite import FsyncMode, NodeStore  # noqa: E402
from raft_sqlite.integrations.pysyncobj import RaftSqliteJournal  # noqa: E402


def _adds(journal, payload):
    if len(journal) == 0:
        journal.add(b"\x01", 1, 0)  # SyncObj's no-op at index 1, term 0
    nxt = [journal[-1][1] + 1]

    def one():
        i = nxt[0]
        journal.add(payload, i, 1)
        nxt[0] = i + 1

    return one


def bench_rsql(d, mode, seconds, payload):
    path = os.path.join(d, f"rsql-{mode.value}")
    store = NodeStore.open(path, "bench", cluster_id="bench", fsync=mode)
    j = RaftSqliteJournal(store, owns_store=True)
    one = _adds(j, payload)
    one()
    lat = timed_loop(one, seconds)
    term = [1]

    def vote():
        term[0] += 1
        j.setCurrentTerm(term[0], "127.0.0.1:4321")

    vote()
    vlat = timed_loop(vote, min(seconds, 1.0))
    j._destroy()
    shutil.rmtree(path)
    return lat, vlat


def bench_file(d, flush, seconds, payload):
    path = os.path.join(d, f"file-{int(flush)}.journal")
    j = FileJournal(path)
    add = _adds(j, payload)
    if flush:
        def one():
            add()
            j.flush()
    else:
        one = add
    one()
    lat = timed_loop(one, seconds)
    term = [1]

    def vote():
        term[0] += 1
        j.setCurrentTerm(term[0], "127.0.0.1:4321")

    vote()
    vlat = timed_loop(vote, min(seconds, 1.0))
    j._destroy()  # PySyncObj's own API for closing a journal (no public close)
    for p in (path, path + ".meta"):
        if os.path.exists(p):
            os.remove(p)
    return lat, vlat


CONFIGS = [
    ("FileJournal + flush() per add", lambda d, sec, payload: bench_file(d, True, sec, payload)),
    ("FileJournal, no flush (stock)", lambda d, sec, payload: bench_file(d, False, sec, payload)),
    ("RaftSqliteJournal FULL", lambda d, sec, payload: bench_rsql(d, FsyncMode.FULL, sec, payload)),
    ("RaftSqliteJournal NORMAL", lambda d, sec, payload: bench_rsql(d, FsyncMode.NORMAL, sec, payload)),
    ("RaftSqliteJournal OFF (reference)", lambda d, sec, payload: bench_rsql(d, FsyncMode.OFF, sec, payload)),
]


def _figures(pair):
    lat, vlat = pair
    f = latency_figures(lat)
    v = latency_figures(vlat)
    f.update(vote_rate=v["rate"], vote_p50=v["p50"], vote_p99=v["p99"])
    return f


def main(argv=None):
    """Run the journal benchmark; prints per-round values and the tables; returns the README markdown."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per configuration and round")
    ap.add_argument("--warmup-seconds", type=float, default=0.3, help="duration of each warm-up call")
    ap.add_argument("--payload", type=int, default=100, help="command bytes")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is kept")
    ap.add_argument("--quick", action="store_true", help="smoke run: 0.2 s, 0.05 s warm-up, 2 rounds")
    a = ap.parse_args(argv)
    if a.quick:
        a.seconds, a.warmup_seconds, a.rounds = 0.2, 0.05, 2
    payload = b"\x00" + os.urandom(max(0, a.payload - 1))
    d = workdir()
    try:
        rows = [Row(name, lambda fn=fn: _figures(fn(d, a.seconds, payload)),
                    lambda fn=fn: fn(d, a.warmup_seconds, payload)) for name, fn in CONFIGS]
        t0 = time.perf_counter()
        res = run_rounds(rows, a.rounds)
        elapsed = time.perf_counter() - t0
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print_rounds(res, [("rate", "adds/s", lambda v: f"{v:,.0f}"), ("vote_rate", "votes/s", lambda v: f"{v:,.0f}")])
    base, nof = res[CONFIGS[0][0]], res[CONFIGS[1][0]]
    rows = [(name, f"{r.med('rate'):,.0f}", us(r.med("p50")), us(r.med("p99")), f"{r.ratio('rate', base):.2f}x",
             f"{r.ratio('rate', nof):.3f}x") for name, r in res.items()]
    t1 = md_table(("configuration", "adds/s", "p50 us", "p99 us", "vs FileJournal + flush", "vs FileJournal"), rows)
    vrows = [(name, f"{r.med('vote_rate'):,.0f}", us(r.med("vote_p50")), us(r.med("vote_p99")),
              f"{r.ratio('vote_rate', base):.2f}x") for name, r in res.items()]
    t2 = md_table(("`setCurrentTerm(term, vote)`", "ops/s", "p50 us", "p99 us", "vs FileJournal"), vrows)
    md = (f"{a.payload}-byte commands; {a.rounds} interleaved rounds of {a.seconds:g} s per configuration "
          f"(votes: {min(a.seconds, 1.0):g} s) after one {a.warmup_seconds:g} s warm-up each; median of the rounds "
          f"({elapsed:.0f} s)\n\n{t1}\n\n{t2}\n")
    print("\n" + md)
    return md


if __name__ == "__main__":
    main()
