#!/usr/bin/env python
"""Run PySyncObj's own test suite against raft_sqlite's journal adapter, reproducibly.

    python tests/external/run_pysyncobj_suite.py PATH/TO/test_syncobj.py [--fsync FULL|NORMAL|OFF]
        [--journals all|file] [--allow-skip] [--no-patch] [--keep] [--timeout SECONDS] [--work-dir DIR]
        [-- PYTEST ARGS]

``test_syncobj.py`` is the test file of PySyncObj's public repository (github.com/bakwc/PySyncObj;
its published source distribution does not ship it, and this repository never includes it). The
runner copies it into a scratch directory together with ``pysyncobj_conftest.py`` (as
``conftest.py``), which patches raft_sqlite's journal into PySyncObj before the test module is
imported, runs pytest there with this checkout's ``raft_sqlite`` first on ``PYTHONPATH``, and prints
one line per test (outcome, seconds, raft_sqlite journals the test opened, skip reason), the fsync
mode, the PySyncObj version and where it was imported from, and the sha256 of the test file.

``--journals all`` (default) puts every SyncObj of the suite on raft_sqlite (see the conftest for
why and how); ``file`` only the journals PySyncObj would write to a file, as ``patch_pysyncobj()``
does in production. ``--no-patch`` is a control run on stock PySyncObj (the journal checks are off
and the verdict says CONTROL).

Exit status: 0 only if every collected test passed (a skip is a failure unless ``--allow-skip``),
pytest itself exited 0, at least one raft_sqlite journal was opened, every one of them used the
requested fsync mode, and no stock PySyncObj journal was constructed where the mode puts
raft_sqlite (``all``: none at all; ``file``: no ``FileJournal``). 1 when a test or a check failed,
2 when the run itself could not be made (file missing, pytest crashed before reporting, timeout).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CONFTEST = os.path.join(HERE, "pysyncobj_conftest.py")

EXIT_OK, EXIT_FAILED, EXIT_HARNESS = 0, 1, 2


class HarnessError(Exception):
    """The suite could not be run or did not report (not a test verdict)."""


def sha256_of(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def evaluate(report: dict, *, patched: bool, journals: str, fsync: str, allow_skip: bool,
             pytest_status: int | None) -> list[str]:
    """Problems that make the run fail (empty list: it passes). ``report`` is the conftest's JSON."""
    problems = []
    collected = report.get("collected")
    tests = report.get("tests", {})
    if not collected:
        problems.append("no test was collected")
        collected = []
    for nodeid in collected:
        rec = tests.get(nodeid, {})
        outcome = rec.get("outcome")
        if outcome is None:
            problems.append(f"{nodeid}: no result (the run stopped before it finished)")
        elif outcome == "failed":
            problems.append(f"{nodeid}: failed in {rec.get('failed_in')}")
        elif outcome == "skipped" and not allow_skip:
            problems.append(f"{nodeid}: skipped ({rec.get('reason')}); use --allow-skip to accept skips")
    if pytest_status not in (0, None) and not problems:
        problems.append(f"pytest exited with status {pytest_status}")
    if patched:
        if report.get("patched") is not True:
            problems.append("the conftest did not patch PySyncObj")
        if report.get("raft_sqlite_journals", 0) == 0:
            problems.append("no raft_sqlite journal was opened: the patch was not exercised")
        if report.get("fsync") != fsync:
            problems.append(f"the conftest ran with fsync {report.get('fsync')!r}, not {fsync!r}")
        for w in report.get("wrong_fsync", []):
            problems.append(f"journal opened with another fsync mode than {fsync}: {w}")
        if report.get("stock_file_journals", 0):
            problems.append(f"{report['stock_file_journals']} stock PySyncObj FileJournal(s) were constructed: "
                            "a journal bypassed the patch")
        if journals == "all" and report.get("stock_memory_journals", 0):
            problems.append(f"{report['stock_memory_journals']} stock MemoryJournal(s) were constructed with "
                            "--journals all")
    return problems


def format_summary(report: dict, problems: list[str], *, test_file: str, digest: str, patched: bool,
                   journals: str, fsync: str, seconds: float, pytest_args: list[str] | None = None) -> str:
    """The human-readable summary the runner prints."""
    lines = ["PySyncObj's test suite on raft_sqlite" + ("" if patched else " -- CONTROL RUN, stock PySyncObj"),
             f"  test file : {test_file}",
             f"  sha256    : {digest}",
             f"  pysyncobj : {report.get('pysyncobj_version')} ({report.get('pysyncobj_file')})",
             f"  raft_sqlite: {report.get('raft_sqlite_file', '(not imported: control run)')}",
             f"  fsync     : {fsync if patched else 'n/a'}    journals: {journals if patched else 'stock'}"]
    if pytest_args:
        lines.append(f"  SUBSET: extra pytest arguments {' '.join(pytest_args)}")
    counts = {"passed": 0, "failed": 0, "skipped": 0, "no result": 0}
    tests = report.get("tests", {})
    for nodeid in report.get("collected") or []:
        rec = tests.get(nodeid, {})
        outcome = rec.get("outcome") or "no result"
        counts[outcome] = counts.get(outcome, 0) + 1
        extra = ""
        if outcome == "skipped":
            extra = f"  reason: {rec.get('reason')}"
        elif outcome == "failed":
            extra = f"  ({rec.get('failed_in')}: {' '.join(rec.get('error') or [])[:160]})"
        name = nodeid.split("::", 1)[-1]
        lines.append(f"  {name:<40} {outcome.upper():<9} {rec.get('duration', 0.0):7.1f} s  "
                     f"rsql journals {rec.get('raft_sqlite_journals', 0):>3}{extra}")
    n = len(report.get("collected") or [])
    lines.append(f"  {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped, "
                 f"{counts['no result']} without result, of {n} collected, in {seconds:.1f} s")
    lines.append(f"  journals: raft_sqlite {report.get('raft_sqlite_journals', 0)}, stock FileJournal "
                 f"{report.get('stock_file_journals', 0)}, stock MemoryJournal "
                 f"{report.get('stock_memory_journals', 0)}; data_dirs given to SyncObjs without journalFile: "
                 f"{report.get('forced_dirs', 0)}")
    if report.get("has_crypto") is False:
        lines.append("  NOTE: the `cryptography` module is not importable; PySyncObj's encryption tests, "
                     "test_syncobjAdminStatus and test_readOnlyNodes need it (pip install cryptography)")
    for p in problems:
        lines.append(f"  PROBLEM: {p}")
    verdict = "PASS" if not problems else "FAIL"
    lines.append(f"VERDICT: {verdict}" + ("" if patched else " (control run: the journal was not patched)"))
    return "\n".join(lines)


