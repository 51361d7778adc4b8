"""A replicated SQL key-value service on 3 PySyncObj nodes (127.0.0.1): raft_sqlite is the journal AND the state.

Each node journals to raft_sqlite (``patch_pysyncobj()`` + ``SyncObjConf(journalFile=data_dir)``) and keeps its
state in ``store.state(...)`` (:class:`raft_sqlite.sqlstate.SqlStateMachine`): the SQLite database
``data_dir/state/group-<id>.db`` with the tables ``kv(key, value, version)`` and ``ops(name, n)`` (a counter of
applied ``put`` commands, so a double apply would be visible). Every ``@replicated`` method runs its SQL through
``state.apply_command(index, term, fn)``: the SQL and the applied index/term commit in one transaction, so when
PySyncObj replays its journal after a restart (it always starts from index 1) the entries already applied are
skipped: each command is applied once (a SIGKILL mid-apply rolls back both, so the replay applies it then).

Demo (3 node processes; writes, SIGKILLs a follower or the leader, writes more, restarts it, writes more, waits
for convergence, then compares the SQL state of the 3 nodes; exit status 0 only if all checks pass)::

    python examples/pysyncobj_sql.py demo [--dir DIR] [--count 60] [--kill follower|leader]

One node (what the demo starts; a line protocol on stdin/stdout)::

    python examples/pysyncobj_sql.py node --self 127.0.0.1:4321 \
        --partners 127.0.0.1:4322,127.0.0.1:4323 --data-dir /var/lib/sqlkv/node1

    stdin:  put KEY VALUE   -> stdout: ack KEY VERSION   (applied; VERSION is the key's new version)
                                       nack KEY REASON   (PySyncObj's FAIL_REASON)
            state           -> stdout: state {json}      (raft status, SQL state, committed puts in the log)
            quit            -> destroys the SyncObj and exits

Anyone may read a node's state database with SQL while the node runs, read-only (this is what the demo's
final check does)::

    apsw.Connection("file:DATA_DIR/state/group-1.db?mode=ro",
                    flags=apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READONLY)
    sqlite3 "file:DATA_DIR/state/group-1.db?mode=ro" "SELECT count(*), sum(version) FROM kv"

Why PySyncObj's log compaction is OFF here (``RAFT_SQLITE_PYSYNCOBJ_COMPACTION=off`` and
``logCompactionMinEntries``/``logCompactionMinTime`` out of reach): PySyncObj's snapshot is a pickle of the
SyncObj's own attributes. The SQL state is not one of them (and must not be: ``_sql`` exists before
``SyncObj.__init__`` ends, so PySyncObj never pickles it), so a PySyncObj snapshot does not carry the SQL state.
A follower that lags (restarted, or just slow to connect at start) and that a leader brings up to date with a
snapshot loads it, jumps its applied index to the snapshot's, and never runs the commands the snapshot covers
against its SQL database. Tried with ``logCompactionMinEntries=20``: such a follower stops at its next command
(the entries between its SQL ``last_applied`` and the snapshot are gone from its journal; ``apply_command``
alone would raise ``LogGapError``). Never silently wrong, but stuck for good. raft_sqlite's own state
snapshots (``state.snapshot()``) cannot ride on PySyncObj's snapshot transfer either, and they share the
group's snapshot store with the journal's PySyncObj dumps (a ``state.snapshot()`` there makes the journal
refuse to open), so this example takes none. With compaction off the journal keeps every entry, a leader never
sends a snapshot (and a node refuses one), and a follower always catches up by replaying log entries through
``apply_command``. The price: the journal grows without bound and a restart replays it whole through PySyncObj
(the entries already applied cost one empty SQLite transaction each).

PySyncObj calls a ``@replicated`` method only for client commands; it applies no-op entries (one per new leader)
and membership entries itself. The SQL state's applied index must advance over them too (``apply`` needs
contiguous indexes), so before a command at index ``i`` the entries between the state's ``last_applied`` and
``i`` are recorded as applied with nothing to do, after checking that none of them is a client command.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
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

#: the state database's tables (one object: ``store.state`` checks that later calls pass the same one)
SCHEMA = (
    "CREATE TABLE kv(key TEXT PRIMARY KEY, value TEXT NOT NULL, version INTEGER NOT NULL)",
    "CREATE TABLE ops(name TEXT PRIMARY KEY, n INTEGER NOT NULL)",
)
#: first byte of a client command in PySyncObj's journal (``_COMMAND_TYPE.REGULAR``)
REGULAR = b"\x00"
#: PySyncObj never compacts its log in this example (see the module docstring)
NEVER = 10**12

#: one read transaction: the SQL summary of a node's state (the demo runs it in the node and from outside)
SUMMARY_SQL = (
    "SELECT (SELECT count(*) FROM kv), (SELECT coalesce(sum(version), 0) FROM kv), "
    "(SELECT coalesce(max(version), 0) FROM kv), (SELECT coalesce((SELECT n FROM ops WHERE name='put'), 0)), "
    "(SELECT applied_index FROM raft_applied), (SELECT applied_term FROM raft_applied)"
)


def summarize(conn) -> dict:
    """The SQL state of a node (inside one read transaction of ``conn``)."""
    keys, sum_version, max_version, ops, applied, term = conn.execute(SUMMARY_SQL).fetchone()
    h = hashlib.sha256()
    for k, v, ver in conn.execute("SELECT key, value, version FROM kv ORDER BY key"):
        h.update(f"{k}\0{v}\0{ver}\n".encode())
    return {"keys": keys, "sum_version": sum_version, "max_version": max_version, "ops": ops,
            "last_applied": applied, "applied_term": term, "digest": h.hexdigest()[:16]}


# ---------------------------------------------------------------------------------------------- node
def sqlkv_class():
    """The SyncObj of a node: ``put`` applies through ``state.apply_command`` (imports PySyncObj and
    patches it for raft_sqlite)."""
    # no PySyncObj snapshots (see the module docstring); set before any journal is created
    os.environ["RAFT_SQLITE_PYSYNCOBJ_COMPACTION"] = "off"
    from pysyncobj import SyncObj, replicated

    from raft_sqlite.entry import LogEntry
    from raft_sqlite.integrations.pysyncobj import patch_pysyncobj

    patch_pysyncobj()

    class SqlKV(SyncObj):
        def __init__(self, self_addr, partners, conf):
            # exists before SyncObj.__init__ ends, so it is in PySyncObj's excluded set and never pickled; opened
            # lazily (the tick thread may apply entries before this constructor returns)
            self._sql = None
            self._sql_lock = threading.Lock()
            self._replayed = 0  # entries PySyncObj applied again (after a restart) that the SQL state skipped
            super().__init__(self_addr, partners, conf)

        @property
        def journal(self):
            return self._SyncObj__raftLog  # the RaftSqliteJournal PySyncObj writes to

        def sql_state(self):
            with self._sql_lock:
                if self._sql is None:
                    j = self.journal
                    self._sql = j.store.state(j.group, schema=SCHEMA)
                return self._sql

        def _entry(self, index):
            j = self.journal
            first = j[0][1]
            if index < first:  # only after a PySyncObj snapshot, which this example never takes nor accepts
                raise RuntimeError(f"entry {index} is no longer in the journal (it starts at {first}): the SQL "
                                   "state cannot be brought forward over a PySyncObj snapshot")
            e = j[index - first]
            if e[1] != index:
                raise RuntimeError(f"journal view holds index {e[1]} where {index} was expected")
            return e

        def _apply(self, fn):
            """Run ``fn(conn)`` as the entry PySyncObj is applying now (exactly once)."""
            try:
                index = self.raftLastApplied + 1  # PySyncObj increments it after this method returns
                st = self.sql_state()
                if index > st.last_applied + 1:
                    gap = []
                    for i in range(st.last_applied + 1, index):
                        command, _, term = self._entry(i)
                        if command[:1] == REGULAR:
                            raise RuntimeError(f"entry {i} is a client command the SQL state has not applied")
                        gap.append(LogEntry(i, term, b""))  # a no-op / membership entry: nothing to apply
                    st.apply(gap, lambda conn, e: None)
                return st.apply_command(index, self._entry(index)[2], fn)
            except Exception as exc:
                # fail-stop: PySyncObj would log the error and go on ticking with a state it did not apply
                sys.stderr.write(f"FATAL: cannot apply entry {self.raftLastApplied + 1} to the SQL state: "
                                 f"{exc!r}\n")
                sys.stderr.flush()
                os._exit(70)

        @replicated
        def put(self, key, value):
            def fn(conn):
                conn.execute("INSERT INTO kv VALUES (?, ?, 1) ON CONFLICT(key) "
                             "DO UPDATE SET value=excluded.value, version=version+1", (key, value))
                conn.execute("INSERT INTO ops VALUES ('put', 1) ON CONFLICT(name) DO UPDATE SET n=n+1")
                return conn.execute("SELECT version FROM kv WHERE key=?", (key,)).fetchone()[0]

            applied, version = self._apply(fn)
            if not applied:
                self._replayed += 1
            return version  # None when PySyncObj replays an entry the SQL state holds already

        def summary(self) -> dict:
            st = self.sql_state()
            with st.read() as conn:
                out = summarize(conn)
            # exactly once: the counter must equal the client commands in the log up to the applied index
            lo = self.journal.store.log(self.journal.group)
            if lo.first_index > 1:  # compacted (not by this example): the commands cannot be counted
                out["log_puts"] = None
            else:
                entries = lo.entries(1, out["last_applied"] + 1) if out["last_applied"] else []
                out["log_puts"] = sum(1 for e in entries if e.data[:1] == REGULAR)
            out["replay_skipped"] = self._replayed
            out["path"] = st.path
            return out

    return SqlKV


def run_node(self_addr: str, partners: list[str], data_dir: str) -> None:
    SqlKV = sqlkv_class()
    from pysyncobj import FAIL_REASON, SyncObjConf

    out_lock = threading.Lock()

    def say(*parts):
        with out_lock:
            sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
            sys.stdout.flush()

    conf = SyncObjConf(journalFile=data_dir, logCompactionMinEntries=NEVER, logCompactionMinTime=NEVER,
                       appendEntriesUseBatch=True, dynamicMembershipChange=False,
                       connectionRetryTime=0.3, commandsQueueSize=100000)
    kv = SqlKV(self_addr, partners, conf)
    say("started", self_addr, kv.sql_state().path)

    def callback(key):
        def cb(res, err):
            if err == FAIL_REASON.SUCCESS:
                say("ack", key, res)
            else:
                say("nack", key, err)
        return cb

    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        cmd = parts[0]
        if cmd == "put" and len(parts) == 3:
            kv.put(parts[1], parts[2], callback=callback(parts[1]))
        elif cmd == "state":
            st = kv.getStatus()
            keys = ("state", "leader", "raft_term", "commit_idx", "last_applied", "log_len")
            status = {k: st.get(k) for k in keys}
            status = {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
                      for k, v in status.items()}
            say("state", json.dumps({"status": status, "sql": kv.summary()}))
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

    def __init__(self, name: str, addr: str, partners: list[str], data_dir: str, *, env: dict | None = None,
                 log_path: str | None = None):
        self.name, self.addr, self.partners, self.data_dir = name, addr, partners, data_dir
        self.env, self.log_path = env, log_path
        self.proc = None
        self.acks: dict[str, int] = {}
        self.nacks: list[tuple[str, str]] = []
        self._states: list[str] = []
        self._cv = threading.Condition()

    def start(self) -> NodeProc:
        env = dict(os.environ, **(self.env or {}))
        env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
        errf = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 (child keeps it)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "node", "--self", self.addr, "--partners",
             ",".join(self.partners), "--data-dir", self.data_dir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errf, text=True, bufsize=1, env=env)
        if errf is not subprocess.DEVNULL:
            errf.close()
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        return self

    def _read(self, proc):
        for line in proc.stdout:
            parts = line.rstrip("\n").split(" ")
            with self._cv:
                if parts[0] == "ack":
                    self.acks[parts[1]] = int(parts[2]) if parts[2] != "None" else -1
                elif parts[0] == "nack":
                    self.nacks.append((parts[1], parts[2]))
                elif parts[0] == "state":
                    self._states.append(line[len("state "):])
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

    def state(self, timeout: float = 10.0) -> dict | None:
        with self._cv:
            self._states.clear()
        if not self.send("state"):
            return None
        deadline = time.monotonic() + timeout
        with self._cv:
            while not self._states:
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive:
                    return None
                self._cv.wait(left)
            return json.loads(self._states[-1])

    def kill(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive:
            self.send("quit")
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def make_cluster(base_dir: str, n: int = 3, **kw) -> list[NodeProc]:
    addrs = [f"127.0.0.1:{p}" for p in free_ports(n)]
    return [NodeProc(f"node{i + 1}", a, [b for b in addrs if b != a], os.path.join(base_dir, f"node{i + 1}"),
                     log_path=os.path.join(base_dir, f"node{i + 1}.log"), **kw)
            for i, a in enumerate(addrs)]


def wait_leader(nodes: list[NodeProc], timeout: float = 60.0) -> NodeProc | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for nd in nodes:
            st = nd.state(5.0) if nd.alive else None
            if st and st["status"].get("leader") == nd.addr and st["status"].get("state") == 2:
                return nd
        time.sleep(0.2)
    return None


def write(nodes: list[NodeProc], keys: list[str], acked: dict[str, int], *,
          timeout: float = 120.0) -> list[str]:
    """Put ``keys`` through the current leader and wait until each one is acknowledged; a key refused
    (nack: no leader, leadership lost) is sent again through the leader of the moment. Returns what is
    still unacknowledged after ``timeout``."""
    deadline = time.monotonic() + timeout
    todo = list(keys)
    while todo and time.monotonic() < deadline:
        leader = wait_leader([nd for nd in nodes if nd.alive], timeout=max(1.0, deadline - time.monotonic()))
        if leader is None:
            break
        seen_nacks = {nd.name: len(nd.nacks) for nd in nodes}
        for k in todo:
            leader.send(f"put {k} v-{k}")
        batch_deadline = min(deadline, time.monotonic() + 30.0)
        while time.monotonic() < batch_deadline:
            for nd in nodes:
                acked.update(nd.acks)
            refused = [k for nd in nodes for k, _ in nd.nacks[seen_nacks[nd.name]:]]
            pending = [k for k in todo if k not in acked and k not in refused]
            if not pending:
                break
            if not leader.alive:
                break
            time.sleep(0.05)
        todo = [k for k in todo if k not in acked]
    return todo


def wait_converged(nodes: list[NodeProc], timeout: float = 120.0, settle: float = 1.5) -> list[dict] | None:
    """States of all nodes once their SQL states are equal (same digest and applied index) and stable for
    ``settle`` seconds; None after ``timeout``."""
    deadline = time.monotonic() + timeout
    since, last = None, None
    while time.monotonic() < deadline:
        states = [nd.state(5.0) for nd in nodes]
        if all(states):
            key = {(s["sql"]["digest"], s["sql"]["last_applied"]) for s in states}
            if len(key) == 1:
                if key != last:
                    since, last = time.monotonic(), key
                elif time.monotonic() - since >= settle:
                    return states
            else:
                since, last = None, None
        time.sleep(0.3)
    return None


def read_only_summary(data_dir: str) -> tuple[str, dict]:
    """The SQL state of a node read from outside the node, read-only, while it runs."""
    import apsw

    paths = sorted(glob.glob(os.path.join(data_dir, "state", "group-*.db")))
    if len(paths) != 1:
        raise RuntimeError(f"{data_dir}: expected one state database, found {paths}")
    conn = apsw.Connection(f"file:{paths[0]}?mode=ro", flags=apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READONLY)
    try:
        conn.set_busy_timeout(10_000)
        conn.execute("BEGIN")
        try:
            out = summarize(conn)
            out["good_keys"] = {k for k, v in conn.execute("SELECT key, value FROM kv") if v == f"v-{k}"}
            try:
                conn.execute("INSERT INTO ops VALUES ('intruder', 1)")
                out["write_refused"] = False
            except apsw.ReadOnlyError:
                out["write_refused"] = True
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()
    return paths[0], out


def check(nodes: list[NodeProc], states: list[dict], acked: dict[str, int], before: dict | None,
          victim: NodeProc) -> list[str]:
    """Print the SQL state of every node (as the node reads it and as a read-only connection from outside
    reads it) and return what is wrong: states not equal, not equal to the acknowledged puts, a put applied
    twice or not at all, the killed node's replay not skipping what it had applied."""
    problems: list[str] = []
    print("SQL state of every node (in the node: state.read(); outside: apsw mode=ro on the running node's "
          "file):")
    print(f"  {'node':6} {'keys':>5} {'sum(version)':>12} {'ops':>5} {'log puts':>8} {'last_applied':>12} "
          f"{'digest':16} {'replay skipped':>14}  read-only from outside")
    outside = []
    for nd, st in zip(nodes, states):
        s = st["sql"]
        path, ro = read_only_summary(nd.data_dir)
        outside.append(ro)
        same = all(ro[k] == s[k] for k in ("keys", "sum_version", "ops", "last_applied", "digest"))
        puts = s["log_puts"] if s["log_puts"] is not None else "?"
        print(f"  {nd.name:6} {s['keys']:>5} {s['sum_version']:>12} {s['ops']:>5} {puts:>8} "
              f"{s['last_applied']:>12} {s['digest']:16} {s['replay_skipped']:>14}  "
              f"{'same' if same else 'DIFFERENT'}, write refused: {ro['write_refused']}")
        if not same:
            problems.append(f"{nd.name}: the read-only view from outside differs: {ro} vs {s}")
        if not ro["write_refused"]:
            problems.append(f"{nd.name}: a write through the read-only connection was not refused")
        if s["ops"] != s["log_puts"]:
            problems.append(f"{nd.name}: ops counter {s['ops']} != {s['log_puts']} client commands in its log "
                            "up to the applied index (a command applied twice or not at all)")
        if s["max_version"] > 1:
            problems.append(f"{nd.name}: a key has version {s['max_version']} (each key was put once)")
        if s["sum_version"] != s["ops"]:
            problems.append(f"{nd.name}: sum(version) {s['sum_version']} != ops {s['ops']}")
    if before is not None:  # on restart PySyncObj replays the whole journal: what the victim applied is skipped
        was, now = before["ops"], states[nodes.index(victim)]["sql"]["replay_skipped"]
        print(f"{victim.name} had applied {was} puts before the SIGKILL; its replay after the restart "
              f"skipped {now}")
        if now != was:
            problems.append(f"{victim.name}: the replay skipped {now} puts, it had applied {was}")
    first = states[0]["sql"]
    if any(st["sql"]["digest"] != first["digest"] or st["sql"]["last_applied"] != first["last_applied"]
           for st in states):
        problems.append("the nodes' SQL states differ")
    if first["keys"] != len(acked) or first["ops"] != len(acked):
        problems.append(f"{first['keys']} keys and ops={first['ops']} on the nodes, {len(acked)} puts "
                        "acknowledged")
    if any(v != 1 for v in acked.values()):
        problems.append(f"acknowledged versions other than 1: {sorted(set(acked.values()))}")
    for nd, ro in zip(nodes, outside):
        missing = sorted(set(acked) - ro.pop("good_keys"))
        if missing:
            problems.append(f"{nd.name}: acknowledged puts missing or wrong: {missing[:5]}")
    return problems


