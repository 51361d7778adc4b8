"""A 3-node PySyncObj cluster: replicated throughput and sync=True latency per journal, same run.

    python benchmarks/pysyncobj_cluster.py [--commands 20000] [--sync-calls 30] [--rounds 3]
                                           [--warmup-commands 2000] [--timeout 300] [--quick]

Three PySyncObj 0.3.17 nodes in this process on 127.0.0.1 (free ports), each a replicated counter (a
SyncObj subclass with ``@replicated def inc(self)``), ``appendEntriesUseBatch=True`` and every other
setting PySyncObj's default (so log compaction runs once a journal holds more than 5000 entries). Per
cluster, once all three nodes agree on a leader:

- **replicated ops/s**: ``--commands`` N asynchronous ``inc(callback=...)`` calls submitted to the
  leader's SyncObj from the benchmark's main thread; the time runs from the first submit until every
  callback has reported ``FAIL_REASON.SUCCESS`` *and* the counter is N on every node. ops/s = N / time.
  A callback with any other result fails the run.
- **sync=True latency**: then ``--sync-calls`` calls ``inc(sync=True)`` one after the other on the
  leader; p50 and p99.

Journals (rows), each a fresh cluster in a fresh temporary directory per round, destroyed after it:
PySyncObj's ``MemoryJournal`` (no ``journalFile``); its stock ``FileJournal`` (``journalFile`` a file,
nothing fsynced); raft_sqlite via ``patch_pysyncobj()`` (``journalFile`` a directory per node) with the
stores in NORMAL and in FULL. After each raft_sqlite run every store is checked to be in the mode of its
row (``store.fsync`` and the ``synchronous`` pragma SQLite reports); a mismatch fails the run.

**fsyncs per command** (raft_sqlite rows): the syncs the three stores make during the replicated-ops
phase, divided by N: SQLite's ``xSync`` calls, counted by a pass-through apsw VFS registered here, plus
the fsync/fdatasync/directory syncs made through :mod:`raft_sqlite.fsio` (a counting backend). A Python
VFS shim sends every SQLite read and write through Python, so the counting is done in ONE extra, untimed
round per raft_sqlite row after the timed rounds (its ops/s is printed, not used).

Every row is measured by the shared round runner (_common.run_rounds): one untimed warm-up run of
``--warmup-commands`` commands per row, then ``--rounds`` interleaved rounds (order rotating per round);
figures are medians over the rounds and ratios are ratios of those medians (vs the stock FileJournal row).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import apsw  # noqa: E402
import pysyncobj.syncobj as _pso_syncobj  # noqa: E402
from _common import BenchmarkError, Row, md_table, pct, print_rounds, run_rounds, workdir  # noqa: E402
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated  # noqa: E402

from raft_sqlite import FsyncMode, fsio  # noqa: E402
from raft_sqlite.fsync import SYNCHRONOUS_LEVELS, pragmas_for  # noqa: E402
from raft_sqlite.integrations.pysyncobj import create_journal, patch_pysyncobj  # noqa: E402

LEADER = 2  # PySyncObj's _RAFT_STATE.LEADER, as getStatus()['state'] reports it
COUNT_VFS = "rsq-bench-count"


class ClusterTimeout(BenchmarkError):
    """A cluster did not elect a leader / apply the commands / answer a sync call within ``--timeout``."""


class Counter(SyncObj):
    """The replicated counter of the issue's workload."""

    def __init__(self, self_addr, partners, conf):
        super().__init__(self_addr, partners, conf)
        self.value = 0

    @replicated
    def inc(self):
        """Add one; returns the new value."""
        self.value += 1
        return self.value


