"""conftest.py for running PySyncObj's own test suite (``test_syncobj.py``) on raft_sqlite.

``run_pysyncobj_suite.py`` copies this file as ``conftest.py`` next to a copy of ``test_syncobj.py``
in a scratch directory and runs pytest there. pytest imports a conftest before the test module, so
the patch below is in place before ``test_syncobj.py`` runs ``from pysyncobj import createJournal``.

Environment (set by the runner):

- ``RAFT_SQLITE_FSYNC``: the store's fsync mode (read by ``create_journal``); every journal opened is
  checked to really use it.
- ``RSQL_PSO_JOURNALS``: ``all`` (default) or ``file``.
  ``file``: only journals PySyncObj would write to a file (``journalFile`` set, and direct
  ``createJournal(path)`` calls) go to raft_sqlite; a SyncObj without ``journalFile`` keeps
  PySyncObj's ``MemoryJournal``, as :func:`patch_pysyncobj` does in production.
  ``all``: every SyncObj is put on raft_sqlite too: a SyncObj without ``journalFile`` is given a
  data_dir of its own in ``SyncObjConf.validate``. Why: only 5 of PySyncObj's 42 tests set a
  ``journalFile``, so ``file`` exercises the adapter in few tests; ``all`` runs every cluster,
  compaction, snapshot-transfer, membership and restart test on the adapter. The data_dir is keyed
  by the test and the SyncObj's ``fullDumpFile``, so a SyncObj that a test restarts with the same
  dump file reopens the same store (as stock reloads the same dump), and one without a dump file
  gets a fresh store (as stock gets an empty memory journal).
- ``RSQL_PSO_PATCH``: ``0`` for a control run on stock PySyncObj (no patch, no journal checks).
- ``RSQL_PSO_REPORT``: path of the JSON report written after every test (outcome, skip reason,
  duration, raft_sqlite journals opened, stock file/memory journals created) for the runner to check.

Counting: every journal ``createJournal`` returns is counted (raft_sqlite or not), and so is every
stock ``FileJournal``/``MemoryJournal`` constructed by any path. A patched run in which no
raft_sqlite journal was opened, or in which a stock journal appeared where the mode says
raft_sqlite, fails in the runner: the run can never pass without the adapter having been used.
"""

from __future__ import annotations

import json
import os
import re
import threading

import pysyncobj
import pysyncobj.config as _pso_config
import pysyncobj.journal as _pso_journal
import pysyncobj.syncobj as _pso_syncobj
import pytest

PATCH = os.environ.get("RSQL_PSO_PATCH", "1") != "0"
JOURNALS = os.environ.get("RSQL_PSO_JOURNALS", "all")
REPORT = os.environ.get("RSQL_PSO_REPORT")
FSYNC = os.environ.get("RAFT_SQLITE_FSYNC", "FULL").upper()
if JOURNALS not in ("all", "file"):
    raise pytest.UsageError(f"RSQL_PSO_JOURNALS must be 'all' or 'file', not {JOURNALS!r}")

_lock = threading.Lock()
_state = {
    "patched": PATCH,
    "journals_mode": JOURNALS,
    "fsync": FSYNC,
    "pysyncobj_version": getattr(pysyncobj, "__version__", None),
    "pysyncobj_file": pysyncobj.__file__,
    "collected": None,
    "tests": {},
    "raft_sqlite_journals": 0,
    "stock_file_journals": 0,
    "stock_memory_journals": 0,
    "wrong_fsync": [],
    "forced_dirs": 0,
    "has_crypto": bool(getattr(pysyncobj, "HAS_CRYPTO", False)),  # 4 of PySyncObj's tests need `cryptography`
}
_current = {"test": None}


def _count(key: str) -> None:
    with _lock:
        _state[key] += 1
        t = _current["test"]
        if t is not None:
            rec = _state["tests"].setdefault(t, {})
            rec[key] = rec.get(key, 0) + 1


