"""Regenerate the README's benchmark plots (PNG) from the benchmarks' ``--json`` output.

    python benchmarks/plots.py [--from-json DIR] [--out docs/plots] [--only append,recovery,background] [--quick]

Without ``--from-json``, runs the three benchmarks below in this process, each with ``--json`` into
``--out`` (about 5-8 min in all on the README's 2-core VM; the arguments are ``RUNS`` below and are
printed), then draws the plots from those files. With ``--from-json DIR``, runs nothing: reads
``DIR/append.json``, ``DIR/recovery.json`` and ``DIR/background.json`` (those named by ``--only``), copies
them into ``--out`` if it is another folder, and draws the plots. So the PNGs of ``docs/plots`` can be
redrawn from the json committed beside them without measuring again:

    python benchmarks/plots.py --from-json docs/plots

Plots (matplotlib, Agg backend; ``pip install 'raft_sqlite[bench]'``):

* ``append_latency_cdf.png``: CDF (log x) of single-entry append latency, raft_sqlite FULL against the
  raw 4 KiB overwrite + fdatasync baseline and bare apsw (WAL, synchronous=FULL), same run; each curve
  is, per quantile level, the median over the rounds (``append.py --json``'s ``q``);
* ``append_throughput.png``: entries/s against entries per append call (log-log), every fsync mode and
  bare apsw;
* ``background_p99.png``: p99 of single-entry FULL appends during each background work against idle
  (bars, log y), with the raw fdatasync probe's p99 during the same work beside them;
* ``recovery_time.png``: open + validate + replay time against entries past the snapshot (log-log),
  warm and cold page cache, with the raw read of the same files as the baseline.

Every plot's caption names the date, the commit and the command of the measurement and the machine
caveat (a shared, noisy VM: read the curves of one plot against each other, not as absolute figures).
``--quick`` runs the benchmarks at smoke sizes (figures meaningless; refused for ``docs/plots``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

#: (name, README-size arguments). Modest sizes for a run of a few minutes; ``--json FILE`` is added.
RUNS = [
    ("append", ["--seconds", "1", "--warmup-seconds", "0.2", "--payload", "100", "--rounds", "3",
                "--batch-sizes", "1,4,16,64,256,1024"]),
    ("recovery", ["--sizes", "10000,30000,100000,300000,1000000", "--payload", "100", "--rounds", "3"]),
    ("background", ["--snapshot-mib", "128", "--backup-mb", "100", "--compact-segments", "8",
                    "--compact-payload", "100", "--checkpoint-mib", "32", "--idle-seconds", "1",
                    "--conc-seconds", "1", "--rounds", "3"]),
]
NAMES = [n for n, _ in RUNS]
PLOTS = {"append": ["append_latency_cdf.png", "append_throughput.png"], "recovery": ["recovery_time.png"],
         "background": ["background_p99.png"]}
DEFAULT_OUT = os.path.join(ROOT, "docs", "plots")
CAVEAT = ("{cpus}-core VM shared with other work (1-min load {lb:.2f} before, {la:.2f} after): noisy; "
          "compare the curves of one plot (same run), not absolute figures")
MODE_STYLE = {"OFF": ("tab:gray", ":"), "NORMAL": ("tab:blue", "--"), "FULL": ("tab:red", "-"),
              "EXTRA": ("tab:purple", "-.")}


# ---------------------------------------------------------------------------------------- helpers
def caption(doc):
    """The caption line of a plot: date, commit and command of the measurement, and the machine caveat."""
    m = doc.get("meta", {})
    argv = list(m.get("argv", []))
    if "--json" in argv:  # where the json went is no part of the measurement
        i = argv.index("--json")
        del argv[i:i + 2]
    cmd = " ".join(["python", m.get("script", "?"), *argv])
    lb, la = m.get("load_before"), m.get("load_after")
    cav = CAVEAT.format(cpus=m.get("cpus", "?"), lb=lb if lb is not None else float("nan"),
                        la=la if la is not None else float("nan"))
    q = "QUICK (smoke sizes, figures meaningless); " if "--quick" in m.get("argv", []) else ""
    return f"{q}measured {m.get('date', '?')}, commit {m.get('commit', '?')}: {cmd}\n{cav}"


def finish(fig, ax, title, doc, path):
    """Title, caption, grid (of ``ax``, one axes or a list); save ``path`` (PNG) and close."""
    axes = ax if isinstance(ax, list) else [ax]
    if len(axes) == 1:
        axes[0].set_title(title, fontsize=11)
    else:
        fig.suptitle(title, fontsize=11)
    for x in axes:
        x.grid(True, which="major", alpha=0.4)
        x.grid(True, which="minor", alpha=0.15)
    fig.text(0.01, 0.01, caption(doc), fontsize=7, color="0.3", ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def row_named(doc, **want):
    """The (name, row) of ``doc["rows"]`` whose ``row_info`` matches every ``want`` (None if none)."""
    for name, info in doc.get("row_info", {}).items():
        if all(info.get(k) == v for k, v in want.items()) and name in doc["rows"]:
            return name, doc["rows"][name]
    return None


def plain_log(axis):
    """Label a log axis with plain numbers at 1, 2 and 5 of each decade (no 2x10^2 labels colliding)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.6g}"))
    axis.set_minor_formatter(NullFormatter())


