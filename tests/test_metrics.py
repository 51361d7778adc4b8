"""Prometheus metrics (StoreMetrics, `raft-sqlite metrics`) and the library's logging."""

import json
import logging
import os
import subprocess
import sys
import time

import apsw
import pytest
from prometheus_client.parser import text_string_to_metric_families

from raft_sqlite import LogEntry, RecoveryPolicy, SegmentPolicy, StorageFault
from raft_sqlite.metrics import StoreMetrics, classify_problem
from tests.conftest import ROOT, open_store, run_py

ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def samples(text, node="n1"):
    """{(sample name, frozenset(labels)): value} of a text exposition. With ``node``, every sample must
    carry ``node_id=node`` (then left out of the key); ``node=None`` keeps every label."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = dict(s.labels)
            if node is not None:
                assert labels.pop("node_id", None) == node, s
            out[(s.name, frozenset(labels.items()))] = s.value
    return out


def val(s, name, **labels):
    return s[(name, frozenset(labels.items()))]


def workload(store, groups=("a", "b"), n=60):
    total = 0
    for g in groups:
        log = store.log(g)
        for i in range(1, n + 1, 3):  # batches of 3
            batch = [LogEntry(j, 1, b"p" * (j % 7 + 1)) for j in range(i, i + 3)]
            total += sum(len(e.data) for e in batch)
            log.append(batch)
        store.metadata(g).set_commit_index(n - 5)
    return total


def test_store_metrics_after_a_workload(tmp_path):
    d = tmp_path / "n"
    t0 = time.time()
    with open_store(d, segment_policy=SegmentPolicy(max_entries=20)) as s:
        seen = []
        s.on_commit = lambda sec, n: seen.append(n)  # an existing hook keeps working
        m = StoreMetrics(s)
        total = workload(s)
        with s.snapshots("a").write(30, 1) as w:
            w.write(b"x" * 5000)
        text = m.text()
        t1 = time.time()
        st = s.stats
        commits = st.commits
        before_close = list(seen)  # (the close commits once more: what it records for the next open)
    seen = before_close
    x = samples(text)
    assert val(x, "raft_sqlite_entries_appended_total") == 120
    assert val(x, "raft_sqlite_bytes_appended_total") == total
    # 60 entries per group in segments of 20: segments 1-20 and 21-40 sealed, 41-60 open (appends of 3)
    assert val(x, "raft_sqlite_segment_rotations_total") == 4
    assert val(x, "raft_sqlite_commit_seconds_count") == len(seen) == commits > 0
    assert val(x, "raft_sqlite_group_commit_batch_size_sum") == sum(seen)
    assert val(x, "raft_sqlite_commit_seconds_bucket", le="+Inf") == commits
    for g in ("a", "b"):
        assert val(x, "raft_sqlite_log_entries", group=g) == 60
        assert val(x, "raft_sqlite_log_last_index", group=g) == 60
        assert val(x, "raft_sqlite_commit_index", group=g) == 55
        assert val(x, "raft_sqlite_segments", group=g) == 3
        assert t0 <= val(x, "raft_sqlite_oldest_segment_timestamp_seconds", group=g) <= t1
    assert val(x, "raft_sqlite_log_stored_bytes", group="a") + val(x, "raft_sqlite_log_stored_bytes", group="b") == total
    assert val(x, "raft_sqlite_snapshot_index", group="a") == 30
    assert val(x, "raft_sqlite_snapshot_bytes", group="a") == 5000
    assert val(x, "raft_sqlite_snapshot_duration_seconds", group="a") >= 0
    assert t0 <= val(x, "raft_sqlite_snapshot_timestamp_seconds", group="a") <= t1
    assert not any("age_seconds" in k[0] for k in x)  # ages freeze in a textfile: timestamps only
    assert ("raft_sqlite_snapshot_bytes", frozenset({("group", "b")})) not in x
    assert val(x, "raft_sqlite_recovery_outcome", outcome="created") == 1
    assert val(x, "raft_sqlite_recovery_outcome", outcome="clean") == 0
    assert val(x, "raft_sqlite_backups") == 0


def test_detach_restores_hooks_and_closed_store_scrapes_without_error(tmp_path):
    with open_store(tmp_path / "n") as s:
        prev = s.on_commit
        m = StoreMetrics(s)
        s.log("a").append([LogEntry(1, 1, b"abc")])
        m.detach()
        assert s.on_commit is prev
        s.log("a").append([LogEntry(2, 1, b"def")])
        x = samples(m.text())
        assert val(x, "raft_sqlite_entries_appended_total") == 1  # nothing counted after detach
        m2 = StoreMetrics(s)
    x = samples(m2.text())  # store closed: counters only, no error
    assert ("raft_sqlite_log_entries", frozenset({("group", "a")})) not in x


def test_counts_exact_under_concurrent_writers_with_refused_appends(tmp_path):
    """Threads race to append the same indexes of a shared group (losers get LogConflictError) while
    others append to their own groups: the counters equal what was committed."""
    import threading

    from raft_sqlite import LogConflictError

    with open_store(tmp_path / "n", segment_policy=SegmentPolicy(max_entries=16)) as s:
        m = StoreMetrics(s)
        shared = s.log("shared")
        refused = []

        def racer(k):
            for _ in range(60):
                i = shared.last_index + 1
                try:
                    shared.append([LogEntry(i, 1, b"r" * (k + 1))])
                except LogConflictError:
                    refused.append(i)

        def own(k):
            log = s.log(f"own{k}")
            for i in range(1, 81):
                log.append([LogEntry(i, 1, b"o" * (i % 9))])

        ts = [threading.Thread(target=racer, args=(k,)) for k in range(3)]
        ts += [threading.Thread(target=own, args=(k,)) for k in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        x = samples(m.text())
        stored = sum(val(x, "raft_sqlite_log_stored_bytes", group=g) for g in ("shared", "own0", "own1"))
        entries = shared.last_index + 160
        sealed = s.kernel.read(lambda c: c.execute("SELECT count(*) FROM log_segments WHERE last_index IS NOT NULL")
                         .fetchone()[0])
    assert val(x, "raft_sqlite_entries_appended_total") == entries
    assert val(x, "raft_sqlite_bytes_appended_total") == stored
    assert val(x, "raft_sqlite_segment_rotations_total") == sealed


def test_validation_errors_counted_from_recovery(tmp_path):
    d = tmp_path / "n"
    with open_store(d) as s:
        s.log("a").append([LogEntry(i, 1, b"e%d" % i) for i in range(1, 11)])
        s.metadata("a").set_commit_index(5)
    c = apsw.Connection(str(d / "raft.db"))
    c.execute("UPDATE log_entries SET payload = x'00' WHERE idx = 9")
    c.close()
    with open_store(d, recovery=RecoveryPolicy.TRUNCATE_TAIL) as s:
        m = StoreMetrics(s)
        assert s.log("a").last_index == 8
        x = samples(m.text())
    assert val(x, "raft_sqlite_validation_errors_total", kind="record_crc") == 1
    assert val(x, "raft_sqlite_recovery_outcome", outcome="truncated") == 1
    # the stopped node's files tell the same through the CLI
    r = subprocess.run([sys.executable, "-m", "raft_sqlite.cli", "metrics", str(d)], capture_output=True, text=True,
                       env=ENV, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    y = samples(r.stdout)
    assert val(y, "raft_sqlite_log_last_index", group="a") == 8
    # the last open (TRUNCATE_TAIL, above) found and dropped one record failing its CRC
    assert val(y, "raft_sqlite_validation_errors_total", kind="record_crc") == 1
    assert val(y, "raft_sqlite_recovery_outcome", outcome="truncated") == 1


def test_observe_verify_counts_problem_kinds(tmp_path):
    from raft_sqlite.verify import verify

    d = tmp_path / "n"
    with open_store(d) as s:
        s.log("a").append([LogEntry(i, 1, b"v") for i in range(1, 6)])
    c = apsw.Connection(str(d / "raft.db"))
    c.execute("UPDATE raft_meta SET commit_index = 3")
    c.close()
    with open_store(d, recovery=RecoveryPolicy.PARTIAL) as s:
        m = StoreMetrics(s)
        m.observe_verify(verify(d))
        x = samples(m.text())
    assert val(x, "raft_sqlite_validation_errors_total", kind="metadata") >= 1
    assert classify_problem("x: segment 3 (1..5) fails its sidecar checksum") == "sidecar"
    assert classify_problem("x: CRC mismatch in log entry 4 (segment 1)") == "record_crc"


def test_metrics_cli_after_a_workload(tmp_path):
    d = tmp_path / "n"
    with open_store(d, segment_policy=SegmentPolicy(max_entries=20)) as s:
        total = workload(s, groups=("g1", "g2", "g3"), n=45)
    r = subprocess.run([sys.executable, "-m", "raft_sqlite.cli", "metrics", str(d)], capture_output=True, text=True,
                       env=ENV, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    x = samples(r.stdout)
    assert sum(val(x, "raft_sqlite_log_stored_bytes", group=g) for g in ("g1", "g2", "g3")) == total
    assert all(val(x, "raft_sqlite_log_entries", group=g) == 45 for g in ("g1", "g2", "g3"))
    assert val(x, "raft_sqlite_segments", group="g2") == 3
    assert val(x, "raft_sqlite_recovery_outcome", outcome="created") == 1
    assert val(x, "raft_sqlite_recovery_duration_seconds") > 0
    assert "# TYPE raft_sqlite_oldest_segment_timestamp_seconds gauge" in r.stdout
    assert "_age_seconds" not in r.stdout


def cli_metrics(*args):
    return subprocess.run([sys.executable, "-m", "raft_sqlite.cli", "metrics", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=60, check=False)


def test_info_metric_live_and_in_the_cli(tmp_path):
    from raft_sqlite import FsyncMode, __version__
    from raft_sqlite.migrate import heads

    d = tmp_path / "n"
    with open_store(d, node_id="n7", cluster_id="blue", fsync=FsyncMode.NORMAL) as s:
        s.log("a").append([LogEntry(1, 1, b"x")])
        live = samples(StoreMetrics(s).text(), node="n7")
    r = cli_metrics(d)
    assert r.returncode == 0, r.stderr
    for x in (live, samples(r.stdout, node="n7")):
        [(labels, v)] = [(dict(k[1]), v) for k, v in x.items() if k[0] == "raft_sqlite_info"]
        assert v == 1 and labels.pop("schema") in heads().values()
        assert labels == {"cluster_id": "blue", "version": __version__, "fsync_mode": "NORMAL"}


def test_fsync_histogram_times_the_stores_own_syncs(tmp_path):
    """NORMAL: the interval WAL sync; FULL: the background checkpointer's syncs. Never SQLite's COMMIT."""
    from raft_sqlite import FsyncMode

    with open_store(tmp_path / "normal", fsync=FsyncMode.NORMAL, fsync_interval=0.01) as s:
        m = StoreMetrics(s)
        x = samples(m.text())
        assert val(x, "raft_sqlite_fsync_seconds_count", file="wal") == 0  # shown before the first sync
        deadline = time.monotonic() + 10
        while s.stats.interval_syncs == 0 and time.monotonic() < deadline:
            s.log("a").append([LogEntry(s.log("a").last_index + 1, 1, b"y" * 100)])
            time.sleep(0.005)
        syncs = s.stats.interval_syncs
        x = samples(m.text())
    assert syncs > 0 and val(x, "raft_sqlite_fsync_seconds_count", file="wal") >= syncs
    assert val(x, "raft_sqlite_fsync_seconds_sum", file="wal") > 0
    with open_store(tmp_path / "full", fsync=FsyncMode.FULL) as s:
        m = StoreMetrics(s)
        log = s.log("a")
        for i in range(1, 2001):  # ~2000 WAL pages: the background checkpointer runs (and syncs) meanwhile
            log.append([LogEntry(i, 1, b"z" * 300)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            x = samples(m.text())
            if val(x, "raft_sqlite_fsync_seconds_count", file="db") > 0:
                break
            time.sleep(0.05)
    assert val(x, "raft_sqlite_fsync_seconds_count", file="db") > 0
    # the WAL sync of each commit is inside SQLite's COMMIT: not counted (one commit per append)
    assert val(x, "raft_sqlite_fsync_seconds_count", file="wal") < val(x, "raft_sqlite_commit_seconds_count") / 10
    with open_store(tmp_path / "off") as s:  # OFF never syncs: no series
        assert not any(k[0].startswith("raft_sqlite_fsync") for k in samples(StoreMetrics(s).text()))


def test_two_stores_share_one_registry(tmp_path):
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    with open_store(tmp_path / "a", node_id="n1") as s1, open_store(tmp_path / "b", node_id="n2") as s2:
        m1, m2 = StoreMetrics(s1, reg), StoreMetrics(s2, reg)
        s1.log("g").append([LogEntry(i, 1, b"a") for i in range(1, 4)])
        s2.log("g").append([LogEntry(i, 1, b"bb") for i in range(1, 6)])
        text = m1.text()
        assert text == m2.text()  # one registry, one exposition
        x = samples(text, node=None)
        assert val(x, "raft_sqlite_entries_appended_total", node_id="n1") == 3
        assert val(x, "raft_sqlite_entries_appended_total", node_id="n2") == 5
        assert val(x, "raft_sqlite_log_entries", node_id="n1", group="g") == 3
        assert val(x, "raft_sqlite_log_entries", node_id="n2", group="g") == 5
        assert text.count("# TYPE raft_sqlite_log_entries gauge") == 1  # one family, both nodes' samples
        assert {dict(k[1])["node_id"] for k in x if k[0] == "raft_sqlite_info"} == {"n1", "n2"}
        with open_store(tmp_path / "c", node_id="n1") as s3:  # (another cluster's n1)
            with pytest.raises(ValueError, match="already has a StoreMetrics for node_id 'n1'"):
                StoreMetrics(s3, reg)
            m1.detach()  # then n1's series may come from the other store, its counters continuing
            m3 = StoreMetrics(s3, reg)
            s3.log("g").append([LogEntry(1, 1, b"c")])
            x = samples(m3.text(), node=None)
            assert val(x, "raft_sqlite_entries_appended_total", node_id="n1") == 4
            assert val(x, "raft_sqlite_log_entries", node_id="n1", group="g") == 1
            m3.detach()
        m2.detach()
    # the process-wide default registry works the same way (a detached store's state metrics leave it)
    from prometheus_client import REGISTRY, generate_latest

    with open_store(tmp_path / "d", node_id="n9") as s4:
        m4 = StoreMetrics(s4, REGISTRY)
        s4.log("g").append([LogEntry(1, 1, b"d")])
        assert 'raft_sqlite_log_entries{group="g",node_id="n9"} 1.0' in generate_latest(REGISTRY).decode()
        m4.detach()
    assert "raft_sqlite_log_entries" not in generate_latest(REGISTRY).decode()


def test_metrics_cli_timestamps_output_file_and_json(tmp_path):
    from raft_sqlite.backup import HotBackupManager

    d = tmp_path / "n"
    t0 = time.time()
    with open_store(d) as s:
        workload(s, groups=("g",), n=9)
        with s.snapshots("g").write(4, 1) as w:
            w.write(b"s" * 100)
        HotBackupManager(s, tmp_path / "bk").backup()
    t1 = time.time()
    r = cli_metrics(d)
    assert r.returncode == 0, r.stderr
    x = samples(r.stdout)
    for name, labels in (("raft_sqlite_oldest_segment_timestamp_seconds", {"group": "g"}),
                         ("raft_sqlite_snapshot_timestamp_seconds", {"group": "g"}),
                         ("raft_sqlite_backup_timestamp_seconds", {}), ("raft_sqlite_recovery_timestamp_seconds", {})):
        assert t0 <= val(x, name, **labels) <= t1, name
    assert not any(k[0].endswith("_age_seconds") for k in x)
    assert not any(k[0].startswith(("raft_sqlite_commit_seconds", "raft_sqlite_fsync")) for k in x)  # live only
    # --output: the same text, written atomically (mode 0644, no temporary file left)
    out = tmp_path / "prom" / "raft.prom"
    out.parent.mkdir()
    r = cli_metrics(d, "--output", out)
    assert r.returncode == 0 and r.stdout == "", r.stderr
    assert samples(out.read_text()).keys() == x.keys()
    assert (out.stat().st_mode & 0o777) == 0o644 and os.listdir(out.parent) == ["raft.prom"]
    # on an error nothing is written: the previous file stays, no temporary file
    out.write_text("previous\n")
    r = cli_metrics(tmp_path / "missing", "--output", out)
    assert r.returncode == 3 and out.read_text() == "previous\n" and os.listdir(out.parent) == ["raft.prom"]
    r = cli_metrics(d, "--output", tmp_path / "no-such-dir" / "raft.prom")
    assert r.returncode == 2 and "cannot write" in r.stderr and "Traceback" not in r.stderr
    # --json: the same families and samples
    r = cli_metrics(d, "--json")
    assert r.returncode == 0, r.stderr
    fams = json.loads(r.stdout)
    by_name = {f["name"]: f for f in fams}
    assert by_name["raft_sqlite_info"]["type"] == "gauge" and by_name["raft_sqlite_info"]["help"]
    js = {(smp["name"], frozenset((k, v) for k, v in smp["labels"].items() if k != "node_id")): smp["value"]
          for f in fams for smp in f["samples"]}
    assert js == x
    r = cli_metrics(d, "--json", "--output", out)  # both: the JSON goes to the file
    assert r.returncode == 0 and json.loads(out.read_text()) == fams


def test_write_textfile_leaves_nothing_behind_when_the_write_fails(tmp_path, monkeypatch):
    from raft_sqlite import fsio
    from raft_sqlite.metrics import write_textfile

    target = tmp_path / "x.prom"
    target.write_text("old\n")

    def boom(fd):
        raise OSError(5, "injected EIO")

    monkeypatch.setattr(fsio, "fsync", boom)
    with pytest.raises(OSError, match="injected"):
        write_textfile(target, "new\n")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["x.prom"]
    monkeypatch.undo()
    write_textfile(target, "new\n")
    assert target.read_text() == "new\n" and (target.stat().st_mode & 0o777) == 0o644


BLOCK = "import sys; sys.modules['prometheus_client'] = None\n"


def test_library_works_without_prometheus_client(tmp_path):
    code = BLOCK + """
