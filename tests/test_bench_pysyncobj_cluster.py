"""benchmarks/pysyncobj_cluster.py: its sync counting sees a store's syncs and restores the default VFS, and
the checks that make a run fail (a store in the wrong fsync mode, a failed replicated call, a timeout) fire."""

from __future__ import annotations

import os
import sys
import types

import pytest

pytest.importorskip("pysyncobj")
import apsw  # noqa: E402

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import pysyncobj_cluster as bench  # noqa: E402
from _common import BenchmarkError  # noqa: E402

from raft_sqlite import FsyncMode, NodeStore  # noqa: E402
from raft_sqlite.integrations.pysyncobj import create_journal  # noqa: E402


def test_counting_sees_sqlite_and_fsio_syncs_then_restores_the_default_vfs(tmp_path):
    default = apsw.vfs_names()[0]
    counts = bench.SyncCounts()
    with bench.counting(counts):
        assert apsw.vfs_names()[0] == bench.COUNT_VFS
        with NodeStore.open(str(tmp_path / "n"), "n", cluster_id="c", fsync=FsyncMode.FULL) as s:
            x0, f0, _ = counts.snapshot()
            s.log("g").append_next(1, [b"x"])
            x1, _f1, by = counts.snapshot()
    assert x1 - x0 >= 1, "a FULL commit syncs the WAL through the (counting) default VFS"
    assert f0 >= 1, "a new store syncs its directories through fsio"
    assert any(k.startswith("xSync raft.db") for k in by)
    assert apsw.vfs_names()[0] == default and bench.COUNT_VFS not in apsw.vfs_names()


def test_a_store_in_another_fsync_mode_fails_the_run(monkeypatch):
    # a journal factory that ignores the row's mode: the run must notice instead of reporting NORMAL figures
    monkeypatch.setattr(bench, "create_journal", lambda jf, fsync: create_journal(jf, fsync="OFF"))
    with pytest.raises(BenchmarkError, match="the row wants NORMAL"):
        bench.run_cluster(FsyncMode.NORMAL, 20, 1, 60)


def test_a_failed_replicated_call_fails_the_run(monkeypatch):
    monkeypatch.setattr(bench, "FAIL_REASON", types.SimpleNamespace(SUCCESS=-1))  # every result now "fails"
    with pytest.raises(BenchmarkError, match="failed with FAIL_REASON 0"):
        bench.run_cluster("memory", 20, 1, 60)


def test_a_cluster_that_does_not_finish_in_time_raises():
    with pytest.raises(bench.ClusterTimeout, match="timed out"):
        bench.run_cluster("memory", 20, 1, 0.05)  # no leader is elected within 50 ms (election timeout >= 0.4 s)
