"""PySyncObj journal append throughput: raft_sqlite's adapter vs PySyncObj's stock FileJournal, same run.

    python benchmarks/pysyncobj_journal.py [--seconds 2] [--payload 100]

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
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import pct, print_table, timed_loop, us, workdir
from pysyncobj.journal import FileJournal

from raft_sqlite import FsyncMode, NodeStore
from raft_sqlite.integrations.pysyncobj import RaftSqliteJournal


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

    vlat = timed_loop(vote, min(seconds, 1.0))
    j._destroy()
    for p in (path, path + ".meta"):
        if os.path.exists(p):
            os.remove(p)
    return lat, vlat


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per configuration")
    ap.add_argument("--payload", type=int, default=100, help="command bytes")
    a = ap.parse_args(argv)
    payload = b"\x00" + os.urandom(max(0, a.payload - 1))
    d = workdir()
    try:
        runs = [
            ("FileJournal + flush() per add", bench_file(d, True, a.seconds, payload)),
            ("FileJournal, no flush (stock)", bench_file(d, False, a.seconds, payload)),
            ("RaftSqliteJournal FULL", bench_rsql(d, FsyncMode.FULL, a.seconds, payload)),
            ("RaftSqliteJournal NORMAL", bench_rsql(d, FsyncMode.NORMAL, a.seconds, payload)),
            ("RaftSqliteJournal OFF (reference)", bench_rsql(d, FsyncMode.OFF, a.seconds, payload)),
        ]
    finally:
        shutil.rmtree(d, ignore_errors=True)
    base_ops = len(runs[0][1][0]) / sum(runs[0][1][0])
    nof_ops = len(runs[1][1][0]) / sum(runs[1][1][0])
    rows = []
    for name, (lat, _v) in runs:
        ops = len(lat) / sum(lat)
        rows.append((name, f"{ops:,.0f}", us(pct(lat, 50)), us(pct(lat, 99)), f"{ops / base_ops:.2f}x",
                     f"{ops / nof_ops:.3f}x"))
    print_table(f"journal.add() of {a.payload}-byte commands, {a.seconds:g} s each",
                ("configuration", "adds/s", "p50 us", "p99 us", "vs FileJournal+flush", "vs FileJournal"), rows)
    vbase = runs[0][1][1]
    vrows = []
    for name, (_l, vlat) in runs:
        vrows.append((name, f"{len(vlat) / sum(vlat):,.0f}", us(pct(vlat, 50)), us(pct(vlat, 99)),
                      f"{(len(vlat) / sum(vlat)) / (len(vbase) / sum(vbase)):.2f}x"))
    print_table("setCurrentTerm(term, vote)", ("configuration", "ops/s", "p50 us", "p99 us", "vs FileJournal"),
                vrows)


if __name__ == "__main__":
    main()
