"""Re-run README's "Operations" examples and paste what they print into README.

    .venv/bin/python scripts/ops_tour.py [--readme README.md] [--dir /tmp/ops]

Every CLI transcript in README's Operations section sits under a marker ``<!-- transcript:NAME -->``
followed by a plain fence; this script builds the documented node (the demo's data_dir with seed 7, a
snapshot of g0 at 2000, its compaction, a backup), runs each transcript's commands for real with
``COLUMNS=120``, and replaces the fence's content with ``$ command`` lines and their output (stdout and
stderr, as a terminal shows them piped). Without ``--readme`` it prints the transcripts. A marker in
README without a transcript here, or the reverse, is an error: examples cannot silently go stale.
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


def transcripts(d: str) -> dict[str, list[str]]:
    """NAME -> the shell commands of its block, in order (run from the data_dir's parent)."""
    node = f"{d}/node"
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
    }


def setup(d: str, env: dict[str, str]) -> None:
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
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
    ap.add_argument("--dir", default="/tmp/ops", help="where the example node is built (removed first)")
    a = ap.parse_args(argv)
    d = os.path.abspath(a.dir)
    env = dict(os.environ, COLUMNS="120", PYTHONPATH=ROOT,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    setup(d, env)
    blocks = {name: run_block(cmds, d, env) for name, cmds in transcripts(d).items()}
    if a.readme is None:
        for name, text in blocks.items():
            print(f"<!-- transcript:{name} -->\n```\n{text}```\n")
        return 0
    with open(a.readme, encoding="utf-8") as f:
        text = f.read()
    with open(a.readme, "w", encoding="utf-8") as f:
        f.write(splice(text, blocks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
