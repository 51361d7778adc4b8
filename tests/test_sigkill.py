"""A child process appends (single entries, batches, several threads) and reports every acknowledged
index; the parent SIGKILLs it at a random moment; every acknowledged entry must be present and intact."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from raft_sqlite import FsyncMode
from tests.conftest import ROOT, open_store

CHILD = r"""
import sys, threading
from raft_sqlite import NodeStore, LogEntry, FsyncMode
path, mode = sys.argv[1], sys.argv[2]
s = NodeStore.open(path, "n1", cluster_id="c1", fsync=FsyncMode(mode))
out = sys.stdout
lock = threading.Lock()
def payload(g, i):
    return (f"{g}:{i}:" + "x" * (i % 50)).encode()
def writer(g):
    lg = s.log(g)
    i = lg.last_index
    while True:
        n = 1 if i % 3 else 5
        lg.append([LogEntry(i + k, 1 + (i + k) // 100, payload(g, i + k)) for k in range(1, n + 1)])
        i += n
        with lock:
            out.write(f"{g} {i}\n"); out.flush()
threads = [threading.Thread(target=writer, args=(f"g{t}",), daemon=True) for t in range(3)]
for t in threads: t.start()
for t in threads: t.join()
"""


def payload(g, i):
    return (f"{g}:{i}:" + "x" * (i % 50)).encode()


def run_and_kill(data_dir, mode, delay, child=CHILD):
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-c", child, str(data_dir), mode.value], stdout=subprocess.PIPE,
                         env=env, text=True)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    out, _ = p.communicate()
    # the writer loops forever: any other exit (it died on its own, e.g. the store refused to open) means
    # nothing was tested in this round, and is a failure rather than a kill
    assert p.returncode == -signal.SIGKILL, f"writer exited with {p.returncode} before the kill"
    acked = {}
    for line in out.splitlines():
        g, i = line.split()
        acked[g] = max(acked.get(g, 0), int(i))
    return acked


@pytest.mark.parametrize("mode", [FsyncMode.FULL, FsyncMode.NORMAL])
def test_sigkill_never_loses_acknowledged_entries(tmp_path, mode):
    rng = random.Random(1234)
    data_dir = tmp_path / "node"
    open_store(data_dir, fsync=mode).close()  # created (alembic) outside the timed part
    total_acked = kills = 0
    best = {}
    for _ in range(6):
        acked = run_and_kill(data_dir, mode, rng.uniform(0.6, 1.6))
        kills += 1  # run_and_kill asserts the writer really was killed
        with open_store(data_dir, fsync=mode) as s:
            for g, last in acked.items():
                best[g] = max(best.get(g, 0), last)
            for g, last in best.items():
                lg = s.log(g)
                assert lg.last_index >= last, f"{g}: acknowledged {last}, found {lg.last_index}"
                es = lg.entries(1, last + 1)  # verifies every CRC
                assert [e.data for e in es] == [payload(g, i) for i in range(1, last + 1)]
                assert [e.term for e in es] == [1 + i // 100 for i in range(1, last + 1)]
            total_acked += sum(acked.values())
    print(f"sigkill[{mode.value}]: {kills} kills, {sum(best.values())} acknowledged entries checked, lost 0")
    assert sum(best.values()) > 0


def test_a_writer_that_dies_on_its_own_fails_the_round(tmp_path):
    """The round's check fires when the writer was not killed (it exited by itself after some acks)."""
    early_exit = "import sys\nprint('g0 1', flush=True)\nsys.exit(0)"
    with pytest.raises(AssertionError, match="exited with 0 before the kill"):
        run_and_kill(tmp_path / "node", FsyncMode.FULL, 0.5, child=early_exit)
