"""A replicated key-value store on 3 PySyncObj nodes (127.0.0.1), each journaling to raft_sqlite.

Demo (starts 3 node processes, writes, SIGKILLs the leader, restarts it, checks convergence)::

    python examples/pysyncobj_cluster.py demo [--dir DIR] [--count 300]

One node (what the demo and tests/test_pysyncobj.py start; a line protocol on stdin/stdout)::

    python examples/pysyncobj_cluster.py node --self 127.0.0.1:4321 \
        --partners 127.0.0.1:4322,127.0.0.1:4323 --data-dir /var/lib/kv/node1

    stdin:  set KEY VALUE        -> stdout: ack KEY            (the callback reported success)
                                            nack KEY REASON    (it reported a failure)
            state                -> stdout: state {json: data, status}
            backup DIR           -> stdout: backup PATH        (a hot backup of the node's store)
            quit                 -> destroys the SyncObj and exits

The node's journal is ``RaftSqliteJournal`` (``patch_pysyncobj()`` + ``SyncObjConf(journalFile=data_dir)``):
entries, term and vote are durable before PySyncObj acts on them, full dumps become durable store
snapshots, and ``raft-sqlite status DATA_DIR`` inspects a node's store like any other.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------- node
def run_node(self_addr: str, partners: list[str], data_dir: str, *, compaction_entries: int = 500) -> None:
    from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

    from raft_sqlite.integrations.pysyncobj import patch_pysyncobj

    patch_pysyncobj()

    class KV(SyncObj):
        def __init__(self, conf):
            super().__init__(self_addr, partners, conf)
            self.__data = {}

        @replicated
        def set(self, key, value):
            self.__data[key] = value
            return value

        def data(self):
            return dict(self.__data)

    out_lock = threading.Lock()

    def say(*parts):
        with out_lock:
            sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
            sys.stdout.flush()

    conf = SyncObjConf(journalFile=data_dir, logCompactionMinEntries=compaction_entries,
                       appendEntriesUseBatch=True, dynamicMembershipChange=False,
                       connectionRetryTime=0.3, commandsQueueSize=100000)
    kv = KV(conf)
    say("started", self_addr)

    def callback(key):
        def cb(res, err):
            if err == FAIL_REASON.SUCCESS:
                say("ack", key)
            else:
                say("nack", key, err)
        return cb

    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        cmd = parts[0]
        if cmd == "set":
            kv.set(parts[1], parts[2], callback=callback(parts[1]))
        elif cmd == "state":
            st = kv.getStatus()
            status = {k: (str(v) if not isinstance(v, (int, float, str, bool, type(None))) else v)
                      for k, v in st.items()}
            say("state", json.dumps({"data": kv.data(), "status": status}))
        elif cmd == "backup":
            from raft_sqlite.backup import HotBackupManager
            journal = kv._SyncObj__raftLog
            info = HotBackupManager(journal.store, parts[1]).backup()
            say("backup", info.path)
        elif cmd == "quit":
            break
    kv.destroy_synchronous()


# ---------------------------------------------------------------------------------------------- driver
def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class NodeProc:
    """A node subprocess speaking the line protocol; acks are collected by a reader thread."""

    def __init__(self, addr: str, partners: list[str], data_dir: str, *, env: dict | None = None,
                 compaction_entries: int = 500, log_path: str | None = None):
        self.addr, self.partners, self.data_dir = addr, partners, data_dir
        self.env, self.compaction_entries, self.log_path = env, compaction_entries, log_path
        self.proc = None
        self.acks: set[str] = set()
        self.nacks: list[tuple[str, str]] = []
        self._states: list[dict] = []
        self._cv = threading.Condition()

    def start(self) -> NodeProc:
        env = dict(os.environ, **(self.env or {}))
        root = os.path.dirname(HERE)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        errf = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 (child keeps it)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "node", "--self", self.addr, "--partners",
             ",".join(self.partners), "--data-dir", self.data_dir, "--compaction-entries",
             str(self.compaction_entries)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errf, text=True, bufsize=1, env=env)
        if errf is not subprocess.DEVNULL:
            errf.close()
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        return self

    def _read(self, proc):
        for line in proc.stdout:
            parts = line.rstrip("\n").split(" ", 1)
            with self._cv:
                if parts[0] == "ack":
                    self.acks.add(parts[1])
                elif parts[0] == "nack":
                    self.nacks.append(tuple(parts[1].split(" ", 1)))
                elif parts[0] in ("state", "backup"):
                    self._states.append({"kind": parts[0], "value": parts[1]})
                self._cv.notify_all()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, line: str) -> bool:
        if not self.alive:
            return False
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def _ask(self, line: str, kind: str, timeout: float):
        with self._cv:
            self._states.clear()
        if not self.send(line):
            return None
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for s in self._states:
                    if s["kind"] == kind:
                        return s["value"]
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive:
                    return None
                self._cv.wait(left)

    def state(self, timeout: float = 5.0) -> dict | None:
        v = self._ask("state", "state", timeout)
        return json.loads(v) if v is not None else None

    def backup(self, backup_dir: str, timeout: float = 30.0) -> str | None:
        return self._ask(f"backup {backup_dir}", "backup", timeout)

    def kill(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive:
            self.send("quit")
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def make_cluster(base_dir: str, n: int = 3, **kw) -> list[NodeProc]:
    addrs = [f"127.0.0.1:{p}" for p in free_ports(n)]
    return [NodeProc(a, [b for b in addrs if b != a], os.path.join(base_dir, f"node{i + 1}"), **kw)
            for i, a in enumerate(addrs)]


def wait_leader(nodes: list[NodeProc], timeout: float = 30.0) -> NodeProc | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for nd in nodes:
            st = nd.state(2.0) if nd.alive else None
            if st and st["status"].get("leader") == nd.addr:
                return nd
        time.sleep(0.2)
    return None


def wait_converged(nodes: list[NodeProc], timeout: float = 60.0, settle: float = 2.0) -> list[dict] | None:
    """States of all nodes once they hold the same data and it has not changed for ``settle`` seconds
    (commands may still sit in a queue waiting for a leader); None after ``timeout``."""
    deadline = time.monotonic() + timeout
    since, last = None, None
    while time.monotonic() < deadline:
        states = [nd.state(3.0) for nd in nodes]
        if all(states) and all(s["data"] == states[0]["data"] for s in states):
            if states[0]["data"] != last:
                since, last = time.monotonic(), states[0]["data"]
            elif time.monotonic() - since >= settle:
                return states
        else:
            since, last = None, None
        time.sleep(0.3)
    return None


def demo(base_dir: str, count: int) -> int:
    nodes = make_cluster(base_dir, env={"RAFT_SQLITE_FSYNC": "FULL"}, compaction_entries=100)
    for nd in nodes:
        nd.start()
    try:
        leader = wait_leader(nodes)
        print(f"cluster up: {[nd.addr for nd in nodes]}, leader {leader.addr if leader else None}")
        half = count // 2
        for i in range(count):
            nodes[i % 3].send(f"set k{i} v{i}")
            if i == half - 1 and leader is not None:
                deadline = time.monotonic() + 20
                while sum(len(nd.acks) for nd in nodes) < half and time.monotonic() < deadline:
                    time.sleep(0.05)
                print(f"SIGKILL leader {leader.addr} after {half} writes, restarting it from {leader.data_dir}")
                leader.kill()
                time.sleep(1.0)
                leader.start()
        states = wait_converged(nodes)
        acked = set().union(*(nd.acks for nd in nodes))
        if states is None:
            print("nodes did not converge")
            return 1
        data = states[0]["data"]
        missing = [k for k in acked if data.get(k) != "v" + k[1:]]
        print(f"{len(acked)} writes acknowledged, {len(data)} keys on every node, "
              f"{len(missing)} acknowledged writes missing")
        for nd, st in zip(nodes, states):
            s = st["status"]
            print(f"  {nd.addr}: state={s.get('state')} term={s.get('raft_term')} commit={s.get('commit_idx')} "
                  f"log_len={s.get('log_len')} data_dir={nd.data_dir}")
        return 1 if missing else 0
    finally:
        for nd in nodes:
            nd.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("node")
    n.add_argument("--self", dest="self_addr", required=True)
    n.add_argument("--partners", required=True)
    n.add_argument("--data-dir", required=True)
    n.add_argument("--compaction-entries", type=int, default=500)
    d = sub.add_parser("demo")
    d.add_argument("--dir", default=None)
    d.add_argument("--count", type=int, default=300)
    a = ap.parse_args(argv)
    if a.cmd == "node":
        run_node(a.self_addr, [p for p in a.partners.split(",") if p], a.data_dir,
                 compaction_entries=a.compaction_entries)
        return 0
    base = a.dir or tempfile.mkdtemp(prefix="pysyncobj-cluster-")
    print(f"data under {base}")
    return demo(base, a.count)


if __name__ == "__main__":
    sys.exit(main())
