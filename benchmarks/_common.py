"""Shared helpers for the benchmark suite: the round runner every script uses, timing loops, percentiles,
page-cache control (warm/cold), table printing, baselines.

The round runner (:func:`run_rounds`) is the one place where the fairness rules live, so that no row,
baseline or not, is treated differently from another:

* every row gets one untimed warm-up call (the same warm-up rule for every row of a script);
* then ``rounds`` rounds, interleaved: round 1 of every row, then round 2 of every row, ...; the order of
  the rows rotates by one per round, so no row always runs first (cold disk, fresh CPU quota) or last;
* every figure of a row is the **median over the rounds** of that figure (one selection rule for every
  row and every figure; best-of would favour whichever row happened to get a quiet moment);
* every ratio is computed from those medians of the same run (:meth:`Result.ratio`);
* the per-round values are printed (:func:`print_rounds`), so the noise behind each median is visible.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import json
import math
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class BenchmarkError(RuntimeError):
    """A benchmark could not measure what it claims to (e.g. a cold-cache drop that left pages cached)."""


def fsync_path(path):
    """fsync the file ``path`` (the baselines' "+ fsync": what makes a copy durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pct(samples, p):
    """The p-th percentile (0-100) of ``samples`` (nearest rank)."""
    s = sorted(samples)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


#: The percentile levels kept of a latency sample for a CDF (``--json`` of append.py): every 1% to 90, every
#: 0.5% to 99, then the tail (99.5, 99.9, 100): 112 numbers per row and round instead of every sample.
QUANTILE_LEVELS = [float(p) for p in range(0, 90)] + [90 + k / 2 for k in range(19)] + [99.5, 99.9, 100.0]


def quantiles(samples, levels=QUANTILE_LEVELS):
    """``[pct(samples, p) for p in levels]``: a compact latency distribution (enough to draw a CDF)."""
    return [pct(samples, p) for p in levels]


def timed_loop(fn, seconds, min_iters=20):
    """Call ``fn()`` until ``seconds`` elapsed (at least ``min_iters`` times); returns per-call latencies."""
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(lat) < min_iters:
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    return lat


def latency_figures(lat, per_call=1):
    """The figures of a latency sample: ``rate`` (items/s, ``per_call`` items per call), ``p50``, ``p99``
    (seconds) and ``n`` (calls)."""
    return {"rate": per_call * len(lat) / sum(lat), "p50": pct(lat, 50), "p99": pct(lat, 99), "n": len(lat)}


def fsync_loop_baseline(dirpath, seconds, block=4096):
    """The physical limit of a WAL commit: overwrite 4 KiB at the start of a pre-written file and
    fdatasync it, in a loop. Returns latencies. One untimed write+fdatasync precedes the loop, as every
    other row's loop is preceded by one untimed call."""
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

        one()
        return timed_loop(one, seconds)
    finally:
        os.close(fd)
        os.unlink(path)


# ---------------------------------------------------------------------------------------- round runner
@dataclass
class Row:
    """One row of a benchmark table. ``measure()`` performs one round and returns its figures (a dict of
    name -> number); ``warmup()`` (default: ``measure``) is the untimed warm-up call, whose figures are
    discarded. A script must give every row the same warm-up rule (e.g. all full calls, or all calls at
    the same reduced duration)."""

    name: str
    measure: Callable[[], dict]
    warmup: Callable[[], object] | None = None


@dataclass
class Result:
    """The per-round figures of one row; every figure reported is the median over the rounds."""

    name: str
    rounds: list = field(default_factory=list)

    def values(self, key):
        """The per-round values of figure ``key``, in round order."""
        return [r[key] for r in self.rounds]

    def med(self, key):
        """The median over the rounds of figure ``key`` (the one selection rule of the suite)."""
        return statistics.median(self.values(key))

    def ratio(self, key, other: Result, other_key=None):
        """median(self[key]) / median(other[other_key or key]): both from the same run, same statistic."""
        return self.med(key) / other.med(other_key or key)


def round_order(n, r):
    """The order of ``n`` rows in round ``r`` (0-based): rotated by ``r`` so each row takes each position."""
    return [(i + r) % n for i in range(n)]


def run_rounds(rows, rounds, *, log=print):
    """Run ``rows`` (a list of :class:`Row`): one untimed warm-up each, then ``rounds`` interleaved rounds
    with the order rotating per round. Returns ``{row.name: Result}`` in the rows' order."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate row names: {names}")
    for row in rows:
        (row.warmup or row.measure)()
    out = {row.name: Result(row.name) for row in rows}
    for r in range(rounds):
        t0 = time.perf_counter()
        for i in round_order(len(rows), r):
            out[rows[i].name].rounds.append(rows[i].measure())
        if log:
            log(f"round {r + 1}/{rounds} done in {time.perf_counter() - t0:.1f} s")
    return out


def spread(values, fmt):
    """``min / median / max`` of ``values`` formatted with ``fmt`` (a callable)."""
    return f"{fmt(min(values))} / {fmt(statistics.median(values))} / {fmt(max(values))}"


def print_rounds(results, figures, title="per-round values"):
    """Print every round's value of each (figure key, label, formatter) in ``figures`` for every result
    that has it, with min / median / max, so the noise behind each median is visible."""
    print(f"\n### {title} (rounds in run order of each row; min / median / max)\n")
    for res in results.values():
        for key, label, fmt in figures:
            if res.rounds and key in res.rounds[0]:
                vals = res.values(key)
                print(f"  {res.name:<55} {label:<12} [{', '.join(fmt(v) for v in vals)}]  {spread(vals, fmt)}")


def results_json(results):
    """``{row name: {"rounds": [...], "median": {...}}}`` of ``run_rounds``' results, for ``--json``: every
    round's figures as measured, and the median over the rounds of each numeric figure; a figure that is a
    list of numbers (e.g. :func:`quantiles`) gets the element-wise median over the rounds (the suite's one
    selection rule, applied per quantile level)."""
    out = {}
    for name, r in results.items():
        med = {}
        for k in r.rounds[0] if r.rounds else ():
            vals = [x.get(k) for x in r.rounds]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                med[k] = statistics.median(vals)
            elif all(isinstance(v, list) and len(v) == len(vals[0]) for v in vals):
                med[k] = [statistics.median(col) for col in zip(*vals)]
        out[name] = {"rounds": r.rounds, "median": med}
    return out


def git_commit(mark_dirty=True):
    """The short hash of the checkout's HEAD, with ``+dirty`` if tracked files differ and ``mark_dirty``
    ("unknown" without git)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
        dirty = mark_dirty and subprocess.run(["git", "-C", here, "diff", "--quiet", "HEAD", "--"],
                                              capture_output=True, check=False).returncode == 1
    except OSError:
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def loadavg():
    """The 1-minute load average (NaN where unavailable)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def run_start():
    """What a run records at its start, for :func:`run_meta`: date (UTC), commit of the code that measures
    (``+dirty`` if tracked files differ from it), 1-min load average."""
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
            "load_before": loadavg()}


def run_meta(script, argv, start):
    """What a ``--json`` file says about its run: script, arguments, then ``start`` (:func:`run_start`:
    date, commit, load before) and the load after and CPU count (the figures of a busy or small machine
    are labelled so)."""
    return {"script": script, "argv": list(sys.argv[1:] if argv is None else argv), **start,
            "load_after": loadavg(), "cpus": os.cpu_count()}


def write_json(path, doc):
    """Write ``doc`` to ``path`` as compact JSON: floats to 6 significant digits (far beyond what a timing
    resolves), NaN and infinities as null (strict JSON readers accept the file)."""
    def clean(x):
        if isinstance(x, float):
            return float(f"{x:.6g}") if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    with open(path, "w") as f:
        json.dump(clean(doc), f, separators=(",", ":"))
        f.write("\n")


# ---------------------------------------------------------------------------------------- page cache
_MINCORE = None


def _libc():
    global _MINCORE
    if _MINCORE is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_long]
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            _MINCORE = libc
        except (OSError, AttributeError):
            _MINCORE = False
    return _MINCORE


def resident_fraction(path):
    """The fraction (0..1) of ``path``'s pages that are in the page cache, by mincore(2) on a read-only
    shared mapping (mapping does not fault pages in). None where mincore is unavailable; 0.0 for an empty
    file."""
    libc = _libc()
    size = os.path.getsize(path)
    if not libc:
        return None
    if size == 0:
        return 0.0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            return sum(b & 1 for b in vec) / pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def data_files(data_dir):
    """The regular files of ``data_dir`` whose pages a read of the store may touch (the SQLite ``-shm``
    index is excluded: it is a shared memory map, always resident while a connection has it mapped)."""
    return [os.path.join(data_dir, f) for f in sorted(os.listdir(data_dir))
            if os.path.isfile(os.path.join(data_dir, f)) and not f.endswith("-shm")]


def drop_cache(paths, *, check=True, limit=0.05):
    """Make the next read of ``paths`` cold: fsync each file (POSIX_FADV_DONTNEED leaves dirty pages
    alone), then ``posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)``. With ``check``, mincore then confirms
    that at most ``limit`` of each file's pages stayed cached and :class:`BenchmarkError` is raised
    otherwise (a "cold" figure measured on a warm file would be a false label). Returns the largest
    resident fraction seen (None where mincore is unavailable)."""
    worst = None
    for p in paths:
        if not os.path.exists(p):
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        frac = resident_fraction(p) if check else None
        if frac is not None:
            worst = frac if worst is None else max(worst, frac)
            if frac > limit and os.path.getsize(p) > 64 * mmap.PAGESIZE:
                raise BenchmarkError(f"{p}: {frac:.0%} of its pages still cached after POSIX_FADV_DONTNEED")
    return worst


def warm_cache(paths):
    """Make the next read of ``paths`` warm: read every byte once (untimed). Returns the bytes read."""
    n = 0
    for p in paths:
        if os.path.exists(p):
            with open(p, "rb", buffering=0) as fh:
                while chunk := fh.read(1 << 20):
                    n += len(chunk)
    return n


def set_cache(paths, cold):
    """:func:`drop_cache` if ``cold`` else :func:`warm_cache`."""
    return drop_cache(paths) if cold else warm_cache(paths)


# ---------------------------------------------------------------------------------------- output
def md_table(header, rows):
    """A markdown table (the README's format) as a string."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(title, header, rows):
    """Print a padded markdown table under a ``## title`` heading."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print(f"\n## {title}\n")
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")


def us(x):
    """Seconds as whole microseconds with thousands separators."""
    return f"{x * 1e6:,.0f}"


def target(ok, text):
    """A target cell: ``text: met`` / ``text: missed``."""
    return f"{text}: {'met' if ok else 'missed'}"


def workdir():
    """A fresh scratch directory (under $BENCH_DIR if set)."""
    return tempfile.mkdtemp(prefix="rsq-bench-", dir=os.environ.get("BENCH_DIR"))


__all__ = ["QUANTILE_LEVELS", "BenchmarkError", "Result", "Row", "data_files", "drop_cache", "fsync_loop_baseline",
           "git_commit", "latency_figures", "loadavg", "md_table", "pct", "print_rounds", "print_table",
           "quantiles", "resident_fraction", "results_json", "round_order", "run_meta", "run_rounds", "run_start",
           "set_cache", "spread", "statistics", "target", "timed_loop", "us", "warm_cache", "workdir", "write_json"]
