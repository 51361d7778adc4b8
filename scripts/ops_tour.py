"""Re-run README's "Operations" examples and paste what they print into README.

    .venv/bin/python scripts/ops_tour.py [--readme README.md] [--dir /tmp/ops]

Every CLI transcript in README's Operations section sits under a marker ``<!-- transcript:NAME -->``
followed by a plain fence; this script builds the documented node (the demo's data_dir with seed 7, a
snapshot of g0 at 2000, its compaction, a backup; a second node under ``snap/`` with a state machine's
snapshot chain and a raw snapshot, and a copy of it with one chunk zeroed; README's ``kvcodec.py``
decoder), runs each transcript's commands for real with
``COLUMNS=120``, and replaces the fence's content with ``$ command`` lines and their output (stdout and
stderr, as a terminal shows them piped). Without ``--readme`` it prints the transcripts. A marker in
README without a transcript here, or the reverse, is an error: examples cannot silently go stale.

The transcripts show the paths under ``--dir``, and README shows ``/tmp/ops``. To re-paste README without
touching a ``/tmp/ops`` someone else uses, run with the default ``--dir`` in a private mount namespace over
a folder of your own (``--dir`` is emptied, not removed, so a mount point is fine)::

    mkdir -p /tmp/mine /tmp/ops && unshare -m --propagation private sh -c \
        'mount --bind /tmp/mine /tmp/ops && .venv/bin/python scripts/ops_tour.py --readme README.md'
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETUP_SNAPSHOT = """
import sys
from raft_sqlite import NodeStore
with NodeStore.open(sys.argv[1], "demo-node", cluster_id="demo-cluster") as s:
    log = s.log("g0")
    at = s.metadata("g0").commit_index // 1000 * 1000  # a whole segment (1,000 entries) below it
    with s.snapshots("g0").write(at, log.term(at)) as w:
        w.write(b"state of g0 %d " % at * 5000)
    print(at)
"""

DAMAGE = """
import sys, apsw
c = apsw.Connection(sys.argv[1] + "/raft.db")
c.execute("UPDATE log_entries SET payload = x'00' || payload WHERE group_id = 3 AND idx = 1500")
c.close()
"""


# The second example node, for `log`'s decoder and filters and the `snapshot` commands: group g1 has a
# key-value state machine of two structures (kv, sessions) captured every 1,000 entries up to 3000 (FULL,
# then DELTAs) and compacted to 2000; every 500th entry (1, 501, ...) is a CONFIG entry. Group g2 has one
# raw snapshot of 4.9 MiB at 100. Prints the id of g2's snapshot.
SETUP_SNAP = """
import json, sys
from raft_sqlite import EntryKind, LogEntry, NodeStore, SegmentPolicy


class Map:
    # a structure with deltas: what changed since the last snapshot()/delta()
    def __init__(self):
        self.d, self.changed = {}, {}
    def set(self, k, v):
        self.d[k] = self.changed[k] = v
    def snapshot(self):
        self.changed = {}
        return json.dumps(self.d, sort_keys=True).encode()
    def restore(self, data):
        self.d, self.changed = json.loads(data), {}
    def delta(self):
        out, self.changed = json.dumps(self.changed, sort_keys=True).encode(), {}
        return out
    def apply_delta(self, data):
        self.d.update(json.loads(data))


def entry(i):
    term = 1 + i // 1250
    if i % 500 == 1:
        return LogEntry(i, term, json.dumps({"members": ["n1", "n2", "n3"]}).encode(), EntryKind.CONFIG)
    return LogEntry(i, term, json.dumps({"key": "user%d" % (i % 300), "value": i}).encode())


with NodeStore.open(sys.argv[1], "snap-node", cluster_id="demo-cluster",
                    segment_policy=SegmentPolicy(max_entries=500)) as s:
    log, meta = s.log("g1"), s.metadata("g1")
    kv, sessions = Map(), Map()
    sm = s.state_machine("g1")
    sm.register("kv", kv)
    sm.register("sessions", sessions)
    for lo in range(1, 3001, 100):
        batch = [entry(i) for i in range(lo, lo + 100)]
        log.append(batch)
        meta.set_commit_index(lo + 99)
        for e in batch:
            if e.kind is EntryKind.NORMAL:
                cmd = json.loads(e.data)
                kv.set(cmd["key"], cmd["value"])
                sessions.set("client%d" % (e.index % 7), e.index)
        if (lo + 99) % 1000 == 0:
            sm.capture(lo + 99, log.term(lo + 99))
    log.compact(2000)
    s.log("g2").append([LogEntry(i, 1, b"raw-%d" % i) for i in range(1, 101)])
    s.metadata("g2").set_commit_index(100)
    with s.snapshots("g2").write(100, 1) as w:
        for k in range(5):
            w.write(b"state of g2, part %d " % k * 51_200)  # 5 x 1,024,000 bytes
    print(s.snapshots("g2").latest().id)
