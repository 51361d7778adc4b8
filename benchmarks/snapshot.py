"""Snapshot write/read bandwidth, memory, and append latency while a snapshot is written.

    python benchmarks/snapshot.py [--size-mib 1024] [--chunk-kib 1024] [--commit-mib 8] [--append-seconds 2]
                                  [--rounds 3] [--quick]

Measured in the same run, on the same file system:

* raw baseline: the same bytes written sequentially to a fresh plain file (1 chunk per ``write``) + one
  ``fsync``; and a plain file of the same size read back sequentially;
* raft_sqlite: ``store.snapshots(g).write(...)`` on a fresh store (FULL fsync, CRC32 per chunk, sha256,
  manifest finalize) and ``open(meta)`` read to the end (CRC32 per chunk + sha256 verified; and a variant
  with CRC32 only);
* every read twice, labelled: **warm** (every file read once, untimed, just before) and **cold** (every
  file fsynced and dropped from the page cache with ``POSIX_FADV_DONTNEED`` just before, checked with
  mincore(2): the run stops if more than 5% stayed cached);
* peak RSS growth during each (``/proc/self/status`` VmHWM after resetting it through
  ``/proc/self/clear_refs``, minus VmRSS before): the largest of every call, fixtures and warm-ups
  included (a ceiling; see RSS_SEEN);
* single-entry appends (FULL) of another group on the snapshot's store: p50/p99 idle vs while a snapshot of
  ``--size-mib`` is being written by another thread, and (the design not taken, justifying the separate
  ``chunks.db``) while the same blob batches are written into a scratch table of ``raft.db`` itself.

Every row is measured by the shared round runner (_common.run_rounds: one untimed warm-up per row,
``--rounds`` interleaved rounds with the order rotating, medians; ratios are ratios of medians). The
append rows each use a fresh store whose log gets 0.05 s of untimed appends first.

Targets (printed, not asserted): write and read >= 70% of raw; RSS growth <= 64 MiB; append p99 during a
snapshot <= 2x idle.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Row, data_files, md_table, pct, print_rounds, run_rounds, set_cache, target, us, workdir  # noqa: E402

from raft_sqlite import FsyncMode, LogEntry, NodeStore  # noqa: E402

MiB = 1 << 20


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


#: Every peak-RSS-growth figure measured, warm-up calls included, by what was measured. The memory figure is
#: the exception to the suite's median rule, on purpose: its target is a ceiling, so the table reports the
#: largest growth of any call, and the first call of a kind in the process (the warm-up) is the one that
#: grows the heap; later calls reuse what it freed and would show ~0.
RSS_SEEN: dict = {}


class Peak:
    """Peak RSS growth over a block, in MiB; recorded in :data:`RSS_SEEN` under ``key`` if given."""

    def __init__(self, key=None):
        self.key = key

    def __enter__(self):
        self.ok = reset_peak()
        self.base = status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.growth = (status_kib("VmHWM") - self.base) / 1024 if self.ok else float("nan")
        if self.key is not None:
            RSS_SEEN.setdefault(self.key, []).append(self.growth)


def chunks_of(size: int, chunk: int, bufs):
    """The data to write, as a state machine would produce it: a fresh bytes object per chunk (a copy
    of one of a few random buffers), so that memory held by the writer shows in the RSS figures."""
    n = 0
    i = 0
    while n < size:
        b = bufs[i % len(bufs)]
        b = memoryview(b)[:size - n].tobytes() if n + len(b) > size else memoryview(b).tobytes()
        yield b
        n += len(b)
        i += 1


def raw_write(d, size, chunk, bufs):
    """The same bytes written to a fresh plain file + one fsync; figures: s, rss (MiB)."""
    path = os.path.join(d, "raw-w.bin")
    with Peak("raw write") as pk:
        t0 = time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            f.writelines(chunks_of(size, chunk, bufs))
            os.fsync(f.fileno())
        w = time.perf_counter() - t0
    os.unlink(path)
    return {"s": w, "rss": pk.growth}


def raw_read(path, size, chunk, cold):
    """Sequential read of a plain file of ``size`` bytes, ``chunk`` per read; figures: s, resident."""
    resident = set_cache([path], cold) if cold else None
    t0 = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while b := f.read(chunk):
            n += len(b)
    r = time.perf_counter() - t0
    if n != size:
        raise AssertionError((n, size))
    return {"s": r, "resident": resident}


def open_store(path):
    return NodeStore.open(path, "bench", cluster_id="bench", fsync=FsyncMode.FULL)


def setup(path):
    s = open_store(path)
    s.log("snap").append([LogEntry(1, 1, b"x")])
    s.metadata("snap").set_commit_index(1)
    s.log("app").append([LogEntry(1, 1, b"x")])
    return s


def snapshot_write(s, size, chunk, commit, bufs, rate=None):
    m = s.snapshots("snap")
    m.chunk_size, m.commit_bytes, m.keep_chains, m.max_write_rate = chunk, commit, 1, rate
    t0 = time.perf_counter()
    with m.write(1, 1) as w:
        for b in chunks_of(size, chunk, bufs):
            w.write(b)
    return time.perf_counter() - t0, w.meta


def snapshot_read(s, meta, verify_digest=True):
    t0 = time.perf_counter()
    n = 0
    with s.snapshots("snap").open(meta, verify_digest=verify_digest) as r:
        for b in r.chunks():
            n += len(b)
    assert n == meta.size
    return time.perf_counter() - t0


def same_file_writer(s, size, chunk, commit, bufs):
    """The design not taken: the same chunk batches written into raft.db (a scratch table, through a
    second connection, like a chunk table living beside the log would be)."""
    import apsw
    c = apsw.Connection(s.path)
    c.setbusytimeout(10_000)
    c.execute("PRAGMA synchronous=FULL")
    c.execute("CREATE TABLE IF NOT EXISTS bench_blobs(key INTEGER PRIMARY KEY, data BLOB)")
    t0 = time.perf_counter()
    rows, pending = [], 0
    for k, b in enumerate(chunks_of(size, chunk, bufs)):
        rows.append((k, b))
        pending += len(b)
        if pending >= commit:
            with c:
                c.executemany("INSERT INTO bench_blobs VALUES (?,?)", rows)
            rows, pending = [], 0
    if rows:
        with c:
            c.executemany("INSERT INTO bench_blobs VALUES (?,?)", rows)
    c.execute("DELETE FROM bench_blobs")
    c.close()
    return time.perf_counter() - t0


def appends(s, seconds, stop=None):
    lg = s.log("app")
    lat = []
    end = time.perf_counter() + seconds
    i = lg.last_index + 1
    payload = b"p" * 100
    while (time.perf_counter() < end) if stop is None else (not stop.is_set() or len(lat) < 20):
        t0 = time.perf_counter()
        lg.append([LogEntry(i, 1, payload)])
        lat.append(time.perf_counter() - t0)
        i += 1
    return lat


def snap_write_row(d, size, chunk, commit, bufs):
    """A snapshot written on a fresh store; figures: s, rss (MiB)."""
    path = os.path.join(d, "store-w")
    s = setup(path)
    try:
        with Peak("snapshot write") as pk:
            w, _meta = snapshot_write(s, size, chunk, commit, bufs)
    finally:
        s.close()
        shutil.rmtree(path)
    return {"s": w, "rss": pk.growth}


def snap_read_row(path, meta, cold, verify_digest):
    """The fixture store's snapshot read to the end after the store is opened and the cache set; figures:
    s, rss (MiB), resident."""
    s = open_store(path)
    try:
        resident = set_cache(data_files(path), cold) if cold else None
        with Peak("snapshot read") as pk:
            r = snapshot_read(s, meta, verify_digest=verify_digest)
    finally:
        s.close()
    return {"s": r, "rss": pk.growth, "resident": resident}


def append_row(d, a, size, chunk, commit, bufs, busy, rate_mib=None):
    """Single FULL appends of group ``app`` on a fresh store: idle for ``--append-seconds`` (busy=None),
    or while another thread writes the snapshot ("snapshot") or the same blobs into raft.db ("same").
    Figures: p50, p99, max, n, and the writer's MB/s ("write_mbps") for busy rows."""
    path = os.path.join(d, "store-lat")
    s = setup(path)
    try:
        appends(s, 0.05)  # untimed first appends, as in every append row
        if busy is None:
            lat = appends(s, a.append_seconds)
            wt = None
        else:
            stop = threading.Event()
            box = {}

            def writer():
                try:
                    if busy == "snapshot":
                        box["t"], _ = snapshot_write(s, size, chunk, commit, bufs,
                                                     rate_mib * MiB if rate_mib else None)
                    else:
                        box["t"] = same_file_writer(s, size, chunk, commit, bufs)
                finally:
                    stop.set()

            t = threading.Thread(target=writer)
            t.start()
            lat = appends(s, 0, stop)
            t.join()
            if "t" not in box:
                raise AssertionError(f"the {busy} writer failed")
            wt = box["t"]
    finally:
        s.close()
        shutil.rmtree(path)
    f = {"p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat), "n": len(lat)}
    if wt is not None:
        f["write_mbps"] = size / wt / 1e6
    return f


def pacing(a, size, chunk, commit, bufs):
    """The appends' tail against the snapshot's pace: one idle row and one row per pace, interleaved."""
    rates = [float(x) for x in a.pacing.split(",")]
    name = lambda r: f"appends during snapshot at {r:g} MiB/s" if r else "appends during snapshot, unpaced"  # noqa: E731
    d = workdir()
    try:
        rows = [Row("appends idle", lambda: append_row(d, a, size, chunk, commit, bufs, None))]
        rows += [Row(name(r), lambda r=r: append_row(d, a, size, chunk, commit, bufs, "snapshot", r)) for r in rates]
        t0 = time.perf_counter()
        res = run_rounds(rows, a.rounds)
        elapsed = time.perf_counter() - t0
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print_rounds(res, [("p99", "p99 us", us), ("write_mbps", "write MB/s", lambda v: f"{v:.0f}")])
    idle = res["appends idle"]
    out = [["idle", "", us(idle.med("p50")), us(idle.med("p99")), "1.00x", ""]]
    for r in rates:
        x = res[name(r)]
        q = x.ratio("p99", idle)
        out.append([f"snapshot {f'at {r:g} MiB/s' if r else 'unpaced'}", f"{x.med('write_mbps'):,.0f} MB/s",
                    us(x.med("p50")), us(x.med("p99")), f"{q:.2f}x", target(q <= 2, "<= 2x")])
    t = md_table(["single FULL appends of another group", "snapshot write", "p50 us", "p99 us", "p99 vs idle",
                  "target"], out)
    md = (f"{a.size_mib} MiB snapshots, {a.chunk_kib} KiB chunks, {a.commit_mib} MiB per chunks.db commit, FULL; "
          f"{a.rounds} interleaved rounds after one warm-up per row, fresh store per row and round; median of the "
          f"rounds ({elapsed:.0f} s); idle appends {a.append_seconds:g} s per round\n\n{t}\n")
    print("\n" + md)
    return md


def main(argv=None):
    """Run the snapshot benchmark; prints per-round values and the table; returns the README markdown."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="snapshot size (default 1024 = 1 GiB)")
    ap.add_argument("--chunk-kib", type=int, default=1024, help="chunk size (default 1024)")
    ap.add_argument("--commit-mib", type=int, default=8, help="bytes per chunks.db transaction (default 8)")
    ap.add_argument("--append-seconds", type=float, default=2.0, help="idle append measurement (default 2 s)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row; the median is kept")
    ap.add_argument("--rate-mib", type=float, default=None,
                    help="max_write_rate (MiB/s) of the snapshot written during appends (default: unpaced)")
    ap.add_argument("--no-same-file", dest="same_file", action="store_false",
                    help="skip the comparison with the blobs written into raft.db itself")
    ap.add_argument("--pacing", default=None,
                    help="comma-separated max_write_rate values in MiB/s (0 = unpaced): measure only the appends "
                    "idle and during a snapshot at each pace, interleaved, and print that table")
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, 0.5 s idle appends, 2 rounds")
    a = ap.parse_args(argv)
    if a.quick:
        a.size_mib, a.append_seconds, a.rounds = 64, 0.5, 2
    size, chunk, commit = a.size_mib * MiB, a.chunk_kib << 10, a.commit_mib * MiB
    bufs = [os.urandom(chunk) for _ in range(4)]
    if a.pacing:
        return pacing(a, size, chunk, commit, bufs)
    d = workdir()
    try:
        # fixtures of the read rows, written once: a plain file and a store holding one snapshot
        # (the first write of each kind in the process: its RSS growth counts, see RSS_SEEN)
        RSS_SEEN.clear()
        raw_path = os.path.join(d, "raw-r.bin")
        with Peak("raw write"), open(raw_path, "wb", buffering=0) as f:
            f.writelines(chunks_of(size, chunk, bufs))
            os.fsync(f.fileno())
        rpath = os.path.join(d, "store-r")
        s = setup(rpath)
        with Peak("snapshot write"):
            _, meta = snapshot_write(s, size, chunk, commit, bufs)
        s.close()
        rows = [Row("raw write + fsync", lambda: raw_write(d, size, chunk, bufs)),
                Row("snapshot write", lambda: snap_write_row(d, size, chunk, commit, bufs))]
        for label, cold in (("warm", False), ("cold", True)):
            rows += [Row(f"raw read {label}", lambda c=cold: raw_read(raw_path, size, chunk, c)),
                     Row(f"snapshot read {label}", lambda c=cold: snap_read_row(rpath, meta, c, True)),
                     Row(f"snapshot read CRC32 only {label}", lambda c=cold: snap_read_row(rpath, meta, c, False))]
        rows += [Row("appends idle", lambda: append_row(d, a, size, chunk, commit, bufs, None)),
                 Row("appends during snapshot",
                     lambda: append_row(d, a, size, chunk, commit, bufs, "snapshot", a.rate_mib))]
        if a.same_file:
            rows.append(Row("appends during raft.db blobs", lambda: append_row(d, a, size, chunk, commit, bufs, "same")))
        t0 = time.perf_counter()
        res = run_rounds(rows, a.rounds)
        elapsed = time.perf_counter() - t0
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print_rounds(res, [("s", "s", lambda v: f"{v:.2f}"), ("rss", "RSS MiB", lambda v: f"{v:.1f}"),
                       ("p99", "p99 us", us), ("write_mbps", "write MB/s", lambda v: f"{v:.0f}")])
    worst = max((v for r in res.values() if "resident" in r.rounds[0] for v in r.values("resident")
                 if v is not None), default=None)
    print("\nlargest page-cache residency left by a cold drop (mincore): "
          + ("unavailable" if worst is None else f"{worst:.1%}"))
    mbps = lambda r: size / r.med("s") / 1e6  # noqa: E731  (size / median time: the median MB/s for an odd number of rounds)
    idle = res["appends idle"]
    rows = []
    q = mbps(res["snapshot write"]) / mbps(res["raw write + fsync"])
    rows.append(["write", f"{mbps(res['snapshot write']):,.0f} MB/s",
                 f"{mbps(res['raw write + fsync']):,.0f} MB/s (raw write + fsync)", f"{q:.2f}", target(q >= 0.7, ">= 0.70")])
    for label, cold in (("warm", False), ("cold", True)):  # the read target was set on the cold read
        raw = res[f"raw read {label}"]
        for name, key in (("read (CRC32 per chunk + sha256)", f"snapshot read {label}"),
                          ("read, CRC32 only", f"snapshot read CRC32 only {label}")):
            q = mbps(res[key]) / mbps(raw)
            rows.append([f"{name}, {label}", f"{mbps(res[key]):,.0f} MB/s", f"{mbps(raw):,.0f} MB/s (raw {label} read)",
                         f"{q:.2f}", target(q >= 0.7, ">= 0.70") if ("sha256" in name and cold) else ""])
    rss_w, rss_r, rss_raw = (max(RSS_SEEN.get(k, [float("nan")])) for k in ("snapshot write", "snapshot read",
                                                                             "raw write"))
    rows.append(["peak RSS growth, write / read (largest of all calls, warm-up included)",
                 f"{rss_w:.1f} / {rss_r:.1f} MiB", f"{rss_raw:.1f} MiB (raw write)", "",
                 target(max(rss_w, rss_r) <= 64, "<= 64 MiB")])
    busy = res["appends during snapshot"]
    pace = f"paced at {a.rate_mib:g} MiB/s" if a.rate_mib else "unpaced"
    q = busy.ratio("p99", idle)
    rows.append([f"append p99 while a snapshot is written ({pace})", f"{us(busy.med('p99'))} us",
                 f"{us(idle.med('p99'))} us idle", f"{q:.2f}", target(q <= 2, "<= 2.00")])
    if "appends during raft.db blobs" in res:
        same = res["appends during raft.db blobs"]
        rows.append(["the same with the blobs in `raft.db` (design not taken)", f"{us(same.med('p99'))} us",
                     f"{us(idle.med('p99'))} us idle", f"{same.ratio('p99', idle):.2f}", ""])
    rows.append(["snapshot write during appends", f"{busy.med('write_mbps'):,.0f} MB/s",
                 f"{mbps(res['snapshot write']):,.0f} MB/s (alone)",
                 f"{busy.med('write_mbps') / mbps(res['snapshot write']):.2f}", ""])
    t1 = md_table(["metric", "raft_sqlite", "same-run baseline", "ratio", "target"], rows)
    md = (f"{a.size_mib} MiB, {a.chunk_kib} KiB chunks, {a.commit_mib} MiB per chunks.db commit, FULL; "
          f"{a.rounds} interleaved rounds after one warm-up per row; median of the rounds ({elapsed:.0f} s); "
          f"warm = files read just before, cold = fsynced and dropped with POSIX_FADV_DONTNEED just before "
          f"(mincore: at most " + ("n/a" if worst is None else f"{worst:.1%}") + f" left cached); idle appends "
          f"{a.append_seconds:g} s per round\n\n{t1}\n")
    print("\n" + md)
    return md


if __name__ == "__main__":
    main()
