"""Run every benchmark with the README's settings and print the README's figure tables (markdown).

    python benchmarks/run_all.py [--out FILE] [--readme README.md] [--only append,recovery,...] [--quick]

Every table of README's "Benchmarks and figures" section is produced by this script: each benchmark's
``main(argv)`` returns its tables, and this script puts them under headings that name the exact command
(script and arguments) that produced them. ``--out FILE`` also writes the markdown to FILE;
``--readme README.md`` replaces, in that file, the text between the markers
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` of each benchmark run (nothing else is touched; a
missing marker is an error, so a table cannot silently go stale). ``--quick`` runs every benchmark at
smoke-test size (figures meaningless, for checking the scripts only; refused together with --readme).

The header of the output names the date, the git commit, the load average before and after, and the
total runtime: figures measured on a busy machine are not publishable, and the load average says so.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _common import git_commit, loadavg  # noqa: E402

#: (name, module, heading, README arguments). The README arguments are the scripts' defaults spelled
#: out, so that the heading states them even if a default changes later.
BENCHMARKS = [
    ("append", "append", "Appends", ["--seconds", "1.5", "--warmup-seconds", "0.3", "--payload", "100", "--rounds", "3"]),
    ("recovery", "recovery", "Recovery and verify, warm and cold page cache",
     ["--sizes", "100000,1000000", "--payload", "100", "--rounds", "3"]),
    ("snapshot", "snapshot", "Snapshots, warm and cold page cache",
     ["--size-mib", "1024", "--chunk-kib", "1024", "--commit-mib", "8", "--append-seconds", "2", "--rounds", "3"]),
    ("snapshot_pacing", "snapshot", "Snapshot pacing against the appends' tail",
     ["--pacing", "0,150,100,50", "--size-mib", "256", "--chunk-kib", "1024", "--commit-mib", "8",
      "--append-seconds", "2", "--rounds", "3"]),
    ("backup", "backup", "Hot backup", ["--size-mb", "1024", "--payload", "4096", "--groups", "4", "--rounds", "3"]),
    ("remote_backup", "remote_backup", "Backups to object storage",
     ["--entries", "300000", "--groups", "4", "--snapshot-mib", "32", "--levels", "none,1,3,6,9",
      "--level-sample-mib", "16", "--rounds", "3"]),
    ("background", "background", "Background work against the log",
     ["--snapshot-mib", "512", "--backup-mb", "300", "--compact-segments", "32", "--compact-payload", "100",
      "--checkpoint-mib", "128", "--idle-seconds", "1", "--conc-seconds", "1.5", "--rounds", "3"]),
    ("groups", "groups", "Many groups per node",
     ["--groups", "1,100,1000,10000", "--entries", "200000", "--appends", "2000", "--writers", "8,1000",
      "--writer-seconds", "2", "--rounds", "3"]),
    ("aio", "aio", "asyncio facade",
     ["--seconds", "2", "--coroutines", "16,1000", "--payload", "100", "--lag-seconds", "1", "--snapshot-mib", "256",
      "--backup-mb", "200", "--rounds", "3"]),
    ("sqlstate", "sqlstate", "SQL state machine",
     ["--apply-entries", "200000", "--batch1-entries", "20000", "--batches", "1,64,1024", "--payload", "100",
      "--log-entries", "10000,1000000", "--resume-tail", "1000", "--state-mib", "1024", "--delta-pct", "1",
      "--append-seconds", "2", "--rounds", "3"]),
    ("pysyncobj_journal", "pysyncobj_journal", "PySyncObj journal",
     ["--seconds", "2", "--warmup-seconds", "0.3", "--payload", "100", "--rounds", "3"]),
    ("pysyncobj_cluster", "pysyncobj_cluster", "PySyncObj 3-node cluster",
     ["--commands", "20000", "--sync-calls", "30", "--warmup-commands", "2000", "--rounds", "3", "--timeout", "300"]),
]


class ReadmeMarkerError(ValueError):
    """A README lacks the ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->`` block to replace."""


def section(module, heading, argv, md):
    """One README block: a heading naming the command, then the benchmark's markdown."""
    cmd = " ".join([".venv/bin/python", f"benchmarks/{module}.py", *argv])
    return f"**{heading}.** Produced by `{cmd}` (via `benchmarks/run_all.py`): {md}"