try:
    from pysyncobj.version import VERSION as _V

    _state["pysyncobj_version"] = _V
except ImportError:  # pragma: no cover (0.3.17 has it)
    pass

# --- stock journals: counted however they are constructed ---------------------------------------
for _cls, _key in ((_pso_journal.MemoryJournal, "stock_memory_journals"),
                   (_pso_journal.FileJournal, "stock_file_journals")):
    _orig_init = _cls.__init__

    def _counting_init(self, *a, _orig=_orig_init, _key=_key, **kw):
        _count(_key)
        return _orig(self, *a, **kw)

    _cls.__init__ = _counting_init

if PATCH:
    import raft_sqlite
    from raft_sqlite.integrations.pysyncobj import RaftSqliteJournal, create_journal, patch_pysyncobj

    _state["raft_sqlite_file"] = raft_sqlite.__file__
    patch_pysyncobj()  # stays for the whole session

    def _counting_create_journal(journal_file=None):
        """``createJournal`` as patched, counting what it returns and checking the fsync mode."""
        j = create_journal(journal_file)
        if isinstance(j, RaftSqliteJournal):
            _count("raft_sqlite_journals")
            mode = j.store.fsync.value
            if mode != FSYNC:
                with _lock:
                    _state["wrong_fsync"].append(f"{j.store.data_dir}: {mode}")
        return j

    for _mod in (_pso_syncobj, pysyncobj, _pso_journal):
        _mod.createJournal = _counting_create_journal

    if JOURNALS == "all":
        _patched_validate = _pso_config.SyncObjConf.validate
        _fresh = {"n": 0}

        def _forcing_validate(self):
            # validate() runs in SyncObj.__init__ before createJournal(conf.journalFile): give a SyncObj
            # without a journalFile a data_dir, keyed by test + fullDumpFile (restarts reopen it)
            if self.journalFile is None:
                test = re.sub(r"[^A-Za-z0-9_.-]+", "_", _current["test"] or "session")
                if self.fullDumpFile is not None:
                    key = "dump-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.abspath(self.fullDumpFile))[-80:]
                else:
                    with _lock:
                        _fresh["n"] += 1
                        key = f"mem-{_fresh['n']}"
                self.journalFile = os.path.join(os.getcwd(), "_rsql_forced", test, key)
                os.makedirs(self.journalFile, exist_ok=True)
                _count("forced_dirs")
            return _patched_validate(self)

        _pso_config.SyncObjConf.validate = _forcing_validate


def _write_report() -> None:
    if not REPORT:
        return
    with _lock:
        data = json.dumps(_state, indent=1, sort_keys=True)
    tmp = REPORT + ".tmp"
    with open(tmp, "w") as f:
        f.write(data)
    os.replace(tmp, REPORT)


def pytest_collection_finish(session):
    _state["collected"] = [it.nodeid for it in session.items]  # after -k/-m deselection
    _write_report()


def pytest_runtest_setup(item):
    _current["test"] = item.nodeid


def pytest_runtest_logreport(report):
    with _lock:
        rec = _state["tests"].setdefault(report.nodeid, {})
        rec["duration"] = round(rec.get("duration", 0.0) + report.duration, 3)
        if report.skipped:
            rec["outcome"] = "skipped"
            lr = report.longrepr
            reason = lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
            rec["reason"] = reason.removeprefix("Skipped: ")
        elif report.failed:
            rec["outcome"] = "failed"
            rec.setdefault("failed_in", report.when)
            rec["error"] = (report.longreprtext or "").strip().splitlines()[-1:] or [""]
        elif report.when == "call" and rec.get("outcome") != "failed":
            rec["outcome"] = "passed"
    _write_report()


def pytest_runtest_teardown(item):
    _current["test"] = None


def pytest_sessionfinish(session, exitstatus):
    _state["exitstatus"] = int(exitstatus)
    _write_report()
