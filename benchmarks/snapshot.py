"""Snapshot write/read bandwidth, memory, and append latency while a snapshot is written.

    python benchmarks/snapshot.py [--size-mib 1024] [--chunk-kib 1024] [--commit-mib 8] [--append-seconds 2]

Measured in the same run, on the same file system:

* raw baseline: the same bytes written sequentially to a plain file (1 chunk per ``write``) + one
  ``fsync``; then read back sequentially after dropping them from the page cache (``POSIX_FADV_DONTNEED``);
* raft_sqlite: ``store.snapshots(g).write(...)`` (FULL fsync, CRC32 per chunk, sha256, manifest
  finalize) and ``open(meta)`` read to the end (CRC32 per chunk + sha256 verified), page cache dropped
  for chunks.db first;
* peak RSS growth during each (``/proc/self/status`` VmHWM after resetting it through
  ``/proc/self/clear_refs``, minus VmRSS before);
* single-entry appends (FULL) of another group on the same store: p50/p99 idle vs while a snapshot of
  ``--size-mib`` is being written by another thread, and (the design not taken, justifying the separate
  ``chunks.db``) while the same blob batches are written into a scratch table of ``raft.db`` itself.

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

from _common import pct, print_table, us, workdir

from raft_sqlite import FsyncMode, LogEntry, NodeStore

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


class Peak:
    """Peak RSS growth over a block, in MiB."""

    def __enter__(self):
        self.ok = reset_peak()
        self.base = status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.growth = (status_kib("VmHWM") - self.base) / 1024 if self.ok else float("nan")


def drop_cache(*paths):
    for p in paths:
        if not os.path.exists(p):
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


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


def raw_write_read(d, size, chunk, bufs):
    path = os.path.join(d, "raw.bin")
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        f.writelines(chunks_of(size, chunk, bufs))
        os.fsync(f.fileno())
    w = time.perf_counter() - t0
    drop_cache(path)
    t0 = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            n += len(b)
    r = time.perf_counter() - t0
    assert n == size
    os.unlink(path)
    return w, r


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="snapshot size (default 1024 = 1 GiB)")
    ap.add_argument("--chunk-kib", type=int, default=1024, help="chunk size (default 1024)")
    ap.add_argument("--commit-mib", type=int, default=8, help="bytes per chunks.db transaction (default 8)")
    ap.add_argument("--append-seconds", type=float, default=2.0, help="idle append measurement (default 2 s)")
    ap.add_argument("--repeat", type=int, default=1, help="write/read rounds; the best of each is kept")
    ap.add_argument("--rate-mib", type=float, default=None,
                    help="max_write_rate (MiB/s) of the snapshot written during appends (default: unpaced)")
    ap.add_argument("--no-same-file", dest="same_file", action="store_false",
                    help="skip the comparison with the blobs written into raft.db itself")
    a = ap.parse_args(argv)
    size, chunk, commit = a.size_mib * MiB, a.chunk_kib << 10, a.commit_mib * MiB
    bufs = [os.urandom(chunk) for _ in range(4)]
    d = workdir()
    try:
        raw_w = raw_r = snap_w = snap_r = snap_rc = float("inf")
        rss_w = rss_r = 0.0
        for rnd in range(a.repeat):
            w, r = raw_write_read(d, size, chunk, bufs)
            raw_w, raw_r = min(raw_w, w), min(raw_r, r)
            path = os.path.join(d, f"store{rnd}")
            s = setup(path)
            with Peak() as pk:
                w, meta = snapshot_write(s, size, chunk, commit, bufs)
            snap_w, rss_w = min(snap_w, w), max(rss_w, pk.growth)
            s.close()
            drop_cache(os.path.join(path, "chunks.db"), os.path.join(path, "chunks.db-wal"))
            s = open_store(path)
            with Peak() as pk:
                r = snapshot_read(s, meta)
            snap_r, rss_r = min(snap_r, r), max(rss_r, pk.growth)
            s.close()
            drop_cache(os.path.join(path, "chunks.db"), os.path.join(path, "chunks.db-wal"))
            s = open_store(path)
            snap_rc = min(snap_rc, snapshot_read(s, meta, verify_digest=False))
            s.close()
            shutil.rmtree(path)

        # append latency: idle vs while a snapshot is written by another thread
        path = os.path.join(d, "store-lat")
        s = setup(path)
        appends(s, 0.2)  # warm up
        idle = appends(s, a.append_seconds)
        stop = threading.Event()
        box = {}

        def writer():
            try:
                box["t"], _ = snapshot_write(s, size, chunk, commit, bufs, a.rate_mib * MiB if a.rate_mib else None)
            finally:
                stop.set()

        t = threading.Thread(target=writer)
        t.start()
        busy = appends(s, 0, stop)
        t.join()
        same = []
        if a.same_file:
            stop = threading.Event()

            def writer2():
                try:
                    box["same"] = same_file_writer(s, size, chunk, commit, bufs)
                finally:
                    stop.set()

            t = threading.Thread(target=writer2)
            t.start()
            same = appends(s, 0, stop)
            t.join()
        s.close()
        shutil.rmtree(path)

        def mbps(t):
            return size / t / 1e6
        pace = f"paced at {a.rate_mib:g} MiB/s" if a.rate_mib else "unpaced"
        print(f"\nsnapshot {a.size_mib} MiB, chunks {a.chunk_kib} KiB, {a.commit_mib} MiB per chunks.db commit, "
              f"fsync FULL, {a.repeat} round(s), snapshot during appends {pace}")
        rows = [
            ["write MB/s", f"{mbps(snap_w):.0f}", f"{mbps(raw_w):.0f} (raw write+fsync)", f"{raw_w / snap_w:.2f}",
             ">= 0.70", "ok" if raw_w / snap_w >= 0.7 else "MISS"],
            ["read MB/s", f"{mbps(snap_r):.0f}", f"{mbps(raw_r):.0f} (raw cold read)", f"{raw_r / snap_r:.2f}",
             ">= 0.70", "ok" if raw_r / snap_r >= 0.7 else "MISS"],
            ["read MB/s, CRC32 only (no sha256)", f"{mbps(snap_rc):.0f}", f"{mbps(raw_r):.0f} (raw cold read)",
             f"{raw_r / snap_rc:.2f}", "-", ""],
            ["peak RSS growth, write (MiB)", f"{rss_w:.1f}", "-", "-", "<= 64", "ok" if rss_w <= 64 else "MISS"],
            ["peak RSS growth, read (MiB)", f"{rss_r:.1f}", "-", "-", "<= 64", "ok" if rss_r <= 64 else "MISS"],
            ["append p50 (us)", us(pct(busy, 50)), us(pct(idle, 50)) + " (idle)", f"{pct(busy, 50) / pct(idle, 50):.2f}",
             "-", ""],
            ["append p99 (us)", us(pct(busy, 99)), us(pct(idle, 99)) + " (idle)", f"{pct(busy, 99) / pct(idle, 99):.2f}",
             "<= 2.00", "ok" if pct(busy, 99) <= 2 * pct(idle, 99) else "MISS"],
            *([["append p99 (us), blobs in raft.db instead", us(pct(same, 99)), us(pct(idle, 99)) + " (idle)",
                 f"{pct(same, 99) / pct(idle, 99):.2f}", "-", "design not taken"]] if same else []),
            ["snapshot write during appends MB/s", f"{mbps(box['t']):.0f}", f"{mbps(snap_w):.0f} (alone)",
             f"{snap_w / box['t']:.2f}", "-", ""],
        ]
        print_table("Snapshots vs same-run baselines", ["metric", "raft_sqlite", "baseline", "ratio", "target", ""],
                    rows)
        print(f"\nappends: {len(idle)} idle ({a.append_seconds:g} s), {len(busy)} during the snapshot "
              f"({box['t']:.2f} s)" + (f", {len(same)} during the raft.db blob writes ({box['same']:.2f} s, max "
                                       f"{us(max(same))} us)" if same else ""))
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