def replace_blocks(text, blocks):
    """``text`` with the body of each ``<!-- bench:NAME -->`` block replaced by ``blocks[NAME]``."""
    for name, body in blocks.items():
        pat = re.compile(rf"(<!-- bench:{re.escape(name)} -->\n).*?(<!-- /bench:{re.escape(name)} -->)", re.S)
        if not pat.search(text):
            raise ReadmeMarkerError(f"no <!-- bench:{name} --> ... <!-- /bench:{name} --> block")
        text = pat.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text, count=1)
    return text


def blocks_of(out_text):
    """Split the markdown written by ``--out`` back into README blocks (header + one per benchmark), so a
    quiet run's output can be put into README later with ``--apply FILE`` without running it again."""
    head, _, rest = out_text.partition("\n")
    blocks, starts = {"header": head + "\n"}, []
    for name, module, heading, _args in BENCHMARKS:
        i = rest.find(f"**{heading}.** Produced by `.venv/bin/python benchmarks/{module}.py")
        if i >= 0:
            starts.append((i, name))
    starts.sort()
    for k, (i, name) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(rest)
        blocks[name] = rest[i:end].strip("\n") + "\n"
    return blocks


def main(argv=None):
    """Run the selected benchmarks; print (and optionally write) the README markdown; returns it."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the markdown to this file")
    ap.add_argument("--readme", help="replace the <!-- bench:NAME --> blocks of this README in place")
    ap.add_argument("--only", help="comma-separated subset of: " + ",".join(b[0] for b in BENCHMARKS))
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes (figures meaningless)")
    ap.add_argument("--apply", metavar="FILE", help="with --readme: put the tables of an earlier --out FILE "
                    "into the README instead of running the benchmarks")
    a = ap.parse_args(argv)
    if a.apply:
        if not a.readme:
            ap.error("--apply needs --readme")
        with open(a.apply) as f:
            blocks = blocks_of(f.read())
        if "QUICK" in blocks["header"]:
            ap.error("--quick figures are not README figures")
        with open(a.readme) as f:
            text = f.read()
        with open(a.readme, "w") as f:
            f.write(replace_blocks(text, blocks))
        return "".join(blocks.values())
    if a.quick and a.readme:
        ap.error("--quick figures are not README figures")
    only = set(a.only.split(",")) if a.only else None
    if only and only - {b[0] for b in BENCHMARKS}:
        ap.error(f"unknown benchmark(s): {sorted(only - {b[0] for b in BENCHMARKS})}")
    commit = git_commit(mark_dirty=False)
    load0, t0 = loadavg(), time.perf_counter()
    blocks, parts = {}, []
    for name, module, heading, args in BENCHMARKS:
        if only and name not in only:
            continue
        run_args = args + (["--quick"] if a.quick else [])
        print(f"\n==== {name}: {' '.join(run_args)}", flush=True)
        s0 = time.perf_counter()
        md = importlib.import_module(module).main(run_args)
        print(f"==== {name}: {time.perf_counter() - s0:.0f} s", flush=True)
        blocks[name] = section(module, heading, run_args, md)
        parts.append(blocks[name])
    total = time.perf_counter() - t0
    head = (f"Figures of {datetime.date.today().isoformat()}, commit {commit}, "
            f"{'QUICK (smoke sizes, not figures) ' if a.quick else ''}"
            f"produced by `.venv/bin/python benchmarks/run_all.py{' --only ' + a.only if a.only else ''}` in "
            f"{total / 60:.1f} min; "
            f"1-min load average {load0:.2f} before, {loadavg():.2f} after.\n")
    blocks["header"] = head
    out = head + "\n" + "\n\n".join(parts) + "\n"
    print("\n" + "=" * 100 + "\n" + out)
    if a.out:
        with open(a.out, "w") as f:
            f.write(out)
    if a.readme:
        with open(a.readme) as f:
            text = f.read()
        text = replace_blocks(text, blocks)
        with open(a.readme, "w") as f:
            f.write(text)
    return out


if __name__ == "__main__":
    main()
