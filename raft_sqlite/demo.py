"""The ``raft-sqlite demo``: a node process writes with FULL fsync and reports every acknowledged index; it
is SIGKILLed at a random moment; the store is reopened and every acknowledged entry is checked
(present, CRC verified, payload equal). :func:`run_demo` does it and returns the result;
:mod:`raft_sqlite.cli` prints it. :func:`run_demo_node` is the node process (``raft-sqlite _demo-node``).
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

from .errors import RaftSqliteError
from .fsync import FsyncMode
from .log import LogEntry
from .store import NodeStore
from .verify import verify as run_verify
from .wal import SegmentPolicy

DEMO_NODE, DEMO_CLUSTER = "demo-node", "demo-cluster"


class DemoError(RaftSqliteError):
    """The demo could not run (its node process did not start)."""


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` found."""

    #: JSON-able summary (what ``raft-sqlite demo --json`` prints); ``ok`` is False if an acknowledged
    #: entry was lost or damaged, or verify found a problem
    result: dict[str, Any]
    #: verify found no problem in the reopened store
    verify_ok: bool


def demo_payload(group: str, index: int) -> bytes:
    """The deterministic payload the demo writes at ``index`` of ``group`` (16..1040 bytes)."""
    seed = zlib.crc32(f"{group}/{index}".encode())
    n = 16 + seed % 1025
    return (f"{group}:{index}:".encode() + seed.to_bytes(4, "little") * (n // 4 + 1))[:n]


def run_demo_node(data_dir: str, groups: int) -> None:
    """The demo's node process: one writer thread per group appends an entry and advances the commit
    index in one transaction (FULL fsync), then prints 'ack GROUP INDEX'. Runs until killed."""
    # small segments so that the demo also seals segments (sidecar checksums are verified on reopen)
    store = NodeStore.open(data_dir, DEMO_NODE, cluster_id=DEMO_CLUSTER, fsync=FsyncMode.FULL,
                           segment_policy=SegmentPolicy(max_entries=1000))
    lock = threading.Lock()
    names = [f"g{i}" for i in range(groups)]
    for n in names:
        store.metadata(n).set_term_and_vote(1, DEMO_NODE)

    def writer(name: str) -> None:
        log, meta = store.log(name), store.metadata(name)
        i = log.last_index
        while True:
            i += 1
            with store.transaction():
                log.append([LogEntry(i, 1, demo_payload(name, i))])
                meta.set_commit_index(i)
            with lock:
                sys.stdout.write(f"ack {name} {i}\n")
                sys.stdout.flush()

    with lock:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_demo(data_dir: str | None, groups: int, min_run: float, max_run: float, seed: int | None,
             say: Callable[[str], None]) -> DemoResult:
    """Run the demo and return what it found. ``data_dir`` None: a temporary directory, removed before returning.
    ``say`` receives the progress lines of steps 1-3 (rich markup). Raises :class:`DemoError` if the
    node process does not start within 30 s."""
    rng = random.Random(seed)
    tmp = None
    if data_dir is None:
        tmp = tempfile.mkdtemp(prefix="raft-sqlite-demo-")
        data_dir = os.path.join(tmp, "node")
    try:
        say(f"[bold]1.[/] starting a node (FULL fsync, {groups} groups, one writer thread each) in {data_dir}")
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        child = subprocess.Popen([sys.executable, "-m", "raft_sqlite.cli", "_demo-node", data_dir, "--groups",
                                  str(groups)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        # set with stdout=PIPE, stderr=PIPE just above
        assert child.stdout is not None and child.stderr is not None
        stdout, stderr = child.stdout, child.stderr
        acked: dict[str, int] = {}
        n_acks = [0]

        def reader() -> None:
            for line in stdout:
                parts = line.split()
                if len(parts) == 3 and parts[0] == "ack":
                    acked[parts[1]] = max(acked.get(parts[1], 0), int(parts[2]))
                    n_acks[0] += 1
                elif parts == ["ready"]:
                    ready.set()

        ready = threading.Event()
        rd = threading.Thread(target=reader, daemon=True)
        rd.start()
        deadline = time.monotonic() + 30
        while not ready.wait(0.05):
            if child.poll() is not None or time.monotonic() > deadline:
                child.kill()
                raise DemoError(f"the demo node did not start: {stderr.read()[-2000:]}")
        run = rng.uniform(min_run, max(min_run, max_run))
        time.sleep(run)
        acked_at_kill = sum(acked.values())
        child.send_signal(signal.SIGKILL)
        child.wait()
        rd.join(10)  # drain: lines the node wrote before it died were acknowledged too
        stderr.close()
        total_acked = sum(acked.values())
        say(f"[bold]2.[/] SIGKILLed the node after {run:.2f} s: {total_acked} entries acknowledged "
            f"({acked_at_kill} seen before the kill, {total_acked - acked_at_kill} drained from the pipe)")
        t0 = time.monotonic()
        with NodeStore.open(data_dir, DEMO_NODE, cluster_id=DEMO_CLUSTER, fsync=FsyncMode.FULL) as store:
            reopen_s = time.monotonic() - t0
            summary = store.recovery_report.summary()
            say(f"[bold]3.[/] reopened in {reopen_s * 1000:.0f} ms: {summary}")
            rows: list[dict[str, Any]] = []
            lost = 0
            for name in sorted(acked) or []:
                log, meta = store.log(name), store.metadata(name)
                a = acked[name]
                found = log.last_index
                intact = 0
                missing = []
                if found >= 1:
                    for e in log.entries(1, min(a, found) + 1):
                        if e.data == demo_payload(name, e.index) and e.term == 1:
                            intact += 1
                        else:
                            missing.append(e.index)
                lost_here = a - intact
                lost += lost_here
                rows.append({"group": name, "acked": a, "found": found, "intact": intact, "lost": lost_here,
                             "unacked_durable": max(0, found - a), "commit_index": meta.commit_index})
        rep = run_verify(data_dir)
        result = {"data_dir": data_dir, "run_seconds": run, "acked": total_acked,
                  "found": sum(r["found"] for r in rows), "lost": lost, "groups": rows,
                  "recovery": summary, "reopen_ms": reopen_s * 1000, "verify": rep.summary(), "ok": lost == 0 and rep.ok}
        return DemoResult(result, rep.ok)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