def fmt_us(s):
    return f"{s * 1e6:,.0f} us" if s < 0.01 else f"{s * 1e3:,.1f} ms"


# ---------------------------------------------------------------------------------------- plots
def plot_append_cdf(plt, doc, out):
    levels = [p / 100 for p in doc["quantile_levels"]]
    fig, (ax, tail) = plt.subplots(1, 2, figsize=(11, 5), width_ratios=(3, 2))
    series = [("raw 4 KiB overwrite + fdatasync (physical limit)", {"kind": "fsync"}, "black", "--"),
              ("bare apsw executemany, 1 row/txn (WAL, FULL)", {"kind": "apsw", "batch": 1}, "tab:green", "-."),
              ("raft_sqlite FULL, 1 entry/append", {"kind": "store", "mode": "FULL", "batch": 1}, "tab:red", "-")]
    drawn = 0
    for label, want, color, ls in series:
        hit = row_named(doc, **want)
        if hit is None or "q" not in hit[1]["median"]:
            continue
        med = hit[1]["median"]
        xs = [v * 1e6 for v in med["q"]]
        ax.step(xs, levels, where="post", color=color, linestyle=ls, linewidth=1.6,
                label=f"{label}: p50 {fmt_us(med['p50'])}, p99 {fmt_us(med['p99'])}")
        # the tail: the fraction of appends slower than x (log y), down to the last level below 100%
        keep = [(x, 1 - p) for x, p in zip(xs, levels) if p >= 0.5 and p < 1]
        tail.step([x for x, _ in keep], [y for _, y in keep], where="post", color=color, linestyle=ls,
                  linewidth=1.6)
        drawn += 1
    if not drawn:
        raise ValueError("append.json has none of the CDF rows")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("latency of one durable append (us, log scale)")
    ax.set_ylabel("fraction of appends at or below (CDF)")
    ax.legend(loc="lower right", fontsize=7)
    tail.set_xscale("log")
    tail.set_yscale("log")
    plain_log(ax.xaxis)
    plain_log(tail.xaxis)
    tail.set_title("tail: fraction slower (p50 .. p99.9)", fontsize=9)
    tail.set_xlabel("latency (us, log scale)")
    tail.set_ylabel("fraction of appends slower (1 - CDF, log scale)")
    a = doc.get("args", {})
    return finish(fig, [ax, tail], f"Single-entry append latency CDF, {a.get('payload', '?')}-byte entries "
                  f"(median per quantile over {a.get('rounds', '?')} rounds)", doc,
                  os.path.join(out, "append_latency_cdf.png"))