"""

# `log --follow`'s other side: the node appends 3001..3003 to g1 while `log` follows it
APPEND = """
import json, time
from raft_sqlite import LogEntry, NodeStore
with NodeStore.open("snap/node", "snap-node", cluster_id="demo-cluster") as s:
    time.sleep(2)
    for i in range(3001, 3004):
        s.log("g1").append([LogEntry(i, 3, json.dumps({"key": "user%d" % (i % 300), "value": i}).encode())])
        time.sleep(0.3)
"""

# README's decoder (section "`log` and `verify`"), in the commands' working directory
KVCODEC = """import json

from raft_sqlite import EntryKind, LogEntry


def decode(entry: LogEntry) -> str:
    cmd = json.loads(entry.data)
    if entry.kind is EntryKind.CONFIG:
        return "members " + ",".join(cmd["members"])
    return f"SET {cmd['key']} = {cmd['value']}"
"""

ZERO_CHUNK = """
import sys, apsw
c = apsw.Connection(sys.argv[1] + "/chunks.db")
c.execute("UPDATE snapshot_chunks SET data = zeroblob(length(data)) WHERE snapshot_id = ? AND seq = 2", (int(sys.argv[2]),))
c.close()
"""


def transcripts(d: str) -> dict[str, list[str]]:
    """NAME -> the shell commands of its block, in order (run from the data_dir's parent)."""
    node, snap = f"{d}/node", f"{d}/snap"
    return {
        "errors": [f"raft-sqlite status {d}/nope; echo rc=$?",
                   f"raft-sqlite compact {node} --group g1 --up-to 100; echo rc=$?"],
        "status": [f"raft-sqlite status {node}"],
        "sql-refused": [f'raft-sqlite sql {node} "DELETE FROM log_entries WHERE group_id = 1"; echo rc=$?',
                        f'raft-sqlite sql {node} --json "SELECT group_id, idx, term, kind, payload FROM log_entries '
                        'WHERE group_id = 1 AND idx = 2001"'],
        "sql-views": [
            f'raft-sqlite sql {node} "SELECT name, current_term, commit_index, first_index, last_index, entries, '
            'stored_bytes, segments, snapshot_index FROM group_status"',
            f'raft-sqlite sql {node} "SELECT segment_id, group_name, first_index, last_index, state, entry_count, '
            'bytes, checksum_hex, compactable FROM segments ORDER BY group_name, first_index"',
            f'raft-sqlite sql {node} "SELECT snapshot_id, group_name, idx, term, kind, status, size, base_id, '
            'chain_depth, is_newest FROM snapshot_chain"',
            f'raft-sqlite sql {node} --format csv "SELECT key, value FROM settings ORDER BY key"'],
        "sql-dot": [
            f"printf '.headers off\\n.mode csv\\nSELECT name, commit_index FROM group_status;\\n"
            f".output {d}/groups.txt\\n.mode table\\n.headers on\\nSELECT name, entries FROM group_status;\\n"
            f".output\\n.dump backups\\n' | raft-sqlite sql {node}",
            f"cat {d}/groups.txt"],
        # the browser view runs until Ctrl-C: `timeout -s INT` is that Ctrl-C, 5 s after the start
        "serve": [f"timeout --preserve-status -s INT 5 raft-sqlite serve {node}; echo rc=$?",
                  f"raft-sqlite serve {node} --host 0.0.0.0; echo rc=$?"],
        "log-verify": [f"raft-sqlite log {node} --group g1 --from 998 --to 1003",
                       f"raft-sqlite verify {node}; echo rc=$?"],
        "vacuum": [f"raft-sqlite vacuum {node}", f"raft-sqlite status {node} | grep 'free space'"],
        "metrics": [
            f"raft-sqlite metrics {node} | grep -E '^raft_sqlite_(info|log_entries|oldest_segment_timestamp_seconds|"
            "snapshot_index|snapshot_timestamp_seconds|backup_timestamp_seconds|recovery_timestamp_seconds|"
            "recovery_outcome)'",
            f"mkdir -p {d}/textfile && raft-sqlite metrics {node} --output {d}/textfile/raft_node.prom && "
            f"stat -c '%a %n' {d}/textfile/*",
            f"raft-sqlite metrics {d}/nope --output {d}/textfile/raft_node.prom; echo rc=$?; ls -A {d}/textfile",
            f"raft-sqlite metrics {node} --json | head -19"],
        "repair": [f"raft-sqlite repair {d}/damaged --recovery truncate-tail --yes; echo rc=$?",
                   f"raft-sqlite repair {d}/damaged --recovery partial --yes; echo rc=$?",
                   f"raft-sqlite status {d}/damaged | tail -4"],
        "log-options": [f"raft-sqlite log {snap}/node -g g1 --from 1998 --to 2002 --decoder kvcodec:decode",
                        f"raft-sqlite log {snap}/node -g g1 --kind CONFIG --payload-bytes 8 --decoder kvcodec:decode",
                        f"raft-sqlite log {snap}/node -g g1 --from 1 --to 100",
                        f"raft-sqlite log {snap}/node -g g1 --from 2990 --to 3010 --term 2"],
        # appender.py appends 3001..3003 to g1 2 s after it opens the node; `timeout -s INT` is the Ctrl-C
        "log-follow": [f"python appender.py & timeout -s INT 5 raft-sqlite log {snap}/node -g g1 --limit 2 --follow "
                       "--interval 0.2 --decoder kvcodec:decode; wait"],
        "snapshot": [f"raft-sqlite snapshot list {snap}/node",
                     f"raft-sqlite snapshot show {snap}/node 3",
                     f"raft-sqlite snapshot export {snap}/node 4 {snap}/g2-100.bin",
                     f"raft-sqlite snapshot verify {snap}/node; echo rc=$?",
                     f"raft-sqlite snapshot verify {snap}/bad 4; echo rc=$?",
                     f"raft-sqlite snapshot export {snap}/bad 4 {snap}/out.bin; echo rc=$?",
                     f"ls {snap}/out.bin"],
    }


def setup(d: str, env: dict[str, str]) -> None:
    os.makedirs(d, exist_ok=True)
    for name in os.listdir(d):  # emptied, not removed: d may be a mount point (see the docstring)
        path = os.path.join(d, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    node = f"{d}/node"

    def run(*cmd: str) -> str:
        return subprocess.run(cmd, check=True, env=env, cwd=d, stdout=subprocess.PIPE, text=True).stdout

    # 4 to 4.5 s of writes: more than 2,000 entries per group (two sealed segments) on a slow machine
    run("raft-sqlite", "demo", "--data-dir", node, "--seed", "7", "--min-run", "4", "--max-run", "4.5")
    at = run(sys.executable, "-c", SETUP_SNAPSHOT, node).strip()
    run("raft-sqlite", "compact", node, "--group", "g0", "--up-to", at)
    run("raft-sqlite", "backup", node, f"{d}/backups", "--quiet")
    shutil.copytree(node, f"{d}/damaged")  # a copy with one committed entry of g2 damaged, for `repair`
    run(sys.executable, "-c", DAMAGE, f"{d}/damaged")
    # the second node (log's decoder and filters, snapshot), and a copy with chunk 2 of g2's snapshot zeroed
    sid = run(sys.executable, "-c", SETUP_SNAP, f"{d}/snap/node").strip()
    if sid != "4":
        raise SystemExit(f"g2's snapshot got id {sid}, README's commands name 4")
    shutil.copytree(f"{d}/snap/node", f"{d}/snap/bad")
    run(sys.executable, "-c", ZERO_CHUNK, f"{d}/snap/bad", sid)
    for name, text in (("kvcodec.py", KVCODEC), ("appender.py", APPEND)):
        with open(os.path.join(d, name), "w", encoding="utf-8") as f:
            f.write(text)


def run_block(cmds: list[str], d: str, env: dict[str, str]) -> str:
    out = []
    for cmd in cmds:
        r = subprocess.run(["bash", "-c", "{ " + cmd + "; } 2>&1"], capture_output=True, text=True, env=env, cwd=d)
        out.append(f"$ {cmd}\n{r.stdout}")
    return "".join(out).rstrip("\n") + "\n"


def splice(readme: str, blocks: dict[str, str]) -> str:
    marks = re.findall(r"^<!-- transcript:([\w-]+) -->$", readme, re.M)
    if sorted(marks) != sorted(blocks):
        raise SystemExit(f"README transcript markers {sorted(marks)} != transcripts {sorted(blocks)}")
    for name, text in blocks.items():
        pat = re.compile(rf"(<!-- transcript:{re.escape(name)} -->\n```\n)(.*?)(```\n)", re.S)
        readme, n = pat.subn(lambda m: m.group(1) + text + m.group(3), readme)
        if n != 1:
            raise SystemExit(f"transcript {name}: expected one fence after its marker, found {n}")
    return readme


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", help="splice the transcripts into this file")
    ap.add_argument("--dir", default="/tmp/ops", help="where the example nodes are built (emptied first)")
    a = ap.parse_args(argv)
    d = os.path.abspath(a.dir)
    env = dict(os.environ, COLUMNS="120", PYTHONPATH=ROOT,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    text = ""
    if a.readme is not None:
        with open(a.readme, encoding="utf-8") as f:
            text = f.read()
        if f"```python\n{KVCODEC}```" not in text:
            raise SystemExit("README's kvcodec.py decoder differs from KVCODEC here: fix one of them first")
    setup(d, env)
    blocks = {name: run_block(cmds, d, env) for name, cmds in transcripts(d).items()}
    if a.readme is None:
        for name, block in blocks.items():
            print(f"<!-- transcript:{name} -->\n```\n{block}```\n")
        return 0
    with open(a.readme, "w", encoding="utf-8") as f:
        f.write(splice(text, blocks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