import raft_sqlite
from raft_sqlite import NodeStore, LogEntry, FsyncMode
with NodeStore.open(sys.argv[1], "n1", cluster_id="c1", fsync=FsyncMode.OFF) as s:
    s.log("a").append([LogEntry(1, 1, b"x")])
try:
    import raft_sqlite.metrics
except ImportError as e:
    print("IMPORT-ERROR", e)
from raft_sqlite.cli import main
main(["metrics", sys.argv[1]])
"""
    r = run_py(code, tmp_path / "n")
    assert "IMPORT-ERROR raft_sqlite.metrics needs prometheus_client: pip install 'raft_sqlite[metrics]'" in r.stdout
    assert r.returncode == 6 and "prometheus_client" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------- logging
def test_logging_open_summary_slow_commit_warning_and_fault_error(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="raft_sqlite")
    d = tmp_path / "n"
    with open_store(d, slow_commit_warning=0.0) as s:
        s.log("a").append([LogEntry(1, 1, b"x")])
    opens = [r for r in caplog.records if r.name == "raft_sqlite.store" and r.levelno == logging.INFO]
    assert len(opens) == 1 and "recovery created policy=STRICT" in opens[0].getMessage()
    slow = [r for r in caplog.records if r.levelno == logging.WARNING and "slow commit" in r.getMessage()]
    assert slow and slow[0].name == "raft_sqlite.store"
    caplog.clear()
    for name in ("raft_sqlite", "raft_sqlite.store", "raft_sqlite.recovery"):
        assert not logging.getLogger(name).handlers  # the library never configures logging itself
    try:
        from tests.support.faultvfs import FaultVFS, quiet_injected_faults
    except ImportError:
        pytest.skip("fault VFS not available")
    with quiet_injected_faults():
        vfs = FaultVFS("metrics-log-fault")
        try:
            s = open_store(d, vfs=vfs.name, slow_commit_warning=10.0)
            opens = [r for r in caplog.records if r.levelno == logging.INFO and r.name == "raft_sqlite.store"]
            assert len(opens) == 1 and "recovery clean" in opens[0].getMessage()
            vfs.arm_error("write", nth=1, error="full", sticky=True)
            with pytest.raises(StorageFault):
                s.log("a").append([LogEntry(2, 1, b"y" * 5000)])
                s.metadata("a").set_commit_index(2)
            s.close()
        finally:
            vfs.unregister()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and errors[0].name == "raft_sqlite.store" and "fail-stop" in errors[0].getMessage()