# ---------------------------------------------------------------------------------------- sync counting
class SyncCounts:
    """Shared tallies of the counting round (one lock: SQLite and fsio syncs come from several threads)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.xsync = 0
        self.fsio = 0
        self.by_kind: dict[str, int] = {}  # "xSync <file>" / "fsio <call>" -> count (where the syncs go)

    def add(self, key):
        with self.lock:
            if key.startswith("xSync"):
                self.xsync += 1
            else:
                self.fsio += 1
            self.by_kind[key] = self.by_kind.get(key, 0) + 1

    def snapshot(self):
        with self.lock:
            return self.xsync, self.fsio, dict(self.by_kind)


class CountingFile(apsw.VFSFile):
    def __init__(self, counts, base, name, flags):
        super().__init__(base, name, flags)
        self._counts = counts
        path = name.filename() if isinstance(name, apsw.URIFilename) else name
        self._key = f"xSync {os.path.basename(path) if path else '(temp)'}"

    def xSync(self, flags):
        self._counts.add(self._key)
        super().xSync(flags)


class CountingVFS(apsw.VFS):
    """The default VFS, unchanged, except that it counts ``xSync`` calls (SQLite's fsync/fdatasync)."""

    def __init__(self, counts, base, name=COUNT_VFS):
        super().__init__(name, base)
        self._counts, self._base = counts, base

    def xOpen(self, name, flags):
        return CountingFile(self._counts, self._base, name, flags)


class CountingFS(fsio.OsFileSystem):
    """raft_sqlite's real file system backend, counting fsync, fdatasync and directory syncs."""

    def __init__(self, counts):
        self._counts = counts

    def fsync(self, fd):
        self._counts.add("fsio fsync")
        super().fsync(fd)

    def fdatasync(self, fd):
        self._counts.add("fsio fdatasync")
        super().fdatasync(fd)

    def sync_dir(self, path):
        self._counts.add("fsio sync_dir")
        super().sync_dir(path)


@contextlib.contextmanager
def counting(counts):
    """Count the syncs of every store opened inside the block: the counting VFS is made SQLite's default
    (stores open with ``vfs=None``, i.e. the default) and the counting fsio backend is installed. The
    previous default VFS is restored on exit and the counting VFS unregistered."""
    prev = apsw.vfs_names()[0]  # sqlite3_vfs_find(NULL): the default VFS is listed first
    vfs = CountingVFS(counts, base=prev)  # by name: "" would mean the default, i.e. this VFS itself
    try:
        apsw.set_default_vfs(COUNT_VFS)
        with fsio.installed(CountingFS(counts)):
            yield
    finally:
        apsw.set_default_vfs(prev)
        vfs.unregister()


# ---------------------------------------------------------------------------------------- one cluster
def free_ports(n):
    """``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago (bound to port 0, then closed)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _deadline_left(deadline, what):
    left = deadline - time.monotonic()
    if left <= 0:
        raise ClusterTimeout(f"timed out waiting for {what}")
    return left


def _wait_leader(nodes, deadline):
    """The node all three agree is the leader, once it is in state LEADER."""
    while True:
        st = [n.getStatus() for n in nodes]
        leaders = {s["leader"] for s in st}
        if len(leaders) == 1 and None not in leaders:
            for n, s in zip(nodes, st):
                if s["state"] == LEADER and n.isReady():
                    return n
        _deadline_left(deadline, "a leader all three nodes agree on")
        time.sleep(0.01)


def run_cluster(kind, commands, sync_calls, timeout, counts=None):
    """Start a 3-node cluster with journal ``kind`` ("memory", "file", or an FsyncMode for raft_sqlite),
    run the workload, destroy the cluster. Returns the figures of the run."""
    d = workdir()
    nodes, journals = [], []
    deadline = time.monotonic() + timeout
    patch = None
    try:
        ports = free_ports(3)
        addrs = [f"127.0.0.1:{p}" for p in ports]
        if isinstance(kind, FsyncMode):
            patch = patch_pysyncobj()
            mode = kind

            def make_journal(journal_file):
                # the adapter's own factory with the row's fsync mode (instead of RAFT_SQLITE_FSYNC);
                # recorded so that the run can check each store's mode and close it
                # the mode's name, not the FsyncMode: create_journal parses FsyncMode(str(fsync).upper()) and on
                # Python 3.11 str(FsyncMode.NORMAL) is "FsyncMode.NORMAL", which it refuses
                j = create_journal(journal_file, fsync=mode.value)
                journals.append(j)
                return j

            _pso_syncobj.createJournal = make_journal  # undone by patch.restore()
        for i, addr in enumerate(addrs):
            if kind == "memory":
                jf = None
            elif kind == "file":
                jf = os.path.join(d, f"node{i}.journal")
            else:
                jf = os.path.join(d, f"node{i}")
            conf = SyncObjConf(journalFile=jf, appendEntriesUseBatch=True)
            nodes.append(Counter(addr, [a for a in addrs if a != addr], conf))
        leader = _wait_leader(nodes, deadline)

        # ---- replicated ops/s
        done = threading.Event()
        state = {"ok": 0, "errors": []}

        def callback(result, error):  # PySyncObj calls it from the leader's tick thread
            if error != FAIL_REASON.SUCCESS:
                state["errors"].append(error)
                done.set()
                return
            state["ok"] += 1
            if state["ok"] == commands:
                done.set()

        c0 = counts.snapshot() if counts else (0, 0, {})
        t0 = time.perf_counter()
        for _ in range(commands):
            leader.inc(callback=callback)
        if not done.wait(_deadline_left(deadline, f"{commands} callbacks")):
            raise ClusterTimeout(f"{kind}: {state['ok']}/{commands} callbacks after {timeout:g} s")
        if state["errors"]:
            raise BenchmarkError(f"{kind}: a replicated call failed with FAIL_REASON {state['errors'][0]} "
                                 f"({len(state['errors'])} failures)")
        while any(n.value != commands for n in nodes):
            _deadline_left(deadline, f"every node to apply {commands} commands "
                           f"(counters {[n.value for n in nodes]})")
            time.sleep(0.0005)
        elapsed = time.perf_counter() - t0
        c1 = counts.snapshot() if counts else (0, 0, {})

        # ---- sequential sync=True latency
        lat = []
        for i in range(sync_calls):
            s0 = time.perf_counter()
            v = leader.inc(sync=True, timeout=_deadline_left(deadline, "a sync=True call"))
            lat.append(time.perf_counter() - s0)
            if v != commands + i + 1:
                raise BenchmarkError(f"{kind}: sync=True call {i} returned {v}, expected {commands + i + 1}")

        if isinstance(kind, FsyncMode):
            if len(journals) != 3:
                raise BenchmarkError(f"{kind}: {len(journals)} raft_sqlite journals were created, expected 3")
            want = SYNCHRONOUS_LEVELS[pragmas_for(kind)["synchronous"]]
            for j in journals:
                got = j.store.pragmas()["synchronous"]
                if j.store.fsync is not kind or got != want:
                    raise BenchmarkError(f"{j.store.data_dir}: store in {j.store.fsync} (synchronous={got}), "
                                         f"the row wants {kind.value} (synchronous={want})")
        return {"rate": commands / elapsed, "p50": pct(lat, 50), "p99": pct(lat, 99),
                "xsync": c1[0] - c0[0], "fsio": c1[1] - c0[1],
                "by_kind": {k: v - c0[2].get(k, 0) for k, v in c1[2].items() if v - c0[2].get(k, 0)}}
    finally:
        for n in nodes:
            with contextlib.suppress(Exception):
                n.destroy()
        for n in nodes:  # the tick thread runs _doDestroy (closing the journal, i.e. the store), then exits
            with contextlib.suppress(Exception):
                n.destroy_synchronous()
        if patch is not None:
            patch.restore()
        alive = [n.selfNode for n in nodes if n.tick_thread_alive()]
        for j in journals:
            # the destroy path above has closed every store (the journal's _destroy); close() is idempotent
            # and makes sure no store (nor NORMAL's syncer thread) outlives its directory if it did not
            j.store.close()
        shutil.rmtree(d, ignore_errors=True)
        if alive:
            raise BenchmarkError(f"{kind}: tick thread of {alive} still running after destroy_synchronous()")


ROWS = [
    ("memory (MemoryJournal)", "memory"),
    ("stock FileJournal", "file"),
    ("raft_sqlite NORMAL", FsyncMode.NORMAL),
    ("raft_sqlite FULL", FsyncMode.FULL),
]
STOCK = "stock FileJournal"


def main(argv=None):
    """Run the cluster benchmark; prints per-round values and the table; returns the README markdown."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--commands", type=int, default=20000, help="async increments per measurement")
    ap.add_argument("--sync-calls", type=int, default=30, help="sequential inc(sync=True) calls per measurement")
    ap.add_argument("--warmup-commands", type=int, default=2000, help="commands of each row's warm-up run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is kept")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per measurement before it fails")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1000 commands, 5 sync calls, 1 round, no warm-up run")
    a = ap.parse_args(argv)
    if a.quick:
        a.commands, a.sync_calls, a.rounds, a.warmup_commands = 1000, 5, 1, 0
    if a.commands < 1 or a.sync_calls < 1:
        ap.error("--commands and --sync-calls must be >= 1")

    def warmup(kind):
        if a.warmup_commands:  # --quick: no warm-up run (the same rule for every row)
            run_cluster(kind, a.warmup_commands, min(5, a.sync_calls), a.timeout)

    load0 = os.getloadavg()[0]
    rows = [Row(name, lambda kind=kind: run_cluster(kind, a.commands, a.sync_calls, a.timeout),
                lambda kind=kind: warmup(kind)) for name, kind in ROWS]
    t0 = time.perf_counter()
    res = run_rounds(rows, a.rounds)
    # the counting round: one extra untimed run per raft_sqlite row, through the counting VFS and fsio backend
    counted = {}
    for name, kind in ROWS:
        if isinstance(kind, FsyncMode):
            counts = SyncCounts()
            with counting(counts):
                counted[name] = run_cluster(kind, a.commands, a.sync_calls, a.timeout, counts)
            if kind is FsyncMode.FULL and counted[name]["xsync"] == 0:
                raise BenchmarkError("the counting VFS saw no xSync from FULL stores: the stores did not use it")
    elapsed = time.perf_counter() - t0
    load1 = os.getloadavg()[0]
    print_rounds(res, [("rate", "ops/s", lambda v: f"{v:,.0f}"), ("p50", "p50 ms", lambda v: f"{v * 1e3:.2f}"),
                       ("p99", "p99 ms", lambda v: f"{v * 1e3:.2f}")])
    base = res[STOCK]
    table = []
    for name, _kind in ROWS:
        r = res[name]
        if name in counted:
            c = counted[name]
            fs = f"{(c['xsync'] + c['fsio']) / a.commands:.3f} ({c['xsync']} xSync + {c['fsio']} fsio)"
        else:
            fs = "0 (none)"
        table.append((name, f"{r.med('rate'):,.0f}", f"{r.ratio('rate', base):.3f}x", f"{r.med('p50') * 1e3:.2f}",
                      f"{r.med('p99') * 1e3:.2f}", f"{r.ratio('p50', base):.2f}x", fs))
    t = md_table(("journal", "replicated ops/s", "vs stock", "sync=True p50 ms", "p99 ms", "p50 vs stock",
                  "fsyncs per command"), table)
    cnt = "; ".join(f"{name} {c['rate']:,.0f} ops/s, syncs by file/call: "
                    + ", ".join(f"{k} {v}" for k, v in sorted(c["by_kind"].items())) for name, c in counted.items())
    md = (f"3 PySyncObj nodes in one process on 127.0.0.1, a replicated counter; {a.commands:,} async "
          f"increments then {a.sync_calls} sequential `sync=True` calls per measurement; {a.rounds} interleaved "
          f"rounds, each on a fresh cluster, after one warm-up run of {a.warmup_commands:,} commands per row; "
          f"median of the rounds; ratios vs the stock FileJournal row. fsyncs per command: the three stores' "
          f"syncs during the async phase / {a.commands:,}, counted in one extra untimed round per raft_sqlite "
          f"row through a counting VFS + fsio backend (that round: {cnt}). 1-min load average {load0:.2f} "
          f"before, {load1:.2f} after ({elapsed:.0f} s)\n\n{t}\n")
    print("\n" + md)
    return md


if __name__ == "__main__":
    main()