def plot_append_throughput(plt, doc, out):
    fig, ax = plt.subplots(figsize=(8, 5))
    batches = doc["batch_sizes"]
    lines = [("bare apsw executemany (WAL, FULL)", {"kind": "apsw"}, ("tab:green", "-"), "s")]
    lines += [(f"raft_sqlite {m}", {"kind": "store", "mode": m}, MODE_STYLE.get(m, ("k", "-")), "o")
              for m in doc["modes"]]
    for label, want, (color, ls), marker in lines:
        xs, ys = [], []
        for b in batches:
            hit = row_named(doc, batch=b, **want)
            if hit is not None:
                xs.append(b)
                ys.append(hit[1]["median"]["rate"])
        if xs:
            ax.plot(xs, ys, marker=marker, color=color, linestyle=ls, label=label)
    phys = row_named(doc, kind="fsync")
    if phys is not None:
        ax.axhline(phys[1]["median"]["rate"], color="black", linestyle="--", linewidth=0.9,
                   label="raw 4 KiB overwrite + fdatasync: calls/s (one fsync per entry)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel("entries per append call (one transaction, one WAL commit)")
    ax.set_ylabel("entries/s (median of the rounds, log scale)")
    ax.legend(fontsize=8, loc="upper left")
    a = doc.get("args", {})
    return finish(fig, ax, f"Append throughput vs batch size, {a.get('payload', '?')}-byte entries", doc,
                  os.path.join(out, "append_throughput.png"))


def plot_background(plt, doc, out):
    kinds = [k for k in doc.get("kinds", ["idle", "snapshot", "backup", "prune", "compaction", "checkpoint"])
             if k in doc["summary"]]
    summ = doc["summary"]
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = range(len(kinds))
    w = 0.38
    app = [summ[k]["p99"] * 1e6 for k in kinds]
    raw = [summ[k]["raw_p99"] * 1e6 for k in kinds]
    from matplotlib.patches import Patch
    bars = ax.bar([x - w / 2 for x in xs], app, w, color=["tab:gray" if k == "idle" else "tab:red" for k in kinds])
    ax.bar([x + w / 2 for x in xs], raw, w, color="tab:blue", alpha=0.55)
    for bar, k in zip(bars, kinds):
        q = summ[k]["p99_vs_idle"]
        ax.annotate(f"{fmt_us(summ[k]['p99'])}\n{q:.1f}x idle" if k != "idle" else f"{fmt_us(summ[k]['p99'])}\nidle",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    idle = summ["idle"]["p99"] * 1e6
    target = ax.axhline(2 * idle, color="tab:orange", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(kinds)
    ax.set_ylabel("p99 latency during the work (us, log scale)")
    ax.set_xlabel("background work on another thread of the same process")
    top = max(app + raw + [2 * idle])
    ax.set_ylim(min(app + raw) / 2, top * 15)  # room above the bars for the legend
    plain_log(ax.yaxis)
    ax.legend([Patch(color="tab:gray"), Patch(color="tab:red"), Patch(color="tab:blue", alpha=0.55), target],
              ["raft_sqlite FULL single-entry appends, idle: p99", "the same appends during the work: p99",
               "raw 4 KiB overwrite + fdatasync during the same work (a row of its own): p99",
               "target: appends' p99 <= 2x idle"], fontsize=8, loc="upper left")
    return finish(fig, ax, "Append p99 during background work vs idle (median of the rounds)", doc,
                  os.path.join(out, "background_p99.png"))


def plot_recovery(plt, doc, out):
    sizes = doc["sizes"]
    fig, ax = plt.subplots(figsize=(8, 5))
    series = [("open + validate + replay, cold cache", "open+replay", "cold", "total", "tab:red", "-", "o"),
              ("open + validate + replay, warm cache", "open+replay", "warm", "total", "tab:orange", "-", "o"),
              ("raw read of the same files, cold", "raw read", "cold", "s", "black", "--", "s"),
              ("raw read of the same files, warm", "raw read", "warm", "s", "0.5", ":", "s")]
    for label, what, cache, key, color, ls, mk in series:
        xs, ys = [], []
        for n in sizes:
            hit = row_named(doc, size=n, what=what, cache=cache)
            if hit is not None and hit[1]["median"].get(key) is not None:
                xs.append(n)
                ys.append(hit[1]["median"][key])
        if xs:
            ax.plot(xs, ys, marker=mk, color=color, linestyle=ls, label=label)
    if 1_000_000 in sizes:
        ax.axhline(2.0, color="tab:green", linestyle="-.", linewidth=0.9, label="target: 1M entries <= 2 s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log(ax.yaxis)
    ax.set_xlabel("entries past the snapshot (log scale)")
    ax.set_ylabel("seconds (median of the rounds, log scale)")
    ax.legend(fontsize=8, loc="upper left")
    return finish(fig, ax, f"Recovery time vs log size, {doc.get('payload', '?')}-byte entries "
                  f"(NodeStore.open + replay)", doc, os.path.join(out, "recovery_time.png"))


DRAW = {"append": [plot_append_cdf, plot_append_throughput], "recovery": [plot_recovery],
        "background": [plot_background]}


def draw(docs, out):
    """Draw every plot of the loaded ``docs`` ({name: json doc}) into ``out``; returns the PNG paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for name, doc in docs.items():
        for fn in DRAW[name]:
            paths.append(fn(plt, doc, out))
    return paths


# ---------------------------------------------------------------------------------------- main
def main(argv=None):
    """Run (or read) the benchmarks' json, draw the PNGs; returns their paths."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-json", metavar="DIR", help="read DIR/{append,recovery,background}.json; run nothing")
    ap.add_argument("--out", default=DEFAULT_OUT, help="folder of the PNGs and the json (default: docs/plots)")
    ap.add_argument("--only", help="comma-separated subset of: " + ",".join(NAMES))
    ap.add_argument("--quick", action="store_true", help="run the benchmarks at smoke sizes (figures meaningless)")
    a = ap.parse_args(argv)
    only = a.only.split(",") if a.only else NAMES
    if set(only) - set(NAMES):
        ap.error(f"unknown benchmark(s): {sorted(set(only) - set(NAMES))}")
    if a.quick and not a.from_json and os.path.abspath(a.out) == os.path.abspath(DEFAULT_OUT):
        ap.error("--quick figures are not the README's plots: give another --out")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        ap.error("matplotlib is missing: pip install 'raft_sqlite[bench]' (or matplotlib>=3.7)")
    os.makedirs(a.out, exist_ok=True)
    docs = {}
    for name, args in RUNS:
        if name not in only:
            continue
        dst = os.path.join(a.out, f"{name}.json")
        if a.from_json:
            src = os.path.join(a.from_json, f"{name}.json")
            if not os.path.exists(src):
                ap.error(f"{src} is missing (use --only to draw the others)")
            if os.path.abspath(src) != os.path.abspath(dst):
                shutil.copyfile(src, dst)
        else:
            run_args = args + ["--json", dst] + (["--quick"] if a.quick else [])
            print(f"\n==== {name}: python benchmarks/{name}.py {' '.join(run_args)}", flush=True)
            t0 = time.perf_counter()
            importlib.import_module(name).main(run_args)
            print(f"==== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        with open(dst) as f:
            docs[name] = json.load(f)
    paths = draw(docs, a.out)
    for p in paths:
        print(f"wrote {os.path.relpath(p)} ({os.path.getsize(p):,} bytes)")
    return paths


if __name__ == "__main__":
    main()