def run_suite(test_file: str, *, fsync: str = "FULL", journals: str = "all", allow_skip: bool = False,
              patch: bool = True, keep: bool = False, timeout: float = 3600.0,
              pytest_args: list[str] | None = None, work_dir: str | None = None, out=sys.stdout) -> int:
    """Run ``test_file`` under the conftest; print the summary to ``out``; return the exit status."""
    if not os.path.isfile(test_file):
        print(f"error: {test_file} is not a file", file=out)
        return EXIT_HARNESS
    digest = sha256_of(test_file)
    if work_dir is not None:
        os.makedirs(work_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="pysyncobj-suite-", dir=work_dir)
    report_path = os.path.join(work, "rsql-report.json")
    log_path = os.path.join(work, "pytest.log")
    shutil.copyfile(test_file, os.path.join(work, "test_syncobj.py"))
    shutil.copyfile(CONFTEST, os.path.join(work, "conftest.py"))
    with open(os.path.join(work, "pytest.ini"), "w") as f:
        f.write("[pytest]\n")  # this dir is the rootdir: no ini file of an enclosing project applies
    env = dict(os.environ, RAFT_SQLITE_FSYNC=fsync, RSQL_PSO_JOURNALS=journals, RSQL_PSO_REPORT=report_path,
               RSQL_PSO_PATCH="1" if patch else "0")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")  # this checkout's raft_sqlite first
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs", "--tb=short",
           "test_syncobj.py", *(pytest_args or [])]
    print(f"running in {work}: {' '.join(cmd)} (fsync {fsync if patch else 'n/a'}, journals {journals if patch else 'stock'}); "
          f"pytest output -> {log_path}", file=out, flush=True)
    t0 = time.monotonic()
    status = None
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the suite's own process group (start_new_session)
            proc.wait()
            print(f"error: the suite did not finish within {timeout:.0f} s (killed)", file=out)
    seconds = time.monotonic() - t0
    try:
        with open(report_path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        print(f"error: no report from the conftest ({e}); pytest exit status {status}; see {log_path}", file=out)
        _tail(log_path, out)
        return EXIT_HARNESS
    problems = evaluate(report, patched=patch, journals=journals, fsync=fsync, allow_skip=allow_skip,
                        pytest_status=status)
    if status is None:
        problems.append("timed out")
    print(format_summary(report, problems, test_file=os.path.abspath(test_file), digest=digest, patched=patch,
                         journals=journals, fsync=fsync, seconds=seconds, pytest_args=pytest_args), file=out, flush=True)
    if problems or keep:
        if problems:
            _tail(log_path, out)
        print(f"scratch directory kept: {work}", file=out)
    else:
        shutil.rmtree(work, ignore_errors=True)
    if status is None:
        return EXIT_HARNESS
    return EXIT_FAILED if problems else EXIT_OK


def _tail(path: str, out, n: int = 40) -> None:
    try:
        with open(path, errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return
    short = [ln for ln in lines if ln.startswith(("FAILED", "ERROR", "SKIPPED", "=", "E "))][-n:]
    if short:
        print("  --- pytest (short) ---", file=out)
        for ln in short:
            print("  " + ln.rstrip()[:300], file=out)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; see the module docstring."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("test_file", help="PySyncObj's test_syncobj.py")
    ap.add_argument("--fsync", default="FULL", type=str.upper, choices=["FULL", "NORMAL", "OFF", "EXTRA"])
    ap.add_argument("--journals", default="all", choices=["all", "file"])
    ap.add_argument("--allow-skip", action="store_true", help="skipped tests do not fail the run")
    ap.add_argument("--no-patch", action="store_true", help="control run on stock PySyncObj")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole suite")
    ap.add_argument("--work-dir", default=None, help="where the scratch directory is made (default: the temp dir)")
    a = ap.parse_args(argv)
    return run_suite(a.test_file, fsync=a.fsync, journals=a.journals, allow_skip=a.allow_skip,
                     patch=not a.no_patch, keep=a.keep, timeout=a.timeout, pytest_args=extra,
                     work_dir=a.work_dir)


if __name__ == "__main__":
    sys.exit(main())