def demo(base_dir: str, count: int, kill: str = "follower") -> int:
    t0 = time.monotonic()
    os.makedirs(base_dir, exist_ok=True)
    nodes = make_cluster(base_dir, env={"RAFT_SQLITE_FSYNC": "FULL"})
    for nd in nodes:
        nd.start()
    problems: list[str] = []
    acked: dict[str, int] = {}
    keys = [f"k{i:05d}" for i in range(count)]
    a, b = count // 3, 2 * count // 3
    try:
        leader = wait_leader(nodes)
        if leader is None:
            print("FAIL: no leader elected")
            return 1
        print(f"cluster up: {', '.join(f'{nd.name}={nd.addr}' for nd in nodes)}; leader {leader.name}")
        left = write(nodes, keys[:a], acked)
        print(f"phase 1: {len(acked)} of {a} puts acknowledged")
        victim = leader if kill == "leader" else next(nd for nd in nodes if nd is not leader)
        before = wait_converged(nodes, timeout=60.0, settle=0.5)  # the victim has applied phase 1 too
        applied = before[nodes.index(victim)]["sql"]["last_applied"] if before else "?"
        victim.kill()
        print(f"SIGKILL {victim.name} (the {kill}), its SQL state at last_applied={applied}")
        left += write(nodes, keys[a:b], acked)
        print(f"phase 2 (without {victim.name}): {len(acked)} of {b} puts acknowledged")
        victim.start()
        print(f"restarted {victim.name} from {victim.data_dir}")
        left += write(nodes, keys[b:], acked)
        print(f"phase 3 (after the restart): {len(acked)} of {count} puts acknowledged")
        if left:
            problems.append(f"{len(left)} puts never acknowledged: {left[:5]}")
        states = wait_converged(nodes)
        if states is None:
            print("FAIL: the nodes' SQL states did not converge")
            return 1
        first = states[0]["sql"]
        problems += check(nodes, states, acked, before[nodes.index(victim)]["sql"] if before else None, victim)
        print(f"{len(acked)} puts acknowledged; every node: {first['keys']} keys, "
              f"sum(version)={first['sum_version']}, ops={first['ops']}, last_applied={first['last_applied']}")
        for p in problems:
            print("MISMATCH:", p)
        verdict = ("OK: all 3 SQL states equal and equal to the acknowledged writes, no double apply"
                   if not problems else f"FAIL: {len(problems)} problem(s)")
        print(f"{verdict} ({time.monotonic() - t0:.1f}s)")
        return 0 if not problems else 1
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
    d = sub.add_parser("demo")
    d.add_argument("--dir", default=None)
    d.add_argument("--count", type=int, default=60)
    d.add_argument("--kill", choices=("follower", "leader"), default="follower")
    a = ap.parse_args(argv)
    if a.cmd == "node":
        run_node(a.self_addr, [p for p in a.partners.split(",") if p], a.data_dir)
        return 0
    base = a.dir or tempfile.mkdtemp(prefix="pysyncobj-sql-")
    print(f"data under {base}")
    return demo(base, a.count, a.kill)


if __name__ == "__main__":
    sys.exit(main())
