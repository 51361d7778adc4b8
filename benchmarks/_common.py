"""Shared helpers for the benchmark suite: timing loops, percentiles, table printing, baselines."""

from __future__ import annotations

import os
import statistics
import tempfile
import time


def pct(samples, p):
    """The p-th percentile (0-100) of ``samples`` (nearest rank)."""
    s = sorted(samples)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


def timed_loop(fn, seconds, min_iters=20):
    """Call ``fn()`` until ``seconds`` elapsed (at least ``min_iters`` times); returns per-call latencies."""
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(lat) < min_iters:
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    return lat


def fsync_loop_baseline(dirpath, seconds, block=4096):
    """The physical limit of a WAL commit: overwrite 4 KiB at the start of a pre-written file and
    fdatasync it, in a loop. Returns latencies."""
    path = os.path.join(dirpath, "fsync-baseline.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"\0" * (1 << 20))
        os.fsync(fd)
        buf = os.urandom(block)
        i = [0]

        def one():
            os.pwrite(fd, buf, (i[0] % 16) * block)
            i[0] += 1
            os.fdatasync(fd)

        return timed_loop(one, seconds)
    finally:
        os.close(fd)
        os.unlink(path)


def print_table(title, header, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print(f"\n## {title}\n")
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")


def us(x):
    return f"{x * 1e6:.0f}"


def workdir():
    return tempfile.mkdtemp(prefix="rsq-bench-", dir=os.environ.get("BENCH_DIR"))


__all__ = ["pct", "timed_loop", "fsync_loop_baseline", "print_table", "us", "workdir", "statistics"]
