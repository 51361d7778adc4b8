"""examples/pysyncobj_sql.py: 3 PySyncObj node processes with raft_sqlite as journal and ``store.state()`` as the
SQL state machine; the demo SIGKILLs a follower or the leader, restarts it, and checks that the three SQL states
are equal, hold every acknowledged put exactly once, and can be read from outside through a read-only
connection while the nodes run."""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("pysyncobj")
pytest.importorskip("apsw")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "pysyncobj_sql.py")
COUNT = 60

# "  node1     60           60    60       60           62 c5a269c21dc4ca8b             20  same, write refused: True"
# (node, keys, sum(version), ops, log puts, last_applied, digest, replay skipped, read-only check)
ROW = re.compile(r"^\s+(node\d)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([0-9a-f]{16})\s+(\d+)\s+(.*)$")


def run_demo(tmp_path, kill):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, EXAMPLE, "demo", "--dir", str(tmp_path / "cluster"), "--count", str(COUNT), "--kill", kill]
    try:
        # generous: a healthy run takes ~10 s; the demo's own waits give up after ~10 min in the worst case
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"demo timed out; stdout so far:\n{exc.stdout}")
    logs = ""
    for name in ("node1", "node2", "node3"):
        path = tmp_path / "cluster" / f"{name}.log"
        if path.exists():
            logs += f"\n--- {name}.log (tail)\n" + path.read_text(errors="replace")[-3000:]
    return p.returncode, p.stdout, p.stderr + logs


@pytest.mark.parametrize("kill", ["follower", "leader"])
def test_demo_sigkill_restart_converges_exactly_once(tmp_path, kill):
    rc, out, err = run_demo(tmp_path, kill)
    detail = f"stdout:\n{out}\nstderr:\n{err}"
    assert rc == 0, detail
    assert "MISMATCH" not in out, detail
    assert re.search(rf"^SIGKILL node\d \(the {kill}\)", out, re.M), detail
    assert f"phase 3 (after the restart): {COUNT} of {COUNT} puts acknowledged" in out, detail
    assert (f"{COUNT} puts acknowledged; every node: {COUNT} keys, sum(version)={COUNT}, ops={COUNT}, "
            in out), detail
    assert "OK: all 3 SQL states equal and equal to the acknowledged writes, no double apply" in out, detail

    rows = [m.groups() for m in map(ROW.match, out.splitlines()) if m]
    assert sorted(r[0] for r in rows) == ["node1", "node2", "node3"], detail
    for _name, keys, sum_version, ops, log_puts, last_applied, _digest, _skipped, outside in rows:
        # every acknowledged put present once; the counter equals the client commands in the node's log
        assert int(keys) == int(sum_version) == int(ops) == int(log_puts) == COUNT, detail
        assert int(last_applied) >= COUNT + 1, detail  # + PySyncObj's no-ops (index 1, one per new leader)
        assert outside == "same, write refused: True", detail
    assert len({(r[5], r[6]) for r in rows}) == 1, detail  # same last_applied and same content digest

    # the killed node's restart replayed the journal from index 1: what it had applied was skipped, not redone
    m = re.search(r"^(node\d) had applied (\d+) puts before the SIGKILL; "
                  r"its replay after the restart skipped (\d+)$", out, re.M)
    assert m and m.group(2) == m.group(3) and int(m.group(2)) > 0, detail
